//! The policy hook of the inbound paths, and the open connections a policy
//! change may revoke.
//!
//! Every inbound connection (HBONE or plaintext) is decided here before the
//! workload is dialled; the decision (allow, deny, would-deny in audit mode,
//! with its reason and the policy and rule that made it) goes into the access
//! log and `ztunnel_policy_decisions_total`. Admitted connections stay
//! registered while open: when the configuration changes, each is decided
//! again, and one the new policy denies is closed (reset) and logged with
//! the policy that caused it, unless `authorization.on_policy_change` says
//! let it finish.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use tokio_util::sync::CancellationToken;

use super::ProxyContext;
use crate::{
    access_log::Entry,
    identity::spiffe::SpiffeId,
    policy::{self, Decision, Verdict},
    state::State,
    workload::LocalWorkload,
};

/// A connection admitted to a local workload.
pub struct Admitted {
    /// The workload as the decision saw it.
    pub target: Arc<LocalWorkload>,
    /// Keeps the connection revocable while it is open.
    pub registration: Registration,
}

/// Decides a connection from `caller` (None: plaintext) to the local
/// workload `workload_id` on `port` and, when it is admitted, registers it,
/// both under the lock that revalidation takes and with the state in force
/// then: a reload between the decision and the registration cannot miss it.
/// `identity`: the identity the caller's connection was made to (HBONE); a
/// workload that changed identity since is refused like one that left.
pub fn admit(
    ctx: &ProxyContext,
    caller: Option<&SpiffeId>,
    workload_id: u32,
    identity: Option<&SpiffeId>,
    from: Option<std::net::IpAddr>,
    port: u16,
    entry: &mut Entry,
) -> Result<Admitted, (super::Failure, String)> {
    let mut open = ctx.open.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let state = ctx.state.borrow().clone();
    let target = match state.local.get(&workload_id) {
        Some(t) if identity.is_none_or(|i| *i == t.workload.identity) => t.clone(),
        _ => {
            return Err((
                super::Failure::UnknownWorkload,
                format!("workload {workload_id} is no longer enrolled under this identity"),
            ));
        }
    };
    entry.destination_workload = Some(target.workload.key());
    entry.destination_identity = Some(target.workload.identity.to_string());
    let decision = match from {
        // The kubelet's probes: before mTLS mode and policy, as Istio's
        // ztunnel admits its SNATed probe address.
        Some(ip) if caller.is_none() && state.node_addresses.contains(&crate::workload::canonical(ip)) => {
            let d = Decision::node_probe();
            record(&d, entry);
            ctx.metrics.policy_decided(d.verdict.as_str(), d.reason);
            d
        }
        _ => decide(ctx, &state, caller, &target, port, entry),
    };
    if !decision.verdict.admits() {
        let failure = if decision.reason == "plaintext_refused" {
            super::Failure::PlaintextRefused
        } else {
            super::Failure::PolicyDenied(decision.reason)
        };
        return Err((failure, decision.explain()));
    }
    let registration =
        ctx.open.insert(&mut open, caller.cloned(), target.id, target.workload.identity.clone(), port);
    Ok(Admitted { target, registration })
}

/// Decides a connection from `caller` (None: plaintext) to `target` on
/// `port`, and records the decision in `entry` and the metrics.
fn decide(
    ctx: &ProxyContext,
    state: &State,
    caller: Option<&SpiffeId>,
    target: &LocalWorkload,
    port: u16,
    entry: &mut Entry,
) -> Decision {
    let decision =
        policy::decide(&state.config, &target.config, &target.workload, caller, port, SystemTime::now());
    record(&decision, entry);
    ctx.metrics.policy_decided(decision.verdict.as_str(), decision.reason);
    if decision.reason == "emergency_allow" {
        tracing::warn!(
            policy = decision.policy.as_deref().unwrap_or("-"),
            source = caller.map_or_else(|| "plaintext".to_owned(), ToString::to_string),
            destination = %target.workload.key(),
            port,
            "connection admitted by an emergency allow: {}",
            decision.note.as_deref().unwrap_or("")
        );
    }
    decision
}

/// Puts a decision into an access log line.
pub fn record(decision: &Decision, entry: &mut Entry) {
    entry.decision = decision.verdict.as_str();
    entry.policy = decision.policy.clone();
    entry.rule = decision.rule;
    entry.policy_note = decision.note.clone();
    entry.dry_run = decision.dry_run.clone();
    if decision.verdict != Verdict::Allow || matches!(decision.reason, "emergency_allow" | "node_probe") {
        entry.reason = decision.reason.to_owned();
    }
}

struct Open {
    source: Option<SpiffeId>,
    workload_id: u32,
    identity: SpiffeId,
    port: u16,
    revoke: CancellationToken,
    revoked_by: Arc<Mutex<Option<Decision>>>,
}

/// Admitted inbound connections, for revocation on policy change.
#[derive(Default)]
pub struct OpenConnections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
}

/// An open connection's registration; dropping it unregisters.
pub struct Registration {
    id: u64,
    owner: Arc<OpenConnections>,
    /// Cancelled when a policy change revokes the connection.
    pub revoke: CancellationToken,
    revoked_by: Arc<Mutex<Option<Decision>>>,
}

impl Registration {
    /// The decision that revoked the connection, if one did.
    pub fn revoked_by(&self) -> Option<Decision> {
        self.revoked_by.lock().ok().and_then(|d| d.clone())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut open) = self.owner.open.lock() {
            open.remove(&self.id);
        }
    }
}

impl OpenConnections {
    fn insert(
        self: &Arc<Self>,
        open: &mut HashMap<u64, Open>,
        source: Option<SpiffeId>,
        workload_id: u32,
        identity: SpiffeId,
        port: u16,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let revoke = CancellationToken::new();
        let revoked_by = Arc::new(Mutex::new(None));
        open.insert(
            id,
            Open {
                source,
                workload_id,
                identity,
                port,
                revoke: revoke.clone(),
                revoked_by: revoked_by.clone(),
            },
        );
        Registration { id, owner: self.clone(), revoke, revoked_by }
    }

    /// Decides every open connection again under `state`; closes those now
    /// denied (by policy, or plaintext to a workload now strict) and those
    /// whose workload left the node or changed identity. Returns how many
    /// were closed.
    pub fn revalidate(&self, state: &State) -> usize {
        let open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = SystemTime::now();
        let mut closed = 0;
        for conn in open.values().filter(|c| !c.revoke.is_cancelled()) {
            let decision = match state.local.get(&conn.workload_id) {
                Some(target) if target.workload.identity == conn.identity => policy::decide(
                    &state.config,
                    &target.config,
                    &target.workload,
                    conn.source.as_ref(),
                    conn.port,
                    now,
                ),
                _ => Decision::workload_gone(),
            };
            if decision.verdict == Verdict::Deny {
                if let Ok(mut by) = conn.revoked_by.lock() {
                    *by = Some(decision);
                }
                conn.revoke.cancel();
                closed += 1;
            }
        }
        closed
    }

    pub fn len(&self) -> usize {
        self.open.lock().map_or(0, |o| o.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs `relay` until it ends, or until the connection is revoked (None).
pub async fn unless_revoked<T>(
    relay: impl std::future::Future<Output = T>,
    registration: Option<&Registration>,
) -> Option<T> {
    match registration {
        Some(r) => tokio::select! {
            out = relay => Some(out),
            () = r.revoke.cancelled() => None,
        },
        None => Some(relay.await),
    }
}

/// The failure of a revoked connection, with the decision in its log line.
pub fn revoked(registration: Option<&Registration>, entry: &mut Entry) -> (super::Failure, String) {
    let decision = registration.and_then(Registration::revoked_by);
    let explain = decision.as_ref().map_or_else(|| "policy changed".to_owned(), Decision::explain);
    if let Some(d) = &decision {
        entry.policy = d.policy.clone();
        entry.rule = d.rule;
    }
    (super::Failure::RevokedByPolicy, format!("closed by a policy change: {explain}"))
}
