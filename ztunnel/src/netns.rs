//! Network namespaces: making sockets inside a workload's (or the node's)
//! namespace from a tunnel that runs outside it.
//!
//! A socket belongs to the namespace of the thread that created it, for life.
//! So the tunnel keeps one small thread per namespace that has entered it and
//! does nothing but create sockets; tokio then drives those sockets from any
//! worker. Listeners in a pod's namespace are Istio's in-pod model.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    thread,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("cannot start the socket thread for {path}: {source}")]
    Thread { path: PathBuf, source: io::Error },
    #[error("the socket thread for {0} is gone")]
    ThreadGone(PathBuf),
    #[error("in network namespace {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
}

type Job = Box<dyn FnOnce() + Send>;

/// Where a workload's network namespace is: a path (file mode:
/// `/var/run/netns/NAME`), or a namespace the tunnel already holds open
/// (Kubernetes: the fd the CNI plugin passed, or one opened from a process of
/// the pod), which is never resolved by path again: a pid or a path can be
/// reused by another namespace, an open fd cannot.
#[derive(Clone)]
pub enum NetnsRef {
    Path(PathBuf),
    Held(HeldNetns),
}

/// An open network namespace fd and the name it is shown by.
#[derive(Clone)]
pub struct HeldNetns {
    fd: Arc<OwnedFd>,
    name: String,
}

impl HeldNetns {
    pub fn new(fd: OwnedFd, name: impl Into<String>) -> Self {
        Self { fd: Arc::new(fd), name: name.into() }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl NetnsRef {
    /// How logs and `/config_dump` show it.
    pub fn display(&self) -> String {
        match self {
            NetnsRef::Path(p) => p.display().to_string(),
            NetnsRef::Held(h) => h.name.clone(),
        }
    }

    /// A new fd for the namespace (for attaching programs to it).
    pub fn open_fd(&self) -> io::Result<OwnedFd> {
        match self {
            NetnsRef::Path(p) => File::open(p).map(OwnedFd::from),
            NetnsRef::Held(h) => h.fd.try_clone(),
        }
    }
}

/// Paths are equal by path; held namespaces only to themselves (the same fd).
impl PartialEq for NetnsRef {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (NetnsRef::Path(a), NetnsRef::Path(b)) => a == b,
            (NetnsRef::Held(a), NetnsRef::Held(b)) => Arc::ptr_eq(&a.fd, &b.fd),
            _ => false,
        }
    }
}

impl Eq for NetnsRef {}

impl std::fmt::Debug for NetnsRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetnsRef::Path(p) => write!(f, "{}", p.display()),
            NetnsRef::Held(h) => write!(f, "{} (held)", h.name),
        }
    }
}

impl serde::Serialize for NetnsRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.display())
    }
}

/// Configuration files name namespaces by path.
impl<'de> serde::Deserialize<'de> for NetnsRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        PathBuf::deserialize(d).map(NetnsRef::Path)
    }
}

/// A network namespace the tunnel makes sockets in.
#[derive(Clone)]
pub struct Netns {
    inner: Arc<Inner>,
}

struct Inner {
    /// None: the namespace the tunnel runs in.
    path: Option<PathBuf>,
    /// Jobs for the thread that lives in the namespace.
    jobs: Option<std::sync::Mutex<mpsc::Sender<Job>>>,
    /// Sockets made ahead of need (IPv4, IPv6), so that a connection does not
    /// wait for a trip to the namespace's thread.
    spare: [std::sync::Mutex<Vec<Socket>>; 2],
    refilling: [std::sync::atomic::AtomicBool; 2],
    /// The namespace's cookie (SO_NETNS_COOKIE), once asked for.
    cookie: std::sync::OnceLock<u64>,
}

/// Sockets made per trip to the namespace's thread.
const SPARE_BATCH: usize = 16;
/// Below this many spare sockets, a refill starts in the background.
const SPARE_LOW: usize = 4;

impl Inner {
    fn new(path: Option<PathBuf>, jobs: Option<std::sync::Mutex<mpsc::Sender<Job>>>) -> Self {
        Self {
            path,
            jobs,
            spare: Default::default(),
            refilling: Default::default(),
            cookie: Default::default(),
        }
    }
}

fn new_tcp_socket(domain: Domain) -> io::Result<Socket> {
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Netns({})", self.display())
    }
}

impl Netns {
    /// The namespace the tunnel itself runs in.
    pub fn current() -> Self {
        Self { inner: Arc::new(Inner::new(None, None)) }
    }

    /// Opens the namespace at `path` (`/var/run/netns/NAME`, `/proc/PID/ns/net`)
    /// and starts its socket thread.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
        Self::enter(OwnedFd::from(file), path.to_owned())
    }

    /// Opens the namespace `netns` refers to.
    pub fn open_ref(netns: &NetnsRef) -> Result<Self, NetnsError> {
        match netns {
            NetnsRef::Path(p) => Self::open(p),
            NetnsRef::Held(h) => {
                let name = PathBuf::from(&h.name);
                let fd =
                    h.fd.try_clone().map_err(|source| NetnsError::Open { path: name.clone(), source })?;
                Self::enter(fd, name)
            }
        }
    }

    /// Starts the socket thread inside the namespace of `fd`.
    fn enter(file: OwnedFd, path: PathBuf) -> Result<Self, NetnsError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let owned = path;
        thread::Builder::new()
            .name("netns".into())
            .spawn(move || {
                let entered = setns(file.as_fd(), CloneFlags::CLONE_NEWNET);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    // Ends when every sender (every Netns clone) is dropped.
                    for job in rx {
                        job();
                    }
                }
            })
            .map_err(|source| NetnsError::Thread { path: owned.clone(), source })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                return Err(NetnsError::Enter { path: owned, source });
            }
            Err(_) => return Err(NetnsError::ThreadGone(owned)),
        }
        Ok(Self { inner: Arc::new(Inner::new(Some(owned), Some(std::sync::Mutex::new(tx)))) })
    }

    /// Opens `path`, or the current namespace when there is none.
    pub fn open_or_current(path: Option<&Path>) -> Result<Self, NetnsError> {
        path.map_or_else(|| Ok(Self::current()), Self::open)
    }

    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    pub fn display(&self) -> String {
        self.inner.path.as_ref().map_or_else(|| "(tunnel's own)".to_owned(), |p| p.display().to_string())
    }

    /// Runs `f` inside the namespace and waits for it (blocking).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T, NetnsError> {
        let Some(jobs) = &self.inner.jobs else {
            return f().map_err(|source| self.socket_err(source));
        };
        let (tx, rx) = mpsc::channel();
        self.send(
            jobs,
            Box::new(move || {
                let _ = tx.send(f());
            }),
        )?;
        rx.recv().map_err(|_| self.gone())?.map_err(|source| self.socket_err(source))
    }

    /// Runs `f` inside the namespace without blocking the async caller.
    pub async fn run_async<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T, NetnsError> {
        let Some(jobs) = &self.inner.jobs else {
            return f().map_err(|source| self.socket_err(source));
        };
        let (tx, rx) = oneshot::channel();
        self.send(
            jobs,
            Box::new(move || {
                let _ = tx.send(f());
            }),
        )?;
        rx.await.map_err(|_| self.gone())?.map_err(|source| self.socket_err(source))
    }

    fn send(&self, jobs: &std::sync::Mutex<mpsc::Sender<Job>>, job: Job) -> Result<(), NetnsError> {
        let sender = jobs.lock().map_err(|_| self.gone())?;
        sender.send(job).map_err(|_| self.gone())
    }

    fn gone(&self) -> NetnsError {
        NetnsError::ThreadGone(self.inner.path.clone().unwrap_or_default())
    }

    fn socket_err(&self, source: io::Error) -> NetnsError {
        NetnsError::Socket { path: self.inner.path.clone().unwrap_or_default(), source }
    }

    /// The namespace's cookie: what a socket made in it reports as
    /// SO_NETNS_COOKIE (how a handed-over listener is matched to its pod).
    pub fn cookie(&self) -> Result<u64, NetnsError> {
        if let Some(c) = self.inner.cookie.get() {
            return Ok(*c);
        }
        let cookie = self.run(|| {
            let probe = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            crate::sockopt::netns_cookie(&probe)
        })?;
        Ok(*self.inner.cookie.get_or_init(|| cookie))
    }

    /// A non-blocking TCP listener bound to `addr` in the namespace.
    pub fn tcp_listener(&self, addr: SocketAddr) -> Result<std::net::TcpListener, NetnsError> {
        self.run(move || {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        })
    }

    /// A fresh, unconnected, non-blocking TCP socket of `addr`'s family, made
    /// in the namespace, ready for tokio to connect.
    pub async fn tcp_socket(&self, addr: SocketAddr) -> Result<tokio::net::TcpSocket, NetnsError> {
        let socket = self.socket_for(addr).await?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }

    /// A fresh, non-blocking, no-delay TCP socket of `addr`'s family in the
    /// namespace, usually from the spare stock (socket options and bind() can
    /// then be done from any thread: only creation must happen inside).
    pub async fn socket_for(&self, addr: SocketAddr) -> Result<Socket, NetnsError> {
        let domain = Domain::for_address(addr);
        if self.inner.jobs.is_none() {
            return new_tcp_socket(domain).map_err(|source| self.socket_err(source));
        }
        let i = usize::from(addr.is_ipv6());
        let (taken, left) = {
            let mut spare = self.inner.spare[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            (spare.pop(), spare.len())
        };
        if left < SPARE_LOW {
            self.refill(i, domain);
        }
        match taken {
            Some(s) => Ok(s),
            None => self.run_async(move || new_tcp_socket(domain)).await,
        }
    }

    /// Makes a batch of spare sockets in the background (one at a time per family).
    fn refill(&self, i: usize, domain: Domain) {
        use std::sync::atomic::Ordering;
        if self.inner.refilling[i].swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let made =
                this.run_async(move || (0..SPARE_BATCH).map(|_| new_tcp_socket(domain)).collect()).await;
            match made {
                Ok(sockets) => {
                    let mut spare =
                        this.inner.spare[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    spare.extend::<Vec<Socket>>(sockets);
                }
                Err(e) => tracing::debug!("making spare sockets in {}: {e}", this.display()),
            }
            this.inner.refilling[i].store(false, Ordering::Release);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_namespace_needs_no_thread() {
        let ns = Netns::current();
        let l = ns.tcp_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(l.local_addr().unwrap().port() > 0);
    }

    #[test]
    fn a_missing_namespace_is_a_clear_error() {
        let err = Netns::open(Path::new("/var/run/netns/ztunnel-no-such-ns")).unwrap_err();
        assert!(err.to_string().contains("cannot open network namespace /var/run/netns/ztunnel-no-such-ns"));
    }
}
