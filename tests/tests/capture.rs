//! Transparent capture over the real testbed: eBPF programs attached to real
//! cgroups, real network namespaces, real sockets, the real `ztunnel` binary.
//! Each test builds its own testbed and removes it, even when it fails.

use std::net::SocketAddr;

use serde_json::json;
use ztunnel::capture::MAP_ABI_VERSION;
use ztunnel_testbed::{
    Testbed,
    agent::{self, Held, Server},
};
use ztunnel_tests::{WAIT, cgroup_id, eventually, field, node_server};

#[test]
fn connections_of_pods_host_workloads_and_containers_are_captured_and_attributed() -> anyhow::Result<()> {
    let mut tb = Testbed::new("attrib")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let api = tb.add_pod(&n1, "api")?;
    let backup = tb.add_host_workload(&n1, "backup")?;
    let server = node_server(&tb, &n2, &[8080])?;
    let tunnel = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web, &api, &backup]))?;
    let dst = SocketAddr::from((n2.ip4, 8080));

    // Two pods on one node, a plain-host workload, and a container (a child
    // cgroup of the web pod) each open an ordinary connection.
    let container = web.child("app")?;
    for (place, who) in [
        (web.place(), "web"),
        (api.place(), "api"),
        (backup.place(), "backup"),
        (container.clone(), "web/app"),
    ] {
        let r = agent::connect(&tb, &place, dst, 1, 1)?;
        assert_eq!(r.ok, 1, "{who}: {:?}", r.errors);
    }

    let lines = tunnel.wait_access_log(4, WAIT, |e| e["direction"] == "outbound")?;
    let by = |cg: u64| {
        lines
            .iter()
            .find(|e| e["source_cgroup_id"] == cg)
            .cloned()
            .unwrap_or_else(|| panic!("no line for cgroup {cg}: {lines:?}"))
    };
    for (w, cg) in [
        (&web, cgroup_id(&web.cgroup)),
        (&api, cgroup_id(&api.cgroup)),
        (&backup, cgroup_id(&backup.cgroup)),
        (&web, cgroup_id(&container.cgroup)),
    ] {
        let e = by(cg);
        assert_eq!(field(&e, "source_workload"), w.key(), "{e}");
        assert_eq!(field(&e, "source_identity"), w.identity(), "{e}");
        assert_eq!(field(&e, "destination_address"), dst.to_string(), "{e}");
        assert_eq!(field(&e, "reason"), "ok", "{e}");
        assert!(e["source_pid"].as_u64().unwrap_or(0) > 0, "{e}");
    }
    // The server saw each connection come from the workload's own address.
    let peers: Vec<String> = server.accepted()?.iter().map(|a| field(a, "peer").to_owned()).collect();
    assert_eq!(peers.len(), 4, "{peers:?}");
    for ip in [web.ip4, api.ip4, n1.ip4] {
        assert!(peers.iter().any(|p| p.starts_with(&format!("{ip}:"))), "{ip} not among {peers:?}");
    }
    assert_eq!(tunnel.capture_counter("captured")?, 4);
    Ok(())
}

#[test]
fn processes_outside_enrolled_workloads_are_not_captured() -> anyhow::Result<()> {
    let mut tb = Testbed::new("unenrol")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let other = tb.add_pod(&n1, "other")?; // exists, but not in the tunnel's configuration
    let server = node_server(&tb, &n2, &[8080])?;
    let tunnel = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let dst = SocketAddr::from((n2.ip4, 8080));

    for place in [n1.unenrolled(), other.place()] {
        let r = agent::connect(&tb, &place, dst, 3, 3)?;
        assert_eq!(r.ok, 3, "{:?}", r.errors);
    }
    assert_eq!(server.accepted()?.len(), 6);
    assert_eq!(tunnel.capture_counter("captured")?, 0);
    tunnel.flush_access_log()?;
    assert!(tunnel.access_log().is_empty(), "{:?}", tunnel.access_log());
    Ok(())
}

#[test]
fn ipv6_connections_are_captured_too() -> anyhow::Result<()> {
    let mut tb = Testbed::new("ipv6")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let remote = tb.add_pod(&n2, "remote")?;
    let server = Server::start(&tb, &remote.place(), &[remote.addr6(9000)])?;
    let tunnel = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let _remote_tunnel = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&remote]))?;

    let r = agent::connect(&tb, &web.place(), remote.addr6(9000), 2, 2)?;
    assert_eq!(r.ok, 2, "{:?}", r.errors);
    let lines = tunnel.wait_access_log(2, WAIT, |e| e["direction"] == "outbound")?;
    for e in &lines {
        assert_eq!(field(e, "destination_address"), remote.addr6(9000).to_string());
        assert_eq!(field(e, "source_workload"), web.key());
        // The destination is a known workload of the mesh.
        assert_eq!(field(e, "destination_workload"), remote.key());
    }
    assert!(server.accepted()?.iter().all(|a| field(a, "peer").starts_with(&format!("[{}]:", web.ip6))));
    Ok(())
}

#[test]
fn inbound_steering_preserves_the_destination_port_and_leaves_15008_alone() -> anyhow::Result<()> {
    let mut tb = Testbed::new("inbound")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let app = Server::start(&tb, &web.place(), &[web.addr4(8080), web.addr4(9443), web.addr6(8080)])?;
    let tunnel = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;

    for dst in [web.addr4(8080), web.addr4(9443), web.addr6(8080)] {
        let r = agent::connect(&tb, &n2.unenrolled(), dst, 1, 1)?;
        assert_eq!(r.ok, 1, "{dst}: {:?}", r.errors);
        // The application saw the port the caller dialled.
        assert_eq!(field(&r.seen[0], "local"), dst.to_string());
    }
    let lines = tunnel.wait_access_log(3, WAIT, |e| e["direction"] == "inbound")?;
    let mut dsts: Vec<&str> = lines.iter().map(|e| field(e, "destination_address")).collect();
    dsts.sort_unstable();
    let mut want = [web.addr4(8080).to_string(), web.addr4(9443).to_string(), web.addr6(8080).to_string()];
    want.sort_unstable();
    assert_eq!(dsts, want);
    assert!(
        lines
            .iter()
            .all(|e| field(e, "destination_workload") == web.key() && field(e, "mode") == "plaintext")
    );
    assert_eq!(tunnel.capture_counter("inbound_steered")?, 3);

    // 15008 reaches the tunnel's HBONE listener directly, never the plaintext
    // one: a client that never starts a TLS handshake is dropped there.
    let r = agent::probe(&tb, &n2.unenrolled(), web.addr4(15008))?;
    assert_ne!(r["result"], "ok", "{r}");
    let refused = tunnel.wait_access_log(1, WAIT, |e| e["mode"] == "hbone" && e["decision"] == "deny")?;
    let reason = field(&refused[0], "reason");
    assert!(matches!(reason, "handshake_timeout" | "handshake_eof"), "{}", refused[0]);
    assert_eq!(tunnel.capture_counter("inbound_steered")?, 3);
    assert_eq!(app.accepted()?.len(), 3);
    Ok(())
}

#[test]
fn workloads_enrolled_and_removed_at_run_time_do_not_disturb_others() -> anyhow::Result<()> {
    let mut tb = Testbed::new("runtime")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let api = tb.add_pod(&n1, "api")?;
    let _server = node_server(&tb, &n2, &[8080])?;
    let dst = SocketAddr::from((n2.ip4, 8080));
    let mut tunnel = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;

    let mut held = Held::open(&tb, &web.place(), dst)?;
    held.ping("before")?;
    let captured_from = |t: &ztunnel_testbed::Tunnel, w: &ztunnel_testbed::Workload| {
        t.access_log().iter().filter(|e| e["source_workload"] == w.key()).count()
    };

    assert_eq!(agent::connect(&tb, &api.place(), dst, 1, 1)?.ok, 1);
    tunnel.flush_access_log()?;
    assert_eq!(captured_from(&tunnel, &api), 0, "api is not enrolled yet");

    tunnel.reload(&tb.tunnel_config(&n1, &[&web, &api]))?;
    assert_eq!(tunnel.workload_status(&api)?["state"], "enrolled");
    assert_eq!(agent::connect(&tb, &api.place(), dst, 1, 1)?.ok, 1);
    tunnel.wait_access_log(1, WAIT, |e| e["source_workload"] == api.key())?;
    held.ping("after enrolling api")?;

    tunnel.reload(&tb.tunnel_config(&n1, &[&web]))?;
    tunnel.flush_access_log()?;
    let before = captured_from(&tunnel, &api);
    assert_eq!(agent::connect(&tb, &api.place(), dst, 1, 1)?.ok, 1);
    tunnel.flush_access_log()?;
    assert_eq!(captured_from(&tunnel, &api), before, "api is no longer captured");
    held.ping("after removing api")?;
    Ok(())
}

#[test]
fn while_the_tunnel_is_down_enrolled_workloads_fail_closed() -> anyhow::Result<()> {
    let mut tb = Testbed::new("down")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let server = node_server(&tb, &n2, &[8080])?;
    let app = Server::start(&tb, &web.place(), &[web.addr4(8080)])?;
    let dst = SocketAddr::from((n2.ip4, 8080));
    let mut tunnel = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    assert_eq!(agent::connect(&tb, &web.place(), dst, 1, 1)?.ok, 1);
    assert_eq!(server.accepted()?.len(), 1);
    assert_eq!(app.accepted()?.len(), 0);

    for how in ["SIGTERM", "SIGKILL"] {
        if how == "SIGTERM" {
            assert!(tunnel.stop()?.success());
        } else {
            tunnel.kill()?;
        }
        // Outbound: refused, never sent in the clear.
        let out = agent::probe(&tb, &web.place(), dst)?;
        assert_ne!(out["result"], "ok", "{how}: {out}");
        // Inbound: refused at the pod, the application never sees it.
        let inbound = agent::probe(&tb, &n2.unenrolled(), web.addr4(8080))?;
        assert_ne!(inbound["result"], "ok", "{how}: {inbound}");
        assert!(server.accepted()?.is_empty(), "{how}: a connection escaped capture");
        assert!(app.accepted()?.is_empty(), "{how}: an inbound connection bypassed the tunnel");
        tunnel.start_again()?;
        assert_eq!(agent::connect(&tb, &web.place(), dst, 1, 1)?.ok, 1, "{how}: back after restart");
        assert_eq!(server.accepted()?.len(), 1);
    }
    Ok(())
}

#[test]
fn a_restart_keeps_enrollment_and_open_connections_elsewhere() -> anyhow::Result<()> {
    let mut tb = Testbed::new("restart")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let _server = node_server(&tb, &n2, &[8080])?;
    let dst = SocketAddr::from((n2.ip4, 8080));
    let mut tunnel = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let id_before = tunnel.workload_status(&web)?["workload_id"].clone();
    let pins = tb.pin_base.join(&n1.name);

    tunnel.restart()?;
    assert!(pins.join(format!("v{MAP_ABI_VERSION}/links/ztunnel_connect4")).exists());
    assert_eq!(tunnel.workload_status(&web)?["workload_id"], id_before, "ids survive restarts");
    let r = agent::connect(&tb, &web.place(), dst, 5, 5)?;
    assert_eq!(r.ok, 5, "{:?}", r.errors);
    let lines = tunnel.wait_access_log(5, WAIT, |e| e["source_workload"] == web.key())?;
    assert!(lines.iter().all(|e| field(e, "reason") == "ok"));
    Ok(())
}

#[test]
fn enrolling_a_cgroup_that_holds_the_tunnel_is_refused() -> anyhow::Result<()> {
    let mut tb = Testbed::new("selfenr")?;
    let n1 = tb.add_node("n1")?;
    let web = tb.add_pod(&n1, "web")?;
    // The tunnel's own cgroup lives inside the capture root, and an operator
    // tries to enroll its parent.
    let mut config = tb.tunnel_config(&n1, &[&web]);
    config["capture"]["tunnel_cgroup"] = json!(n1.cgroup.join("system").join("ztunnel"));
    config["workloads"].as_array_mut().expect("workloads").push(json!({
        "name": "system",
        "cgroup": n1.cgroup.join("system"),
    }));
    let tunnel = tb.start_tunnel(&n1, config)?;
    let dump = tunnel.config_dump()?;
    let system = dump["workloads"]
        .as_array()
        .and_then(|w| w.iter().find(|s| s["workload"] == "default/system"))
        .cloned();
    let system = system.expect("system workload status");
    assert_eq!(system["state"], "failed", "{system}");
    assert!(field(&system, "error").contains("contains the tunnel's own cgroup"), "{system}");
    assert_eq!(tunnel.workload_status(&web)?["state"], "enrolled");
    Ok(())
}

#[test]
fn the_tunnel_never_captures_itself_even_when_its_cgroup_is_enrolled() -> anyhow::Result<()> {
    let mut tb = Testbed::new("selfcap")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let _server = node_server(&tb, &n2, &[8080])?;
    let system = n1.cgroup.join("system");
    let mut config = tb.tunnel_config(&n1, &[&web]);
    config["capture"]["tunnel_cgroup"] = json!(system.join("ztunnel"));
    let tunnel = tb.start_tunnel(&n1, config)?;
    // Behind the tunnel's back, the cgroup holding it is enrolled (ready) in
    // the kernel map: only the programs' own guard stands between the
    // tunnel's sockets and capture now.
    let map = tb.pin_base.join(&n1.name).join(format!("v{MAP_ABI_VERSION}/maps/ENROLLED_CGROUPS"));
    let key: Vec<String> = cgroup_id(&system).to_le_bytes().iter().map(|b| format!("{b:02x}")).collect();
    // workload 999, READY, no socket quota
    let value =
        ["e7", "03", "00", "00", "01", "00", "00", "00", "00", "00", "00", "00", "00", "00", "00", "00"];
    let out = std::process::Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(&map)
        .arg("key")
        .arg("hex")
        .args(&key)
        .arg("value")
        .arg("hex")
        .args(value)
        .output()?;
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));

    // Passthrough makes the tunnel dial out itself, to the addresses
    // workloads dial: were its sockets captured, each would loop back.
    let r = agent::connect(&tb, &web.place(), SocketAddr::from((n2.ip4, 8080)), 20, 10)?;
    assert_eq!(r.ok, 20, "{:?}", r.errors);
    assert_eq!(tunnel.capture_counter("captured")?, 20);
    tunnel.wait_access_log(20, WAIT, |_| true)?;
    // Every line, also any that came after the twentieth.
    tunnel.flush_access_log()?;
    let lines = tunnel.access_log();
    assert!(
        lines.iter().all(|e| field(e, "source_workload") == web.key() && field(e, "reason") == "ok"),
        "{lines:?}"
    );
    Ok(())
}

#[test]
fn a_full_connection_map_fails_closed_and_is_counted() -> anyhow::Result<()> {
    let mut tb = Testbed::new("mapfull")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let server = node_server(&tb, &n2, &[8080])?;
    let dst = SocketAddr::from((n2.ip4, 8080));
    let mut config = tb.tunnel_config(&n1, &[&web]);
    config["capture"]["max_connections"] = json!(4);
    let tunnel = tb.start_tunnel(&n1, config)?;

    let mut held: Vec<Held> = (0..4).map(|_| Held::open(&tb, &web.place(), dst)).collect::<Result<_, _>>()?;
    assert_eq!(server.accepted()?.len(), 4);
    let out = agent::probe(&tb, &web.place(), dst)?;
    assert_ne!(out["result"], "ok", "the fifth connection must be refused: {out}");
    assert!(server.accepted()?.is_empty(), "the refused connection must not reach the server");
    assert!(
        eventually(WAIT, || tunnel.capture_counter("tuple_map_full").unwrap_or(0) >= 1),
        "tuple_map_full not counted: {:?}",
        tunnel.config_dump().map(|d| d["capture_counters"].clone())
    );
    let refused = tunnel.wait_access_log(1, WAIT, |e| e["reason"] == "no_capture_record")?;
    assert_eq!(refused[0]["decision"], "deny");

    // Capacity comes back as connections close.
    held.pop();
    assert!(
        eventually(WAIT, || agent::probe(&tb, &web.place(), dst).is_ok_and(|o| o["result"] == "ok")),
        "no capacity after a connection closed: {:?}",
        agent::probe(&tb, &web.place(), dst)
    );
    for h in &mut held {
        h.ping("still here")?;
    }
    Ok(())
}

#[test]
fn a_thousand_concurrent_connections_are_all_attributed() -> anyhow::Result<()> {
    let mut tb = Testbed::new("thousand")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let api = tb.add_pod(&n1, "api")?;
    let _server = node_server(&tb, &n2, &[8001, 8002])?;
    let tunnel = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web, &api]))?;

    // Both pods at once, 500 connections each, all open at the same time.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| agent::connect(&tb, &web.place(), SocketAddr::from((n2.ip4, 8001)), 500, 500));
        let b = s.spawn(|| agent::connect(&tb, &api.place(), SocketAddr::from((n2.ip4, 8002)), 500, 500));
        (a.join(), b.join())
    });
    let (a, b) = (a.map_err(|_| anyhow::anyhow!("panic"))??, b.map_err(|_| anyhow::anyhow!("panic"))??);
    assert_eq!((a.ok, b.ok), (500, 500), "{:?} {:?}", a.errors, b.errors);

    let lines = tunnel.wait_access_log(1000, 2 * WAIT, |e| e["direction"] == "outbound")?;
    let web_dst = SocketAddr::from((n2.ip4, 8001)).to_string();
    let api_dst = SocketAddr::from((n2.ip4, 8002)).to_string();
    for e in &lines {
        let ok = match field(e, "source_workload") {
            w if w == web.key() => field(e, "destination_address") == web_dst,
            w if w == api.key() => field(e, "destination_address") == api_dst,
            _ => false,
        };
        assert!(ok && field(e, "reason") == "ok", "misattributed: {e}");
    }
    Ok(())
}

#[test]
fn exclusions_and_the_workloads_own_addresses_are_never_captured() -> anyhow::Result<()> {
    let mut tb = Testbed::new("exclude")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let _server = node_server(&tb, &n2, &[8080, 8081])?;
    let _local =
        Server::start(&tb, &web.place(), &["127.0.0.1:7000".parse()?, web.addr4(7001), web.addr4(9090)])?;
    let mut config = tb.tunnel_config(&n1, &[&web]);
    let entry = config["workloads"]
        .as_array_mut()
        .and_then(|ws| ws.iter_mut().find(|w| w["name"] == "web"))
        .expect("web in config");
    entry["capture"] = json!({
        "exclude_outbound_ports": [8081],
        "exclude_outbound_cidrs": [format!("{}/128", n2.ip6)],
        "exclude_inbound_ports": [9090],
    });
    let tunnel = tb.start_tunnel(&n1, config)?;

    for dst in [
        SocketAddr::from((n2.ip4, 8081)), // excluded port
        SocketAddr::from((n2.ip6, 8080)), // excluded prefix
        "127.0.0.1:7000".parse()?,        // the pod's loopback
        web.addr4(7001),                  // the pod's own address
    ] {
        let r = agent::connect(&tb, &web.place(), dst, 1, 1)?;
        assert_eq!(r.ok, 1, "{dst}: {:?}", r.errors);
    }
    // Inbound to an excluded port reaches the application directly.
    assert_eq!(agent::connect(&tb, &n2.unenrolled(), web.addr4(9090), 1, 1)?.ok, 1);
    // And a connection that is not excluded is still captured.
    assert_eq!(agent::connect(&tb, &web.place(), SocketAddr::from((n2.ip4, 8080)), 1, 1)?.ok, 1);

    let lines = tunnel.wait_access_log(1, WAIT, |_| true)?;
    tunnel.flush_access_log()?;
    let all = tunnel.access_log();
    assert_eq!(all.len(), 1, "only the non-excluded connection goes through the tunnel: {all:?}");
    assert_eq!(field(&lines[0], "destination_address"), SocketAddr::from((n2.ip4, 8080)).to_string());
    assert_eq!(tunnel.capture_counter("captured")?, 1);
    assert!(tunnel.capture_counter("excluded")? >= 3);
    Ok(())
}

#[test]
fn uninstall_leaves_nothing_attached_and_workloads_connect_directly_again() -> anyhow::Result<()> {
    let mut tb = Testbed::new("uninst")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let server = node_server(&tb, &n2, &[8080])?;
    let dst = SocketAddr::from((n2.ip4, 8080));
    let mut tunnel = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    assert!(!attached(&n1.cgroup)?.is_empty());
    let pod_netns = std::path::Path::new("/var/run/netns").join(web.pod_netns.as_deref().unwrap_or_default());
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&pod_netns)?);
    assert_eq!(netns_links(ino)?.len(), 1, "one sk_lookup link on the pod");
    assert!(tunnel.stop()?.success());
    // Stopped, but still installed: capture fails closed.
    assert_ne!(agent::probe(&tb, &web.place(), dst)?["result"], "ok");

    let out = std::process::Command::new(ztunnel_testbed::bins::ztunnel()?)
        .args(["uninstall", "--config"])
        .arg(&tunnel.config_path)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(attached(&n1.cgroup)?.is_empty(), "programs left on the cgroup: {:?}", attached(&n1.cgroup)?);
    let pod_netns = std::path::Path::new("/var/run/netns").join(web.pod_netns.as_deref().unwrap_or_default());
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&pod_netns)?);
    assert!(netns_links(ino)?.is_empty(), "sk_lookup links left: {:?}", netns_links(ino)?);
    assert!(!tb.pin_base.join(&n1.name).exists());
    // Nothing captures the pod any more.
    assert_eq!(agent::connect(&tb, &web.place(), dst, 1, 1)?.ok, 1);
    assert_eq!(server.accepted()?.len(), 1);
    Ok(())
}

#[test]
fn a_bad_configuration_stops_the_start_with_field_and_line_and_installs_nothing() -> anyhow::Result<()> {
    let mut tb = Testbed::new("badcfg")?;
    let n1 = tb.add_node("n1")?;
    let dir = tb.dir().to_owned();
    let pin_dir = tb.pin_base.join("bad");
    let config = format!(
        "node:\n  name: n1\ncapture:\n  bpf_pin_dir: {}\nworkloads:\n  - name: web\n    cgroup: {}\n    addresses: [198.19.1.300]\n",
        pin_dir.display(),
        n1.cgroup.join("web").display()
    );
    let path = dir.join("bad.yaml");
    std::fs::write(&path, config)?;
    let out = std::process::Command::new(ztunnel_testbed::bins::ztunnel()?)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("{}:8:", path.display())), "no line in: {stderr}");
    assert!(stderr.contains("workloads[0].addresses[0]"), "no field in: {stderr}");
    assert!(!pin_dir.exists(), "a failed start must not install capture");
    Ok(())
}

/// Programs attached to a cgroup, as bpftool lists them.
fn attached(cgroup: &std::path::Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = std::process::Command::new("bpftool").args(["-j", "cgroup", "show"]).arg(cgroup).output()?;
    anyhow::ensure!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    Ok(serde_json::from_str::<Vec<serde_json::Value>>(&text)?)
}

/// sk_lookup links attached to the network namespace with inode `netns_ino`.
fn netns_links(netns_ino: u64) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = std::process::Command::new("bpftool").args(["-j", "link", "show"]).output()?;
    anyhow::ensure!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    Ok(links
        .into_iter()
        .filter(|l| l["type"] == "netns" && l["netns_ino"].as_u64() == Some(netns_ino))
        .collect())
}

#[test]
fn an_outbound_exclusion_cannot_bypass_a_neighbours_inbound_steering() -> anyhow::Result<()> {
    let mut tb = Testbed::new("neighbr")?;
    let n1 = tb.add_node("n1")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n1, "db")?;
    let server = Server::start(&tb, &db.place(), &[db.addr4(5432), db.addr6(5432)])?;
    let mut config = tb.tunnel_config(&n1, &[&web, &db]);
    for w in config["workloads"].as_array_mut().into_iter().flatten() {
        if w["name"] == "web" {
            // web dials db directly, past its own tunnel...
            w["capture"] =
                json!({"exclude_outbound_cidrs": [format!("{}/32", db.ip4), format!("{}/128", db.ip6)]});
        }
        if w["name"] == "db" {
            // ...but db accepts mTLS only.
            w["mtls"] = json!("strict");
        }
    }
    let tunnel = tb.start_tunnel(&n1, config)?;
    for dst in [db.addr4(5432), db.addr6(5432)] {
        let out = agent::probe(&tb, &web.place(), dst)?;
        assert_ne!(out["result"], "ok", "{dst}: web's plaintext reached strict db: {out}");
    }
    let refused = tunnel.wait_access_log(2, WAIT, |e| e["reason"] == "plaintext_refused")?;
    assert!(refused.iter().all(|e| e["destination_workload"] == db.key()), "{refused:?}");
    assert!(server.accepted()?.is_empty());
    // db calling itself at its own address is still its own business.
    assert_eq!(agent::connect(&tb, &db.place(), db.addr4(5432), 1, 1)?.ok, 1);
    Ok(())
}

#[test]
fn a_workload_whose_cgroup_is_made_again_is_captured_again() -> anyhow::Result<()> {
    let mut tb = Testbed::new("recgrp")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let backup = tb.add_host_workload(&n1, "backup")?;
    let _server = node_server(&tb, &n2, &[8080])?;
    let tunnel = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&backup]))?;
    let outside = SocketAddr::from((n2.ip4, 8080));
    assert_eq!(agent::connect(&tb, &backup.place(), outside, 1, 1)?.ok, 1);
    tunnel.wait_access_log(1, WAIT, |e| e["source_workload"] == backup.key())?;

    // What systemd does when it restarts a unit: the cgroup goes away and
    // comes back as a new directory, with a new id.
    let before = cgroup_id(&backup.cgroup);
    std::fs::remove_dir(&backup.cgroup)?;
    std::fs::create_dir(&backup.cgroup)?;
    let after = cgroup_id(&backup.cgroup);
    assert_ne!(before, after);
    assert!(
        eventually(WAIT, || tunnel
            .workload_status(&backup)
            .is_ok_and(|s| s["cgroup_id"].as_u64() == Some(after) && s["state"] == "enrolled")),
        "the new cgroup was not enrolled: {:?}",
        tunnel.workload_status(&backup)
    );
    assert_eq!(agent::connect(&tb, &backup.place(), outside, 1, 1)?.ok, 1);
    let lines = tunnel.wait_access_log(2, WAIT, |e| e["source_workload"] == backup.key())?;
    assert_eq!(lines[1]["source_cgroup_id"].as_u64(), Some(after), "{}", lines[1]);
    Ok(())
}

/// An upgrade today: the old tunnel stops (SIGTERM) and the new one starts
/// on the same pins. Measures the window in which the node's workloads are
/// refused (fail closed: nothing leaves or arrives outside the tunnel) and
/// shows that calls resume on their own after it. Printed: the window and
/// the calls refused in it, beside the rate of calls.
#[test]
fn an_upgrade_by_restart_fails_closed_for_a_measured_window() -> anyhow::Result<()> {
    let mut tb = Testbed::new("upgrade")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let mut t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;
    assert_eq!(agent::connect(&tb, &web.place(), db.addr4(5432), 1, 1)?.ok, 1);
    let interval = std::time::Duration::from_millis(20);
    let steady = ztunnel_testbed::agent::Steady::start(
        &tb,
        &web.place(),
        db.addr4(5432),
        interval,
        std::time::Duration::from_secs(120),
    )?;
    std::thread::sleep(std::time::Duration::from_secs(2));
    let started = std::time::Instant::now();
    t1.restart()?;
    let window = started.elapsed();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let report = steady.stop()?;
    let failed = report["failures"].as_array().map_or(0, Vec::len);
    let attempts = report["attempts"].as_u64().unwrap_or(0);
    eprintln!(
        "upgrade by restart: stop to ready {} ms; {failed} of {attempts} calls (one every {} ms) refused",
        window.as_millis(),
        interval.as_millis()
    );
    // Calls resumed, and none reached db except over mTLS.
    assert!(attempts as usize > failed + 100, "{report}");
    t2.flush_access_log()?;
    let inbound: Vec<_> = t2.access_log().into_iter().filter(|e| e["direction"] == "inbound").collect();
    // The log has the calls that went through: it would have had one that did not.
    assert!(inbound.iter().filter(|e| e["mode"] == "hbone").count() > 100, "{} inbound lines", inbound.len());
    let plaintext = inbound.iter().filter(|e| e["mode"] != "hbone").count();
    assert_eq!(plaintext, 0, "a call reached db outside the tunnel during the restart");
    Ok(())
}
