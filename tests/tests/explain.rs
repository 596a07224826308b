//! `ztunnel explain` against running tunnels, after real calls: it names
//! why a call works or fails (the policy and rule, the peer's expired
//! certificate, the identity it presented instead of the expected one),
//! in its text and its JSON, and exits 0 only for a call that works.

mod rogue;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::sign::CertifiedKey;
use serde_json::{Value, json};
use ztunnel_testbed::{Testbed, Tunnel, agent, agent::Server};
use ztunnel_tests::{WAIT, wait_until};

use rogue::{Crafter, RogueServer};

/// Polls `explain --json` until `done` holds (the failure is recorded just
/// as the caller sees its reset, so a test asks until it is there).
fn explain_until(
    t: &Tunnel,
    tb: &Testbed,
    from: &str,
    to: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<(i32, Value)> {
    let mut last = (0, Value::Null);
    wait_until(
        WAIT,
        &format!("ztunnel explain --from {from} --to {to}"),
        || {
            last = t.explain_json(tb, from, to)?;
            Ok(done(&last.1))
        },
        String::new,
    )
    .map_err(|e| anyhow::anyhow!("{e}\nlast answer: {:#}", last.1))?;
    Ok(last)
}

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or_default()
}

/// Only `shop/web` may call `shop/db`, on 5432; `ops/batch` is denied
/// explicitly.
fn db_policies() -> Value {
    json!([
        {
            "name": "db-from-web", "namespace": "shop",
            "selector": {"matchLabels": {"app": "db"}},
            "action": "ALLOW",
            "rules": [{
                "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}],
                "to": [{"operation": {"ports": ["5432"]}}],
            }],
        },
        {
            "name": "no-batch", "namespace": "shop",
            "selector": {"matchLabels": {"app": "db"}},
            "action": "DENY",
            "rules": [
                {"from": [{"source": {"namespaces": ["kube-system"]}}]},
                {"from": [{"source": {"principals": ["cluster.local/ns/ops/sa/batch"]}}]},
            ],
        },
    ])
}

#[test]
fn an_allowed_call_is_explained_as_allowed_by_its_policy_and_exits_0() -> anyhow::Result<()> {
    let mut tb = Testbed::new("explok")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod_in(&n1, "shop", "web")?;
    let batch = tb.add_pod_in(&n1, "ops", "batch")?;
    let db = tb.add_pod_in(&n2, "shop", "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let mut c2 = tb.tunnel_config(&n2, &[&db]);
    c2["policies"] = db_policies();
    c2["namespaces"] = json!({"shop": {"mtls": "strict"}});
    let t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web, &batch]))?;
    let t2 = tb.start_tunnel(&n2, c2)?;
    let to = db.addr4(5432).to_string();

    // A refused call first: the ring is fed and read, so that "no failure"
    // for web below means none happened, not that none could be seen.
    assert_ne!(agent::probe(&tb, &batch.place(), db.addr4(5432))?["result"], "ok");
    let failed = |v: &Value| v["failures"]["matching"].as_array().is_some_and(|m| !m.is_empty());
    explain_until(&t1, &tb, &batch.key(), &to, failed)?;
    explain_until(&t2, &tb, &batch.key(), &to, failed)?;

    assert_eq!(agent::connect(&tb, &web.place(), db.addr4(5432), 2, 1)?.ok, 2);

    // The destination's node decides: the policy and rule that allow it.
    let (code, v) = t2.explain_json(&tb, &web.key(), &to)?;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["verdict"]["ok"], true, "{v:#}");
    assert_eq!(s(&v, "/verdict/cause"), "allowed", "{v:#}");
    assert_eq!(s(&v, "/verdict/summary"), "allowed: policy shop/db-from-web rule 0", "{v:#}");
    assert_eq!(s(&v, "/policy/decision"), "allow");
    assert_eq!(v["policy"]["decided_here"], true);
    assert_eq!(s(&v, "/policy/caller"), web.identity());
    assert_eq!(s(&v, "/destination/kind"), "workload");
    assert_eq!(s(&v, "/destination/expected_identity"), db.identity());
    assert_eq!(s(&v, "/destination/workload/mtls"), "strict");
    assert_eq!(s(&v, "/destination/workload/authorization"), "enforce");
    assert_eq!(s(&v, "/destination/workload/enrollment"), "enrolled");
    assert_eq!(s(&v, "/destination/workload/certificate/state"), "valid");
    assert_eq!(v["failures"]["matching"], json!([]), "{v:#}");

    // The source's node: its certificate, the trust bundle, no failure.
    let (code, v) = t1.explain_json(&tb, &web.ip4.to_string(), &to)?;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(s(&v, "/source/workload/name"), web.key(), "found by address");
    assert_eq!(v["source"]["workload"]["on_this_node"], true);
    let serial = s(&v, "/source/workload/certificate/serial");
    let held = t1.cert_status(&tb, &web.identity())?;
    assert_eq!(serial, held["serial"].as_str().unwrap_or("?"), "the certificate `ztunnel certs` shows");
    assert!(!s(&v, "/source/workload/certificate/not_after").is_empty(), "{v:#}");
    assert!(!s(&v, "/source/workload/certificate/last_renewal").is_empty(), "{v:#}");
    assert_eq!(s(&v, "/trust/trust_domain"), "cluster.local");
    let roots = v["trust"]["roots"].as_array().cloned().unwrap_or_default();
    assert_eq!(roots.len(), 1, "{v:#}");
    assert_eq!(roots[0]["fingerprint"], v["trust"]["signing_root"], "{v:#}");
    assert!(roots[0]["expires_in_seconds"].as_i64().unwrap_or(0) > 86_400 * 365, "{v:#}");
    assert!(!s(&roots[0], "/subject").is_empty(), "{v:#}");
    assert_eq!(v["failures"]["matching"], json!([]), "{v:#}");

    let (code, text) = t1.explain(&tb, &web.key(), &to, false)?;
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("OK: allowed"), "the verdict comes first:\n{text}");
    assert!(text.contains(&format!("certificate valid serial {serial}")), "{text}");

    // A caller outside the mesh (n1's own address) calls in plaintext, and
    // db's namespace is strict.
    let (code, v) = t2.explain_json(&tb, &n1.ip4.to_string(), &to)?;
    assert_eq!((code, s(&v, "/source/kind")), (1, "outside_mesh"), "{v:#}");
    assert_eq!(
        (s(&v, "/policy/caller"), s(&v, "/verdict/cause")),
        ("plaintext", "plaintext_refused"),
        "{v:#}"
    );
    // A workload the configuration does not have is bad input: exit 2.
    let err = t1.explain(&tb, "shop/nosuch", &to, false).map(|(_, out)| out).unwrap_err().to_string();
    assert!(err.contains("exited 2") && err.contains("no workload `shop/nosuch`"), "{err}");
    Ok(())
}

#[test]
fn a_policy_denial_names_the_policy_and_rule_on_the_callee_and_the_401_on_the_caller() -> anyhow::Result<()> {
    let mut tb = Testbed::new("expldeny")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let batch = tb.add_pod_in(&n1, "ops", "batch")?;
    let db = tb.add_pod_in(&n2, "shop", "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let mut c2 = tb.tunnel_config(&n2, &[&db]);
    c2["policies"] = db_policies();
    let t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&batch]))?;
    let t2 = tb.start_tunnel(&n2, c2)?;
    let to = db.addr4(5432).to_string();

    assert_ne!(agent::probe(&tb, &batch.place(), db.addr4(5432))?["result"], "ok");

    // The callee's node: the DENY policy and its rule, and the refusal.
    let (code, v) = explain_until(&t2, &tb, &batch.key(), &to, |v| {
        v["failures"]["matching"].as_array().is_some_and(|m| !m.is_empty())
    })?;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["verdict"]["ok"], false);
    assert_eq!(s(&v, "/verdict/cause"), "denied_by_policy", "{v:#}");
    assert_eq!(s(&v, "/verdict/summary"), "denied by policy shop/no-batch rule 1", "{v:#}");
    assert_eq!((s(&v, "/policy/policy"), v["policy"]["rule"].as_u64()), ("shop/no-batch", Some(1)));
    let f = &v["failures"]["matching"][0];
    assert_eq!((s(f, "/direction"), s(f, "/reason")), ("inbound", "denied_by_policy"), "{v:#}");
    assert_eq!((s(f, "/policy"), f["rule"].as_u64()), ("shop/no-batch", Some(1)), "{v:#}");
    assert_eq!(s(f, "/source_identity"), batch.identity());

    // The caller's node has no such policy; its tunnel saw the 401.
    let (code, v) = explain_until(&t1, &tb, &batch.key(), &to, |v| v["verdict"]["cause"] == "policy_denied")?;
    assert_eq!(code, 1, "{v:#}");
    assert!(s(&v, "/verdict/summary").contains("401"), "{v:#}");
    assert!(s(&v, "/verdict/summary").contains("n2"), "names the node that decides: {v:#}");
    assert_eq!(v["policy"]["decided_here"], false, "{v:#}");
    assert_eq!(s(&v, "/failures/matching/0/direction"), "outbound");

    let (code, text) = t2.explain(&tb, &batch.key(), &to, false)?;
    assert_eq!(code, 1);
    assert!(text.starts_with("FAILS: denied by policy shop/no-batch rule 1"), "{text}");
    Ok(())
}

/// A rogue tunnel answers on db:15008 (n2 runs none) with `cert`; web's
/// call fails and its node's `explain` is returned once it names `cause`.
fn rogue_call(
    tag: &str,
    cert: impl FnOnce(&Crafter, &str) -> Arc<CertifiedKey>,
    cause: &str,
) -> anyhow::Result<(i32, Value, String, String)> {
    let mut tb = Testbed::new(tag)?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let ours = Crafter::testbed(&tb.ca_dir());
    let _rogue = RogueServer::start(&db.netns, db.addr4(15008), cert(&ours, &db.identity()), ours.bundle());
    let to = db.addr4(5432).to_string();
    assert_ne!(agent::probe(&tb, &web.place(), db.addr4(5432))?["result"], "ok");
    let (code, v) = explain_until(&t1, &tb, &web.key(), &to, |v| v["verdict"]["cause"] == cause)?;
    let (_, text) = t1.explain(&tb, &web.key(), &to, false)?;
    assert_eq!(s(&v, "/destination/expected_identity"), db.identity(), "{v:#}");
    Ok((code, v, text, db.identity()))
}

#[test]
fn a_destination_with_an_expired_certificate_is_named_with_its_expiry() -> anyhow::Result<()> {
    let (code, v, text, _) = rogue_call("explexp", |ca, id| ca.leaf(id, -7200, -3600), "expired")?;
    assert_eq!(code, 1, "{v:#}");
    let f = &v["failures"]["matching"][0];
    assert_eq!((s(f, "/direction"), s(f, "/reason")), ("outbound", "expired"), "{v:#}");
    let not_after = s(f, "/certificate/not_after");
    let expired = humantime::parse_rfc3339(not_after)?;
    let ago = SystemTime::now().duration_since(expired)?;
    // Made to expire an hour ago; minutes of slack for a slow machine.
    assert!(ago > Duration::from_secs(3000) && ago < Duration::from_secs(4200), "{not_after}");
    let summary = s(&v, "/verdict/summary");
    assert!(
        summary.starts_with(&format!("the destination's certificate expired at {not_after}")),
        "{summary}"
    );
    assert!(
        text.starts_with(&format!("FAILS: the destination's certificate expired at {not_after}")),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_destination_presenting_another_identity_is_named_with_both_identities() -> anyhow::Result<()> {
    let impostor = "spiffe://cluster.local/ns/default/sa/impostor";
    let (code, v, text, expected) =
        rogue_call("explid", |ca, _| ca.leaf(impostor, -60, 3600), "wrong_identity")?;
    assert_eq!(code, 1, "{v:#}");
    let f = &v["failures"]["matching"][0];
    assert_eq!(s(f, "/certificate/presented_identity"), impostor, "{v:#}");
    assert_eq!(s(f, "/certificate/expected"), expected, "{v:#}");
    let want = format!("peer presented identity {impostor}, expected {expected}");
    assert!(s(&v, "/verdict/summary").starts_with(&want), "{v:#}");
    assert!(text.starts_with(&format!("FAILS: {want}")), "{text}");
    Ok(())
}
