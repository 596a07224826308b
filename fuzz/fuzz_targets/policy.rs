//! The policy loader alone: `policies` and `emergency_allows` as the node
//! file writes them, deserialized and checked as the tunnel does at load
//! (`policy_errors`, `emergency_errors`, `warnings`). Lists that load are
//! then evaluated for callers, destinations and ports taken from the
//! policies themselves (so rules can match) and some that no policy names:
//! never a panic, never a deny that audit mode enforces, and never an allow
//! while an enforced DENY policy matches.
#![no_main]

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use ztunnel::{
    identity::spiffe::{SpiffeId, TrustDomain},
    policy::{
        Modes, PolicySet, Verdict,
        eval::{rule_matches, selects},
        model::{Action, EmergencyAllow, Policy, Source},
        validate::{emergency_errors, policy_errors, warnings},
    },
    workload::Workload,
};

/// The policy part of a node file.
#[derive(Deserialize)]
struct PolicyFile {
    #[serde(default)]
    policies: Vec<Policy>,
    #[serde(default)]
    emergency_allows: Vec<EmergencyAllow>,
}

const ROOT_NAMESPACE: &str = "ztunnel-system";
/// How many of each kind of probe: keeps one input's evaluations bounded.
const PROBES: usize = 6;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(file) = serde_yaml_ng::from_str::<PolicyFile>(text) else { return };
    if policy_errors(&file.policies).is_some() || emergency_errors(&file.emergency_allows).is_some() {
        return;
    }
    // 2026-06-01: emergency allows expire on both sides of it.
    let now = UNIX_EPOCH + Duration::from_secs(1_780_272_000);
    let destinations = destinations(&file);
    let _ = warnings(&file.policies, &file.emergency_allows, ROOT_NAMESPACE, &destinations, now);

    let set = PolicySet {
        root_namespace: ROOT_NAMESPACE,
        policies: &file.policies,
        emergency_allows: &file.emergency_allows,
    };
    let callers = callers(&file);
    let ports = ports(&file);
    for dst in &destinations {
        for caller in &callers {
            for &port in &ports {
                check(&set, caller.as_ref(), dst, port, now);
            }
        }
    }
});

fn check(set: &PolicySet<'_>, caller: Option<&SpiffeId>, dst: &Workload, port: u16, now: SystemTime) {
    let enforced = set.evaluate(caller, dst, port, Modes { enforce: true, default_deny: false }, now);
    let _ = enforced.explain();
    let denying = set.policies.iter().find(|p| {
        p.action == Action::Deny
            && !p.dry_run
            && selects(ROOT_NAMESPACE, &p.namespace, p.selector.as_ref(), dst)
            && p.rules.iter().any(|r| rule_matches(r, caller, port))
    });
    if let Some(p) = denying {
        assert_eq!(enforced.verdict, Verdict::Deny, "{} matches: {}", p.key(), enforced.explain());
    }
    let strict = set.evaluate(caller, dst, port, Modes { enforce: true, default_deny: true }, now);
    if strict.verdict == Verdict::Allow {
        assert_eq!(enforced.verdict, Verdict::Allow, "default-deny allows more than without it");
    }
    let audit = set.evaluate(caller, dst, port, Modes { enforce: false, default_deny: true }, now);
    assert_ne!(audit.verdict, Verdict::Deny, "audit mode enforced a deny: {}", audit.explain());
    assert_eq!(audit.reason, strict.reason, "audit decides as enforce does");
}

/// Plaintext, an outsider, and callers made from the values the sources
/// name (a pattern's `*` filled in).
fn callers(file: &PolicyFile) -> Vec<Option<SpiffeId>> {
    let mut out = vec![None, SpiffeId::new(TrustDomain::default(), "outside", "nobody").ok()];
    let sources = file
        .policies
        .iter()
        .flat_map(|p| p.rules.iter().flat_map(|r| &r.from))
        .chain(file.emergency_allows.iter().flat_map(|e| &e.from))
        .map(|f| &f.source);
    for s in sources {
        out.extend(callers_named_by(s));
        if out.len() >= PROBES {
            break;
        }
    }
    out.truncate(PROBES);
    out
}

fn callers_named_by(s: &Source) -> Vec<Option<SpiffeId>> {
    let fill = |v: &str| v.replace('*', "x");
    let principals = s.principals.iter().chain(&s.not_principals);
    let mut out: Vec<Option<SpiffeId>> =
        principals.filter_map(|p| format!("spiffe://{}", fill(p)).parse().ok()).map(Some).collect();
    for ns in s.namespaces.iter().chain(&s.not_namespaces) {
        out.push(SpiffeId::new(TrustDomain::default(), &fill(ns), "default").ok());
    }
    for td in s.trust_domains.iter().chain(&s.not_trust_domains) {
        let td = TrustDomain::new(&fill(td)).ok();
        out.push(td.and_then(|td| SpiffeId::new(td, "default", "default").ok()));
    }
    out.retain(Option::is_some);
    out
}

/// The ports rules name, and some they do not.
fn ports(file: &PolicyFile) -> Vec<u16> {
    let named = file
        .policies
        .iter()
        .flat_map(|p| p.rules.iter().flat_map(|r| &r.to))
        .chain(file.emergency_allows.iter().flat_map(|e| &e.to))
        .flat_map(|t| t.operation.ports.iter().chain(&t.operation.not_ports))
        .filter_map(|p| p.parse().ok());
    let mut out: Vec<u16> = [1, 8080, 65535].into_iter().chain(named).collect();
    out.truncate(PROBES);
    out
}

/// A workload in each namespace a policy or allow is for, labelled as its
/// selector asks, and one elsewhere.
fn destinations(file: &PolicyFile) -> Vec<Workload> {
    let selected = file
        .policies
        .iter()
        .map(|p| (&p.namespace, p.selector.as_ref()))
        .chain(file.emergency_allows.iter().map(|e| (&e.namespace, e.selector.as_ref())));
    let mut out = vec![workload("elsewhere", BTreeMap::new())];
    for (namespace, selector) in selected.take(PROBES - 1) {
        let labels = selector.map(|s| s.match_labels.clone()).unwrap_or_default();
        out.push(workload(namespace, labels));
    }
    out
}

fn workload(namespace: &str, labels: BTreeMap<String, String>) -> Workload {
    Workload {
        name: "w".into(),
        namespace: namespace.into(),
        service_account: "w".into(),
        identity: SpiffeId::new(TrustDomain::default(), "elsewhere", "w").expect("a valid identity"),
        node: "n1".into(),
        addresses: vec![],
        ports: vec![],
        labels,
        has_netns: true,
    }
}
