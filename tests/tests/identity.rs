//! Workload identity end to end, on the production path: `ztunnel ca serve`
//! as its own process, node tunnels that reach it over mutual TLS with their
//! node credentials, real certificates, real handshakes between tunnels, and
//! steady traffic through it all.

use std::{
    os::unix::fs::PermissionsExt as _,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use ztunnel_testbed::{
    Node, Testbed, Tunnel, Workload,
    agent::{Server, Steady},
    bins,
    ca::CaServer,
};
use ztunnel_tests::{WAIT, wait_until};

/// Two nodes, web on n1 calling db on n2, both tunnels on the signing
/// service; certificates of `lifetime`.
struct Mesh {
    tb: Testbed,
    n1: Node,
    n2: Node,
    web: Workload,
    db: Workload,
    ca: CaServer,
    t1: Tunnel,
    t2: Tunnel,
    _db_server: Server,
}

fn mesh(tag: &str, lifetime: &str) -> anyhow::Result<Mesh> {
    let mut tb = Testbed::new(tag)?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let db_server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let ca = tb.start_ca(&n1, &["--max-lifetime", lifetime])?;
    let config = |node: &Node, w: &Workload| -> anyhow::Result<Value> {
        let mut c = tb.tunnel_config(node, &[w]);
        tb.use_remote_ca(&mut c, &ca, node)?;
        c["identity"]["cert_lifetime"] = json!(lifetime);
        c["identity"]["bundle_refresh"] = json!("1s");
        c["identity"]["retry_initial"] = json!("200ms");
        c["identity"]["retry_max"] = json!("2s");
        // Strict about validity: an expired certificate must fail.
        c["identity"]["clock_skew"] = json!("1s");
        Ok(c)
    };
    let t1 = tb.start_tunnel(&n1, config(&n1, &web)?)?;
    let t2 = tb.start_tunnel(&n2, config(&n2, &db)?)?;
    Ok(Mesh { tb, n1, n2, web, db, ca, t1, t2, _db_server: db_server })
}

/// What `ztunnel certs` shows on each of `tunnels`, for a deadline's message.
fn certs_of(tb: &Testbed, tunnels: &[&Tunnel]) -> String {
    tunnels
        .iter()
        .map(|t| match t.certs(tb) {
            Ok(c) => format!("{}: {c}", t.node.name),
            Err(e) => format!("{}: {e:#}", t.node.name),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_no_failures(report: &Value) {
    let failures = report["failures"].as_array().map_or(0, Vec::len);
    assert!(report["attempts"].as_u64().unwrap_or(0) > 0, "{report}");
    assert_eq!(failures, 0, "connections failed: {report}");
}

#[test]
fn a_node_gets_its_own_workloads_certificates_and_is_refused_another_nodes() -> anyhow::Result<()> {
    let mut tb = Testbed::new("nodeauth")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let ca = tb.start_ca(&n1, &[])?;
    // n1's configuration claims db too, which the registry places on n2.
    let mut config = tb.tunnel_config(&n1, &[&web]);
    tb.use_remote_ca(&mut config, &ca, &n1)?;
    for w in config["workloads"].as_array_mut().into_iter().flatten() {
        if w["name"] == "db" {
            w["node"] = json!("n1");
            w["cgroup"] = json!(n1.cgroup.join("db-claimed"));
            w.as_object_mut().map(|o| o.remove("addresses"));
        }
    }
    std::fs::create_dir_all(n1.cgroup.join("db-claimed"))?;
    let t1 = tb.start_tunnel(&n1, config)?;

    wait_until(
        WAIT,
        "web's certificate is valid",
        || Ok(t1.cert_status(&tb, &web.identity())?["state"] == "valid"),
        || certs_of(&tb, &[&t1]),
    )?;
    wait_until(
        WAIT,
        "db's request is refused",
        || {
            let s = t1.cert_status(&tb, &db.identity())?;
            Ok(s["state"] == "pending"
                && s["last_error"].as_str().is_some_and(|e| e.contains("not_authorized")))
        },
        || certs_of(&tb, &[&t1]),
    )?;
    let log = ca.log();
    assert!(log.contains("certificate issued") && log.contains(&web.identity()), "{log}");
    assert!(log.contains("certificate refused"), "{log}");
    assert!(log.contains("node=\"n1\""), "{log}");
    assert!(log.contains("no workload with this identity is placed on the node"), "{log}");
    // The node's own credential is held too, and no key material is printed.
    let certs = t1.certs(&tb)?;
    assert!(
        certs["identities"].as_array().is_some_and(|ids| ids.iter().any(|c| c["kind"] == "node")),
        "{certs}"
    );
    // The text form carries what an operator needs, whole.
    let text = t1.certs_text(&tb)?;
    let web_status = t1.cert_status(&tb, &web.identity())?;
    for want in [
        &web.identity(),
        web_status["serial"].as_str().unwrap_or("?"),
        "not after",
        "next request",
        "not_authorized",
    ] {
        assert!(text.contains(want), "`{want}` missing from ztunnel certs:\n{text}");
    }
    for text in [certs.to_string(), text, t1.log(), log] {
        assert!(!text.contains("PRIVATE KEY"), "key material in output");
    }
    Ok(())
}

/// How many pooled HBONE connections carried a tunnel's outbound streams.
fn pooled_connections(t: &Tunnel) -> usize {
    let ids: std::collections::BTreeSet<u64> =
        t.access_log().iter().filter_map(|e| e["hbone_connection"].as_u64()).collect();
    ids.len()
}

#[test]
fn ten_second_certificates_renew_under_steady_traffic_without_a_single_failure() -> anyhow::Result<()> {
    let m = mesh("renew", "10s")?;
    let steady = Steady::start(
        &m.tb,
        &m.web.place(),
        m.db.addr4(5432),
        Duration::from_millis(100),
        Duration::from_secs(60),
    )?;
    let report = steady.finish()?;
    assert_no_failures(&report);
    // Traffic all along: at least one exchange per 600 ms on average, many
    // per 5 s renewal period (not the ~600 of an idle machine, where each
    // exchange takes far less than the 100 ms interval).
    assert!(report["attempts"].as_u64().unwrap_or(0) >= 100, "{report}");
    for (tunnel, w) in [(&m.t1, &m.web), (&m.t2, &m.db)] {
        let s = tunnel.cert_status(&m.tb, &w.identity())?;
        assert!(s["issued"].as_u64().unwrap_or(0) >= 8, "{} renewed only {} times: {s}", w.name, s["issued"]);
        assert_eq!(s["state"], "valid");
    }
    // Renewed certificates are really presented: each renewal retires the
    // pooled connection, and new streams ride a fresh handshake.
    m.t1.flush_access_log()?;
    let handshakes = pooled_connections(&m.t1);
    assert!(handshakes >= 6, "only {handshakes} pooled connections carried 60 s of 10 s certificates");
    drop((m.n1, m.n2, m.ca, m.t1, m.t2));
    Ok(())
}

#[test]
fn a_ca_outage_longer_than_a_renewal_period_does_not_stop_traffic() -> anyhow::Result<()> {
    // 60 s certificates renew about 30 s after they are issued. The outage
    // lasts longer than that, and still ends with 20 s of validity to spare
    // even when the setup before it took several seconds of the first
    // certificate's life on a loaded machine.
    let mut m = mesh("outage", "60s")?;
    let renewal_period = Duration::from_secs(30);
    let down_for = renewal_period + Duration::from_secs(3);
    let steady = Steady::start(
        &m.tb,
        &m.web.place(),
        m.db.addr4(5432),
        Duration::from_millis(200),
        Duration::from_secs(300),
    )?;
    let seen = || certs_of(&m.tb, &[&m.t1]);
    wait_until(
        WAIT,
        "first certificates",
        || Ok(m.t1.cert_status(&m.tb, &m.web.identity())?["state"] == "valid"),
        seen,
    )?;
    let before = m.t1.cert_status(&m.tb, &m.web.identity())?;

    m.ca.stop();
    let outage = Instant::now();
    // Renewal is due at about half the lifetime: it fails, and keeps failing.
    wait_until(
        down_for + WAIT,
        "renewal failures are visible",
        || {
            let s = m.t1.cert_status(&m.tb, &m.web.identity())?;
            Ok(s["consecutive_failures"].as_u64().unwrap_or(0) >= 2 && s["last_error"].is_string())
        },
        seen,
    )?;
    let during = m.t1.cert_status(&m.tb, &m.web.identity())?;
    assert_eq!(during["serial"], before["serial"], "the still-valid certificate stays in service");
    assert_eq!(during["state"], "valid");
    // The error series exists from the start (at 0): the count is what tells.
    let errors =
        ztunnel_tests::metric(&m.t1.metrics()?, r#"ztunnel_certificate_renewals_total{result="error"}"#);
    assert!(errors > 0, "no failed renewal counted during the CA outage");
    // Down for longer than a renewal period.
    if let Some(left) = down_for.checked_sub(outage.elapsed()) {
        std::thread::sleep(left);
    }
    m.ca.start_again(&m.tb)?;
    wait_until(
        WAIT,
        "renewal succeeds once the CA is back",
        || {
            let s = m.t1.cert_status(&m.tb, &m.web.identity())?;
            Ok(s["serial"] != before["serial"] && s["last_error"].is_null())
        },
        seen,
    )?;
    // Some traffic on the renewed certificate, then the verdict on all of it.
    std::thread::sleep(Duration::from_secs(5));
    assert_no_failures(&steady.stop()?);
    drop((m.n1, m.n2, m.t2));
    Ok(())
}

#[test]
fn the_root_rotation_drill_drops_no_connection() -> anyhow::Result<()> {
    let m = mesh("rotate", "30s")?;
    // Traffic through the whole drill, however long its steps take.
    let steady = Steady::start(
        &m.tb,
        &m.web.place(),
        m.db.addr4(5432),
        Duration::from_millis(100),
        Duration::from_secs(300),
    )?;
    let tunnels = [&m.t1, &m.t2];
    let rotate = |step: &str| -> anyhow::Result<()> {
        let out = Command::new(bins::ztunnel()?)
            .args(["ca", "rotate", step, "--dir"])
            .arg(m.tb.ca_dir())
            .output()?;
        anyhow::ensure!(out.status.success(), "ca rotate {step}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let roots = |t: &Tunnel| -> anyhow::Result<usize> {
        Ok(t.certs(&m.tb)?["trust_bundle"].as_array().map_or(0, Vec::len))
    };
    let seen = || format!("{}\nCA:\n{}", certs_of(&m.tb, &tunnels), m.ca.log());
    wait_until(
        WAIT,
        "first certificates",
        || Ok(m.t1.cert_status(&m.tb, &m.web.identity())?["state"] == "valid"),
        seen,
    )?;
    std::thread::sleep(Duration::from_secs(3));

    // 1. The new root joins every node's trust bundle.
    rotate("begin")?;
    wait_until(
        WAIT,
        "every node trusts both roots",
        || Ok(tunnels.iter().all(|t| roots(t).is_ok_and(|n| n == 2))),
        seen,
    )?;
    std::thread::sleep(Duration::from_secs(2));

    // 2. The new generation signs; every certificate is re-issued under it.
    // "It" is the CA's active root (ztunnel ca status), never a node's view,
    // which can lag a refresh behind.
    rotate("activate")?;
    let status =
        Command::new(bins::ztunnel()?).args(["ca", "status", "--dir"]).arg(m.tb.ca_dir()).output()?;
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let new_root = status
        .split("(root ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no active root in `ztunnel ca status`: {status}"))?;
    wait_until(
        WAIT,
        "every certificate leads to the new root",
        || {
            let mut all = true;
            for t in tunnels {
                let ids = t.certs(&m.tb)?["identities"].as_array().cloned().unwrap_or_default();
                all &= !ids.is_empty() && ids.iter().all(|c| c["root"].as_str() == Some(new_root.as_str()));
            }
            Ok(all)
        },
        seen,
    )?;
    // Streams still open on connections made with the old certificates
    // finish (each takes milliseconds) before the old root goes.
    std::thread::sleep(Duration::from_secs(2));

    // 3. The old root leaves the bundle.
    rotate("finish")?;
    wait_until(
        WAIT,
        "every node trusts only the new root",
        || Ok(tunnels.iter().all(|t| roots(t).is_ok_and(|n| n == 1))),
        || format!("{}\nn1:\n{}", seen(), m.t1.log_tail(30)),
    )?;
    // A little traffic under the new root alone, then the verdict.
    std::thread::sleep(Duration::from_secs(3));
    let report = steady.stop()?;
    assert_no_failures(&report);
    // Every step changed the bundle or the certificates, and the pooled
    // connection was re-established under it.
    m.t1.flush_access_log()?;
    let handshakes = pooled_connections(&m.t1);
    assert!(handshakes >= 3, "only {handshakes} pooled connections across the three steps");
    // Renewals after the drill work: the node credentials moved too.
    for t in tunnels {
        for c in t.certs(&m.tb)?["identities"].as_array().cloned().unwrap_or_default() {
            assert_eq!(c["state"], "valid", "{c}");
            assert!(c["last_error"].is_null(), "{c}");
        }
    }
    drop((m.n1, m.n2, m.ca));
    Ok(())
}

#[test]
fn ca_init_refuses_to_overwrite_and_writes_private_keys_0600() -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let init = |force: bool| {
        let mut c = Command::new(bins::ztunnel().expect("ztunnel"));
        c.args(["ca", "init", "--trust-domain", "mesh.example", "--dir"]).arg(dir.join("ca"));
        if force {
            c.arg("--force");
        }
        c.output()
    };
    let first = init(false)?;
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let key = dir.join("ca/gen-1/root-key.pem");
    let before = std::fs::read(&key)?;
    for k in ["gen-1/root-key.pem", "gen-1/intermediate-key.pem"] {
        assert_eq!(std::fs::metadata(dir.join("ca").join(k))?.permissions().mode() & 0o777, 0o600, "{k}");
    }
    let again = init(false)?;
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read(&key)?, before, "an existing CA is never overwritten");
    assert!(init(true)?.status.success());
    assert_ne!(std::fs::read(&key)?, before);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("ztunnel-ca-init-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The last step of a rotation removes the old root: an inbound connection
/// whose caller still chains only to it is closed by the callee, as outbound
/// ones are retired by the caller; a new connection works under the new root.
#[test]
fn removing_a_root_closes_the_inbound_connections_that_chain_only_to_it() -> anyhow::Result<()> {
    let m = mesh("rootgone", "1h")?;
    let rotate = |step: &str| -> anyhow::Result<()> {
        let out = Command::new(bins::ztunnel()?)
            .args(["ca", "rotate", step, "--dir"])
            .arg(m.tb.ca_dir())
            .output()?;
        anyhow::ensure!(out.status.success(), "ca rotate {step}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let roots = |t: &Tunnel| -> anyhow::Result<usize> {
        Ok(t.certs(&m.tb)?["trust_bundle"].as_array().map_or(0, Vec::len))
    };
    let seen = || certs_of(&m.tb, &[&m.t1, &m.t2]);
    wait_until(
        WAIT,
        "first certificates",
        || Ok(m.t1.cert_status(&m.tb, &m.web.identity())?["state"] == "valid"),
        seen,
    )?;
    // Opened under the first root, and kept open through the rotation.
    let mut held = ztunnel_testbed::agent::Held::open(&m.tb, &m.web.place(), m.db.addr4(5432))?;
    held.ping("under the first root")?;
    rotate("begin")?;
    wait_until(
        WAIT,
        "both roots trusted",
        || Ok([&m.t1, &m.t2].iter().all(|t| roots(t).is_ok_and(|n| n == 2))),
        seen,
    )?;
    rotate("activate")?;
    // Every certificate (node credentials too) re-issued under the CA's
    // active root (`ztunnel ca status`; a node's own view can lag a refresh
    // behind), as the drill waits: the held connection stays on its old
    // handshake.
    let status =
        Command::new(bins::ztunnel()?).args(["ca", "status", "--dir"]).arg(m.tb.ca_dir()).output()?;
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let new_root = status
        .split("(root ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no active root in `ztunnel ca status`: {status}"))?;
    wait_until(
        Duration::from_secs(30),
        "every certificate under the new root",
        || {
            let mut moved = true;
            for t in [&m.t1, &m.t2] {
                let ids = t.certs(&m.tb)?["identities"].as_array().cloned().unwrap_or_default();
                moved &= !ids.is_empty() && ids.iter().all(|c| c["root"].as_str() == Some(new_root.as_str()));
            }
            Ok(moved)
        },
        seen,
    )?;
    held.ping("both roots trusted")?;
    rotate("finish")?;
    wait_until(
        WAIT,
        "only the new root trusted",
        || Ok(roots(&m.t2).is_ok_and(|n| n == 1)),
        || format!("n2:\n{}\nCA:\n{}", m.t2.log_tail(30), m.ca.log()),
    )?;
    let v = held.send("after the old root left")?;
    assert_eq!((v["event"].as_str(), v["kind"].as_str()), (Some("error"), Some("reset")), "{v}");
    let closed = ztunnel_tests::metric(
        &m.t2.metrics()?,
        r#"ztunnel_handshake_failures_total{direction="inbound",reason="root_removed"}"#,
    );
    assert_eq!(closed, 1);
    // Certificates re-issued under the new root carry new connections.
    wait_until(
        Duration::from_secs(30),
        "calls work under the new root",
        || Ok(ztunnel_testbed::agent::probe(&m.tb, &m.web.place(), m.db.addr4(5432))?["result"] == "ok"),
        seen,
    )?;
    drop((m.n1, m.n2, m.ca));
    Ok(())
}
