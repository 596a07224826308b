//! The policy CRD `AuthorizationPolicy.security.ztunnel.dev/v1`: the L4
//! subset of Istio's `security.istio.io` AuthorizationPolicy, with the same
//! field names, so an existing policy reads the same.
//!
//! Istio's L7 fields (methods, paths, hosts, request principals, `when`) and
//! IP blocks are in the schema on purpose, marked unsupported: an API server
//! prunes fields its schema does not know, and a pruned `paths` would turn
//! an ALLOW for one path into an ALLOW for every connection. Kept, they reach
//! the tunnel, which fails such a policy closed (see [`convert`]).
//!
//! A policy that cannot be used as written fails CLOSED, never silently
//! dropped: an invalid DENY denies everything its selector covers, an invalid
//! ALLOW admits nothing (so its workloads admit only what other ALLOWs do).

use std::collections::BTreeMap;

use kube::{CustomResource, api::DynamicObject};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::model::{self, Action, Policy};

/// Istio's annotation for a policy that is evaluated and logged, never enforced.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// A canonical port number, 1-65535 without leading zeros (the CRD schema's
/// pattern; [`is_canonical_port`] is the same rule in Rust).
pub const PORT_PATTERN: &str =
    r"^([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";

/// L4 authorization for the workloads `selector` picks in the policy's
/// namespace (the root namespace, `ztunnel-system` by default, makes it
/// mesh-wide). Semantics are Istio's: a matching DENY denies; a workload with
/// no ALLOW policy is allowed; otherwise only a matching ALLOW allows. The
/// annotation `istio.io/dry-run: "true"` makes a policy log-only.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "security.ztunnel.dev",
    version = "v1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    namespaced,
    category = "ztunnel",
    derive = "PartialEq",
    derive = "Default",
    doc = "L4 authorization policy for ztunnel workloads (the L4 subset of Istio's AuthorizationPolicy).",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The workloads of the policy's namespace it applies to. Absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// ALLOW (Istio's default when omitted) or DENY.
    #[serde(default)]
    pub action: PolicyAction,
    /// A connection matches the policy when it matches any rule. No rules: an
    /// ALLOW admits nothing, a DENY denies nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<PolicyRule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Pod labels that must all match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum PolicyAction {
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

/// Matches when one of `from` and one of `to` match (an absent list matches
/// anything).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<RuleFrom>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<RuleTo>>,
    /// Not supported (L7 conditions): a policy that sets it fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Vec<Condition>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleFrom {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleTo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

/// The caller. Fields set must all match; a field matches when any value
/// does (`not` fields: when none does). Values are exact, `prefix*`,
/// `*suffix` or `*`. Principals are `<trust-domain>/ns/<namespace>/sa/<sa>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principals: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_principals: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_namespaces: Option<Vec<String>>,
    /// Not supported (L7): a policy that sets it fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_principals: Option<Vec<String>>,
    /// Not supported (L7): a policy that sets it fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_request_principals: Option<Vec<String>>,
    /// Not supported: a policy that sets it fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_blocks: Option<Vec<String>>,
    /// Not supported: a policy that sets it fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ip_blocks: Option<Vec<String>>,
    /// Not supported: a policy that sets it fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_ip_blocks: Option<Vec<String>>,
    /// Not supported: a policy that sets it fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_remote_ip_blocks: Option<Vec<String>>,
}

/// The callee's side of the connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    /// Destination ports, as strings of port numbers (Istio's form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(regex(pattern = PORT_PATTERN)))]
    pub ports: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(regex(pattern = PORT_PATTERN)))]
    pub not_ports: Option<Vec<String>>,
    /// Not supported (L7): a policy that sets it fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// Not supported (L7): a policy that sets it fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_hosts: Option<Vec<String>>,
    /// Not supported (L7): a policy that sets it fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Not supported (L7): a policy that sets it fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_methods: Option<Vec<String>>,
    /// Not supported (L7): a policy that sets it fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    /// Not supported (L7): a policy that sets it fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_paths: Option<Vec<String>>,
}

/// Istio's `when` condition (not supported: a policy that has one fails closed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_values: Option<Vec<String>>,
}

/// Whether `s` is a port number as Istio writes it: 1-65535, no sign, no
/// leading zero.
pub fn is_canonical_port(s: &str) -> bool {
    !s.starts_with('0')
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && s.parse::<u16>().is_ok_and(|p| p > 0)
}

/// The first lines of `ztunnel crd`'s output (and so of the committed file).
pub const CRD_HEADER: &str = "\
# GENERATED by `ztunnel crd` from the Rust type (ztunnel/src/k8s/crd.rs): never edit by hand.
# Regenerate: ztunnel crd > deploy/kubernetes/base/crd-authorizationpolicies.yaml
";

/// The CRD, as `kubectl apply` takes it.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    use kube::CustomResourceExt as _;
    Ok(format!("{CRD_HEADER}{}", serde_yaml_ng::to_string(&AuthorizationPolicy::crd())?))
}

/// Why a policy object is not used as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    /// The field at fault (`spec.rules[0].to[0].operation.ports[0]`), when known.
    pub field: String,
    pub message: String,
    /// Short, fixed, for a metric label: `unreadable`, `invalid`,
    /// `unsupported_field`, `invalid_annotation`.
    pub reason: &'static str,
}

impl std::fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// A policy object turned into the tunnel's model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    /// The policy in force: as written, or its fail-closed stand-in.
    pub policy: Policy,
    /// Whether `policy` is the fail-closed stand-in.
    pub failed_closed: bool,
    /// What was wrong (empty: nothing). A bad dry-run annotation is a problem
    /// but not a failure: the policy is then enforced.
    pub problems: Vec<PolicyProblem>,
}

/// Converts a typed policy object.
pub fn convert(obj: &AuthorizationPolicy) -> Converted {
    let meta = &obj.metadata;
    let (dry_run, annotation_problem) = dry_run(meta.annotations.as_ref());
    let head = Head {
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        dry_run,
    };
    finish(head, Ok(&obj.spec), annotation_problem)
}

/// Converts a policy object as the API server sent it, however malformed:
/// the watcher reads policies untyped, so that one object the type cannot
/// read fails closed on its own instead of failing every list.
pub fn convert_dynamic(obj: &DynamicObject) -> Converted {
    let meta = &obj.metadata;
    let (dry_run, annotation_problem) = dry_run(meta.annotations.as_ref());
    let head = Head {
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        dry_run,
    };
    let raw = obj.data.get("spec").cloned().unwrap_or(serde_json::Value::Object(Default::default()));
    match serde_json::from_value::<AuthorizationPolicySpec>(raw.clone()) {
        Ok(spec) => finish(head, Ok(&spec), annotation_problem),
        Err(e) => finish(head, Err((&raw, e.to_string())), annotation_problem),
    }
}

struct Head {
    name: String,
    namespace: String,
    dry_run: bool,
}

fn dry_run(annotations: Option<&BTreeMap<String, String>>) -> (bool, Option<PolicyProblem>) {
    match annotations.and_then(|a| a.get(DRY_RUN_ANNOTATION)).map(|v| v.as_str()) {
        None => (false, None),
        // Go's strconv.ParseBool, as Istio reads it.
        Some("true" | "True" | "TRUE" | "t" | "T" | "1") => (true, None),
        Some("false" | "False" | "FALSE" | "f" | "F" | "0") => (false, None),
        Some(other) => (
            false,
            Some(PolicyProblem {
                field: format!("metadata.annotations[{DRY_RUN_ANNOTATION}]"),
                message: format!("`{other}` is not a boolean; the policy is enforced"),
                reason: "invalid_annotation",
            }),
        ),
    }
}

fn finish(
    head: Head,
    spec: Result<&AuthorizationPolicySpec, (&serde_json::Value, String)>,
    annotation_problem: Option<PolicyProblem>,
) -> Converted {
    let mut problems: Vec<PolicyProblem> = annotation_problem.into_iter().collect();
    let (action, selector, failure) = match spec {
        Ok(spec) => {
            let action = match spec.action {
                PolicyAction::Deny => Action::Deny,
                PolicyAction::Allow => Action::Allow,
            };
            let selector = spec
                .selector
                .as_ref()
                .map(|s| model::Selector { match_labels: s.match_labels.clone().unwrap_or_default() });
            match to_model(&head, spec, action, selector.clone()) {
                Ok(policy) => return Converted { policy, failed_closed: false, problems },
                Err(problem) => (Some(action), selector, problem),
            }
        }
        Err((raw, message)) => {
            let (action, selector) = salvage(raw);
            (action, selector, PolicyProblem { field: "spec".into(), message, reason: "unreadable" })
        }
    };
    problems.push(failure);
    Converted { policy: fail_closed(&head, action, selector), failed_closed: true, problems }
}

/// What can still be read of a spec the type cannot read: its action
/// (None: unreadable) and selector (None: unreadable or absent, which covers
/// the whole namespace, the side a failure must err on).
fn salvage(raw: &serde_json::Value) -> (Option<Action>, Option<model::Selector>) {
    let action = match raw.get("action") {
        None | Some(serde_json::Value::Null) => Some(Action::Allow),
        Some(serde_json::Value::String(s)) if s == "ALLOW" => Some(Action::Allow),
        Some(serde_json::Value::String(s)) if s == "DENY" => Some(Action::Deny),
        Some(_) => None,
    };
    let selector = raw
        .get("selector")
        .and_then(|s| s.get("matchLabels"))
        .and_then(|m| serde_json::from_value::<BTreeMap<String, String>>(m.clone()).ok())
        .map(|match_labels| model::Selector { match_labels });
    (action, selector)
}

/// The stand-in for a policy that cannot be used as written. A DENY (or a
/// policy whose action cannot be read) denies every caller of what it
/// selects; an ALLOW admits nothing. A dry-run policy stays dry-run: its
/// author asked for it never to be enforced.
fn fail_closed(head: &Head, action: Option<Action>, selector: Option<model::Selector>) -> Policy {
    let (action, rules) = match action {
        Some(Action::Allow) => (Action::Allow, Vec::new()),
        Some(Action::Deny) | None => (Action::Deny, vec![model::Rule::default()]),
    };
    Policy {
        name: head.name.clone(),
        namespace: head.namespace.clone(),
        selector,
        action,
        dry_run: head.dry_run,
        rules,
    }
}

fn to_model(
    head: &Head,
    spec: &AuthorizationPolicySpec,
    action: Action,
    selector: Option<model::Selector>,
) -> Result<Policy, PolicyProblem> {
    let unsupported = |field: String, what: &str| PolicyProblem {
        field,
        message: format!("{what} is not supported by ztunnel (L4 only); the policy fails closed"),
        reason: "unsupported_field",
    };
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{i}]");
        if rule.when.as_ref().is_some_and(|w| !w.is_empty()) {
            return Err(unsupported(format!("{at}.when"), "`when`"));
        }
        let mut from = Vec::new();
        for (j, f) in rule.from.iter().flatten().enumerate() {
            let s = f.source.clone().unwrap_or_default();
            let at = format!("{at}.from[{j}].source");
            let unsupported_fields = [
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ];
            if let Some((field, _)) =
                unsupported_fields.iter().find(|(_, v)| v.as_ref().is_some_and(|v| !v.is_empty()))
            {
                return Err(unsupported(format!("{at}.{field}"), &format!("`{field}`")));
            }
            from.push(model::From {
                source: model::Source {
                    principals: s.principals.unwrap_or_default(),
                    not_principals: s.not_principals.unwrap_or_default(),
                    namespaces: s.namespaces.unwrap_or_default(),
                    not_namespaces: s.not_namespaces.unwrap_or_default(),
                    trust_domains: Vec::new(),
                    not_trust_domains: Vec::new(),
                },
            });
        }
        let mut to = Vec::new();
        for (j, t) in rule.to.iter().flatten().enumerate() {
            let o = t.operation.clone().unwrap_or_default();
            let at = format!("{at}.to[{j}].operation");
            let unsupported_fields = [
                ("hosts", &o.hosts),
                ("notHosts", &o.not_hosts),
                ("methods", &o.methods),
                ("notMethods", &o.not_methods),
                ("paths", &o.paths),
                ("notPaths", &o.not_paths),
            ];
            if let Some((field, _)) =
                unsupported_fields.iter().find(|(_, v)| v.as_ref().is_some_and(|v| !v.is_empty()))
            {
                return Err(unsupported(format!("{at}.{field}"), &format!("`{field}`")));
            }
            for (field, ports) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
                if let Some((k, bad)) =
                    ports.iter().flatten().enumerate().find(|(_, p)| !is_canonical_port(p))
                {
                    return Err(PolicyProblem {
                        field: format!("{at}.{field}[{k}]"),
                        message: format!("`{bad}` is not a port number (1-65535, no leading zero)"),
                        reason: "invalid",
                    });
                }
            }
            to.push(model::To {
                operation: model::Operation {
                    ports: o.ports.unwrap_or_default(),
                    not_ports: o.not_ports.unwrap_or_default(),
                },
            });
        }
        rules.push(model::Rule { from, to });
    }
    let policy = Policy {
        name: head.name.clone(),
        namespace: head.namespace.clone(),
        selector,
        action,
        dry_run: head.dry_run,
        rules,
    };
    if let Some((_, field, message)) = crate::policy::validate::policy_errors(std::slice::from_ref(&policy)) {
        let (field, message) = locate_rule_problem(field, &policy.key(), message);
        return Err(PolicyProblem { field, message, reason: "invalid" });
    }
    Ok(policy)
}

/// The policy checks say `policy ns/name: rules[0].to[0].operation: ...`;
/// an object's problem names its field (`spec.rules[0].to[0].operation`).
fn locate_rule_problem(field: &str, key: &str, message: String) -> (String, String) {
    if field != "rules" {
        return ("metadata".into(), message);
    }
    let rest = message.strip_prefix(&format!("policy {key}: ")).unwrap_or(&message);
    let place_end = rest.find([':', ' ']).unwrap_or(0);
    let (place, tail) = rest.split_at(place_end);
    if place.starts_with("rules[") {
        let tail = tail.strip_prefix(": ").unwrap_or(tail.trim_start());
        (format!("spec.{place}"), tail.to_owned())
    } else {
        ("spec.rules".into(), rest.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use kube::core::ObjectMeta;

    use super::*;

    fn object(name: &str, yaml_spec: &str) -> AuthorizationPolicy {
        AuthorizationPolicy {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: serde_yaml_ng::from_str(yaml_spec).unwrap(),
        }
    }

    fn dynamic(name: &str, spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "security.ztunnel.dev/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn a_policy_reads_as_the_file_model_does() {
        let c = convert(&object(
            "db-from-web",
            "selector: {matchLabels: {app: db}}\naction: ALLOW\nrules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/web], notNamespaces: [dev]}}]\n    to: [{operation: {ports: ['5432'], notPorts: ['9090']}}]\n",
        ));
        assert!(!c.failed_closed && c.problems.is_empty(), "{c:?}");
        let want: Policy = serde_yaml_ng::from_str(
            "name: db-from-web\nnamespace: shop\nselector: {matchLabels: {app: db}}\naction: ALLOW\nrules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/web], notNamespaces: [dev]}}]\n    to: [{operation: {ports: ['5432'], notPorts: ['9090']}}]\n",
        )
        .unwrap();
        assert_eq!(c.policy, want);
    }

    #[test]
    fn action_defaults_to_allow_as_in_istio() {
        let c = convert(&object("p", "rules: [{}]\n"));
        assert_eq!(c.policy.action, Action::Allow);
        assert_eq!(c.policy.selector, None);
        assert_eq!(c.policy.rules, vec![model::Rule::default()]);
    }

    #[test]
    fn dry_run_comes_from_istios_annotation() {
        let mut o = object("p", "action: DENY\nrules: [{}]\n");
        o.metadata.annotations = Some([(DRY_RUN_ANNOTATION.to_owned(), "true".to_owned())].into());
        let c = convert(&o);
        assert!(c.policy.dry_run && c.problems.is_empty());
        o.metadata.annotations = Some([(DRY_RUN_ANNOTATION.to_owned(), "maybe".to_owned())].into());
        let c = convert(&o);
        assert!(!c.policy.dry_run, "an unreadable dry-run is enforced");
        assert!(!c.failed_closed);
        assert_eq!(c.problems[0].reason, "invalid_annotation");
    }

    #[test]
    fn an_invalid_deny_denies_everything_its_selector_covers() {
        let c = convert(&object(
            "no-dev",
            "selector: {matchLabels: {app: db}}\naction: DENY\nrules: [{from: [{source: {principals: ['a/*/b']}}]}]\n",
        ));
        assert!(c.failed_closed);
        assert_eq!(c.policy.action, Action::Deny);
        assert_eq!(c.policy.rules, vec![model::Rule::default()], "one empty rule matches every connection");
        assert_eq!(c.policy.selector.unwrap().match_labels.get("app").map(String::as_str), Some("db"));
        assert!(c.problems[0].message.starts_with("principals value `a/*/b`"), "{:?}", c.problems);
        assert_eq!(c.problems[0].field, "spec.rules[0].from[0].source");
    }

    #[test]
    fn an_invalid_allow_admits_nothing() {
        let c = convert(&object("web", "action: ALLOW\nrules: [{to: [{operation: {ports: ['08080']}}]}]\n"));
        assert!(c.failed_closed);
        assert_eq!(c.policy.action, Action::Allow);
        assert!(c.policy.rules.is_empty(), "an ALLOW with no rules admits nothing");
        assert_eq!(c.problems[0].field, "spec.rules[0].to[0].operation.ports[0]");
    }

    #[test]
    fn an_empty_source_is_an_error_as_in_istio() {
        let c = convert(&object("p", "action: DENY\nrules: [{from: [{source: {}}]}]\n"));
        assert!(c.failed_closed);
        assert_eq!(c.problems[0].field, "spec.rules[0].from[0].source");
        assert!(c.problems[0].message.starts_with("is empty"), "{:?}", c.problems);
    }

    #[test]
    fn istio_l7_fields_fail_closed() {
        for (spec, field) in [
            (
                "action: ALLOW\nrules: [{to: [{operation: {paths: [/admin]}}]}]\n",
                "spec.rules[0].to[0].operation.paths",
            ),
            (
                "action: ALLOW\nrules: [{when: [{key: 'request.headers[x]', values: [y]}]}]\n",
                "spec.rules[0].when",
            ),
            (
                "action: DENY\nrules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]\n",
                "spec.rules[0].from[0].source.ipBlocks",
            ),
        ] {
            let c = convert(&object("p", spec));
            assert!(c.failed_closed, "{spec}");
            assert_eq!(c.problems[0].field, field);
            assert_eq!(c.problems[0].reason, "unsupported_field");
        }
    }

    #[test]
    fn an_unreadable_object_fails_closed_with_what_can_be_read() {
        let deny = convert_dynamic(&dynamic(
            "d",
            serde_json::json!({"action": "DENY", "selector": {"matchLabels": {"app": "db"}}, "rules": [{"frm": []}]}),
        ));
        assert!(deny.failed_closed);
        assert_eq!(deny.problems[0].reason, "unreadable");
        assert!(deny.problems[0].message.contains("unknown field `frm`"), "{:?}", deny.problems);
        assert_eq!((deny.policy.action, deny.policy.rules.len()), (Action::Deny, 1));
        assert!(deny.policy.selector.is_some());

        let allow = convert_dynamic(&dynamic("a", serde_json::json!({"rules": "all"})));
        assert_eq!((allow.policy.action, allow.policy.rules.len()), (Action::Allow, 0));

        let unknown = convert_dynamic(&dynamic("u", serde_json::json!({"action": "AUDIT", "selector": 7})));
        assert_eq!(
            (unknown.policy.action, unknown.policy.rules.len()),
            (Action::Deny, 1),
            "unknown action: deny"
        );
        assert_eq!(unknown.policy.selector, None, "unreadable selector: the whole namespace");

        let fine = convert_dynamic(&dynamic("f", serde_json::json!({"action": "DENY", "rules": [{}]})));
        assert!(!fine.failed_closed && fine.problems.is_empty());
    }

    #[test]
    fn the_port_pattern_is_the_canonical_port_rule() {
        let re = regex::Regex::new(PORT_PATTERN).unwrap();
        for p in 0..=70000u32 {
            let s = p.to_string();
            assert_eq!(re.is_match(&s), is_canonical_port(&s), "{s}");
        }
        for s in ["", "0", "00", "080", "+80", "-1", " 80", "80 ", "*", "1e3", "655350", "99999"] {
            assert!(!is_canonical_port(s) && !re.is_match(s), "{s:?}");
        }
    }

    #[test]
    fn the_crd_schema_comes_from_the_type() {
        let yaml = crd_yaml().unwrap();
        let crd: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(crd["metadata"]["name"], "authorizationpolicies.security.ztunnel.dev");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1");
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["properties"]["action"]["enum"], serde_json::json!(["ALLOW", "DENY"]));
        assert_eq!(spec["properties"]["action"]["default"], "ALLOW", "Istio's default, shown by kubectl");
        let operation =
            &spec["properties"]["rules"]["items"]["properties"]["to"]["items"]["properties"]["operation"];
        assert_eq!(operation["properties"]["ports"]["items"]["pattern"], PORT_PATTERN, "{operation:#}");
        assert_eq!(operation["properties"]["notPorts"]["items"]["pattern"], PORT_PATTERN);
        // Structural schemas may not say additionalProperties next to properties.
        assert!(!yaml.contains("additionalProperties: false"), "{yaml}");
    }

    /// deploy/ commits `ztunnel crd`'s output; it must never drift from the
    /// type (tests/tests/deploy.rs also compares it byte for byte with the
    /// binary's output).
    #[test]
    fn the_committed_crd_is_the_generated_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/kubernetes/base/crd-authorizationpolicies.yaml");
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (it is committed)", path.display()));
        let generated = crd_yaml().unwrap();
        assert!(generated.starts_with(CRD_HEADER));
        let committed: serde_yaml_ng::Value = serde_yaml_ng::from_str(&committed).unwrap();
        let generated: serde_yaml_ng::Value = serde_yaml_ng::from_str(&generated).unwrap();
        assert!(
            committed == generated,
            "{} differs from the CRD the type generates: run `ztunnel crd > deploy/kubernetes/base/crd-authorizationpolicies.yaml`",
            path.display()
        );
    }
}
