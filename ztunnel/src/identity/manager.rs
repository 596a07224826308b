//! The certificate manager: one key and certificate per local workload
//! identity (plus the node's own credential when the CA is remote), in memory.
//!
//! * Fetched when a workload is enrolled; connections that need it wait a
//!   bounded time (`identity.cert_wait`).
//! * Renewed at half of its lifetime (with jitter, so a node's certificates do
//!   not all renew at once).
//! * A failed request is retried with capped exponential backoff, and the
//!   still-valid certificate stays in service until it really expires: a CA
//!   outage shorter than half a lifetime is invisible to traffic.
//! * Requests for one identity are coalesced (one in flight per identity, any
//!   number of waiters).
//! * Due requests go to the CA earliest-expiry first, a bounded number at a
//!   time: a flood of new workloads (whose key is "now + lifetime") queues
//!   behind every renewal, never in front of it.
//! * When the CA starts signing under another root (a rotation), certificates
//!   under the old root are renewed soon, spread over a few seconds.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
// tokio's instants and `clock::now()` rather than the std clocks: the same in
// the tunnel, and the unit tests below can pause time.
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{
    ca_client::CaClient,
    cert::{Credential, csr_pem, new_key},
    node_credentials::NodeCredentialFiles,
    node_id::PeerId,
    spiffe::SpiffeId,
};
use crate::{
    clock,
    metrics::Metrics,
    tls::{BundleSource, verify::TrustBundle},
};

/// How the manager behaves (`identity` in the configuration).
#[derive(Debug, Clone)]
pub struct ManagerSettings {
    /// Lifetime asked of the CA for workload certificates.
    pub lifetime: Duration,
    /// First retry delay after a failed request; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Requests in flight to the CA at once.
    pub max_concurrent: usize,
    /// How often the trust bundle is re-read from the CA.
    pub bundle_refresh: Duration,
}

/// Why no certificate is available for an identity.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertUnavailable {
    #[error("no certificate for {identity} within {waited:?}{}", last.as_ref().map(|l| format!(" (last CA error: {l})")).unwrap_or_default())]
    NotYet { identity: String, waited: Duration, last: Option<String> },
    #[error("{identity} is not managed on this node")]
    Unknown { identity: String },
}

struct Slot {
    /// Enrolled workloads using the identity (the node identity: always 1).
    users: usize,
    current: watch::Sender<Option<Arc<Credential>>>,
    due: Instant,
    in_flight: bool,
    failures: u32,
    last_error: Option<String>,
    last_success: Option<SystemTime>,
    issued: u64,
    failed: u64,
}

impl Slot {
    fn new() -> Self {
        Self {
            users: 0,
            current: watch::channel(None).0,
            due: Instant::now(),
            in_flight: false,
            failures: 0,
            last_error: None,
            last_success: None,
            issued: 0,
            failed: 0,
        }
    }

    fn credential(&self) -> Option<Arc<Credential>> {
        self.current.borrow().clone()
    }
}

/// A node credential the manager keeps fresh and writes back to disk.
pub struct NodeCredential {
    pub identity: PeerId,
    pub sender: watch::Sender<Arc<Credential>>,
    pub files: NodeCredentialFiles,
}

struct Inner {
    ca: CaClient,
    settings: ManagerSettings,
    bundle: watch::Sender<Arc<TrustBundle>>,
    signing_root: Mutex<String>,
    slots: Mutex<HashMap<PeerId, Slot>>,
    wake: Notify,
    node: Option<NodeCredential>,
    metrics: Arc<Metrics>,
}

#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

/// What `ztunnel certs` shows of one identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertStatus {
    pub identity: String,
    /// `workload` or `node`.
    pub kind: String,
    /// `valid`, `pending` (none yet) or `expired`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<i64>,
    /// Seconds until the next request to the CA (renewal or retry).
    pub next_request_in_seconds: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_renewal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub issued: u64,
    pub failed: u64,
}

/// The whole `/certs` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertsView {
    pub trust_bundle: Vec<String>,
    pub signing_root: String,
    pub identities: Vec<CertStatus>,
}

impl CertManager {
    /// Starts the manager's scheduler and bundle refresh on the current runtime.
    pub fn start(
        ca: CaClient,
        settings: ManagerSettings,
        bundle: watch::Sender<Arc<TrustBundle>>,
        node: Option<NodeCredential>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        let mut slots = HashMap::new();
        if let Some(n) = &node {
            // The node credential is renewed like any identity, starting from
            // the bootstrap copy read from disk.
            let mut slot = Slot::new();
            slot.users = 1;
            let cred = n.sender.borrow().clone();
            slot.due = renewal_instant(&cred);
            slot.current.send_replace(Some(cred));
            slots.insert(n.identity.clone(), slot);
        }
        let inner = Arc::new(Inner {
            ca,
            settings,
            bundle,
            signing_root: Mutex::new(String::new()),
            slots: Mutex::new(slots),
            wake: Notify::new(),
            node,
            metrics,
        });
        tokio::spawn(schedule(inner.clone(), shutdown.clone()));
        tokio::spawn(refresh_bundle(inner.clone(), shutdown));
        Self { inner }
    }

    pub fn bundle(&self) -> BundleSource {
        self.inner.bundle.subscribe()
    }

    /// A workload with `id` was enrolled: fetch its certificate if it is new.
    pub fn acquire(&self, id: &SpiffeId) {
        let peer = PeerId::Workload(id.clone());
        let mut slots = lock(&self.inner.slots);
        let slot = slots.entry(peer).or_insert_with(Slot::new);
        slot.users += 1;
        drop(slots);
        self.inner.wake.notify_one();
    }

    /// A workload with `id` left: drop the key when nobody uses it any more.
    pub fn release(&self, id: &SpiffeId) {
        let peer = PeerId::Workload(id.clone());
        let mut slots = lock(&self.inner.slots);
        if let Some(slot) = slots.get_mut(&peer) {
            slot.users = slot.users.saturating_sub(1);
            if slot.users == 0 {
                slots.remove(&peer);
                self.inner.metrics.forget_certificate(&peer.to_string());
            }
        }
    }

    /// The identity's certificate, if one is valid now.
    pub fn credential(&self, id: &SpiffeId) -> Option<Arc<Credential>> {
        let slots = lock(&self.inner.slots);
        let cred = slots.get(&PeerId::Workload(id.clone()))?.credential()?;
        cred.is_valid_at(clock::now()).then_some(cred)
    }

    /// Waits up to `limit` for a valid certificate.
    pub async fn wait(&self, id: &SpiffeId, limit: Duration) -> Result<Arc<Credential>, CertUnavailable> {
        let peer = PeerId::Workload(id.clone());
        let mut rx = {
            let slots = lock(&self.inner.slots);
            match slots.get(&peer) {
                Some(slot) => slot.current.subscribe(),
                None => return Err(CertUnavailable::Unknown { identity: id.to_string() }),
            }
        };
        let valid = |c: &Option<Arc<Credential>>| c.as_ref().is_some_and(|c| c.is_valid_at(clock::now()));
        let result = tokio::time::timeout(limit, rx.wait_for(valid)).await;
        match result {
            Ok(Ok(c)) => c.clone().ok_or_else(|| CertUnavailable::Unknown { identity: id.to_string() }),
            _ => {
                let last = lock(&self.inner.slots).get(&peer).and_then(|s| s.last_error.clone());
                Err(CertUnavailable::NotYet { identity: id.to_string(), waited: limit, last })
            }
        }
    }

    pub fn view(&self) -> CertsView {
        let now = clock::now();
        let instant = Instant::now();
        let slots = lock(&self.inner.slots);
        let mut identities: Vec<CertStatus> = slots
            .iter()
            .map(|(id, s)| {
                let cred = s.credential();
                let secs = |t: SystemTime| match t.duration_since(now) {
                    Ok(d) => d.as_secs() as i64,
                    Err(e) => -(e.duration().as_secs() as i64),
                };
                CertStatus {
                    identity: id.to_string(),
                    kind: if matches!(id, PeerId::Workload(_)) { "workload" } else { "node" }.to_owned(),
                    state: match &cred {
                        None => "pending",
                        Some(c) if c.is_valid_at(now) => "valid",
                        Some(_) => "expired",
                    }
                    .to_owned(),
                    serial: cred.as_ref().map(|c| c.serial.clone()),
                    not_after: cred
                        .as_ref()
                        .map(|c| humantime::format_rfc3339_seconds(c.not_after).to_string()),
                    expires_in_seconds: cred.as_ref().map(|c| secs(c.not_after)),
                    next_request_in_seconds: s.due.saturating_duration_since(instant).as_secs() as i64,
                    root: cred.as_ref().map(|c| c.root.clone()).filter(|r| !r.is_empty()),
                    last_renewal: s.last_success.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    last_error: s.last_error.clone(),
                    consecutive_failures: s.failures,
                    issued: s.issued,
                    failed: s.failed,
                }
            })
            .collect();
        identities.sort_by(|a, b| a.identity.cmp(&b.identity));
        CertsView {
            trust_bundle: self.inner.bundle.borrow().fingerprints(),
            signing_root: lock(&self.inner.signing_root).clone(),
            identities,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// When to renew: half of the lifetime, +/- 5% jitter.
fn renewal_instant(cred: &Credential) -> Instant {
    let lifetime = cred.lifetime();
    let fraction = 0.45 + fastrand::f64() * 0.10;
    let at = cred.not_before + lifetime.mul_f64(fraction);
    instant_of(at)
}

fn instant_of(t: SystemTime) -> Instant {
    match t.duration_since(clock::now()) {
        Ok(ahead) => Instant::now() + ahead,
        Err(_) => Instant::now(),
    }
}

/// Starts due requests, earliest expiry first, at most `max_concurrent` at a time.
async fn schedule(inner: Arc<Inner>, shutdown: CancellationToken) {
    loop {
        let (start, next) = {
            let mut slots = lock(&inner.slots);
            let start =
                pick_due(&slots, Instant::now(), inner.settings.lifetime, inner.settings.max_concurrent);
            for id in &start {
                if let Some(s) = slots.get_mut(id) {
                    s.in_flight = true;
                }
            }
            let next = slots.values().filter(|s| !s.in_flight).map(|s| s.due).min();
            (start, next)
        };
        for id in start {
            tokio::spawn(fetch(inner.clone(), id));
        }
        let sleep = next.map_or(Duration::from_secs(3600), |n| n.saturating_duration_since(Instant::now()));
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = inner.wake.notified() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// The identities to request now: due, not in flight, earliest expiry first
/// (an identity with no certificate counts as expiring a full lifetime from
/// now, so new workloads queue behind every renewal), at most `max` in flight.
fn pick_due(slots: &HashMap<PeerId, Slot>, now: Instant, lifetime: Duration, max: usize) -> Vec<PeerId> {
    let far = clock::now() + lifetime;
    let in_flight = slots.values().filter(|s| s.in_flight).count();
    let mut due: Vec<(SystemTime, &PeerId)> = slots
        .iter()
        .filter(|(_, s)| !s.in_flight && s.due <= now)
        .map(|(id, s)| (s.credential().map_or(far, |c| c.not_after), id))
        .collect();
    due.sort();
    due.into_iter().take(max.saturating_sub(in_flight)).map(|(_, id)| id.clone()).collect()
}

async fn fetch(inner: Arc<Inner>, id: PeerId) {
    let result = request(&inner, &id).await;
    let mut slots = lock(&inner.slots);
    let Some(slot) = slots.get_mut(&id) else {
        // Released while the request was in flight: nothing to keep.
        drop(slots);
        inner.wake.notify_one();
        return;
    };
    slot.in_flight = false;
    match result {
        Ok(cred) => {
            slot.due = renewal_instant(&cred);
            slot.failures = 0;
            slot.last_error = None;
            slot.last_success = Some(clock::now());
            slot.issued += 1;
            tracing::info!(
                identity = %id,
                serial = %cred.serial,
                not_after = %humantime::format_rfc3339_seconds(cred.not_after),
                renews_in = ?slot.due.saturating_duration_since(Instant::now()),
                "certificate issued"
            );
            inner.metrics.certificate_issued(&id.to_string(), cred.not_after);
            if let Some(node) = &inner.node
                && node.identity == id
            {
                node.sender.send_replace(cred.clone());
                if let Err(e) = node.files.write(&cred, &inner.bundle.borrow().to_pem()) {
                    tracing::error!("writing the renewed node credential: {e}");
                }
            }
            slot.current.send_replace(Some(cred));
        }
        Err(error) => {
            slot.failures += 1;
            slot.failed += 1;
            let exp = 2u32.saturating_pow(slot.failures.saturating_sub(1).min(16));
            let backoff = inner.settings.retry_initial.saturating_mul(exp).min(inner.settings.retry_max);
            let backoff = backoff.mul_f64(0.8 + fastrand::f64() * 0.4);
            slot.due = Instant::now() + backoff;
            let still_valid = slot.credential().filter(|c| c.is_valid_at(clock::now()));
            match &still_valid {
                Some(c) => tracing::warn!(
                    identity = %id,
                    retry_in = ?backoff,
                    valid_until = %humantime::format_rfc3339_seconds(c.not_after),
                    "certificate renewal failed; the current certificate stays in service: {error}"
                ),
                None => {
                    tracing::warn!(identity = %id, retry_in = ?backoff, "certificate request failed: {error}")
                }
            }
            slot.last_error = Some(error.clone());
            inner.metrics.certificate_failed();
        }
    }
    drop(slots);
    inner.wake.notify_one();
}

/// One CSR round trip; also updates the trust bundle from the answer.
async fn request(inner: &Inner, id: &PeerId) -> Result<Arc<Credential>, String> {
    let key = new_key().map_err(|e| e.to_string())?;
    let csr = csr_pem(&key, id).map_err(|e| e.to_string())?;
    let signed = inner.ca.sign(csr, inner.settings.lifetime).await.map_err(|e| e.to_string())?;
    let cred = Credential::new(id.clone(), &key, signed.chain, signed.root).map_err(|e| e.to_string())?;
    apply_bundle(inner, signed.bundle, signed.signing_root);
    Ok(Arc::new(cred))
}

/// Takes a new bundle and signing root; certificates that lead to a root
/// that no longer signs are renewed within a few seconds.
fn apply_bundle(inner: &Inner, bundle: TrustBundle, signing_root: String) {
    let changed = inner.bundle.borrow().fingerprints() != bundle.fingerprints();
    if changed {
        tracing::info!(roots = ?bundle.fingerprints(), "trust bundle updated");
        inner.bundle.send_replace(Arc::new(bundle));
    }
    let root_changed = {
        let mut current = lock(&inner.signing_root);
        let changed = *current != signing_root;
        *current = signing_root.clone();
        changed
    };
    if !root_changed && !changed {
        return;
    }
    let mut slots = lock(&inner.slots);
    let mut moved = 0;
    for slot in slots.values_mut() {
        let Some(cred) = slot.credential() else { continue };
        if !cred.root.is_empty() && cred.root != signing_root && !slot.in_flight {
            let spread = cred.lifetime().div_f64(20.0).min(Duration::from_secs(5));
            let soon = Instant::now() + spread.mul_f64(fastrand::f64());
            if soon < slot.due {
                slot.due = soon;
                moved += 1;
            }
        }
    }
    if moved > 0 {
        tracing::info!(certificates = moved, signing_root = %signing_root, "the CA signs under a new root: renewing early");
        inner.wake.notify_one();
    }
}

async fn refresh_bundle(inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(inner.settings.bundle_refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match inner.ca.bundle().await {
            Ok((bundle, signing_root)) => apply_bundle(&inner, bundle, signing_root),
            Err(e) => tracing::debug!("trust bundle refresh failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ca::{
            signer::{Placement, Signer, SignerPolicy},
            store::CaState,
        },
        config::WorkloadConfig,
    };

    fn workloads(names: &[&str]) -> Vec<WorkloadConfig> {
        names
            .iter()
            .map(|n| {
                serde_yaml_ng::from_str(&format!("name: {n}\nservice_account: {n}\nnode: n1\n")).unwrap()
            })
            .collect()
    }

    fn id(name: &str) -> SpiffeId {
        format!("spiffe://cluster.local/ns/default/sa/{name}").parse().unwrap()
    }

    struct Fixture {
        manager: CertManager,
        signer: Arc<Signer>,
        _shutdown: tokio_util::sync::DropGuard,
    }

    fn fixture(lifetime: Duration, names: &[&str]) -> Fixture {
        let td = "cluster.local".parse().unwrap();
        let state = CaState::ephemeral(&td).unwrap();
        let (bundle_tx, _) = watch::channel(Arc::new(state.bundle.clone()));
        let policy =
            SignerPolicy { max_lifetime: lifetime, backdate: Duration::ZERO, ..SignerPolicy::default() };
        let signer = Arc::new(Signer::new(state, Placement::new(&td, &workloads(names), None), policy));
        let settings = ManagerSettings {
            lifetime,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_millis(400),
            max_concurrent: 4,
            bundle_refresh: Duration::from_secs(3600),
        };
        let shutdown = CancellationToken::new();
        let ca = CaClient::Embedded { signer: signer.clone(), node: "n1".into() };
        let manager =
            CertManager::start(ca, settings, bundle_tx, None, Arc::new(Metrics::new()), shutdown.clone());
        Fixture { manager, signer, _shutdown: shutdown.drop_guard() }
    }

    // Every test runs on paused time: tokio's clock (and with it `clock::now`)
    // moves only when nothing is left to run, straight to the next timer, so
    // the CA's answers always come "in time", however slow the machine.

    #[tokio::test(start_paused = true)]
    async fn an_enrolled_identity_gets_a_certificate_and_loses_it_when_released() {
        let f = fixture(Duration::from_secs(3600), &["web"]);
        f.manager.acquire(&id("web"));
        let cred = f.manager.wait(&id("web"), Duration::from_secs(5)).await.unwrap();
        assert_eq!(cred.identity.to_string(), id("web").to_string());
        assert!(f.manager.credential(&id("web")).is_some());
        f.manager.release(&id("web"));
        assert!(f.manager.credential(&id("web")).is_none());
        assert!(f.manager.view().identities.is_empty(), "the key is dropped with the last user");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_identity_reports_why() {
        let f = fixture(Duration::from_secs(3600), &["web"]);
        f.manager.acquire(&id("db")); // not placed on n1
        let err = f.manager.wait(&id("db"), Duration::from_millis(500)).await.unwrap_err().to_string();
        assert!(err.contains("not_authorized"), "{err}");
        let status = f.manager.view().identities.into_iter().next().unwrap();
        assert_eq!(status.state, "pending");
        assert!(status.consecutive_failures >= 1);
    }

    #[tokio::test]
    async fn certificates_renew_at_half_life_and_survive_a_ca_that_refuses() {
        let lifetime = Duration::from_secs(6);
        let f = fixture(lifetime, &["web"]);
        f.manager.acquire(&id("web"));
        let first = f.manager.wait(&id("web"), Duration::from_secs(5)).await.unwrap();

        // The CA starts refusing before the renewal is due.
        f.signer.set_placement(Placement::default());
        tokio::time::sleep(Duration::from_millis(3800)).await;
        let during = f.manager.credential(&id("web")).expect("the old certificate stays in service");
        assert_eq!(during.serial, first.serial);
        let status = f.manager.view().identities.into_iter().next().unwrap();
        assert!(status.last_error.as_deref().is_some_and(|e| e.contains("not_authorized")), "{status:?}");
        assert!(status.consecutive_failures >= 2, "retried with backoff: {status:?}");

        // The CA recovers: the next retry renews well before expiry.
        f.signer.set_placement(Placement::new(&"cluster.local".parse().unwrap(), &workloads(&["web"]), None));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let renewed = f.manager.credential(&id("web")).unwrap();
        assert_ne!(renewed.serial, first.serial);
        assert!(renewed.not_after > first.not_after);
        let status = f.manager.view().identities.into_iter().next().unwrap();
        assert_eq!(status.last_error, None);
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_go_before_a_flood_of_new_identities() {
        let names: Vec<String> = (0..200).map(|i| format!("w{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let f = fixture(Duration::from_secs(3600), &refs);
        // One identity with a certificate due for renewal...
        f.manager.acquire(&id("w0"));
        f.manager.wait(&id("w0"), Duration::from_secs(5)).await.unwrap();
        let mut slots = lock(&f.manager.inner.slots);
        for s in slots.values_mut() {
            s.due = Instant::now();
        }
        // ...and a flood of enrollments, all due at once.
        for n in &names[1..] {
            let mut slot = Slot::new();
            slot.users = 1;
            slots.insert(PeerId::Workload(id(n)), slot);
        }
        let picked = pick_due(&slots, Instant::now(), Duration::from_secs(3600), 4);
        assert_eq!(picked.len(), 4);
        assert_eq!(picked[0], PeerId::Workload(id("w0")), "the renewal goes first: {picked:?}");
    }
}
