//! A unix socket file the tunnel listens on (the CNI socket, the handover
//! socket): made mode 0600 (only root, or the tunnel's own user, may
//! connect), replacing a stale file nobody listens on, and removed at the
//! end only while it is still this process's: after an upgrade the path is
//! the successor's socket.

use std::{
    io,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

/// The socket file this process made.
#[derive(Debug, Clone)]
pub struct SocketFile {
    path: PathBuf,
    inode: u64,
}

/// Listens at `path` (see the module).
pub fn bind(path: &Path) -> io::Result<(tokio::net::UnixListener, SocketFile)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let inode = std::fs::metadata(path)?.ino();
    Ok((listener, SocketFile { path: path.to_owned(), inode }))
}

impl SocketFile {
    /// Removes the file at `path` (where it was bound, or where it was moved
    /// to) if it is this socket.
    pub fn remove_at(&self, path: &Path) {
        if std::fs::metadata(path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Removes it where it was bound, if it is still there.
    pub fn remove(&self) {
        self.remove_at(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_file_is_removed_only_while_it_is_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("x.sock");
        let (_first, first) = bind(&path).unwrap();
        let (_second, second) = bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        first.remove();
        assert!(path.exists(), "a successor's socket was removed");
        second.remove();
        assert!(!path.exists());
    }
}
