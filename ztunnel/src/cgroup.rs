//! cgroup v2: where the hierarchy is mounted, cgroup ids, and moving the tunnel
//! into its own cgroup.
//!
//! A workload is known by its cgroup because the kernel assigns it: a process
//! cannot claim another workload's cgroup the way it could claim an IP.

use std::{
    fs,
    io::{self, BufRead as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("cannot read /proc/self/mountinfo: {0}")]
    Mountinfo(io::Error),
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a cgroup v2 directory (not under {mount})")]
    NotCgroup2 { path: PathBuf, mount: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.to_owned(), source }
}

/// The cgroup v2 mount point (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let f = fs::File::open("/proc/self/mountinfo").map_err(CgroupError::Mountinfo)?;
    for line in io::BufReader::new(f).lines() {
        let line = line.map_err(CgroupError::Mountinfo)?;
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <source> <superopts>"
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split(' ').next() != Some("cgroup2") {
            continue;
        }
        if let Some(mount_point) = pre.split(' ').nth(4) {
            return Ok(PathBuf::from(unescape_mountinfo(mount_point)));
        }
    }
    Err(CgroupError::NoCgroup2)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A cgroup v2 directory, resolved against the mount point.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// `path` is absolute or relative to `mount`; it must lie under `mount`.
    pub fn resolve(mount: &Path, path: &Path) -> Result<Self, CgroupError> {
        let path = if path.is_absolute() { path.to_owned() } else { mount.join(path) };
        if !path.starts_with(mount) {
            return Err(CgroupError::NotCgroup2 { path, mount: mount.to_owned() });
        }
        Ok(Self { path })
    }

    /// The root of the hierarchy.
    pub fn root(mount: &Path) -> Self {
        Self { path: mount.to_owned() }
    }

    /// The cgroup the calling process is in.
    pub fn current(mount: &Path) -> Result<Self, CgroupError> {
        let text = fs::read_to_string("/proc/self/cgroup").map_err(io_err(Path::new("/proc/self/cgroup")))?;
        let rel = text.lines().find_map(|l| l.strip_prefix("0::")).ok_or(CgroupError::NoCgroup2)?;
        Self::resolve(mount, Path::new(rel.trim_start_matches('/')))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup v2 id, as `bpf_get_current_cgroup_id()` reports it: the
    /// inode number of the cgroup's directory.
    pub fn id(&self) -> Result<u64, CgroupError> {
        Ok(fs::metadata(&self.path).map_err(io_err(&self.path))?.ino())
    }

    pub fn exists(&self) -> bool {
        self.path.join("cgroup.procs").exists()
    }

    /// Levels below the hierarchy's root (`mount`): the level at which the
    /// capture programs' ancestor walk meets it.
    pub fn depth(&self, mount: &Path) -> usize {
        self.path.strip_prefix(mount).map_or(0, |rel| rel.components().count())
    }

    /// Whether `self` is `other` or one of its ancestors.
    pub fn contains(&self, other: &Cgroup) -> bool {
        other.path.starts_with(&self.path)
    }

    /// Creates the directory if needed and moves the whole calling process
    /// into it.
    pub fn join(&self) -> Result<(), CgroupError> {
        fs::create_dir_all(&self.path).map_err(io_err(&self.path))?;
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, std::process::id().to_string()).map_err(io_err(&procs))
    }
}

impl std::fmt::Display for Cgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.path.display().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mountinfo("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/a\\"), "/a\\");
    }

    #[test]
    fn resolves_relative_paths_under_the_mount() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(
            Cgroup::resolve(m, Path::new("kubepods/pod1")).unwrap().path(),
            Path::new("/sys/fs/cgroup/kubepods/pod1")
        );
        assert!(Cgroup::resolve(m, Path::new("/tmp/x")).is_err());
        assert_eq!(Cgroup::resolve(m, Path::new("a/b/c")).unwrap().depth(m), 3);
        assert_eq!(Cgroup::root(m).depth(m), 0);
        let parent = Cgroup::resolve(m, Path::new("a")).unwrap();
        let child = Cgroup::resolve(m, Path::new("a/b")).unwrap();
        assert!(parent.contains(&child));
        assert!(!child.contains(&parent));
        assert!(!Cgroup::resolve(m, Path::new("ab")).unwrap().contains(&child));
    }

    #[test]
    fn finds_this_process_cgroup() {
        // Every Linux test host mounts cgroup v2 (hybrid or unified).
        let mount = cgroup2_mount().unwrap();
        let me = Cgroup::current(&mount).unwrap();
        assert!(me.exists(), "{me}");
        assert!(me.id().unwrap() > 0);
    }
}

/// Tells when cgroups appear or go below some directories, so enrollment
/// runs at once rather than at the next tick: a unit restarted into a new
/// cgroup is captured again within milliseconds (and until then, below a
/// guard cgroup, its connections fail closed).
pub struct CgroupWatcher {
    inotify: tokio::io::unix::AsyncFd<InotifyFd>,
    watched: std::collections::HashMap<PathBuf, nix::sys::inotify::WatchDescriptor>,
}

struct InotifyFd(nix::sys::inotify::Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsFd::as_fd(&self.0).as_raw_fd()
    }
}

impl CgroupWatcher {
    pub fn new() -> io::Result<Self> {
        use nix::sys::inotify::{InitFlags, Inotify};
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(io::Error::from)?;
        // SAFETY: the Inotify owns its fd and keeps it open for as long as
        // it lives, which is as long as the AsyncFd that owns it.
        let inotify = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                InotifyFd(inotify),
                tokio::io::Interest::READABLE,
            )
        }?;
        Ok(Self { inotify, watched: Default::default() })
    }

    /// Watches exactly `dirs` (directories that do not exist are skipped and
    /// retried on the next call).
    pub fn watch(&mut self, dirs: impl IntoIterator<Item = PathBuf>) {
        use nix::sys::inotify::AddWatchFlags;
        let wanted: std::collections::HashSet<PathBuf> = dirs.into_iter().collect();
        let gone: Vec<PathBuf> = self.watched.keys().filter(|d| !wanted.contains(*d)).cloned().collect();
        for d in gone {
            if let Some(wd) = self.watched.remove(&d) {
                let _ = self.inotify.get_ref().0.rm_watch(wd);
            }
        }
        for d in wanted {
            if self.watched.contains_key(&d) {
                continue;
            }
            let flags = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_DELETE | AddWatchFlags::IN_ONLYDIR;
            match self.inotify.get_ref().0.add_watch(&d, flags) {
                Ok(wd) => {
                    self.watched.insert(d, wd);
                }
                Err(e) => tracing::debug!("not watching {} for new cgroups: {e}", d.display()),
            }
        }
    }

    /// Waits until something appeared or went in a watched directory.
    pub async fn changed(&self) {
        loop {
            let Ok(mut guard) = self.inotify.readable().await else {
                return std::future::pending().await;
            };
            match guard.get_inner().0.read_events() {
                Ok(events) if !events.is_empty() => return,
                Ok(_) => guard.clear_ready(),
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => {
                    tracing::warn!("watching cgroups: {e}");
                    return std::future::pending().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod watch_tests {
    use super::*;

    #[tokio::test]
    async fn a_cgroup_made_below_a_watched_directory_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = CgroupWatcher::new().unwrap();
        w.watch([dir.path().to_owned()]);
        let noticed = w.changed();
        fs::create_dir(dir.path().join("unit.service")).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), noticed).await.expect("noticed");
    }
}
