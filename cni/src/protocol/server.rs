//! The tunnel's half, for tokio: read one request (and its fd), answer once.
//!
//! A tunnel's accept loop looks like this:
//!
//! ```no_run
//! # use std::time::Duration;
//! # use ztunnel_cni::protocol::{Response, Outcome, server::serve_connection, DEFAULT_MAX_REQUEST_LEN};
//! # async fn accept_loop(listener: tokio::net::UnixListener) -> std::io::Result<()> {
//! loop {
//!     let (stream, _) = listener.accept().await?;
//!     tokio::spawn(async move {
//!         let served = serve_connection(stream, DEFAULT_MAX_REQUEST_LEN, Duration::from_secs(5),
//!             |req, netns| async move {
//!                 // enroll req.pod_namespace/req.pod_name in the namespace `netns`...
//!                 Response::new(Outcome::Enrolled, "")
//!             }).await;
//!         if let Err(e) = served { tracing::warn!("cni request: {e}") }
//!     });
//! }
//! # }
//! ```

use std::{
    future::Future,
    io::{self, IoSliceMut},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::{
        socket::{ControlMessageOwned, MsgFlags, recvmsg},
        statfs::{NSFS_MAGIC, fstatfs},
    },
};
use tokio::{io::Interest, net::UnixStream};

use super::{PROTOCOL_VERSION, ProtocolError, Request, Response, encode_line, find_line_end};

/// The most fds the kernel passes in one message (`SCM_MAX_FD`). Room for
/// all of them means the kernel never truncates the control data, so every fd
/// a peer sends arrives here and is closed by us, rather than some being
/// installed in our table where a truncated buffer would hide them.
const SCM_MAX_FD: usize = 253;

/// Reads one request line, with the fd that came with it.
///
/// Checks what the protocol promises: at most one fd, and exactly one for
/// `add`/`check` (a network namespace), none for `del`; a known version; a
/// line of at most `max_len` bytes, newline included. Any fd beyond the one
/// returned is closed before this returns, also on error. Bytes after the
/// newline are ignored (one request per connection).
///
/// It waits as long as the peer sends nothing: the caller bounds it (see
/// [`serve_connection`]).
pub async fn read_request(
    stream: &UnixStream,
    max_len: usize,
) -> Result<(Request, Option<OwnedFd>), ProtocolError> {
    let mut line = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let end = loop {
        if let Some(end) = find_line_end(&line, max_len)? {
            break end;
        }
        // Never hold more than `max_len` bytes of a peer's line.
        let want = chunk.len().min(max_len - line.len());
        let received = stream
            .async_io(Interest::READABLE, || receive_chunk(stream.as_raw_fd(), &mut chunk[..want]))
            .await
            .map_err(ProtocolError::Receive)?;
        fds.extend(received.fds);
        if received.control_truncated {
            return Err(ProtocolError::ControlTruncated);
        }
        if received.bytes == 0 {
            return Err(ProtocolError::Closed { received: line.len() });
        }
        line.extend_from_slice(&chunk[..received.bytes]);
    };
    if fds.len() > 1 {
        return Err(ProtocolError::TooManyFds(fds.len()));
    }
    let req: Request = serde_json::from_slice(&line[..end]).map_err(ProtocolError::Malformed)?;
    if req.version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion(req.version));
    }
    let fd = fds.pop();
    match (req.command.carries_netns(), fd) {
        (true, Some(fd)) => {
            check_is_netns(&fd)?;
            Ok((req, Some(fd)))
        }
        (true, None) => Err(ProtocolError::MissingNetns(req.command)),
        (false, Some(_)) => Err(ProtocolError::UnexpectedFd(req.command)),
        (false, None) => Ok((req, None)),
    }
}

/// Writes the one response line.
pub async fn write_response(stream: &UnixStream, resp: &Response) -> Result<(), ProtocolError> {
    let line = encode_line(resp)?;
    let mut written = 0;
    while written < line.len() {
        stream.writable().await.map_err(ProtocolError::Send)?;
        match stream.try_write(&line[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(ProtocolError::Send(e)),
        }
    }
    Ok(())
}

/// The whole server side of one connection: waits at most `read_timeout` for
/// the request, hands it to `handle`, writes its answer and closes. A request
/// that breaks the protocol is answered with an `error` response saying why
/// (best effort: the peer may be gone) and the error is returned for the
/// caller to log.
pub async fn serve_connection<F, Fut>(
    stream: UnixStream,
    max_len: usize,
    read_timeout: Duration,
    handle: F,
) -> Result<(), ProtocolError>
where
    F: FnOnce(Request, Option<OwnedFd>) -> Fut,
    Fut: Future<Output = Response>,
{
    let read = match tokio::time::timeout(read_timeout, read_request(&stream, max_len)).await {
        Ok(read) => read,
        Err(_) => Err(ProtocolError::Timeout(read_timeout)),
    };
    match read {
        Ok((req, fd)) => {
            let resp = handle(req, fd).await;
            write_response(&stream, &resp).await
        }
        Err(e) => {
            let _ = write_response(&stream, &Response::error(e.to_string())).await;
            Err(e)
        }
    }
}

struct Chunk {
    bytes: usize,
    fds: Vec<OwnedFd>,
    control_truncated: bool,
}

fn receive_chunk(fd: RawFd, buf: &mut [u8]) -> io::Result<Chunk> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut control = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut control), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let control_truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    let mut fds = Vec::new();
    // nix refuses to walk truncated control data (ENOBUFS); with room for
    // SCM_MAX_FD fds that does not happen for SCM_RIGHTS.
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel has just installed these fds in our table
                // for this message; nothing else knows them, so we own them.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
    }
    Ok(Chunk { bytes: msg.bytes, fds, control_truncated })
}

/// `NS_GET_NSTYPE` (Linux 4.11): which kind of namespace an nsfs fd is.
mod ns_ioctl {
    const NSIO: u8 = 0xb7;
    const NS_GET_NSTYPE: u8 = 0x3;
    nix::ioctl_none!(get_nstype, NSIO, NS_GET_NSTYPE);
}

/// The fd must be a network namespace: the tunnel is about to enter it.
fn check_is_netns(fd: &OwnedFd) -> Result<(), ProtocolError> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd, which
    // stays open for the call.
    match unsafe { ns_ioctl::get_nstype(fd.as_raw_fd()) } {
        Ok(nstype) if nstype == nix::libc::CLONE_NEWNET => Ok(()),
        Ok(nstype) => Err(ProtocolError::NotANetns(format!("a namespace of type {nstype:#x}"))),
        // ENOTTY: not an nsfs file, or a kernel without the ioctl; then at
        // least the file system must be nsfs.
        Err(Errno::ENOTTY | Errno::EINVAL) => match fstatfs(fd) {
            Ok(fs) if fs.filesystem_type() == NSFS_MAGIC => Ok(()),
            Ok(fs) => {
                Err(ProtocolError::NotANetns(format!("a file on file system {:#x}", fs.filesystem_type().0)))
            }
            Err(e) => Err(ProtocolError::NotANetns(format!("fstatfs: {e}"))),
        },
        Err(e) => Err(ProtocolError::NotANetns(format!("NS_GET_NSTYPE: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File,
        io::{IoSlice, Read as _, Write as _},
        os::{fd::AsFd as _, unix::net::UnixStream as StdUnixStream},
    };

    use nix::sys::socket::{ControlMessage, sendmsg};

    use super::*;
    use crate::protocol::{Command, DEFAULT_MAX_REQUEST_LEN, Outcome};

    fn pair() -> (StdUnixStream, UnixStream) {
        let (client, server) = StdUnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, UnixStream::from_std(server).unwrap())
    }

    fn line(command: &str, version: u32) -> Vec<u8> {
        format!(
            r#"{{"version":{version},"command":"{command}","container_id":"c","pod_namespace":"ns","pod_name":"p","pod_uid":"u","netns_path":"","interface":"eth0","ips":[]}}"#
        )
        .into_bytes()
        .into_iter()
        .chain([b'\n'])
        .collect()
    }

    fn send_with_fds(stream: &StdUnixStream, bytes: &[u8], fds: &[RawFd]) {
        let cmsgs = [ControlMessage::ScmRights(fds)];
        let cmsgs = if fds.is_empty() { &cmsgs[..0] } else { &cmsgs[..] };
        let n = sendmsg::<()>(stream.as_raw_fd(), &[IoSlice::new(bytes)], cmsgs, MsgFlags::empty(), None)
            .unwrap();
        assert_eq!(n, bytes.len());
    }

    async fn never(_: Request, _: Option<OwnedFd>) -> Response {
        unreachable!("a request that breaks the protocol never reaches the handler")
    }

    #[tokio::test]
    async fn an_oversize_line_is_refused_at_the_bound() {
        let (client, server) = pair();
        // Far more than the bound, and no newline at all.
        (&client).write_all(&[b'a'; 1000]).unwrap();
        let err = read_request(&server, 128).await.unwrap_err();
        assert!(matches!(err, ProtocolError::LineTooLong { max: 128 }), "{err}");

        // A complete request just over the bound is refused too.
        let (client, server) = pair();
        let req = line("del", 1);
        (&client).write_all(&req).unwrap();
        let err = read_request(&server, req.len() - 1).await.unwrap_err();
        assert!(matches!(err, ProtocolError::LineTooLong { .. }), "{err}");
        // ... and accepted at exactly the bound.
        let (client, server) = pair();
        (&client).write_all(&req).unwrap();
        read_request(&server, req.len()).await.unwrap();
    }

    #[tokio::test]
    async fn add_without_an_fd_is_refused() {
        let (client, server) = pair();
        send_with_fds(&client, &line("add", 1), &[]);
        let err = read_request(&server, DEFAULT_MAX_REQUEST_LEN).await.unwrap_err();
        assert!(matches!(err, ProtocolError::MissingNetns(Command::Add)), "{err}");
    }

    #[tokio::test]
    async fn del_needs_no_fd_and_refuses_one() {
        let (client, server) = pair();
        send_with_fds(&client, &line("del", 1), &[]);
        let (req, fd) = read_request(&server, DEFAULT_MAX_REQUEST_LEN).await.unwrap();
        assert_eq!((req.command, fd.is_none()), (Command::Del, true));

        let (client, server) = pair();
        let netns = File::open("/proc/self/ns/net").unwrap();
        send_with_fds(&client, &line("del", 1), &[netns.as_raw_fd()]);
        let err = read_request(&server, DEFAULT_MAX_REQUEST_LEN).await.unwrap_err();
        assert!(matches!(err, ProtocolError::UnexpectedFd(Command::Del)), "{err}");
    }

    /// Two fds: refused, and both closed on our side. One of them is the
    /// write end of a pipe whose other copy the sender closes, so the read
    /// end sees end-of-file exactly when the tunnel has closed its copy.
    #[tokio::test]
    async fn two_fds_are_refused_and_closed() {
        let (client, server) = pair();
        let netns = File::open("/proc/self/ns/net").unwrap();
        let (pipe_read, pipe_write) = nix::unistd::pipe().unwrap();
        send_with_fds(&client, &line("add", 1), &[netns.as_raw_fd(), pipe_write.as_raw_fd()]);
        drop(pipe_write);
        let mut pipe_read = File::from(pipe_read);

        let err = read_request(&server, DEFAULT_MAX_REQUEST_LEN).await.unwrap_err();
        assert!(matches!(err, ProtocolError::TooManyFds(2)), "{err}");
        // Blocking read: returns 0 only once every write end is closed.
        let mut buf = [0u8; 1];
        assert_eq!(pipe_read.read(&mut buf).unwrap(), 0);
    }

    #[tokio::test]
    async fn an_fd_that_is_not_a_netns_is_refused() {
        let (client, server) = pair();
        let (pipe_read, _pipe_write) = nix::unistd::pipe().unwrap();
        send_with_fds(&client, &line("add", 1), &[pipe_read.as_raw_fd()]);
        let err = read_request(&server, DEFAULT_MAX_REQUEST_LEN).await.unwrap_err();
        assert!(matches!(err, ProtocolError::NotANetns(_)), "{err}");

        // Another kind of namespace is not a network namespace either.
        let (client, server) = pair();
        let mnt = File::open("/proc/self/ns/mnt").unwrap();
        send_with_fds(&client, &line("check", 1), &[mnt.as_fd().as_raw_fd()]);
        let err = read_request(&server, DEFAULT_MAX_REQUEST_LEN).await.unwrap_err();
        assert!(matches!(err, ProtocolError::NotANetns(_)), "{err}");
    }

    #[tokio::test]
    async fn an_unknown_version_is_refused() {
        let (client, server) = pair();
        send_with_fds(&client, &line("del", 2), &[]);
        let err = read_request(&server, DEFAULT_MAX_REQUEST_LEN).await.unwrap_err();
        assert!(matches!(err, ProtocolError::UnsupportedVersion(2)), "{err}");
    }

    #[tokio::test]
    async fn a_peer_that_hangs_up_mid_line_is_closed() {
        let (client, server) = pair();
        (&client).write_all(br#"{"version":1,"#).unwrap();
        drop(client);
        let err = read_request(&server, DEFAULT_MAX_REQUEST_LEN).await.unwrap_err();
        assert!(matches!(err, ProtocolError::Closed { received: 13 }), "{err}");
    }

    /// The request arrives in pieces, the fd with the first; the line is
    /// assembled and the fd kept.
    #[tokio::test]
    async fn a_request_in_pieces_is_assembled() {
        let (client, server) = pair();
        let netns = File::open("/proc/self/ns/net").unwrap();
        let req = line("check", 1);
        let (first, rest) = req.split_at(10);
        send_with_fds(&client, first, &[netns.as_raw_fd()]);
        let reader = tokio::spawn(async move { read_request(&server, DEFAULT_MAX_REQUEST_LEN).await });
        (&client).write_all(rest).unwrap();
        let (req, fd) = reader.await.unwrap().unwrap();
        assert_eq!(req.command, Command::Check);
        assert!(fd.is_some());
    }

    #[tokio::test]
    async fn serve_connection_answers_a_broken_request_with_an_error() {
        let (client, server) = pair();
        send_with_fds(&client, b"not json\n", &[]);
        let served = serve_connection(server, DEFAULT_MAX_REQUEST_LEN, Duration::from_secs(30), never).await;
        assert!(matches!(served, Err(ProtocolError::Malformed(_))));
        let mut answer = String::new();
        (&client).read_to_string(&mut answer).unwrap();
        let resp: Response = serde_json::from_str(answer.trim_end()).unwrap();
        assert_eq!(resp.result, Outcome::Error);
        assert!(resp.message.contains("malformed"), "{}", resp.message);
    }

    /// A peer that connects and sends nothing is cut off by the read timeout.
    #[tokio::test]
    async fn serve_connection_times_out_a_silent_peer() {
        let (client, server) = pair();
        let served =
            serve_connection(server, DEFAULT_MAX_REQUEST_LEN, Duration::from_millis(100), never).await;
        assert!(matches!(served, Err(ProtocolError::Timeout(_))));
        let mut answer = String::new();
        (&client).read_to_string(&mut answer).unwrap();
        assert!(answer.contains(r#""result":"error""#), "{answer}");
    }
}
