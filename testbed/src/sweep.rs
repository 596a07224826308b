//! Removes what earlier runs left behind when their process died before it
//! could clean up (a killed test binary): namespaces, cgroups and bpffs pins
//! whose name carries the pid of a process that no longer exists.

use std::path::Path;

use crate::{PREFIX, cgroup, net};

/// The pid in a run name `ztb-<tag>-<pid>-<n>...`.
fn owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    rest.split('-').nth(1)?.parse().ok()
}

fn is_stale(name: &str) -> bool {
    owner(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

pub fn stale_runs() {
    if let Ok(entries) = std::fs::read_dir("/var/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_stale(&name) {
                let _ = net::ip(&["netns", "del", &name]);
            }
        }
    }
    if let Ok(mount) = cgroup::mount()
        && let Ok(entries) = std::fs::read_dir(&mount)
    {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_stale(&name) {
                cgroup::kill_all(&e.path());
                cgroup::remove_tree(&e.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_stale(&name) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_owner_pid() {
        assert_eq!(owner("ztb-capture-1234-0-fab"), Some(1234));
        assert_eq!(owner("ztb-x-99-3"), Some(99));
        assert_eq!(owner("other-1234"), None);
        assert_eq!(owner("ztb-"), None);
    }
}
