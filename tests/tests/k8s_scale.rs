//! What discovery costs a node: the compact cache's memory for 10,000 pods
//! and 1,000 Services (with an EndpointSlice of 10 endpoints each), and
//! building the controller's `Config` from it. Printed, not asserted (run
//! with `--nocapture`); the allocator of this test binary counts bytes.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    path::Path,
    sync::atomic::{AtomicIsize, Ordering},
    time::Instant,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::runtime::watcher::Event;
use serde_json::json;
use ztunnel::{
    config::Config,
    k8s::{K8sMetrics, LocalPods, PodCgroups, build_config, cluster::Filter, discovery::Cache},
};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a
// counter is updated beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as the caller's contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as the caller's contract.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as the caller's contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const PODS: usize = 10_000;
const SERVICES: usize = 1_000;
const NAMESPACES: usize = 50;
const DEPLOYMENTS: usize = 1_000;
const NODES: usize = 100;

fn uid(kind: u8, i: usize) -> String {
    format!("{:08x}-0000-4000-8{kind:03x}-{i:012x}", i * 7919)
}

/// A pod as the API server sends it, status and all (what kube-rs decodes).
fn pod(i: usize) -> Pod {
    let d = i % DEPLOYMENTS;
    let ns = format!("team-{}", d % NAMESPACES);
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("deploy-{d}-7d9c5b8f6-{i:05}"), "namespace": ns, "uid": uid(1, i),
            "resourceVersion": format!("{}", 1000 + i), "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": { "app": format!("deploy-{d}"), "pod-template-hash": "7d9c5b8f6", "team": format!("team-{}", d % NAMESPACES) },
            "annotations": { "kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z" },
            "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("deploy-{d}-7d9c5b8f6"), "uid": uid(2, d), "controller": true }],
        },
        "spec": {
            "nodeName": format!("node-{}", i % NODES), "serviceAccountName": format!("deploy-{d}"),
            "containers": [{ "name": "app", "image": "registry.example/app:1.2.3", "ports": [{ "containerPort": 8080, "protocol": "TCP" }],
                             "resources": { "requests": { "cpu": "100m", "memory": "128Mi" } } }],
        },
        "status": {
            "phase": "Running", "qosClass": "Burstable",
            "podIP": format!("10.{}.{}.{}", i / 65536 + 1, (i / 256) % 256, i % 256),
            "podIPs": [{ "ip": format!("10.{}.{}.{}", i / 65536 + 1, (i / 256) % 256, i % 256) }],
            "hostIP": format!("192.168.0.{}", i % NODES),
            "conditions": [{ "type": "Ready", "status": "True" }],
            "containerStatuses": [{ "name": "app", "ready": true, "restartCount": 0, "image": "registry.example/app:1.2.3",
                                    "imageID": "sha256:0123456789abcdef", "containerID": "containerd://0123456789abcdef" }],
        },
    }))
    .unwrap()
}

fn service(i: usize) -> Service {
    serde_json::from_value(json!({
        "metadata": { "name": format!("svc-{i}"), "namespace": format!("team-{}", i % NAMESPACES), "uid": uid(3, i) },
        "spec": {
            "clusterIP": format!("10.96.{}.{}", i / 256, i % 256), "clusterIPs": [format!("10.96.{}.{}", i / 256, i % 256)],
            "selector": { "app": format!("deploy-{i}") },
            "ports": [{ "name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP" },
                      { "name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP" }],
        },
    }))
    .unwrap()
}

fn slice(i: usize) -> EndpointSlice {
    let endpoints: Vec<_> = (0..10)
        .map(|k| {
            let p = i * 10 + k;
            json!({ "addresses": [format!("10.{}.{}.{}", p / 65536 + 1, (p / 256) % 256, p % 256)],
                    "conditions": { "ready": true, "serving": true, "terminating": false },
                    "nodeName": format!("node-{}", p % NODES),
                    "targetRef": { "kind": "Pod", "name": format!("deploy-{i}-{k}"), "namespace": format!("team-{}", i % NAMESPACES) } })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": { "name": format!("svc-{i}-abcde"), "namespace": format!("team-{}", i % NAMESPACES),
                      "labels": { "kubernetes.io/service-name": format!("svc-{i}") } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }, { "name": "metrics", "port": 9090, "protocol": "TCP" }],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn namespace(i: usize) -> Namespace {
    serde_json::from_value(json!({ "metadata": { "name": format!("team-{i}"), "labels": { "ztunnel.dev/dataplane": "enabled" } } }))
        .unwrap()
}

fn kib(bytes: isize) -> f64 {
    bytes as f64 / 1024.0
}

#[test]
fn memory_of_the_compact_cache() {
    let filter = Filter {
        node: "node-0".into(),
        tunnel_namespace: "ztunnel-system".into(),
        metrics: K8sMetrics::default(),
    };
    let mut cache = Cache::new(filter);
    // One full object, for scale: what keeping objects would cost.
    let one_pod = {
        let before = live();
        let p = pod(1);
        let size = live() - before;
        drop(p);
        size
    };

    let start = live();
    cache.apply_namespace(Event::Init);
    for i in 0..NAMESPACES {
        cache.apply_namespace(Event::InitApply(namespace(i)));
    }
    cache.apply_namespace(Event::InitDone);
    for e in [Event::Init, Event::InitDone] {
        cache.apply_policy(e);
    }
    let namespaces = live() - start;

    let before = live();
    cache.apply_pod(Event::Init);
    for i in 0..PODS {
        cache.apply_pod(Event::InitApply(pod(i)));
    }
    cache.apply_pod(Event::InitDone);
    let pods = live() - before;

    let before = live();
    cache.apply_service(Event::Init);
    for i in 0..SERVICES {
        cache.apply_service(Event::InitApply(service(i)));
    }
    cache.apply_service(Event::InitDone);
    let services = live() - before;

    let before = live();
    cache.apply_endpoint_slice(Event::Init);
    for i in 0..SERVICES {
        cache.apply_endpoint_slice(Event::InitApply(slice(i)));
    }
    cache.apply_endpoint_slice(Event::InitDone);
    let slices = live() - before;

    let state = cache.snapshot();
    assert!(state.synced);
    assert_eq!(state.mesh_pods().count(), PODS);

    let base = Config::parse("node: {name: node-0}\n", Path::new("base.yaml")).unwrap();
    let local = LocalPods::new(PodCgroups::with_default_roots("/nonexistent"), K8sMetrics::default());
    let before = live();
    let t = Instant::now();
    let config = build_config(&base, &state, &local, "node-0");
    let build = t.elapsed();
    let config_bytes = live() - before;
    assert_eq!(config.workloads.len(), PODS);
    assert_eq!(config.services.len(), SERVICES);

    println!("one full Pod object as decoded: {:.1} KiB", kib(one_pod));
    println!(
        "compact cache: {PODS} pods {:.0} KiB ({:.0} bytes/pod, {:.0} KiB per 1,000 pods)",
        kib(pods),
        pods as f64 / PODS as f64,
        kib(pods) * 1000.0 / PODS as f64
    );
    println!(
        "compact cache: {SERVICES} services {:.0} KiB + their EndpointSlices (10 endpoints each) {:.0} KiB ({:.0} KiB per 1,000 services with slices)",
        kib(services),
        kib(slices),
        kib(services + slices) * 1000.0 / SERVICES as f64
    );
    println!("compact cache: {NAMESPACES} namespaces {:.0} KiB", kib(namespaces));
    println!(
        "build_config for {PODS} pods and {SERVICES} services: {:.1} ms, the Config it makes holds {:.0} KiB ({:.0} bytes/workload)",
        build.as_secs_f64() * 1000.0,
        kib(config_bytes),
        config_bytes as f64 / (PODS + SERVICES) as f64
    );
}
