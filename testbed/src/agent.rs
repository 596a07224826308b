//! Driving `tb-agent` inside simulated workloads.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    process::{Child, ChildStdin, ChildStdout, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{Place, Testbed};

/// What `tb-agent connect` reports.
#[derive(Debug, Clone)]
pub struct Connected {
    pub ok: usize,
    pub failed: usize,
    pub errors: Value,
    /// What the server saw of each successful connection (`peer`, `local`),
    /// plus the client's own local address (`client_local`).
    pub seen: Vec<Value>,
}

/// Runs `count` echo exchanges from `place` to `to`, `concurrency` at a time.
pub fn connect(
    tb: &Testbed,
    place: &Place,
    to: SocketAddr,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<Connected> {
    connect_bytes(tb, place, to, count, concurrency, 64)
}

pub fn connect_bytes(
    tb: &Testbed,
    place: &Place,
    to: SocketAddr,
    count: usize,
    concurrency: usize,
    bytes: usize,
) -> anyhow::Result<Connected> {
    let out = tb
        .agent(place)?
        .args(["connect", "--to", &to.to_string()])
        .args(["--count", &count.to_string(), "--concurrency", &concurrency.to_string()])
        .args(["--bytes", &bytes.to_string()])
        .output()
        .context("run tb-agent connect")?;
    let v = last_json(&out.stdout).with_context(|| {
        format!("tb-agent connect printed nothing; stderr: {}", String::from_utf8_lossy(&out.stderr))
    })?;
    Ok(Connected {
        ok: v["ok"].as_u64().unwrap_or(0) as usize,
        failed: v["failed"].as_u64().unwrap_or(0) as usize,
        errors: v["errors"].clone(),
        seen: v["seen"].as_array().cloned().unwrap_or_default(),
    })
}

/// One connection attempt from `place`: `ok`, `refused`, `denied`, `reset`, `timeout`...
pub fn probe(tb: &Testbed, place: &Place, to: SocketAddr) -> anyhow::Result<Value> {
    let out =
        tb.agent(place)?.args(["probe", "--to", &to.to_string()]).output().context("run tb-agent probe")?;
    last_json(&out.stdout).with_context(|| {
        format!("tb-agent probe printed nothing; stderr: {}", String::from_utf8_lossy(&out.stderr))
    })
}

fn last_json(stdout: &[u8]) -> Option<Value> {
    String::from_utf8_lossy(stdout).lines().rev().find_map(|l| serde_json::from_str(l).ok())
}

/// Reads a child's JSON lines on a thread so waits can time out.
struct Lines {
    rx: mpsc::Receiver<Value>,
}

impl Lines {
    fn new(stdout: ChildStdout) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        Self { rx }
    }

    fn next(&self, limit: Duration) -> anyhow::Result<Value> {
        self.rx.recv_timeout(limit).context("tb-agent said nothing in time")
    }
}

/// How long a helper process may take to start or answer before a test
/// gives up on it: generous, for a loaded 2-core CI machine (a passing test
/// never waits this long).
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A `tb-agent serve` running in a place; killed when dropped.
pub struct Server {
    child: Child,
    lines: Lines,
    /// `serve` takes sync requests here (the other servers do not).
    requests: Mutex<Option<ChildStdin>>,
}

impl Server {
    pub fn start(tb: &Testbed, place: &Place, listen: &[SocketAddr]) -> anyhow::Result<Self> {
        let mut cmd = tb.agent(place)?;
        cmd.arg("serve");
        for a in listen {
            cmd.args(["--listen", &a.to_string()]);
        }
        Self::spawn(cmd, true)
    }

    fn spawn(mut cmd: std::process::Command, syncs: bool) -> anyhow::Result<Self> {
        if syncs {
            cmd.stdin(Stdio::piped());
        }
        let mut child =
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("spawn tb-agent serve")?;
        let requests = Mutex::new(child.stdin.take());
        let lines = Lines::new(child.stdout.take().context("no stdout")?);
        let first = lines.next(PATIENCE);
        match first {
            Ok(v) if v["event"] == "listening" => Ok(Self { child, lines, requests }),
            other => {
                let _ = child.kill();
                let out = child.wait_with_output()?;
                bail!("tb-agent serve did not start ({other:?}): {}", String::from_utf8_lossy(&out.stderr))
            }
        }
    }

    /// A `tb-agent http` server named `name` (the demo's applications).
    pub fn http(tb: &Testbed, place: &Place, listen: &[SocketAddr], name: &str) -> anyhow::Result<Self> {
        let mut cmd = tb.agent(place)?;
        cmd.args(["http", "--name", name]);
        for a in listen {
            cmd.args(["--listen", &a.to_string()]);
        }
        Self::spawn(cmd, false)
    }

    /// A bare echo server (no hello line), for benchmarks.
    pub fn echo(tb: &Testbed, place: &Place, listen: &[SocketAddr]) -> anyhow::Result<Self> {
        let mut cmd = tb.agent(place)?;
        cmd.arg("echo");
        for a in listen {
            cmd.args(["--listen", &a.to_string()]);
        }
        Self::spawn(cmd, false)
    }

    /// Every connection that reached the server since the last call
    /// (`peer`, `local`), complete: the server first accepts whatever still
    /// waits in its listen backlogs and reports it, then says it is synced.
    /// So a connection that had reached the server when this was called is
    /// in the answer, and an empty answer proves that none had.
    pub fn accepted(&self) -> anyhow::Result<Vec<Value>> {
        let mut requests = self.requests.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stdin = requests.as_mut().context("only a `tb-agent serve` server reports its connections")?;
        writeln!(stdin, "sync").and_then(|()| stdin.flush()).context("asking tb-agent serve to sync")?;
        let deadline = Instant::now() + PATIENCE;
        let mut accepted = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.lines.rx.recv_timeout(left).with_context(|| {
                format!("tb-agent serve did not sync within {PATIENCE:?}; accepted meanwhile: {accepted:?}")
            })?;
            match v["event"].as_str() {
                Some("accepted") => accepted.push(v),
                Some("synced") => return Ok(accepted),
                _ => {}
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `tb-agent hold` connection; each `ping` goes through it.
pub struct Held {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines,
    pub hello: Value,
    pub local: String,
}

impl Held {
    pub fn open(tb: &Testbed, place: &Place, to: SocketAddr) -> anyhow::Result<Self> {
        let mut child = tb
            .agent(place)?
            .args(["hold", "--to", &to.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn tb-agent hold")?;
        let stdin = child.stdin.take();
        let lines = Lines::new(child.stdout.take().context("no stdout")?);
        let first = lines.next(PATIENCE);
        match first {
            Ok(v) if v["event"] == "connected" => Ok(Self {
                hello: v["hello"].clone(),
                local: v["local"].as_str().unwrap_or_default().to_owned(),
                child,
                stdin,
                lines,
            }),
            other => {
                let _ = child.kill();
                let out = child.wait_with_output()?;
                bail!("tb-agent hold did not connect ({other:?}): {}", String::from_utf8_lossy(&out.stderr))
            }
        }
    }

    /// Sends a line and waits for its echo: proves the connection still works.
    pub fn ping(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("connection already closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        let v = self.lines.next(PATIENCE)?;
        anyhow::ensure!(v["event"] == "echo" && v["line"] == line, "held connection answered {v}");
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tb-agent connect` with a recognisable text payload.
pub fn connect_text(
    tb: &Testbed,
    place: &Place,
    to: SocketAddr,
    text: &str,
    bytes: usize,
) -> anyhow::Result<Connected> {
    let out = tb
        .agent(place)?
        .args(["connect", "--to", &to.to_string(), "--bytes", &bytes.to_string(), "--payload", text])
        .output()
        .context("run tb-agent connect")?;
    let v = last_json(&out.stdout).with_context(|| {
        format!("tb-agent connect printed nothing; stderr: {}", String::from_utf8_lossy(&out.stderr))
    })?;
    Ok(Connected {
        ok: v["ok"].as_u64().unwrap_or(0) as usize,
        failed: v["failed"].as_u64().unwrap_or(0) as usize,
        errors: v["errors"].clone(),
        seen: v["seen"].as_array().cloned().unwrap_or_default(),
    })
}

/// Streams `bytes` to an echo server and back, checking SHA-256 both ways.
pub fn transfer(tb: &Testbed, place: &Place, to: SocketAddr, bytes: u64) -> anyhow::Result<Value> {
    let out = tb
        .agent(place)?
        .args(["transfer", "--to", &to.to_string(), "--bytes", &bytes.to_string()])
        .output()
        .context("run tb-agent transfer")?;
    last_json(&out.stdout).with_context(|| {
        format!("tb-agent transfer printed nothing; stderr: {}", String::from_utf8_lossy(&out.stderr))
    })
}

/// Writes `bytes`, half-closes, and reads a reply-after-eof server's answer.
pub fn half_close(tb: &Testbed, place: &Place, to: SocketAddr, bytes: usize) -> anyhow::Result<Value> {
    let out = tb
        .agent(place)?
        .args(["half-close", "--to", &to.to_string(), "--bytes", &bytes.to_string()])
        .output()
        .context("run tb-agent half-close")?;
    last_json(&out.stdout).with_context(|| {
        format!("tb-agent half-close printed nothing; stderr: {}", String::from_utf8_lossy(&out.stderr))
    })
}

impl Server {
    /// A server that reads until the client half-closes, then answers how
    /// many bytes it got.
    pub fn reply_after_eof(tb: &Testbed, place: &Place, listen: &[SocketAddr]) -> anyhow::Result<Self> {
        let mut cmd = tb.agent(place)?;
        cmd.args(["serve", "--reply-after-eof"]);
        for a in listen {
            cmd.args(["--listen", &a.to_string()]);
        }
        Self::spawn(cmd, true)
    }
}

/// A packet capture (tshark) on an interface inside a namespace.
pub struct Capture {
    child: Child,
    pub file: std::path::PathBuf,
    netns: String,
}

/// A marker packet for a capture: an ARP request for an address on the
/// fabric nobody holds, sent by a connection attempt from `netns`. A fresh
/// address each time (a repeated one is not asked for again until its failed
/// neighbour entry expires); returns the address asked for.
fn send_marker(netns: &str) -> std::net::Ipv4Addr {
    static MARKERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = MARKERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ip = std::net::Ipv4Addr::new(198, 18, 0, 200 + (n % 50) as u8);
    let target = SocketAddr::from((ip, 9));
    let _ = crate::in_netns(netns, move || {
        let _ = std::net::TcpStream::connect_timeout(&target, Duration::from_millis(50));
        Ok(())
    });
    ip
}

impl Capture {
    /// Starts capturing TCP on `iface` in `netns`; returns once packets are
    /// really being recorded (tshark announces itself before it captures, so
    /// a marker packet is sent until it shows up in the file).
    pub fn start(tb: &Testbed, netns: &str, iface: &str) -> anyhow::Result<Self> {
        static CAPTURES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = CAPTURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = tb.dir().join(format!("{netns}-{iface}-{n}.pcap"));
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", netns, "tshark", "-q", "-i", iface, "-f", "tcp or arp", "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn tshark")?;
        let capture = Self { child, file, netns: netns.to_owned() };
        capture
            .wait_for_marker()
            .with_context(|| format!("tshark did not start capturing on {iface} in {netns}"))?;
        Ok(capture)
    }

    /// Sends marker packets until one is in the capture file. Packets cross
    /// the interface, and are written, in order: every packet sent before
    /// this was called is in the file when it returns.
    fn wait_for_marker(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        let mut asked = Vec::new();
        loop {
            let ip = send_marker(&self.netns);
            asked.push(ip);
            std::thread::sleep(Duration::from_millis(100));
            // Any marker of this capture will do: each was sent after the
            // caller's packets.
            let filter =
                asked.iter().map(|ip| format!("arp.dst.proto_ipv4 == {ip}")).collect::<Vec<_>>().join(" || ");
            if !Self::fields(&self.file, &filter, "frame.number")?.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "no marker packet (ARP for {asked:?}) in {} after {PATIENCE:?}",
                    self.file.display()
                );
            }
        }
    }

    /// Stops the capture once everything sent so far is in its file (a
    /// marker sent now has been recorded); returns the file's bytes.
    pub fn stop(mut self) -> anyhow::Result<Vec<u8>> {
        self.wait_for_marker()?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        let _ = self.child.wait();
        Ok(std::fs::read(&self.file)?)
    }

    /// Field values of packets matching a display filter, read back with
    /// tshark (a file still being written is read up to its last whole packet).
    pub fn fields(file: &std::path::Path, filter: &str, field: &str) -> anyhow::Result<Vec<String>> {
        let out = std::process::Command::new("tshark")
            .args(["-r"])
            .arg(file)
            .args(["-Y", filter, "-T", "fields", "-e", field])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tb-agent steady` running in the background; `finish` waits for its
/// report, `stop` ends it early.
pub struct Steady {
    child: Child,
}

impl Steady {
    pub fn start(
        tb: &Testbed,
        place: &Place,
        to: SocketAddr,
        interval: Duration,
        duration: Duration,
    ) -> anyhow::Result<Self> {
        let child = tb
            .agent(place)?
            .args(["steady", "--to", &to.to_string()])
            .args(["--interval-ms", &interval.as_millis().to_string()])
            .args(["--duration-ms", &duration.as_millis().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn tb-agent steady")?;
        Ok(Self { child })
    }

    /// Waits for the end; returns `{attempts, ok, failures}`.
    pub fn finish(self) -> anyhow::Result<Value> {
        let out = self.child.wait_with_output()?;
        last_json(&out.stdout).with_context(|| {
            format!("tb-agent steady printed nothing; stderr: {}", String::from_utf8_lossy(&out.stderr))
        })
    }

    /// Ends the traffic now (after the exchange under way), then reports as
    /// `finish` does: for traffic that must span steps whose length depends
    /// on the machine's speed.
    pub fn stop(mut self) -> anyhow::Result<Value> {
        if let Some(stdin) = self.child.stdin.as_mut() {
            writeln!(stdin, "stop").and_then(|()| stdin.flush()).context("asking tb-agent steady to stop")?;
        }
        self.finish()
    }
}

/// `tb-agent streams` in the background: long-lived connections to a bare
/// echo server, every byte checked; `finish` waits for the report
/// (`{connections, ok, bytes, failures}`).
pub struct Streams {
    child: Child,
}

impl Streams {
    pub fn start(
        tb: &Testbed,
        place: &Place,
        to: SocketAddr,
        count: usize,
        duration: Duration,
    ) -> anyhow::Result<Self> {
        let child = tb
            .agent(place)?
            .args(["streams", "--to", &to.to_string(), "--count", &count.to_string()])
            .args(["--duration-ms", &duration.as_millis().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn tb-agent streams")?;
        Ok(Self { child })
    }

    pub fn finish(self) -> anyhow::Result<Value> {
        let out = self.child.wait_with_output()?;
        last_json(&out.stdout).with_context(|| {
            format!("tb-agent streams printed nothing; stderr: {}", String::from_utf8_lossy(&out.stderr))
        })
    }
}

/// `probe` with options: the socket made before moving to `move_to` (a
/// cgroup directory), or an MPTCP socket.
pub fn probe_with(
    tb: &Testbed,
    place: &Place,
    to: SocketAddr,
    move_to: Option<&std::path::Path>,
    mptcp: bool,
) -> anyhow::Result<Value> {
    let mut cmd = tb.agent(place)?;
    cmd.args(["probe", "--to", &to.to_string()]);
    if let Some(dir) = move_to {
        cmd.arg("--move-to").arg(dir);
    }
    if mptcp {
        cmd.arg("--mptcp");
    }
    let out = cmd.output().context("run tb-agent probe")?;
    last_json(&out.stdout).with_context(|| {
        format!("tb-agent probe printed nothing; stderr: {}", String::from_utf8_lossy(&out.stderr))
    })
}

/// Connections opened by a `tb-agent flood` or `halfopen` and held until
/// dropped.
pub struct Hoard {
    child: Child,
    stdin: Option<ChildStdin>,
    /// How many were opened (`ok`) and how the others failed (`errors`).
    pub report: Value,
}

impl Hoard {
    /// `count` connections to `to` that each got the server's first byte.
    pub fn flood(tb: &Testbed, place: &Place, to: SocketAddr, count: usize) -> anyhow::Result<Self> {
        let mut cmd = tb.agent(place)?;
        cmd.args(["flood", "--to", &to.to_string(), "--count", &count.to_string()]);
        Self::spawn(cmd, Duration::from_secs(60 + count as u64 / 50))
    }

    /// `count` raw connections to `to`, each sent the first `bytes` of a TLS
    /// ClientHello.
    pub fn halfopen(
        tb: &Testbed,
        place: &Place,
        to: SocketAddr,
        count: usize,
        bytes: usize,
    ) -> anyhow::Result<Self> {
        let mut cmd = tb.agent(place)?;
        cmd.args(["halfopen", "--to", &to.to_string(), "--count", &count.to_string()]);
        cmd.args(["--bytes", &bytes.to_string()]);
        Self::spawn(cmd, Duration::from_secs(60 + count as u64 / 50))
    }

    fn spawn(mut cmd: std::process::Command, limit: Duration) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn tb-agent")?;
        let stdin = child.stdin.take();
        let lines = Lines::new(child.stdout.take().context("no stdout")?);
        let report = lines.next(limit)?;
        Ok(Self { child, stdin, report })
    }

    pub fn ok(&self) -> usize {
        self.report["ok"].as_u64().unwrap_or(0) as usize
    }
}

impl Drop for Hoard {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Held {
    /// Sends a line and returns what the connection answered: an `echo`, or
    /// how it ended (`closed` for an orderly end, `error` with `kind`).
    pub fn send(&mut self, line: &str) -> anyhow::Result<Value> {
        let stdin = self.stdin.as_mut().context("connection already closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        self.lines.next(Duration::from_secs(30))
    }
}
