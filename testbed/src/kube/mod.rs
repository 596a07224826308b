//! A fake Kubernetes API server, for ztunnel's Kubernetes-mode tests and
//! benchmark.
//!
//! It stands in for the real kube-apiserver, which cannot run on the
//! machines the tests run on. It speaks plain HTTP/1.1 on 127.0.0.1 from its
//! own Tokio runtime, so synchronous tests drive it through [`FakeApiServer`]
//! while kube-rs clients (watchers, reflectors, the CA's TokenReview, the CNI
//! plugin's GETs) talk to it over real sockets with a written kubeconfig.
//!
//! ```no_run
//! use serde_json::json;
//! use ztunnel_testbed::kube::{FakeApiServer, TokenInfo};
//!
//! # fn main() -> anyhow::Result<()> {
//! let api = FakeApiServer::start()?;
//! api.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig"))?; // for `ztunnel run --kubernetes --kubeconfig`
//! api.create("namespaces", "", json!({ "metadata": { "name": "shop", "labels": { "ztunnel.dev/dataplane": "enabled" } } }))?;
//! api.create("pods", "shop", json!({ "metadata": { "name": "web-1" }, "spec": { "nodeName": "n1" } }))?;
//! api.merge_patch("pods", "shop", "web-1", json!({ "status": { "phase": "Running", "podIP": "198.19.1.11" } }))?;
//! api.register_token("node-token", TokenInfo::new("kube-system", "ztunnel", &["ztunnel-ca"], std::time::Duration::from_secs(3600)));
//! api.kill_streams(); // every watcher must resume
//! println!("{:?}", api.counts("pods"));
//! # Ok(())
//! # }
//! ```
//!
//! # What it implements, as the real server does
//! - A new server holds the namespaces a new cluster has
//!   ([`SYSTEM_NAMESPACES`]) and nothing else.
//! - Resources: core/v1 pods, namespaces, services, configmaps, nodes;
//!   discovery.k8s.io/v1 endpointslices; security.ztunnel.dev/v1
//!   authorizationpolicies (a namespaced custom resource, stored as sent);
//!   authentication.k8s.io/v1 tokenreviews (create only). The table is in
//!   `resources.rs`. Discovery: `/version`, `/api`, `/api/v1`, `/apis`,
//!   `/apis/{group}`, `/apis/{group}/{version}`; `/healthz`, `/readyz`,
//!   `/livez` (no authentication needed for these and `/version`).
//! - Paths: cluster-scoped, namespaced, all-namespaces collections, objects,
//!   and the `/status` subresource (PUT/PATCH change only `status` there).
//! - Writes: POST (201), PUT, PATCH with `application/merge-patch+json`
//!   (RFC 7386) or `application/json-patch+json` (RFC 6902), DELETE (returns
//!   the object). Objects get `metadata.uid` (kept when given),
//!   `resourceVersion` (one global counter, as etcd's revision),
//!   `creationTimestamp`, `generation` (bumped when anything but metadata
//!   and status changes), `apiVersion`/`kind`; `generateName`; a
//!   namespaced object needs its namespace to exist (404); an update that
//!   changes nothing is a no-op (no new resourceVersion, no event); a
//!   `resourceVersion` in a PUT body or a patch is a precondition (409
//!   Conflict). Defaults: a Namespace's `status.phase` Active, a Pod's
//!   Pending, a Service's `type` ClusterIP and a ClusterIP from
//!   [`SERVICE_CIDR`] when it names none.
//! - Errors are `Status` objects with the real reason and wording: 400
//!   BadRequest, 401 Unauthorized, 404 NotFound, 405, 409 AlreadyExists and
//!   Conflict, 410 Expired, 415, 422 Invalid, 503 ServiceUnavailable, 504 for
//!   a resourceVersion ahead of the server.
//! - LIST: `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`,
//!   `>`, `<`; comma is AND), `fieldSelector` (`metadata.name`,
//!   `metadata.namespace` and per-resource fields such as a pod's
//!   `spec.nodeName`, `spec.serviceAccountName`, `status.phase`; `=`, `==`,
//!   `!=`; an unsupported field is 400), `limit` + `continue` (base64url
//!   tokens; every page reads the snapshot of the first one, rebuilt from the
//!   history; a token older than the history is 410; `remainingItemCount`
//!   without selectors), `resourceVersion` + `resourceVersionMatch` (unset:
//!   most recent; "0"/NotOlderThan: current state; Exact: the state at that
//!   version, 410 once compacted) with the real server's validation (422).
//!   The list's `metadata.resourceVersion` is the version it was read at.
//! - WATCH (`watch=true|1`): from `resourceVersion` (replayed from the
//!   history; older than it: 200 then one ERROR event with a 410 Expired
//!   Status), unset or "0" (synthetic ADDED for the current state, then
//!   live), `sendInitialEvents=true` + `resourceVersionMatch=NotOlderThan` +
//!   `allowWatchBookmarks=true` (streaming list: ADDED for the current
//!   state, then a BOOKMARK annotated `k8s.io/initial-events-end: "true"`),
//!   `allowWatchBookmarks` (BOOKMARKs every [`Options::bookmark_interval`]
//!   carrying kind, apiVersion and the resourceVersion the stream has caught
//!   up to), `timeoutSeconds` (the stream ends cleanly), label and field
//!   selectors with transitions (an object that stops matching is sent as
//!   DELETED with its new state, one that starts matching as ADDED), a
//!   DELETED object stamped with the deletion's resourceVersion. A watcher
//!   that falls [`Options::watch_buffer`] events behind is closed, as the
//!   real server closes a watcher that cannot keep up.
//! - Authentication: a bearer token, the handle's (written into the
//!   kubeconfig) or a registered service account token carrying
//!   [`API_AUDIENCE`]; 401 otherwise ([`Options::require_auth`]).
//! - TokenReview: from tokens registered with [`FakeApiServer::register_token`]:
//!   audiences intersected with `spec.audiences` (default the API server's),
//!   expiry, the binding to a pod that must still exist with that uid, user
//!   info with the service account's groups and the `extra` keys
//!   `authentication.kubernetes.io/{pod-name,pod-uid,node-name,node-uid,credential-id}`;
//!   failures report `authenticated: false` and the real server's error text.
//!
//! # What it does not implement
//! - TLS, HTTP/2, protobuf, table output, aggregated discovery (v2), OpenAPI.
//! - Authorization (RBAC): an authenticated caller may do anything.
//! - Admission, defaulting and validation beyond the above: no schema
//!   checks (custom resources are stored as sent), no immutable fields, no
//!   ClusterIP conflict checks, pods' status is not split from their spec on
//!   create/update of the main resource.
//! - Objects a real cluster creates by itself: the `kubernetes` Service and
//!   its EndpointSlice, nodes, service accounts.
//! - Graceful deletion, finalizers, owner references and garbage
//!   collection, namespace termination: DELETE removes the object at once and
//!   deleting a namespace leaves its objects.
//! - Strategic merge patch and server-side apply (415), `dryRun`,
//!   `fieldManager`/managedFields, DELETE of a collection, the legacy
//!   `/watch/` paths and watches of a single object by path.
//! - Waiting for a resourceVersion ahead of the server: it answers 504 at
//!   once where the real one waits up to 3 s first.
//! - [`FakeApiServer::restart`] keeps the history (as etcd keeps it across an
//!   API server restart); a newly started real watch cache may instead answer
//!   410 to resourceVersions from before it started. Use
//!   [`FakeApiServer::compact`] for that.

mod resources;
mod select;
mod server;
mod status;
mod store;
mod tokens;
mod watch;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::{
    net::{TcpListener, TcpSocket},
    runtime::Runtime,
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use self::{
    resources::{RESOURCES, ResourceDef},
    status::ApiError,
    store::SERVICE_CIDR,
    tokens::{API_AUDIENCE, BoundObject, TokenInfo},
};
use self::{
    server::Shared,
    store::{ListQuery, Patch, Store},
    tokens::Registered,
};

/// The namespaces every cluster starts with; the fake creates them too.
pub const SYSTEM_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

/// How the fake behaves where tests want to choose.
#[derive(Debug, Clone)]
pub struct Options {
    /// Changes kept for watches and paginated lists to resume from (etcd's
    /// compaction window); older resourceVersions get 410 Gone.
    pub history: usize,
    /// Changes a watcher may fall behind before its stream is closed.
    pub watch_buffer: usize,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK
    /// (the real server: about a minute).
    pub bookmark_interval: Duration,
    /// Refuse requests without a valid bearer token (401).
    pub require_auth: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            history: 4096,
            watch_buffer: 16_384,
            bookmark_interval: Duration::from_secs(1),
            require_auth: true,
        }
    }
}

/// Requests the server answered for one resource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceCounts {
    pub lists: u64,
    pub watches: u64,
    /// Watch streams open now.
    pub open_watches: u64,
    pub gets: u64,
    /// POST, PUT, PATCH and DELETE over HTTP (not the handle's own writes).
    pub writes: u64,
}

struct Serving {
    stop: CancellationToken,
    tracker: TaskTracker,
    accept: JoinHandle<()>,
}

/// A running fake API server. Dropping it stops the server.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    rt: Option<Runtime>,
    serving: Mutex<Option<Serving>>,
}

impl FakeApiServer {
    /// Starts a server with the default [`Options`] on an ephemeral port of 127.0.0.1.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()
            .context("start the fake API server's runtime")?;
        let listener = {
            let _guard = rt.enter();
            bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).context("listen on 127.0.0.1")?
        };
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(options.history, options.watch_buffer)),
            tokens: Mutex::default(),
            admin_token: hex(&store::random_uid()),
            options,
            addr,
            unavailable: Default::default(),
            streams: Mutex::new(CancellationToken::new()),
            counts: Mutex::default(),
        });
        let server = Self { shared, rt: Some(rt), serving: Mutex::new(None) };
        for ns in SYSTEM_NAMESPACES {
            server.create("namespaces", "", json!({ "metadata": { "name": ns } }))?;
        }
        server.serve(listener);
        Ok(server)
    }

    fn rt(&self) -> &Runtime {
        // Only Drop takes the runtime.
        self.rt.as_ref().unwrap_or_else(|| unreachable!("the runtime lives as long as the handle"))
    }

    fn serve(&self, listener: TcpListener) {
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let accept =
            self.rt().spawn(server::serve(listener, self.shared.clone(), stop.clone(), tracker.clone()));
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = Some(Serving { stop, tracker, accept });
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The bearer token the server accepts for everything.
    pub fn token(&self) -> &str {
        &self.shared.admin_token
    }

    /// Writes a kubeconfig (context `fake`, namespace `default`) that reaches
    /// this server with its token.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "fake", "cluster": { "server": self.url() } }],
            "users": [{ "name": "fake-admin", "user": { "token": self.token() } }],
            "contexts": [{ "name": "fake", "context": { "cluster": "fake", "user": "fake-admin", "namespace": "default" } }],
            "current-context": "fake",
        });
        std::fs::write(path, serde_yaml_ng::to_string(&config)?)
            .with_context(|| format!("write {}", path.display()))
    }

    /// Creates `object` (a kind, `Pod`, or plural, `pods`); `namespace` ""
    /// takes the object's own (and is ignored for cluster-scoped kinds).
    pub fn create(&self, kind: &str, namespace: &str, object: Value) -> Result<Value, ApiError> {
        let res = resource(kind)?;
        Ok((*self.shared.store().create(res, namespace, object)?).clone())
    }

    /// Creates many objects under one lock (each in its own
    /// `metadata.namespace`); stops at the first failure. Returns how many
    /// were created.
    pub fn create_many(
        &self,
        kind: &str,
        objects: impl IntoIterator<Item = Value>,
    ) -> Result<usize, ApiError> {
        let res = resource(kind)?;
        let mut store = self.shared.store();
        let mut n = 0;
        for o in objects {
            store.create(res, "", o)?;
            n += 1;
        }
        Ok(n)
    }

    /// Replaces the object named by `object.metadata.name` (PUT).
    pub fn replace(&self, kind: &str, namespace: &str, object: Value) -> Result<Value, ApiError> {
        let res = resource(kind)?;
        let name = object.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_owned();
        let ns = namespace_of(res, namespace, &object);
        Ok((*self.shared.store().replace(res, &ns, &name, object, false)?).clone())
    }

    /// Applies an RFC 7386 merge patch (PATCH application/merge-patch+json).
    pub fn merge_patch(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        patch: Value,
    ) -> Result<Value, ApiError> {
        let res = resource(kind)?;
        Ok((*self.shared.store().patch(res, namespace, name, &Patch::Merge(patch), false)?).clone())
    }

    /// Deletes at once; returns the object's last state.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<Value, ApiError> {
        let res = resource(kind)?;
        Ok((*self.shared.store().delete(res, namespace, name)?).clone())
    }

    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Result<Value, ApiError> {
        let res = resource(kind)?;
        Ok((*self.shared.store().get(res, namespace, name)?).clone())
    }

    /// Every object of `kind` in `namespace` ("" = all namespaces), in key order.
    pub fn list(&self, kind: &str, namespace: &str) -> Result<Vec<Value>, ApiError> {
        let res = resource(kind)?;
        let sel = select::Selection {
            namespace: (res.namespaced && !namespace.is_empty()).then(|| namespace.to_owned()),
            ..Default::default()
        };
        let page = self.shared.store().list(res, &sel, &ListQuery::default())?;
        Ok(page.items.iter().map(|o| (**o).clone()).collect())
    }

    /// The store's current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Cuts every open WATCH connection mid-stream (no clean end of the body).
    pub fn kill_streams(&self) {
        self.shared.kill_streams();
    }

    /// Forgets the history: a WATCH from, an Exact LIST at, or a continue
    /// token of an older resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// An API server restart: stops listening, drops every connection,
    /// listens again on the same port with the same objects and history.
    pub fn restart(&self) -> anyhow::Result<()> {
        let old = self.serving.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(s) = old {
            s.stop.cancel();
            self.kill_streams();
            // Waited for from outside the runtime: the caller may itself be
            // inside another one (a test's), where block_on would panic.
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            self.rt().spawn(async move {
                let _ = s.accept.await;
                s.tracker.close();
                s.tracker.wait().await;
                let _ = done_tx.send(());
            });
            done_rx
                .recv_timeout(Duration::from_secs(10))
                .context("the fake API server's connections did not close within 10s")?;
        }
        let listener = {
            let _guard = self.rt().enter();
            bind(self.shared.addr).with_context(|| format!("listen again on {}", self.shared.addr))?
        };
        self.serve(listener);
        Ok(())
    }

    /// While true every request, health checks included, gets 503, and open
    /// watches are cut (an outage).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
        if unavailable {
            self.kill_streams();
        }
    }

    /// Requests answered so far, per resource (plural name).
    pub fn request_counts(&self) -> BTreeMap<String, ResourceCounts> {
        let counts = self.shared.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    /// Requests answered so far for one resource (a kind or plural).
    pub fn counts(&self, kind: &str) -> ResourceCounts {
        let plural = resources::by_name(kind).map_or(kind, |r| r.plural);
        self.request_counts().get(plural).copied().unwrap_or_default()
    }

    /// Registers a service account token: TokenReview answers from it, and
    /// it authenticates requests if it carries [`API_AUDIENCE`].
    pub fn register_token(&self, token: &str, info: TokenInfo) {
        let sa_uid = store::random_uid();
        let reg = Registered { info, jti: store::random_uid(), sa_uid };
        self.shared.tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(token.to_owned(), reg);
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.kill_streams();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Listens on `addr` (inside the runtime).
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    // Connections closed by a restart linger in TIME_WAIT on this port.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn resource(kind: &str) -> Result<&'static ResourceDef, ApiError> {
    resources::by_name(kind).ok_or_else(ApiError::no_route)
}

fn namespace_of(res: &ResourceDef, namespace: &str, object: &Value) -> String {
    if !res.namespaced {
        return String::new();
    }
    if namespace.is_empty() {
        object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default().to_owned()
    } else {
        namespace.to_owned()
    }
}

fn hex(uid: &str) -> String {
    uid.replace('-', "")
}
