//! The last connection failures, in memory, for `ztunnel explain`.
//!
//! A fixed number of entries (the oldest is dropped), each a few hundred
//! bytes with its detail cut to a bounded length: a flood of refused
//! connections costs a bounded amount of memory, never more. Written only on
//! failure paths (one short lock, no I/O); read by the admin endpoint.

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use crate::{access_log::Entry, tls::verify::VerifyError, workload::canonical};

/// Entries kept: enough for the recent history of a busy node's failing
/// pairs, small enough (about 1 MiB at worst) to never matter.
pub const CAPACITY: usize = 1024;

/// Longest text kept per field, in bytes: details, addresses and
/// identities can quote what a peer sent (a `:authority`, a certificate's
/// URI).
const DETAIL_MAX: usize = 512;

/// What the peer's certificate was refused for, when a handshake failed on
/// it (`presented`: the identity it carried; `expected`: what was wanted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateProblem {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presented_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
}

impl CertificateProblem {
    /// The facts a verification error carries; None when it carries none
    /// worth more than its reason.
    pub fn from_verify(e: &VerifyError) -> Option<Self> {
        let p = match e {
            VerifyError::Expired { not_after, .. } => {
                Self { not_after: Some(bounded(not_after)), ..Self::default() }
            }
            VerifyError::NotYetValid { not_before, .. } => {
                Self { not_before: Some(bounded(not_before)), ..Self::default() }
            }
            VerifyError::WrongIdentity { found, want } | VerifyError::WrongTrustDomain { found, want } => {
                Self {
                    presented_identity: Some(bounded(found)),
                    expected: Some(bounded(want)),
                    ..Self::default()
                }
            }
            _ => return None,
        };
        Some(p)
    }
}

/// One failed connection, as `/explain` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// When the connection began (the access log's `timestamp`; RFC 3339,
    /// milliseconds).
    pub time: String,
    /// `outbound` (a local workload called) or `inbound` (a local workload
    /// was called).
    pub direction: String,
    /// `hbone`, `plaintext` or `passthrough`.
    pub mode: String,
    /// The access log's reason (`expired`, `wrong_identity`,
    /// `no_allow_matched`, `policy_denied`, `destination_unreachable`, ...).
    pub reason: String,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    pub destination_address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_identity: Option<String>,
    /// The policy and rule that denied it (inbound denials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// The peer's certificate problem, for handshake failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateProblem>,
}

impl FailureRecord {
    /// The record of a connection that ended as `entry` says (its reason
    /// and error already set).
    pub fn from_entry(entry: &Entry) -> Self {
        Self {
            time: entry.timestamp.clone(),
            direction: entry.direction.to_owned(),
            mode: entry.mode.to_owned(),
            reason: entry.reason.clone(),
            detail: bounded(entry.error.as_deref().unwrap_or_default()),
            source_workload: entry.source_workload.clone(),
            source_identity: entry.source_identity.as_deref().map(bounded),
            source_address: entry.source_address.clone(),
            destination_address: bounded(&entry.destination_address),
            destination_service: entry.destination_service.clone(),
            destination_workload: entry.destination_workload.clone(),
            destination_identity: entry.destination_identity.as_deref().map(bounded),
            policy: entry.policy.clone(),
            rule: entry.rule,
            certificate: entry.peer_certificate.as_ref().and_then(CertificateProblem::from_verify),
        }
    }

    fn source_ip(&self) -> Option<IpAddr> {
        self.source_address.as_deref().and_then(|a| a.parse::<SocketAddr>().ok()).map(|a| canonical(a.ip()))
    }

    fn destination(&self) -> Option<SocketAddr> {
        self.destination_address.parse::<SocketAddr>().ok()
    }
}

fn bounded(s: &str) -> String {
    if s.len() <= DETAIL_MAX {
        return s.to_owned();
    }
    let mut end = DETAIL_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Which records concern one call: its caller and its destination.
#[derive(Debug, Clone, Default)]
pub struct Pair {
    /// The caller's workload (`namespace/name`), if it is one.
    pub source_workload: Option<String>,
    /// The caller's identity: matches inbound records, which know the
    /// caller by certificate only.
    pub source_identity: Option<String>,
    /// The caller's addresses: match records whose caller presented no
    /// usable identity (a refused handshake).
    pub source_addresses: Vec<IpAddr>,
    /// The address dialled.
    pub destination: Option<SocketAddr>,
    /// A Service's ready endpoints: the callee's node knows the call by
    /// the endpoint it reached.
    pub endpoints: Vec<SocketAddr>,
    /// The Service at that address: outbound records name the endpoint
    /// chosen, and the Service.
    pub destination_service: Option<String>,
}

impl Pair {
    fn matches(&self, r: &FailureRecord) -> bool {
        self.source_matches(r) && self.destination_matches(r)
    }

    fn source_matches(&self, r: &FailureRecord) -> bool {
        if let (Some(want), Some(got)) = (&self.source_workload, &r.source_workload) {
            return want == got;
        }
        if let (Some(want), Some(got)) = (&self.source_identity, &r.source_identity) {
            return want == got;
        }
        r.source_ip().is_some_and(|ip| self.source_addresses.contains(&ip))
    }

    fn destination_matches(&self, r: &FailureRecord) -> bool {
        if let (Some(want), Some(got)) = (&self.destination_service, &r.destination_service) {
            return want == got;
        }
        let Some(got) = r.destination() else { return false };
        // A handshake refused on :15008 happened before the caller could
        // name a port: it concerns every port of that address.
        let same = |want: &SocketAddr| {
            canonical(want.ip()) == canonical(got.ip())
                && (want.port() == got.port() || got.port() == crate::proxy::hbone::HBONE_PORT)
        };
        self.destination.iter().chain(&self.endpoints).any(same)
    }
}

/// The ring itself.
#[derive(Debug)]
pub struct FailureRing {
    entries: Mutex<VecDeque<FailureRecord>>,
    capacity: usize,
}

impl Default for FailureRing {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl FailureRing {
    pub fn with_capacity(capacity: usize) -> Self {
        Self { entries: Mutex::new(VecDeque::with_capacity(capacity)), capacity: capacity.max(1) }
    }

    pub fn record(&self, record: FailureRecord) {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back(record);
    }

    /// Records a connection that failed, as its access log line says. Lines
    /// of connections that ended well, or ended by a reset or an I/O error
    /// once carried (not a reason a call could not be made), are left out.
    pub fn record_entry(&self, entry: &Entry) {
        if entry.reason == "ok" || entry.reason == "reset" || entry.reason == "io_error" {
            return;
        }
        self.record(FailureRecord::from_entry(entry));
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The newest `limit` records concerning `pair`, newest first.
    pub fn matching(&self, pair: &Pair, limit: usize) -> Vec<FailureRecord> {
        let entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.iter().rev().filter(|r| pair.matches(r)).take(limit).cloned().collect()
    }
}

/// Seconds since an RFC 3339 time (None if unreadable).
pub fn age_seconds(time: &str, now: SystemTime) -> Option<u64> {
    let t = humantime::parse_rfc3339_weak(time).ok()?;
    Some(now.duration_since(t).map(|d| d.as_secs()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(src: &str, dst: &str, reason: &str) -> Entry {
        let mut e = Entry::now("outbound", "hbone");
        e.source_workload = Some(src.to_owned());
        e.destination_address = dst.to_owned();
        e.reason = reason.to_owned();
        e.error = Some(format!("{reason} detail"));
        e
    }

    fn pair(src: &str, dst: &str) -> Pair {
        Pair {
            source_workload: Some(src.to_owned()),
            destination: Some(dst.parse().unwrap()),
            ..Pair::default()
        }
    }

    #[test]
    fn the_oldest_entries_make_room_for_new_ones() {
        let ring = FailureRing::with_capacity(3);
        for port in 1..=5 {
            ring.record_entry(&entry("shop/web", &format!("198.19.2.11:{port}"), "no_endpoint"));
        }
        assert_eq!(ring.len(), 3);
        let p = |port: u16| pair("shop/web", &format!("198.19.2.11:{port}"));
        assert!(ring.matching(&p(1), 10).is_empty(), "dropped");
        assert!(ring.matching(&p(2), 10).is_empty(), "dropped");
        assert_eq!(ring.matching(&p(5), 10).len(), 1);
    }

    #[test]
    fn successes_and_resets_are_not_failures_of_a_call() {
        let ring = FailureRing::default();
        for reason in ["ok", "reset", "io_error"] {
            ring.record_entry(&entry("shop/web", "198.19.2.11:80", reason));
        }
        assert!(ring.is_empty());
        // ...while a refusal is kept: the filter is not simply "nothing".
        ring.record_entry(&entry("shop/web", "198.19.2.11:80", "policy_denied"));
        assert_eq!(ring.len(), 1);
    }

    #[test]
    fn records_are_found_by_caller_and_destination_newest_first() {
        let ring = FailureRing::default();
        ring.record_entry(&entry("shop/web", "198.19.2.11:80", "expired"));
        ring.record_entry(&entry("shop/web", "198.19.2.11:81", "expired"));
        ring.record_entry(&entry("ops/batch", "198.19.2.11:80", "expired"));
        ring.record_entry(&entry("shop/web", "198.19.2.11:80", "policy_denied"));
        let found = ring.matching(&pair("shop/web", "198.19.2.11:80"), 10);
        let reasons: Vec<&str> = found.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(reasons, ["policy_denied", "expired"]);
        assert_eq!(ring.matching(&pair("shop/web", "198.19.2.11:80"), 1).len(), 1, "limited");

        // An inbound handshake refusal: caller known by address, port 15008.
        let mut refused = Entry::now("inbound", "hbone");
        refused.source_address = Some("198.19.1.11:40000".into());
        refused.destination_address = "198.19.2.11:15008".into();
        refused.reason = "expired".into();
        ring.record_entry(&refused);
        let by_address = Pair {
            source_addresses: vec!["198.19.1.11".parse().unwrap()],
            destination: Some("198.19.2.11:80".parse().unwrap()),
            ..Pair::default()
        };
        assert_eq!(ring.matching(&by_address, 10).len(), 1);

        // A Service's virtual address: its endpoint's records match too.
        let via_service =
            Pair { endpoints: vec!["198.19.2.11:81".parse().unwrap()], ..pair("shop/web", "10.96.0.10:80") };
        assert_eq!(ring.matching(&via_service, 10).len(), 1);
    }

    #[test]
    fn certificate_facts_and_long_details_are_kept_bounded() {
        let mut e = entry("shop/web", "198.19.2.11:80", "wrong_identity");
        e.error = Some("x".repeat(10_000));
        e.peer_certificate =
            Some(VerifyError::WrongIdentity { found: "spiffe://a".into(), want: "spiffe://b".into() });
        let r = FailureRecord::from_entry(&e);
        assert!(r.detail.len() <= DETAIL_MAX + 3);
        let c = r.certificate.unwrap();
        assert_eq!(
            (c.presented_identity.as_deref(), c.expected.as_deref()),
            (Some("spiffe://a"), Some("spiffe://b"))
        );
    }
}
