//! The node's own endpoints:
//!
//! * admin (127.0.0.1:15000): `/config_dump` (workloads and their enrollment
//!   state, capture counters, the last reload error), `/certs`,
//!   `/explain?from=..&to=..` (why a call works or fails) and
//!   `POST /logging?level=...` (docs/admin-api.md has the JSON shapes).
//!   Reading is open to any process of the node;
//!   anything that changes the tunnel (every POST) also needs the admin token,
//!   a file only root can read (`<node.run_dir>/admin.token`, new at every
//!   start): reaching 127.0.0.1 is not enough;
//! * readiness (:15021): `/healthz/ready`;
//! * metrics (:15020): `/metrics`.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use hyper::{Method, Response, StatusCode, http::request::Parts};
use serde::Serialize;

use crate::{
    capture::CaptureCounters,
    enrollment::WorkloadStatus,
    failures::FailureRing,
    http::{self, Body},
    identity::manager::CertManager,
    metrics::{
        Metrics,
        text::{Format, to_classic},
    },
    state::StateWatch,
};

/// The admin token: random, written where only root can read it.
pub struct AdminToken {
    value: String,
    pub path: std::path::PathBuf,
}

impl AdminToken {
    /// Makes a new token and writes it to `path` (0600, replacing an older
    /// one).
    pub fn create(path: &std::path::Path) -> std::io::Result<Self> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| std::io::Error::other("no randomness for the admin token"))?;
        let value: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let staging = path.with_extension("new");
        let _ = std::fs::remove_file(&staging);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&staging)?;
        f.write_all(value.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&staging, path)?;
        Ok(Self { value, path: path.to_owned() })
    }

    /// The token a running tunnel wrote, kept (an upgrade's successor shares
    /// it with the tunnel it takes over from); a new one if there is none.
    pub fn adopt(path: &std::path::Path) -> std::io::Result<Self> {
        match Self::read(path) {
            Ok(value) if value.len() == 64 => Ok(Self { value, path: path.to_owned() }),
            _ => Self::create(path),
        }
    }

    /// Reads the token a running tunnel wrote (the CLI's side).
    pub fn read(path: &std::path::Path) -> std::io::Result<String> {
        Ok(std::fs::read_to_string(path)?.trim().to_owned())
    }

    fn admits(&self, parts: &Parts) -> bool {
        let Some(given) = parts
            .headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        // Constant time: the comparison tells nothing of how much matched.
        given.len() == self.value.len()
            && given.bytes().zip(self.value.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// Changes the log filter at run time.
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the admin endpoint reports, updated by the tunnel as it changes.
#[derive(Debug, Default, Serialize)]
pub struct AdminView {
    pub node: String,
    /// This tunnel's process: during an upgrade two answer in turn.
    pub pid: u32,
    pub config_file: String,
    /// Generation of the applied configuration.
    pub generation: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reload_error: Option<String>,
    /// The capture maps could not be updated (retried every tick).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture_error: Option<String>,
    pub workloads: Vec<WorkloadStatus>,
}

pub struct Admin {
    /// What a POST must carry as `Authorization: Bearer <token>`.
    pub token: AdminToken,
    pub view: Mutex<AdminView>,
    pub ready: AtomicBool,
    /// When the controller's loop last went round (`/healthz/live`).
    pub heartbeat: std::sync::Mutex<std::time::Instant>,
    pub capture: Arc<CaptureCounters>,
    pub metrics: Arc<Metrics>,
    pub certs: CertManager,
    pub set_log_level: LogLevelSetter,
    /// What the proxies decide by (`/explain`).
    pub state: StateWatch,
    pub failures: Arc<FailureRing>,
}

/// How long the controller's loop may not go round before `/healthz/live`
/// fails (a large configuration apply takes well under this).
pub const LIVENESS_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

impl Admin {
    pub fn update(&self, f: impl FnOnce(&mut AdminView)) {
        if let Ok(mut v) = self.view.lock() {
            f(&mut v);
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(ready));
    }

    pub fn handle_admin(&self, parts: &Parts) -> Response<Body> {
        if parts.method != Method::GET && parts.method != Method::HEAD && !self.token.admits(parts) {
            return http::respond(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                format!(
                    "{} {} changes the tunnel: it needs `Authorization: Bearer <token>` with the token in {} (root only)\n",
                    parts.method,
                    parts.uri.path(),
                    self.token.path.display()
                ),
            );
        }
        match (&parts.method, parts.uri.path()) {
            (&Method::GET, "/config_dump") => {
                #[derive(Serialize)]
                struct Dump<'a> {
                    #[serde(flatten)]
                    view: &'a AdminView,
                    capture_counters: std::collections::BTreeMap<&'static str, u64>,
                }
                let Ok(view) = self.view.lock() else {
                    return http::respond(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        "state lock poisoned",
                    );
                };
                let capture_counters = self.capture.snapshot().into_iter().collect();
                http::json(StatusCode::OK, &Dump { view: &view, capture_counters })
            }
            (&Method::POST, "/logging") => match http::query_param(parts, "level") {
                Some(level) => match (self.set_log_level)(level) {
                    Ok(()) => http::respond(StatusCode::OK, "text/plain", format!("log level: {level}\n")),
                    Err(e) => http::respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
                },
                None => http::respond(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "usage: POST /logging?level=<filter>\n",
                ),
            },
            (&Method::GET, "/certs") => http::json(StatusCode::OK, &self.certs.view()),
            (&Method::GET, "/explain") => self.explain(parts),
            (_, "/healthz/ready") => self.handle_readiness(parts),
            _ => http::respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "endpoints: GET /config_dump, GET /certs, GET /explain?from=<workload|ip>&to=<ip:port>, POST /logging?level=<filter>, GET /healthz/ready\n",
            ),
        }
    }

    fn explain(&self, parts: &Parts) -> Response<Body> {
        let refuse = |e: crate::explain::ExplainError| {
            let status = if e.is_not_found() { StatusCode::NOT_FOUND } else { StatusCode::BAD_REQUEST };
            http::respond(status, "text/plain", format!("{e}\n"))
        };
        let query = match crate::explain::Query::parse(parts.uri.query()) {
            Ok(q) => q,
            Err(e) => return refuse(e),
        };
        let state = self.state.borrow().clone();
        let enrollment = self.view.lock().map(|v| v.workloads.clone()).unwrap_or_default();
        let bundle = self.certs.bundle().borrow().clone();
        let inputs = crate::explain::Inputs {
            state: &state,
            certs: &self.certs.view(),
            bundle: &bundle,
            enrollment: &enrollment,
            failures: &self.failures,
            now: crate::clock::now(),
        };
        match crate::explain::explain(&inputs, &query) {
            Ok(e) => http::json(StatusCode::OK, &e),
            Err(e) => refuse(e),
        }
    }

    /// The controller's loop went round: the tunnel is alive.
    pub fn beat(&self) {
        *self.heartbeat.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = std::time::Instant::now();
    }

    pub fn handle_readiness(&self, parts: &Parts) -> Response<Body> {
        if parts.uri.path() == "/healthz/live" {
            // Alive while the controller's loop goes round (it wakes at
            // least every proxy.reload_interval): a wedged loop would stop
            // reloads, enrollment and renewals' bookkeeping while the
            // listeners still answered.
            let since = self.heartbeat.lock().unwrap_or_else(std::sync::PoisonError::into_inner).elapsed();
            return if since < LIVENESS_LIMIT {
                http::respond(StatusCode::OK, "text/plain", "alive\n")
            } else {
                let body = format!("the controller has not gone round for {}s\n", since.as_secs());
                http::respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", body)
            };
        }
        if parts.uri.path() != "/healthz/ready" {
            return http::respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "GET /healthz/ready or /healthz/live\n",
            );
        }
        if self.ready.load(Ordering::SeqCst) {
            http::respond(StatusCode::OK, "text/plain", "ready\n")
        } else {
            http::respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
        }
    }

    pub fn handle_metrics(&self, parts: &Parts) -> Response<Body> {
        if parts.uri.path() != "/metrics" {
            return http::respond(StatusCode::NOT_FOUND, "text/plain", "GET /metrics\n");
        }
        let accept = parts.headers.get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok());
        let format = Format::negotiate(accept);
        match self.metrics.encode() {
            Ok(text) => {
                let body = match format {
                    Format::OpenMetrics => text,
                    Format::Text => to_classic(&text),
                };
                http::respond(StatusCode::OK, format.content_type(), body)
            }
            Err(e) => http::respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
        }
    }
}
