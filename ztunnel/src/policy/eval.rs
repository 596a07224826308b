//! Evaluating a connection against policy. Istio's L4 semantics:
//!
//! 1. a matching DENY policy denies;
//! 2. a workload no ALLOW policy selects is allowed (unless its namespace is
//!    default-deny);
//! 3. otherwise a matching ALLOW allows;
//! 4. otherwise deny.
//!
//! Before the final deny of 2-4, an unexpired emergency allow that matches
//! admits the connection (it never overrides a DENY). Dry-run policies are
//! evaluated and reported, never enforced. In audit mode a deny becomes a
//! would-deny: computed, logged, not enforced. Plaintext callers have no
//! identity: they match only rules that do not ask for one.

use std::time::SystemTime;

use serde::Serialize;

use super::model::{Action, EmergencyAllow, Operation, Policy, Rule, Source};
use crate::{identity::spiffe::SpiffeId, workload::Workload};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// Audit mode: policy would deny; the connection is allowed.
    WouldDeny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::WouldDeny => "would_deny",
        }
    }

    /// Whether the connection may proceed.
    pub fn admits(self) -> bool {
        self != Verdict::Deny
    }
}

/// One decision, with everything needed to explain it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// `denied_by_policy`, `allowed_by_policy`, `no_allow_matched`,
    /// `default_deny`, `no_policy`, `emergency_allow`.
    pub reason: &'static str,
    /// `namespace/name` of the policy (or emergency allow) that decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Index of the matching rule in that policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// An emergency allow's reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// What dry-run policies would have done.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<String>,
}

impl Decision {
    fn new(verdict: Verdict, reason: &'static str) -> Self {
        Self { verdict, reason, policy: None, rule: None, note: None, dry_run: Vec::new() }
    }

    fn by(mut self, policy: String, rule: Option<usize>) -> Self {
        self.policy = Some(policy);
        self.rule = rule;
        self
    }

    /// A plaintext caller refused by a strict workload, before any policy.
    /// Plaintext from the node itself (the kubelet's probes), admitted.
    pub fn node_probe() -> Self {
        Self::new(Verdict::Allow, "node_probe")
    }

    pub fn plaintext_refused() -> Self {
        Self::new(Verdict::Deny, "plaintext_refused")
    }

    /// The destination workload left this node (or changed identity).
    pub fn workload_gone() -> Self {
        Self::new(Verdict::Deny, "workload_gone")
    }

    /// One line for logs and the CLI.
    pub fn explain(&self) -> String {
        let mut s = format!("{} ({})", self.verdict.as_str(), self.reason);
        if let Some(p) = &self.policy {
            s.push_str(&format!(" by {p}"));
            if let Some(r) = self.rule {
                s.push_str(&format!(" rule {r}"));
            }
        }
        if let Some(n) = &self.note {
            s.push_str(&format!(": {n}"));
        }
        for d in &self.dry_run {
            s.push_str(&format!("; dry-run: {d}"));
        }
        s
    }
}

/// How the destination workload's namespace (or the workload) is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Modes {
    /// false: audit (deny becomes would-deny).
    pub enforce: bool,
    /// Deny what no ALLOW matches, even with no ALLOW policy.
    pub default_deny: bool,
}

/// The policies in force, as the configuration holds them.
#[derive(Debug, Clone, Copy)]
pub struct PolicySet<'a> {
    pub root_namespace: &'a str,
    pub policies: &'a [Policy],
    pub emergency_allows: &'a [EmergencyAllow],
}

/// Whether a policy of `namespace` with `selector` selects `dst`; policies of
/// `root_namespace` apply to the whole mesh.
pub fn selects(
    root_namespace: &str,
    namespace: &str,
    selector: Option<&super::model::Selector>,
    dst: &Workload,
) -> bool {
    (namespace == root_namespace || namespace == dst.namespace)
        && selector.is_none_or(|s| s.matches(&dst.labels))
}

impl PolicySet<'_> {
    pub fn selects(
        &self,
        namespace: &str,
        selector: Option<&super::model::Selector>,
        dst: &Workload,
    ) -> bool {
        selects(self.root_namespace, namespace, selector, dst)
    }

    /// The decision for `caller` (None: plaintext) reaching `dst` on `port`.
    pub fn evaluate(
        &self,
        caller: Option<&SpiffeId>,
        dst: &Workload,
        port: u16,
        modes: Modes,
        now: SystemTime,
    ) -> Decision {
        let applicable: Vec<&Policy> =
            self.policies.iter().filter(|p| self.selects(&p.namespace, p.selector.as_ref(), dst)).collect();
        let mut dry_run = Vec::new();
        for p in applicable.iter().filter(|p| p.dry_run) {
            let matched = matching_rule(&p.rules, caller, port);
            let would = match (p.action, matched) {
                (Action::Deny, Some(r)) => format!("DENY {} rule {r} would deny", p.key()),
                (Action::Deny, None) => format!("DENY {} would not match", p.key()),
                (Action::Allow, Some(r)) => format!("ALLOW {} rule {r} would allow", p.key()),
                (Action::Allow, None) => format!("ALLOW {} would not match", p.key()),
            };
            dry_run.push(would);
        }
        let enforced: Vec<&&Policy> = applicable.iter().filter(|p| !p.dry_run).collect();
        let mut decision = self.decide(&enforced, caller, dst, port, modes, now);
        decision.dry_run = dry_run;
        if !modes.enforce && decision.verdict == Verdict::Deny {
            decision.verdict = Verdict::WouldDeny;
        }
        decision
    }

    fn decide(
        &self,
        enforced: &[&&Policy],
        caller: Option<&SpiffeId>,
        dst: &Workload,
        port: u16,
        modes: Modes,
        now: SystemTime,
    ) -> Decision {
        for p in enforced.iter().filter(|p| p.action == Action::Deny) {
            if let Some(r) = matching_rule(&p.rules, caller, port) {
                return Decision::new(Verdict::Deny, "denied_by_policy").by(p.key(), Some(r));
            }
        }
        let allows: Vec<&&&Policy> = enforced.iter().filter(|p| p.action == Action::Allow).collect();
        for p in &allows {
            if let Some(r) = matching_rule(&p.rules, caller, port) {
                return Decision::new(Verdict::Allow, "allowed_by_policy").by(p.key(), Some(r));
            }
        }
        if allows.is_empty() && !modes.default_deny {
            return Decision::new(Verdict::Allow, "no_policy");
        }
        for e in self.emergency_allows {
            if e.expires > now
                && self.selects(&e.namespace, e.selector.as_ref(), dst)
                && rule_matches(&e.rule(), caller, port)
            {
                let mut d = Decision::new(Verdict::Allow, "emergency_allow").by(e.key(), None);
                d.note =
                    Some(format!("{} (expires {})", e.reason, humantime::format_rfc3339_seconds(e.expires)));
                return d;
            }
        }
        if allows.is_empty() {
            Decision::new(Verdict::Deny, "default_deny")
        } else {
            Decision::new(Verdict::Deny, "no_allow_matched")
        }
    }
}

fn matching_rule(rules: &[Rule], caller: Option<&SpiffeId>, port: u16) -> Option<usize> {
    rules.iter().position(|r| rule_matches(r, caller, port))
}

pub fn rule_matches(rule: &Rule, caller: Option<&SpiffeId>, port: u16) -> bool {
    let from = rule.from.is_empty() || rule.from.iter().any(|f| source_matches(&f.source, caller));
    let to = rule.to.is_empty() || rule.to.iter().any(|t| operation_matches(&t.operation, port));
    from && to
}

/// Istio's principal form: `<trust-domain>/ns/<namespace>/sa/<account>`.
pub fn principal(id: &SpiffeId) -> String {
    format!("{}/ns/{}/sa/{}", id.trust_domain(), id.namespace(), id.service_account())
}

fn source_matches(s: &Source, caller: Option<&SpiffeId>) -> bool {
    let principal = caller.map(principal);
    let namespace = caller.map(|c| c.namespace().to_owned());
    let trust_domain = caller.map(|c| c.trust_domain().to_string());
    field(&s.principals, &s.not_principals, principal.as_deref())
        && field(&s.namespaces, &s.not_namespaces, namespace.as_deref())
        && field(&s.trust_domains, &s.not_trust_domains, trust_domain.as_deref())
}

/// `values` (if any) must match, `not_values` must not. A plaintext caller
/// has no value: it never matches `values`, and never matches a `not_values`
/// entry (so `notPrincipals: ["*"]` admits exactly the unauthenticated).
fn field(values: &[String], not_values: &[String], value: Option<&str>) -> bool {
    let matches = |patterns: &[String]| value.is_some_and(|v| patterns.iter().any(|p| pattern(p, v)));
    (values.is_empty() || matches(values)) && !matches(not_values)
}

/// Exact, `prefix*`, `*suffix`, or `*` (any non-empty value).
pub fn pattern(p: &str, v: &str) -> bool {
    if p == "*" {
        return !v.is_empty();
    }
    if let Some(prefix) = p.strip_suffix('*') {
        return v.starts_with(prefix);
    }
    if let Some(suffix) = p.strip_prefix('*') {
        return v.ends_with(suffix);
    }
    p == v
}

fn operation_matches(op: &Operation, port: u16) -> bool {
    let port = port.to_string();
    let hit = |ps: &[String]| ps.iter().any(|p| p == "*" || *p == port);
    (op.ports.is_empty() || hit(&op.ports)) && !hit(&op.not_ports)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn workload(ns: &str, name: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            name: name.into(),
            namespace: ns.into(),
            service_account: name.into(),
            identity: SpiffeId::new("cluster.local".parse().unwrap(), ns, name).unwrap(),
            node: "n1".into(),
            addresses: vec![],
            ports: vec![],
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            has_netns: true,
        }
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    /// Policies and emergency allows parsed from YAML, to evaluate.
    struct Owned(Vec<Policy>, Vec<EmergencyAllow>);

    impl Owned {
        fn evaluate(
            &self,
            caller: Option<&SpiffeId>,
            dst: &Workload,
            port: u16,
            modes: Modes,
            now: SystemTime,
        ) -> Decision {
            PolicySet { root_namespace: "ztunnel-system", policies: &self.0, emergency_allows: &self.1 }
                .evaluate(caller, dst, port, modes, now)
        }
    }

    fn set(policies: &str, emergency: &str) -> Owned {
        Owned(serde_yaml_ng::from_str(policies).unwrap(), serde_yaml_ng::from_str(emergency).unwrap())
    }

    const ENFORCE: Modes = Modes { enforce: true, default_deny: false };

    /// (case, policies, caller, port, modes, verdict, reason, deciding policy)
    type Case = (
        &'static str,
        &'static str,
        Option<&'static str>,
        u16,
        Modes,
        Verdict,
        &'static str,
        Option<&'static str>,
    );

    #[test]
    fn the_semantics_case_by_case() {
        const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
        const EVIL: &str = "spiffe://evil.example/ns/shop/sa/web";
        const OPS: &str = "spiffe://cluster.local/ns/ops/sa/admin";
        let allow_web = "- {name: a, namespace: shop, action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]}";
        let cases: Vec<Case> = vec![
            ("no policy allows", "[]", Some(WEB), 5432, ENFORCE, Verdict::Allow, "no_policy", None),
            (
                "no policy, default-deny denies",
                "[]",
                Some(WEB),
                5432,
                Modes { enforce: true, default_deny: true },
                Verdict::Deny,
                "default_deny",
                None,
            ),
            (
                "a matching ALLOW allows",
                allow_web,
                Some(WEB),
                5432,
                ENFORCE,
                Verdict::Allow,
                "allowed_by_policy",
                Some("shop/a"),
            ),
            (
                "an ALLOW exists, none matches: deny",
                allow_web,
                Some(OPS),
                5432,
                ENFORCE,
                Verdict::Deny,
                "no_allow_matched",
                None,
            ),
            (
                "plaintext matches no principal",
                allow_web,
                None,
                5432,
                ENFORCE,
                Verdict::Deny,
                "no_allow_matched",
                None,
            ),
            (
                "DENY wins over ALLOW",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{}]}, {name: d, namespace: shop, action: DENY, rules: [{from: [{source: {namespaces: [shop]}}]}]}]",
                Some(WEB),
                5432,
                ENFORCE,
                Verdict::Deny,
                "denied_by_policy",
                Some("shop/d"),
            ),
            (
                "a DENY that does not match leaves the ALLOW",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{}]}, {name: d, namespace: shop, action: DENY, rules: [{from: [{source: {namespaces: [ops]}}]}]}]",
                Some(WEB),
                5432,
                ENFORCE,
                Verdict::Allow,
                "allowed_by_policy",
                Some("shop/a"),
            ),
            (
                "ALLOW with no rules allows nothing",
                "[{name: a, namespace: shop, action: ALLOW}]",
                Some(WEB),
                5432,
                ENFORCE,
                Verdict::Deny,
                "no_allow_matched",
                None,
            ),
            (
                "ALLOW [{}] allows all, plaintext too",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{}]}]",
                None,
                1,
                ENFORCE,
                Verdict::Allow,
                "allowed_by_policy",
                Some("shop/a"),
            ),
            (
                "prefix principal",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/*]}}]}]}]",
                Some(WEB),
                1,
                ENFORCE,
                Verdict::Allow,
                "allowed_by_policy",
                Some("shop/a"),
            ),
            (
                "suffix principal",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{from: [{source: {principals: ['*/sa/web']}}]}]}]",
                Some(WEB),
                1,
                ENFORCE,
                Verdict::Allow,
                "allowed_by_policy",
                Some("shop/a"),
            ),
            (
                "* principal: any authenticated",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{from: [{source: {principals: ['*']}}]}]}]",
                Some(OPS),
                1,
                ENFORCE,
                Verdict::Allow,
                "allowed_by_policy",
                Some("shop/a"),
            ),
            (
                "* principal excludes plaintext",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{from: [{source: {principals: ['*']}}]}]}]",
                None,
                1,
                ENFORCE,
                Verdict::Deny,
                "no_allow_matched",
                None,
            ),
            (
                "notPrincipals [*] is exactly plaintext",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{from: [{source: {notPrincipals: ['*']}}]}]}]",
                None,
                1,
                ENFORCE,
                Verdict::Allow,
                "allowed_by_policy",
                Some("shop/a"),
            ),
            (
                "notPrincipals [*] excludes the authenticated",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{from: [{source: {notPrincipals: ['*']}}]}]}]",
                Some(WEB),
                1,
                ENFORCE,
                Verdict::Deny,
                "no_allow_matched",
                None,
            ),
            (
                "notNamespaces",
                "[{name: d, namespace: shop, action: DENY, rules: [{from: [{source: {notNamespaces: [shop]}}]}]}]",
                Some(OPS),
                1,
                ENFORCE,
                Verdict::Deny,
                "denied_by_policy",
                Some("shop/d"),
            ),
            (
                "notNamespaces lets the namespace through",
                "[{name: d, namespace: shop, action: DENY, rules: [{from: [{source: {notNamespaces: [shop]}}]}]}]",
                Some(WEB),
                1,
                ENFORCE,
                Verdict::Allow,
                "no_policy",
                None,
            ),
            (
                "trust domains",
                "[{name: d, namespace: shop, action: DENY, rules: [{from: [{source: {notTrustDomains: [cluster.local]}}]}]}]",
                Some(EVIL),
                1,
                ENFORCE,
                Verdict::Deny,
                "denied_by_policy",
                Some("shop/d"),
            ),
            (
                "ports",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{to: [{operation: {ports: ['5432']}}]}]}]",
                Some(WEB),
                5432,
                ENFORCE,
                Verdict::Allow,
                "allowed_by_policy",
                Some("shop/a"),
            ),
            (
                "another port",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{to: [{operation: {ports: ['5432']}}]}]}]",
                Some(WEB),
                22,
                ENFORCE,
                Verdict::Deny,
                "no_allow_matched",
                None,
            ),
            (
                "notPorts",
                "[{name: d, namespace: shop, action: DENY, rules: [{to: [{operation: {notPorts: ['5432']}}]}]}]",
                Some(WEB),
                22,
                ENFORCE,
                Verdict::Deny,
                "denied_by_policy",
                Some("shop/d"),
            ),
            (
                "from AND to",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{from: [{source: {namespaces: [shop]}}], to: [{operation: {ports: ['5432']}}]}]}]",
                Some(OPS),
                5432,
                ENFORCE,
                Verdict::Deny,
                "no_allow_matched",
                None,
            ),
            (
                "another namespace's policy does not apply",
                "[{name: a, namespace: other, action: ALLOW, rules: [{from: [{source: {namespaces: [nope]}}]}]}]",
                Some(WEB),
                1,
                ENFORCE,
                Verdict::Allow,
                "no_policy",
                None,
            ),
            (
                "the root namespace is mesh-wide",
                "[{name: d, namespace: ztunnel-system, action: DENY, rules: [{from: [{source: {namespaces: [ops]}}]}]}]",
                Some(OPS),
                1,
                ENFORCE,
                Verdict::Deny,
                "denied_by_policy",
                Some("ztunnel-system/d"),
            ),
            (
                "a selector picks workloads",
                "[{name: d, namespace: shop, selector: {matchLabels: {app: other}}, action: DENY, rules: [{}]}]",
                Some(WEB),
                1,
                ENFORCE,
                Verdict::Allow,
                "no_policy",
                None,
            ),
            (
                "a selector that matches",
                "[{name: d, namespace: shop, selector: {matchLabels: {app: db}}, action: DENY, rules: [{}]}]",
                Some(WEB),
                1,
                ENFORCE,
                Verdict::Deny,
                "denied_by_policy",
                Some("shop/d"),
            ),
            (
                "audit turns deny into would-deny",
                allow_web,
                Some(OPS),
                1,
                Modes { enforce: false, default_deny: false },
                Verdict::WouldDeny,
                "no_allow_matched",
                None,
            ),
            (
                "a dry-run DENY is not enforced",
                "[{name: d, namespace: shop, action: DENY, dryRun: true, rules: [{}]}]",
                Some(WEB),
                1,
                ENFORCE,
                Verdict::Allow,
                "no_policy",
                None,
            ),
            (
                "a dry-run ALLOW does not turn on default deny",
                "[{name: a, namespace: shop, action: ALLOW, dryRun: true, rules: [{from: [{source: {namespaces: [nope]}}]}]}]",
                Some(WEB),
                1,
                ENFORCE,
                Verdict::Allow,
                "no_policy",
                None,
            ),
            (
                "default-deny still lets a matching ALLOW through",
                allow_web,
                Some(WEB),
                1,
                Modes { enforce: true, default_deny: true },
                Verdict::Allow,
                "allowed_by_policy",
                Some("shop/a"),
            ),
            (
                "default-deny in audit mode is a would-deny",
                "[]",
                Some(WEB),
                1,
                Modes { enforce: false, default_deny: true },
                Verdict::WouldDeny,
                "default_deny",
                None,
            ),
            (
                "audit turns an explicit DENY into would-deny too",
                "[{name: d, namespace: shop, action: DENY, rules: [{}]}]",
                Some(WEB),
                1,
                Modes { enforce: false, default_deny: false },
                Verdict::WouldDeny,
                "denied_by_policy",
                Some("shop/d"),
            ),
            (
                "notPorts on an ALLOW",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{to: [{operation: {notPorts: ['22']}}]}]}]",
                Some(WEB),
                22,
                ENFORCE,
                Verdict::Deny,
                "no_allow_matched",
                None,
            ),
            (
                "one of several from entries is enough",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{from: [{source: {namespaces: [ops]}}, {source: {principals: [cluster.local/ns/shop/sa/web]}}]}]}]",
                Some(WEB),
                1,
                ENFORCE,
                Verdict::Allow,
                "allowed_by_policy",
                Some("shop/a"),
            ),
            (
                "every field of a source must match",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{from: [{source: {namespaces: [shop], notPrincipals: ['*/sa/web']}}]}]}]",
                Some(WEB),
                1,
                ENFORCE,
                Verdict::Deny,
                "no_allow_matched",
                None,
            ),
            (
                "the second rule matches",
                "[{name: a, namespace: shop, action: ALLOW, rules: [{from: [{source: {namespaces: [ops]}}]}, {to: [{operation: {ports: ['1']}}]}]}]",
                Some(WEB),
                1,
                ENFORCE,
                Verdict::Allow,
                "allowed_by_policy",
                Some("shop/a"),
            ),
        ];
        let db = workload("shop", "db", &[("app", "db")]);
        let now = SystemTime::now();
        for (what, policies, caller, port, modes, verdict, reason, by) in cases {
            let caller = caller.map(id);
            let d = set(policies, "[]").evaluate(caller.as_ref(), &db, port, modes, now);
            assert_eq!((d.verdict, d.reason), (verdict, reason), "{what}: {}", d.explain());
            assert_eq!(d.policy.as_deref(), by, "{what}: {}", d.explain());
        }
    }

    #[test]
    fn dry_run_policies_say_what_they_would_do() {
        let d = set("[{name: d, namespace: shop, action: DENY, dryRun: true, rules: [{}]}]", "[]").evaluate(
            Some(&id("spiffe://cluster.local/ns/shop/sa/web")),
            &workload("shop", "db", &[]),
            1,
            ENFORCE,
            SystemTime::now(),
        );
        assert_eq!(d.dry_run, vec!["DENY shop/d rule 0 would deny".to_owned()]);
        assert!(d.explain().contains("dry-run: DENY shop/d rule 0 would deny"));
    }

    #[test]
    fn an_emergency_allow_admits_until_it_expires_and_never_beats_a_deny() {
        let policies =
            "[{name: a, namespace: shop, action: ALLOW, rules: [{from: [{source: {namespaces: [shop]}}]}]}]";
        let emergency = "[{name: inc-1, reason: 'payments down, INC-1', expires: '2030-01-01T00:00:00Z', namespace: shop, from: [{source: {namespaces: [payments]}}]}]";
        let s = set(policies, emergency);
        let db = workload("shop", "db", &[]);
        let payments = id("spiffe://cluster.local/ns/payments/sa/api");
        let before = humantime::parse_rfc3339("2029-12-31T23:00:00Z").unwrap();
        let after = humantime::parse_rfc3339("2030-01-01T00:00:01Z").unwrap();
        let d = s.evaluate(Some(&payments), &db, 1, ENFORCE, before);
        assert_eq!((d.verdict, d.reason), (Verdict::Allow, "emergency_allow"));
        assert_eq!(d.policy.as_deref(), Some("shop/inc-1"));
        assert!(d.note.as_deref().is_some_and(|n| n.contains("INC-1")));
        // It lapses on its own.
        let d = s.evaluate(Some(&payments), &db, 1, ENFORCE, after);
        assert_eq!((d.verdict, d.reason), (Verdict::Deny, "no_allow_matched"));
        // It does not override an explicit DENY.
        let with_deny = set(
            "[{name: d, namespace: shop, action: DENY, rules: [{from: [{source: {namespaces: [payments]}}]}]}]",
            emergency,
        );
        let d = with_deny.evaluate(Some(&payments), &db, 1, ENFORCE, before);
        assert_eq!((d.verdict, d.reason), (Verdict::Deny, "denied_by_policy"));
        // Nor is it needed, or used, when nothing denies.
        let d = set("[]", emergency).evaluate(Some(&payments), &db, 1, ENFORCE, before);
        assert_eq!(d.reason, "no_policy");
    }

    #[test]
    fn patterns() {
        assert!(pattern("*", "x"));
        assert!(!pattern("*", ""));
        assert!(pattern("a/*", "a/b"));
        assert!(pattern("*/b", "a/b"));
        assert!(!pattern("a", "ab"));
    }
}
