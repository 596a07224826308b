//! Kubernetes discovery against the testbed's fake API server (no API server
//! can run here; the fake speaks LIST/WATCH over real HTTP on loopback, with
//! bookmarks, selectors, 410 Gone, stream cuts and restarts). No root needed.

use std::{
    collections::BTreeSet,
    future::Future,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use ztunnel::{
    config::{Config, MtlsMode},
    k8s::{
        ClusterState, DiscoveryConfig, K8sMetrics, LocalPods, PodCgroups, build_config,
        metrics::{InvalidLabels, ResourceLabels},
    },
    policy::model::Action,
};
use ztunnel_testbed::kube::{FakeApiServer, Options};

/// Long enough for a loaded 2-core machine; every wait ends as soon as it can.
const PATIENCE: Duration = Duration::from_secs(60);

struct Fixture {
    server: FakeApiServer,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    metrics: K8sMetrics,
    state: Option<watch::Receiver<Arc<ClusterState>>>,
    stop: CancellationToken,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn fixture() -> Fixture {
    let server = FakeApiServer::start_with(Options {
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    Fixture {
        server,
        kubeconfig,
        _dir: dir,
        rt,
        metrics: K8sMetrics::default(),
        state: None,
        stop: CancellationToken::new(),
    }
}

impl Fixture {
    fn create(&self, kind: &str, object: Value) {
        self.server.create(kind, "", object).unwrap_or_else(|e| panic!("create {kind}: {e:?}"));
    }

    fn patch(&self, kind: &str, ns: &str, name: &str, patch: Value) {
        self.server
            .merge_patch(kind, ns, name, patch)
            .unwrap_or_else(|e| panic!("patch {kind} {ns}/{name}: {e:?}"));
    }

    fn delete(&self, kind: &str, ns: &str, name: &str) {
        self.server.delete(kind, ns, name).unwrap_or_else(|e| panic!("delete {kind} {ns}/{name}: {e:?}"));
    }

    /// Starts discovery as `ztunnel run --kubernetes` would, as node-a.
    fn start(&mut self) {
        let client = self.rt.block_on(client(&self.kubeconfig));
        let config =
            DiscoveryConfig { debounce: Duration::from_millis(50), ..DiscoveryConfig::new("node-a") };
        let _guard = self.rt.enter();
        self.state =
            Some(ztunnel::k8s::spawn_discovery(client, config, self.metrics.clone(), self.stop.clone()));
    }

    /// Waits until the published state satisfies `f`; panics with the last
    /// state after the patience.
    fn until(&mut self, what: &str, f: impl Fn(&ClusterState) -> bool) -> Arc<ClusterState> {
        let rx = self.state.as_mut().expect("discovery started");
        let waited = self.rt.block_on(within(async {
            loop {
                let s = rx.borrow_and_update().clone();
                if f(&s) {
                    return s;
                }
                rx.changed().await.expect("discovery stopped");
            }
        }));
        waited.unwrap_or_else(|| panic!("{what}: never happened; last state: {}", summary(&rx.borrow())))
    }

    fn publications(&self) -> u64 {
        self.metrics.publications.get()
    }

    fn relists(&self, resource: &str) -> u64 {
        self.metrics.relists.get_or_create(&ResourceLabels { resource: resource.into() }).get()
    }

    /// The server's pods that are workloads of the mesh, as discovery should see them.
    fn server_mesh_pods(&self) -> BTreeSet<String> {
        let enabled: BTreeSet<String> = self
            .server
            .list("namespaces", "")
            .unwrap()
            .iter()
            .filter(|n| n["metadata"]["labels"]["ztunnel.dev/dataplane"] == "enabled")
            .map(|n| n["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        self.server
            .list("pods", "")
            .unwrap()
            .iter()
            .filter(|p| {
                let ns = p["metadata"]["namespace"].as_str().unwrap();
                enabled.contains(ns)
                    && p["status"]["phase"] == "Running"
                    && p["metadata"]["labels"]["ztunnel.dev/dataplane"] != "disabled"
            })
            .map(|p| {
                format!(
                    "{}/{}",
                    p["metadata"]["namespace"].as_str().unwrap(),
                    p["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect()
    }
}

async fn within<T>(f: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(PATIENCE, f).await.ok()
}

/// The client `ztunnel run --kubernetes --kubeconfig <f>` makes.
async fn client(kubeconfig: &Path) -> kube::Client {
    ztunnel::k8s::client(Some(kubeconfig)).await.unwrap()
}

fn mesh_pods(s: &ClusterState) -> BTreeSet<String> {
    s.mesh_pods().filter(|p| p.running).map(|p| format!("{}/{}", p.namespace, p.name)).collect()
}

fn summary(s: &ClusterState) -> String {
    let policies: Vec<String> =
        s.policies.values().map(|p| format!("{:?} {}", p.policy.action, p.policy.key())).collect();
    format!(
        "synced={} generation={} mesh pods={:?} policies={policies:?} services={}",
        s.synced,
        s.generation,
        mesh_pods(s),
        s.services.len()
    )
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({ "metadata": { "name": name, "labels": labels } })
}

fn pod(ns: &str, name: &str, node: &str, ip: Option<&str>) -> Value {
    let status = match ip {
        Some(ip) => json!({ "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] }),
        None => json!({ "phase": "Pending" }),
    };
    json!({
        "metadata": { "name": name, "namespace": ns, "labels": { "app": name } },
        "spec": { "nodeName": node, "serviceAccountName": format!("{name}-sa"), "containers": [{ "name": "app", "image": "app" }] },
        "status": status,
    })
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
        "metadata": { "name": name, "namespace": ns }, "spec": spec,
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn base() -> Config {
    Config::parse("node: {name: node-a}\n", Path::new("base.yaml")).unwrap()
}

#[test]
fn discovery_follows_namespaces_pods_policies_and_services() {
    let mut f = fixture();
    f.create(
        "namespaces",
        namespace("shop", json!({ "ztunnel.dev/dataplane": "enabled", "ztunnel.dev/mtls": "strict" })),
    );
    f.create("namespaces", namespace("dev", json!({})));
    f.create("namespaces", namespace("ztunnel-system", json!({})));
    f.create("pods", pod("shop", "web", "node-a", Some("198.19.1.2")));
    f.create("pods", pod("shop", "db", "node-b", Some("198.19.2.2")));
    f.create("pods", pod("shop", "starting", "node-b", None));
    f.create("pods", pod("dev", "tool", "node-a", Some("198.19.1.9")));
    f.create("pods", pod("ztunnel-system", "ztunnel-abcde", "node-a", Some("198.19.1.100")));
    f.start();
    assert!(!f.state.as_ref().unwrap().borrow().synced, "nothing is published before the first full list");

    // Initial sync.
    let s = f.until("initial sync", |s| s.synced);
    assert_eq!(mesh_pods(&s), BTreeSet::from(["shop/db".to_owned(), "shop/web".to_owned()]));
    assert_eq!(
        s.namespace_configs().find(|(n, _)| *n == "shop").map(|(_, m)| m.mtls),
        Some(MtlsMode::Strict)
    );
    assert_eq!(f.publications(), 1, "the initial lists are one state");
    let web = s.mesh_pods().find(|p| &*p.name == "web").unwrap();
    assert_eq!((&*web.service_account, &*web.node, &*web.ips), ("web-sa", "node-a", &[ip("198.19.1.2")][..]));

    // Labelling a namespace brings its pods in; unlabelling takes them out.
    f.patch(
        "namespaces",
        "",
        "dev",
        json!({ "metadata": { "labels": { "ztunnel.dev/dataplane": "enabled" } } }),
    );
    f.until("dev labelled", |s| mesh_pods(s).contains("dev/tool"));
    f.patch("namespaces", "", "dev", json!({ "metadata": { "labels": { "ztunnel.dev/dataplane": null } } }));
    let s = f.until("dev unlabelled", |s| !mesh_pods(s).contains("dev/tool"));
    assert!(mesh_pods(&s).contains("shop/web"), "other pods untouched");

    // A namespace's mode changes; a typo keeps the mode in force, counted.
    f.patch("namespaces", "", "shop", json!({ "metadata": { "labels": { "ztunnel.dev/mtls": "strcit", "ztunnel.dev/default-deny": "true" } } }));
    let s =
        f.until("default-deny set", |s| s.namespace_configs().any(|(n, m)| n == "shop" && m.default_deny));
    assert_eq!(
        s.namespace_configs().find(|(n, _)| *n == "shop").unwrap().1.mtls,
        MtlsMode::Strict,
        "never a silent downgrade"
    );
    let typos = f
        .metrics
        .invalid_objects
        .get_or_create(&InvalidLabels { resource: "Namespace".into(), reason: "ztunnel.dev/mtls".into() })
        .get();
    assert!(typos >= 1);

    // A pod opts out, then back in.
    f.patch(
        "pods",
        "shop",
        "web",
        json!({ "metadata": { "labels": { "ztunnel.dev/dataplane": "disabled" } } }),
    );
    f.until("web opted out", |s| !mesh_pods(s).contains("shop/web"));
    f.patch("pods", "shop", "web", json!({ "metadata": { "labels": { "ztunnel.dev/dataplane": null } } }));
    f.until("web back", |s| mesh_pods(s).contains("shop/web"));

    // A pod that starts running becomes a destination.
    f.patch("pods", "shop", "starting", json!({ "status": { "phase": "Running", "podIP": "198.19.2.3", "podIPs": [{ "ip": "198.19.2.3" }] } }));
    f.until("starting runs", |s| mesh_pods(s).contains("shop/starting"));

    // A policy created, changed, made invalid (fails closed) and deleted.
    f.create(
        "authorizationpolicies",
        policy("shop", "db-from-web", json!({ "selector": { "matchLabels": { "app": "db" } }, "rules": [{ "to": [{ "operation": { "ports": ["5432"] } }] }] })),
    );
    let s = f.until("policy created", |s| s.policies.values().any(|p| p.policy.name == "db-from-web"));
    let p = &s.policies.values().find(|p| p.policy.name == "db-from-web").unwrap().policy;
    assert_eq!(
        (p.action, p.rules[0].to[0].operation.ports.clone()),
        (Action::Allow, vec!["5432".to_owned()])
    );
    f.patch("authorizationpolicies", "shop", "db-from-web", json!({ "spec": { "action": "DENY" } }));
    f.until("policy changed", |s| {
        s.policies.values().any(|p| p.policy.name == "db-from-web" && p.policy.action == Action::Deny)
    });
    f.patch(
        "authorizationpolicies",
        "shop",
        "db-from-web",
        json!({ "spec": { "rules": [{ "to": [{ "operation": { "ports": ["postgres"] } }] }] } }),
    );
    let s = f.until("policy fails closed", |s| s.policies.values().any(|p| p.failed_closed));
    let p = s.policies.values().find(|p| p.failed_closed).unwrap();
    assert_eq!(p.policy.action, Action::Deny);
    assert_eq!(
        p.policy.rules,
        vec![Default::default()],
        "an invalid DENY denies every caller of what it selects"
    );
    assert_eq!(s.failed_closed_policies(), 1);
    f.delete("authorizationpolicies", "shop", "db-from-web");
    f.until("policy deleted", |s| s.policies.is_empty());

    // A Service and its EndpointSlice; an endpoint going unready.
    f.create(
        "services",
        json!({ "metadata": { "name": "db", "namespace": "shop" }, "spec": { "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [{ "name": "pg", "port": 5432, "protocol": "TCP" }] } }),
    );
    let slice = |ready: bool| {
        json!({
            "metadata": { "name": "db-abc", "namespace": "shop", "labels": { "kubernetes.io/service-name": "db" } },
            "addressType": "IPv4",
            "ports": [{ "name": "pg", "port": 15432, "protocol": "TCP" }],
            "endpoints": [{ "addresses": ["198.19.2.2"], "nodeName": "node-b", "conditions": { "ready": ready } }],
        })
    };
    f.create("endpointslices", slice(true));
    let s = f.until("service with a ready endpoint", |s| {
        s.service_configs().iter().any(|svc| svc.ready_endpoints(5432) == vec![(ip("198.19.2.2"), 15432)])
    });
    assert_eq!(s.service_configs()[0].addresses, vec![ip("10.96.0.10")]);
    f.server.replace("endpointslices", "shop", slice(false)).unwrap();
    f.until("endpoint unready", |s| {
        s.service_configs().iter().all(|svc| svc.ready_endpoints(5432).is_empty())
    });

    // What the controller gets: every mesh pod once, this node's and others'.
    let s = f.until("final", |s| s.synced);
    let local = LocalPods::new(PodCgroups::with_default_roots("/nonexistent"), K8sMetrics::default());
    let config = build_config(&base(), &s, &local, "node-a");
    let mut names: Vec<String> = config.workloads.iter().map(|w| w.to_string()).collect();
    names.sort();
    assert_eq!(names, ["shop/db", "shop/starting", "shop/web"]);
    assert_eq!(config.services.len(), 1);
}

#[test]
fn discovery_converges_through_stream_cuts_restarts_and_compaction() {
    let mut f = fixture();
    f.create("namespaces", namespace("shop", json!({ "ztunnel.dev/dataplane": "enabled" })));
    let pods: Vec<Value> = (0..200)
        .map(|i| pod("shop", &format!("p{i}"), "node-b", Some(&format!("198.19.3.{}", i % 250 + 1))))
        .collect();
    f.server.create_many("pods", pods).unwrap();
    f.start();
    let s = f.until("initial sync", |s| s.synced && mesh_pods(s).len() == 200);
    assert_eq!(f.publications(), 1, "200 pods listed are one state, not 200");
    let _ = s;

    // Every stream cut mid-body: the watchers resume from where they were.
    f.server.kill_streams();
    f.create("pods", pod("shop", "after-cut", "node-b", Some("198.19.4.1")));
    f.until("change after a stream cut", |s| mesh_pods(s).contains("shop/after-cut"));

    // An API server restart.
    f.server.restart().unwrap();
    f.create("pods", pod("shop", "after-restart", "node-b", Some("198.19.4.2")));
    f.delete("pods", "shop", "p0");
    f.until("changes after a restart", |s| {
        let m = mesh_pods(s);
        m.contains("shop/after-restart") && !m.contains("shop/p0")
    });

    // An outage during which pods are deleted, created and changed, and the
    // history is compacted: the watchers get 410 Gone and relist, and the
    // deletions they never saw as events still take effect.
    let before = (f.relists("Pod"), f.publications());
    f.server.set_unavailable(true);
    for i in 1..=20 {
        f.delete("pods", "shop", &format!("p{i}"));
    }
    f.create("pods", pod("shop", "during-outage", "node-b", Some("198.19.4.3")));
    f.patch(
        "pods",
        "shop",
        "p30",
        json!({ "metadata": { "labels": { "ztunnel.dev/dataplane": "disabled" } } }),
    );
    f.server.compact();
    f.server.set_unavailable(false);
    let want = f.server_mesh_pods();
    assert_eq!(want.len(), 200 + 2 - 1 - 20 + 1 - 1);
    let s = f.until("converged after the outage", |s| mesh_pods(s) == want);
    assert!(f.relists("Pod") > before.0, "the pods were relisted");
    assert_eq!(f.publications(), before.1 + 1, "a relist is one state");

    // Nothing lost, nothing twice.
    let local = LocalPods::new(PodCgroups::with_default_roots("/nonexistent"), K8sMetrics::default());
    let config = build_config(&base(), &s, &local, "node-a");
    let names: Vec<String> = config.workloads.iter().map(|w| w.to_string()).collect();
    let unique: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(names.len(), unique.len(), "a workload appears twice");
    assert_eq!(unique, want);
}
