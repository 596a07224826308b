//! `cargo xtask bench --only k8s`: what Kubernetes mode costs a node, with
//! 10,000 pods and 1,000 Services (10 endpoints each) in the testbed's fake
//! API server (no real one runs here), measured in one run beside a
//! baseline:
//!
//! * the tunnel's resident memory: file mode with no workloads (baseline),
//!   then `--kubernetes` after the first sync with the 10,000 pods, then
//!   after the 1,000 Services and their EndpointSlices arrive;
//! * the time from a pod object appearing (Running, with its IP) to the
//!   pod's cgroup being captured, found through a process in it, and the
//!   time a CNI ADD takes to be answered `enrolled`.
//!
//! Release binaries; printed, never asserted.

use std::{
    os::fd::AsFd as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::bail;
use serde_json::{Value, json};
use ztunnel_testbed::{Node, Testbed, Tunnel, agent::Server, kube::FakeApiServer};

const PODS: usize = 10_000;
const SERVICES: usize = 1_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
/// Pods created on the measured node, one at a time, per enrollment path.
const SAMPLES: usize = 10;

pub fn run(json_out: bool) -> anyhow::Result<()> {
    let log = |s: &str| {
        if !json_out {
            eprintln!("{s}");
        }
    };
    let mut tb = Testbed::new("benchk8s")?;
    let n1 = tb.add_node("n1")?;
    let api = FakeApiServer::start()?;
    let kubeconfig = tb.dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    api.create(
        "namespaces",
        "",
        json!({ "metadata": { "name": "shop", "labels": { "ztunnel.dev/dataplane": "enabled" } } }),
    )
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;

    let mut file_config = tb.tunnel_config(&n1, &[]);
    file_config["workloads"] = json!([]);
    let mut baseline = tb.start_tunnel(&n1, file_config.clone())?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_baseline = rss_mib(&baseline)?;
    baseline.stop()?;
    log(&format!("file mode, no workloads (baseline): RSS {rss_baseline:.1} MiB"));

    api.create_many("pods", (0..PODS).map(remote_pod)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let started = Instant::now();
    let tunnel = start_k8s(&tb, &n1, &kubeconfig, file_config)?;
    let sync = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let rss_pods = rss_mib(&tunnel)?;
    log(&format!(
        "--kubernetes, {PODS} pods: ready (first full sync applied) in {:.2} s, RSS {rss_pods:.1} MiB ({:.2} MiB per 1,000 pods over the baseline)",
        sync.as_secs_f64(),
        (rss_pods - rss_baseline) * 1000.0 / PODS as f64
    ));

    api.create_many("services", (0..SERVICES).map(service)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    api.create_many("endpointslices", (0..SERVICES).map(slice)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    wait(Duration::from_secs(60), "the Services in the tunnel", || {
        Ok(metric(&tunnel.metrics()?, r#"ztunnel_k8s_cached_objects{resource="EndpointSlice"}"#)
            >= SERVICES as f64)
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let rss_services = rss_mib(&tunnel)?;
    log(&format!(
        "+ {SERVICES} Services with {ENDPOINTS_PER_SERVICE} endpoints each: RSS {rss_services:.1} MiB ({:.2} MiB per 1,000 Services)",
        (rss_services - rss_pods) * 1000.0 / SERVICES as f64
    ));

    // Pod object appears -> captured, through a process in the pod's cgroup.
    let mut through_proc = Vec::new();
    let mut through_cni = Vec::new();
    for i in 0..SAMPLES * 2 {
        let name = format!("new-{i}");
        let created = api
            .create("pods", "shop", local_pod(&name, &n1.name, None))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let uid = created["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
        let w = tb.add_pod_in(&n1, "shop", &format!("pod{uid}"))?;
        let running = json!({ "status": { "phase": "Running", "podIP": w.ip4.to_string(), "podIPs": [{ "ip": w.ip4.to_string() }] } });
        if i % 2 == 0 {
            let _process = Server::start(&tb, &w.place(), &[w.addr4(8080)])?;
            let t0 = Instant::now();
            api.merge_patch("pods", "shop", &name, running).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            wait(Duration::from_secs(60), "the new pod captured", || enrolled(&tunnel, &name))?;
            through_proc.push(t0.elapsed());
        } else {
            let t0 = Instant::now();
            api.merge_patch("pods", "shop", &name, running).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let netns = std::fs::File::open(format!("/var/run/netns/{}", w.netns))?;
            let req = ztunnel_cni::protocol::Request {
                version: ztunnel_cni::protocol::PROTOCOL_VERSION,
                command: ztunnel_cni::protocol::Command::Add,
                container_id: format!("sandbox-{uid}"),
                pod_namespace: "shop".into(),
                pod_name: name.clone(),
                pod_uid: uid.clone(),
                netns_path: String::new(),
                interface: "eth0".into(),
                ips: vec![w.ip4.into()],
            };
            let answer = ztunnel_cni::protocol::client::request(
                &cni_socket(&tb, &n1),
                &req,
                Some(netns.as_fd()),
                Duration::from_secs(30),
            )?;
            if answer.result != ztunnel_cni::protocol::Outcome::Enrolled {
                bail!("CNI ADD for {name}: {answer:?}");
            }
            through_cni.push(t0.elapsed());
        }
    }
    let (p_proc, p_cni) = (percentiles(&mut through_proc), percentiles(&mut through_cni));
    log(&format!(
        "pod object Running -> captured, found through its process: p50 {:.0} ms, max {:.0} ms ({SAMPLES} pods)",
        p_proc.0, p_proc.1
    ));
    log(&format!(
        "pod object Running + CNI ADD -> answered enrolled: p50 {:.0} ms, max {:.0} ms ({SAMPLES} pods)",
        p_cni.0, p_cni.1
    ));
    if json_out {
        println!(
            "{}",
            json!({
                "k8s_rss_baseline_mib": rss_baseline,
                "k8s_rss_10k_pods_mib": rss_pods,
                "k8s_rss_1k_services_mib": rss_services,
                "k8s_sync_s": sync.as_secs_f64(),
                "k8s_capture_proc_p50_ms": p_proc.0,
                "k8s_capture_proc_max_ms": p_proc.1,
                "k8s_capture_cni_p50_ms": p_cni.0,
                "k8s_capture_cni_max_ms": p_cni.1,
            })
        );
    }
    Ok(())
}

fn start_k8s(
    tb: &Testbed,
    node: &Node,
    kubeconfig: &std::path::Path,
    mut config: Value,
) -> anyhow::Result<Tunnel> {
    config["node"]["name"] = json!("");
    let args = Tunnel::kubernetes_args(tb, node, kubeconfig, &cni_socket(tb, node))?;
    Tunnel::start_with_args(tb, node, config, &args)
}

fn cni_socket(tb: &Testbed, node: &Node) -> PathBuf {
    tb.dir().join(format!("{}-cni.sock", node.name))
}

fn enrolled(t: &Tunnel, name: &str) -> anyhow::Result<bool> {
    let key = format!("shop/{name}");
    Ok(t.config_dump()?["workloads"]
        .as_array()
        .is_some_and(|ws| ws.iter().any(|w| w["workload"] == key.as_str() && w["state"] != "failed")))
}

/// Pod `i` on one of 100 other nodes, Running with an address that only
/// ever exists as data (never configured on any interface).
fn remote_pod(i: usize) -> Value {
    let ip = format!("198.18.{}.{}", 64 + i / 250, 1 + i % 250);
    let mut p = local_pod(&format!("p{i}"), &format!("node-{}", i % 100), Some(&ip));
    p["metadata"]["labels"] = json!({ "app": format!("app{}", i / ENDPOINTS_PER_SERVICE) });
    p
}

fn local_pod(name: &str, node: &str, ip: Option<&str>) -> Value {
    let status = match ip {
        Some(ip) => json!({ "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] }),
        None => json!({ "phase": "Pending" }),
    };
    json!({
        "metadata": { "name": name, "namespace": "shop" },
        "spec": { "nodeName": node, "serviceAccountName": "app", "containers": [{ "name": "app", "image": "app" }] },
        "status": status,
    })
}

fn service(i: usize) -> Value {
    let ip = format!("198.19.{}.{}", 200 + i / 250, 1 + i % 250);
    json!({ "metadata": { "name": format!("svc{i}"), "namespace": "shop" },
            "spec": { "clusterIP": ip, "clusterIPs": [ip], "ports": [{ "name": "http", "port": 80, "protocol": "TCP" }] } })
}

fn slice(i: usize) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS_PER_SERVICE)
        .map(|k| {
            let p = i * ENDPOINTS_PER_SERVICE + k;
            json!({ "addresses": [format!("198.18.{}.{}", 64 + p / 250, 1 + p % 250)],
                    "nodeName": format!("node-{}", p % 100), "conditions": { "ready": true } })
        })
        .collect();
    json!({
        "metadata": { "name": format!("svc{i}-a"), "namespace": "shop", "labels": { "kubernetes.io/service-name": format!("svc{i}") } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": endpoints,
    })
}

fn rss_mib(t: &Tunnel) -> anyhow::Result<f64> {
    Ok(t.rss_kib()? as f64 / 1024.0)
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// (p50, max) in milliseconds.
fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    match samples {
        [] => (0.0, 0.0),
        s => (ms(s[s.len() / 2]), ms(s[s.len() - 1])),
    }
}

fn wait(limit: Duration, what: &str, mut f: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if f().unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not within {limit:?}: {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
