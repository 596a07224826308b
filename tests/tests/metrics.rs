//! What an operator scrapes from a running tunnel at :15020/metrics, read
//! while a long connection carries traffic between two nodes and after it
//! ended: Istio's TCP series are live (opened at once, bytes growing while
//! the connection runs, closed with the same labels), carry Istio's whole
//! L4 label set, and the exposition passes `promtool check metrics`.
//!
//! `promtool` comes from Debian's `prometheus` package (`cargo xtask setup`
//! installs it); without it the test fails, it never skips.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use serde_json::json;
use ztunnel_testbed::{
    Testbed, Workload,
    agent::{Held, Server},
    tunnel::Tunnel,
};
use ztunnel_tests::{EXPORTED_SERIES, WAIT, field, wait_until};

/// Istio's labels on `istio_tcp_*` (its ztunnel's `CommonTrafficLabels`).
const ISTIO_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";
const SENT: &str = "istio_tcp_sent_bytes_total";

type Labels = BTreeMap<String, String>;

/// One sample of a text exposition: name, labels, value.
fn samples(text: &str) -> Vec<(String, Labels, f64)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or((line, "nan"));
        let value = value.parse().unwrap_or(f64::NAN);
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
            None => (series, Labels::new()),
        };
        out.push((name.to_owned(), labels, value));
    }
    out
}

/// `a="x",b="y"` (values here hold no quotes or commas).
fn parse_labels(text: &str) -> Labels {
    text.split("\",")
        .filter_map(|pair| pair.split_once("=\""))
        .map(|(k, v)| (k.to_owned(), v.trim_end_matches('"').to_owned()))
        .collect()
}

/// The series of `name` whose labels include `want`.
fn find(text: &str, name: &str, want: &[(&str, &str)]) -> Vec<(Labels, f64)> {
    samples(text)
        .into_iter()
        .filter(|(n, l, _)| n == name && want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, l, v)| (l, v))
        .collect()
}

/// The one series of `name` with `want` (0 when absent); more than one is
/// an error: the label sets of a connection's four series must agree.
fn value(text: &str, name: &str, want: &[(&str, &str)]) -> anyhow::Result<u64> {
    let found = find(text, name, want);
    anyhow::ensure!(found.len() <= 1, "{name} {want:?}: {} series, expected one:\n{found:?}", found.len());
    Ok(found.first().map_or(0, |(_, v)| *v as u64))
}

/// A plain gauge (no labels).
fn gauge(text: &str, name: &str) -> Option<f64> {
    samples(text).into_iter().find(|(n, l, _)| n == name && l.is_empty()).map(|(_, _, v)| v)
}

fn promtool() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("promtool")).find(|p| p.is_file()).ok_or_else(|| {
        anyhow::anyhow!(
            "promtool is not on PATH: install Debian's `prometheus` package (`cargo xtask setup` does); \
             this test checks the exposition with it and does not skip without it"
        )
    })
}

/// `promtool check metrics` over a scrape, with its complaints on failure.
fn promtool_check(promtool: &PathBuf, text: &str) -> anyhow::Result<()> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().ok_or_else(|| anyhow::anyhow!("no stdin"))?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\nscrape:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The labels one side's tunnel gives the web -> db connection.
fn expected(reporter: &str, web: &Workload, db: &Workload) -> Vec<(&'static str, String)> {
    vec![
        ("reporter", reporter.to_owned()),
        ("source_workload", web.name.clone()),
        ("source_workload_namespace", web.namespace.clone()),
        ("source_principal", web.identity()),
        // The testbed labels pods `app: <name>`; no version label: Istio's `latest`.
        ("source_app", web.name.clone()),
        ("source_canonical_service", web.name.clone()),
        ("source_version", "latest".to_owned()),
        ("source_canonical_revision", "latest".to_owned()),
        ("source_cluster", "Kubernetes".to_owned()),
        ("destination_workload", db.name.clone()),
        ("destination_workload_namespace", db.namespace.clone()),
        ("destination_principal", db.identity()),
        ("destination_app", db.name.clone()),
        ("destination_canonical_service", db.name.clone()),
        ("destination_version", "latest".to_owned()),
        ("destination_canonical_revision", "latest".to_owned()),
        ("destination_cluster", "Kubernetes".to_owned()),
        // Dialled at the pod's address, not through a Service.
        ("destination_service", "unknown".to_owned()),
        ("destination_service_name", "unknown".to_owned()),
        ("destination_service_namespace", "unknown".to_owned()),
        ("request_protocol", "tcp".to_owned()),
        ("response_flags", "-".to_owned()),
        ("connection_security_policy", "mutual_tls".to_owned()),
    ]
}

fn selector(reporter: &str) -> Vec<(&'static str, &'static str)> {
    match reporter {
        "source" => vec![("reporter", "source"), ("destination_workload", "db")],
        _ => vec![("reporter", "destination"), ("source_workload", "web")],
    }
}

/// (opened, closed, received, sent) of the web -> db series on `t`.
fn counts(t: &Tunnel, reporter: &str) -> anyhow::Result<[u64; 4]> {
    let text = t.metrics()?;
    let s = selector(reporter);
    Ok([
        value(&text, OPENED, &s)?,
        value(&text, CLOSED, &s)?,
        value(&text, RECEIVED, &s)?,
        value(&text, SENT, &s)?,
    ])
}

#[test]
fn istio_tcp_metrics_are_live_during_a_long_connection_and_complete_after_it() -> anyhow::Result<()> {
    let promtool = promtool()?;
    let mut tb = Testbed::new("metrics")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let mut c1 = tb.tunnel_config(&n1, &[&web]);
    // Periodic access log lines every second, so a test-length connection
    // gets some.
    c1["access_log"] = json!({ "target": c1["access_log"].clone(), "interval": "1s" });
    let t1 = tb.start_tunnel(&n1, c1)?;
    let t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;
    let sides = [("source", &t1), ("destination", &t2)];

    let mut held = Held::open(&tb, &web.place(), db.addr4(5432))?;
    held.ping("first")?;

    // Opened is counted while the connection is still open, on both sides,
    // with Istio's whole label set; closed is not (yet: the same series
    // counts it once the connection ends, below).
    for (reporter, t) in sides {
        wait_until(
            WAIT,
            &format!("{reporter}: {OPENED} counts the open connection"),
            || Ok(counts(t, reporter)?[0] == 1),
            || t.metrics().unwrap_or_default(),
        )?;
        let text = t.metrics()?;
        let [(labels, _)] = &find(&text, OPENED, &selector(reporter))[..] else {
            anyhow::bail!("{reporter}: not one {OPENED} series:\n{text}");
        };
        let missing: Vec<&&str> = ISTIO_LABELS.iter().filter(|l| !labels.contains_key(**l)).collect();
        assert!(missing.is_empty(), "{reporter}: labels missing {missing:?} in {labels:?}");
        for (k, v) in expected(reporter, &web, &db) {
            assert_eq!(labels.get(k), Some(&v), "{reporter}: label {k} in {labels:?}");
        }
        assert_eq!(counts(t, reporter)?[1], 0, "{reporter}: closed counted while the connection is open");
    }

    // Bytes grow while the connection runs: each ping is carried both ways,
    // and the shared counters are flushed at least every 5 s.
    let line = "x".repeat(1000);
    let mut first_seen = [[0u64; 2]; 2];
    for (i, (reporter, t)) in sides.iter().enumerate() {
        wait_until(
            WAIT,
            &format!("{reporter}: bytes counted while the connection is open"),
            || {
                held.ping(&line)?;
                let c = counts(t, reporter)?;
                first_seen[i] = [c[2], c[3]];
                Ok(c[2] > 0 && c[3] > 0)
            },
            || t.metrics().unwrap_or_default(),
        )?;
    }
    for (i, (reporter, t)) in sides.iter().enumerate() {
        let before = first_seen[i];
        wait_until(
            WAIT,
            &format!("{reporter}: received and sent bytes grow past {before:?} while the connection is open"),
            || {
                held.ping(&line)?;
                let c = counts(t, reporter)?;
                Ok(c[2] > before[0] && c[3] > before[1])
            },
            || t.metrics().unwrap_or_default(),
        )?;
        assert_eq!(counts(t, reporter)?[..2], [1, 0], "{reporter}: the connection is still open");
    }

    // The tunnel's own series, during the transfer.
    let during = t1.metrics()?;
    promtool_check(&promtool, &during)?;
    // Everything the alert rules and the dashboard may query is exported.
    // A labelled family shows once it has a series: the caller's tunnel has
    // a refused handshake once flush_access_log's marker was refused, the
    // callee's a policy decision for this connection.
    t1.flush_access_log()?;
    let both = format!("{}{}", t1.metrics()?, t2.metrics()?);
    let missing: Vec<&&str> =
        EXPORTED_SERIES.iter().filter(|n| !both.contains(&format!("# TYPE {n} "))).collect();
    assert!(missing.is_empty(), "not exported: {missing:?}\n{both}");
    assert_eq!(gauge(&during, "ztunnel_ready"), Some(1.0), "{during}");
    assert!(gauge(&during, "process_open_fds").is_some_and(|n| n >= 10.0), "{during}");
    assert!(gauge(&during, "process_resident_memory_bytes").is_some_and(|n| n > 1e6), "{during}");
    assert!(gauge(&during, "ztunnel_tokio_alive_tasks").is_some_and(|n| n >= 1.0), "{during}");
    assert_eq!(gauge(&during, "ztunnel_pool_connections"), Some(1.0), "{during}");
    assert_eq!(gauge(&during, "ztunnel_pool_streams"), Some(1.0), "{during}");

    // A periodic access log line, with the bytes so far, before the end.
    let periodic =
        t1.wait_access_log(1, WAIT, |e| e["event"] == "periodic" && e["bytes_sent"].as_u64() > Some(0))?;
    let p = &periodic[0];
    assert_eq!((field(p, "direction"), field(p, "source_workload")), ("outbound", web.key().as_str()), "{p}");
    assert!(p["bytes_received"].as_u64() > Some(0), "{p}");

    // The end: closed with the same labels, and every byte counted.
    drop(held);
    for (reporter, t) in sides {
        wait_until(
            WAIT,
            &format!("{reporter}: {CLOSED} counts the ended connection"),
            || Ok(counts(t, reporter)?[..2] == [1, 1]),
            || t.metrics().unwrap_or_default(),
        )?;
        let text = t.metrics()?;
        let opened: Vec<Labels> =
            find(&text, OPENED, &selector(reporter)).into_iter().map(|(l, _)| l).collect();
        let closed: Vec<Labels> =
            find(&text, CLOSED, &selector(reporter)).into_iter().map(|(l, _)| l).collect();
        assert_eq!(opened, closed, "{reporter}: opened and closed label sets differ");
    }
    let after = t1.metrics()?;
    promtool_check(&promtool, &after)?;
    let last = t1.wait_access_log(1, WAIT, |e| e["event"] == "final" && e["direction"] == "outbound")?;
    let last = &last[0];
    let c = counts(&t1, "source")?;
    // Istio counts the caller's bytes as received, the answer as sent.
    assert_eq!(Some(c[2]), last["bytes_sent"].as_u64(), "received bytes vs the final line {last}");
    assert_eq!(Some(c[3]), last["bytes_received"].as_u64(), "sent bytes vs the final line {last}");
    wait_until(
        WAIT,
        "the stream's pool slot is given back",
        || Ok(gauge(&t1.metrics()?, "ztunnel_pool_streams") == Some(0.0)),
        || t1.metrics().unwrap_or_default(),
    )?;
    Ok(())
}
