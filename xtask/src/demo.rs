//! `cargo xtask demo`: two simulated nodes with a few workloads, a tunnel per
//! node with real eBPF capture, and real clients (curl) calling small HTTP
//! servers. Prints who called whom and how, with the access log lines, and
//! fails if anything it expects did not happen. Everything is removed at the
//! end, also on failure.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::Value;
use ztunnel_testbed::{Place, Testbed, Tunnel, agent::Server};

struct Call<'a> {
    what: &'a str,
    from: Place,
    to: SocketAddr,
    /// Which tunnel must log the call, as (tunnel index, source workload;
    /// empty for an inbound call). None: no tunnel may capture it outbound.
    captured_by: Option<(usize, String)>,
}

pub fn run() -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the demo needs root: it attaches eBPF programs and makes network namespaces");
    }
    let mut tb = Testbed::new("demo")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let backup = tb.add_host_workload(&n1, "backup")?;
    let db = tb.add_pod(&n2, "db")?;
    println!("testbed {}", tb.id);
    for n in [&n1, &n2] {
        println!("  node {} {} {}", n.name, n.ip4, n.ip6);
    }
    for w in [&web, &backup, &db] {
        let kind = if w.pod_netns.is_some() { "pod" } else { "plain-host workload" };
        println!("  {kind} {} on {} at {} as {}", w.name, w.node, w.ip4, w.identity());
    }

    let _db_http = Server::http(&tb, &db.place(), &[db.addr4(8080), db.addr6(8080)], "db")?;
    let _web_http = Server::http(&tb, &web.place(), &[web.addr4(8080)], "web")?;
    let tunnels = [
        tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web, &backup]))?,
        tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?,
    ];
    println!("tunnels ready on n1 and n2 (capture attached to their cgroup subtrees)\n");

    let calls = [
        Call {
            what: "pod web -> pod db (another node)",
            from: web.place(),
            to: db.addr4(8080),
            captured_by: Some((0, web.key())),
        },
        Call {
            what: "pod web -> pod db over IPv6",
            from: web.place(),
            to: db.addr6(8080),
            captured_by: Some((0, web.key())),
        },
        Call {
            what: "plain-host workload backup -> pod db",
            from: backup.place(),
            to: db.addr4(8080),
            captured_by: Some((0, backup.key())),
        },
        Call {
            what: "container of pod web -> pod db",
            from: web.child("app")?,
            to: db.addr4(8080),
            captured_by: Some((0, web.key())),
        },
        Call {
            what: "process outside any workload on n1 -> pod db",
            from: n1.unenrolled(),
            to: db.addr4(8080),
            captured_by: None,
        },
        Call {
            what: "outside caller on n2 -> pod web (inbound steering)",
            from: n2.unenrolled(),
            to: web.addr4(8080),
            captured_by: Some((0, String::new())),
        },
    ];
    let mut failures = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        let seen_before: Vec<usize> = tunnels.iter().map(|t| t.access_log().len()).collect();
        let body = curl(&tb, &call.from, call.to)?;
        println!(
            "[{}] {}\n    curl http://{}/ -> {}",
            i + 1,
            call.what,
            call.to,
            body.as_deref().unwrap_or("FAILED")
        );
        std::thread::sleep(Duration::from_millis(150));
        let mut logged = Vec::new();
        for (t, tunnel) in tunnels.iter().enumerate() {
            for line in tunnel.access_log().into_iter().skip(seen_before[t]) {
                println!("    {} access log: {}", tunnel.node.name, summarize(&line));
                logged.push((t, line));
            }
        }
        if body.is_none() {
            failures.push(format!("[{}] {}: the call failed", i + 1, call.what));
        }
        match &call.captured_by {
            None if logged.iter().any(|(_, l)| l["direction"] == "outbound") => {
                failures.push(format!("[{}] {}: captured, but must not be", i + 1, call.what));
            }
            None => println!("    not captured on its way out: the caller belongs to no enrolled workload"),
            Some((t, source)) => {
                let found = logged.iter().any(|(lt, l)| {
                    lt == t && (source.is_empty() || l["source_workload"] == *source) && l["reason"] == "ok"
                });
                if !found {
                    failures.push(format!(
                        "[{}] {}: no access log line on {}",
                        i + 1,
                        call.what,
                        tunnels[*t].node.name
                    ));
                }
            }
        }
        println!();
    }
    print_capture_counters(&tunnels)?;
    if failures.is_empty() {
        println!("demo: all {} calls behaved as expected", calls.len());
        Ok(())
    } else {
        bail!("demo: {} unexpected:\n  {}", failures.len(), failures.join("\n  "))
    }
}

/// curl inside `from`; the response body, or None when the call failed.
fn curl(tb: &Testbed, from: &Place, to: SocketAddr) -> anyhow::Result<Option<String>> {
    let out = tb
        .command(from, "curl")?
        .args(["-sS", "--max-time", "5", &format!("http://{to}/")])
        .output()
        .context("run curl")?;
    Ok(out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

fn summarize(l: &Value) -> String {
    let s = |k: &str| l[k].as_str().unwrap_or("-").to_owned();
    format!(
        "{} {} {} -> {} ({}) {} {} sent={} received={}",
        s("direction"),
        s("mode"),
        if l["source_workload"].is_string() { s("source_workload") } else { s("source_address") },
        s("destination_address"),
        s("destination_workload"),
        s("decision"),
        s("reason"),
        l["bytes_sent"],
        l["bytes_received"],
    )
}

fn print_capture_counters(tunnels: &[Tunnel]) -> anyhow::Result<()> {
    for t in tunnels {
        let dump = t.config_dump()?;
        println!("{} capture counters: {}", t.node.name, dump["capture_counters"]);
    }
    Ok(())
}
