//! The mTLS data path end to end: real capture, real HBONE between two node
//! tunnels, real certificates from a real CA.

use ztunnel_testbed::{
    Testbed,
    agent::{self, Held, Server},
};
use ztunnel_tests::{WAIT, field};

#[test]
fn pod_to_pod_across_nodes_goes_over_mtls_and_the_server_sees_the_real_caller() -> anyhow::Result<()> {
    let mut tb = Testbed::new("hbone")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let server = Server::start(&tb, &db.place(), &[db.addr4(5432), db.addr6(5432)])?;
    let t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;

    for dst in [db.addr4(5432), db.addr6(5432)] {
        let r = agent::connect(&tb, &web.place(), dst, 3, 3)?;
        assert_eq!(r.ok, 3, "{dst}: {:?}\n{}", r.errors, t1.log_tail(20));
    }
    let out = t1.wait_access_log(6, WAIT, |e| e["direction"] == "outbound")?;
    for e in &out {
        assert_eq!(field(e, "mode"), "hbone", "{e}");
        assert_eq!(field(e, "reason"), "ok", "{e}");
        assert_eq!(field(e, "destination_identity"), db.identity());
    }
    let inbound = t2.wait_access_log(6, WAIT, |e| e["direction"] == "inbound")?;
    for e in &inbound {
        assert_eq!(field(e, "mode"), "hbone", "{e}");
        assert_eq!(field(e, "source_identity"), web.identity(), "{e}");
    }
    // The application saw the caller's own address, not a tunnel's.
    for a in server.accepted()? {
        let peer = field(&a, "peer");
        assert!(
            peer.starts_with(&format!("{}:", web.ip4)) || peer.starts_with(&format!("[{}]:", web.ip6)),
            "{a}"
        );
    }
    Ok(())
}

#[test]
fn a_gibibyte_arrives_intact_in_both_directions() -> anyhow::Result<()> {
    let mut tb = Testbed::new("gib")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let _t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;
    // 1 GiB up while the echo brings it back down: both directions at once.
    let r = agent::transfer(&tb, &web.place(), db.addr4(5432), 1 << 30)?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["sent_sha256"], r["received_sha256"]);
    let line = t1.wait_access_log(1, WAIT, |e| e["mode"] == "hbone")?;
    assert_eq!(line[0]["bytes_sent"], 1u64 << 30, "{}", line[0]);
    // The echo plus the server's one-line hello.
    assert!(line[0]["bytes_received"].as_u64().unwrap_or(0) > 1u64 << 30, "{}", line[0]);
    eprintln!("1 GiB echo through two tunnels: {r}");
    Ok(())
}

mod rogue;

use std::net::SocketAddr;

use rogue::{Crafter, Outcome, RogueServer, hbone_request, request};

#[test]
fn pod_to_pod_on_the_same_node_goes_through_hbone_too() -> anyhow::Result<()> {
    let mut tb = Testbed::new("samenode")?;
    let n1 = tb.add_node("n1")?;
    let web = tb.add_pod(&n1, "web")?;
    let api = tb.add_pod(&n1, "api")?;
    let server = Server::start(&tb, &api.place(), &[api.addr4(8080)])?;
    let t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web, &api]))?;
    assert_eq!(agent::connect(&tb, &web.place(), api.addr4(8080), 2, 2)?.ok, 2);
    let out = t1.wait_access_log(2, WAIT, |e| e["direction"] == "outbound" && e["mode"] == "hbone")?;
    assert!(out.iter().all(|e| field(e, "reason") == "ok"));
    let inbound = t1.wait_access_log(2, WAIT, |e| e["direction"] == "inbound" && e["mode"] == "hbone")?;
    assert!(inbound.iter().all(|e| field(e, "source_identity") == web.identity()));
    assert!(server.accepted()?.iter().all(|a| field(a, "peer").starts_with(&format!("{}:", web.ip4))));
    Ok(())
}

#[test]
fn plain_host_workloads_and_pods_reach_each_other_over_mtls() -> anyhow::Result<()> {
    let mut tb = Testbed::new("hostwl")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let backup = tb.add_host_workload(&n1, "backup")?;
    let db = tb.add_pod(&n2, "db")?;
    let db_server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let backup_server = Server::start(&tb, &backup.place(), &[backup.addr4(7000)])?;
    let t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&backup]))?;
    let t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;

    // Plain-host workload -> pod.
    assert_eq!(agent::connect(&tb, &backup.place(), db.addr4(5432), 1, 1)?.ok, 1);
    let e = &t1.wait_access_log(1, WAIT, |e| e["direction"] == "outbound")?[0];
    assert_eq!((field(e, "mode"), field(e, "source_workload")), ("hbone", backup.key().as_str()), "{e}");
    assert!(field(&db_server.accepted()?[0], "peer").starts_with(&format!("{}:", n1.ip4)));
    // Pod -> plain-host workload: terminated by the node's :15008.
    assert_eq!(agent::connect(&tb, &db.place(), backup.addr4(7000), 1, 1)?.ok, 1);
    let e = &t1.wait_access_log(1, WAIT, |e| e["direction"] == "inbound")?[0];
    assert_eq!(field(e, "source_identity"), db.identity(), "{e}");
    assert_eq!(field(e, "destination_workload"), backup.key(), "{e}");
    assert!(field(&backup_server.accepted()?[0], "peer").starts_with(&format!("{}:", db.ip4)));
    drop(t2);
    Ok(())
}

#[test]
fn the_traffic_between_nodes_is_tls_and_never_the_applications_bytes() -> anyhow::Result<()> {
    let mut tb = Testbed::new("pcap")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let _db_server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let _outside = ztunnel_tests::node_server(&tb, &n2, &[9999])?;
    let _t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let _t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;
    const SECRET: &str = "ZTUNNEL-TEST-SECRET-PAYLOAD-7f3a9c";

    let capture = agent::Capture::start(&tb, &n1.netns, "eth0")?;
    let r = agent::connect_text(&tb, &web.place(), db.addr4(5432), SECRET, 64 * 1024)?;
    assert_eq!(r.ok, 1, "{:?}", r.errors);
    let file = capture.file.clone();
    let bytes = capture.stop()?;
    assert!(!contains(&bytes, SECRET.as_bytes()), "the application's bytes crossed the network in the clear");
    let hellos = agent::Capture::fields(&file, "tls.handshake.type == 1", "tcp.dstport")?;
    assert!(hellos.iter().any(|p| p == "15008"), "no TLS ClientHello to 15008: {hellos:?}");
    let versions = agent::Capture::fields(
        &file,
        "tls.handshake.type == 2",
        "tls.handshake.extensions.supported_version",
    )?;
    assert!(versions.iter().all(|v| v.contains("0x0304")), "TLS 1.3 only: {versions:?}");

    // Control: the same capture does see plaintext to a destination outside the mesh.
    let capture = agent::Capture::start(&tb, &n1.netns, "eth0")?;
    assert_eq!(agent::connect_text(&tb, &web.place(), SocketAddr::from((n2.ip4, 9999)), SECRET, 1024)?.ok, 1);
    assert!(contains(&capture.stop()?, SECRET.as_bytes()), "the capture must be able to see plaintext");
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn half_close_crosses_both_tunnels() -> anyhow::Result<()> {
    let mut tb = Testbed::new("halfcls")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let _server = Server::reply_after_eof(&tb, &db.place(), &[db.addr4(5432)])?;
    let _t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let _t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;
    // The server answers only after it saw the client's FIN, on a connection
    // whose other direction must still be open.
    let r = agent::half_close(&tb, &web.place(), db.addr4(5432), 100_000)?;
    assert_eq!(r["ok"], true, "{r}");
    Ok(())
}

#[test]
fn a_thousand_concurrent_streams_share_a_few_pooled_connections() -> anyhow::Result<()> {
    let mut tb = Testbed::new("pool")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let _t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;
    let r = agent::connect(&tb, &web.place(), db.addr4(5432), 1000, 1000)?;
    assert_eq!(r.ok, 1000, "{:?}", r.errors);
    let lines = t1.wait_access_log(1000, 2 * WAIT, |e| e["mode"] == "hbone")?;
    let mut connections: Vec<u64> = lines.iter().filter_map(|e| e["hbone_connection"].as_u64()).collect();
    connections.sort_unstable();
    connections.dedup();
    // 100 streams per connection: ten connections carry 1000 streams at once.
    assert!((10..=12).contains(&connections.len()), "{} pooled connections", connections.len());
    Ok(())
}

#[test]
fn a_callee_with_the_wrong_identity_an_unknown_ca_or_a_bad_validity_is_refused_with_the_reason()
-> anyhow::Result<()> {
    let mut tb = Testbed::new("badsrv")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?; // no tunnel on n2: a rogue answers on db:15008
    let t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let ours = Crafter::testbed(&tb.ca_dir());
    let stranger = Crafter::stranger();
    let cases = [
        (
            "an impostor",
            ours.leaf("spiffe://cluster.local/ns/default/sa/impostor", -60, 3600),
            "wrong_identity",
        ),
        ("another CA", stranger.leaf(&db.identity(), -60, 3600), "unknown_ca"),
        ("an expired certificate", ours.leaf(&db.identity(), -7200, -3600), "expired"),
        (
            "a certificate from the future (clock skew)",
            ours.leaf(&db.identity(), 3600, 7200),
            "not_yet_valid",
        ),
        (
            "another trust domain",
            ours.leaf("spiffe://evil.example/ns/default/sa/db", -60, 3600),
            "wrong_trust_domain",
        ),
        (
            "no SPIFFE ID (a DNS name only)",
            ours.leaf_with(vec![rcgen::SanType::DnsName("db.example".try_into()?)], -60, 3600),
            "no_spiffe_id",
        ),
        (
            "a SPIFFE ID that names no workload",
            ours.leaf("spiffe://cluster.local/db", -60, 3600),
            "invalid_spiffe_id",
        ),
    ];
    for (what, cert, reason) in cases {
        let _rogue = RogueServer::start(&db.netns, db.addr4(15008), cert, ours.bundle());
        let out = agent::probe(&tb, &web.place(), db.addr4(5432))?;
        assert_ne!(out["result"], "ok", "{what}: {out}");
        let line = t1.wait_access_log(1, WAIT, |e| e["reason"] == reason)?;
        assert_eq!(line[0]["decision"], "deny", "{what}: {}", line[0]);
    }
    let metrics = t1.metrics()?;
    for reason in [
        "wrong_identity",
        "unknown_ca",
        "expired",
        "not_yet_valid",
        "wrong_trust_domain",
        "no_spiffe_id",
        "invalid_spiffe_id",
    ] {
        // The whole line: `... 1` must not pass for `... 12`.
        let want =
            format!("ztunnel_handshake_failures_total{{direction=\"outbound\",reason=\"{reason}\"}} 1");
        assert!(metrics.lines().any(|l| l == want), "{reason} not counted once:\n{metrics}");
    }
    Ok(())
}

#[test]
fn callers_with_bad_certificates_or_bad_requests_are_refused_and_the_tunnel_stays_healthy()
-> anyhow::Result<()> {
    let mut tb = Testbed::new("badcli")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;
    let ours = Crafter::testbed(&tb.ca_dir());
    let stranger = Crafter::stranger();
    let target = db.addr4(15008);
    let connect = || request(http::Method::CONNECT, &db.addr4(5432).to_string());
    let valid = || ours.leaf(&web.identity(), -60, 3600);
    let call = |cert, req| hbone_request(&web.netns, target, cert, ours.bundle(), &db.identity(), req);

    // Certificates the callee must refuse, each with its reason.
    for (cert, reason) in [
        (ours.leaf(&web.identity(), -7200, -3600), "expired"),
        (stranger.leaf(&web.identity(), -60, 3600), "unknown_ca"),
        (ours.leaf("spiffe://evil.example/ns/default/sa/web", -60, 3600), "wrong_trust_domain"),
    ] {
        assert!(matches!(call(cert, connect()), Outcome::Failed(_)), "{reason}");
        t2.wait_access_log(1, WAIT, |e| e["reason"] == reason)?;
    }
    // Requests the callee must refuse, with Istio's status codes.
    assert_eq!(call(valid(), request(http::Method::GET, &db.addr4(5432).to_string())), Outcome::Status(400));
    assert_eq!(call(valid(), request(http::Method::CONNECT, "198.19.99.99:5432")), Outcome::Status(400));
    assert_eq!(
        call(valid(), request(http::Method::CONNECT, &db.addr4(15001).to_string())),
        Outcome::Status(503)
    );
    assert_eq!(
        call(valid(), request(http::Method::CONNECT, &db.addr4(5999).to_string())),
        Outcome::Status(503)
    );
    assert_eq!(call(valid(), connect()), Outcome::Status(200));
    for reason in ["bad_request", "authority_mismatch", "self_call", "destination_unreachable"] {
        t2.wait_access_log(1, WAIT, |e| e["reason"] == reason)?;
    }
    // Not HBONE at all: plaintext HTTP on 15008.
    let plain = ztunnel_testbed::in_netns(&web.netns, move || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(target)?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n")?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        Ok(buf)
    })?;
    assert!(!plain.starts_with(b"HTTP/1.1 200"), "plaintext must not be served");
    t2.wait_access_log(1, WAIT, |e| e["reason"] == "not_tls" || e["reason"] == "protocol_mismatch")?;

    // The tunnel is still healthy: a real caller gets through.
    let t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    assert_eq!(agent::connect(&tb, &web.place(), db.addr4(5432), 2, 2)?.ok, 2);
    t1.wait_access_log(2, WAIT, |e| e["reason"] == "ok")?;
    Ok(())
}

#[test]
fn an_unreachable_destination_is_reported_as_such_and_the_caller_is_reset() -> anyhow::Result<()> {
    let mut tb = Testbed::new("unreach")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?; // enrolled, but nothing listens on 5432
    let t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let _t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;
    let out = agent::probe(&tb, &web.place(), db.addr4(5432))?;
    assert!(matches!(out["result"].as_str(), Some("reset" | "eof")), "{out}");
    let line = &t1.wait_access_log(1, WAIT, |e| e["direction"] == "outbound")?[0];
    assert_eq!(field(line, "reason"), "destination_unreachable", "{line}");
    Ok(())
}

/// Established TCP connections from `netns` to port `port`.
fn established_to(netns: &str, port: u16) -> anyhow::Result<usize> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-Htn", "state", "established"])
        .arg(format!("( dport = :{port} )"))
        .output()?;
    anyhow::ensure!(out.status.success(), "ss: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count())
}

#[test]
fn an_idle_pooled_connection_is_closed_after_the_idle_timeout() -> anyhow::Result<()> {
    let mut tb = Testbed::new("idle")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let mut c1 = tb.tunnel_config(&n1, &[&web]);
    c1["proxy"]["pool_idle_timeout"] = serde_json::json!("1s");
    let _t1 = tb.start_tunnel(&n1, c1)?;
    let _t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;
    // A held stream keeps the pooled connection busy (not idle) until it is
    // seen: after 1 s of idleness it may go at any moment.
    let held = Held::open(&tb, &web.place(), db.addr4(5432))?;
    assert_eq!(agent::connect(&tb, &web.place(), db.addr4(5432), 3, 3)?.ok, 3);
    assert!(established_to(&web.netns, 15008)? >= 1, "no pooled connection to db:15008");
    drop(held);
    // Idle: the pool lets go, and the TLS connection really closes (on both
    // ends), instead of being kept alive by its keepalive pings.
    assert!(
        ztunnel_tests::eventually(WAIT, || established_to(&web.netns, 15008).is_ok_and(|n| n == 0)),
        "the idle pooled connection is still open: {:?} established to :15008",
        established_to(&web.netns, 15008)
    );
    // The next call opens a fresh one.
    assert_eq!(agent::connect(&tb, &web.place(), db.addr4(5432), 1, 1)?.ok, 1);
    Ok(())
}

#[test]
fn a_workload_that_may_not_leave_the_mesh_is_refused_passthrough() -> anyhow::Result<()> {
    let mut tb = Testbed::new("passthru")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let api = tb.add_pod(&n1, "api")?;
    let db = tb.add_pod(&n2, "db")?;
    let _db_server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let _outside = ztunnel_tests::node_server(&tb, &n2, &[9999])?;
    let mut c1 = tb.tunnel_config(&n1, &[&web, &api]);
    for w in c1["workloads"].as_array_mut().into_iter().flatten() {
        if w["name"] == "web" {
            w["outbound_passthrough"] = serde_json::json!("refuse");
        }
    }
    let t1 = tb.start_tunnel(&n1, c1)?;
    let _t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;
    let outside = SocketAddr::from((n2.ip4, 9999));

    let out = agent::probe(&tb, &web.place(), outside)?;
    assert_eq!(out["result"], "reset", "{out}");
    let e = &t1.wait_access_log(1, WAIT, |e| e["reason"] == "passthrough_refused")?[0];
    assert_eq!((field(e, "source_workload"), field(e, "decision")), (web.key().as_str(), "deny"), "{e}");
    // The mesh is still reachable, and another workload may still leave it.
    assert_eq!(agent::connect(&tb, &web.place(), db.addr4(5432), 1, 1)?.ok, 1);
    assert_eq!(agent::connect(&tb, &api.place(), outside, 1, 1)?.ok, 1);
    Ok(())
}
