//! cgroup v2: mounted, where, and whether the host is unified (v2 only) or
//! hybrid (v1 controllers beside a v2 hierarchy, usually at
//! /sys/fs/cgroup/unified). Capture works on both: its programs attach to v2
//! cgroups, and workloads are told apart by their v2 cgroup.

use std::{
    io::{self, BufRead as _},
    path::{Path, PathBuf},
};

use super::Finding;
use crate::cgroup::{Cgroup, cgroup2_mount};

/// Returns the findings and, when it is mounted, the v2 mount point (where
/// the eBPF checks make their scratch cgroup).
pub(super) fn check(cgroup_root: Option<&Path>) -> (Vec<Finding>, Option<PathBuf>) {
    let mount = match cgroup2_mount() {
        Ok(m) => m,
        Err(e) => {
            let finding = Finding::fail(
                "cgroup2",
                e.to_string(),
                "mount the cgroup v2 hierarchy (`mount -t cgroup2 none /sys/fs/cgroup`, or boot with \
                 systemd.unified_cgroup_hierarchy=1); in a container, mount the host's /sys/fs/cgroup",
            );
            return (vec![finding], None);
        }
    };
    let mut findings = vec![Finding::pass("cgroup2", describe(&mount, v1_mounts().unwrap_or_default()))];
    if let Some(root) = cgroup_root {
        findings.push(cgroup_root_finding(&mount, root));
    }
    (findings, Some(mount))
}

fn describe(mount: &Path, v1: Vec<PathBuf>) -> String {
    match v1.first() {
        None => format!("mounted at {} (unified: cgroup v2 only)", mount.display()),
        Some(first) => {
            let parent = first.parent().unwrap_or(first);
            format!(
                "mounted at {} (hybrid: {} cgroup v1 hierarchies beside it under {}; capture uses v2 only)",
                mount.display(),
                v1.len(),
                parent.display()
            )
        }
    }
}

fn cgroup_root_finding(mount: &Path, root: &Path) -> Finding {
    let check = "cgroup-root";
    match Cgroup::resolve(mount, root) {
        Err(e) => Finding::fail(
            check,
            format!("capture.cgroup_root: {e}"),
            format!("set capture.cgroup_root to a directory under {}", mount.display()),
        ),
        Ok(cgroup) if cgroup.exists() => {
            Finding::pass(check, format!("capture.cgroup_root {cgroup} exists; programs attach there"))
        }
        Ok(cgroup) => Finding::fail(
            check,
            format!("capture.cgroup_root {cgroup} does not exist"),
            "create it (the node's workloads must live below it) or point capture.cgroup_root at the \
             cgroup that holds them",
        ),
    }
}

/// Mount points of cgroup v1 hierarchies.
fn v1_mounts() -> io::Result<Vec<PathBuf>> {
    let f = std::fs::File::open("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in io::BufReader::new(f).lines() {
        let line = line?;
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split(' ').next() == Some("cgroup")
            && let Some(mount_point) = pre.split(' ').nth(4)
        {
            out.push(PathBuf::from(mount_point));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_unified_or_hybrid() {
        assert_eq!(
            describe(Path::new("/sys/fs/cgroup"), vec![]),
            "mounted at /sys/fs/cgroup (unified: cgroup v2 only)"
        );
        let hybrid = describe(
            Path::new("/sys/fs/cgroup/unified"),
            vec![PathBuf::from("/sys/fs/cgroup/cpu"), PathBuf::from("/sys/fs/cgroup/memory")],
        );
        assert!(hybrid.starts_with("mounted at /sys/fs/cgroup/unified (hybrid: 2 cgroup v1"), "{hybrid}");
    }
}
