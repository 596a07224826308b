//! cgroup v2 housekeeping for a run.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// The cgroup v2 mount point.
pub fn mount() -> anyhow::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split(' ').next() != Some("cgroup2") {
                return None;
            }
            pre.split(' ').nth(4).map(PathBuf::from)
        })
        .context("no cgroup v2 hierarchy mounted")
}

/// Kills every process in `base` and below, and waits until they are gone.
pub fn kill_all(base: &Path) {
    if !base.exists() {
        return;
    }
    let _ = std::fs::write(base.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let events = std::fs::read_to_string(base.join("cgroup.events")).unwrap_or_default();
        if events.lines().any(|l| l == "populated 0") {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes `base` and every cgroup below it, deepest first.
pub fn remove_tree(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(base);
}
