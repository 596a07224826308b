//! Authorization end to end: real capture, real HBONE between two node
//! tunnels, and the destination tunnel deciding each connection by the
//! caller's certificate, the workload's modes and the configured policies.

use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde_json::{Value, json};
use ztunnel_testbed::{
    Testbed, Workload,
    agent::{self, Held, Server},
};
use ztunnel_tests::{WAIT, eventually, field};

/// Only callers from namespace `shop` with service account `web` reach the
/// `app: db` workloads of `shop`, and only on 5432.
fn db_from_web() -> Value {
    json!({
        "name": "db-from-web",
        "namespace": "shop",
        "selector": {"matchLabels": {"app": "db"}},
        "action": "ALLOW",
        "rules": [{
            "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}],
            "to": [{"operation": {"ports": ["5432"]}}],
        }],
    })
}

/// The inbound access log lines of `t` whose caller is `w`.
fn inbound_from<'a>(w: &'a Workload) -> impl Fn(&Value) -> bool + 'a {
    move |e| e["direction"] == "inbound" && e["source_identity"] == w.identity().as_str()
}

fn counter(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0)
}

fn peers(server: &Server) -> anyhow::Result<Vec<String>> {
    Ok(server.accepted()?.iter().map(|a| field(a, "peer").to_owned()).collect())
}

#[test]
fn an_allowed_call_succeeds_and_a_denied_call_is_refused_with_401_and_a_reset() -> anyhow::Result<()> {
    let mut tb = Testbed::new("allow")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod_in(&n1, "shop", "web")?;
    let batch = tb.add_pod_in(&n1, "ops", "batch")?;
    let db = tb.add_pod_in(&n2, "shop", "db")?;
    let server = Server::start(&tb, &db.place(), &[db.addr4(5432), db.addr4(6432)])?;
    let mut c2 = tb.tunnel_config(&n2, &[&db]);
    c2["policies"] = json!([db_from_web()]);
    let t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web, &batch]))?;
    let t2 = tb.start_tunnel(&n2, c2)?;

    let r = agent::connect(&tb, &web.place(), db.addr4(5432), 2, 1)?;
    assert_eq!(r.ok, 2, "{:?}\n{}", r.errors, t2.log_tail(20));
    let allowed = t2.wait_access_log(2, WAIT, inbound_from(&web))?;
    for e in &allowed {
        assert_eq!((field(e, "decision"), field(e, "reason")), ("allow", "ok"), "{e}");
        assert_eq!((field(e, "policy"), e["rule"].as_u64()), ("shop/db-from-web", Some(0)), "{e}");
    }

    // Another identity, and the right identity on another port: refused by
    // the callee's tunnel with 401, and the caller sees a reset.
    for (who, dst) in [(&batch, db.addr4(5432)), (&web, db.addr4(6432))] {
        let out = agent::probe(&tb, &who.place(), dst)?;
        assert_eq!(out["result"], "reset", "{} -> {dst}: {out}", who.key());
    }
    let denied = t2.wait_access_log(1, WAIT, inbound_from(&batch))?;
    let e = &denied[0];
    assert_eq!((field(e, "decision"), field(e, "reason")), ("deny", "no_allow_matched"), "{e}");
    assert_eq!(field(e, "destination_workload"), "shop/db", "{e}");
    assert!(field(e, "destination_address").ends_with(":5432"), "{e}");
    let e = &t2.wait_access_log(1, WAIT, |e| inbound_from(&web)(e) && e["decision"] == "deny")?[0];
    assert!(field(e, "destination_address").ends_with(":6432"), "{e}");
    // The caller's tunnel knows why its stream was refused.
    let out = t1.wait_access_log(2, WAIT, |e| e["direction"] == "outbound" && e["decision"] == "deny")?;
    assert!(out.iter().all(|e| field(e, "reason") == "policy_denied"), "{out:?}");
    // The application never saw the refused callers.
    let accepted = server.accepted()?;
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    assert!(
        accepted.iter().all(|a| field(a, "peer").starts_with(&format!("{}:", web.ip4))
            && field(a, "local").ends_with(":5432")),
        "a denied connection reached the application: {accepted:?}"
    );

    let metrics = t2.metrics()?;
    assert_eq!(
        counter(&metrics, r#"ztunnel_policy_decisions_total{decision="allow",reason="allowed_by_policy"}"#),
        2
    );
    assert_eq!(
        counter(&metrics, r#"ztunnel_policy_decisions_total{decision="deny",reason="no_allow_matched"}"#),
        2
    );
    Ok(())
}

#[test]
fn audit_mode_lets_a_denied_call_through_and_logs_would_deny() -> anyhow::Result<()> {
    let mut tb = Testbed::new("audit")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let batch = tb.add_pod_in(&n1, "ops", "batch")?;
    let db = tb.add_pod_in(&n2, "shop", "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let mut c2 = tb.tunnel_config(&n2, &[&db]);
    c2["policies"] = json!([db_from_web()]);
    c2["namespaces"] = json!({"shop": {"authorization": "audit"}});
    let _t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&batch]))?;
    let mut t2 = tb.start_tunnel(&n2, c2.clone())?;

    assert_eq!(agent::connect(&tb, &batch.place(), db.addr4(5432), 1, 1)?.ok, 1);
    let e = &t2.wait_access_log(1, WAIT, inbound_from(&batch))?[0];
    assert_eq!((field(e, "decision"), field(e, "reason")), ("would_deny", "no_allow_matched"), "{e}");
    assert!(e["bytes_received"].as_u64().unwrap_or(0) > 0, "audit mode carries the traffic: {e}");
    let metrics = t2.metrics()?;
    assert_eq!(
        counter(
            &metrics,
            r#"ztunnel_policy_decisions_total{decision="would_deny",reason="no_allow_matched"}"#
        ),
        1
    );

    // The workload overrides its namespace: enforce for db alone.
    c2["workloads"]
        .as_array_mut()
        .and_then(|ws| ws.iter_mut().find(|w| w["name"] == "db"))
        .map(|w| w["authorization"] = json!("enforce"))
        .ok_or_else(|| anyhow::anyhow!("db not in the configuration"))?;
    t2.reload(&c2)?;
    assert_eq!(agent::probe(&tb, &batch.place(), db.addr4(5432))?["result"], "reset");
    t2.wait_access_log(1, WAIT, |e| inbound_from(&batch)(e) && e["decision"] == "deny")?;
    Ok(())
}

/// A plaintext caller: a process on `n1` outside any enrolled workload, whose
/// connection is steered to the callee's :15006.
fn plaintext_probe(
    tb: &Testbed,
    from: &ztunnel_testbed::Node,
    to: std::net::SocketAddr,
) -> anyhow::Result<Value> {
    agent::probe(tb, &from.unenrolled(), to)
}

#[test]
fn strict_refuses_plaintext_while_permissive_admits_it() -> anyhow::Result<()> {
    let mut tb = Testbed::new("strict")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let db = tb.add_pod_in(&n2, "shop", "db")?;
    let api = tb.add_pod_in(&n2, "pay", "api")?;
    let _db_server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let api_server = Server::start(&tb, &api.place(), &[api.addr4(8080)])?;
    let mut c2 = tb.tunnel_config(&n2, &[&db, &api]);
    c2["namespaces"] = json!({"shop": {"mtls": "strict"}, "pay": {"mtls": "permissive"}});
    let t2 = tb.start_tunnel(&n2, c2)?;

    let out = plaintext_probe(&tb, &n1, db.addr4(5432))?;
    assert!(matches!(out["result"].as_str(), Some("reset" | "eof")), "strict: {out}");
    let out = plaintext_probe(&tb, &n1, api.addr4(8080))?;
    assert_eq!(out["result"], "ok", "permissive: {out}");
    // Delivered with the caller's own address.
    assert!(peers(&api_server)?.iter().all(|p| p.starts_with(&format!("{}:", n1.ip4))));

    let refused = &t2.wait_access_log(1, WAIT, |e| e["destination_workload"] == "shop/db")?[0];
    assert_eq!((field(refused, "mode"), field(refused, "decision")), ("plaintext", "deny"), "{refused}");
    assert_eq!(field(refused, "reason"), "plaintext_refused", "{refused}");
    let admitted = &t2.wait_access_log(1, WAIT, |e| e["destination_workload"] == "pay/api")?[0];
    assert_eq!((field(admitted, "mode"), field(admitted, "reason")), ("plaintext", "ok"), "{admitted}");
    assert_eq!(field(admitted, "connection_security_policy"), "none", "{admitted}");
    let metrics = t2.metrics()?;
    assert_eq!(
        counter(
            &metrics,
            r#"ztunnel_connections_total{direction="inbound",mode="plaintext",reason="plaintext_refused"}"#
        ),
        1,
        "{metrics}"
    );
    assert_eq!(
        counter(&metrics, r#"ztunnel_connections_total{direction="inbound",mode="plaintext",reason="ok"}"#),
        1
    );
    Ok(())
}

#[test]
fn rolling_one_namespace_back_to_permissive_needs_no_restart_and_leaves_the_others_strict()
-> anyhow::Result<()> {
    let mut tb = Testbed::new("rollback")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod_in(&n1, "shop", "web")?;
    let db = tb.add_pod_in(&n2, "shop", "db")?;
    let api = tb.add_pod_in(&n2, "pay", "api")?;
    let _db_server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let _api_server = Server::start(&tb, &api.place(), &[api.addr4(8080)])?;
    let mut c2 = tb.tunnel_config(&n2, &[&db, &api]);
    c2["namespaces"] = json!({"shop": {"mtls": "strict"}, "pay": {"mtls": "strict"}});
    let _t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let mut t2 = tb.start_tunnel(&n2, c2.clone())?;
    let pid = t2.pid();

    // Open mTLS connections into both namespaces, kept across the rollback.
    let mut to_db = Held::open(&tb, &web.place(), db.addr4(5432))?;
    let mut to_api = Held::open(&tb, &web.place(), api.addr4(8080))?;
    for target in [db.addr4(5432), api.addr4(8080)] {
        let out = plaintext_probe(&tb, &n1, target)?;
        assert_ne!(out["result"], "ok", "strict {target}: {out}");
    }

    // The rollback: one line, one namespace.
    c2["namespaces"]["shop"]["mtls"] = json!("permissive");
    t2.reload(&c2)?;
    assert_eq!(t2.pid(), pid, "the rollback must not restart the tunnel");
    assert_eq!(plaintext_probe(&tb, &n1, db.addr4(5432))?["result"], "ok", "shop is permissive now");
    let out = plaintext_probe(&tb, &n1, api.addr4(8080))?;
    assert_ne!(out["result"], "ok", "pay must stay strict: {out}");
    // Identity checks stay on, and no open connection was dropped.
    to_db.ping("after rollback")?;
    to_api.ping("after rollback")?;
    assert_eq!(agent::connect(&tb, &web.place(), db.addr4(5432), 1, 1)?.ok, 1);
    let e = t2.wait_access_log(1, WAIT, |e| inbound_from(&web)(e) && e["bytes_sent"].as_u64() > Some(0))?;
    assert_eq!(field(&e[0], "mode"), "hbone", "{}", e[0]);
    t2.flush_access_log()?;
    assert!(t2.access_log().iter().all(|e| field(e, "reason") != "revoked_by_policy"));
    Ok(())
}

#[test]
fn a_policy_change_closes_an_open_connection_it_now_denies_and_logs_the_policy() -> anyhow::Result<()> {
    let mut tb = Testbed::new("revoke")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod_in(&n1, "shop", "web")?;
    let batch = tb.add_pod_in(&n1, "ops", "batch")?;
    let db = tb.add_pod_in(&n2, "shop", "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let mut c2 = tb.tunnel_config(&n2, &[&db]);
    let _t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web, &batch]))?;
    let mut t2 = tb.start_tunnel(&n2, c2.clone())?;

    let mut from_web = Held::open(&tb, &web.place(), db.addr4(5432))?;
    let mut from_batch = Held::open(&tb, &batch.place(), db.addr4(5432))?;
    from_web.ping("before")?;
    from_batch.ping("before")?;

    c2["policies"] = json!([{
        "name": "no-ops", "namespace": "shop", "action": "DENY",
        "rules": [{"from": [{"source": {"namespaces": ["ops"]}}]}],
    }]);
    t2.reload(&c2)?;
    let closed = t2.wait_access_log(1, WAIT, |e| field(e, "reason") == "revoked_by_policy")?;
    let e = &closed[0];
    assert_eq!(field(e, "source_identity"), batch.identity(), "{e}");
    assert_eq!((field(e, "policy"), e["rule"].as_u64()), ("shop/no-ops", Some(0)), "{e}");
    assert!(field(e, "error").contains("denied_by_policy"), "{e}");
    assert!(from_batch.ping("after").is_err(), "the denied connection must be closed");
    from_web.ping("after")?;
    assert_eq!(agent::probe(&tb, &batch.place(), db.addr4(5432))?["result"], "reset");

    // `finish`: open connections may complete; only new ones see the policy.
    c2["authorization"] = json!({"on_policy_change": "finish"});
    c2["policies"]
        .as_array_mut()
        .ok_or_else(|| anyhow::anyhow!("policies"))?
        .push(json!({"name": "no-web", "namespace": "shop", "action": "DENY", "rules": [{"from": [{"source": {"principals": ["*/sa/web"]}}]}]}));
    // The reload has re-decided open connections (it would have closed
    // from_web by now), and anything it closed has ended and been logged.
    t2.reload(&c2)?;
    t2.flush_access_log()?;
    from_web.ping("still open")?;
    assert_eq!(agent::probe(&tb, &web.place(), db.addr4(5432))?["result"], "reset");
    Ok(())
}

#[test]
fn an_emergency_allow_admits_with_its_reason_logged_and_lapses_on_its_own() -> anyhow::Result<()> {
    let mut tb = Testbed::new("emerg")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let batch = tb.add_pod_in(&n1, "ops", "batch")?;
    let db = tb.add_pod_in(&n2, "shop", "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let mut c2 = tb.tunnel_config(&n2, &[&db]);
    c2["namespaces"] = json!({"shop": {"default_deny": true}});
    let _t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&batch]))?;
    let mut t2 = tb.start_tunnel(&n2, c2.clone())?;

    assert_eq!(agent::probe(&tb, &batch.place(), db.addr4(5432))?["result"], "reset");
    let e = &t2.wait_access_log(1, WAIT, inbound_from(&batch))?[0];
    assert_eq!((field(e, "decision"), field(e, "reason")), ("deny", "default_deny"), "{e}");

    // The allow must outlast the setup below (a reload and three
    // connections through two tunnels) on a loaded machine, and the test
    // then waits for it to lapse in real time: the tunnel is a real process.
    let lifetime = Duration::from_secs(20);
    let lapses = SystemTime::now() + lifetime;
    c2["emergency_allows"] = json!([{
        "name": "inc-4711",
        "reason": "ops backfill blocked, INC-4711",
        "expires": humantime::format_rfc3339_seconds(lapses).to_string(),
        "namespace": "shop",
        "from": [{"source": {"namespaces": ["ops"]}}],
        "to": [{"operation": {"ports": ["5432"]}}],
    }]);
    let too_slow = || {
        if SystemTime::now() >= lapses {
            format!(" (the setup outlasted the allow's {lifetime:?}: the machine was too slow for this test)")
        } else {
            String::new()
        }
    };
    t2.reload(&c2)?;
    let mut held = Held::open(&tb, &batch.place(), db.addr4(5432)).with_context(too_slow)?;
    held.ping("admitted").with_context(too_slow)?;
    assert_eq!(agent::connect(&tb, &batch.place(), db.addr4(5432), 1, 1)?.ok, 1, "{}", too_slow());
    let e = &t2.wait_access_log(1, WAIT, |e| field(e, "reason") == "emergency_allow")?[0];
    assert_eq!((field(e, "decision"), field(e, "policy")), ("allow", "shop/inc-4711"), "{e}");
    assert!(field(e, "policy_note").contains("INC-4711"), "{e}");
    assert!(t2.log().contains("connection admitted by an emergency allow"), "{}", t2.log_tail(20));

    // It lapses without anyone touching the configuration: the connection
    // it admitted is closed, new ones are denied again.
    let left = lapses.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(
        eventually(left + WAIT, || t2.access_log().iter().any(
            |e| field(e, "reason") == "revoked_by_policy" && field(e, "policy_note").contains("INC-4711")
        )),
        "the lapsed allow's connection was not closed:\n{}",
        t2.log_tail(20)
    );
    assert!(held.ping("after").is_err());
    assert_eq!(agent::probe(&tb, &batch.place(), db.addr4(5432))?["result"], "reset");
    // The probe's line is the newest of batch's once the log is flushed.
    t2.flush_access_log()?;
    let last = t2.access_log().into_iter().rev().find(inbound_from(&batch)).unwrap_or_default();
    assert_eq!(field(&last, "reason"), "default_deny", "{last}");
    Ok(())
}

/// `ztunnel` run from the command line, as an operator would.
fn ztunnel(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = std::process::Command::new(ztunnel_testbed::bins::ztunnel()?).args(args).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn policy_check_and_matrix_explain_decisions_from_the_configuration_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("node.yaml");
    let config = json!({
        "node": {"name": "n1"},
        "namespaces": {"shop": {"mtls": "strict"}, "pay": {"authorization": "audit"}},
        "policies": [
            db_from_web(),
            {"name": "api-from-shop", "namespace": "pay", "action": "ALLOW",
             "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]},
        ],
        "workloads": [
            {"name": "web", "namespace": "shop", "service_account": "web", "node": "n2", "addresses": ["198.19.2.11"]},
            {"name": "db", "namespace": "shop", "service_account": "db", "node": "n2", "addresses": ["198.19.2.12"], "labels": {"app": "db"}},
            {"name": "api", "namespace": "pay", "service_account": "api", "node": "n2", "addresses": ["198.19.2.13"]},
        ],
    });
    std::fs::write(&path, serde_yaml_ng::to_string(&config)?)?;
    let file = path.to_str().unwrap_or_default();
    let check =
        |from: &str, to: &str| ztunnel(&["policy", "check", "--config", file, "--from", from, "--to", to]);

    let (code, out, _) = check("spiffe://cluster.local/ns/shop/sa/web", "db:5432")?;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ALLOW") && out.contains("policy: shop/db-from-web, rule 0"), "{out}");
    let (code, out, _) = check("spiffe://cluster.local/ns/shop/sa/web", "shop/db:22")?;
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("DENY") && out.contains("reason: no_allow_matched"), "{out}");
    let (code, out, _) = check("plaintext", "db:5432")?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("reason: plaintext_refused") && out.contains("mTLS strict"), "{out}");
    // Audit mode allows (exit 0) but says what enforce would do.
    let (code, out, _) = check("spiffe://cluster.local/ns/ops/sa/batch", "api:8080")?;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("WOULD DENY"), "{out}");
    let (code, out, _) = ztunnel(&[
        "policy",
        "check",
        "--config",
        file,
        "--from",
        "spiffe://cluster.local/ns/ops/sa/batch",
        "--to",
        "api:8080",
        "--assume-enforce",
    ])?;
    assert_eq!(code, 1, "{out}");
    // Bad input is neither allow nor deny.
    let (code, _, err) = check("cluster.local/ns/shop/sa/web", "db:5432")?;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = check("plaintext", "nosuch:80")?;
    assert_eq!(code, 2);
    assert!(err.contains("no workload `nosuch`"), "{err}");

    let (code, csv, err) = ztunnel(&["policy", "matrix", "--config", file, "--format", "csv"])?;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    let col = |name: &str| rows[0].iter().position(|c| *c == name);
    let row = |name: &str| rows.iter().find(|r| r[0] == name);
    let (Some(db5432), Some(api_any)) = (col("shop/db:5432"), col("pay/api:*")) else {
        anyhow::bail!("columns missing: {csv}");
    };
    let web = row("spiffe://cluster.local/ns/shop/sa/web").ok_or_else(|| anyhow::anyhow!("{csv}"))?;
    let plain = row("plaintext").ok_or_else(|| anyhow::anyhow!("{csv}"))?;
    let api = row("spiffe://cluster.local/ns/pay/sa/api").ok_or_else(|| anyhow::anyhow!("{csv}"))?;
    assert_eq!((web[db5432], web[api_any]), ("allow", "allow"), "{csv}");
    assert_eq!((plain[db5432], api[db5432], api[api_any]), ("deny", "deny", "would_deny"), "{csv}");
    let (code, json, _) = ztunnel(&["policy", "matrix", "--config", file, "--format", "json"])?;
    assert_eq!(code, 0);
    let cells: Vec<Value> = serde_json::from_str(&json)?;
    assert!(cells.iter().any(|c| c["from"] == "spiffe://cluster.local/ns/shop/sa/web"
        && c["to"] == "shop/db:5432"
        && c["policy"] == "shop/db-from-web"));
    let (code, text, _) = ztunnel(&["policy", "matrix", "--config", file])?;
    assert_eq!(code, 0);
    assert!(text.contains("shop/db:5432") && text.contains("from \\ to"), "{text}");

    // `validate` warns about a DENY that shadows an ALLOW, naming both.
    let mut shadowed = config.clone();
    shadowed["policies"].as_array_mut().ok_or_else(|| anyhow::anyhow!("policies"))?.push(
        json!({"name": "freeze", "namespace": "shop", "selector": {"matchLabels": {"app": "db"}}, "action": "DENY", "rules": [{}]}),
    );
    std::fs::write(&path, serde_yaml_ng::to_string(&shadowed)?)?;
    let (code, _, err) = ztunnel(&["validate", "--config", file])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("policy shop/db-from-web rule 0 (ALLOW) is shadowed by policy shop/freeze rule 0"),
        "{err}"
    );
    Ok(())
}
