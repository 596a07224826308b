//! systemd's readiness protocol (sd_notify): one datagram per state change
//! to the socket named by `NOTIFY_SOCKET`, when systemd runs the tunnel as a
//! `Type=notify` unit. Elsewhere (no variable) every call is a no-op.

use std::{
    io,
    os::unix::{ffi::OsStrExt as _, net::UnixDatagram},
    path::Path,
};

/// Sends `state` (`READY=1`, `STOPPING=1`, `MAINPID=<pid>`, ...). Whether
/// there was a socket to send it to.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(false) };
    let socket = UnixDatagram::unbound()?;
    let target = target.as_encoded_bytes();
    match target.strip_prefix(b"@") {
        // An abstract socket: '@' stands for the leading NUL.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            let path = Path::new(std::ffi::OsStr::from_bytes(target));
            socket.send_to(state.as_bytes(), path)?;
        }
    }
    Ok(true)
}

/// [`notify`], logging a failure instead of returning it: systemd not
/// hearing a state change must not stop the tunnel.
pub fn tell(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!("telling systemd {state}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_reach_the_socket_named_by_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        // SAFETY (set_var): this is the only test of this binary that reads or
        // writes NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        assert!(notify("READY=1").unwrap());
        let mut buf = [0u8; 64];
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        assert!(!notify("READY=1").unwrap());
    }
}
