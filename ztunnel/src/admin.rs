//! The node's own endpoints:
//!
//! * admin (127.0.0.1:15000): `/config_dump` (workloads and their enrollment
//!   state, capture counters, the last reload error), `/logging?level=...`;
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
    http::{self, Body},
    identity::manager::CertManager,
    metrics::Metrics,
};

/// Changes the log filter at run time.
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the admin endpoint reports, updated by the tunnel as it changes.
#[derive(Debug, Default, Serialize)]
pub struct AdminView {
    pub node: String,
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
    pub view: Mutex<AdminView>,
    pub ready: AtomicBool,
    pub capture: Arc<CaptureCounters>,
    pub metrics: Arc<Metrics>,
    pub certs: CertManager,
    pub set_log_level: LogLevelSetter,
}

impl Admin {
    pub fn update(&self, f: impl FnOnce(&mut AdminView)) {
        if let Ok(mut v) = self.view.lock() {
            f(&mut v);
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn handle_admin(&self, parts: &Parts) -> Response<Body> {
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
            (_, "/healthz/ready") => self.handle_readiness(parts),
            _ => http::respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "endpoints: GET /config_dump, GET /certs, POST /logging?level=<filter>, GET /healthz/ready\n",
            ),
        }
    }

    pub fn handle_readiness(&self, parts: &Parts) -> Response<Body> {
        if parts.uri.path() != "/healthz/ready" {
            return http::respond(StatusCode::NOT_FOUND, "text/plain", "GET /healthz/ready\n");
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
        match self.metrics.encode() {
            Ok(text) => http::respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(e) => http::respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
        }
    }
}
