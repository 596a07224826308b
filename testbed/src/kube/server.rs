//! HTTP: routing, authentication, and the verbs on resources (the watch
//! stream is in `watch`).

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited, combinators::BoxBody};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    Options, ResourceCounts,
    resources::{self, ResourceDef},
    select::{FieldSelector, LabelSelector, Selection},
    status::ApiError,
    store::{ListPage, ListQuery, Patch, Store},
    tokens::{self, Registered},
    watch,
};

/// The real API server's limit on a request body.
const MAX_BODY: usize = 3 * 1024 * 1024;

pub type Body = BoxBody<Bytes, io::Error>;

/// What the handle and the server threads share.
pub struct Shared {
    pub store: Mutex<Store>,
    pub tokens: Mutex<HashMap<String, Registered>>,
    pub admin_token: String,
    pub options: Options,
    pub addr: SocketAddr,
    pub unavailable: AtomicBool,
    /// Cancelled (and replaced) to cut every open watch.
    pub streams: Mutex<CancellationToken>,
    pub counts: Mutex<BTreeMap<&'static str, ResourceCounts>>,
}

impl Shared {
    pub fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves a consistent store: every
        // write is applied in one step under it.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn count(&self, res: &'static ResourceDef, f: impl FnOnce(&mut ResourceCounts)) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        f(counts.entry(res.plural).or_default());
    }

    pub fn streams_token(&self) -> CancellationToken {
        self.streams.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn kill_streams(&self) {
        let mut t = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        t.cancel();
        *t = CancellationToken::new();
    }

    fn authenticated(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
        else {
            return false;
        };
        if token == self.admin_token {
            return true;
        }
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens::review(&tokens, &self.store(), token, &[]).authenticated
    }
}

/// Accepts connections until `stop`; each is served until it ends or `stop`.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tracker.spawn(connection(stream, shared.clone(), stop.clone()));
                }
                // Out of file descriptors and the like: wait, as a server would.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
        }
    }
}

async fn connection(stream: tokio::net::TcpStream, shared: Arc<Shared>, stop: CancellationToken) {
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req).await) }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    // On `stop` the connection is dropped mid-flight: an API server restart.
    tokio::select! {
        _ = conn => {}
        () = stop.cancelled() => {}
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let unavailable = shared.unavailable.load(Ordering::SeqCst);
    if ["/healthz", "/readyz", "/livez"].iter().any(|p| path == *p || path.starts_with(&format!("{p}/"))) {
        return if unavailable {
            text(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        } else {
            text(StatusCode::OK, "ok")
        };
    }
    if unavailable {
        return error(&ApiError::unavailable());
    }
    if path == "/version" {
        return json_response(StatusCode::OK, &resources::version());
    }
    if shared.options.require_auth && !shared.authenticated(&req) {
        return error(&ApiError::unauthorized());
    }
    match route(&path, &shared) {
        Ok(Route::Document(doc)) if req.method() == Method::GET => json_response(StatusCode::OK, &doc),
        Ok(Route::Document(_)) => error(&ApiError::method_not_allowed()),
        Ok(Route::Resource(target)) => match verb(&shared, target, req).await {
            Ok(r) => r,
            Err(e) => error(&e),
        },
        Err(e) => error(&e),
    }
}

enum Route {
    Document(Value),
    Resource(Target),
}

/// A resource path: a collection (name None) or one object.
struct Target {
    res: &'static ResourceDef,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn route(path: &str, shared: &Shared) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let doc = |d: Option<Value>| d.map(Route::Document).ok_or_else(ApiError::no_route);
    match segs[..] {
        ["api"] => Ok(Route::Document(resources::core_versions(&shared.addr.to_string()))),
        ["api", v] => doc(resources::resource_list("", v)),
        ["apis"] => Ok(Route::Document(resources::group_list())),
        ["apis", g] => doc(resources::group(g)),
        ["apis", g, v] => doc(resources::resource_list(g, v)),
        ["api", v, ref rest @ ..] => resource_route("", v, rest),
        ["apis", g, v, ref rest @ ..] => resource_route(g, v, rest),
        _ => Err(ApiError::no_route()),
    }
}

fn resource_route(group: &str, version: &str, rest: &[&str]) -> Result<Route, ApiError> {
    // `namespaces/{ns}/status` is a namespace's own subresource, not a collection.
    let (namespace, rest) = if rest.len() >= 3
        && rest[0] == "namespaces"
        && !(rest.len() == 3 && matches!(rest[2], "status" | "finalize"))
    {
        (Some(rest[1].to_owned()), &rest[2..])
    } else {
        (None, rest)
    };
    let res = resources::find(group, version, rest[0]).ok_or_else(ApiError::no_route)?;
    if namespace.is_some() && !res.namespaced {
        return Err(ApiError::no_route());
    }
    let (name, status) = match rest[1..] {
        [] => (None, false),
        [name] => (Some(name.to_owned()), false),
        [name, "status"] => (Some(name.to_owned()), true),
        _ => return Err(ApiError::no_route()),
    };
    if name.is_some() && res.namespaced && namespace.is_none() {
        return Err(ApiError::no_route());
    }
    Ok(Route::Resource(Target { res, namespace, name, status }))
}

async fn verb(shared: &Arc<Shared>, t: Target, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
    let ns = t.namespace.clone().unwrap_or_default();
    let res = t.res;
    let method = req.method().clone();
    match (&method, t.name.as_deref()) {
        (&Method::GET, None) if res.create_only => Err(ApiError::method_not_allowed()),
        (&Method::GET, None) => {
            let sel = selection(&t, &query)?;
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                shared.count(res, |c| c.watches += 1);
                watch::start(shared.clone(), res, sel, &query)
            } else {
                shared.count(res, |c| c.lists += 1);
                list(shared, res, &sel, &query)
            }
        }
        (&Method::POST, None) if res.create_only => {
            let body = read_json(req).await?;
            shared.count(res, |c| c.writes += 1);
            Ok(token_review(shared, body))
        }
        (&Method::POST, None) if res.namespaced && t.namespace.is_none() => {
            Err(ApiError::method_not_allowed())
        }
        (&Method::POST, None) => {
            let body = read_json(req).await?;
            shared.count(res, |c| c.writes += 1);
            let created = shared.store().create(res, &ns, body)?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (&Method::GET, Some(name)) => {
            shared.count(res, |c| c.gets += 1);
            let obj = shared.store().get(res, &ns, name)?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        (&Method::PUT, Some(name)) => {
            let name = name.to_owned();
            let body = read_json(req).await?;
            shared.count(res, |c| c.writes += 1);
            let obj = shared.store().replace(res, &ns, &name, body, t.status)?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        (&Method::PATCH, Some(name)) => {
            let name = name.to_owned();
            let content_type = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = read_json(req).await?;
            let patch = match content_type.split(';').next().unwrap_or("").trim() {
                "application/merge-patch+json" => Patch::Merge(body),
                "application/json-patch+json" => Patch::Json(
                    serde_json::from_value(body)
                        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?,
                ),
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            shared.count(res, |c| c.writes += 1);
            let obj = shared.store().patch(res, &ns, &name, &patch, t.status)?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        (&Method::DELETE, Some(name)) if !t.status => {
            shared.count(res, |c| c.writes += 1);
            let obj = shared.store().delete(res, &ns, name)?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn selection(t: &Target, query: &HashMap<String, String>) -> Result<Selection, ApiError> {
    let bad = |e: super::select::SelectorError| ApiError::bad_request(e.to_string());
    Ok(Selection {
        namespace: t.namespace.clone(),
        labels: LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str)).map_err(bad)?,
        fields: FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str), t.res)
            .map_err(bad)?,
    })
}

fn list(
    shared: &Shared,
    res: &'static ResourceDef,
    sel: &Selection,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let non_empty = |k: &str| query.get(k).filter(|v| !v.is_empty()).cloned();
    let q = ListQuery {
        limit: match non_empty("limit") {
            Some(l) => Some(l.parse().map_err(|_| ApiError::bad_request(format!("invalid limit: {l:?}")))?),
            None => None,
        },
        continue_token: non_empty("continue"),
        resource_version: non_empty("resourceVersion"),
        version_match: non_empty("resourceVersionMatch"),
    };
    let page = shared.store().list(res, sel, &q)?;
    Ok(bytes_response(StatusCode::OK, list_json(res, &page)))
}

/// A list, written item by item (10,000 pods are not cloned into one Value).
fn list_json(res: &ResourceDef, page: &ListPage) -> Vec<u8> {
    let mut meta = json!({ "resourceVersion": page.resource_version.to_string() });
    if let Some(c) = &page.continue_token {
        meta["continue"] = json!(c);
    }
    if let Some(n) = page.remaining {
        meta["remainingItemCount"] = json!(n);
    }
    let head =
        json!({ "kind": format!("{}List", res.kind), "apiVersion": res.api_version(), "metadata": meta });
    let mut out = head.to_string().into_bytes();
    out.pop(); // the closing brace
    out.extend_from_slice(b",\"items\":[");
    for (i, item) in page.items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Writing a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, item.as_ref());
    }
    out.extend_from_slice(b"]}");
    out
}

fn token_review(shared: &Shared, mut body: Value) -> Response<Body> {
    let token = body.pointer("/spec/token").and_then(Value::as_str).unwrap_or("").to_owned();
    let audiences: Vec<String> = body
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let review = {
        let tokens = shared.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens::review(&tokens, &shared.store(), &token, &audiences)
    };
    body["apiVersion"] = json!("authentication.k8s.io/v1");
    body["kind"] = json!("TokenReview");
    if !body["metadata"].is_object() {
        body["metadata"] = json!({});
    }
    body["metadata"]["creationTimestamp"] = Value::Null;
    body["status"] = review.status;
    json_response(StatusCode::CREATED, &body)
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::too_large(format!("the request body could not be read: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the body of the request could not be decoded: {e}")))
}

pub fn error(e: &ApiError) -> Response<Body> {
    json_response(StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &e.status())
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    bytes_response(status, serde_json::to_vec(v).unwrap_or_default())
}

fn bytes_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    response(status, "application/json", Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed())
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    response(
        status,
        "text/plain; charset=utf-8",
        Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed(),
    )
}

pub fn response(status: StatusCode, content_type: &str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// A streamed body fed by a channel; an `Err` item aborts the connection
/// mid-body, as a dying server would.
pub struct ChannelBody(pub mpsc::Receiver<Result<Bytes, io::Error>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx).map(|item| item.map(|r| r.map(hyper::body::Frame::data)))
    }
}
