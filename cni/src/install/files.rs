//! Replacing files so that a reader (the container runtime watches the CNI
//! configuration directory and runs binaries from the bin directory) sees
//! the old file or the new one, never half of one: a temporary file in the
//! same directory, fsync, rename over the target.

use std::{
    fs::{self, File, Permissions},
    io::{self, BufReader, Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::Path,
};

use tempfile::NamedTempFile;

/// A temporary file beside `path`, named so that no runtime takes it for a
/// configuration (no `.conf`/`.conflist`/`.json` ending) while it exists.
fn temp_beside(path: &Path) -> io::Result<NamedTempFile> {
    let dir =
        path.parent().ok_or_else(|| io::Error::other(format!("{} has no directory", path.display())))?;
    tempfile::Builder::new().prefix(".ztunnel-cni-").suffix(".tmp").tempfile_in(dir)
}

fn finish(mut tmp: NamedTempFile, path: &Path, mode: u32) -> io::Result<()> {
    tmp.flush()?;
    tmp.as_file().set_permissions(Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename itself survives a crash only once the directory is synced.
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Writes `contents` to `path` unless it already holds exactly that (and
/// `mode`). Returns whether anything changed.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<bool> {
    if let Ok(existing) = fs::read(path)
        && existing == contents
        && current_mode(path)? == Some(mode)
    {
        return Ok(false);
    }
    let mut tmp = temp_beside(path)?;
    tmp.write_all(contents)?;
    finish(tmp, path, mode)?;
    Ok(true)
}

/// Copies `from` to `to` unless `to` already has the same bytes (and `mode`).
/// Returns whether anything changed.
pub fn copy_atomic(from: &Path, to: &Path, mode: u32) -> io::Result<bool> {
    if same_contents(from, to)? && current_mode(to)? == Some(mode) {
        return Ok(false);
    }
    let mut tmp = temp_beside(to)?;
    io::copy(&mut File::open(from)?, tmp.as_file_mut())?;
    finish(tmp, to, mode)?;
    Ok(true)
}

/// Removes `path`; a file that is already gone is not an error. Returns
/// whether it was there.
pub fn remove_if_present(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The permission bits of `path`, `None` when it does not exist.
pub fn current_mode(path: &Path) -> io::Result<Option<u32>> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(m.permissions().mode() & 0o7777)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether two files have the same bytes; a missing `b` is not the same.
/// Streams both: a plugin binary is tens of megabytes.
fn same_contents(a: &Path, b: &Path) -> io::Result<bool> {
    let (meta_a, meta_b) = match (fs::metadata(a), fs::metadata(b)) {
        (Ok(ma), Ok(mb)) => (ma, mb),
        (Err(e), _) => return Err(e),
        (_, Err(e)) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        (_, Err(e)) => return Err(e),
    };
    if meta_a.len() != meta_b.len() {
        return Ok(false);
    }
    let (mut ra, mut rb) = (BufReader::new(File::open(a)?), BufReader::new(File::open(b)?));
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = ra.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        rb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_only_what_changed_and_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.conflist");
        assert!(write_atomic(&path, b"one", 0o644).unwrap());
        assert!(!write_atomic(&path, b"one", 0o644).unwrap());
        assert!(write_atomic(&path, b"one", 0o600).unwrap());
        assert_eq!(current_mode(&path).unwrap(), Some(0o600));
        assert!(write_atomic(&path, b"two", 0o600).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"two");

        let copy = dir.path().join("bin");
        assert!(copy_atomic(&path, &copy, 0o755).unwrap());
        assert!(!copy_atomic(&path, &copy, 0o755).unwrap());
        assert_eq!(fs::read(&copy).unwrap(), b"two");
        assert_eq!(current_mode(&copy).unwrap(), Some(0o755));

        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(remove_if_present(&copy).unwrap());
        assert!(!remove_if_present(&copy).unwrap());
    }
}
