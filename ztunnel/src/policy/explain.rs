//! Decisions as the data path makes them, for one connection or for the
//! whole mesh: what `ztunnel policy check` and `ztunnel policy matrix` print,
//! and what open connections are re-decided against when policy changes.

use std::{collections::BTreeSet, time::SystemTime};

use super::Decision;
use crate::{
    config::{Config, MtlsMode, WorkloadConfig},
    identity::spiffe::SpiffeId,
    workload::Workload,
};

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("no workload `{0}` in the configuration")]
    NoWorkload(String),
    #[error("`{0}` names several workloads: say namespace/name")]
    Ambiguous(String),
    #[error("workload {0}: {1}")]
    BadWorkload(String, crate::identity::spiffe::SpiffeError),
}

/// The decision for `caller` (None: plaintext) reaching `dst` (configured as
/// `wc`) on `port`: a strict workload refuses plaintext before any policy;
/// then policy decides, in the mode of the workload (or its namespace).
pub fn decide(
    config: &Config,
    wc: &WorkloadConfig,
    dst: &Workload,
    caller: Option<&SpiffeId>,
    port: u16,
    now: SystemTime,
) -> Decision {
    if caller.is_none() && config.mtls_mode(wc) == MtlsMode::Strict {
        return Decision::plaintext_refused();
    }
    config.policy_set().evaluate(caller, dst, port, config.authorization_modes(wc), now)
}

/// A workload by `name` or `namespace/name`.
pub fn find_workload<'a>(config: &'a Config, name: &str) -> Result<&'a WorkloadConfig, ExplainError> {
    let found: Vec<&WorkloadConfig> = config
        .workloads
        .iter()
        .filter(|w| w.to_string() == name || (!name.contains('/') && w.name == name))
        .collect();
    match found.as_slice() {
        [w] => Ok(w),
        [] => Err(ExplainError::NoWorkload(name.to_owned())),
        _ => Err(ExplainError::Ambiguous(name.to_owned())),
    }
}

/// One column of the matrix: a workload at a port (`None`: any port no
/// policy and no `ports` entry names).
#[derive(Debug, Clone)]
pub struct Column {
    pub workload: Workload,
    pub config: WorkloadConfig,
    pub port: Option<u16>,
}

impl Column {
    pub fn name(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.workload.key()),
            None => format!("{}:*", self.workload.key()),
        }
    }
}

/// Who may call what: every caller identity the configuration knows (its
/// workloads', and the exact principals its policies name), and plaintext,
/// against every workload at every port it serves or a policy names.
#[derive(Debug)]
pub struct Matrix {
    /// None is the plaintext caller.
    pub callers: Vec<Option<SpiffeId>>,
    pub columns: Vec<Column>,
    /// `cells[caller][column]`.
    pub cells: Vec<Vec<Decision>>,
}

pub fn caller_name(caller: &Option<SpiffeId>) -> String {
    caller.as_ref().map_or_else(|| "plaintext".to_owned(), ToString::to_string)
}

/// Port 0 is never dialled: it stands for "a port nothing names".
const ANY_OTHER_PORT: u16 = 0;

impl Matrix {
    pub fn build(config: &Config, now: SystemTime) -> Result<Self, ExplainError> {
        let policies = config.policy_set();
        let mut identities: BTreeSet<SpiffeId> = BTreeSet::new();
        for w in &config.workloads {
            identities.insert(
                w.spiffe_id(&config.trust_domain).map_err(|e| ExplainError::BadWorkload(w.to_string(), e))?,
            );
        }
        for p in &config.policies {
            for r in &p.rules {
                for f in &r.from {
                    identities.extend(f.source.principals.iter().filter_map(|p| principal_id(p)));
                }
            }
        }
        let callers: Vec<Option<SpiffeId>> =
            std::iter::once(None).chain(identities.into_iter().map(Some)).collect();

        let mut columns = Vec::new();
        for wc in &config.workloads {
            let workload = Workload::from_config(config, wc)
                .map_err(|e| ExplainError::BadWorkload(wc.to_string(), e))?;
            let mut ports: BTreeSet<u16> = wc.ports.iter().copied().collect();
            for p in config
                .policies
                .iter()
                .filter(|p| policies.selects(&p.namespace, p.selector.as_ref(), &workload))
            {
                for r in &p.rules {
                    for t in &r.to {
                        ports.extend(
                            t.operation
                                .ports
                                .iter()
                                .chain(&t.operation.not_ports)
                                .filter_map(|p| p.parse::<u16>().ok()),
                        );
                    }
                }
            }
            for port in ports.into_iter().map(Some).chain([None]) {
                columns.push(Column { workload: workload.clone(), config: wc.clone(), port });
            }
        }
        let cells = callers
            .iter()
            .map(|caller| {
                columns
                    .iter()
                    .map(|c| {
                        decide(
                            config,
                            &c.config,
                            &c.workload,
                            caller.as_ref(),
                            c.port.unwrap_or(ANY_OTHER_PORT),
                            now,
                        )
                    })
                    .collect()
            })
            .collect();
        Ok(Self { callers, columns, cells })
    }
}

/// An exact Istio principal (`td/ns/x/sa/y`) as a SPIFFE ID.
fn principal_id(p: &str) -> Option<SpiffeId> {
    if p.contains('*') {
        return None;
    }
    format!("spiffe://{p}").parse().ok()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::Verdict;

    const CONFIG: &str = "\
node: {name: n1}
namespaces:
  shop: {mtls: strict}
policies:
  - name: db-from-web
    namespace: shop
    selector: {matchLabels: {app: db}}
    action: ALLOW
    rules:
      - from: [{source: {principals: [cluster.local/ns/shop/sa/web, cluster.local/ns/pay/sa/api]}}]
        to: [{operation: {ports: ['5432']}}]
workloads:
  - {name: web, namespace: shop, service_account: web, node: n2, addresses: [198.19.1.11]}
  - {name: db, namespace: shop, service_account: db, node: n2, addresses: [198.19.1.12], labels: {app: db}}
";

    fn config() -> Config {
        Config::parse(CONFIG, Path::new("node.yaml")).unwrap()
    }

    #[test]
    fn the_matrix_covers_named_principals_ports_and_plaintext() {
        let m = Matrix::build(&config(), SystemTime::now()).unwrap();
        let callers: Vec<String> = m.callers.iter().map(caller_name).collect();
        assert_eq!(
            callers,
            [
                "plaintext",
                "spiffe://cluster.local/ns/pay/sa/api",
                "spiffe://cluster.local/ns/shop/sa/db",
                "spiffe://cluster.local/ns/shop/sa/web"
            ]
        );
        let columns: Vec<String> = m.columns.iter().map(Column::name).collect();
        assert_eq!(columns, ["shop/web:*", "shop/db:5432", "shop/db:*"]);
        let verdict = |caller: usize, column: usize| m.cells[caller][column].verdict;
        assert_eq!(verdict(3, 1), Verdict::Allow, "web -> db:5432");
        assert_eq!(verdict(1, 1), Verdict::Allow, "a principal only a policy names");
        assert_eq!(verdict(3, 2), Verdict::Deny, "web -> db on another port");
        assert_eq!(verdict(2, 1), Verdict::Deny, "db -> db:5432");
        assert_eq!(m.cells[0][1].reason, "plaintext_refused", "strict namespace");
        assert_eq!(verdict(2, 0), Verdict::Allow, "no policy selects web");
    }

    #[test]
    fn workloads_are_found_by_name_or_namespace_and_name() {
        let c = config();
        assert_eq!(find_workload(&c, "db").unwrap().name, "db");
        assert_eq!(find_workload(&c, "shop/web").unwrap().name, "web");
        assert!(matches!(find_workload(&c, "pay/web"), Err(ExplainError::NoWorkload(_))));
    }
}
