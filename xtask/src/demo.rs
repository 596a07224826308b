//! `cargo xtask demo`: two simulated nodes with a few workloads, a tunnel per
//! node with real eBPF capture and an embedded CA, and real clients (curl)
//! calling small HTTP servers. Prints who called whom, under which
//! identities, encrypted or not, with the access log lines of both tunnels,
//! ends with `ztunnel explain` of its denied call, and fails if anything it
//! expects did not happen. Everything is removed at
//! the end, also on failure.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use ztunnel_testbed::{Place, Testbed, Tunnel, agent::Server};

/// What one call must produce.
struct Call<'a> {
    what: &'a str,
    from: Place,
    to: SocketAddr,
    /// Whether curl gets an answer.
    answered: bool,
    /// The line the caller's tunnel (index) logs for the captured connection:
    /// source workload and mode. None: the caller is not captured at all.
    outbound: Option<(usize, String, &'a str)>,
    /// The line the callee's tunnel logs: mode and reason.
    inbound: (usize, &'a str, &'a str),
}

pub fn run() -> anyhow::Result<()> {
    if !crate::root::is_root() {
        bail!("the demo needs root: it attaches eBPF programs and makes network namespaces");
    }
    let mut tb = Testbed::new("demo")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod_in(&n1, "shop", "web")?;
    let batch = tb.add_pod_in(&n1, "ops", "batch")?;
    let backup = tb.add_host_workload(&n1, "backup")?;
    let db = tb.add_pod_in(&n2, "shop", "db")?;
    println!("testbed {}", tb.id);
    for n in [&n1, &n2] {
        println!("  node {} {} {}", n.name, n.ip4, n.ip6);
    }
    for w in [&web, &batch, &backup, &db] {
        let kind = if w.pod_netns.is_some() { "pod" } else { "plain-host workload" };
        println!("  {kind} {} on {} at {} as {}", w.key(), w.node, w.ip4, w.identity());
    }

    let _db_http = Server::http(&tb, &db.place(), &[db.addr4(8080), db.addr6(8080)], "db")?;
    let _web_http = Server::http(&tb, &web.place(), &[web.addr4(8080)], "web")?;
    // On n2: db is strict (mTLS only), and only web and backup may call it.
    let mut c2 = tb.tunnel_config(&n2, &[&db]);
    c2["namespaces"] = json!({"shop": {"mtls": "strict"}});
    c2["policies"] = json!([{
        "name": "db-callers", "namespace": "shop",
        "selector": {"matchLabels": {"app": "db"}},
        "action": "ALLOW",
        "rules": [{
            "from": [{"source": {"principals": [principal(&web.identity()), principal(&backup.identity())]}}],
            "to": [{"operation": {"ports": ["8080"]}}],
        }],
    }]);
    let tunnels =
        [tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web, &batch, &backup]))?, tb.start_tunnel(&n2, c2)?];
    println!("tunnels ready on n1 and n2 (capture attached to their cgroup subtrees, certificates issued)");
    println!("n2: namespace shop is strict; policy shop/db-callers lets only web and backup call db:8080\n");

    let calls = [
        Call {
            what: "pod web -> pod db (another node)",
            from: web.place(),
            to: db.addr4(8080),
            answered: true,
            outbound: Some((0, web.key(), "hbone")),
            inbound: (1, "hbone", "ok"),
        },
        Call {
            what: "pod web -> pod db over IPv6",
            from: web.place(),
            to: db.addr6(8080),
            answered: true,
            outbound: Some((0, web.key(), "hbone")),
            inbound: (1, "hbone", "ok"),
        },
        Call {
            what: "plain-host workload backup -> pod db",
            from: backup.place(),
            to: db.addr4(8080),
            answered: true,
            outbound: Some((0, backup.key(), "hbone")),
            inbound: (1, "hbone", "ok"),
        },
        Call {
            what: "container of pod web -> pod db",
            from: web.child("app")?,
            to: db.addr4(8080),
            answered: true,
            outbound: Some((0, web.key(), "hbone")),
            inbound: (1, "hbone", "ok"),
        },
        Call {
            what: "pod batch (namespace ops) -> pod db: no policy allows it",
            from: batch.place(),
            to: db.addr4(8080),
            answered: false,
            outbound: Some((0, batch.key(), "hbone")),
            inbound: (1, "hbone", "no_allow_matched"),
        },
        Call {
            what: "process outside any workload on n1 -> pod db: plaintext, and db is strict",
            from: n1.unenrolled(),
            to: db.addr4(8080),
            answered: false,
            outbound: None,
            inbound: (1, "plaintext", "plaintext_refused"),
        },
        Call {
            what: "process outside any workload on n2 -> pod web: plaintext, web is permissive",
            from: n2.unenrolled(),
            to: web.addr4(8080),
            answered: true,
            outbound: None,
            inbound: (0, "plaintext", "ok"),
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
            body.as_deref().unwrap_or("no answer (connection reset)")
        );
        let new_lines =
            |t: usize| -> Vec<Value> { tunnels[t].access_log().into_iter().skip(seen_before[t]).collect() };
        let outbound_ok = |l: &Value, source: &str, mode: &str| {
            l["direction"] == "outbound" && l["source_workload"] == source && l["mode"] == mode
        };
        let (it, imode, ireason) = call.inbound;
        let inbound_ok =
            |l: &Value| l["direction"] == "inbound" && l["mode"] == imode && l["reason"] == ireason;
        // Lines are written when a connection ends: wait for them.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let outbound_seen = match &call.outbound {
                Some((t, source, mode)) => new_lines(*t).iter().any(|l| outbound_ok(l, source, mode)),
                None => true,
            };
            if (outbound_seen && new_lines(it).iter().any(inbound_ok)) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for (t, tunnel) in tunnels.iter().enumerate() {
            for line in new_lines(t) {
                println!("    {} {}", tunnel.node.name, summarize(&line));
            }
        }
        let mut fail = |why: String| failures.push(format!("[{}] {}: {why}", i + 1, call.what));
        if body.is_some() != call.answered {
            fail(if call.answered { "the call failed".into() } else { "the call got through".into() });
        }
        match &call.outbound {
            Some((t, source, mode)) if !new_lines(*t).iter().any(|l| outbound_ok(l, source, mode)) => {
                fail(format!("no {mode} line from {source} on {}", tunnels[*t].node.name));
            }
            None if tunnels
                .iter()
                .enumerate()
                .any(|(t, _)| new_lines(t).iter().any(|l| l["direction"] == "outbound")) =>
            {
                fail("captured on its way out, but the caller is in no enrolled workload".into());
            }
            None => println!("    not captured on its way out: the caller belongs to no enrolled workload"),
            Some(_) => {}
        }
        if !new_lines(it).iter().any(inbound_ok) {
            fail(format!("no inbound {imode} line with reason {ireason} on {}", tunnels[it].node.name));
        }
        println!();
    }
    print_counters(&tunnels)?;
    explain_denied(&tb, &tunnels[1], &batch.key(), db.addr4(8080), &mut failures)?;
    if failures.is_empty() {
        println!("demo: all {} calls behaved as expected", calls.len());
        Ok(())
    } else {
        bail!("demo: {} unexpected:\n  {}", failures.len(), failures.join("\n  "))
    }
}

/// `ztunnel explain` of the denied call [5], asked of the callee's node
/// (whose policy decides), printed as an operator would read it.
fn explain_denied(
    tb: &Testbed,
    callee: &Tunnel,
    from: &str,
    to: SocketAddr,
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    println!("\n$ ztunnel explain --from {from} --to {to}    # on {}", callee.node.name);
    let (code, text) = callee.explain(tb, from, &to.to_string(), false)?;
    for line in text.lines() {
        if line.is_empty() { println!() } else { println!("  {line}") }
    }
    println!("  (exit {code})\n");
    if code != 1 || !text.starts_with("FAILS: denied") {
        failures.push(format!("ztunnel explain did not name the denial of {from} -> {to} (exit {code})"));
    }
    Ok(())
}

/// Istio's principal form of a SPIFFE ID.
fn principal(id: &str) -> String {
    id.trim_start_matches("spiffe://").to_owned()
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

/// One access log line as `direction security: source -> destination (identity) decision reason`.
pub(crate) fn summarize(l: &Value) -> String {
    let s = |k: &str| l[k].as_str().unwrap_or("-").to_owned();
    let security = if l["connection_security_policy"] == "mutual_tls" { "mTLS" } else { "plaintext" };
    let mut out = format!(
        "{} {security}: {} -> {} ({}) {} {}",
        s("direction"),
        if l["source_identity"].is_string() { s("source_identity") } else { s("source_address") },
        s("destination_address"),
        s("destination_identity"),
        s("decision"),
        s("reason"),
    );
    if let Some(p) = l["policy"].as_str() {
        out.push_str(&format!(" by {p}"));
    }
    out.push_str(&format!(" sent={} received={}", l["bytes_sent"], l["bytes_received"]));
    out
}

fn print_counters(tunnels: &[Tunnel]) -> anyhow::Result<()> {
    for t in tunnels {
        let dump = t.config_dump()?;
        println!("{} capture counters: {}", t.node.name, dump["capture_counters"]);
        let metrics = t.metrics()?;
        for line in metrics.lines().filter(|l| l.starts_with("ztunnel_policy_decisions_total")) {
            println!("{} {line}", t.node.name);
        }
    }
    Ok(())
}
