//! Checks on policies at load: errors for what cannot be meant, warnings for
//! what is probably not meant. Every message names the policy.

use std::time::{Duration, SystemTime};

use super::{
    eval::selects,
    model::{Action, EmergencyAllow, From, Operation, Policy, Rule, Selector, Source, To},
};
use crate::workload::Workload;

/// What is wrong with a policy or emergency allow: (index, field, message);
/// an empty field is the entry itself.
pub type Problem = (usize, &'static str, String);

/// Errors in policies (index into the list, field, message).
pub fn policy_errors(policies: &[Policy]) -> Option<Problem> {
    for (i, p) in policies.iter().enumerate() {
        if p.name.is_empty() {
            return Some((i, "name", "a policy needs a name".into()));
        }
        if p.namespace.is_empty() {
            return Some((i, "namespace", format!("policy `{}` needs a namespace", p.name)));
        }
        if let Some(j) = policies[..i].iter().position(|q| q.key() == p.key()) {
            return Some((i, "name", format!("policy {} is defined twice (also policies[{j}])", p.key())));
        }
        if let Some(bad) = rule_problems(&p.rules).into_iter().next() {
            return Some((i, "rules", format!("policy {}: {bad}", p.key())));
        }
    }
    None
}

/// What is wrong in rules, each naming its place. Every one of these would
/// load and then never match (or match everything), so a DENY would
/// silently do nothing: Istio's control plane refuses them too.
fn rule_problems(rules: &[Rule]) -> Vec<String> {
    let mut out = Vec::new();
    for (ri, r) in rules.iter().enumerate() {
        for (fi, from) in r.from.iter().enumerate() {
            let at = format!("rules[{ri}].from[{fi}].source");
            if from.source.is_empty() {
                out.push(format!(
                    "{at} is empty: name principals, namespaces or trust domains, or drop the entry"
                ));
            }
            if let Some(bad) = bad_pattern(&from.source) {
                out.push(format!("{at}: {bad}"));
            }
            for p in from.source.principals.iter().chain(&from.source.not_principals) {
                if let Some(rest) = p.strip_prefix("spiffe://") {
                    out.push(format!(
                        "{at}: principal `{p}` never matches: principals are written without `spiffe://`, as `{rest}`"
                    ));
                }
            }
        }
        for (ti, to) in r.to.iter().enumerate() {
            let at = format!("rules[{ri}].to[{ti}].operation");
            if to.operation.is_empty() {
                out.push(format!("{at} is empty: name ports, or drop the entry"));
            }
            for port in to.operation.ports.iter().chain(&to.operation.not_ports) {
                if let Some(problem) = port_problem(port) {
                    out.push(format!("{at}: {problem}"));
                }
            }
        }
    }
    out
}

/// A port is `*` or a number as the connection's port is written: `05432`
/// or `+5432` would never equal it.
fn port_problem(port: &str) -> Option<String> {
    if port == "*" {
        return None;
    }
    match port.trim().parse::<u16>() {
        Ok(0) => Some("port `0` is not a port".into()),
        Ok(n) if n.to_string() == port => None,
        Ok(n) => Some(format!("port `{port}` never matches: write `{n}`")),
        Err(_) => Some(format!("`{port}` is not a port")),
    }
}

/// A source value that is not exact, `prefix*`, `*suffix` or `*`.
fn bad_pattern(s: &Source) -> Option<String> {
    let fields: [(&str, &[String]); 6] = [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
        ("trustDomains", &s.trust_domains),
        ("notTrustDomains", &s.not_trust_domains),
    ];
    for (field, values) in fields {
        for v in values {
            let inner = v.strip_prefix('*').or_else(|| v.strip_suffix('*')).unwrap_or(v);
            if v.is_empty() || (v != "*" && inner.contains('*')) {
                return Some(format!(
                    "{field} value `{v}`: only an exact value, `prefix*`, `*suffix` or `*` is supported"
                ));
            }
        }
    }
    None
}

/// Errors in emergency allows: a reason and an expiry are mandatory.
pub fn emergency_errors(allows: &[EmergencyAllow]) -> Option<Problem> {
    for (i, e) in allows.iter().enumerate() {
        if e.name.is_empty() {
            return Some((i, "name", "an emergency allow needs a name".into()));
        }
        if e.reason.trim().is_empty() {
            return Some((
                i,
                "reason",
                format!(
                    "emergency allow {} needs a reason (it is logged with every connection it admits)",
                    e.key()
                ),
            ));
        }
        if e.namespace.is_empty() {
            return Some((i, "namespace", format!("emergency allow {} needs a namespace", e.key())));
        }
        // An exception must say whom it admits and to what: an open door
        // "for everyone, to everything" is not an exception.
        if e.from.is_empty() {
            return Some((
                i,
                "",
                format!(
                    "emergency allow {} must name whom it admits (`from` with principals or namespaces)",
                    e.key()
                ),
            ));
        }
        if e.to.is_empty() {
            return Some((
                i,
                "",
                format!("emergency allow {} must name what it admits (`to` with ports)", e.key()),
            ));
        }
        if let Some(bad) = rule_problems(std::slice::from_ref(&e.rule())).into_iter().next() {
            return Some((i, "from", format!("emergency allow {}: {bad}", e.key())));
        }
    }
    None
}

/// Warnings: likely mistakes that still load.
pub fn warnings(
    policies: &[Policy],
    allows: &[EmergencyAllow],
    root_namespace: &str,
    workloads: &[Workload],
    now: SystemTime,
) -> Vec<String> {
    let mut out = Vec::new();
    for p in policies {
        if !workloads.iter().any(|w| selects(root_namespace, &p.namespace, p.selector.as_ref(), w)) {
            out.push(format!(
                "policy {}: selects no workload this configuration knows (is the namespace or a label misspelt?)",
                p.key()
            ));
        }
        if p.selector.as_ref().is_some_and(|s| s.match_labels.is_empty()) {
            out.push(format!(
                "policy {}: an empty selector matches every workload of {}; omit `selector` if that is meant",
                p.key(),
                if p.namespace == root_namespace {
                    "the mesh".to_owned()
                } else {
                    format!("namespace {}", p.namespace)
                }
            ));
        }
        if p.action == Action::Allow && p.rules.is_empty() {
            out.push(format!(
                "policy {}: an ALLOW with no rules allows nothing: every caller of its workloads is denied",
                p.key()
            ));
        }
    }
    for d in policies.iter().filter(|p| p.action == Action::Deny && !p.dry_run) {
        for a in policies.iter().filter(|p| p.action == Action::Allow && !p.dry_run) {
            if !scopes_overlap(d, a, root_namespace) {
                continue;
            }
            for (ai, ar) in a.rules.iter().enumerate() {
                if let Some(di) = d.rules.iter().position(|dr| covers(dr, ar)) {
                    out.push(format!(
                        "policy {} rule {ai} (ALLOW) is shadowed by policy {} rule {di} (DENY): it can never allow anything",
                        a.key(),
                        d.key()
                    ));
                }
            }
        }
    }
    for e in allows {
        if e.expires <= now {
            out.push(format!("emergency allow {} has expired: it admits nothing", e.key()));
        } else if e.expires.duration_since(now).unwrap_or_default() > Duration::from_secs(7 * 86400) {
            out.push(format!("emergency allow {} lasts more than 7 days: write a policy instead", e.key()));
        }
    }
    out
}

fn scopes_overlap(a: &Policy, b: &Policy, root: &str) -> bool {
    let namespaces = a.namespace == b.namespace || a.namespace == root || b.namespace == root;
    namespaces && selectors_overlap(a.selector.as_ref(), b.selector.as_ref())
}

fn selectors_overlap(a: Option<&Selector>, b: Option<&Selector>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            a.match_labels.iter().all(|(k, v)| b.match_labels.get(k).is_none_or(|w| w == v))
        }
        _ => true,
    }
}

/// Whether DENY rule `d` matches everything ALLOW rule `a` matches
/// (conservative: only plain value lists are compared).
fn covers(d: &Rule, a: &Rule) -> bool {
    let from = d.from.is_empty()
        || (!a.from.is_empty() && a.from.iter().all(|af| d.from.iter().any(|df| source_covers(df, af))));
    let to = d.to.is_empty()
        || (!a.to.is_empty() && a.to.iter().all(|at| d.to.iter().any(|dt| operation_covers(dt, at))));
    from && to
}

fn values_cover(d: &[String], a: &[String]) -> bool {
    d.is_empty() || d.iter().any(|v| v == "*") || (!a.is_empty() && a.iter().all(|v| d.contains(v)))
}

fn source_covers(d: &From, a: &From) -> bool {
    let (d, a): (&Source, &Source) = (&d.source, &a.source);
    d.not_principals.is_empty()
        && d.not_namespaces.is_empty()
        && d.not_trust_domains.is_empty()
        && values_cover(&d.principals, &a.principals)
        && values_cover(&d.namespaces, &a.namespaces)
        && values_cover(&d.trust_domains, &a.trust_domains)
}

fn operation_covers(d: &To, a: &To) -> bool {
    let (d, a): (&Operation, &Operation) = (&d.operation, &a.operation);
    d.not_ports.is_empty() && values_cover(&d.ports, &a.ports)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    const HEAD: &str = "node: {name: n1}\nworkloads:\n  - {name: db, namespace: shop, node: n2, addresses: [198.19.1.12], labels: {app: db}}\n";

    fn load(policies: &str) -> Result<Config, String> {
        Config::parse(&format!("{HEAD}{policies}"), Path::new("node.yaml")).map_err(|e| e.to_string())
    }

    fn warnings(policies: &str) -> Vec<String> {
        load(policies).unwrap().warnings()
    }

    #[test]
    fn mistakes_that_cannot_be_meant_are_errors_naming_the_policy_and_line() {
        let cases = [
            (
                "policies:\n  - {name: a, namespace: shop, action: ALLOW, rules: [{frm: []}]}\n",
                "node.yaml:5:",
                "unknown field `frm`",
            ),
            (
                "policies:\n  - {name: a, namespace: shop, action: PERMIT}\n",
                "node.yaml:5:",
                "unknown variant `PERMIT`",
            ),
            (
                "policies:\n  - {name: a, namespace: shop, action: ALLOW, rules: [{to: [{operation: {ports: ['http']}}]}]}\n",
                "node.yaml:5:",
                "policy shop/a: rules[0].to[0].operation: `http` is not a port",
            ),
            (
                "policies:\n  - {name: deny-db, namespace: shop, action: DENY, rules: [{to: [{operation: {ports: ['05432']}}]}]}\n",
                "node.yaml:5:",
                "policy shop/deny-db: rules[0].to[0].operation: port `05432` never matches: write `5432`",
            ),
            (
                "policies:\n  - {name: deny-db, namespace: shop, action: DENY, rules: [{to: [{operation: {notPorts: ['+5432']}}]}]}\n",
                "node.yaml:5:",
                "port `+5432` never matches: write `5432`",
            ),
            (
                "policies:\n  - {name: a, namespace: shop, action: DENY, rules: [{from: [{source: {}}]}]}\n",
                "node.yaml:5:",
                "policy shop/a: rules[0].from[0].source is empty",
            ),
            (
                "policies:\n  - {name: a, namespace: shop, action: DENY, rules: [{to: [{operation: {}}]}]}\n",
                "node.yaml:5:",
                "policy shop/a: rules[0].to[0].operation is empty",
            ),
            (
                "policies:\n  - {name: a, namespace: shop, action: DENY, rules: [{from: [{source: {principals: ['spiffe://cluster.local/ns/shop/sa/web']}}]}]}\n",
                "node.yaml:5:",
                "principal `spiffe://cluster.local/ns/shop/sa/web` never matches: principals are written without `spiffe://`, as `cluster.local/ns/shop/sa/web`",
            ),
            (
                "emergency_allows:\n  - {name: e, namespace: shop, reason: incident, expires: '2030-01-01T00:00:00Z', to: [{operation: {ports: ['5432']}}]}\n",
                "node.yaml:5:",
                "emergency allow shop/e must name whom it admits",
            ),
            (
                "emergency_allows:\n  - {name: e, namespace: shop, reason: incident, expires: '2030-01-01T00:00:00Z', from: [{source: {namespaces: [ops]}}]}\n",
                "node.yaml:5:",
                "emergency allow shop/e must name what it admits",
            ),
            (
                "policies:\n  - {name: a, namespace: shop, action: ALLOW, rules: [{from: [{source: {principals: ['cluster.local/*/sa/web']}}]}]}\n",
                "node.yaml:5:",
                "policy shop/a: rules[0].from[0].source: principals value `cluster.local/*/sa/web`",
            ),
            (
                "policies:\n  - {name: a, namespace: shop, action: ALLOW}\n  - {name: a, namespace: shop, action: DENY}\n",
                "node.yaml:6:",
                "policy shop/a is defined twice",
            ),
            (
                "emergency_allows:\n  - {name: e, namespace: shop, reason: ' ', expires: '2030-01-01T00:00:00Z', from: [{source: {namespaces: [ops]}}], to: [{operation: {ports: ['1']}}]}\n",
                "node.yaml:5:",
                "emergency allow shop/e needs a reason",
            ),
            (
                "emergency_allows:\n  - {name: e, namespace: shop, reason: incident}\n",
                "node.yaml:5:",
                "missing field `expires`",
            ),
            (
                "emergency_allows:\n  - {name: e, namespace: shop, reason: incident, expires: tomorrow}\n",
                "node.yaml:5:",
                "`tomorrow` is not an RFC 3339 time",
            ),
        ];
        for (policies, at, want) in cases {
            let err = load(policies).unwrap_err();
            assert!(err.starts_with(at) && err.contains(want), "{policies}: `{err}` lacks `{at}`…`{want}`");
        }
    }

    #[test]
    fn likely_mistakes_are_warnings_naming_the_policy() {
        let w =
            warnings("policies:\n  - {name: a, namespace: shop, selector: {}, action: DENY, rules: [{}]}\n");
        assert!(
            w.iter().any(|w| w.contains("policy shop/a: an empty selector matches every workload")),
            "{w:?}"
        );
        let w = warnings("policies:\n  - {name: a, namespace: shop, action: ALLOW}\n");
        assert!(w.iter().any(|w| w.contains("an ALLOW with no rules allows nothing")), "{w:?}");
        let w = warnings("policies:\n  - {name: a, namespace: sohp, action: DENY, rules: [{}]}\n");
        assert!(w.iter().any(|w| w.contains("policy sohp/a: selects no workload")), "{w:?}");
        let w = warnings(
            "policies:\n  - {name: allow-web, namespace: shop, action: ALLOW, rules: [{from: [{source: {namespaces: [web]}}]}]}\n  - {name: deny-all, namespace: shop, action: DENY, rules: [{}]}\n",
        );
        assert!(
            w.iter().any(|w| w
                .contains("policy shop/allow-web rule 0 (ALLOW) is shadowed by policy shop/deny-all rule 0")),
            "{w:?}"
        );
        let w = warnings(
            "policies:\n  - {name: allow-web, namespace: shop, action: ALLOW, rules: [{from: [{source: {namespaces: [web]}}]}]}\n  - {name: deny-ops, namespace: shop, action: DENY, rules: [{from: [{source: {namespaces: [ops]}}]}]}\n",
        );
        assert!(w.is_empty(), "{w:?}");
        let w = warnings(
            "emergency_allows:\n  - {name: e, namespace: shop, reason: incident, expires: '2020-01-01T00:00:00Z', from: [{source: {namespaces: [ops]}}], to: [{operation: {ports: ['1']}}]}\n",
        );
        assert!(w.iter().any(|w| w.contains("emergency allow shop/e has expired")), "{w:?}");
    }
}
