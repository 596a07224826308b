//! One JSON line per connection, written when the connection ends
//! (`event: final`), and for a long connection one more every interval while
//! it runs (`event: periodic`, with the bytes so far; see `proxy::traffic`).
//! Every field is documented in docs/runbook.md ("Access log fields").
//!
//! Lines go through a bounded queue to a writer task so that a slow disk or a
//! blocked stdout never stalls the data path; if the queue is full the line is
//! dropped and counted (`ztunnel_access_log_dropped_total`) rather than
//! buffered without bound.

use std::{
    fs::OpenOptions,
    io::{self, Write as _},
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::AccessLogTarget;

const QUEUE: usize = 8192;
/// How long the writer rests after each batch: the most a line waits.
const BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(25);

/// Everything an operator needs to know about one connection.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Entry {
    /// When the connection started (the same on all of its lines).
    pub timestamp: String,
    /// `final` (the connection ended) or `periodic` (still open).
    pub event: &'static str,
    /// `outbound` (captured from a local workload) or `inbound`.
    pub direction: &'static str,
    /// How the bytes travelled: `passthrough`, `hbone`, `plaintext`.
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_cgroup_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    pub destination_address: String,
    /// The Service (`namespace/name`) whose virtual address was dialled;
    /// `destination_address` is then the endpoint chosen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_identity: Option<String>,
    /// `mutual_tls` or `none` (Istio's connection_security_policy).
    pub connection_security_policy: &'static str,
    /// `allow`, `deny`, or `would_deny` (audit mode: allowed, policy would deny).
    pub decision: &'static str,
    /// Why the connection ended the way it did (`ok`, or a failure reason).
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the peer's certificate was refused (`/explain` reports it; the
    /// line itself has it in `error`).
    #[serde(skip)]
    pub peer_certificate: Option<crate::tls::verify::VerifyError>,
    /// The policy (`namespace/name`) that decided, and its matching rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// An emergency allow's reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_note: Option<String>,
    /// What dry-run policies would have done.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<String>,
    /// The pooled HBONE connection that carried the stream (outbound).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hbone_connection: Option<u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
}

impl Entry {
    pub fn now(direction: &'static str, mode: &'static str) -> Self {
        Self {
            timestamp: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            event: "final",
            direction,
            mode,
            decision: "allow",
            connection_security_policy: if mode == "hbone" { "mutual_tls" } else { "none" },
            reason: "ok".into(),
            ..Self::default()
        }
    }
}

/// The access log of a running tunnel.
#[derive(Debug)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<Entry>>,
    queued: AtomicU64,
    written: std::sync::Arc<AtomicU64>,
    /// `ztunnel_access_log_dropped_total`.
    dropped: Counter,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open access log {path}: {source}")]
pub struct AccessLogError {
    path: PathBuf,
    source: io::Error,
}

impl AccessLog {
    /// Opens the target and starts the writer task (inside a tokio runtime).
    pub fn start(target: &AccessLogTarget, dropped: Counter) -> Result<Self, AccessLogError> {
        let out: Box<dyn io::Write + Send> = match target {
            AccessLogTarget::Off => {
                return Ok(Self {
                    tx: None,
                    queued: AtomicU64::new(0),
                    written: Default::default(),
                    dropped,
                });
            }
            AccessLogTarget::Stdout => Box::new(io::stdout()),
            AccessLogTarget::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AccessLogError { path: path.clone(), source })?,
            ),
        };
        let (tx, mut rx) = mpsc::channel::<Entry>(QUEUE);
        let written = std::sync::Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = io::BufWriter::with_capacity(64 * 1024, out);
            // Wait for a line, write everything queued by then in one go,
            // then rest: a busy tunnel wakes this thread a few dozen times a
            // second instead of once per connection.
            while let Some(first) = rx.blocking_recv() {
                let mut n = 0;
                let mut next = Some(first);
                while let Some(entry) = next {
                    let written = serde_json::to_writer(&mut out, &entry)
                        .map_err(io::Error::from)
                        .and_then(|()| out.write_all(b"\n"));
                    if let Err(e) = written {
                        tracing::warn!("access log write failed: {e}");
                    }
                    n += 1;
                    next = rx.try_recv().ok();
                }
                if let Err(e) = out.flush() {
                    tracing::warn!("access log flush failed: {e}");
                }
                counter.fetch_add(n, Ordering::Release);
                std::thread::sleep(BATCH_PAUSE);
            }
        });
        Ok(Self { tx: Some(tx), queued: AtomicU64::new(0), written, dropped })
    }

    /// Whether lines go anywhere (the target is not `off`).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, entry: Entry) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(entry) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.dropped.inc();
            }
        }
    }

    /// Waits (at most `limit`) until every queued line is written.
    pub async fn flushed(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.written.load(Ordering::Acquire) < self.queued.load(Ordering::Relaxed)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
