//! One workload must never be able to hurt another, the tunnel or the node.
//! Each test is an attack a hostile workload (or a hostile process on the
//! node, or a hostile peer) can make, run over the real testbed, and what
//! must happen instead.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde_json::json;
use ztunnel_testbed::{
    Testbed,
    agent::{self, Held, Hoard, Server},
};
use ztunnel_tests::{eventually, field, node_server};

const WAIT: Duration = Duration::from_secs(10);

/// A pod that dials its own tunnel's ports (loopback or its own address) is
/// refused at connect(), counted, and never loops back into the tunnel; a
/// process that reaches the in-pod listeners around capture (in the pod's
/// namespace, outside its cgroup) is refused by the tunnel itself.
#[test]
fn a_workload_dialling_its_own_tunnel_is_refused_and_never_loops() -> anyhow::Result<()> {
    let mut tb = Testbed::new("selfcall")?;
    let n1 = tb.add_node("n1")?;
    let web = tb.add_pod(&n1, "web")?;
    let backup = tb.add_host_workload(&n1, "backup")?;
    let tunnel = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web, &backup]))?;
    let fds = tunnel.open_fds()?;

    let targets: Vec<SocketAddr> = [15001, 15006, 15008]
        .iter()
        .flat_map(|p| {
            [
                SocketAddr::from(([127, 0, 0, 1], *p)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, *p)),
                web.addr4(*p),
            ]
        })
        .collect();
    for to in &targets {
        let r = agent::probe(&tb, &web.place(), *to)?;
        assert_eq!(r["result"], "denied", "{to}: {r}");
    }
    // A plain-host workload shares the node's namespace: the node's admin,
    // metrics and readiness ports are its tunnel's too.
    for p in [15000, 15020, 15021, 15008] {
        let to = SocketAddr::from(([127, 0, 0, 1], p));
        assert_eq!(agent::probe(&tb, &backup.place(), to)?["result"], "denied", "{to}");
    }
    assert_eq!(tunnel.capture_counter("self_call")?, targets.len() as u64 + 4);

    // Around capture: a process in the pod's namespace but not its cgroup
    // reaches the in-pod :15006 listener directly. The tunnel refuses it
    // instead of delivering it back to itself.
    let outsider = ztunnel_testbed::Place { cgroup: n1.unenrolled().cgroup, netns: web.netns.clone() };
    for _ in 0..5 {
        let r = agent::probe(&tb, &outsider, "127.0.0.1:15006".parse()?)?;
        assert_eq!(r["result"], "reset", "{r}");
    }
    let refused = tunnel.wait_access_log(5, WAIT, |e| field(e, "reason") == "self_call")?;
    assert_eq!(refused.len(), 5);
    // No loop: the tunnel holds what it held before (a loop took 20,000
    // descriptors in under two seconds).
    std::thread::sleep(Duration::from_millis(500));
    let after = tunnel.open_fds()?;
    assert!(after <= fds + 8, "descriptors went {fds} -> {after}");
    // The listener still serves steered connections: the refusal was the
    // tunnel's choice, not a dead listener.
    let server = Server::start(&tb, &web.place(), &[web.addr4(8080)])?;
    let caller = tb.add_pod(&n1, "caller")?;
    drop(tunnel);
    let tunnel = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    assert_eq!(agent::probe(&tb, &caller.place(), web.addr4(8080))?["result"], "ok");
    assert_eq!(server.accepted()?.len(), 1);
    drop(tunnel);
    Ok(())
}

/// A socket belongs to the workload whose task created it: one moved into
/// another workload's cgroup before connect() (as a socket passed over a
/// unix socket would be) is refused, as is an MPTCP socket, whose subflows
/// capture could not follow.
#[test]
fn a_socket_is_attributed_to_where_it_was_made_or_refused() -> anyhow::Result<()> {
    let mut tb = Testbed::new("foreign")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let a = tb.add_host_workload(&n1, "a")?;
    let b = tb.add_host_workload(&n1, "b")?;
    let server = node_server(&tb, &n2, &[8080])?;
    let mut config = tb.tunnel_config(&n1, &[&a, &b]);
    for (w, port) in config["workloads"].as_array_mut().into_iter().flatten().zip([7001, 7002]) {
        w["ports"] = json!([port]);
    }
    let tunnel = tb.start_tunnel(&n1, config)?;
    let dst = SocketAddr::from((n2.ip4, 8080));

    // Seen when made and used in one place: the probe works and is captured.
    assert_eq!(agent::probe_with(&tb, &a.place(), dst, None, false)?["result"], "ok");
    assert_eq!(tunnel.capture_counter("captured")?, 1, "{}", tunnel.config_dump()?);
    // Made in a, connected from b.
    let r = agent::probe_with(&tb, &a.place(), dst, Some(&b.cgroup), false)?;
    assert_eq!(r["result"], "denied", "{r}");
    // Made outside any workload, connected from a.
    let r = agent::probe_with(&tb, &n1.unenrolled(), dst, Some(&a.cgroup), false)?;
    assert_eq!(r["result"], "denied", "{r}");
    // Made in a, connected from outside every workload: not let out either.
    let r = agent::probe_with(&tb, &a.place(), dst, Some(&n1.unenrolled().cgroup), false)?;
    assert_eq!(r["result"], "denied", "{r}");
    assert_eq!(tunnel.capture_counter("foreign_socket")?, 3);
    assert_eq!(server.accepted()?.len(), 1, "only the first probe reached the server");

    if std::fs::read_to_string("/proc/sys/net/mptcp/enabled").is_ok_and(|v| v.trim() == "1") {
        let r = agent::probe_with(&tb, &a.place(), dst, None, true)?;
        assert_eq!(r["result"], "denied", "{r}");
        // MPTCP connects through a subflow the kernel makes itself: a socket
        // no workload created, refused as foreign if not as MPTCP.
        let refused =
            tunnel.capture_counter("refused_protocol")? + tunnel.capture_counter("foreign_socket")?;
        assert_eq!(refused, 4);
        assert_eq!(server.accepted()?.len(), 0);
    } else {
        eprintln!("MPTCP is not enabled on this kernel: its refusal is not exercised");
    }
    Ok(())
}

/// A workload cgroup deeper than the programs look is refused at
/// enrollment (never silently left uncaptured).
#[test]
fn a_cgroup_too_deep_to_be_captured_is_refused_at_enrollment() -> anyhow::Result<()> {
    let mut tb = Testbed::new("deep")?;
    let n1 = tb.add_node("n1")?;
    let mut deep = n1.cgroup.clone();
    for i in 0..26 {
        deep.push(format!("l{i}"));
    }
    std::fs::create_dir_all(&deep)?;
    let mut config = tb.tunnel_config(&n1, &[]);
    config["workloads"] = json!([{"name": "deep", "cgroup": deep}]);
    let tunnel = tb.start_tunnel(&n1, config)?;
    let dump = tunnel.config_dump()?;
    let status = &dump["workloads"][0];
    assert_eq!(status["state"], "failed", "{status}");
    assert!(field(status, "error").contains("levels deep"), "{status}");
    Ok(())
}

/// A unit restarted into a new cgroup below a guard cgroup fails closed
/// until it is enrolled again, which happens at once (the new cgroup is
/// noticed), not at the next reload tick: no connection escapes capture.
#[test]
fn a_restarted_unit_fails_closed_until_it_is_captured_again() -> anyhow::Result<()> {
    let mut tb = Testbed::new("restart")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let server = node_server(&tb, &n2, &[8080])?;
    let slice = n1.cgroup.join("workloads.slice");
    let unit = slice.join("backup.service");
    std::fs::create_dir_all(&unit)?;
    let mut config = tb.tunnel_config(&n1, &[]);
    config["workloads"] = json!([{"name": "backup", "cgroup": unit}]);
    config["capture"]["guard_cgroups"] = json!([slice]);
    // A slow tick: only the cgroup watch can explain a prompt re-enrollment.
    config["proxy"]["reload_interval"] = json!("1h");
    let tunnel = tb.start_tunnel(&n1, config)?;
    let place = ztunnel_testbed::Place { cgroup: unit.clone(), netns: n1.netns.clone() };
    let dst = SocketAddr::from((n2.ip4, 8080));
    assert_eq!(agent::probe(&tb, &place, dst)?["result"], "ok");

    // The restart: the old cgroup goes, a new one (a new id) comes, and the
    // unit connects at once, again and again.
    std::fs::remove_dir(&unit)?;
    std::fs::create_dir(&unit)?;
    let started = Instant::now();
    let mut outcomes = Vec::new();
    loop {
        let r = agent::probe(&tb, &place, dst)?;
        let ok = r["result"] == "ok";
        outcomes.push(r["result"].as_str().unwrap_or_default().to_owned());
        if ok || started.elapsed() > WAIT {
            break;
        }
    }
    assert_eq!(outcomes.last().map(String::as_str), Some("ok"), "enrolled again: {outcomes:?}");
    assert!(outcomes.iter().all(|o| o == "ok" || o == "denied"), "{outcomes:?}");
    // Every connection the server saw was one the tunnel carried (logged):
    // none escaped capture in the window.
    let accepted = server.accepted()?.len();
    let carried = tunnel.wait_access_log(accepted, WAIT, |e| field(e, "direction") == "outbound")?;
    assert_eq!(carried.len(), accepted, "server saw {accepted}, tunnel carried {}", carried.len());
    let refused_in_window = tunnel.capture_counter("unenrolled_in_guard")?;
    eprintln!("after the restart: {outcomes:?}; {refused_in_window} refused while not enrolled");
    // And a process below the guard in no workload at all is refused.
    let stray = slice.join("stray.service");
    std::fs::create_dir_all(&stray)?;
    let stray = ztunnel_testbed::Place { cgroup: stray, netns: n1.netns.clone() };
    assert_eq!(agent::probe(&tb, &stray, dst)?["result"], "denied");
    assert!(tunnel.capture_counter("unenrolled_in_guard")? > refused_in_window);
    Ok(())
}

/// If the tunnel dies mid-stream, both ends see a reset: never a FIN that
/// makes a truncated transfer look complete.
#[test]
fn a_killed_tunnel_resets_both_ends_of_what_it_carried() -> anyhow::Result<()> {
    let mut tb = Testbed::new("crash")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let api = tb.add_pod(&n2, "api")?;
    let outside = node_server(&tb, &n2, &[8080])?;
    let _server = Server::start(&tb, &api.place(), &[api.addr4(8080)])?;
    let mut t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let _t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&api]))?;
    let mut mesh = Held::open(&tb, &web.place(), api.addr4(8080))?;
    let mut passthrough = Held::open(&tb, &web.place(), SocketAddr::from((n2.ip4, 8080)))?;
    mesh.ping("before")?;
    passthrough.ping("before")?;
    assert_eq!(outside.accepted()?.len(), 1);

    t1.kill()?;
    for held in [&mut mesh, &mut passthrough] {
        let v = held.send("after")?;
        assert_eq!((v["event"].as_str(), v["kind"].as_str()), (Some("error"), Some("reset")), "{v}");
    }
    Ok(())
}

/// Reading the admin endpoint is open to the node; changing the tunnel
/// (every POST) needs the token only root can read.
#[test]
fn changing_the_tunnel_through_its_admin_endpoint_needs_the_token() -> anyhow::Result<()> {
    let mut tb = Testbed::new("admin")?;
    let n1 = tb.add_node("n1")?;
    let tunnel = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[]))?;
    assert_eq!(tunnel.admin_get("/config_dump")?.0, 200);
    let (status, body) = tunnel.admin_post("/logging?level=debug", None)?;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("admin.token"), "{body}");
    assert_eq!(tunnel.admin_post("/logging?level=debug", Some("not-the-token"))?.0, 401);
    let token = tunnel.admin_token()?;
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(tunnel.run_dir.join("admin.token"))?.permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "only root reads the token");
    let (status, body) = tunnel.admin_post("/logging?level=debug", Some(&token))?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}

/// Each policy mistake that would load and then silently never match is
/// refused at reload, naming the policy; the running configuration stays.
#[test]
fn policy_mistakes_are_refused_at_reload_and_the_running_policy_stays() -> anyhow::Result<()> {
    let mut tb = Testbed::new("polmist")?;
    let n1 = tb.add_node("n1")?;
    let web = tb.add_pod(&n1, "web")?;
    let mut config = tb.tunnel_config(&n1, &[&web]);
    let mut tunnel = tb.start_tunnel(&n1, config.clone())?;
    let generation = tunnel.generation()?;
    let mistakes = [
        (json!({"to": [{"operation": {"ports": ["05432"]}}]}), "port `05432` never matches: write `5432`"),
        (json!({"to": [{"operation": {"ports": ["+5432"]}}]}), "write `5432`"),
        (json!({"from": [{"source": {}}]}), "source is empty"),
        (json!({"to": [{"operation": {}}]}), "operation is empty"),
        (
            json!({"from": [{"source": {"principals": ["spiffe://cluster.local/ns/default/sa/web"]}}]}),
            "written without `spiffe://`, as `cluster.local/ns/default/sa/web`",
        ),
    ];
    for (rule, want) in mistakes {
        config["policies"] =
            json!([{"name": "deny-db", "namespace": "default", "action": "DENY", "rules": [rule]}]);
        let error = tunnel.reload_error(&config)?;
        assert!(error.contains("policy default/deny-db") && error.contains(want), "{error}");
    }
    assert_eq!(tunnel.generation()?, generation, "nothing was applied");
    Ok(())
}

mod rogue;

/// Two plain-host workloads share their node's address: a call to either
/// is decided for the workload that owns the port, under its certificate
/// and its policy; a port nobody owns is refused; a connection made to one
/// of them cannot carry a stream to the other.
#[test]
fn plain_host_workloads_sharing_an_address_are_each_decided_as_themselves() -> anyhow::Result<()> {
    use rogue::{Crafter, Outcome, hbone_request_sni, request};
    let mut tb = Testbed::new("hosts")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let h1 = tb.add_host_workload(&n2, "h1")?;
    let h2 = tb.add_host_workload(&n2, "h2")?;
    let _s1 = Server::start(&tb, &h1.place(), &[h1.addr4(7001)])?;
    let s2 = Server::start(&tb, &h2.place(), &[h2.addr4(7002)])?;
    let unowned = node_server(&tb, &n2, &[2222])?;
    let ports = |config: &mut serde_json::Value| {
        for w in config["workloads"].as_array_mut().into_iter().flatten() {
            match w["name"].as_str() {
                Some("h1") => w["ports"] = json!([7001]),
                Some("h2") => w["ports"] = json!([7002]),
                _ => {}
            }
        }
    };
    let mut c1 = tb.tunnel_config(&n1, &[&web]);
    ports(&mut c1);
    let mut c2 = tb.tunnel_config(&n2, &[&h1, &h2]);
    ports(&mut c2);
    c2["policies"] = json!([{
        "name": "no-web-to-h2", "namespace": "default", "selector": {"matchLabels": {"app": "h2"}},
        "action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/web"]}}]}],
    }]);
    let t1 = tb.start_tunnel(&n1, c1)?;
    let t2 = tb.start_tunnel(&n2, c2)?;

    // Honest callers reach each one under its own identity.
    assert_eq!(agent::probe(&tb, &web.place(), h1.addr4(7001))?["result"], "ok");
    let out = t1.wait_access_log(1, WAIT, |e| e["destination_address"] == h1.addr4(7001).to_string())?;
    assert_eq!(
        (field(&out[0], "destination_identity"), field(&out[0], "reason")),
        (h1.identity().as_str(), "ok")
    );
    let at = |port: u16| {
        let dst = SocketAddr::from((n2.ip4, port)).to_string();
        move |e: &serde_json::Value| e["direction"] == "inbound" && e["destination_address"] == dst
    };
    let e = &t2.wait_access_log(1, WAIT, at(7001))?[0];
    assert_eq!((field(e, "destination_workload"), field(e, "decision")), (h1.key().as_str(), "allow"), "{e}");
    // h2's DENY applies to calls to h2, and only those.
    assert_eq!(agent::probe(&tb, &web.place(), h2.addr4(7002))?["result"], "reset");
    let e = &t2.wait_access_log(1, WAIT, at(7002))?[0];
    assert_eq!(
        (field(e, "destination_workload"), field(e, "reason")),
        (h2.key().as_str(), "denied_by_policy"),
        "{e}"
    );
    assert!(s2.accepted()?.is_empty());

    // A caller with a mesh certificate that picks its own streams.
    let crafter = Crafter::testbed(&tb.ca_dir());
    let cert = crafter.leaf(&web.identity(), -60, 3600);
    let hbone = SocketAddr::from((n2.ip4, 15008));
    let sni = |port: u16| Some(ztunnel::proxy::hbone::pool::sni_for_port(port));
    let call = |sni: Option<String>, expect: &str, port: u16| {
        hbone_request_sni(
            &n1.netns,
            hbone,
            cert.clone(),
            crafter.bundle(),
            expect,
            sni,
            request(http::Method::CONNECT, &format!("{}:{port}", n2.ip4)),
        )
    };
    // Made to h1, a stream to h2's port: refused, never decided as h1.
    assert_eq!(call(sni(7001), &h1.identity(), 7002), Outcome::Status(503));
    // To h2 itself: h2's policy.
    assert_eq!(call(sni(7002), &h2.identity(), 7002), Outcome::Status(401));
    // A port no workload owns: refused, sshd or the kubelet never see it.
    assert_eq!(call(sni(7001), &h1.identity(), 2222), Outcome::Status(503));
    assert!(unowned.accepted()?.is_empty());
    // Without SNI the address is ambiguous (two identities): no handshake.
    assert!(matches!(call(None, &h1.identity(), 7001), Outcome::Failed(_)));
    Ok(())
}

/// One pod holding as many connections as it can get, on a node whose maps
/// are small, while a second pod on the same node keeps calling: the second
/// pod's calls all succeed, the first pod's extra connections are refused
/// and counted.
#[test]
fn a_pod_filling_its_share_of_the_node_leaves_the_others_working() -> anyhow::Result<()> {
    let mut tb = Testbed::new("share")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let greedy = tb.add_pod(&n1, "greedy")?;
    let web = tb.add_pod(&n1, "web")?;
    let api = tb.add_pod(&n2, "api")?;
    let _server = Server::start(&tb, &api.place(), &[api.addr4(8080)])?;
    let outside = node_server(&tb, &n2, &[8080])?;
    let mut c1 = tb.tunnel_config(&n1, &[&greedy, &web]);
    // As in the attack: small capture maps (a quarter of them per workload).
    c1["capture"]["max_connections"] = json!(2000);
    let t1 = tb.start_tunnel(&n1, c1)?;
    let _t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&api]))?;

    let mesh = Hoard::flood(&tb, &greedy.place(), api.addr4(8080), 1200)?;
    let plain = Hoard::flood(&tb, &greedy.place(), SocketAddr::from((n2.ip4, 8080)), 400)?;
    eprintln!(
        "greedy holds {} mesh and {} plain connections: {} / {}",
        mesh.ok(),
        plain.ok(),
        mesh.report,
        plain.report
    );
    assert!(mesh.ok() + plain.ok() <= 500, "beyond its share of 500 sockets");
    assert!(mesh.ok() > 0 && outside.accepted()?.len() == plain.ok());
    let refused = t1.capture_counter("socket_quota")?;
    assert!(refused > 0, "the refusals are counted");

    // Meanwhile its neighbour calls, to the mesh and outside it.
    let to_mesh = agent::connect(&tb, &web.place(), api.addr4(8080), 200, 20)?;
    let to_outside = agent::connect(&tb, &web.place(), SocketAddr::from((n2.ip4, 8080)), 200, 20)?;
    eprintln!(
        "the neighbour's success rate: mesh {}/200, outside {}/200 (greedy refused {refused} times)",
        to_mesh.ok, to_outside.ok
    );
    assert_eq!((to_mesh.ok, to_outside.ok), (200, 200), "{:?} {:?}", to_mesh.errors, to_outside.errors);
    Ok(())
}

/// When the map that lets the tunnel's own deliveries through is full, a
/// delivery comes back to the tunnel's plaintext listener with the
/// caller's identity lost: it is refused and counted, never handed over.
#[test]
fn a_full_delivery_map_fails_closed_and_never_downgrades() -> anyhow::Result<()> {
    let mut tb = Testbed::new("deliver")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let api = tb.add_pod(&n2, "api")?;
    let server = Server::start(&tb, &api.place(), &[api.addr4(8080)])?;
    let _t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&api]))?;
    assert_eq!(agent::probe(&tb, &web.place(), api.addr4(8080))?["result"], "ok", "seen when there is room");
    assert_eq!(server.accepted()?.len(), 1);

    // Fill the map as a flood of hanging deliveries would.
    let map =
        tb.pin_base.join(&n2.name).join(format!("v{}/maps/DELIVERIES", ztunnel::capture::MAP_ABI_VERSION));
    let batch = tb.dir().join("fill-deliveries");
    let mut lines = String::new();
    for i in 0u32..16384 {
        let mut key = [0u8; 40];
        key[..4].copy_from_slice(&[10, 99, (i >> 8) as u8, i as u8]);
        key[36] = 2; // AF_INET
        let hex: Vec<String> = key.iter().map(|b| format!("{b:02x}")).collect();
        lines.push_str(&format!(
            "map update pinned {} key hex {} value hex 01\n",
            map.display(),
            hex.join(" ")
        ));
    }
    std::fs::write(&batch, lines)?;
    let out = std::process::Command::new("bpftool").arg("batch").arg("file").arg(&batch).output()?;
    anyhow::ensure!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));

    assert_eq!(agent::probe(&tb, &web.place(), api.addr4(8080))?["result"], "reset");
    let e = &t2.wait_access_log(1, WAIT, |e| field(e, "reason") == "delivery_loop")?[0];
    assert_eq!(field(e, "decision"), "deny", "{e}");
    assert!(t2.capture_counter("delivery_map_full")? > 0);
    assert!(server.accepted()?.is_empty(), "nothing reached the workload without its caller's identity");
    Ok(())
}

/// Floods of idle and half-handshaked connections on :15008 from one
/// address: legitimate calls keep succeeding, renewals keep happening, and
/// the memory the flood took is given back.
#[test]
fn floods_on_15008_do_not_starve_callers_or_renewals() -> anyhow::Result<()> {
    let mut tb = Testbed::new("flood")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let api = tb.add_pod(&n2, "api")?;
    let _server = Server::start(&tb, &api.place(), &[api.addr4(8080)])?;
    let _t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let mut c2 = tb.tunnel_config(&n2, &[&api]);
    c2["identity"]["cert_lifetime"] = json!("20s");
    let t2 = tb.start_tunnel(&n2, c2)?;
    assert_eq!(agent::connect(&tb, &web.place(), api.addr4(8080), 20, 5)?.ok, 20);
    let rss_before = t2.rss_kib()?;
    let renewals = |t: &ztunnel_testbed::Tunnel| -> anyhow::Result<u64> {
        Ok(ztunnel_tests::metric(&t.metrics()?, r#"ztunnel_certificate_renewals_total{result="success"}"#))
    };
    let renewed_before = renewals(&t2)?;

    let attacker = n1.unenrolled();
    let hbone = api.addr4(15008);
    let idle = Hoard::halfopen(&tb, &attacker, hbone, 2000, 0)?;
    let half = Hoard::halfopen(&tb, &attacker, hbone, 2000, 20)?;
    eprintln!("flood: idle {}, half-handshake {}", idle.report, half.report);
    let rss_during = t2.rss_kib()?;
    // Legitimate calls, from another address, during the flood.
    let during = agent::connect(&tb, &web.place(), api.addr4(8080), 200, 20)?;
    eprintln!("legitimate calls during the flood: {}/200", during.ok);
    assert_eq!(during.ok, 200, "{:?}", during.errors);
    let refused = ztunnel_tests::metric(
        &t2.metrics()?,
        r#"ztunnel_limit_refusals_total{limit="limit_handshakes_per_source"}"#,
    );
    assert!(refused > 3000, "one address holds at most its share of handshakes ({refused} refused)");
    // Certificates renewed under the flood (20 s lifetime: one renewal at
    // least every 10 s).
    assert!(
        eventually(Duration::from_secs(30), || renewals(&t2).is_ok_and(|n| n > renewed_before)),
        "no renewal during the flood"
    );
    drop((idle, half));
    // Handshakes that never finish are cut at the handshake timeout.
    std::thread::sleep(Duration::from_secs(6));
    let rss_after = t2.rss_kib()?;
    eprintln!(
        "RSS of the flooded tunnel: before {rss_before} KiB, during {rss_during} KiB, after {rss_after} KiB"
    );
    assert!(rss_after < rss_before + 16 * 1024, "memory not given back: {rss_before} -> {rss_after} KiB");
    Ok(())
}

/// A peer that vanishes behind a packet drop (no FIN, no RST) is noticed by
/// keepalive, and the tunnel's descriptors for it are freed: here a server
/// the tunnel dialled and a plaintext client that dialled the tunnel.
#[test]
fn peers_that_vanish_are_noticed_and_their_descriptors_freed() -> anyhow::Result<()> {
    let mut tb = Testbed::new("vanish")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let _inside = Server::start(&tb, &web.place(), &[web.addr4(8080)])?;
    let _outside = node_server(&tb, &n2, &[8080])?;
    let mut c1 = tb.tunnel_config(&n1, &[&web]);
    c1["proxy"]["tcp_keepalive"] = json!({"idle": "1s", "interval": "1s", "probes": 2});
    let t1 = tb.start_tunnel(&n1, c1)?;
    // A first exchange each way: the tunnel's stock of spare sockets for
    // web's namespace is made now, not counted against the connections.
    assert_eq!(agent::connect(&tb, &web.place(), SocketAddr::from((n2.ip4, 8080)), 1, 1)?.ok, 1);
    assert_eq!(agent::connect(&tb, &n2.unenrolled(), web.addr4(8080), 1, 1)?.ok, 1);
    std::thread::sleep(Duration::from_millis(500));
    let baseline = t1.open_fds()?;
    // web dials a server on n2 (the tunnel dials it); a process on n2 dials
    // web in plaintext (the tunnel accepts it).
    let mut to_server = Held::open(&tb, &web.place(), SocketAddr::from((n2.ip4, 8080)))?;
    let mut from_client = Held::open(&tb, &n2.unenrolled(), web.addr4(8080))?;
    to_server.ping("hello")?;
    from_client.ping("hello")?;
    let holding = t1.open_fds()?;
    // (The sockets the tunnel dials come from its spare stock: only the
    // accepted ones add descriptors.)
    assert!(holding >= baseline + 2, "the tunnel holds both connections ({baseline} -> {holding})");

    // n2 drops off the fabric: its packets vanish, nothing says goodbye.
    ztunnel_testbed::net_ip(&["-n", &tb.fabric_netns(), "link", "set", "n2", "down"])?;
    let freed = eventually(Duration::from_secs(20), || t1.open_fds().is_ok_and(|n| n < holding - 1));
    assert!(freed, "descriptors still held: {baseline} -> {}", t1.open_fds()?);
    let v = to_server.send("anyone?")?;
    assert_eq!((v["event"].as_str(), v["kind"].as_str()), (Some("error"), Some("reset")), "{v}");
    let gone =
        t1.wait_access_log(2, WAIT, |e| field(e, "reason") == "io_error" || field(e, "reason") == "reset")?;
    eprintln!("{gone:?}");
    Ok(())
}
