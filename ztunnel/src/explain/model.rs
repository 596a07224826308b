//! The shape of `GET /explain` (and of `ztunnel explain --json`): stable,
//! documented in docs/admin-api.md. Fields are added, never renamed or
//! removed; optional fields are absent rather than null.

use serde::{Deserialize, Serialize};

use crate::{failures::FailureRecord, identity::manager::CertStatus};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Explanation {
    /// The one-line answer, first.
    pub verdict: Verdict,
    pub query: QueryView,
    /// The node whose tunnel answered.
    pub node: String,
    /// When the answer was made (RFC 3339).
    pub time: String,
    pub source: Source,
    pub destination: Destination,
    pub trust: Trust,
    /// Absent when the destination is outside the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyView>,
    pub failures: Failures,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    /// The call would be allowed and no failure between the two was
    /// recorded within `failures.window_seconds` (`ztunnel explain` exits 0).
    pub ok: bool,
    /// A stable code: `allowed`, `would_deny`, `outside_mesh`, a policy
    /// decision's reason (`denied_by_policy`, `no_allow_matched`,
    /// `default_deny`, `plaintext_refused`), `no_certificate`,
    /// `no_endpoint`, `passthrough_refused`, `self_call`, or the reason of
    /// the most recent failure (`expired`, `wrong_identity`,
    /// `policy_denied`, `destination_unreachable`, ...).
    pub cause: String,
    /// The cause for a person, in one line.
    pub summary: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryView {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Source {
    /// `workload` or `outside_mesh` (an address no workload of the mesh has:
    /// a plaintext caller).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Destination {
    /// The address dialled (`ip:port`).
    pub address: String,
    /// `workload`, `service` (a Service's virtual address) or `outside_mesh`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceView>,
    /// The workload called (for a Service: one of its ready endpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadView>,
    /// The identity the caller's tunnel requires of the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_identity: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceView {
    /// `namespace/name`.
    pub name: String,
    pub ready_endpoints: Vec<String>,
}

/// A workload, and its modes as this node's configuration has them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadView {
    /// `namespace/name`.
    pub name: String,
    pub identity: String,
    pub node: String,
    pub addresses: Vec<String>,
    /// Whether it runs on the node that answered (then `enrollment` and
    /// `certificate` are this node's own knowledge).
    pub on_this_node: bool,
    /// `enrolled` (captured), `not_ready` or `failed`; absent for another
    /// node's workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_error: Option<String>,
    /// `strict` or `permissive`.
    pub mtls: String,
    /// `enforce` or `audit`.
    pub authorization: String,
    pub default_deny: bool,
    /// `allow` or `refuse`.
    pub outbound_passthrough: String,
    /// The certificate this node holds for it (the `/certs` shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trust {
    pub trust_domain: String,
    /// Fingerprint of the root the CA signs under now.
    pub signing_root: String,
    pub roots: Vec<RootView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootView {
    pub subject: String,
    /// Short SHA-256 fingerprint (as `/certs` and `ztunnel ca status`).
    pub fingerprint: String,
    pub not_after: String,
    pub expires_in_seconds: i64,
}

/// The decision the destination's tunnel makes for this caller and port.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyView {
    /// The caller's identity, or `plaintext`.
    pub caller: String,
    pub port: u16,
    /// `allow`, `deny` or `would_deny` (audit mode).
    pub decision: String,
    /// `allowed_by_policy`, `no_policy`, `denied_by_policy`,
    /// `no_allow_matched`, `default_deny`, `plaintext_refused`,
    /// `emergency_allow`.
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<String>,
    /// The destination runs on this node: this is its tunnel's decision.
    /// Otherwise it is this node's configuration's view (in file mode,
    /// another node's file may hold other policies).
    pub decided_here: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failures {
    /// Failures younger than this count against the call.
    pub window_seconds: u64,
    /// Entries the ring holds now, and at most.
    pub held: usize,
    pub capacity: usize,
    /// The failures between the two, newest first (at most 20).
    pub matching: Vec<FailureView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailureView {
    #[serde(flatten)]
    pub record: FailureRecord,
    pub age_seconds: u64,
    /// Within the window.
    pub recent: bool,
}
