//! Authorization policy as configured: the L4 subset of Istio's
//! AuthorizationPolicy (same field names, so an existing policy reads the
//! same), plus emergency allows.
//!
//! ```yaml
//! policies:
//!   - name: db-from-web
//!     namespace: shop              # the root namespace makes it mesh-wide
//!     selector: {matchLabels: {app: db}}
//!     action: ALLOW                # or DENY
//!     dryRun: false                # Istio's istio.io/dry-run annotation
//!     rules:
//!       - from:
//!           - source: {principals: ["cluster.local/ns/shop/sa/web"]}
//!         to:
//!           - operation: {ports: ["5432"]}
//! emergency_allows:
//!   - name: inc-4711
//!     reason: "payments cannot reach db, see INC-4711"
//!     expires: 2026-11-22T18:00:00Z
//!     namespace: shop
//!     selector: {matchLabels: {app: db}}
//!     from: [{source: {namespaces: ["payments"]}}]
//! ```

use std::{collections::BTreeMap, time::SystemTime};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
}

/// One policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Policy {
    pub name: String,
    /// Workloads of this namespace are selected; the root namespace
    /// (`authorization.root_namespace`) makes the policy mesh-wide.
    pub namespace: String,
    /// Absent: every workload of the namespace (or of the mesh).
    #[serde(default)]
    pub selector: Option<Selector>,
    pub action: Action,
    /// Evaluated and logged, never enforced.
    #[serde(default)]
    pub dry_run: bool,
    /// An ALLOW with no rules allows nothing; `[{}]` allows everything.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl Policy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A rule matches when one of its `from` entries and one of its `to`
/// entries match (an absent list matches anything).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    #[serde(default)]
    pub source: Source,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    #[serde(default)]
    pub operation: Operation,
}

/// Every field set must match (AND); a field matches when any of its values
/// does (OR); a `not` field matches when none of its values does.
/// Principals are `<trust-domain>/ns/<namespace>/sa/<service-account>`, as
/// in Istio. Values may be exact, `prefix*`, `*suffix` or `*`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Not in Istio: the caller's trust domain.
    #[serde(default)]
    pub trust_domains: Vec<String>,
    #[serde(default)]
    pub not_trust_domains: Vec<String>,
}

impl Source {
    pub fn is_empty(&self) -> bool {
        *self == Source::default()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    /// Destination ports as strings (Istio's form); `*` is any.
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
}

impl Operation {
    pub fn is_empty(&self) -> bool {
        *self == Operation::default()
    }
}

/// A time-bounded, logged exception: admits what no ALLOW policy admits
/// (it never overrides a DENY policy), until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmergencyAllow {
    pub name: String,
    /// Why, for the audit trail. Mandatory.
    pub reason: String,
    /// RFC 3339; the allow lapses on its own then. Mandatory.
    #[serde(with = "rfc3339")]
    pub expires: SystemTime,
    pub namespace: String,
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
}

impl EmergencyAllow {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn rule(&self) -> Rule {
        Rule { from: self.from.clone(), to: self.to.clone() }
    }
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_seconds(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        struct Rfc3339(SystemTime);
        impl std::str::FromStr for Rfc3339 {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                humantime::parse_rfc3339_weak(s)
                    .map(Rfc3339)
                    .map_err(|e| format!("`{s}` is not an RFC 3339 time (2026-11-22T18:00:00Z): {e}"))
            }
        }
        crate::config::from_str::<D, Rfc3339>(d).map(|r| r.0)
    }
}
