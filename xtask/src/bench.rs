//! `cargo xtask bench [--json]`: the same two pods (client on node n1, server
//! on node n2) measured in one run, first directly (no tunnel, no capture),
//! then through both node tunnels (real capture, HBONE, mTLS):
//!
//! * bulk throughput over one connection (iperf3, 5 s);
//! * 64-byte request/response on one long-lived connection: rate, p50, p99;
//! * connect + one 64-byte request/response + close, at concurrency 1 and 8;
//! * the tunnels' CPU seconds (both, during the tunnel phase) and peak RSS.
//!
//! Release binaries. Everything shares the machine's cores: the figures are
//! comparable with each other, not with another machine's.

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use ztunnel_testbed::{Place, Testbed, Tunnel, agent::Server};

#[derive(Debug, Default, Clone)]
struct Figures {
    throughput_gbps: f64,
    rr_per_s: f64,
    rr_p50_us: f64,
    rr_p99_us: f64,
    crr_c1_per_s: f64,
    crr_c8_per_s: f64,
    crr_c1_p50_us: f64,
}

/// What to run (all by default; `only` narrows it for quick iterations).
#[derive(Debug, Clone)]
pub struct Options {
    pub json: bool,
    pub seconds: u64,
    pub only: Option<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let as_json = opts.json;
    if !crate::root::is_root() {
        bail!("the benchmark needs root: it attaches eBPF programs and makes network namespaces");
    }
    let release = crate::target_dir()?.join(crate::Profile::Release.dir_name());
    // SAFETY: single-threaded at this point; the testbed reads these later.
    unsafe {
        std::env::set_var("ZTUNNEL_BIN", release.join("ztunnel"));
        std::env::set_var("TB_AGENT_BIN", release.join("tb-agent"));
        std::env::set_var("ZTB_TUNNEL_LOG", "warn");
    }
    if opts.only.as_deref() == Some("k8s") {
        return crate::bench_k8s::run(as_json);
    }
    let mut tb = Testbed::new("bench")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let client = tb.add_pod(&n1, "client")?;
    let server = tb.add_pod(&n2, "server")?;
    // Some 100k short connections in a minute would exhaust the pods'
    // ephemeral ports to TIME_WAIT: let new connections reuse them (both
    // phases alike).
    for pod in [&client, &server] {
        let status = Command::new("ip")
            .args(["netns", "exec", &pod.netns, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"])
            .status()?;
        if !status.success() {
            bail!("sysctl net.ipv4.tcp_tw_reuse=1 in {} failed", pod.netns);
        }
    }
    let _echo = Server::echo(&tb, &server.place(), &[server.addr4(7000)])?;
    let _iperf = Iperf::start(&tb, &server.place())?;

    let log = |s: &str| {
        if !as_json {
            eprintln!("{s}");
        }
    };
    log("direct (no tunnel):");
    let direct = measure(&tb, &client.place(), server.addr4(0), opts, &log)?;

    // ZTB_WORKER_THREADS overrides the tunnels' default (half the cores).
    let config = |node, pod| {
        let mut c = tb.tunnel_config(node, &[pod]);
        if let Some(threads) = std::env::var("ZTB_WORKER_THREADS").ok().and_then(|t| t.parse::<usize>().ok())
        {
            c["proxy"]["worker_threads"] = json!(threads);
        }
        c
    };
    let tunnels = [tb.start_tunnel(&n1, config(&n1, &client))?, tb.start_tunnel(&n2, config(&n2, &server))?];
    let cpu_before: f64 = tunnels.iter().map(cpu_seconds).sum();
    log("through the tunnels (capture + HBONE/mTLS):");
    let tunnel = measure(&tb, &client.place(), server.addr4(0), opts, &log)?;
    let cpu = tunnels.iter().map(cpu_seconds).sum::<f64>() - cpu_before;
    let rss = tunnels.iter().map(peak_rss_mib).fold(0.0, f64::max);
    // Every measured connection went through the tunnels. (The log is
    // buffered: a short run's lines, e.g. `--only throughput`, need a flush;
    // and a connection's line is written once the tunnel has seen it close,
    // which can come after the flush's own marker.)
    tunnels[0].flush_access_log()?;
    let carried = tunnels[0]
        .wait_access_log(1, Duration::from_secs(10), |e| e["mode"] == "hbone" && e["reason"] == "ok")
        .map_err(|e| {
            anyhow::anyhow!(
                "no connection went through the tunnels: the tunnel figures would be direct ones\n{e}"
            )
        })?
        .len();

    let ratio = |t: f64, d: f64| if d > 0.0 { t / d } else { 0.0 };
    let report = json!({
        "throughput_gbps_direct": round(direct.throughput_gbps),
        "throughput_gbps_tunnel": round(tunnel.throughput_gbps),
        "throughput_ratio": round(ratio(tunnel.throughput_gbps, direct.throughput_gbps)),
        "rr_per_s_direct": round(direct.rr_per_s),
        "rr_per_s_tunnel": round(tunnel.rr_per_s),
        "rr_p50_us_direct": round(direct.rr_p50_us),
        "rr_p50_us_tunnel": round(tunnel.rr_p50_us),
        "rr_p99_us_direct": round(direct.rr_p99_us),
        "rr_p99_us_tunnel": round(tunnel.rr_p99_us),
        "rr_p50_added_us": round(tunnel.rr_p50_us - direct.rr_p50_us),
        "crr_c1_per_s_direct": round(direct.crr_c1_per_s),
        "crr_c1_per_s_tunnel": round(tunnel.crr_c1_per_s),
        "crr_c1_ratio": round(ratio(tunnel.crr_c1_per_s, direct.crr_c1_per_s)),
        "crr_c1_p50_us_direct": round(direct.crr_c1_p50_us),
        "crr_c1_p50_us_tunnel": round(tunnel.crr_c1_p50_us),
        "crr_c8_per_s_direct": round(direct.crr_c8_per_s),
        "crr_c8_per_s_tunnel": round(tunnel.crr_c8_per_s),
        "crr_c8_ratio": round(ratio(tunnel.crr_c8_per_s, direct.crr_c8_per_s)),
        "tunnel_cpu_s": round(cpu),
        "tunnel_peak_rss_mib": round(rss),
        "tunnel_connections_carried": carried,
    });
    if as_json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn measure(
    tb: &Testbed,
    client: &Place,
    server: SocketAddr,
    opts: &Options,
    log: &dyn Fn(&str),
) -> anyhow::Result<Figures> {
    let ip = server.ip();
    let mut f = Figures::default();
    let wanted = |what: &str| opts.only.as_deref().is_none_or(|o| o == what);
    let seconds = opts.seconds;
    if wanted("throughput") {
        let out = tb
            .command(client, "iperf3")?
            .args(["-c", &ip.to_string(), "-p", "5201", "-t", &seconds.to_string(), "-J"])
            .output()
            .context("iperf3")?;
        let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 output")?;
        f.throughput_gbps =
            v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 result")? / 1e9;
        log(&format!("  throughput {:.2} Gbit/s", f.throughput_gbps));
    }

    let echo = SocketAddr::new(ip, 7000).to_string();
    if wanted("rr") {
        let rr =
            agent_json(tb, client, &["rr", "--to", &echo, "--duration-ms", &(seconds * 1000).to_string()])?;
        f.rr_per_s = rr["per_s"].as_f64().unwrap_or(0.0);
        f.rr_p50_us = rr["p50_us"].as_f64().unwrap_or(0.0);
        f.rr_p99_us = rr["p99_us"].as_f64().unwrap_or(0.0);
        log(&format!(
            "  request/response {:.0}/s p50 {:.1} us p99 {:.1} us",
            f.rr_per_s, f.rr_p50_us, f.rr_p99_us
        ));
    }

    for c in [1usize, 8] {
        if !wanted("crr") {
            break;
        }
        let crr = agent_json(
            tb,
            client,
            &[
                "crr",
                "--to",
                &echo,
                "--duration-ms",
                &(seconds * 1000).to_string(),
                "--concurrency",
                &c.to_string(),
            ],
        )?;
        if crr["errors"].as_u64().unwrap_or(0) > 0 {
            bail!("connect+request+close at concurrency {c} had errors: {crr}");
        }
        let rate = crr["per_s"].as_f64().unwrap_or(0.0);
        if c == 1 {
            f.crr_c1_per_s = rate;
            f.crr_c1_p50_us = crr["p50_us"].as_f64().unwrap_or(0.0);
        } else {
            f.crr_c8_per_s = rate;
        }
        log(&format!("  connect+request+close, concurrency {c}: {rate:.0}/s"));
        // Let closed connections leave TIME_WAIT's way between runs.
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(f)
}

fn agent_json(tb: &Testbed, place: &Place, args: &[&str]) -> anyhow::Result<Value> {
    let out = tb.agent(place)?.args(args).output().context("tb-agent")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("tb-agent {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// utime + stime of a tunnel process.
fn cpu_seconds(t: &Tunnel) -> f64 {
    let Some(pid) = t.pid() else { return 0.0 };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" that ends the command name: state is field 3;
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    (ticks(11) + ticks(12)) / hz
}

fn peak_rss_mib(t: &Tunnel) -> f64 {
    let Some(pid) = t.pid() else { return 0.0 };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn print_table(r: &Value) {
    let g = |k: &str| r[k].as_f64().unwrap_or(0.0);
    println!();
    println!("{:<46} {:>12} {:>12} {:>10}", "", "direct", "tunnel", "ratio");
    println!(
        "{:<46} {:>12.2} {:>12.2} {:>10.2}",
        "bulk throughput, one connection (Gbit/s)",
        g("throughput_gbps_direct"),
        g("throughput_gbps_tunnel"),
        g("throughput_ratio")
    );
    println!(
        "{:<46} {:>12.0} {:>12.0} {:>10.2}",
        "64 B request/response rate (/s)",
        g("rr_per_s_direct"),
        g("rr_per_s_tunnel"),
        g("rr_per_s_tunnel") / g("rr_per_s_direct").max(1.0)
    );
    println!(
        "{:<46} {:>12.1} {:>12.1} {:>10}",
        "64 B request/response p50 (us)",
        g("rr_p50_us_direct"),
        g("rr_p50_us_tunnel"),
        format!("+{:.1}", g("rr_p50_added_us"))
    );
    println!(
        "{:<46} {:>12.1} {:>12.1}",
        "64 B request/response p99 (us)",
        g("rr_p99_us_direct"),
        g("rr_p99_us_tunnel")
    );
    println!(
        "{:<46} {:>12.0} {:>12.0} {:>10.2}",
        "connect+request+close, concurrency 1 (/s)",
        g("crr_c1_per_s_direct"),
        g("crr_c1_per_s_tunnel"),
        g("crr_c1_ratio")
    );
    println!(
        "{:<46} {:>12.0} {:>12.0} {:>10.2}",
        "connect+request+close, concurrency 8 (/s)",
        g("crr_c8_per_s_direct"),
        g("crr_c8_per_s_tunnel"),
        g("crr_c8_ratio")
    );
    println!("{:<46} {:>12} {:>12.2}", "tunnels' CPU during the tunnel phase (s)", "", g("tunnel_cpu_s"));
    println!("{:<46} {:>12} {:>12.1}", "tunnel peak RSS (MiB)", "", g("tunnel_peak_rss_mib"));
}

/// iperf3's server in a place, stopped when dropped.
struct Iperf(std::process::Child);

impl Iperf {
    fn start(tb: &Testbed, place: &Place) -> anyhow::Result<Self> {
        let child = tb
            .command(place, "iperf3")?
            .args(["-s", "-p", "5201"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("iperf3 -s")?;
        let server = Self(child);
        // Measure only once it listens (it takes a moment to bind).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &place.netns, "ss", "-Htln", "( sport = :5201 )"])
                .output()
                .context("ss")?;
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return Ok(server);
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "iperf3 -s is not listening after 5 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Iperf {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
