//! Putting a new program into a link an earlier tunnel pinned, in one step
//! (`BPF_LINK_UPDATE`).
//!
//! Attaching a second link and then unpinning the first runs both programs
//! for a moment, and they are not idempotent: a connect() the first one sent
//! to the tunnel's loopback port is seen by the second as a workload calling
//! the tunnel's own port and refused (EPERM), and a socket created then is
//! counted twice against its workload's quota but given back once. Swapping
//! the program inside the pinned link leaves no such moment.
//!
//! aya has no public call for this on cgroup and netns links, so the three
//! bpf(2) commands are made here.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// What a pinned link must be attached to for its program to be swapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkTarget {
    /// A cgroup, by its v2 id.
    Cgroup(u64),
    /// A network namespace, by its inode number.
    Netns(u64),
}

/// Why a pinned link was not swapped; the caller attaches a new link instead.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("no link is pinned there")]
    NotPinned,
    #[error("the pinned link is attached to {found:?}, not {wanted:?}")]
    OtherTarget { found: Option<LinkTarget>, wanted: LinkTarget },
    #[error("{call}: {source}")]
    Syscall { call: &'static str, source: io::Error },
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_NETNS: u32 = 5;

/// Replaces the program of the link pinned at `pin` by `program`, if that
/// link is attached to `target`. The link stays pinned and attached
/// throughout; the kernel checks that the program's type and attach type
/// are the link's.
pub fn swap_program(pin: &Path, target: LinkTarget, program: BorrowedFd<'_>) -> Result<(), SwapError> {
    let link = open_link(pin)?;
    let found = link_target(link.as_fd())
        .map_err(|source| SwapError::Syscall { call: "BPF_OBJ_GET_INFO_BY_FD", source })?;
    if found != Some(target) {
        return Err(SwapError::OtherTarget { found, wanted: target });
    }
    update(link.as_fd(), program)
}

/// Puts `program` into the link pinned at `pin`, whatever it is attached to:
/// for links this tunnel pinned that another process's program now runs in.
pub fn put_back(pin: &Path, program: BorrowedFd<'_>) -> Result<(), SwapError> {
    update(open_link(pin)?.as_fd(), program)
}

fn open_link(pin: &Path) -> Result<OwnedFd, SwapError> {
    open_pinned(pin).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => SwapError::NotPinned,
        _ => SwapError::Syscall { call: "BPF_OBJ_GET", source },
    })
}

fn update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> Result<(), SwapError> {
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for this command
    // and outlives the call; the kernel zero-fills the rest.
    bpf(BPF_LINK_UPDATE, &attr).map_err(|source| SwapError::Syscall { call: "BPF_LINK_UPDATE", source })?;
    Ok(())
}

fn open_pinned(pin: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = ObjGetAttr { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for BPF_OBJ_GET and
    // `path` outlives the call.
    let fd = bpf(BPF_OBJ_GET, &attr)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What a link is attached to, for the link types this tunnel pins (None
/// for any other).
fn link_target(link: BorrowedFd<'_>) -> io::Result<Option<LinkTarget>> {
    // `struct bpf_link_info`: type, id, prog_id, then a union aligned to 8
    // bytes whose cgroup member starts with the u64 cgroup id and whose netns
    // member starts with the u32 inode. The kernel fills no more than asked.
    let mut info = [0u8; 32];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for this command;
    // `info` is writable for `info_len` bytes and outlives the call.
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    let u32_at = |at: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&info[at..at + 4]);
        u32::from_ne_bytes(b)
    };
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&info[at..at + 8]);
        u64::from_ne_bytes(b)
    };
    Ok(match u32_at(0) {
        BPF_LINK_TYPE_CGROUP => Some(LinkTarget::Cgroup(u64_at(16))),
        BPF_LINK_TYPE_NETNS => Some(LinkTarget::Netns(u64::from(u32_at(16)))),
        _ => None,
    })
}

/// bpf(2) with `attr` as the (prefix of the) attribute union.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<i32> {
    // SAFETY: the callers pass a `repr(C)` prefix of `union bpf_attr` for
    // `cmd`, and its size; the kernel reads no more than that.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>() as u32) };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret as i32) }
}
