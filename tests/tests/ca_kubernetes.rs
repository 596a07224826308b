//! `ztunnel ca serve --kubernetes` against the fake API server: the real
//! binary, its Secret made by `ztunnel ca init --kubernetes-secret` and
//! mounted as the kubelet would, real TLS on loopback, node tunnels' CA
//! client (token auth, DNS name) asking for real certificates. No root
//! needed.
//!
//! The cluster: tunnel pods `ztunnel-a` on node-a and `ztunnel-b` on node-b
//! (namespace ztunnel-system, ServiceAccount ztunnel); `shop/web-1`
//! (ServiceAccount web) on node-a, `shop/db-1` (db) on node-b.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls_pki_types::UnixTime;
use serde_json::{Value, json};
use tokio::sync::watch;
use ztunnel::{
    identity::{
        ca_client::{CaAuth, CaClient, CaClientError, RemoteCa, Signed},
        cert::{csr_pem, new_key},
    },
    netns::Netns,
    tls::verify::{Expect, TrustBundle, verify_peer},
};
use ztunnel_testbed::{
    bins,
    kube::{FakeApiServer, TokenInfo},
};

const AUDIENCE: &str = "ztunnel-ca";
const SYSTEM: &str = "ztunnel-system";
/// Long enough for a loaded 2-core machine; every wait ends as soon as it can.
const PATIENCE: Duration = Duration::from_secs(30);
const HOUR: Duration = Duration::from_secs(3600);

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

struct Cluster {
    api: FakeApiServer,
    dir: tempfile::TempDir,
    ca: Child,
    port: u16,
    log: PathBuf,
    bundle: TrustBundle,
    rt: tokio::runtime::Runtime,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.ca.kill();
        let _ = self.ca.wait();
    }
}

fn pod(ns: &str, name: &str, sa: &str, node: &str) -> Value {
    json!({
        "metadata": { "namespace": ns, "name": name, "uid": format!("uid-{name}") },
        "spec": { "nodeName": node, "serviceAccountName": sa, "containers": [{ "name": "c", "image": "i" }] },
    })
}

fn running(api: &FakeApiServer, ns: &str, name: &str, sa: &str, node: &str) {
    api.create("pods", ns, pod(ns, name, sa, node)).unwrap();
    api.merge_patch("pods", ns, name, json!({ "status": { "phase": "Running" } })).unwrap();
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the kubelet does with a Secret volume: a file per key.
fn mount_secret(manifest: &Path, dir: &Path) {
    let secret: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    assert_eq!(secret["kind"], "Secret");
    assert_eq!(secret["metadata"]["name"], "ztunnel-ca");
    std::fs::create_dir_all(dir).unwrap();
    for (k, v) in secret["stringData"].as_object().unwrap() {
        std::fs::write(dir.join(k), v.as_str().unwrap()).unwrap();
    }
}

fn ztunnel(args: &[&str]) -> String {
    let out = Command::new(bins::ztunnel().unwrap()).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ztunnel {args:?}: {text}");
    text
}

fn start() -> Cluster {
    let api = FakeApiServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for ns in [SYSTEM, "shop"] {
        api.create("namespaces", "", json!({ "metadata": { "name": ns } })).unwrap();
    }
    running(&api, SYSTEM, "ztunnel-a", "ztunnel", "node-a");
    running(&api, SYSTEM, "ztunnel-b", "ztunnel", "node-b");
    running(&api, "shop", "web-1", "web", "node-a");
    running(&api, "shop", "db-1", "db", "node-b");

    // The operator's steps: a CA, its Secret, applied and mounted.
    let ca_dir = dir.path().join("ca");
    let secret = dir.path().join("ca-secret.yaml");
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    ztunnel(&["ca", "init", "--dir", &path(&ca_dir), "--kubernetes-secret", &path(&secret)]);
    let mounted = dir.path().join("mounted-ca");
    mount_secret(&secret, &mounted);

    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let port = free_port();
    let log = dir.path().join("ca.log");
    let log_file = std::fs::File::create(&log).unwrap();
    // The Deployment's arguments, plus where the API server is.
    let ca = Command::new(bins::ztunnel().unwrap())
        .args(["ca", "serve", "--kubernetes", "--plugin-ca-dir", &path(&mounted)])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--audience", AUDIENCE])
        .args(["--kubeconfig", &path(&kubeconfig)])
        .env("POD_NAMESPACE", SYSTEM)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();

    // The CA publishes its roots; node tunnels mount them from there.
    let mut published = None;
    wait_for("the trust bundle ConfigMap", || {
        published = api.get("configmaps", SYSTEM, "ztunnel-trust-bundle").ok();
        published.is_some()
    });
    let pem = published.unwrap()["data"]["trust-bundle.pem"].as_str().unwrap().to_owned();
    assert_eq!(pem, std::fs::read_to_string(ca_dir.join("trust-bundle.pem")).unwrap());
    let bundle = TrustBundle::from_pem(&pem).unwrap();
    wait_for("the CA to listen", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("CA signing service ready")
    });

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    Cluster { api, dir, ca, port, log, bundle, rt }
}

impl Cluster {
    /// Registers `token` (as the API server would have issued it) and
    /// writes it where a node's projected volume would.
    fn token(&self, token: &str, info: TokenInfo) -> PathBuf {
        self.api.register_token(token, info);
        let file = self.dir.path().join(format!("token-{token}"));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        file
    }

    /// A token the kubelet would project into `ztunnel-<node>`.
    fn tunnel_token(&self, token: &str, node: &str, with_node_extra: bool) -> PathBuf {
        let pod = format!("ztunnel-{node}");
        let info =
            TokenInfo::new(SYSTEM, "ztunnel", &[AUDIENCE], HOUR).bound_to_pod(&pod, &format!("uid-{pod}"));
        let info = if with_node_extra { info.on_node(&format!("node-{node}"), "node-uid") } else { info };
        self.token(token, info)
    }

    /// A node tunnel's CA client (by DNS name, as in a cluster).
    fn client(&self, token: &Path) -> CaClient {
        let (_, bundle) = watch::channel(Arc::new(self.bundle.clone()));
        CaClient::Remote(RemoteCa {
            address: format!("localhost:{}", self.port).parse().unwrap(),
            netns: Netns::current(),
            trust_domain: "cluster.local".parse().unwrap(),
            auth: CaAuth::Token(token.to_owned()),
            bundle,
            clock_skew: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
        })
    }

    fn sign(&self, token: &Path, identity: &str) -> Result<Signed, CaClientError> {
        let csr = csr_pem(&new_key().unwrap(), &identity.parse().unwrap()).unwrap();
        self.rt.block_on(self.client(token).sign(csr, Duration::from_secs(600)))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The refusal's reason and message; the CA logged it with the node,
    /// the identity and the same reason.
    fn refused(&self, token: &Path, identity: &str, node: &str) -> (String, String) {
        let err = self.sign(token, identity).expect_err("refused");
        let CaClientError::Refused { reason, error } = err else { panic!("not a refusal: {err}") };
        // tracing's text format quotes some values: match either way.
        let field = |l: &str, k: &str, v: &str| {
            l.contains(&format!("{k}={v}")) || l.contains(&format!("{k}=\"{v}\""))
        };
        wait_for("the refusal in the CA's log", || {
            self.log().lines().any(|l| {
                l.contains("certificate refused")
                    && field(l, "node", node)
                    && field(l, "identity", identity)
                    && field(l, "reason", &reason)
            })
        });
        (reason, error)
    }
}

fn assert_certificate_for(signed: &Signed, bundle: &TrustBundle, identity: &str) {
    let peer = verify_peer(
        &signed.chain[0],
        &signed.chain[1..],
        bundle,
        &Expect::Identity(identity.parse().unwrap()),
        UnixTime::now(),
        Duration::ZERO,
    )
    .unwrap();
    assert_eq!(peer.to_string(), identity);
}

#[test]
fn a_node_gets_certificates_for_its_own_pods_and_nothing_else() {
    let c = start();
    let a = c.tunnel_token("token-a", "a", true);
    let signed = c.sign(&a, WEB).unwrap();
    assert_certificate_for(&signed, &c.bundle, WEB);
    assert!(
        c.log().lines().any(|l| l.contains("certificate issued") && l.contains("node-a") && l.contains(WEB)),
        "{}",
        c.log()
    );

    // db runs on node-b only.
    let (reason, error) = c.refused(&a, DB, "node-a");
    assert_eq!(reason, "not_authorized");
    assert!(error.contains("no running pod with service account shop/db is on node node-a"), "{error}");

    // node-b's token gets db's, and not web's. Its token has no node-name
    // extra (older API servers): the CA takes the node from the bound pod.
    let b = c.tunnel_token("token-b", "b", false);
    assert_certificate_for(&c.sign(&b, DB).unwrap(), &c.bundle, DB);
    let (reason, _) = c.refused(&b, WEB, "node-b");
    assert_eq!(reason, "not_authorized");

    // Node credentials are for plain hosts: never issued here.
    let (reason, error) = c.refused(&a, "spiffe://cluster.local/ztunnel/node/node-a", "node-a");
    assert_eq!(reason, "not_authorized");
    assert!(error.contains("node credentials are not issued"), "{error}");
}

#[test]
fn unknown_expired_and_wrong_audience_tokens_and_other_accounts_are_refused() {
    let c = start();
    let unknown = c.dir.path().join("token-unknown");
    std::fs::write(&unknown, "never-issued").unwrap();
    let expired = c.token(
        "token-expired",
        TokenInfo::new(SYSTEM, "ztunnel", &[AUDIENCE], Duration::ZERO)
            .bound_to_pod("ztunnel-a", "uid-ztunnel-a"),
    );
    let other_audience = c.token(
        "token-api",
        TokenInfo::new(SYSTEM, "ztunnel", &["https://kubernetes.default.svc.cluster.local"], HOUR)
            .bound_to_pod("ztunnel-a", "uid-ztunnel-a"),
    );
    // A workload's own token: valid, right audience, not a tunnel.
    let workload = c.token(
        "token-web",
        TokenInfo::new("shop", "web", &[AUDIENCE], HOUR)
            .bound_to_pod("web-1", "uid-web-1")
            .on_node("node-a", "n"),
    );
    // A tunnel token that is not bound to a pod (a legacy Secret token).
    let unbound = c.token("token-unbound", TokenInfo::new(SYSTEM, "ztunnel", &[AUDIENCE], HOUR));

    for (token, reason, says) in [
        (&unknown, "token_rejected", "invalid bearer token"),
        (&expired, "token_rejected", "has expired"),
        (&other_audience, "token_rejected", "audiences"),
        (&workload, "not_a_tunnel", "system:serviceaccount:shop:web is not the node tunnel's ServiceAccount"),
        (&unbound, "token_not_bound", "not bound to a pod"),
    ] {
        let (got, error) = c.refused(token, WEB, "-");
        assert_eq!(got, reason, "{}: {error}", token.display());
        assert!(error.contains(says), "{}: {error}", token.display());
    }

    // No token file at all: the node's own problem, said before any request.
    let err = c.sign(&c.dir.path().join("missing"), WEB).unwrap_err();
    assert_eq!(err.reason(), "ca_token", "{err}");
}

#[test]
fn a_pod_that_moved_away_or_a_deleted_tunnel_pod_gets_nothing_more() {
    let c = start();
    let a = c.tunnel_token("token-a", "a", true);
    let b = c.tunnel_token("token-b", "b", true);
    c.sign(&a, WEB).unwrap();

    // web moves from node-a to node-b.
    c.api.delete("pods", "shop", "web-1").unwrap();
    running(&c.api, "shop", "web-2", "web", "node-b");
    let mut last = None;
    wait_for("node-a to lose web", || {
        last = c.sign(&a, WEB).err();
        last.is_some()
    });
    assert_eq!(last.unwrap().reason(), "not_authorized");
    c.refused(&a, WEB, "node-a");
    assert_certificate_for(&c.sign(&b, WEB).unwrap(), &c.bundle, WEB);

    // A finished pod holds nothing either.
    c.api.merge_patch("pods", "shop", "web-2", json!({ "status": { "phase": "Succeeded" } })).unwrap();
    wait_for("node-b to lose the finished web", || c.sign(&b, WEB).is_err());

    // The tunnel pod on node-b is deleted: its token is worth nothing at once
    // (its review is still cached; the pod check is made every time).
    c.sign(&b, DB).unwrap();
    c.api.delete("pods", SYSTEM, "ztunnel-b").unwrap();
    let mut last = None;
    wait_for("the deleted tunnel pod's token to be refused", || {
        last = c.sign(&b, DB).err();
        last.is_some()
    });
    let err = last.unwrap();
    assert_eq!(err.reason(), "tunnel_pod_gone", "{err}");
    assert!(err.to_string().contains("ztunnel-system/ztunnel-b"), "{err}");
}

#[test]
fn reviews_are_cached_so_a_node_renewing_many_certificates_costs_one() {
    let c = start();
    let a = c.tunnel_token("token-a", "a", true);
    let before = c.api.counts("tokenreviews").writes;
    for _ in 0..10 {
        c.sign(&a, WEB).unwrap();
    }
    let reviews = c.api.counts("tokenreviews").writes - before;
    assert_eq!(reviews, 1, "ten CSRs within the cache's lifetime, one TokenReview");
    // The trust bundle endpoint answers the same token.
    let (bundle, root) = c.rt.block_on(c.client(&a).bundle()).unwrap();
    assert_eq!(bundle.fingerprints(), c.bundle.fingerprints());
    assert_eq!(vec![root], c.bundle.fingerprints());
}

#[test]
fn ca_import_takes_an_istio_cacerts_directory() {
    // A cacerts directory as Istio's docs make one: here from a ztunnel CA's
    // files, with a three-certificate chain file.
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let src_ca = dir.path().join("src");
    ztunnel(&["ca", "init", "--dir", &path(&src_ca), "--trust-domain", "mesh.example"]);
    let cacerts = dir.path().join("cacerts");
    std::fs::create_dir_all(&cacerts).unwrap();
    let read = |f: &str| std::fs::read_to_string(src_ca.join(f)).unwrap();
    std::fs::write(cacerts.join("ca-cert.pem"), read("gen-1/intermediate-cert.pem")).unwrap();
    std::fs::write(cacerts.join("ca-key.pem"), read("gen-1/intermediate-key.pem")).unwrap();
    std::fs::write(cacerts.join("root-cert.pem"), read("gen-1/root-cert.pem")).unwrap();
    std::fs::write(
        cacerts.join("cert-chain.pem"),
        format!("{}{}", read("gen-1/intermediate-cert.pem"), read("gen-1/root-cert.pem")),
    )
    .unwrap();

    let out_dir = dir.path().join("imported");
    let secret = dir.path().join("secret.yaml");
    let said = ztunnel(&[
        "ca",
        "import",
        "--from",
        &path(&cacerts),
        "--dir",
        &path(&out_dir),
        "--trust-domain",
        "mesh.example",
        "--kubernetes-secret",
        &path(&secret),
    ]);
    assert!(said.contains("imported"), "{said}");
    let status = ztunnel(&["ca", "status", "--dir", &path(&out_dir)]);
    assert!(status.contains("trust domain: mesh.example"), "{status}");
    let mounted = dir.path().join("mounted");
    mount_secret(&secret, &mounted);
    assert_eq!(std::fs::read_to_string(mounted.join("trust-domain")).unwrap().trim(), "mesh.example");

    // `ca export` writes the same Secret from a CA directory.
    let exported = dir.path().join("exported.yaml");
    ztunnel(&["ca", "export", "--dir", &path(&out_dir), "--kubernetes-secret", &path(&exported)]);
    let remounted = dir.path().join("remounted");
    mount_secret(&exported, &remounted);
    for f in ["ca-cert.pem", "ca-key.pem", "root-cert.pem", "trust-domain"] {
        assert_eq!(
            std::fs::read_to_string(mounted.join(f)).unwrap(),
            std::fs::read_to_string(remounted.join(f)).unwrap(),
            "{f}"
        );
    }

    // A key that is not the certificate's is refused, with the file named.
    std::fs::write(cacerts.join("ca-key.pem"), read("gen-1/root-key.pem")).unwrap();
    let out = Command::new(bins::ztunnel().unwrap())
        .args(["ca", "import", "--from", &path(&cacerts), "--dir", &path(&dir.path().join("other"))])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ca-key.pem: is not the key of ca-cert.pem"), "{err}");
}
