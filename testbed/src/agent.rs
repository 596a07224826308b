//! Driving `tb-agent` inside simulated workloads.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    process::{Child, ChildStdin, ChildStdout, Stdio},
    sync::mpsc,
    time::Duration,
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

/// A `tb-agent serve` running in a place; killed when dropped.
pub struct Server {
    child: Child,
    lines: Lines,
}

impl Server {
    pub fn start(tb: &Testbed, place: &Place, listen: &[SocketAddr]) -> anyhow::Result<Self> {
        let mut cmd = tb.agent(place)?;
        cmd.arg("serve");
        for a in listen {
            cmd.args(["--listen", &a.to_string()]);
        }
        Self::spawn(cmd)
    }

    fn spawn(mut cmd: std::process::Command) -> anyhow::Result<Self> {
        let mut child =
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("spawn tb-agent serve")?;
        let lines = Lines::new(child.stdout.take().context("no stdout")?);
        let first = lines.next(Duration::from_secs(5));
        match first {
            Ok(v) if v["event"] == "listening" => Ok(Self { child, lines }),
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
        Self::spawn(cmd)
    }

    /// A bare echo server (no hello line), for benchmarks.
    pub fn echo(tb: &Testbed, place: &Place, listen: &[SocketAddr]) -> anyhow::Result<Self> {
        let mut cmd = tb.agent(place)?;
        cmd.arg("echo");
        for a in listen {
            cmd.args(["--listen", &a.to_string()]);
        }
        Self::spawn(cmd)
    }

    /// Every connection accepted so far (`peer`, `local`).
    pub fn accepted(&self) -> Vec<Value> {
        self.lines.rx.try_iter().filter(|v| v["event"] == "accepted").collect()
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
        let first = lines.next(Duration::from_secs(10));
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
        let v = self.lines.next(Duration::from_secs(10))?;
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
        Self::spawn(cmd)
    }
}

/// A packet capture (tshark) on an interface inside a namespace.
pub struct Capture {
    child: Child,
    pub file: std::path::PathBuf,
}

impl Capture {
    /// Starts capturing TCP on `iface` in `netns`; returns once packets are
    /// really being recorded (tshark announces itself before it captures, so
    /// a marker connection is sent until it shows up in the file).
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
        let capture = Self { child, file };
        // A connection attempt to an address on the fabric nobody holds: its
        // ARP request crosses iface, and once the capture file grows past its
        // header, capture is live.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut attempt = 0u8;
        loop {
            // A fresh address each time: a repeated one waits for its failed
            // neighbour entry to expire before it is asked for again.
            attempt = attempt.wrapping_add(1);
            let target = SocketAddr::from(([198, 18, 0, 200 + attempt % 50], 9));
            let _ = crate::in_netns(netns, move || {
                let _ = std::net::TcpStream::connect_timeout(&target, Duration::from_millis(50));
                Ok(())
            });
            let size = std::fs::metadata(&capture.file).map(|m| m.len()).unwrap_or(0);
            if size > 400 {
                return Ok(capture);
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("tshark did not start capturing on {iface} in {netns}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the capture; returns the raw capture file's bytes.
    pub fn stop(mut self) -> anyhow::Result<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(300));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        let _ = self.child.wait();
        Ok(std::fs::read(&self.file)?)
    }

    /// Field values of packets matching a display filter, read back with tshark.
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

/// `tb-agent steady` running in the background; `finish` waits for its report.
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
