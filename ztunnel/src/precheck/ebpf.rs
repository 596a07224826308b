//! The tunnel's own eBPF object, with maps of its own (never the pinned
//! ones): created, then each program loaded through the verifier, attached to
//! a scratch cgroup (cgroup programs) or a scratch network namespace
//! (sk_lookup), and detached. Loading the real programs is what checks every
//! helper and map type they use.
//!
//! Programs are found by type, so one added to the object is checked with no
//! change here; a type this module does not know how to attach fails, rather
//! than passing unchecked.

use std::{
    error::Error as StdError,
    fs::File,
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::programs::{CgroupAttachMode, CgroupSkbAttachType, Program, ProgramError};
use nix::{errno::Errno, sched::CloneFlags};

use super::{Finding, errno};
use crate::capture;

/// Where scratch cgroups are made, under the cgroup v2 mount.
const SCRATCH_PREFIX: &str = "ztunnel-precheck-";

pub(super) fn check(cgroup2: Option<&Path>, max_connections: u32) -> Vec<Finding> {
    // Global values do not matter for loading; maps are this check's own.
    let mut ebpf =
        match capture::load_object(None, 0, max_connections, ztunnel_ebpf_common::MAX_WORKLOAD_SOCKETS) {
            Ok(ebpf) => ebpf,
            Err(e) => {
                let fix = match find_errno(&e) {
                    Some(Errno::EPERM) => "grant CAP_BPF (or CAP_SYS_ADMIN): see the capability lines",
                    _ => "run Linux 5.15 or later (see the kernel line)",
                };
                return vec![Finding::fail("ebpf-object", chain(&e), fix)];
            }
        };
    let mut findings = vec![Finding::pass(
        "ebpf-object",
        format!("maps created (connection maps sized for capture.max_connections {max_connections})"),
    )];
    let scratch = Scratch::new(cgroup2);
    let mut programs: Vec<(&str, &mut Program)> = ebpf.programs_mut().collect();
    programs.sort_by_key(|(name, _)| *name);
    for (name, program) in programs {
        let kind = format!("{:?}", program.prog_type());
        let finding = match try_program(program, &scratch) {
            Ok(target) => {
                Finding::pass("ebpf-program", format!("{kind}: loaded, attached to {target}, detached"))
            }
            Err(step) => step.finding(&kind),
        };
        findings.push(finding.about(name));
    }
    if findings.len() == 1 {
        findings.push(Finding::fail(
            "ebpf-program",
            "the eBPF object holds no programs",
            "rebuild ztunnel (`cargo xtask build`): its build embeds the programs",
        ));
    }
    findings
}

/// Where a program is tried: made once, removed when dropped.
struct Scratch {
    cgroup: Result<ScratchCgroup, String>,
    netns: Result<OwnedFd, String>,
}

impl Scratch {
    fn new(cgroup2: Option<&Path>) -> Self {
        let cgroup = match cgroup2 {
            Some(mount) => ScratchCgroup::create(mount)
                .map_err(|e| format!("cannot make a scratch cgroup under {}: {e}", mount.display())),
            None => Err("no cgroup v2 hierarchy to make a scratch cgroup in".to_owned()),
        };
        let netns = scratch_netns().map_err(|e| format!("cannot make a scratch network namespace: {e}"));
        Self { cgroup, netns }
    }

    fn cgroup(&self) -> Result<&ScratchCgroup, Step> {
        self.cgroup.as_ref().map_err(|e| Step::NoScratch(e.clone()))
    }

    fn netns(&self) -> Result<&OwnedFd, Step> {
        self.netns.as_ref().map_err(|e| Step::NoScratch(e.clone()))
    }
}

/// An empty cgroup, removed when dropped.
struct ScratchCgroup {
    path: PathBuf,
    dir: File,
}

impl ScratchCgroup {
    fn create(mount: &Path) -> io::Result<Self> {
        let path = mount.join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
        // A leftover of a precheck that was killed (same pid, reused).
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path)?;
        match File::open(&path) {
            Ok(dir) => Ok(Self { path, dir }),
            Err(e) => {
                let _ = std::fs::remove_dir(&path);
                Err(e)
            }
        }
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        // Links still attached (after a failed detach) go with the cgroup.
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A new, empty network namespace, held by an fd. It is made by a thread of
/// its own that ends right after: a namespace belongs to the thread that
/// unshares, so no other thread (and never the host's namespace) is touched.
fn scratch_netns() -> io::Result<OwnedFd> {
    std::thread::Builder::new()
        .name("precheck-netns".into())
        .spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            File::open("/proc/thread-self/ns/net").map(OwnedFd::from)
        })?
        .join()
        .map_err(|_| io::Error::other("the thread making the namespace panicked"))?
}

/// Where trying a program stopped.
enum Step {
    Load(ProgramError),
    Attach(ProgramError),
    Detach(ProgramError),
    NoScratch(String),
    Unsupported,
}

/// Loads `program`, attaches it where its type attaches, and detaches it.
/// Returns where it was attached.
fn try_program(program: &mut Program, scratch: &Scratch) -> Result<String, Step> {
    // The cgroup program types share no trait for attach/detach.
    macro_rules! on_cgroup {
        ($p:expr) => {{
            let p = $p;
            p.load().map_err(Step::Load)?;
            let cgroup = scratch.cgroup()?;
            let id = p.attach(cgroup.dir.as_fd(), CgroupAttachMode::Single).map_err(Step::Attach)?;
            p.detach(id).map_err(Step::Detach)?;
            Ok(format!("scratch cgroup {}", cgroup.path.display()))
        }};
    }
    match program {
        Program::CgroupSockAddr(p) => on_cgroup!(p),
        Program::SockOps(p) => on_cgroup!(p),
        Program::CgroupSock(p) => on_cgroup!(p),
        Program::CgroupSockopt(p) => on_cgroup!(p),
        Program::CgroupSysctl(p) => on_cgroup!(p),
        Program::CgroupDevice(p) => on_cgroup!(p),
        Program::CgroupSkb(p) => {
            p.load().map_err(Step::Load)?;
            let cgroup = scratch.cgroup()?;
            let attach_type = p.expected_attach_type().unwrap_or(CgroupSkbAttachType::Ingress);
            let id =
                p.attach(cgroup.dir.as_fd(), attach_type, CgroupAttachMode::Single).map_err(Step::Attach)?;
            p.detach(id).map_err(Step::Detach)?;
            Ok(format!("scratch cgroup {}", cgroup.path.display()))
        }
        Program::SkLookup(p) => {
            p.load().map_err(Step::Load)?;
            let netns = scratch.netns()?;
            let id = p.attach(netns.as_fd()).map_err(Step::Attach)?;
            p.detach(id).map_err(Step::Detach)?;
            Ok("a scratch network namespace".to_owned())
        }
        _ => Err(Step::Unsupported),
    }
}

impl Step {
    fn finding(&self, kind: &str) -> Finding {
        let fail =
            |detail: String, fix: &str| Finding::fail("ebpf-program", format!("{kind}: {detail}"), fix);
        match self {
            Step::Load(e) => {
                let (detail, fix) = load_failure(e);
                fail(format!("the kernel refused to load it: {detail}"), fix)
            }
            Step::Attach(e) => {
                let fix = match find_errno(e) {
                    Some(Errno::EPERM) => "grant CAP_NET_ADMIN (and CAP_SYS_ADMIN): see the capability lines",
                    Some(Errno::EINVAL | Errno::EOPNOTSUPP) => {
                        "run Linux 5.15 or later: this kernel cannot link this program type (see the kernel line)"
                    }
                    _ => "run Linux 5.15 or later, as root",
                };
                fail(format!("loaded, but attaching it failed: {}", chain(e)), fix)
            }
            Step::Detach(e) => fail(
                format!("attached, but detaching it failed: {}", chain(e)),
                "the scratch cgroup or namespace is removed anyway; report this line as a ztunnel bug",
            ),
            Step::NoScratch(why) => fail(
                format!("loaded, but not attached: {why}"),
                "run precheck as root, with the host's cgroup v2 hierarchy mounted read-write",
            ),
            Step::Unsupported => fail(
                "not tried: precheck does not know how to attach this program type".to_owned(),
                "teach ztunnel/src/precheck/ebpf.rs to attach it (a ztunnel bug, not the node's)",
            ),
        }
    }
}

/// What the verifier said, shortened to the line that matters, and the fix.
fn load_failure(e: &ProgramError) -> (String, &'static str) {
    match e {
        ProgramError::LoadError { io_error, verifier_log } => {
            verifier_said(io_error, &verifier_log.to_string())
        }
        other => (chain(other), "run Linux 5.15 or later, as root"),
    }
}

fn verifier_said(io_error: &io::Error, log: &str) -> (String, &'static str) {
    let last_line =
        || log.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("(no verifier output)");
    if let Some(helper) = log.lines().find(|l| l.contains("unknown func")) {
        (
            format!("{io_error}; verifier: {}", helper.trim()),
            "this kernel lacks a BPF helper the program calls: run Linux 5.15 or later",
        )
    } else if errno(io_error) == Some(Errno::EPERM) {
        (io_error.to_string(), "grant CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN): see the capability lines")
    } else {
        (
            format!("{io_error}; verifier: {}", last_line()),
            "run Linux 5.15 or later, built with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF",
        )
    }
}

/// An error and its sources, on one line.
fn chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The errno of the first io::Error among `e` and its sources.
fn find_errno(e: &(dyn StdError + 'static)) -> Option<Errno> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return errno(io);
        }
        current = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_helper_is_named_with_the_kernel_it_needs() {
        let log = "0: (85) call bpf_get_netns_cookie#122\nunknown func bpf_get_netns_cookie#122\nprocessed 3 insns\n";
        let (detail, fix) = verifier_said(&io::Error::from_raw_os_error(libc::EINVAL), log);
        assert!(detail.ends_with("verifier: unknown func bpf_get_netns_cookie#122"), "{detail}");
        assert!(fix.contains("Linux 5.15"));
        let (detail, _) =
            verifier_said(&io::Error::from_raw_os_error(libc::EACCES), "R1 invalid mem access\n\n");
        assert!(detail.ends_with("verifier: R1 invalid mem access"), "{detail}");
        let (_, fix) = verifier_said(&io::Error::from_raw_os_error(libc::EPERM), "");
        assert!(fix.contains("CAP_BPF"));
    }

    #[test]
    fn errno_is_found_through_the_sources() {
        let e = ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_link_create",
            io_error: io::Error::from_raw_os_error(libc::EPERM),
        });
        assert_eq!(find_errno(&e), Some(Errno::EPERM));
        assert!(Step::Attach(e).finding("CgroupSockAddr").fix.unwrap().contains("CAP_NET_ADMIN"));
    }
}
