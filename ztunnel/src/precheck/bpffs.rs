//! Whether a bpffs can be mounted: the tunnel mounts one at /sys/fs/bpf when
//! the host has none there. Tried on a fresh temporary directory, unmounted
//! and removed at once.

use nix::{
    errno::Errno,
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use super::Finding;

pub(super) fn check() -> Finding {
    let dir = match tempfile::Builder::new().prefix("ztunnel-precheck-bpffs-").tempdir() {
        Ok(d) => d,
        Err(e) => return Finding::not_checked("bpffs", format!("cannot make a temporary directory: {e}")),
    };
    let path = dir.path();
    if let Err(e) = mount(Some("bpf"), path, Some("bpf"), MsFlags::empty(), None::<&str>) {
        let fix = match e {
            Errno::EPERM => "grant CAP_SYS_ADMIN, or mount bpffs at /sys/fs/bpf before the tunnel starts",
            _ => {
                "use a kernel built with CONFIG_BPF_SYSCALL, or mount bpffs at /sys/fs/bpf before the tunnel starts"
            }
        };
        return Finding::fail("bpffs", format!("mounting a bpffs on {} failed: {e}", path.display()), fix);
    }
    let is_bpffs = statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
    let unmounted = umount2(path, MntFlags::MNT_DETACH);
    match (is_bpffs, unmounted) {
        (true, Ok(())) => Finding::pass("bpffs", "mounted one on a temporary directory and unmounted it"),
        (false, _) => Finding::fail(
            "bpffs",
            format!("mounted {}, but it is not a bpf filesystem", path.display()),
            "use a kernel built with CONFIG_BPF_SYSCALL",
        ),
        (true, Err(e)) => Finding::fail(
            "bpffs",
            format!("mounted a bpffs on {}, but unmounting it failed: {e}", path.display()),
            format!("unmount it by hand (`umount {}`)", path.display()),
        ),
    }
}
