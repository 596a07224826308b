//! The `ztunnel-cni` binary run exactly as a container runtime runs it: the
//! `CNI_*` environment, the network configuration (with `prevResult`) on
//! stdin, the result or error object read from stdout, the exit code.
//!
//! Two stand-ins, for what cannot run here:
//! * the testbed's fake Kubernetes API server (`ztunnel_testbed::kube`; no
//!   API server runs on these machines), holding the namespaces and pods a
//!   test creates and checking the kubeconfig's token;
//! * [`FakeTunnel`] for ztunnel's enrollment socket; it is built from the
//!   protocol's own server half, so it receives exactly what the real tunnel
//!   would, the netns fd included. The test decides each answer.
//!
//! Pod network namespaces are real (`ip netns add ztcni-<pid>-<test>`),
//! removed when the test ends, also on failure. Needs root.

use std::{
    fs::File,
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use ztunnel_cni::protocol::{
    self, Command as TunnelCommand, DEFAULT_MAX_REQUEST_LEN, Outcome, Request, server::serve_connection,
};
use ztunnel_testbed::kube::FakeApiServer;

/// Generous: a loaded 2-core machine runs other builds beside this one. Only
/// a broken plugin ever waits this long.
const PATIENCE: Duration = Duration::from_secs(120);

/// The API server's stand-in, with a kubeconfig for it in `dir`.
fn fake_api(dir: &Path) -> (FakeApiServer, PathBuf) {
    let api = FakeApiServer::start().unwrap();
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    (api, kubeconfig)
}

fn put_namespace(api: &FakeApiServer, name: &str, dataplane: Option<&str>) {
    let labels: serde_json::Map<_, _> =
        dataplane.map(|v| ("ztunnel.dev/dataplane".to_owned(), v.into())).into_iter().collect();
    api.create("namespaces", "", json!({ "metadata": { "name": name, "labels": labels } })).unwrap();
}

fn put_pod(api: &FakeApiServer, pod: &Pod, dataplane: Option<&str>, host_network: bool) {
    let labels: serde_json::Map<_, _> =
        dataplane.map(|v| ("ztunnel.dev/dataplane".to_owned(), v.into())).into_iter().collect();
    let object = json!({
        "metadata": { "name": pod.name, "uid": pod.uid, "labels": labels },
        "spec": { "hostNetwork": host_network, "containers": [{ "name": "app", "image": "app:1" }] },
    });
    api.create("pods", pod.namespace, object).unwrap();
}

/// GETs the API server has answered for `kind` (`namespaces`, `pods`).
fn gets(api: &FakeApiServer, kind: &str) -> u64 {
    api.counts(kind).gets
}

/// What the tunnel's stand-in got: the request, the identity (device, inode)
/// of the namespace fd that came with it, and where its answer goes.
struct Received {
    req: Request,
    netns: Option<(u64, u64)>,
    reply: oneshot::Sender<protocol::Response>,
}

/// ztunnel's enrollment socket, stood in for by the protocol's server half.
struct FakeTunnel {
    socket: PathBuf,
    received: mpsc::UnboundedReceiver<Received>,
    connections: Arc<AtomicUsize>,
}

impl FakeTunnel {
    fn start(dir: &Path) -> Self {
        let socket = dir.join("cni.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (tx, received) = mpsc::unbounded_channel();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                counted.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ =
                        serve_connection(stream, DEFAULT_MAX_REQUEST_LEN, PATIENCE, |req, fd| async move {
                            let netns = fd.map(|fd| {
                                let meta = File::from(fd).metadata().unwrap();
                                (meta.dev(), meta.ino())
                            });
                            let (reply, answer) = oneshot::channel();
                            let _ = tx.send(Received { req, netns, reply });
                            answer
                                .await
                                .unwrap_or_else(|_| protocol::Response::error("test dropped the request"))
                        })
                        .await;
                });
            }
        });
        Self { socket, received, connections }
    }

    async fn next(&mut self) -> Received {
        tokio::time::timeout(PATIENCE, self.received.recv())
            .await
            .expect("the plugin never reached the tunnel")
            .expect("tunnel stopped")
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A real network namespace for a pod sandbox, removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(tag: &str) -> Self {
        let name = format!("ztcni-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        let ok = Command::new("ip").args(["netns", "add", &name]).status().unwrap().success();
        assert!(ok, "ip netns add {name}");
        Self { name }
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    fn identity(&self) -> (u64, u64) {
        let meta = std::fs::metadata(self.path()).unwrap();
        (meta.dev(), meta.ino())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

struct Pod {
    namespace: &'static str,
    name: &'static str,
    uid: &'static str,
    container_id: &'static str,
}

const PREV_RESULT: &str = "{\n  \"cniVersion\": \"1.0.0\",\n  \"interfaces\": [{\"name\": \"eth0\", \"sandbox\": \"/var/run/netns/x\"}],\n  \"ips\": [{\"address\": \"10.244.1.5/24\", \"gateway\": \"10.244.1.1\", \"interface\": 0},\n          {\"address\": \"fd00::5/64\", \"interface\": 0}],\n  \"dns\": {}\n}";

/// The network configuration as the runtime hands it to the last plugin of
/// a chain.
fn network_config(socket: &Path, kubeconfig: &Path, timeout: &str) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"kindnet","type":"ztunnel-cni","socket":{},"kubeconfig":{},"timeout":"{timeout}","log_level":"debug","prevResult":{PREV_RESULT}}}"#,
        serde_json::to_string(socket).unwrap(),
        serde_json::to_string(kubeconfig).unwrap(),
    )
}

/// Starts the plugin as the runtime does, stdin written and closed.
fn spawn_plugin(command: &str, pod: &Pod, netns: &str, stdin: &str) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ztunnel-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", pod.container_id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                pod.namespace, pod.name, pod.container_id, pod.uid
            ),
        )
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child
}

async fn finish(child: Child) -> Output {
    tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap()
}

async fn run_plugin(command: &str, pod: &Pod, netns: &str, stdin: &str) -> Output {
    finish(spawn_plugin(command, pod, netns, stdin)).await
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The CNI error object a failed command printed, after checking it failed.
fn cni_error(out: &Output) -> serde_json::Value {
    assert!(!out.status.success(), "expected a failure; stderr: {}", String::from_utf8_lossy(&out.stderr));
    let err: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not a CNI error object ({e}): {}", stdout(out)));
    assert_eq!(err["cniVersion"], "1.0.0");
    assert!(err["msg"].as_str().is_some_and(|m| !m.is_empty()), "{err}");
    assert!(err["details"].is_string(), "{err}");
    err
}

const MESH_POD: Pod = Pod { namespace: "shop", name: "cart-7d9", uid: "uid-cart", container_id: "4f1c0ffee" };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_lists_the_supported_versions() {
    let out = run_plugin("VERSION", &MESH_POD, "", r#"{"cniVersion":"1.0.0"}"#).await;
    assert!(out.status.success());
    assert_eq!(
        stdout(&out),
        r#"{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#
    );
}

/// Pods outside the mesh pass through untouched and never reach the tunnel.
/// The same tunnel then sees a mesh pod's ADD, so it would have seen theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_outside_the_mesh_pass_through_without_the_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kubeconfig) = fake_api(dir.path());
    let mut tunnel = FakeTunnel::start(dir.path());
    let netns = Netns::create("pass");
    let config = network_config(&tunnel.socket, &kubeconfig, "60s");

    put_namespace(&api, "plain", None);
    put_namespace(&api, "shop", Some("enabled"));
    let plain = Pod { namespace: "plain", name: "web", uid: "uid-web", container_id: "c-web" };
    let opted_out = Pod { namespace: "shop", name: "batch", uid: "uid-batch", container_id: "c-batch" };
    let host = Pod { namespace: "shop", name: "agent", uid: "uid-agent", container_id: "c-agent" };
    put_pod(&api, &plain, None, false);
    put_pod(&api, &opted_out, Some("disabled"), false);
    put_pod(&api, &host, None, true);
    put_pod(&api, &MESH_POD, None, false);

    for pod in [&plain, &opted_out, &host] {
        let out = run_plugin("ADD", pod, &netns.path(), &config).await;
        assert!(out.status.success(), "{}: {}", pod.name, String::from_utf8_lossy(&out.stderr));
        // prevResult, byte for byte.
        assert_eq!(stdout(&out), PREV_RESULT, "{}", pod.name);
    }
    // Each ADD read its namespace; a namespace outside the mesh is enough,
    // so `web` is not even fetched: only `batch` and `agent` were.
    assert_eq!((gets(&api, "namespaces"), gets(&api, "pods")), (3, 2));

    let mesh = spawn_plugin("ADD", &MESH_POD, &netns.path(), &config);
    let got = tunnel.next().await;
    assert_eq!((got.req.command, got.req.pod_name.as_str()), (TunnelCommand::Add, "cart-7d9"));
    got.reply.send(protocol::Response::new(Outcome::Enrolled, "")).unwrap();
    assert!(finish(mesh).await.status.success());
    // Only the mesh pod ever connected.
    assert_eq!(tunnel.connections(), 1);
}

/// ADD of a mesh pod hands the pod's real namespace to the tunnel and
/// returns only after the tunnel answers `enrolled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_pod_is_enrolled_with_its_netns_before_add_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kubeconfig) = fake_api(dir.path());
    let mut tunnel = FakeTunnel::start(dir.path());
    let netns = Netns::create("enroll");
    put_namespace(&api, "shop", Some("enabled"));
    put_pod(&api, &MESH_POD, None, false);
    let config = network_config(&tunnel.socket, &kubeconfig, "60s");

    let mut child = spawn_plugin("ADD", &MESH_POD, &netns.path(), &config);
    let got = tunnel.next().await;
    assert_eq!(got.netns, Some(netns.identity()), "the fd is the pod's namespace");
    assert_ne!(got.netns, Some(self_netns()), "... not the plugin's own");
    assert_eq!(
        got.req,
        Request {
            version: protocol::PROTOCOL_VERSION,
            command: TunnelCommand::Add,
            container_id: "4f1c0ffee".into(),
            pod_namespace: "shop".into(),
            pod_name: "cart-7d9".into(),
            pod_uid: "uid-cart".into(),
            netns_path: netns.path(),
            interface: "eth0".into(),
            ips: vec!["10.244.1.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        }
    );
    // The request is in and unanswered: ADD has not returned.
    assert!(child.try_wait().unwrap().is_none(), "ADD returned before the tunnel answered");
    got.reply.send(protocol::Response::new(Outcome::Enrolled, "")).unwrap();
    let out = finish(child).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout(&out), PREV_RESULT);

    // CHECK asks the tunnel with the namespace too.
    let child = spawn_plugin("CHECK", &MESH_POD, &netns.path(), &config);
    let got = tunnel.next().await;
    assert_eq!((got.req.command, got.netns), (TunnelCommand::Check, Some(netns.identity())));
    got.reply.send(protocol::Response::new(Outcome::Ok, "")).unwrap();
    let out = finish(child).await;
    assert!(out.status.success());
    assert_eq!(stdout(&out), "");
}

fn self_netns() -> (u64, u64) {
    let meta = std::fs::metadata("/proc/self/ns/net").unwrap();
    (meta.dev(), meta.ino())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_fails_when_the_tunnel_socket_is_absent() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kubeconfig) = fake_api(dir.path());
    let netns = Netns::create("nosock");
    put_namespace(&api, "shop", Some("enabled"));
    put_pod(&api, &MESH_POD, None, false);
    let config = network_config(&dir.path().join("absent.sock"), &kubeconfig, "60s");

    let out = run_plugin("ADD", &MESH_POD, &netns.path(), &config).await;
    let err = cni_error(&out);
    assert_eq!(err["code"], 11, "try again later: {err}");
    assert!(err["details"].as_str().unwrap().contains("absent.sock"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_fails_when_the_tunnel_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kubeconfig) = fake_api(dir.path());
    let mut tunnel = FakeTunnel::start(dir.path());
    let netns = Netns::create("refuse");
    put_namespace(&api, "shop", Some("enabled"));
    put_pod(&api, &MESH_POD, None, false);
    let config = network_config(&tunnel.socket, &kubeconfig, "60s");

    let child = spawn_plugin("ADD", &MESH_POD, &netns.path(), &config);
    let got = tunnel.next().await;
    got.reply
        .send(protocol::Response::error("no certificate for spiffe://cluster.local/ns/shop/sa/cart"))
        .unwrap();
    let err = cni_error(&finish(child).await);
    assert_eq!(err["code"], 100);
    assert!(err["details"].as_str().unwrap().contains("no certificate"), "{err}");
}

/// The API server cannot be reached, or answers 503: the pod cannot be
/// judged, so ADD fails (within its timeout) rather than let a possible mesh
/// pod run unprotected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_fails_while_the_api_server_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let tunnel = FakeTunnel::start(dir.path());
    let netns = Netns::create("noapi");
    let (api, kubeconfig) = fake_api(dir.path());
    put_namespace(&api, "shop", Some("enabled"));
    put_pod(&api, &MESH_POD, None, false);

    api.set_unavailable(true);
    let started = std::time::Instant::now();
    let out =
        run_plugin("ADD", &MESH_POD, &netns.path(), &network_config(&tunnel.socket, &kubeconfig, "2s")).await;
    assert_eq!(cni_error(&out)["code"], 11);
    // kube-rs retries a 503 for minutes on its own; the plugin's 2 s
    // timeout must hold anyway. (A margin no loaded machine comes near.)
    assert!(started.elapsed() < Duration::from_secs(60), "ADD took {:?}", started.elapsed());

    // Nobody listening at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let text =
        std::fs::read_to_string(&kubeconfig).unwrap().replace(&api.addr().to_string(), &closed.to_string());
    std::fs::write(&kubeconfig, text).unwrap();
    let out =
        run_plugin("ADD", &MESH_POD, &netns.path(), &network_config(&tunnel.socket, &kubeconfig, "2s")).await;
    assert_eq!(cni_error(&out)["code"], 11);
    assert_eq!(tunnel.connections(), 0);
}

/// DEL never fails, with or without the tunnel; with it, the tunnel is told
/// (no fd: the namespace may be gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_succeeds_with_or_without_the_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kubeconfig) = fake_api(dir.path());
    // CHECK of a pod outside the mesh asks the API server, so its count works.
    put_namespace(&api, "shop", None);
    let absent = network_config(&dir.path().join("absent.sock"), &kubeconfig, "60s");
    assert!(run_plugin("CHECK", &MESH_POD, "/proc/self/ns/net", &absent).await.status.success());
    assert_eq!(gets(&api, "namespaces"), 1);

    let out = run_plugin("DEL", &MESH_POD, "", &absent).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout(&out), "");

    let mut tunnel = FakeTunnel::start(dir.path());
    let config = network_config(&tunnel.socket, &kubeconfig, "60s");
    let child = spawn_plugin("DEL", &MESH_POD, "", &config);
    let got = tunnel.next().await;
    assert_eq!(
        (got.req.command, got.netns, got.req.container_id.as_str()),
        (TunnelCommand::Del, None, "4f1c0ffee")
    );
    got.reply.send(protocol::Response::error("tunnel is shutting down")).unwrap();
    let out = finish(child).await;
    assert!(out.status.success(), "DEL succeeds even when the tunnel answers an error");
    assert_eq!(stdout(&out), "");
    // The API server is not asked on DEL.
    assert_eq!((gets(&api, "namespaces"), gets(&api, "pods")), (1, 0));
}
