//! The few socket options std, tokio and socket2 do not cover.

use std::{io, os::fd::AsRawFd, time::Duration};

/// The cookie of the network namespace a socket belongs to (SO_NETNS_COOKIE,
/// Linux >= 5.14): what the capture programs key connections by.
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by the caller; the kernel writes at
    // most `len` bytes into `cookie`, a u64 that outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Makes the next close of `socket` send RST instead of FIN: how a refusal or
/// a peer's reset is passed on to a TCP client.
pub fn reset_on_close(socket: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// Raises the open-file limit to the hard limit: every proxied connection
/// holds two sockets.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// IP_BIND_ADDRESS_NO_PORT: a bind() to an address with port 0 defers the
/// port choice to connect(), which picks it by the whole 4-tuple (and may
/// reuse ports other connections hold in TIME_WAIT).
pub fn bind_address_no_port(socket: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a live socket fd; the kernel reads sizeof(int) from `on`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
