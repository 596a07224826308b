//! tb-agent: the testbed's client and server, run inside simulated workloads.
//!
//! Every command prints JSON lines on stdout so tests can assert on them.
//!
//! * `serve --listen ADDR...`: accepts; tells each client what it saw
//!   (`{"peer":..,"local":..}` line), then echoes until the client half-closes.
//!   Prints `{"event":"accepted",..}` for each connection the moment it is
//!   accepted; a `sync` line on stdin first accepts everything still waiting
//!   in the listen backlogs, then prints `{"event":"synced"}` (so a test that
//!   saw `synced` has seen every connection that reached the server before
//!   it asked).
//! * `connect --to ADDR --count N --concurrency C --bytes B`: N connections,
//!   C at a time, all held open until every one of a batch is established;
//!   each checks the echo of B bytes. Prints one summary.
//! * `probe --to ADDR [--move-to CGROUP] [--mptcp]`: one attempt; prints how it
//!   ended (ok, refused, denied, reset, timeout). `--move-to` makes the socket
//!   first, then moves this process to another cgroup before connect() (a
//!   socket used from another cgroup than the one it was made in).
//! * `flood --to ADDR --count N`: opens N connections, holds every one that
//!   succeeded until stdin closes; prints how many succeeded and how the
//!   others failed.
//! * `halfopen --to ADDR --count N --bytes B`: opens N raw connections, sends
//!   the first B bytes of a TLS ClientHello on each (0: nothing), and holds
//!   them until stdin closes.
//! * `hold --to ADDR`: one connection kept open; each stdin line is sent and
//!   its echo printed, until stdin closes.
//! * `http --listen ADDR... --name NAME`: a small HTTP/1.1 server answering
//!   every request with who it is and who called (for curl in the demo).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Serve {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// Instead of echoing, read until the client half-closes, then
        /// answer `{"received": N}` (proves half-close crossed the path).
        #[arg(long)]
        reply_after_eof: bool,
    },
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 64)]
        bytes: usize,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Send this text (repeated to --bytes) instead of a byte pattern.
        #[arg(long)]
        payload: Option<String>,
    },
    /// Streams --bytes to an echo server and checks the echo's SHA-256.
    Transfer {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
    /// Writes --bytes, half-closes, and expects a reply-after-eof server's answer.
    HalfClose {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: usize,
    },
    Probe {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 3_000)]
        timeout_ms: u64,
        #[arg(long)]
        move_to: Option<std::path::PathBuf>,
        #[arg(long)]
        mptcp: bool,
    },
    Flood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    Halfopen {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        bytes: usize,
    },
    Hold {
        #[arg(long)]
        to: SocketAddr,
    },
    Http {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        name: String,
    },
    /// One echo exchange every --interval-ms for --duration-ms (or until a
    /// `stop` line on stdin); reports every failure with when it happened.
    Steady {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long)]
        duration_ms: u64,
    },
    /// --count long-lived connections to a bare echo server, each sending a
    /// chunk every --interval-ms and checking every byte that comes back,
    /// for --duration-ms; then each closes cleanly and checks the rest.
    Streams {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 4096)]
        chunk: usize,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        #[arg(long)]
        duration_ms: u64,
    },
    /// A bare echo server for benchmarks (no hello line).
    Echo {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
    },
    /// Request/response on one connection: --size bytes out, the same back.
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 5000)]
        duration_ms: u64,
    },
    /// Connect, one request/response, close; --concurrency at a time.
    Crr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 5000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
}

fn main() -> anyhow::Result<()> {
    raise_nofile_limit();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        match cli.command {
            Cmd::Serve { listen, reply_after_eof } => serve(listen, reply_after_eof).await,
            Cmd::Connect { to, count, concurrency, bytes, timeout_ms, payload } => {
                connect(to, count, concurrency, bytes, Duration::from_millis(timeout_ms), payload).await
            }
            Cmd::Transfer { to, bytes } => transfer(to, bytes).await,
            Cmd::HalfClose { to, bytes } => half_close(to, bytes).await,
            Cmd::Probe { to, timeout_ms, move_to, mptcp } => {
                probe(to, Duration::from_millis(timeout_ms), move_to, mptcp).await
            }
            Cmd::Flood { to, count } => flood(to, count).await,
            Cmd::Halfopen { to, count, bytes } => halfopen(to, count, bytes).await,
            Cmd::Hold { to } => hold(to).await,
            Cmd::Http { listen, name } => http(listen, name).await,
            Cmd::Echo { listen } => bare_echo(listen).await,
            Cmd::Streams { to, count, chunk, interval_ms, duration_ms } => {
                streams(
                    to,
                    count,
                    chunk,
                    Duration::from_millis(interval_ms),
                    Duration::from_millis(duration_ms),
                )
                .await
            }
            Cmd::Steady { to, interval_ms, duration_ms } => {
                steady(to, Duration::from_millis(interval_ms), Duration::from_millis(duration_ms)).await
            }
            Cmd::Rr { to, size, duration_ms } => rr(to, size, Duration::from_millis(duration_ms)).await,
            Cmd::Crr { to, size, duration_ms, concurrency } => {
                crr(to, size, Duration::from_millis(duration_ms), concurrency).await
            }
        }
    })
}

fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn emit(v: Value) {
    println!("{v}");
}

async fn serve(addrs: Vec<SocketAddr>, reply_after_eof: bool) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    for a in &addrs {
        let socket =
            if a.is_ipv6() { tokio::net::TcpSocket::new_v6()? } else { tokio::net::TcpSocket::new_v4()? };
        socket.set_reuseaddr(true)?;
        socket.bind(*a).with_context(|| format!("bind {a}"))?;
        listeners.push(Arc::new(socket.listen(4096)?));
    }
    emit(json!({"event": "listening", "addrs": addrs}));
    let mut tasks = tokio::task::JoinSet::new();
    for l in &listeners {
        tasks.spawn(accept_loop(l.clone(), reply_after_eof));
    }
    let mut requests = stdin_lines();
    loop {
        tokio::select! {
            done = tasks.join_next() => match done {
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Ok(()))) | None => return Ok(()),
            },
            Some(line) = requests.recv() => {
                if line.trim() == "sync" {
                    // No await until `synced` is printed: nothing else runs
                    // on this single-threaded runtime in between.
                    for l in &listeners {
                        accept_backlog(l, reply_after_eof);
                    }
                    emit(json!({"event": "synced"}));
                }
            }
        }
    }
}

async fn accept_loop(l: Arc<TcpListener>, reply_after_eof: bool) -> anyhow::Result<()> {
    loop {
        let (s, peer) = l.accept().await?;
        accepted(s, peer.to_string(), reply_after_eof);
    }
}

/// Reports a connection at once (before anything else can run), then serves
/// it on its own task.
fn accepted(s: TcpStream, peer: String, reply_after_eof: bool) {
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    emit(json!({"event": "accepted", "peer": peer, "local": local}));
    tokio::spawn(async move {
        let _ = if reply_after_eof {
            count_then_reply(s, &peer, &local).await
        } else {
            echo(s, &peer, &local).await
        };
    });
}

/// Accepts every connection the kernel has completed on `l` but the accept
/// loop has not taken yet: accept(2) on the non-blocking listener until it
/// would block.
fn accept_backlog(l: &TcpListener, reply_after_eof: bool) {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    loop {
        // SAFETY: accept4 on a listening socket this process owns; on success
        // the new descriptor is owned by the TcpStream made from it below.
        let fd = unsafe {
            libc::accept4(
                l.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        // SAFETY: `fd` is a connected TCP socket nothing else owns.
        let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        let Ok(s) = TcpStream::from_std(std) else { continue };
        let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        accepted(s, peer, reply_after_eof);
    }
}

/// Lines read from stdin on a plain thread (a blocking read on tokio's stdin
/// would hold the runtime's shutdown until stdin closes).
fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

async fn count_then_reply(mut s: TcpStream, peer: &str, local: &str) -> std::io::Result<()> {
    let hello = format!("{}\n", json!({"peer": peer, "local": local}));
    s.write_all(hello.as_bytes()).await?;
    let mut sink = tokio::io::sink();
    let received = tokio::io::copy(&mut (&mut s).take(u64::MAX), &mut sink).await?;
    s.write_all(format!("{}\n", json!({"received": received})).as_bytes()).await?;
    s.shutdown().await
}

async fn echo(mut s: TcpStream, peer: &str, local: &str) -> std::io::Result<()> {
    let hello = format!("{}\n", json!({"peer": peer, "local": local}));
    s.write_all(hello.as_bytes()).await?;
    let (mut r, mut w) = s.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

/// How one connection attempt ended.
fn classify(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused",
        std::io::ErrorKind::PermissionDenied => "denied",
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => "reset",
        std::io::ErrorKind::UnexpectedEof => "eof",
        std::io::ErrorKind::TimedOut => "timeout",
        _ => "error",
    }
}

async fn connect(
    to: SocketAddr,
    count: usize,
    concurrency: usize,
    bytes: usize,
    timeout: Duration,
    payload: Option<String>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut results = Vec::new();
    let mut next = 0;
    while next < count {
        let batch = concurrency.min(count - next);
        // Every connection of a batch is open at the same time before any
        // of them exchanges data.
        let barrier = Arc::new(tokio::sync::Barrier::new(batch));
        let tasks: Vec<_> = (next..next + batch)
            .map(|i| {
                let barrier = barrier.clone();
                let text = payload.clone();
                tokio::spawn(async move { one_exchange(to, i, bytes, timeout, barrier, text).await })
            })
            .collect();
        for t in tasks {
            results.push(t.await.unwrap_or_else(|e| Err(("panic", e.to_string()))));
        }
        next += batch;
    }
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen = Vec::new();
    for r in &results {
        match r {
            Ok(info) => seen.push(info.clone()),
            Err((kind, msg)) => *errors.entry(format!("{kind}: {msg}")).or_default() += 1,
        }
    }
    emit(json!({
        "ok": seen.len(),
        "failed": results.len() - seen.len(),
        "errors": errors,
        "seen": seen,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }));
    Ok(())
}

type Failed = (&'static str, String);

async fn one_exchange(
    to: SocketAddr,
    index: usize,
    bytes: usize,
    timeout: Duration,
    barrier: Arc<tokio::sync::Barrier>,
    text: Option<String>,
) -> Result<Value, Failed> {
    let io = |e: std::io::Error| (classify(&e), e.to_string());
    let connected = tokio::time::timeout(timeout, TcpStream::connect(to)).await;
    let s = match connected {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(io(e)),
        Err(_) => Err(("timeout", format!("connect {to}"))),
    };
    // Wait at the barrier even after a failure so the batch cannot hang.
    let s = match s {
        Ok(s) => s,
        Err(e) => {
            barrier.wait().await;
            return Err(e);
        }
    };
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut reader = BufReader::new(s);
    let mut hello = String::new();
    let read = tokio::time::timeout(timeout, reader.read_line(&mut hello)).await;
    barrier.wait().await;
    match read {
        Ok(Ok(0)) => return Err(("eof", "closed before the server's hello".into())),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(io(e)),
        Err(_) => return Err(("timeout", "waiting for the server's hello".into())),
    }
    let mut info: Value = serde_json::from_str(&hello).map_err(|e| ("protocol", e.to_string()))?;
    info["client_local"] = json!(local);
    let payload: Vec<u8> = match &text {
        Some(t) if !t.is_empty() => t.bytes().cycle().take(bytes.max(t.len())).collect(),
        _ => (0..bytes).map(|b| ((b + index * 7) % 251) as u8).collect(),
    };
    let mut s = reader.into_inner();
    let exchange = async {
        let (mut r, mut w) = s.split();
        let write = async {
            w.write_all(&payload).await?;
            w.shutdown().await
        };
        let mut echoed = Vec::with_capacity(bytes);
        let read = r.read_to_end(&mut echoed);
        let (wr, rd) = tokio::join!(write, read);
        wr?;
        rd?;
        Ok::<_, std::io::Error>(echoed)
    };
    let echoed = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => return Err(io(e)),
        Err(_) => return Err(("timeout", "echo".into())),
    };
    if echoed != payload {
        return Err((
            "corrupt",
            format!("echo of {} bytes came back as {} different bytes", bytes, echoed.len()),
        ));
    }
    Ok(info)
}

/// A socket of `to`'s family (MPTCP when asked), made before anything else.
fn stream_socket(to: SocketAddr, mptcp: bool) -> std::io::Result<socket2::Socket> {
    let protocol = if mptcp { socket2::Protocol::MPTCP } else { socket2::Protocol::TCP };
    let s = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, Some(protocol))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

async fn connect_socket(s: socket2::Socket, to: SocketAddr) -> std::io::Result<TcpStream> {
    tokio::net::TcpSocket::from_std_stream(s.into()).connect(to).await
}

async fn probe(
    to: SocketAddr,
    timeout: Duration,
    move_to: Option<std::path::PathBuf>,
    mptcp: bool,
) -> anyhow::Result<()> {
    let socket = match stream_socket(to, mptcp) {
        Ok(s) => s,
        Err(e) => {
            emit(json!({"result": "no_socket", "error": e.to_string()}));
            return Ok(());
        }
    };
    if let Some(dir) = move_to {
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("moving into {}", dir.display()))?;
    }
    let out = match tokio::time::timeout(timeout, connect_socket(socket, to)).await {
        Err(_) => json!({"result": "timeout"}),
        Ok(Err(e)) => json!({"result": classify(&e), "error": e.to_string()}),
        Ok(Ok(s)) => {
            let mut reader = BufReader::new(s);
            let mut hello = String::new();
            match tokio::time::timeout(timeout, reader.read_line(&mut hello)).await {
                Err(_) => json!({"result": "timeout", "error": "no hello"}),
                Ok(Err(e)) => json!({"result": classify(&e), "error": e.to_string()}),
                Ok(Ok(0)) => json!({"result": "eof"}),
                Ok(Ok(_)) => {
                    json!({"result": "ok", "hello": serde_json::from_str::<Value>(&hello).unwrap_or(Value::Null)})
                }
            }
        }
    };
    emit(out);
    Ok(())
}

async fn flood(to: SocketAddr, count: usize) -> anyhow::Result<()> {
    let mut held = Vec::new();
    let mut errors: BTreeMap<&'static str, usize> = BTreeMap::new();
    for _ in 0..count {
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(to)).await {
            Ok(Ok(mut s)) => {
                // Held only once the server answered (its hello line).
                let mut first = [0u8; 1];
                match tokio::time::timeout(Duration::from_secs(5), s.read(&mut first)).await {
                    Ok(Ok(1)) => held.push(s),
                    Ok(Ok(_)) => *errors.entry("eof").or_default() += 1,
                    Ok(Err(e)) => *errors.entry(classify(&e)).or_default() += 1,
                    Err(_) => *errors.entry("timeout").or_default() += 1,
                }
            }
            Ok(Err(e)) => *errors.entry(classify(&e)).or_default() += 1,
            Err(_) => *errors.entry("timeout").or_default() += 1,
        }
    }
    emit(json!({"event": "flooded", "ok": held.len(), "errors": errors}));
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while stdin.next_line().await?.is_some() {}
    drop(held);
    Ok(())
}

/// The start of a TLS 1.3 ClientHello: a peer that stops mid-handshake.
const CLIENT_HELLO_START: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
    0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
    0x5a, 0x5a,
];

async fn halfopen(to: SocketAddr, count: usize, bytes: usize) -> anyhow::Result<()> {
    let mut held = Vec::new();
    let mut errors: BTreeMap<&'static str, usize> = BTreeMap::new();
    let hello = &CLIENT_HELLO_START[..bytes.min(CLIENT_HELLO_START.len())];
    for _ in 0..count {
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(to)).await {
            Ok(Ok(mut s)) => match s.write_all(hello).await {
                Ok(()) => held.push(s),
                Err(e) => *errors.entry(classify(&e)).or_default() += 1,
            },
            Ok(Err(e)) => *errors.entry(classify(&e)).or_default() += 1,
            Err(_) => *errors.entry("timeout").or_default() += 1,
        }
    }
    emit(json!({"event": "opened", "ok": held.len(), "errors": errors}));
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while stdin.next_line().await?.is_some() {}
    Ok(())
}

async fn hold(to: SocketAddr) -> anyhow::Result<()> {
    let s = TcpStream::connect(to).await.with_context(|| format!("connect {to}"))?;
    let local = s.local_addr()?;
    let (r, mut w) = s.into_split();
    let mut server = BufReader::new(r);
    let mut hello = String::new();
    server.read_line(&mut hello).await?;
    emit(
        json!({"event": "connected", "local": local, "hello": serde_json::from_str::<Value>(&hello).unwrap_or(Value::Null)}),
    );
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await? {
        if let Err(e) = w.write_all(format!("{line}\n").as_bytes()).await {
            emit(json!({"event": "error", "kind": classify(&e), "error": e.to_string()}));
            return Ok(());
        }
        let mut echoed = String::new();
        match server.read_line(&mut echoed).await {
            Ok(0) => {
                emit(json!({"event": "closed"}));
                return Ok(());
            }
            Ok(_) => emit(json!({"event": "echo", "line": echoed.trim_end()})),
            Err(e) => {
                emit(json!({"event": "error", "kind": classify(&e), "error": e.to_string()}));
                return Ok(());
            }
        }
    }
    w.shutdown().await?;
    emit(json!({"event": "done"}));
    Ok(())
}

async fn http(addrs: Vec<SocketAddr>, name: String) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for a in &addrs {
        let l = TcpListener::bind(a).await.with_context(|| format!("bind {a}"))?;
        tasks.push(tokio::spawn(http_accept_loop(l, name.clone())));
    }
    emit(json!({"event": "listening", "addrs": addrs}));
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn http_accept_loop(l: TcpListener, name: String) -> anyhow::Result<()> {
    loop {
        let (s, peer) = l.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let _ = http_exchange(s, peer, &name).await;
        });
    }
}

/// Answers one request per connection.
async fn http_exchange(s: TcpStream, peer: SocketAddr, name: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(s);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    emit(json!({"event": "request", "peer": peer, "request": request_line.trim_end()}));
    let body = format!("hello from {name}; you are {}\n", peer.ip());
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = reader.into_inner();
    s.write_all(response.as_bytes()).await?;
    s.shutdown().await
}

/// A deterministic byte stream (xorshift), so both ends can check it.
struct Stream(u64);

impl Stream {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

async fn transfer(to: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    use ring::digest::{Context, SHA256};
    let started = Instant::now();
    let s = TcpStream::connect(to).await.with_context(|| format!("connect {to}"))?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut hello = String::new();
    r.read_line(&mut hello).await?;
    let send = async {
        let mut sent = Context::new(&SHA256);
        let mut stream = Stream(0x9e37_79b9_7f4a_7c15);
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            stream.fill(&mut buf[..n]);
            sent.update(&buf[..n]);
            w.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(sent.finish())
    };
    let recv = async {
        let mut got = Context::new(&SHA256);
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.update(&buf[..n]);
            total += n as u64;
        }
        Ok::<_, std::io::Error>((got.finish(), total))
    };
    let (sent, received) = tokio::join!(send, recv);
    let hex = |d: ring::digest::Digest| d.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>();
    let elapsed = started.elapsed();
    let out = match (sent, received) {
        (Ok(s), Ok((r, total))) => {
            let (s, r) = (hex(s), hex(r));
            json!({
                "ok": s == r && total == bytes,
                "sent": bytes,
                "received": total,
                "sent_sha256": s,
                "received_sha256": r,
                "elapsed_ms": elapsed.as_millis() as u64,
                "gbps": (bytes * 8) as f64 / elapsed.as_secs_f64() / 1e9,
            })
        }
        (s, r) => {
            json!({"ok": false, "send_error": s.err().map(|e| e.to_string()), "receive_error": r.err().map(|e| e.to_string())})
        }
    };
    emit(out);
    Ok(())
}

async fn half_close(to: SocketAddr, bytes: usize) -> anyhow::Result<()> {
    let s = TcpStream::connect(to).await.with_context(|| format!("connect {to}"))?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut hello = String::new();
    r.read_line(&mut hello).await?;
    w.write_all(&vec![b'x'; bytes]).await?;
    // Half-close: we are done sending, but keep reading.
    w.shutdown().await?;
    let mut reply = String::new();
    let answered = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut reply)).await;
    let reply: Value = serde_json::from_str(reply.trim()).unwrap_or(Value::Null);
    emit(json!({
        "ok": answered.is_ok() && reply["received"] == bytes,
        "reply": reply,
        "timed_out": answered.is_err(),
    }));
    Ok(())
}

async fn bare_echo(addrs: Vec<SocketAddr>) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for a in &addrs {
        let l = TcpListener::bind(a).await.with_context(|| format!("bind {a}"))?;
        tasks.push(tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
            #[allow(unreachable_code)]
            Ok::<_, std::io::Error>(())
        }));
    }
    emit(json!({"event": "listening", "addrs": addrs}));
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn streams(
    to: SocketAddr,
    count: usize,
    chunk: usize,
    interval: Duration,
    duration: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        tasks.spawn(async move {
            let result = one_stream(to, i as u64, chunk, interval, duration).await;
            (i, result)
        });
    }
    let (mut ok, mut bytes, mut failures) = (0usize, 0u64, Vec::new());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(n))) => {
                ok += 1;
                bytes += n;
            }
            Ok((i, Err((kind, error)))) => failures.push(json!({
                "connection": i,
                "kind": kind,
                "error": error,
            })),
            Err(e) => failures.push(json!({"kind": "panic", "error": e.to_string()})),
        }
    }
    emit(json!({
        "connections": count,
        "ok": ok,
        "bytes": bytes,
        "failures": failures,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }));
    Ok(())
}

/// One long-lived echo exchange: every byte read back is compared with the
/// byte sent (a reset, a loss or a corruption is a failure, said which).
async fn one_stream(
    to: SocketAddr,
    seed: u64,
    chunk: usize,
    interval: Duration,
    duration: Duration,
) -> Result<u64, (&'static str, String)> {
    let io = |what: &'static str| move |e: std::io::Error| (classify(&e), format!("{what}: {e}"));
    let started = Instant::now();
    let mut s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(to))
        .await
        .map_err(|_| ("timeout", "connect".to_owned()))?
        .map_err(io("connect"))?;
    let _ = s.set_nodelay(true);
    let mut stream = Stream(0x9e37_79b9_7f4a_7c15 ^ (seed + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut out = vec![0u8; chunk];
    let mut back = vec![0u8; chunk];
    let mut total = 0u64;
    let mut tick = tokio::time::interval(interval);
    while started.elapsed() < duration {
        tick.tick().await;
        stream.fill(&mut out);
        s.write_all(&out).await.map_err(io("write"))?;
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .map_err(|_| ("timeout", format!("no echo after {total} bytes")))?
            .map_err(io("read"))?;
        if back != out {
            return Err(("corrupt", format!("the echo differs after {total} bytes")));
        }
        total += chunk as u64;
    }
    s.shutdown().await.map_err(io("shutdown"))?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .map_err(|_| ("timeout", "no end after close".to_owned()))?
        .map_err(io("read to end"))?;
    if !rest.is_empty() {
        return Err(("corrupt", format!("{} bytes after the last echo", rest.len())));
    }
    Ok(total)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

async fn rr(to: SocketAddr, size: usize, duration: Duration) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(to).await.with_context(|| format!("connect {to}"))?;
    s.set_nodelay(true)?;
    let out = vec![7u8; size];
    let mut back = vec![0u8; size];
    // Warm up: pooled connections, buffers, caches.
    for _ in 0..200 {
        s.write_all(&out).await?;
        s.read_exact(&mut back).await?;
    }
    let mut latencies = Vec::with_capacity(200_000);
    let started = Instant::now();
    while started.elapsed() < duration {
        let t = Instant::now();
        s.write_all(&out).await?;
        s.read_exact(&mut back).await?;
        latencies.push(t.elapsed().as_nanos() as u64);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    emit(json!({
        "count": latencies.len(),
        "per_s": latencies.len() as f64 / elapsed,
        "p50_us": percentile(&latencies, 0.50),
        "p99_us": percentile(&latencies, 0.99),
    }));
    Ok(())
}

async fn crr(to: SocketAddr, size: usize, duration: Duration, concurrency: usize) -> anyhow::Result<()> {
    async fn once(to: SocketAddr, out: &[u8], back: &mut [u8]) -> std::io::Result<()> {
        let mut s = TcpStream::connect(to).await?;
        s.set_nodelay(true)?;
        s.write_all(out).await?;
        s.read_exact(back).await?;
        Ok(())
    }
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            tokio::spawn(async move {
                let out = vec![7u8; size];
                let mut back = vec![0u8; size];
                let (mut latencies, mut errors) = (Vec::new(), 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match once(to, &out, &mut back).await {
                        Ok(()) => latencies.push(t.elapsed().as_nanos() as u64),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    emit(json!({
        "count": all.len(),
        "errors": errors,
        "per_s": all.len() as f64 / elapsed,
        "p50_us": percentile(&all, 0.50),
        "p99_us": percentile(&all, 0.99),
    }));
    Ok(())
}

async fn steady(to: SocketAddr, interval: Duration, duration: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut attempts, mut ok) = (0u64, 0u64);
    let mut failures = Vec::new();
    let mut requests = stdin_lines();
    let mut stopped = false;
    while started.elapsed() < duration && !stopped {
        tokio::select! {
            _ = tick.tick() => {}
            Some(line) = requests.recv() => {
                stopped = line.trim() == "stop";
                continue;
            }
        }
        attempts += 1;
        let barrier = Arc::new(tokio::sync::Barrier::new(1));
        match one_exchange(to, attempts as usize, 64, Duration::from_secs(5), barrier, None).await {
            Ok(_) => ok += 1,
            Err((kind, error)) => failures.push(json!({
                "at_ms": started.elapsed().as_millis() as u64,
                "kind": kind,
                "error": error,
            })),
        }
    }
    emit(json!({"attempts": attempts, "ok": ok, "failures": failures}));
    Ok(())
}
