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

/// Raises the open-file limit to the hard limit (every proxied connection
/// holds two sockets) and returns (before, after).
pub fn raise_nofile_limit() -> (u64, u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => (soft, hard),
            Err(_) => (soft, soft),
        },
        Ok((soft, _)) => (soft, soft),
        Err(_) => (0, 0),
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

/// What the tunnel does to every TCP socket it owns.
#[derive(Debug, Clone, Copy)]
pub struct SocketPolicy {
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_probes: u32,
}

impl SocketPolicy {
    pub fn from_config(k: &crate::config::KeepaliveConfig) -> Self {
        Self { keepalive_idle: k.idle, keepalive_interval: k.interval, keepalive_probes: k.probes }
    }

    /// Keepalive, so a peer that vanished without FIN or RST is noticed and
    /// the socket freed; the same bound on unacknowledged data
    /// (TCP_USER_TIMEOUT); and an abortive close until the relay ends
    /// cleanly ([`graceful_close`]), so that if the tunnel dies both ends of
    /// what it carried see a reset, never a FIN that makes a truncated stream
    /// look complete.
    pub fn apply(&self, socket: &impl std::os::fd::AsFd) {
        let s = socket2::SockRef::from(socket);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(self.keepalive_idle)
            .with_interval(self.keepalive_interval)
            .with_retries(self.keepalive_probes);
        let give_up = self.keepalive_idle + self.keepalive_interval * self.keepalive_probes;
        // Failures leave the kernel's defaults: nothing worse than before.
        let _ = s.set_tcp_keepalive(&keepalive);
        let _ = s.set_tcp_user_timeout(Some(give_up));
        let _ = s.set_linger(Some(Duration::ZERO));
    }
}

impl Default for SocketPolicy {
    fn default() -> Self {
        Self::from_config(&crate::config::KeepaliveConfig::default())
    }
}

/// The relay on `socket` ended cleanly: its close is an orderly FIN again.
pub fn graceful_close(socket: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(socket).set_linger(None);
}

/// The mark a socket carries (SO_MARK); accepted sockets take their SYN's
/// mark where `tcp_fwmark_accept` is set.
pub fn mark(socket: &impl AsRawFd) -> io::Result<u32> {
    let mut mark: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: a live socket fd; the kernel writes at most `len` bytes into
    // `mark`, a u32 that outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw mut mark).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(mark)
}

/// The open-file limit after raising the soft limit to the hard one.
pub fn open_file_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_policy_takes_hold() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let p = SocketPolicy {
            keepalive_idle: Duration::from_secs(7),
            keepalive_interval: Duration::from_secs(2),
            keepalive_probes: 3,
        };
        p.apply(&c);
        let s = socket2::SockRef::from(&c);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(2));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 3);
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(13)));
        assert_eq!(s.linger().unwrap(), Some(Duration::ZERO));
        graceful_close(&c);
        assert_eq!(s.linger().unwrap(), None);
        assert_eq!(mark(&c).unwrap(), 0);
    }
}
