//! A pod's cgroup and network namespace on this node, found without asking a
//! container runtime: the kubelet names the pod's cgroup after its UID, and
//! any process in that cgroup (or in a container's cgroup below it) is in
//! the pod's network namespace.

use std::{
    fs, io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use crate::netns::HeldNetns;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Not there yet (the kubelet has not made it, or the pod has no process
    /// yet): retried.
    #[error("no cgroup for pod {uid} under {roots}")]
    NoCgroup { uid: String, roots: String },
    #[error("no process in the cgroup {0} (yet) to find the pod's network namespace from")]
    NoProcess(PathBuf),
    #[error("pod UID `{0}` is not a UID")]
    BadUid(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl NodeError {
    /// Whether waiting can fix it (the pod is still starting).
    pub fn is_not_yet(&self) -> bool {
        matches!(self, NodeError::NoCgroup { .. } | NodeError::NoProcess(_))
    }
}

/// The kubelet's `kubepods` cgroups on this node, relative to the cgroup v2
/// mount, each in the systemd driver's naming (a directory ending in
/// `.slice`) or the cgroupfs driver's (anything else). A kubelet started
/// with `--cgroup-root=/kubelet` (kind) has its pods under
/// `kubelet.slice/kubelet-kubepods.slice` or `kubelet/kubepods`.
pub const DEFAULT_KUBEPODS_ROOTS: [&str; 4] =
    ["kubepods.slice", "kubepods", "kubelet.slice/kubelet-kubepods.slice", "kubelet/kubepods"];

/// Finds pods' cgroups under the kubelet's layouts.
#[derive(Debug, Clone)]
pub struct PodCgroups {
    mount: PathBuf,
    roots: Vec<PathBuf>,
}

/// The QoS classes that have a cgroup level of their own (Guaranteed pods
/// sit directly under `kubepods`).
const QOS_LEVELS: [&str; 2] = ["burstable", "besteffort"];

impl PodCgroups {
    /// `mount` is the cgroup v2 mount; `roots` the kubepods cgroups relative
    /// to it (see [`DEFAULT_KUBEPODS_ROOTS`]).
    pub fn new(mount: impl Into<PathBuf>, roots: impl IntoIterator<Item = impl Into<PathBuf>>) -> Self {
        Self { mount: mount.into(), roots: roots.into_iter().map(Into::into).collect() }
    }

    pub fn with_default_roots(mount: impl Into<PathBuf>) -> Self {
        Self::new(mount, DEFAULT_KUBEPODS_ROOTS)
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Where the pod with `uid` may have its cgroup, most common first.
    pub fn candidates(&self, uid: &str) -> Result<Vec<PathBuf>, NodeError> {
        if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(NodeError::BadUid(uid.to_owned()));
        }
        let mut out = Vec::with_capacity(self.roots.len() * 3);
        for root in &self.roots {
            let dir = self.mount.join(root);
            let leaf = root.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            match leaf.strip_suffix(".slice") {
                // systemd: every level repeats its ancestors' names, joined
                // by `-`; a `-` inside a name is written `_`.
                Some(prefix) => {
                    let uid = uid.replace('-', "_");
                    for qos in QOS_LEVELS {
                        out.push(
                            dir.join(format!("{prefix}-{qos}.slice"))
                                .join(format!("{prefix}-{qos}-pod{uid}.slice")),
                        );
                    }
                    out.push(dir.join(format!("{prefix}-pod{uid}.slice")));
                }
                None => {
                    for qos in QOS_LEVELS {
                        out.push(dir.join(qos).join(format!("pod{uid}")));
                    }
                    out.push(dir.join(format!("pod{uid}")));
                }
            }
        }
        Ok(out)
    }

    /// The pod's cgroup directory, if the kubelet has made it.
    pub fn find(&self, uid: &str) -> Result<PathBuf, NodeError> {
        self.candidates(uid)?.into_iter().find(|p| p.join("cgroup.procs").exists()).ok_or_else(|| {
            NodeError::NoCgroup {
                uid: uid.to_owned(),
                roots: self
                    .roots
                    .iter()
                    .map(|r| self.mount.join(r).display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })
    }

    /// The pod's network namespace, opened from a process in `cgroup` or in a
    /// cgroup below it and held as an fd. `name` is how it is shown.
    pub fn open_netns(&self, cgroup: &Path, name: &str) -> Result<PodNetns, NodeError> {
        let rel = self.relative(cgroup)?;
        for pid in pids_below(cgroup)? {
            if let Some((fd, start_time)) = open_if_still_inside(pid, rel) {
                return Ok(PodNetns {
                    netns: HeldNetns::new(fd, format!("{name} (pid {pid})")),
                    pid,
                    start_time,
                });
            }
        }
        Err(NodeError::NoProcess(cgroup.to_owned()))
    }

    /// Whether the process a namespace was opened from still runs in the
    /// pod's cgroup. When it does not (the pod's sandbox was made again, or
    /// only that container restarted), the namespace is looked up again.
    pub fn still_running(&self, cgroup: &Path, found: &PodNetns) -> bool {
        self.relative(cgroup)
            .is_ok_and(|rel| start_time(found.pid) == Some(found.start_time) && in_cgroup(found.pid, rel))
    }

    fn relative<'a>(&self, cgroup: &'a Path) -> Result<&'a Path, NodeError> {
        cgroup.strip_prefix(&self.mount).map_err(|_| NodeError::Io {
            path: cgroup.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not under the cgroup v2 mount"),
        })
    }
}

/// A pod's network namespace and the process it was opened from.
#[derive(Clone)]
pub struct PodNetns {
    pub netns: HeldNetns,
    pub pid: u32,
    /// The process's start time, which tells it from a later one with its pid.
    pub start_time: u64,
}

impl std::fmt::Debug for PodNetns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} from pid {}", crate::netns::NetnsRef::Held(self.netns.clone()), self.pid)
    }
}

/// Whether two namespace fds are the same namespace.
pub fn same_namespace(a: std::os::fd::BorrowedFd<'_>, b: std::os::fd::BorrowedFd<'_>) -> bool {
    match (nix::sys::stat::fstat(a), nix::sys::stat::fstat(b)) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        _ => false,
    }
}

/// Processes in `cgroup` and its descendants (containers are children of the
/// pod's cgroup), the pod's own level first.
fn pids_below(cgroup: &Path) -> Result<Vec<u32>, NodeError> {
    let mut out = Vec::new();
    let mut stack = vec![cgroup.to_owned()];
    while let Some(dir) = stack.pop() {
        let procs = dir.join("cgroup.procs");
        match fs::read_to_string(&procs) {
            Ok(text) => out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok())),
            // A container's cgroup can go away while we walk.
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir != cgroup => continue,
            Err(source) => return Err(NodeError::Io { path: procs, source }),
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            let mut children: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect();
            children.sort();
            stack.extend(children.into_iter().rev());
        }
    }
    Ok(out)
}

/// Opens `/proc/<pid>/ns/net` and keeps it only if `pid` was, before and
/// after the open, the same process (start time) inside `rel` (the pod's
/// cgroup relative to the mount). A pid read from `cgroup.procs` can exit
/// and be reused by any process; this check makes sure the fd held is the
/// pod's namespace and nobody else's.
fn open_if_still_inside(pid: u32, rel: &Path) -> Option<(OwnedFd, u64)> {
    let before = start_time(pid)?;
    if !in_cgroup(pid, rel) {
        return None;
    }
    let fd = OwnedFd::from(fs::File::open(format!("/proc/{pid}/ns/net")).ok()?);
    (in_cgroup(pid, rel) && start_time(pid) == Some(before)).then_some((fd, before))
}

/// Whether `pid` is in the cgroup `rel` (relative to the v2 mount) or below.
fn in_cgroup(pid: u32, rel: &Path) -> bool {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .is_some_and(|p| Path::new(p.trim_start_matches('/')).starts_with(rel))
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks
/// since boot. A reused pid has another.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from
    // the last `)`.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        os::unix::fs::MetadataExt as _,
        process::{Child, Command},
        time::{Duration, Instant},
    };

    use super::*;
    use crate::cgroup::cgroup2_mount;

    pub const UID: &str = "5f0e7c2a-1b2c-4d3e-8f90-a1b2c3d4e5f6";

    #[test]
    fn candidates_follow_both_drivers_and_nested_roots() {
        let m = Path::new("/sys/fs/cgroup");
        let c = PodCgroups::with_default_roots(m).candidates(UID).unwrap();
        let u = "5f0e7c2a_1b2c_4d3e_8f90_a1b2c3d4e5f6";
        for want in [
            format!("/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
            format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"
            ),
            format!("/sys/fs/cgroup/kubepods.slice/kubepods-pod{u}.slice"),
            format!("/sys/fs/cgroup/kubepods/burstable/pod{UID}"),
            format!("/sys/fs/cgroup/kubepods/pod{UID}"),
            format!(
                "/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice"
            ),
            format!("/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{u}.slice"),
            format!("/sys/fs/cgroup/kubelet/kubepods/besteffort/pod{UID}"),
        ] {
            assert!(c.contains(&PathBuf::from(&want)), "{want} not in {c:#?}");
        }
        assert!(matches!(PodCgroups::with_default_roots(m).candidates("../x"), Err(NodeError::BadUid(_))));
    }

    #[test]
    fn start_time_reads_past_odd_command_names() {
        assert!(start_time(std::process::id()).is_some());
        assert_eq!(start_time(u32::MAX), None);
    }

    /// A test cgroup tree (under the real cgroup v2 mount), network
    /// namespaces and "pod" processes; all removed on drop, even on failure.
    pub(crate) struct Fixture {
        pub mount: PathBuf,
        pub base: PathBuf,
        name: String,
        netns: Vec<String>,
        children: Vec<Child>,
    }

    impl Fixture {
        /// With one namespace, [`Fixture::netns`] 0.
        pub fn new(tag: &str) -> Self {
            let mount = cgroup2_mount().unwrap();
            let name = format!("ztunnel-test-k8s-{}-{tag}", std::process::id());
            let mut f =
                Fixture { base: mount.join(&name), mount, name, netns: Vec::new(), children: Vec::new() };
            f.add_netns();
            f
        }

        /// Makes another network namespace; returns its index.
        pub fn add_netns(&mut self) -> usize {
            let name = format!("{}-{}", self.name, self.netns.len());
            let ok = Command::new("ip").args(["netns", "add", &name]).status().unwrap();
            assert!(ok.success(), "ip netns add {name}");
            self.netns.push(name);
            self.netns.len() - 1
        }

        /// The inode of namespace `i`.
        pub fn netns_inode(&self, i: usize) -> u64 {
            fs::metadata(format!("/var/run/netns/{}", self.netns[i])).unwrap().ino()
        }

        /// The relative path of the base, for a [`PodCgroups`] root.
        pub fn root(&self, rel: &str) -> String {
            format!("{}/{rel}", self.name)
        }

        pub fn make(&self, rel: &str) -> PathBuf {
            let p = self.base.join(rel);
            fs::create_dir_all(&p).unwrap();
            p
        }

        /// Starts a process in `cgroup` and then in namespace `netns`:
        /// joining the cgroup first, because `ip netns exec` remounts /sys
        /// and would hide the cgroup2 mount.
        pub fn spawn_in(&mut self, cgroup: &Path, netns: usize) -> u32 {
            let script = format!(
                "echo $$ > {}/cgroup.procs && exec ip netns exec {} sleep 600",
                cgroup.display(),
                self.netns[netns]
            );
            let child = Command::new("sh").args(["-c", &script]).spawn().unwrap();
            let pid = child.id();
            self.children.push(child);
            // Wait until the process has entered the namespace (exec done).
            let want = self.netns_inode(netns);
            let deadline = Instant::now() + Duration::from_secs(30);
            while fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino()).ok() != Some(want) {
                assert!(Instant::now() < deadline, "the pod process never entered its namespace");
                std::thread::sleep(Duration::from_millis(10));
            }
            pid
        }

        /// Kills and reaps every process started so far.
        pub fn kill_all(&mut self) {
            for mut c in self.children.drain(..) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.kill_all();
            remove_tree(&self.base);
            for n in &self.netns {
                let _ = Command::new("ip").args(["netns", "del", n]).status();
            }
        }
    }

    fn remove_tree(dir: &Path) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&e.path());
                }
            }
        }
        let _ = fs::remove_dir(dir);
    }

    pub fn inode(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
        nix::sys::stat::fstat(fd).unwrap().st_ino
    }

    #[test]
    fn finds_pod_cgroups_in_every_layout() {
        let f = Fixture::new("layouts");
        let u = UID.replace('-', "_");
        let layouts = [
            (
                "kubepods.slice",
                format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
            ),
            ("kubepods.slice", format!("kubepods.slice/kubepods-pod{u}.slice")),
            ("kubepods", format!("kubepods/besteffort/pod{UID}")),
            ("kubepods", format!("kubepods/pod{UID}")),
            (
                "kubelet.slice/kubelet-kubepods.slice",
                format!(
                    "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice"
                ),
            ),
        ];
        for (root, layout) in layouts {
            let made = f.make(&layout);
            let finder = PodCgroups::new(&f.mount, [f.root(root)]);
            assert_eq!(finder.find(UID).unwrap(), made, "{layout}");
            remove_tree(&f.base);
            assert!(finder.find(UID).unwrap_err().is_not_yet(), "{layout} removed");
        }
    }

    #[test]
    fn the_pods_netns_comes_from_a_process_in_its_container_cgroup() {
        let mut f = Fixture::new("netns");
        let u = UID.replace('-', "_");
        let pod =
            f.make(&format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"));
        let container = f.make(&format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-abc.scope"
        ));
        let finder = PodCgroups::new(&f.mount, [f.root("kubepods.slice")]);
        let found = finder.find(UID).unwrap();
        assert_eq!(found, pod);
        // The cgroup is there before any process: not yet, and says so.
        let err = finder.open_netns(&found, "shop/web").unwrap_err();
        assert!(err.is_not_yet(), "{err}");

        let pid = f.spawn_in(&container, 0);
        let found_netns = finder.open_netns(&found, "shop/web").unwrap();
        assert_eq!(found_netns.pid, pid);
        let held = &found_netns.netns;
        let want = f.netns_inode(0);
        assert_eq!(inode(held.fd()), want, "the pod's namespace, not the test's");
        assert_ne!(inode(held.fd()), fs::metadata("/proc/self/ns/net").unwrap().ino());
        assert!(finder.still_running(&found, &found_netns));

        // Held by fd: the process going away does not change what is held,
        // and is noticed.
        f.kill_all();
        assert_eq!(inode(held.fd()), want);
        assert!(!finder.still_running(&found, &found_netns));
        assert!(finder.open_netns(&found, "shop/web").unwrap_err().is_not_yet());
    }

    #[test]
    fn a_process_outside_the_pod_cgroup_is_never_taken() {
        // Its pid is listed (as a reused pid would be), but it is elsewhere.
        let me = std::process::id();
        assert!(open_if_still_inside(me, Path::new("ztunnel-test-k8s-nowhere")).is_none());
        let mount = cgroup2_mount().unwrap();
        let mine = crate::cgroup::Cgroup::current(&mount).unwrap();
        let rel = mine.path().strip_prefix(&mount).unwrap().to_owned();
        assert!(open_if_still_inside(me, &rel).is_some(), "proves the check would accept a process inside");
    }
}
