//! Running `ztunnel run` for a simulated node, and watching what it does.

use std::{
    io::BufRead as _,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{Node, Testbed, Workload, agent::PATIENCE, http};

pub const ADMIN: &str = "127.0.0.1:15000";
pub const METRICS: &str = "127.0.0.1:15020";
pub const READINESS: &str = "127.0.0.1:15021";
/// Where `flush_access_log` sends its marker connections: the node's HBONE
/// port on loopback, where no workload is, so the tunnel refuses (and logs)
/// the connection without waiting for anything.
const MARKER_TARGET: &str = "127.0.0.1:15008";

/// The configuration `ztunnel run` gets for `node`.
pub fn config(tb: &Testbed, node: &Node, enrolled: &[&Workload]) -> Value {
    let mut workloads = Vec::new();
    for w in &tb.workloads {
        let mut entry = json!({
            "name": w.name,
            "namespace": w.namespace,
            "service_account": w.service_account,
            "node": w.node,
            // As a Deployment would label its pods: policies select by it.
            "labels": { "app": w.name },
        });
        if w.pod_netns.is_some() {
            entry["addresses"] = json!([w.ip4.to_string(), w.ip6.to_string()]);
        }
        if w.node == node.name {
            if !enrolled.iter().any(|e| e.name == w.name && e.node == w.node) {
                continue;
            }
            entry["cgroup"] = json!(w.cgroup);
            if let Some(ns) = &w.pod_netns {
                entry["netns"] = json!(crate::net::netns_path(ns));
            }
        } else if w.pod_netns.is_none() {
            // Another node's plain-host workload: reached at its node's addresses.
            entry["addresses"] = json!([w.ip4.to_string(), w.ip6.to_string()]);
            entry["ports"] = json!([]);
        }
        workloads.push(entry);
    }
    json!({
        "node": {
            "name": node.name,
            "netns": crate::net::netns_path(&node.netns),
            "addresses": [node.ip4.to_string(), node.ip6.to_string()],
            "run_dir": tb.dir().join(format!("{}-run", node.name)),
        },
        "capture": {
            "cgroup_root": node.cgroup,
            "tunnel_cgroup": node.tunnel_cgroup,
            "bpf_pin_dir": tb.pin_base.join(&node.name),
        },
        "proxy": { "reload_interval": "200ms", "drain_timeout": "3s", "connect_timeout": "3s" },
        "identity": { "ca": { "kind": "embedded", "dir": tb.ca_dir() } },
        "access_log": tb.dir().join(format!("{}-access.log", node.name)),
        "workloads": workloads,
    })
}

/// A running node tunnel. Dropping it kills the process (the testbed's
/// teardown removes what it installed).
pub struct Tunnel {
    pub node: Node,
    child: Option<Child>,
    /// Processes an upgrade replaced, draining until they exit.
    draining: Vec<Child>,
    /// A successor the tunnel started itself (SIGUSR2), not this process's
    /// child: the test that makes one is the orphans' subreaper.
    adopted: Option<u32>,
    /// More environment for `ztunnel run`.
    env: Vec<(String, String)>,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub access_log_path: PathBuf,
    /// `node.run_dir`: the admin token.
    pub run_dir: PathBuf,
    /// Source addresses of `flush_access_log`'s marker connections, whose
    /// lines `access_log` leaves out.
    markers: Mutex<Vec<String>>,
    /// More arguments to `ztunnel run`.
    run_args: Vec<String>,
}

impl Tunnel {
    pub fn start(tb: &Testbed, node: &Node, config: Value) -> anyhow::Result<Self> {
        Self::start_with_args(tb, node, config, &[])
    }

    /// `ztunnel run --kubernetes` arguments for `node`: the kubelet's pod
    /// cgroups are made under the node's capture root (cgroupfs layout).
    pub fn kubernetes_args(
        tb: &Testbed,
        node: &Node,
        kubeconfig: &std::path::Path,
        cni_socket: &std::path::Path,
    ) -> anyhow::Result<Vec<String>> {
        let kubepods = node.cgroup.strip_prefix(tb.cgroup_base.parent().unwrap_or(&tb.cgroup_base))?;
        Ok(vec![
            "--kubernetes".to_owned(),
            "--kubeconfig".to_owned(),
            kubeconfig.display().to_string(),
            "--node-name".to_owned(),
            node.name.clone(),
            "--kubepods-cgroup".to_owned(),
            kubepods.display().to_string(),
            "--cni-socket".to_owned(),
            cni_socket.display().to_string(),
        ])
    }

    /// [`Self::start`], with more arguments to `ztunnel run` (such as
    /// `--kubernetes`).
    pub fn start_with_args(
        tb: &Testbed,
        node: &Node,
        config: Value,
        args: &[String],
    ) -> anyhow::Result<Self> {
        Self::start_with_env(tb, node, config, args, &[])
    }

    /// [`Self::start_with_args`], with more environment (such as systemd's
    /// `NOTIFY_SOCKET`).
    pub fn start_with_env(
        tb: &Testbed,
        node: &Node,
        config: Value,
        args: &[String],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let config_path = tb.dir().join(format!("{}-tunnel.yaml", node.name));
        write_config(&config_path, &config)?;
        // `access_log: <path>`, or `access_log: {target: <path>, ...}`.
        let access_log = &config["access_log"];
        let access_log_path = access_log
            .as_str()
            .or_else(|| access_log["target"].as_str())
            .map(PathBuf::from)
            .unwrap_or_else(|| tb.dir().join("no-access-log"));
        let mut t = Self {
            node: node.clone(),
            child: None,
            draining: Vec::new(),
            adopted: None,
            env: env.to_vec(),
            config_path,
            log_path: tb.dir().join(format!("{}-tunnel.log", node.name)),
            access_log_path,
            run_dir: config["node"]["run_dir"].as_str().map(PathBuf::from).unwrap_or_default(),
            markers: Mutex::new(Vec::new()),
            run_args: args.to_vec(),
        };
        t.spawn()?;
        Ok(t)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        self.child = Some(self.spawn_process()?);
        self.wait_ready(Duration::from_secs(30))
    }

    fn spawn_process(&self) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path)?;
        Command::new(crate::bins::ztunnel()?)
            .arg("--log-level")
            .arg(std::env::var("ZTB_TUNNEL_LOG").unwrap_or_else(|_| "info,ztunnel=debug".to_owned()))
            .args(["run", "--config"])
            .arg(&self.config_path)
            .args(&self.run_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn ztunnel")
    }

    /// Upgrades by handover: starts a second tunnel with the same
    /// configuration while this one runs, and returns once the new one says
    /// it took over (how long that took). The old process drains and exits
    /// on its own: [`Self::wait_drained`].
    pub fn upgrade(&mut self, limit: Duration) -> anyhow::Result<Duration> {
        const TOOK_OVER: &str = "took over from the tunnel that ran on this node";
        let before = self.log().matches(TOOK_OVER).count();
        let started = Instant::now();
        let mut new = self.spawn_process()?;
        loop {
            if let Some(status) = new.try_wait()? {
                bail!("the new ztunnel exited with {status} before taking over:\n{}", self.log_tail(40));
            }
            if self.log().matches(TOOK_OVER).count() > before {
                break;
            }
            if started.elapsed() > limit {
                let _ = new.kill();
                let _ = new.wait();
                bail!("the new ztunnel did not take over within {limit:?}:\n{}", self.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let took = started.elapsed();
        if let Some(old) = self.child.replace(new) {
            self.draining.push(old);
        }
        Ok(took)
    }

    /// Starts a would-be successor with the same configuration and returns
    /// at once, leaving it to the caller (to make one fail mid-handover).
    /// Unlike [`Self::upgrade`], the caller owns and must reap it.
    pub fn start_successor(&self) -> anyhow::Result<Child> {
        self.spawn_process()
    }

    /// The tunnel's own successor (started on SIGUSR2), `pid`, is the one
    /// serving now; the process this started drains.
    pub fn adopt(&mut self, pid: u32) {
        if let Some(old) = self.child.take() {
            self.draining.push(old);
        }
        self.adopted = Some(pid);
    }

    /// Waits until every process an upgrade replaced has exited; their exit
    /// statuses.
    pub fn wait_drained(&mut self, limit: Duration) -> anyhow::Result<Vec<ExitStatus>> {
        let deadline = Instant::now() + limit;
        let mut statuses = Vec::new();
        for mut old in std::mem::take(&mut self.draining) {
            loop {
                if let Some(status) = old.try_wait()? {
                    statuses.push(status);
                    break;
                }
                if Instant::now() > deadline {
                    let _ = old.kill();
                    let _ = old.wait();
                    bail!("a replaced ztunnel (pid {}) was still running after {limit:?}", old.id());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(statuses)
    }

    /// Waits until `/healthz/ready` answers 200; fails early if the process exits.
    pub fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_exit()? {
                bail!("ztunnel exited with {status} before it was ready:\n{}", self.log_tail(40));
            }
            if let Ok((200, _)) = http::get(&self.node.netns, READINESS.parse()?, "/healthz/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("ztunnel not ready after {limit:?}:\n{}", self.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_exit(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("ztunnel is not running"),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id).or(self.adopted)
    }

    /// The last `n` lines of the tunnel's own log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM, then waits for a graceful exit.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else { bail!("ztunnel is not running") };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("ztunnel did not stop within 20s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the tunnel dies without any cleanup.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        for mut old in std::mem::take(&mut self.draining) {
            let _ = old.kill();
            let _ = old.wait();
        }
        if let Some(pid) = self.adopted.take() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            // Ours to reap only if this process is the orphans' subreaper;
            // otherwise init reaps it.
            let _ = nix::sys::wait::waitpid(pid, None);
        }
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the tunnel again with its current configuration file.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.spawn()
    }

    /// Starts a stopped tunnel again.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "ztunnel is still running");
        self.spawn()
    }

    /// Rewrites the configuration, signals the tunnel, and waits until it
    /// applied a newer generation and finished applying it: the reload is
    /// counted as applied only after the tunnel re-decided its open
    /// connections, so whatever the reload closes has been told to close.
    pub fn reload(&mut self, config: &Value) -> anyhow::Result<()> {
        let before = self.generation()?;
        let applied_before = self.reloads_applied()?;
        write_config(&self.config_path, config)?;
        if let Some(c) = &self.child {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGHUP,
            )?;
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (generation, applied) = (self.generation()?, self.reloads_applied()?);
            if generation > before && applied > applied_before {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "configuration not applied within {PATIENCE:?} (generation {before} -> {generation}, \
                     reloads applied {applied_before} -> {applied}):\n{}",
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ztunnel_config_reloads_total{result="applied"}`.
    fn reloads_applied(&self) -> anyhow::Result<u64> {
        let metrics = self.metrics()?;
        Ok(metrics
            .lines()
            .find_map(|l| l.strip_prefix(r#"ztunnel_config_reloads_total{result="applied"} "#))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }

    /// Rewrites the configuration with a mistake, signals the tunnel, and
    /// returns the error it logged (it keeps the running configuration).
    pub fn reload_error(&mut self, config: &Value) -> anyhow::Result<String> {
        let invalid = |t: &Self| -> anyhow::Result<u64> {
            let m = t.metrics()?;
            Ok(m.lines()
                .find(|l| l.starts_with(r#"ztunnel_config_reloads_total{result="invalid"}"#))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64)
        };
        let before = invalid(self)?;
        write_config(&self.config_path, config)?;
        if let Some(c) = &self.child {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGHUP,
            )?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while invalid(self)? <= before {
            if Instant::now() > deadline {
                bail!("the mistake was not reported within 10s:\n{}", self.log_tail(30));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(self.config_dump()?["last_reload_error"].as_str().unwrap_or_default().to_owned())
    }

    pub fn generation(&self) -> anyhow::Result<u64> {
        Ok(self.config_dump()?["generation"].as_u64().unwrap_or(0))
    }

    pub fn config_dump(&self) -> anyhow::Result<Value> {
        let (status, body) = http::get(&self.node.netns, ADMIN.parse()?, "/config_dump")?;
        anyhow::ensure!(status == 200, "config_dump: HTTP {status}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// The status of one workload in `/config_dump`.
    pub fn workload_status(&self, w: &Workload) -> anyhow::Result<Value> {
        let dump = self.config_dump()?;
        dump["workloads"]
            .as_array()
            .and_then(|ws| ws.iter().find(|s| s["workload"] == w.key()).cloned())
            .with_context(|| format!("{} not in config_dump: {dump}", w.key()))
    }

    pub fn capture_counter(&self, name: &str) -> anyhow::Result<u64> {
        Ok(self.config_dump()?["capture_counters"][name].as_u64().unwrap_or(0))
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = http::get(&self.node.netns, METRICS.parse()?, "/metrics")?;
        anyhow::ensure!(status == 200, "metrics: HTTP {status}");
        Ok(body)
    }

    pub fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http::get(&self.node.netns, ADMIN.parse()?, path)
    }

    /// `POST path` on the admin endpoint, with `token` when given.
    pub fn admin_post(&self, path: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
        let header = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        http::request_with(&self.node.netns, ADMIN.parse()?, "POST", path, &header)
    }

    /// The admin token the tunnel wrote at start.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        let path = self.run_dir.join("admin.token");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("read {}", path.display()))?
            .trim()
            .to_owned())
    }

    /// Descriptors the tunnel holds now.
    pub fn open_fds(&self) -> anyhow::Result<usize> {
        let pid = self.pid().context("not running")?;
        Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
    }

    /// The tunnel's resident memory, in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let pid = self.pid().context("not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")
    }

    /// Every access log line written so far (the tunnel writes a line when
    /// a connection ends, in batches: call `flush_access_log` first when the
    /// lines of connections that just ended must be there), without the
    /// lines of `flush_access_log`'s own marker connections.
    pub fn access_log(&self) -> Vec<Value> {
        let markers = self.markers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        self.raw_access_log()
            .into_iter()
            .filter(|e| e["source_address"].as_str().is_none_or(|a| !markers.iter().any(|m| m == a)))
            .collect()
    }

    fn raw_access_log(&self) -> Vec<Value> {
        let Ok(f) = std::fs::File::open(&self.access_log_path) else {
            return Vec::new();
        };
        std::io::BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }

    /// Proves the access log holds the line of every connection that ended
    /// before this call, so that a test may then check that a line is
    /// absent. A marker connection to the node's :15008 (on loopback, from
    /// outside any workload) is refused and logged at once; the log is
    /// written in order, and the marker's line is waited for. (The marker
    /// counts in the tunnel's metrics as an inbound HBONE connection refused
    /// with `unknown_workload`.)
    pub fn flush_access_log(&self) -> anyhow::Result<()> {
        let marker = crate::in_netns(&self.node.netns, marker_connection)?;
        self.markers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(marker.clone());
        let deadline = Instant::now() + PATIENCE;
        while !self.raw_access_log().iter().any(|e| e["source_address"] == marker.as_str()) {
            if Instant::now() > deadline {
                bail!(
                    "the marker connection from {marker} to {MARKER_TARGET} was not logged within {PATIENCE:?}; \
                     access log:\n{}\ntunnel:\n{}",
                    self.raw_access_log().iter().map(Value::to_string).collect::<Vec<_>>().join("\n"),
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits for `n` access log lines matching `pred`.
    pub fn wait_access_log(
        &self,
        n: usize,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Vec<Value>> {
        let deadline = Instant::now() + limit;
        loop {
            let found: Vec<Value> = self.access_log().into_iter().filter(|e| pred(e)).collect();
            if found.len() >= n {
                return Ok(found);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {n} expected access log lines after {limit:?}; log:\n{}\ntunnel:\n{}",
                    found.len(),
                    self.access_log().iter().map(Value::to_string).collect::<Vec<_>>().join("\n"),
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// One marker connection to `MARKER_TARGET`, from an address chosen before
/// connecting: the tunnel may refuse it (a reset) before connect() returns,
/// and its log line is found by that address.
fn marker_connection() -> anyhow::Result<String> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, getsockname, setsockopt, socket,
        sockopt::SendTimeout,
    };
    use std::os::fd::AsRawFd as _;
    let target: std::net::SocketAddrV4 = MARKER_TARGET.parse()?;
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // Bounds a connect whose SYN goes unanswered.
    setsockopt(&fd, SendTimeout, &nix::sys::time::TimeVal::new(PATIENCE.as_secs() as i64, 0))?;
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0))?;
    let local: SockaddrIn = getsockname(fd.as_raw_fd())?;
    match connect(fd.as_raw_fd(), &SockaddrIn::from(target)) {
        // Reset: the tunnel took the connection and refused it at once.
        Ok(()) | Err(nix::errno::Errno::ECONNRESET) => Ok(std::net::SocketAddrV4::from(local).to_string()),
        Err(e) => Err(anyhow::anyhow!("marker connection to {target}: {e}")),
    }
}

/// Writes YAML atomically (the tunnel may be reading the file).
fn write_config(path: &std::path::Path, config: &Value) -> anyhow::Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, serde_yaml_ng::to_string(config)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

impl Tunnel {
    /// What `ztunnel certs --json` prints for this tunnel (run in its node's
    /// namespace, as an operator would).
    pub fn certs(&self, tb: &Testbed) -> anyhow::Result<Value> {
        let out = tb
            .command(&self.node.unenrolled(), crate::bins::ztunnel()?)?
            .args(["certs", "--json"])
            .output()?;
        anyhow::ensure!(out.status.success(), "ztunnel certs: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// What `ztunnel certs` prints for a person.
    pub fn certs_text(&self, tb: &Testbed) -> anyhow::Result<String> {
        let out = tb.command(&self.node.unenrolled(), crate::bins::ztunnel()?)?.arg("certs").output()?;
        anyhow::ensure!(out.status.success(), "ztunnel certs: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ztunnel explain --from <from> --to <to>` run in this tunnel's node
    /// (`--json` when `json`): its exit code and what it printed.
    pub fn explain(&self, tb: &Testbed, from: &str, to: &str, json: bool) -> anyhow::Result<(i32, String)> {
        let mut cmd = tb.command(&self.node.unenrolled(), crate::bins::ztunnel()?)?;
        cmd.args(["explain", "--from", from, "--to", to]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output()?;
        let code = out.status.code().unwrap_or(-1);
        anyhow::ensure!(
            code == 0 || code == 1,
            "ztunnel explain exited {code}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((code, String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    /// `ztunnel explain --json`, parsed, with its exit code.
    pub fn explain_json(&self, tb: &Testbed, from: &str, to: &str) -> anyhow::Result<(i32, Value)> {
        let (code, out) = self.explain(tb, from, to, true)?;
        Ok((
            code,
            serde_json::from_str(&out).with_context(|| format!("ztunnel explain --json printed {out}"))?,
        ))
    }

    /// The `ztunnel certs` status of one identity.
    pub fn cert_status(&self, tb: &Testbed, identity: &str) -> anyhow::Result<Value> {
        let certs = self.certs(tb)?;
        certs["identities"]
            .as_array()
            .and_then(|ids| ids.iter().find(|c| c["identity"] == identity).cloned())
            .with_context(|| format!("{identity} not in ztunnel certs: {certs}"))
    }
}
