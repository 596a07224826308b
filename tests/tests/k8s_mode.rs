//! `ztunnel run --kubernetes` end to end: two node tunnels learn their pods,
//! Services and policies from the API server, over real eBPF capture, real
//! HBONE and real network namespaces. No API server can run here: the
//! testbed's fake one stands in (real LIST/WATCH over HTTP on loopback, with
//! the real server's semantics for what these tests use). Pods' cgroups are
//! made where the kubelet's cgroupfs driver makes them
//! (`<kubepods>/pod<uid>`), under each node's capture root.

use std::{os::fd::AsFd as _, path::PathBuf, time::Duration};

use serde_json::json;
use ztunnel_cni::protocol::{self as cni, Command as CniCommand, Outcome, Request};
use ztunnel_testbed::{
    Node, Testbed, Tunnel, Workload,
    agent::{self, Server},
    kube::FakeApiServer,
};
use ztunnel_tests::{WAIT, field, wait_until};

struct Cluster {
    api: FakeApiServer,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn start(tb: &Testbed) -> anyhow::Result<Self> {
        let api = FakeApiServer::start()?;
        let kubeconfig = tb.dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        api.create(
            "namespaces",
            "",
            json!({ "metadata": { "name": "shop", "labels": { "ztunnel.dev/dataplane": "enabled" } } }),
        )?;
        Ok(Self { api, kubeconfig })
    }

    /// A pod of `shop` on `node` (service account `sa`): the API object, and
    /// the testbed's pod in the cgroup the kubelet would make for it; Running
    /// with the testbed pod's addresses.
    fn pod(&self, tb: &mut Testbed, node: &Node, name: &str, sa: &str) -> anyhow::Result<(Workload, String)> {
        let created = self.api.create(
            "pods",
            "shop",
            json!({
                "metadata": { "name": name, "namespace": "shop", "labels": { "app": name } },
                "spec": { "nodeName": node.name, "serviceAccountName": sa, "containers": [{ "name": "app", "image": "app" }] },
                "status": { "phase": "Pending" },
            }),
        )?;
        let uid = created["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
        let w = tb.add_pod_in(node, "shop", &format!("pod{uid}"))?;
        self.api.merge_patch(
            "pods",
            "shop",
            name,
            json!({ "status": { "phase": "Running", "podIP": w.ip4.to_string(),
                "podIPs": [{ "ip": w.ip4.to_string() }, { "ip": w.ip6.to_string() }] } }),
        )?;
        Ok((w, uid))
    }

    /// `ztunnel run --kubernetes` for `node`: the file holds node settings
    /// only.
    fn tunnel(&self, tb: &Testbed, node: &Node) -> anyhow::Result<Tunnel> {
        let mut config = tb.tunnel_config(node, &[]);
        config["workloads"] = json!([]);
        config["node"]["name"] = json!("");
        let args = Tunnel::kubernetes_args(tb, node, &self.kubeconfig, &cni_socket(tb, node))?;
        Tunnel::start_with_args(tb, node, config, &args)
    }
}

fn cni_socket(tb: &Testbed, node: &Node) -> PathBuf {
    tb.dir().join(format!("{}-cni.sock", node.name))
}

/// What the CNI plugin sends at sandbox creation: the pod's namespace fd.
fn cni_add(tb: &Testbed, node: &Node, w: &Workload, name: &str, uid: &str) -> anyhow::Result<cni::Response> {
    let netns = std::fs::File::open(format!("/var/run/netns/{}", w.netns))?;
    let req = Request {
        version: cni::PROTOCOL_VERSION,
        command: CniCommand::Add,
        container_id: format!("sandbox-{uid}"),
        pod_namespace: "shop".into(),
        pod_name: name.into(),
        pod_uid: uid.into(),
        netns_path: format!("/var/run/netns/{}", w.netns),
        interface: "eth0".into(),
        ips: vec![w.ip4.into(), w.ip6.into()],
    };
    Ok(cni::client::request(&cni_socket(tb, node), &req, Some(netns.as_fd()), Duration::from_secs(30))?)
}

fn identity_of(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/{sa}")
}

/// Pods from the API server are enrolled on their node (web through the CNI
/// plugin's handover, db found through its running process), call each
/// other over mTLS under their ServiceAccount identities, a policy CRD
/// created later denies, and a Service's ClusterIP reaches its ready
/// endpoint and is refused once it has none.
#[test]
fn pods_services_and_policies_come_from_the_api_server() -> anyhow::Result<()> {
    let mut tb = Testbed::new("k8smode")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let cluster = Cluster::start(&tb)?;
    let (web, web_uid) = cluster.pod(&mut tb, &n1, "web", "web")?;
    let (db, _) = cluster.pod(&mut tb, &n2, "db", "db")?;
    let server = Server::start(&tb, &db.place(), &[db.addr4(5432), db.addr4(6432)])?;
    let t1 = cluster.tunnel(&tb, &n1)?;
    let t2 = cluster.tunnel(&tb, &n2)?;

    // The CNI plugin's ADD is answered once web is captured.
    let answer = cni_add(&tb, &n1, &web, "web", &web_uid)?;
    assert_eq!(answer.result, Outcome::Enrolled, "{answer:?}\n{}", t1.log_tail(30));
    // db is found through its server's process.
    wait_until(
        WAIT,
        "db enrolled on n2",
        || {
            Ok(t2.config_dump()?["workloads"]
                .as_array()
                .is_some_and(|ws| ws.iter().any(|w| w["workload"] == "shop/db" && w["state"] == "enrolled")))
        },
        || t2.log_tail(30),
    )?;

    let out = agent::probe(&tb, &web.place(), db.addr4(5432))?;
    assert_eq!(out["result"], "ok", "{out}\n{}", t2.log_tail(30));
    let e = &t2.wait_access_log(1, WAIT, |e| e["direction"] == "inbound")?[0];
    assert_eq!(field(e, "source_identity"), identity_of("web"), "{e}");
    assert_eq!(field(e, "destination_identity"), identity_of("db"), "{e}");
    assert_eq!(field(e, "connection_security_policy"), "mutual_tls", "{e}");

    // A policy created in the cluster takes effect without a restart.
    cluster.api.create(
        "authorizationpolicies",
        "shop",
        json!({
            "apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
            "metadata": { "name": "db-5432-only", "namespace": "shop" },
            "spec": { "selector": { "matchLabels": { "app": "db" } }, "action": "DENY",
                      "rules": [{ "to": [{ "operation": { "ports": ["6432"] } }] }] },
        }),
    )?;
    wait_until(
        WAIT,
        "the DENY policy in force on n2",
        || Ok(agent::probe(&tb, &web.place(), db.addr4(6432))?["result"] == "reset"),
        || t2.log_tail(30),
    )?;
    let denied = t2.wait_access_log(1, WAIT, |e| e["decision"] == "deny")?;
    assert_eq!(field(&denied[0], "policy"), "shop/db-5432-only", "{}", denied[0]);
    assert_eq!(agent::probe(&tb, &web.place(), db.addr4(5432))?["result"], "ok");

    // A Service: its ClusterIP (no route anywhere: only the tunnel can carry
    // it) leads to the ready endpoint, over HBONE.
    let cluster_ip = "198.18.200.10";
    cluster.api.create(
        "services",
        "shop",
        json!({ "metadata": { "name": "db", "namespace": "shop" },
                "spec": { "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                          "ports": [{ "name": "pg", "port": 80, "protocol": "TCP" }] } }),
    )?;
    let slice = |ready: bool| {
        json!({
            "metadata": { "name": "db-x1", "namespace": "shop", "labels": { "kubernetes.io/service-name": "db" } },
            "addressType": "IPv4",
            "ports": [{ "name": "pg", "port": 5432, "protocol": "TCP" }],
            "endpoints": [{ "addresses": [db.ip4.to_string()], "nodeName": "n2", "conditions": { "ready": ready } }],
        })
    };
    cluster.api.create("endpointslices", "shop", slice(true))?;
    let vip: std::net::SocketAddr = format!("{cluster_ip}:80").parse()?;
    wait_until(
        WAIT,
        "the ClusterIP reaches db",
        || Ok(agent::probe(&tb, &web.place(), vip)?["result"] == "ok"),
        || t1.log_tail(30),
    )?;
    let e = &t1.wait_access_log(1, WAIT, |e| e["destination_service"] == "shop/db")?[0];
    assert_eq!(field(e, "destination_address"), db.addr4(5432).to_string(), "{e}");
    assert_eq!(field(e, "destination_identity"), identity_of("db"), "{e}");
    assert_eq!(field(e, "mode"), "hbone", "{e}");

    // No ready endpoint: refused by the caller's tunnel, counted, logged.
    cluster.api.replace("endpointslices", "shop", slice(false))?;
    wait_until(
        WAIT,
        "no ready endpoint",
        || Ok(agent::probe(&tb, &web.place(), vip)?["result"] != "ok"),
        || t1.log_tail(30),
    )?;
    t1.wait_access_log(1, WAIT, |e| e["reason"] == "no_endpoint")?;
    drop(server);
    Ok(())
}

/// Readiness waits for the first full list; a pod deleted from the API server
/// leaves its node's tunnel (its cgroup no longer captured), and a CNI ADD
/// for a pod of a namespace outside the mesh is refused with the reason.
#[test]
fn readiness_follows_the_first_sync_and_deleted_pods_leave() -> anyhow::Result<()> {
    let mut tb = Testbed::new("k8sleave")?;
    let n1 = tb.add_node("n1")?;
    let cluster = Cluster::start(&tb)?;
    let (web, web_uid) = cluster.pod(&mut tb, &n1, "web", "web")?;
    let t1 = cluster.tunnel(&tb, &n1)?;
    let metrics = t1.metrics()?;
    assert_eq!(ztunnel_tests::metric(&metrics, "ztunnel_k8s_synced"), 1, "ready before the first sync?");
    let (status, body) = ztunnel_testbed::http::get(&n1.netns, "127.0.0.1:15021".parse()?, "/healthz/live")?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cni_add(&tb, &n1, &web, "web", &web_uid)?.result, Outcome::Enrolled);
    let enrolled = |t: &Tunnel| -> anyhow::Result<bool> {
        Ok(t.config_dump()?["workloads"]
            .as_array()
            .is_some_and(|ws| ws.iter().any(|w| w["workload"] == "shop/web")))
    };
    assert!(enrolled(&t1)?, "web is enrolled after its ADD");
    cluster.api.delete("pods", "shop", "web")?;
    wait_until(WAIT, "web leaves n1's tunnel", || Ok(!enrolled(&t1)?), || t1.log_tail(30))?;

    // A namespace outside the mesh: the tunnel says why it does not enroll.
    cluster.api.create("namespaces", "", json!({ "metadata": { "name": "dev" } }))?;
    let other = cluster.api.create(
        "pods",
        "dev",
        json!({ "metadata": { "name": "tool", "namespace": "dev" },
                "spec": { "nodeName": "n1", "containers": [{ "name": "app", "image": "app" }] } }),
    )?;
    let uid = other["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
    let netns = std::fs::File::open(format!("/var/run/netns/{}", web.netns))?;
    let req = Request {
        version: cni::PROTOCOL_VERSION,
        command: CniCommand::Add,
        container_id: "sandbox-tool".into(),
        pod_namespace: "dev".into(),
        pod_name: "tool".into(),
        pod_uid: uid,
        netns_path: String::new(),
        interface: "eth0".into(),
        ips: vec![],
    };
    let answer =
        cni::client::request(&cni_socket(&tb, &n1), &req, Some(netns.as_fd()), Duration::from_secs(30))?;
    assert_eq!(answer.result, Outcome::Error, "{answer:?}");
    assert!(answer.message.contains("not in the mesh"), "{answer:?}");
    Ok(())
}

/// A namespace in strict mTLS: the kubelet's plaintext probes (from the
/// node's own address) still reach its pods, logged as `node_probe`, while
/// plaintext from anywhere else (another node) is refused.
#[test]
fn strict_pods_pass_the_kubelets_probes_and_refuse_other_plaintext() -> anyhow::Result<()> {
    let mut tb = Testbed::new("k8sprobe")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let cluster = Cluster::start(&tb)?;
    cluster.api.merge_patch(
        "namespaces",
        "",
        "shop",
        json!({ "metadata": { "labels": { "ztunnel.dev/mtls": "strict" } } }),
    )?;
    let (web, _) = cluster.pod(&mut tb, &n1, "web", "web")?;
    let server = Server::start(&tb, &web.place(), &[web.addr4(8080)])?;
    let t1 = cluster.tunnel(&tb, &n1)?;
    wait_until(
        WAIT,
        "web enrolled through its process",
        || {
            Ok(t1.config_dump()?["workloads"]
                .as_array()
                .is_some_and(|ws| ws.iter().any(|w| w["workload"] == "shop/web" && w["state"] == "enrolled")))
        },
        || t1.log_tail(30),
    )?;
    // From another node: plaintext, refused by the strict mode.
    let out = agent::probe(&tb, &n2.unenrolled(), web.addr4(8080))?;
    assert_eq!(out["result"], "reset", "{out}");
    let e = &t1.wait_access_log(1, WAIT, |e| e["reason"] == "plaintext_refused")?[0];
    assert_eq!(field(e, "destination_workload"), "shop/web", "{e}");
    // From the node itself, as the kubelet probes: admitted.
    let out = agent::probe(&tb, &n1.unenrolled(), web.addr4(8080))?;
    assert_eq!(out["result"], "ok", "{out}\n{}", t1.log_tail(20));
    let e = &t1.wait_access_log(1, WAIT, |e| e["reason"] == "node_probe")?[0];
    assert_eq!((field(e, "decision"), field(e, "mode")), ("allow", "plaintext"), "{e}");
    assert_eq!(server.accepted()?.len(), 1, "only the node's probe reached the pod");
    Ok(())
}

fn holds(t: &Tunnel, key: &str) -> anyhow::Result<bool> {
    Ok(t.config_dump()?["workloads"]
        .as_array()
        .is_some_and(|ws| ws.iter().any(|w| w["workload"] == key && w["state"] == "enrolled")))
}

/// The API server's watch streams cut (and its history compacted, forcing
/// relists) while policies and labels change: state converges and an
/// allowed connection is never dropped; unlabelling one namespace removes
/// only its pods; strict -> permissive by one label is the rollback; a CNI
/// ADD fails while the tunnel is down.
#[test]
fn cuts_relists_label_changes_and_a_down_tunnel() -> anyhow::Result<()> {
    let mut tb = Testbed::new("k8scuts")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let cluster = Cluster::start(&tb)?;
    cluster.api.create(
        "namespaces",
        "",
        json!({ "metadata": { "name": "ops", "labels": { "ztunnel.dev/dataplane": "enabled" } } }),
    )?;
    let (web, web_uid) = cluster.pod(&mut tb, &n1, "web", "web")?;
    let created = cluster.api.create(
        "pods",
        "ops",
        json!({ "metadata": { "name": "tool", "namespace": "ops" },
                "spec": { "nodeName": "n1", "serviceAccountName": "tool", "containers": [{ "name": "app", "image": "app" }] },
                "status": { "phase": "Pending" } }),
    )?;
    let tool_uid = created["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
    let tool = tb.add_pod_in(&n1, "ops", &format!("pod{tool_uid}"))?;
    cluster.api.merge_patch(
        "pods",
        "ops",
        "tool",
        json!({ "status": { "phase": "Running", "podIP": tool.ip4.to_string(), "podIPs": [{ "ip": tool.ip4.to_string() }] } }),
    )?;
    let (db, _) = cluster.pod(&mut tb, &n2, "db", "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(7000)])?;
    let mut t1 = cluster.tunnel(&tb, &n1)?;
    let t2 = cluster.tunnel(&tb, &n2)?;
    assert_eq!(cni_add(&tb, &n1, &web, "web", &web_uid)?.result, Outcome::Enrolled);
    let netns = std::fs::File::open(format!("/var/run/netns/{}", tool.netns))?;
    let tool_add = Request {
        version: cni::PROTOCOL_VERSION,
        command: CniCommand::Add,
        container_id: "sandbox-tool".into(),
        pod_namespace: "ops".into(),
        pod_name: "tool".into(),
        pod_uid: tool_uid,
        netns_path: String::new(),
        interface: "eth0".into(),
        ips: vec![tool.ip4.into()],
    };
    let answer =
        cni::client::request(&cni_socket(&tb, &n1), &tool_add, Some(netns.as_fd()), Duration::from_secs(30))?;
    assert_eq!(answer.result, Outcome::Enrolled, "{answer:?}");
    wait_until(WAIT, "db enrolled on n2", || holds(&t2, "shop/db"), || t2.log_tail(30))?;
    let mut held = agent::Held::open(&tb, &web.place(), db.addr4(7000))?;
    held.ping("before the cuts")?;

    // Streams cut, then an ALLOW for web only: tool is refused, web's held
    // connection (allowed by it) stays.
    cluster.api.kill_streams();
    cluster.api.create(
        "authorizationpolicies",
        "shop",
        json!({
            "apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
            "metadata": { "name": "db-from-web", "namespace": "shop" },
            "spec": { "selector": { "matchLabels": { "app": "db" } }, "action": "ALLOW",
                      "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/shop/sa/web"] } }] }] },
        }),
    )?;
    wait_until(
        WAIT,
        "the ALLOW in force on n2 after the cut",
        || Ok(agent::probe(&tb, &tool.place(), db.addr4(7000))?["result"] == "reset"),
        || t2.log_tail(30),
    )?;
    held.ping("after the cut and the policy")?;

    // History compacted and streams cut: the watchers relist (410 Gone);
    // meanwhile `ops` leaves the mesh. Only its pod leaves n1's tunnel.
    cluster.api.compact();
    cluster.api.kill_streams();
    cluster.api.merge_patch(
        "namespaces",
        "",
        "ops",
        json!({ "metadata": { "labels": { "ztunnel.dev/dataplane": null } } }),
    )?;
    wait_until(WAIT, "tool leaves n1's tunnel", || Ok(!holds(&t1, "ops/tool")?), || t1.log_tail(30))?;
    assert!(holds(&t1, "shop/web")?, "web stays enrolled");
    held.ping("after the relist")?;

    // Strict on shop refuses plaintext to db; one label change rolls back.
    let plaintext_to_db = || -> anyhow::Result<String> {
        Ok(agent::probe(&tb, &n1.unenrolled(), db.addr4(7000))?["result"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    };
    cluster.api.delete("authorizationpolicies", "shop", "db-from-web")?;
    wait_until(
        WAIT,
        "plaintext admitted without the ALLOW",
        || Ok(plaintext_to_db()? == "ok"),
        || t2.log_tail(30),
    )?;
    cluster.api.merge_patch(
        "namespaces",
        "",
        "shop",
        json!({ "metadata": { "labels": { "ztunnel.dev/mtls": "strict" } } }),
    )?;
    wait_until(WAIT, "strict refuses plaintext", || Ok(plaintext_to_db()? == "reset"), || t2.log_tail(30))?;
    cluster.api.merge_patch(
        "namespaces",
        "",
        "shop",
        json!({ "metadata": { "labels": { "ztunnel.dev/mtls": "permissive" } } }),
    )?;
    wait_until(WAIT, "the rollback admits plaintext", || Ok(plaintext_to_db()? == "ok"), || t2.log_tail(30))?;
    held.ping("after the rollback")?;

    // The tunnel down: the CNI plugin's ADD cannot be answered, and says so.
    t1.stop()?;
    let refused = cni_add(&tb, &n1, &web, "web", &web_uid);
    match refused {
        Err(e) => {
            let unreachable =
                e.downcast_ref::<cni::ProtocolError>().is_some_and(cni::ProtocolError::is_unreachable);
            assert!(unreachable, "{e:#}");
        }
        Ok(answer) => panic!("ADD answered while the tunnel is down: {answer:?}"),
    }
    Ok(())
}

/// An upgrade in Kubernetes mode, as a surge rollout does it: a second
/// `ztunnel run --kubernetes` on the node takes the first one's sockets once
/// it has listed the cluster, a held connection keeps working through the
/// old process, a new connection every 20 ms is served throughout, and the
/// CNI socket is the new tunnel's (the old one, exiting, leaves it alone).
#[test]
fn an_upgrade_in_kubernetes_mode_keeps_connections_and_the_cni_socket() -> anyhow::Result<()> {
    let mut tb = Testbed::new("k8supg")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let cluster = Cluster::start(&tb)?;
    let (web, web_uid) = cluster.pod(&mut tb, &n1, "web", "web")?;
    let (db, _) = cluster.pod(&mut tb, &n2, "db", "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let mut t1 = cluster.tunnel(&tb, &n1)?;
    let _t2 = cluster.tunnel(&tb, &n2)?;
    let answer = cni_add(&tb, &n1, &web, "web", &web_uid)?;
    assert_eq!(answer.result, Outcome::Enrolled, "{answer:?}\n{}", t1.log_tail(30));
    wait_until(
        WAIT,
        "web reaches db",
        || Ok(agent::connect(&tb, &web.place(), db.addr4(5432), 1, 1)?.ok == 1),
        || t1.log_tail(20),
    )?;
    let mut held = agent::Held::open(&tb, &web.place(), db.addr4(5432))?;
    let steady = agent::Steady::start(
        &tb,
        &web.place(),
        db.addr4(5432),
        Duration::from_millis(20),
        Duration::from_secs(120),
    )?;
    std::thread::sleep(Duration::from_secs(2));

    let took = t1.upgrade(Duration::from_secs(60))?;
    eprintln!("upgrade by handover in Kubernetes mode: {} ms from start to taken over", took.as_millis());
    std::thread::sleep(Duration::from_secs(2));
    held.ping("after the handover")?;
    drop(held);
    let exits = t1.wait_drained(Duration::from_secs(30))?;
    assert!(exits.iter().all(std::process::ExitStatus::success), "{exits:?}");
    let report = steady.stop()?;
    let attempts = report["attempts"].as_u64().unwrap_or(0);
    assert!(attempts > 100, "{report}");
    assert_eq!(
        report["ok"].as_u64(),
        Some(attempts),
        "a new connection failed during the handover: {report}"
    );

    // A pod made after the old tunnel exited is enrolled through the CNI
    // socket by the new one.
    let (api, api_uid) = cluster.pod(&mut tb, &n1, "api", "api")?;
    let answer = cni_add(&tb, &n1, &api, "api", &api_uid)?;
    assert_eq!(answer.result, Outcome::Enrolled, "{answer:?}\n{}", t1.log_tail(30));
    assert_eq!(agent::connect(&tb, &api.place(), db.addr4(5432), 1, 1)?.ok, 1);
    Ok(())
}
