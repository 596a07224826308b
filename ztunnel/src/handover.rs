//! Upgrade without resets: a new tunnel takes the running one's listening
//! sockets instead of binding its own.
//!
//! The running tunnel (the predecessor) listens on `<run_dir>/handover.sock`.
//! A new `ztunnel run` on the same node (the successor) connects to it first:
//!
//! 1. successor → predecessor: hello (its pid);
//! 2. predecessor: stops changing enrollment (no listener may appear or go
//!    while the set is handed over), then sends its pid and every listening
//!    socket, node and in-pod, over the unix socket (SCM_RIGHTS). Both
//!    processes now accept from the same sockets: the kernel's accept queue is
//!    the socket's, so a connection waits in it for whichever calls accept();
//! 3. the successor starts with those sockets (a socket is matched to the
//!    listener it would have bound by its namespace's cookie and its local
//!    address), enrolls, fetches certificates, and once it is ready says
//!    "taken";
//! 4. the predecessor stops accepting, tells peers to open new HBONE
//!    connections (GOAWAY), keeps relaying what it carries until it ends or
//!    the drain deadline passes, and exits.
//!
//! The sockets never close, so a connection is never refused and the capture
//! programs (pinned, shared) never lose their target. A successor that dies
//! before "taken" leaves the predecessor serving as before.

use std::{
    collections::HashMap,
    io::{self, IoSlice, IoSliceMut, Read as _, Write as _},
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use crate::{netns::Netns, sockopt, unix_socket};

/// Protocol version: both sides must speak the same.
const VERSION: u32 = 1;
/// File descriptors per message (the kernel's limit is 253).
const FDS_PER_MESSAGE: usize = 64;
/// Longest framed message accepted.
const MAX_MESSAGE: u32 = 4096;
/// How long one side waits for the other's next message during the exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most listening sockets a predecessor may hand over (six per pod).
const MAX_LISTENERS: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("handover with the running tunnel: {0}")]
    Io(#[from] io::Error),
    #[error("handover with the running tunnel: {0}")]
    Protocol(String),
    #[error("handover: {0}")]
    Sys(#[from] nix::Error),
    #[error("{0}")]
    Bind(#[from] crate::netns::NetnsError),
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    version: u32,
    pid: u32,
    /// The node the successor serves: only the same node's tunnel may take
    /// over (two tunnels sharing a run directory by mistake must not).
    node: String,
    /// The successor's tunnel cgroup (whether the predecessor's delivery
    /// link is its own or the successor's).
    tunnel_cgroup: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    version: u32,
    pid: u32,
    listeners: usize,
    /// Why the running tunnel will not hand over (then no socket follows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refused: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Taken {
    taken: bool,
}

/// Where a node's tunnel listens for its successor.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("handover.sock")
}

// ---- successor ----

/// The listening sockets a predecessor handed over, by where they listen.
#[derive(Default)]
pub struct HandedListeners {
    by_place: HashMap<(u64, SocketAddr), std::net::TcpListener>,
}

impl std::fmt::Debug for HandedListeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HandedListeners({})", self.by_place.len())
    }
}

impl HandedListeners {
    fn from_fds(fds: Vec<OwnedFd>) -> Self {
        let mut by_place = HashMap::new();
        for fd in fds {
            // Only a listening TCP socket is of use (a successor must not
            // spin on accept() errors of anything else it was sent).
            let kind = socket2::SockRef::from(&fd);
            match (kind.r#type(), kind.is_listener()) {
                (Ok(socket2::Type::STREAM), Ok(true)) => {}
                _ => {
                    tracing::warn!("a handed-over socket is not a TCP listener: closed");
                    continue;
                }
            }
            let listener = std::net::TcpListener::from(fd);
            let place = sockopt::netns_cookie(&listener).and_then(|c| Ok((c, listener.local_addr()?)));
            match place {
                Ok(place) => {
                    by_place.insert(place, listener);
                }
                Err(e) => tracing::warn!("a handed-over socket is not a TCP listener ({e}): closed"),
            }
        }
        Self { by_place }
    }

    /// The handed-over listener at `addr` in `netns`, if there is one.
    pub fn take(&mut self, netns: &Netns, addr: SocketAddr) -> Option<std::net::TcpListener> {
        if self.by_place.is_empty() {
            return None;
        }
        let cookie = match netns.cookie() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("namespace {}: no cookie ({e}): binding afresh", netns.display());
                return None;
            }
        };
        let listener = self.by_place.remove(&(cookie, addr))?;
        match listener.set_nonblocking(true) {
            Ok(()) => Some(listener),
            Err(e) => {
                tracing::warn!("handed-over listener {addr}: {e}: binding afresh");
                None
            }
        }
    }

    /// The listener at `addr` in `netns`: the handed-over one if there is
    /// one, else a new one; a copy goes to `copies` (what a later successor
    /// is handed).
    pub fn take_or_bind(
        &mut self,
        netns: &Netns,
        addr: SocketAddr,
        copies: &mut Vec<OwnedFd>,
    ) -> Result<tokio::net::TcpListener, HandoverError> {
        let listener = match self.take(netns, addr) {
            Some(l) => l,
            None => netns.tcp_listener(addr)?,
        };
        copies.push(listener.as_fd().try_clone_to_owned()?);
        Ok(tokio::net::TcpListener::from_std(listener)?)
    }

    pub fn len(&self) -> usize {
        self.by_place.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_place.is_empty()
    }
}

/// The running tunnel this one is taking over from, until it is told the
/// successor is ready.
pub struct Predecessor {
    stream: UnixStream,
    pub pid: u32,
}

impl Predecessor {
    /// Connects to a running tunnel at `path` and takes its listeners. None:
    /// no tunnel runs there (no socket, or a stale one nobody listens on).
    pub fn connect(
        path: &Path,
        node: &str,
        tunnel_cgroup: u64,
    ) -> Result<Option<(Self, HandedListeners)>, HandoverError> {
        let mut stream = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                return Ok(None);
            }
            Err(source) => return Err(HandoverError::Socket { path: path.to_owned(), source }),
        };
        // Sockets are taken only from root or this process's own user.
        let creds = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)?;
        if !trusted(creds.uid()) {
            return Err(HandoverError::Protocol(format!(
                "{} is served by uid {}, neither root nor this process's user",
                path.display(),
                creds.uid()
            )));
        }
        stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
        stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
        let hello = Hello { version: VERSION, pid: std::process::id(), node: node.to_owned(), tunnel_cgroup };
        write_message(&mut stream, &hello)?;
        let offer: Offer = read_message(&mut stream)?;
        if let Some(why) = offer.refused {
            return Err(HandoverError::Protocol(format!(
                "the running tunnel (pid {}) refused: {why}",
                offer.pid
            )));
        }
        if offer.version != VERSION {
            return Err(HandoverError::Protocol(format!(
                "the running tunnel (pid {}) speaks handover version {}, this one {VERSION}",
                offer.pid, offer.version
            )));
        }
        if offer.listeners > MAX_LISTENERS {
            return Err(HandoverError::Protocol(format!("{} listeners offered", offer.listeners)));
        }
        let fds = receive_fds(&stream, offer.listeners)?;
        Ok(Some((Self { stream, pid: offer.pid }, HandedListeners::from_fds(fds))))
    }

    /// Tells the predecessor this tunnel serves now: it stops accepting and
    /// drains.
    pub fn taken(mut self) -> Result<u32, HandoverError> {
        write_message(&mut self.stream, &Taken { taken: true })?;
        Ok(self.pid)
    }
}

fn receive_fds(stream: &UnixStream, count: usize) -> Result<Vec<OwnedFd>, HandoverError> {
    let mut fds = Vec::with_capacity(count);
    while fds.len() < count {
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut got = 0;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                got += raw.len();
                // SAFETY: SCM_RIGHTS gave this process these descriptors;
                // nothing else owns them.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        if msg.bytes == 0 {
            return Err(HandoverError::Protocol(format!(
                "the running tunnel closed the handover after {} of {count} sockets",
                fds.len()
            )));
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(HandoverError::Protocol("sockets were lost in transit (MSG_CTRUNC)".into()));
        }
        if got == 0 {
            return Err(HandoverError::Protocol("a handover message carried no socket".into()));
        }
    }
    if fds.len() > count {
        return Err(HandoverError::Protocol(format!("{} sockets sent, {count} announced", fds.len())));
    }
    Ok(fds)
}

// ---- predecessor ----

/// The running tunnel's side: waits for a successor.
pub struct HandoverListener {
    listener: tokio::net::UnixListener,
    file: unix_socket::SocketFile,
}

/// A successor that connected and said hello.
pub struct Successor {
    stream: UnixStream,
    pub pid: u32,
    /// The node it serves.
    pub node: String,
    /// Its tunnel cgroup.
    pub tunnel_cgroup: u64,
}

impl HandoverListener {
    /// Listens at `path` (0600), replacing a stale socket file.
    pub fn bind(path: &Path) -> Result<Self, HandoverError> {
        let (listener, file) = unix_socket::bind(path)
            .map_err(|source| HandoverError::Socket { path: path.to_owned(), source })?;
        Ok(Self { listener, file })
    }

    /// The next successor: a process of root or of this tunnel's own user
    /// (anyone else is turned away) that said hello.
    pub async fn accept(&self) -> Result<Successor, HandoverError> {
        loop {
            let (stream, _) = self.listener.accept().await?;
            let creds = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)?;
            if !trusted(creds.uid()) {
                tracing::warn!(
                    uid = creds.uid(),
                    pid = creds.pid(),
                    "handover refused: not root nor this tunnel's user"
                );
                continue;
            }
            let mut stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
            stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
            let hello: Hello = match tokio::task::block_in_place(|| read_message(&mut stream)) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!("handover: a successor did not say hello: {e}");
                    continue;
                }
            };
            let successor =
                Successor { stream, pid: hello.pid, node: hello.node, tunnel_cgroup: hello.tunnel_cgroup };
            if hello.version != VERSION {
                let why = format!("it speaks handover version {}, this tunnel {VERSION}", hello.version);
                tracing::warn!(successor = successor.pid, "handover refused: {why}");
                if let Err(e) = tokio::task::block_in_place(|| successor.refuse(&why)) {
                    tracing::warn!("handover: {e}");
                }
                continue;
            }
            return Ok(successor);
        }
    }

    /// Removes the socket file if it is still this process's (a successor
    /// has bound its own in its place otherwise).
    pub fn remove(&self) {
        self.file.remove();
    }
}

impl Successor {
    /// Sends the listening sockets (blocking, bounded by the exchange
    /// timeout).
    pub fn offer(&mut self, listeners: &[BorrowedFd<'_>]) -> Result<(), HandoverError> {
        let offer =
            Offer { version: VERSION, pid: std::process::id(), listeners: listeners.len(), refused: None };
        write_message(&mut self.stream, &offer)?;
        let raw: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
        for chunk in raw.chunks(FDS_PER_MESSAGE) {
            let cmsg = [ControlMessage::ScmRights(chunk)];
            sendmsg::<()>(self.stream.as_raw_fd(), &[IoSlice::new(b"F")], &cmsg, MsgFlags::empty(), None)?;
        }
        Ok(())
    }

    /// Tells the successor why it may not take over.
    pub fn refuse(mut self, why: &str) -> Result<(), HandoverError> {
        let offer =
            Offer { version: VERSION, pid: std::process::id(), listeners: 0, refused: Some(why.to_owned()) };
        write_message(&mut self.stream, &offer)
    }

    /// Waits (async) for the successor to say it has taken over. An error:
    /// it went away or said something else, and this tunnel carries on.
    pub async fn wait_taken(self, limit: Duration) -> Result<(), HandoverError> {
        let stream = self.stream;
        stream.set_read_timeout(Some(limit))?;
        let taken: Taken = tokio::task::spawn_blocking(move || {
            let mut stream = stream;
            read_message(&mut stream)
        })
        .await
        .map_err(|e| HandoverError::Protocol(format!("waiting for the successor: {e}")))??;
        if taken.taken { Ok(()) } else { Err(HandoverError::Protocol("the successor declined".into())) }
    }
}

/// Root, or the user this process runs as.
fn trusted(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Whether process `pid` still runs.
pub fn is_running(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

// ---- framing: a 4-byte length, then JSON (never a buffered reader: bytes
// that carry descriptors must be read by recvmsg) ----

fn write_message<T: Serialize>(stream: &mut UnixStream, message: &T) -> Result<(), HandoverError> {
    let body = serde_json::to_vec(message).map_err(|e| HandoverError::Protocol(e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(|_| HandoverError::Protocol("message too long".into()))?;
    stream.write_all(&len.to_be_bytes())?;
    stream.write_all(&body)?;
    Ok(())
}

fn read_message<T: for<'de> Deserialize<'de>>(stream: &mut UnixStream) -> Result<T, HandoverError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_MESSAGE {
        return Err(HandoverError::Protocol(format!("a {len}-byte message")));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(|e| HandoverError::Protocol(format!("unreadable message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ends of the protocol over a real unix socket: every listener
    /// arrives (more than one message's worth), matched to its place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listeners_cross_with_their_places() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let server = HandoverListener::bind(&path).unwrap();
        let listeners: Vec<std::net::TcpListener> =
            (0..FDS_PER_MESSAGE + 3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let client = tokio::task::spawn_blocking(move || Predecessor::connect(&path, "n1", 1));
        let mut successor = server.accept().await.unwrap();
        assert_eq!(successor.pid, std::process::id());
        let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(AsFd::as_fd).collect();
        tokio::task::block_in_place(|| successor.offer(&fds)).unwrap();
        let (predecessor, mut handed) = client.await.unwrap().unwrap().unwrap();
        assert_eq!(handed.len(), addrs.len());
        let here = Netns::current();
        for addr in &addrs {
            let l = handed.take(&here, *addr).expect("handed over");
            // The same socket: a connection to it is accepted through the copy.
            let _c = std::net::TcpStream::connect(addr).unwrap();
            l.set_nonblocking(false).unwrap();
            l.accept().unwrap();
        }
        let waiting = tokio::spawn(successor.wait_taken(Duration::from_secs(5)));
        tokio::task::block_in_place(|| predecessor.taken()).unwrap();
        waiting.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_successor_that_leaves_is_an_error_for_the_predecessor() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let server = HandoverListener::bind(&path).unwrap();
        let client = tokio::task::spawn_blocking(move || Predecessor::connect(&path, "n1", 1));
        let mut successor = server.accept().await.unwrap();
        tokio::task::block_in_place(|| successor.offer(&[])).unwrap();
        let (predecessor, handed) = client.await.unwrap().unwrap().unwrap();
        assert!(handed.is_empty());
        drop(predecessor);
        assert!(successor.wait_taken(Duration::from_secs(5)).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_nodes_tunnel_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let server = HandoverListener::bind(&path).unwrap();
        let client = tokio::task::spawn_blocking(move || Predecessor::connect(&path, "n2", 1));
        let successor = server.accept().await.unwrap();
        assert_eq!(successor.node, "n2");
        tokio::task::block_in_place(|| successor.refuse("this tunnel serves node n1")).unwrap();
        let e = client.await.unwrap().err().expect("refused").to_string();
        assert!(e.contains("serves node n1"), "{e}");
    }

    #[test]
    fn no_running_tunnel_is_no_predecessor() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        assert!(Predecessor::connect(&path, "n1", 1).unwrap().is_none());
        // A stale socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(Predecessor::connect(&path, "n1", 1).unwrap().is_none());
    }
}
