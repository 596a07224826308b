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
    assert_eq!(server.accepted().len(), 1);
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
    assert_eq!(tunnel.capture_counter("captured")?, 1);
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
    assert_eq!(server.accepted().len(), 1, "only the first probe reached the server");

    if std::fs::read_to_string("/proc/sys/net/mptcp/enabled").is_ok_and(|v| v.trim() == "1") {
        let r = agent::probe_with(&tb, &a.place(), dst, None, true)?;
        assert_eq!(r["result"], "denied", "{r}");
        assert_eq!(tunnel.capture_counter("refused_protocol")?, 1);
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
    let accepted = server.accepted().len();
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
    assert_eq!(outside.accepted().len(), 1);

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
