//! The one line that names why a call works or fails.
//!
//! In order: what stops every call now (a certificate this node lacks, a
//! Service without endpoints, a workload that may not leave the mesh, a
//! tunnel port), then the policy decision, then the most recent failure
//! recorded between the two; otherwise the call is allowed.

use super::model::{Explanation, FailureView, Verdict, WorkloadView};

pub fn verdict(e: &Explanation) -> Verdict {
    blocked(e).or_else(|| denied(e)).or_else(|| failed(e)).unwrap_or_else(|| allowed(e))
}

fn no(cause: &str, summary: String) -> Option<Verdict> {
    Some(Verdict { ok: false, cause: cause.to_owned(), summary })
}

/// A certificate this node should hold for `w` and does not (valid).
fn certificate_problem(w: &WorkloadView, whose: &str) -> Option<Verdict> {
    if !w.on_this_node {
        return None;
    }
    let Some(c) = &w.certificate else {
        return no("no_certificate", format!("{whose} {} has no certificate on this node", w.name));
    };
    if c.state == "valid" {
        return None;
    }
    let when = match (&c.state[..], &c.not_after) {
        ("expired", Some(t)) => format!("expired at {t}"),
        _ => c.state.clone(),
    };
    let error = c.last_error.as_ref().map(|e| format!("; last renewal error: {e}")).unwrap_or_default();
    no("no_certificate", format!("{whose} {}'s certificate is {when}{error}", w.name))
}

fn blocked(e: &Explanation) -> Option<Verdict> {
    let dst = &e.destination;
    if let Some(s) = &dst.service
        && s.ready_endpoints.is_empty()
    {
        return no("no_endpoint", format!("service {} has no ready endpoint for {}", s.name, dst.address));
    }
    let src = e.source.workload.as_ref();
    if dst.kind == "outside_mesh" {
        return match src {
            Some(s) if s.outbound_passthrough == "refuse" => no(
                "passthrough_refused",
                format!(
                    "{} may not leave the mesh (outbound_passthrough: refuse) and {} is outside it",
                    s.name, dst.address
                ),
            ),
            _ => None,
        };
    }
    if dst
        .address
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| crate::proxy::hbone::is_reserved_port(a.port()))
    {
        return no(
            "self_call",
            format!("{} is one of the tunnel's own ports, never a workload's", dst.address),
        );
    }
    if let Some(s) = src
        && let Some(v) = certificate_problem(s, "the source")
    {
        return Some(v);
    }
    dst.workload.as_ref().and_then(|d| certificate_problem(d, "the destination"))
}

fn denied(e: &Explanation) -> Option<Verdict> {
    let p = e.policy.as_ref()?;
    if p.decision != "deny" {
        return None;
    }
    let dst = e.destination.workload.as_ref().map_or(e.destination.address.as_str(), |w| w.name.as_str());
    let mut summary = match (&p.reason[..], &p.policy, p.rule) {
        (_, Some(policy), Some(rule)) => format!("denied by policy {policy} rule {rule}"),
        (_, Some(policy), None) => format!("denied by policy {policy}"),
        ("no_allow_matched", None, _) => {
            format!(
                "denied: no rule of the ALLOW policies selecting {dst} admits {} on port {}",
                p.caller, p.port
            )
        }
        ("default_deny", None, _) => {
            format!(
                "denied: {dst}'s namespace is default-deny and no ALLOW admits {} on port {}",
                p.caller, p.port
            )
        }
        ("plaintext_refused", None, _) => {
            format!("denied: {dst} is in strict mTLS mode and the caller is outside the mesh (plaintext)")
        }
        (reason, None, _) => format!("denied ({reason})"),
    };
    if !p.decided_here {
        summary.push_str(&elsewhere(e));
    }
    no(&p.reason, summary)
}

fn failed(e: &Explanation) -> Option<Verdict> {
    let f = e.failures.matching.iter().find(|f| f.recent)?;
    no(&f.record.reason, format!("{} ({}s ago)", failure_summary(e, f), f.age_seconds))
}

/// One recorded failure for a person.
fn failure_summary(e: &Explanation, f: &FailureView) -> String {
    let r = &f.record;
    // Whose certificate a handshake failure was about: the peer's.
    let whose = if r.direction == "outbound" { "the destination's" } else { "the caller's" };
    let c = r.certificate.clone().unwrap_or_default();
    let detail = &r.detail;
    match r.reason.as_str() {
        "expired" => match c.not_after {
            Some(t) => format!("{whose} certificate expired at {t}"),
            None => format!("{whose} certificate expired: {detail}"),
        },
        "not_yet_valid" => match c.not_before {
            Some(t) => format!("{whose} certificate is not valid before {t} (clock skew?)"),
            None => format!("{whose} certificate is not valid yet: {detail}"),
        },
        "unknown_ca" => format!("{whose} certificate is not issued by a CA in the trust bundle"),
        "wrong_identity" | "wrong_trust_domain" => match (c.presented_identity, c.expected) {
            (Some(found), Some(want)) => format!("peer presented identity {found}, expected {want}"),
            _ => format!("peer presented the wrong identity: {detail}"),
        },
        "no_spiffe_id" | "invalid_spiffe_id" => format!("{whose} certificate carries no valid SPIFFE ID"),
        "peer_refused_expired" | "peer_refused_unknown_ca" | "peer_refused_certificate" => {
            format!("the peer's tunnel refused this side's certificate ({}): {detail}", r.reason)
        }
        "policy_denied" => {
            let node = e.destination.workload.as_ref().map_or("the destination's node", |w| w.node.as_str());
            format!(
                "denied by the destination's policy (its tunnel answered 401): `ztunnel explain` on {node} names the policy and rule"
            )
        }
        "denied_by_policy" | "no_allow_matched" | "default_deny" | "revoked_by_policy" => {
            match (&r.policy, r.rule) {
                (Some(p), Some(rule)) => format!("denied by policy {p} rule {rule}"),
                (Some(p), None) => format!("denied by policy {p} ({})", r.reason),
                _ => format!("denied by policy ({}): {detail}", r.reason),
            }
        }
        "plaintext_refused" => "plaintext refused: the destination is in strict mTLS mode".to_owned(),
        "destination_unreachable" | "connect_timeout" => format!("destination unreachable: {detail}"),
        "no_endpoint" => format!("no ready endpoint: {detail}"),
        "no_certificate" => format!("no certificate: {detail}"),
        reason if reason.starts_with("limit_") => format!("refused by a limit ({reason}): {detail}"),
        reason => format!("{reason}: {detail}"),
    }
}

/// Said of a decision made from this node's configuration for another
/// node's workload (in file mode the files may hold other policies).
fn elsewhere(e: &Explanation) -> String {
    let node = e.destination.workload.as_ref().map_or("the destination's node", |w| w.node.as_str());
    format!(" (as this node's configuration has it; {node}'s tunnel decides)")
}

fn allowed(e: &Explanation) -> Verdict {
    let ok = |cause: &str, summary: String| Verdict { ok: true, cause: cause.to_owned(), summary };
    let Some(p) = &e.policy else {
        return ok(
            "outside_mesh",
            format!("{} is outside the mesh: the call goes there in plaintext", e.destination.address),
        );
    };
    let by = match (&p.policy, p.rule) {
        (Some(policy), Some(rule)) => format!("policy {policy} rule {rule}"),
        (Some(policy), None) => format!("policy {policy}"),
        _ => "no policy selects the destination".to_owned(),
    };
    if p.decision == "would_deny" {
        return ok(
            "would_deny",
            format!("allowed in audit mode; enforced, it would be denied ({}, {by})", p.reason),
        );
    }
    let mut summary = format!("allowed: {by}");
    if !p.decided_here {
        summary.push_str(&elsewhere(e));
    }
    ok("allowed", summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        explain::model::{Destination, Failures, PolicyView, QueryView, ServiceView, Source, Trust},
        failures::{CertificateProblem, FailureRecord},
        identity::manager::CertStatus,
    };

    fn workload(name: &str, node: &str, local: bool) -> WorkloadView {
        WorkloadView {
            name: name.into(),
            identity: format!("spiffe://cluster.local/ns/shop/sa/{name}"),
            node: node.into(),
            addresses: vec![],
            on_this_node: local,
            enrollment: local.then(|| "enrolled".into()),
            enrollment_error: None,
            mtls: "permissive".into(),
            authorization: "enforce".into(),
            default_deny: false,
            outbound_passthrough: "allow".into(),
            certificate: local.then(|| CertStatus {
                identity: String::new(),
                kind: "workload".into(),
                state: "valid".into(),
                serial: None,
                not_after: Some("2026-01-01T00:00:00Z".into()),
                expires_in_seconds: None,
                next_request_in_seconds: 0,
                root: None,
                last_renewal: None,
                last_error: None,
                consecutive_failures: 0,
                issued: 1,
                failed: 0,
            }),
        }
    }

    /// web (on this node) -> db (on n2), allowed by shop/db rule 0.
    fn base() -> Explanation {
        Explanation {
            verdict: Verdict { ok: true, cause: String::new(), summary: String::new() },
            query: QueryView { from: "web".into(), to: "198.19.2.11:80".into() },
            node: "n1".into(),
            time: String::new(),
            source: Source {
                kind: "workload".into(),
                address: None,
                workload: Some(workload("web", "n1", true)),
            },
            destination: Destination {
                address: "198.19.2.11:80".into(),
                kind: "workload".into(),
                service: None,
                workload: Some(workload("db", "n2", false)),
                expected_identity: None,
            },
            trust: Trust { trust_domain: "cluster.local".into(), signing_root: String::new(), roots: vec![] },
            policy: Some(PolicyView {
                caller: "spiffe://cluster.local/ns/shop/sa/web".into(),
                port: 80,
                decision: "allow".into(),
                reason: "allowed_by_policy".into(),
                policy: Some("shop/db".into()),
                rule: Some(0),
                note: None,
                dry_run: vec![],
                decided_here: true,
            }),
            failures: Failures { window_seconds: 300, held: 0, capacity: 1024, matching: vec![] },
        }
    }

    fn failure(reason: &str, age: u64) -> FailureView {
        FailureView {
            record: FailureRecord {
                time: String::new(),
                direction: "outbound".into(),
                mode: "hbone".into(),
                reason: reason.into(),
                detail: "detail".into(),
                source_workload: None,
                source_identity: None,
                source_address: None,
                destination_address: String::new(),
                destination_service: None,
                destination_workload: None,
                destination_identity: None,
                policy: None,
                rule: None,
                certificate: Some(CertificateProblem {
                    not_after: Some("2026-01-01T00:00:00Z".into()),
                    ..CertificateProblem::default()
                }),
            },
            age_seconds: age,
            recent: age <= 300,
        }
    }

    fn cause(e: &Explanation) -> (bool, String) {
        let v = verdict(e);
        (v.ok, v.cause)
    }

    #[test]
    fn an_allowed_call_with_no_recent_failure_is_ok() {
        let mut e = base();
        assert_eq!(verdict(&e).summary, "allowed: policy shop/db rule 0");
        // A failure older than the window no longer counts...
        e.failures.matching.push(failure("expired", 301));
        assert_eq!(cause(&e), (true, "allowed".into()));
        // ...a recent one does, and names the peer's expiry.
        e.failures.matching.insert(0, failure("expired", 2));
        assert_eq!(cause(&e), (false, "expired".into()));
        assert!(
            verdict(&e).summary.starts_with("the destination's certificate expired at 2026-01-01T00:00:00Z")
        );
    }

    #[test]
    fn what_stops_every_call_comes_before_policy_and_policy_before_failures() {
        let mut e = base();
        e.failures.matching.push(failure("destination_unreachable", 1));
        if let Some(p) = e.policy.as_mut() {
            p.decision = "deny".into();
            p.reason = "denied_by_policy".into();
            p.rule = Some(2);
        }
        assert_eq!(verdict(&e).summary, "denied by policy shop/db rule 2");
        if let Some(c) = e.source.workload.as_mut().and_then(|w| w.certificate.as_mut()) {
            c.state = "expired".into();
        }
        assert_eq!(cause(&e), (false, "no_certificate".into()));
        assert!(verdict(&e).summary.contains("expired at 2026-01-01T00:00:00Z"), "{}", verdict(&e).summary);
        e.destination.service = Some(ServiceView { name: "shop/db".into(), ready_endpoints: vec![] });
        assert_eq!(cause(&e), (false, "no_endpoint".into()));
    }

    #[test]
    fn audit_mode_is_ok_but_says_what_enforcing_would_do() {
        let mut e = base();
        if let Some(p) = e.policy.as_mut() {
            p.decision = "would_deny".into();
            p.reason = "no_allow_matched".into();
            p.policy = None;
            p.rule = None;
        }
        let v = verdict(&e);
        assert_eq!((v.ok, v.cause.as_str()), (true, "would_deny"));
        assert!(v.summary.contains("no_allow_matched"), "{}", v.summary);
    }
}
