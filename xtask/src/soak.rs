//! `cargo xtask soak [--minutes N]`: the tunnels under minutes of mixed
//! traffic from several pods, with configuration reloads every 30 s,
//! certificates of 60 s (so renewals all along) and a CA outage of 40 s in
//! the middle. Every 15 s it prints each tunnel's RSS, open descriptors
//! and threads; at the end, the traffic's failures and whether those
//! figures came back flat (the last sample against the first one taken
//! after the warm-up). Not in CI's default run: it takes minutes.
//!
//! Release binaries. Fails when a connection failed, or when descriptors
//! or memory kept growing.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use ztunnel_testbed::{
    Node, Testbed, Tunnel, Workload,
    agent::{Server, Steady},
    ca::CaServer,
};

/// Samples of one tunnel: (seconds since start, RSS KiB, fds, threads).
type Samples = Vec<(u64, u64, usize, u64)>;

pub fn run(minutes: u64) -> anyhow::Result<()> {
    if !crate::root::is_root() {
        bail!("the soak test needs root: it attaches eBPF programs and makes network namespaces");
    }
    let release = crate::target_dir()?.join(crate::Profile::Release.dir_name());
    // SAFETY: single-threaded at this point; the testbed reads these later.
    unsafe {
        std::env::set_var("ZTUNNEL_BIN", release.join("ztunnel"));
        std::env::set_var("TB_AGENT_BIN", release.join("tb-agent"));
        std::env::set_var("ZTB_TUNNEL_LOG", "warn");
    }
    let total = Duration::from_secs(minutes.max(2) * 60);
    let mut tb = Testbed::new("soak")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let clients: Vec<Workload> =
        (1..=3).map(|i| tb.add_pod(&n1, &format!("web{i}"))).collect::<Result<_, _>>()?;
    let db = tb.add_pod(&n2, "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432), db.addr4(6432)])?;
    let mut ca = tb.start_ca(&n1, &["--max-lifetime", "60s"])?;
    let config = |ca: &CaServer, node: &Node, ws: &[&Workload], generation: u32| -> anyhow::Result<Value> {
        let mut c = tb.tunnel_config(node, ws);
        tb.use_remote_ca(&mut c, ca, node)?;
        c["identity"]["cert_lifetime"] = json!("60s");
        c["identity"]["retry_initial"] = json!("500ms");
        c["identity"]["retry_max"] = json!("5s");
        // A reload that changes something real: a policy's name.
        c["policies"] = json!([{
            "name": format!("soak-{generation}"), "namespace": "default",
            "action": "ALLOW",
            "rules": [{"to": [{"operation": {"ports": ["5432", "6432"]}}]}],
        }]);
        Ok(c)
    };
    let refs: Vec<&Workload> = clients.iter().collect();
    let mut t1 = tb.start_tunnel(&n1, config(&ca, &n1, &refs, 0)?)?;
    let mut t2 = tb.start_tunnel(&n2, config(&ca, &n2, &[&db], 0)?)?;

    // Mixed traffic: short connections at different rates and ports.
    let mut steady = Vec::new();
    for (i, w) in clients.iter().enumerate() {
        let port = if i % 2 == 0 { 5432 } else { 6432 };
        let interval = Duration::from_millis(50 * (i as u64 + 1));
        steady.push(Steady::start(&tb, &w.place(), SocketAddr::from((db.ip4, port)), interval, total * 2)?);
    }

    eprintln!(
        "soak: {} minutes; samples every 15 s (RSS MiB / fds / threads, n1 then n2)",
        total.as_secs() / 60
    );
    let started = Instant::now();
    let warmup = Duration::from_secs(30);
    let outage_at = total / 2;
    let mut ca_down: Option<Instant> = None;
    let mut outages = 0;
    let mut generation = 0;
    let mut next_reload = Duration::from_secs(30);
    let mut next_sample = Duration::ZERO;
    let (mut s1, mut s2): (Samples, Samples) = (Vec::new(), Vec::new());
    while started.elapsed() < total {
        let now = started.elapsed();
        if now >= next_sample {
            next_sample += Duration::from_secs(15);
            let a = sample(&t1, now)?;
            let b = sample(&t2, now)?;
            eprintln!(
                "  {:>4}s  n1 {:>6.1} MiB {:>4} fds {:>3} threads   n2 {:>6.1} MiB {:>4} fds {:>3} threads{}",
                now.as_secs(),
                a.1 as f64 / 1024.0,
                a.2,
                a.3,
                b.1 as f64 / 1024.0,
                b.2,
                b.3,
                if ca_down.is_some() { "   (CA down)" } else { "" }
            );
            if now >= warmup {
                s1.push(a);
                s2.push(b);
            }
        }
        if now >= next_reload {
            next_reload += Duration::from_secs(30);
            generation += 1;
            t1.reload(&config(&ca, &n1, &refs, generation)?).context("reload n1")?;
            t2.reload(&config(&ca, &n2, &[&db], generation)?).context("reload n2")?;
        }
        if ca_down.is_none() && outages == 0 && now >= outage_at {
            ca.stop();
            ca_down = Some(Instant::now());
            outages += 1;
        }
        if ca_down.is_some_and(|t| t.elapsed() >= Duration::from_secs(40)) {
            ca.start_again(&tb)?;
            ca_down = None;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if ca_down.is_some() {
        ca.start_again(&tb)?;
    }
    let mut failures = 0;
    for (w, s) in clients.iter().zip(steady) {
        let report = s.stop()?;
        let failed = report["failures"].as_array().map_or(0, Vec::len);
        failures += failed;
        eprintln!(
            "soak: {}: {} connections, {} failed",
            w.name,
            report["attempts"].as_u64().unwrap_or(0),
            failed
        );
    }
    eprintln!("soak: {generation} reloads per tunnel, {outages} CA outage of 40 s, certificates of 60 s");
    let mut grew = Vec::new();
    for (name, s) in [("n1", &s1), ("n2", &s2)] {
        let (Some(first), Some(last)) = (s.first(), s.last()) else { continue };
        eprintln!(
            "soak: {name}: RSS {:.1} -> {:.1} MiB, fds {} -> {}, threads {} -> {} (after the warm-up -> at the end)",
            first.1 as f64 / 1024.0,
            last.1 as f64 / 1024.0,
            first.2,
            last.2,
            first.3,
            last.3
        );
        // Flat: a few descriptors either way (pooled connections come and
        // go) and memory within a quarter of where it settled.
        if last.2 > first.2 + 16 {
            grew.push(format!("{name}: descriptors {} -> {}", first.2, last.2));
        }
        if last.1 as f64 > first.1 as f64 * 1.25 + 4096.0 {
            grew.push(format!("{name}: RSS {} -> {} KiB", first.1, last.1));
        }
    }
    t1.stop()?;
    t2.stop()?;
    if failures > 0 {
        bail!("{failures} connections failed during the soak");
    }
    if !grew.is_empty() {
        bail!("not flat at the end: {}", grew.join("; "));
    }
    eprintln!("soak: no connection failed; descriptors and memory flat");
    Ok(())
}

fn sample(t: &Tunnel, at: Duration) -> anyhow::Result<(u64, u64, usize, u64)> {
    let pid = t.pid().context("tunnel not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok((at.as_secs(), t.rss_kib()?, t.open_fds()?, threads))
}
