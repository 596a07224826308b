//! Gathers an explanation from the tunnel's state of now.

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::{
    Caller, ExplainError, Query,
    model::{
        Destination, Explanation, FailureView, Failures, PolicyView, QueryView, RootView, ServiceView,
        Source, Trust, WorkloadView,
    },
    verdict,
};
use crate::{
    config::{MtlsMode, Passthrough, WorkloadConfig},
    enrollment::WorkloadStatus,
    failures::{self, FailureRing, Pair},
    identity::manager::CertsView,
    policy::explain::{decide, find_workload},
    state::State,
    tls::verify::TrustBundle,
    workload::{Workload, canonical},
};

/// Failures younger than this count against a call: long enough to cover
/// "it failed a moment ago", short enough that a fixed problem clears.
pub const RECENT_SECONDS: u64 = 300;

/// The most failures one answer lists.
const LISTED: usize = 20;

/// What the tunnel knows now.
pub struct Inputs<'a> {
    pub state: &'a State,
    pub certs: &'a CertsView,
    pub bundle: &'a TrustBundle,
    /// Enrollment of this node's workloads (`/config_dump`'s `workloads`).
    pub enrollment: &'a [WorkloadStatus],
    pub failures: &'a FailureRing,
    pub now: SystemTime,
}

/// A workload of the mesh with its configuration.
struct Found {
    workload: Arc<Workload>,
    config: Option<WorkloadConfig>,
}

pub fn explain(inputs: &Inputs<'_>, query: &Query) -> Result<Explanation, ExplainError> {
    let state = inputs.state;
    let config = &state.config;
    let source = match &query.from {
        Caller::Workload(name) => {
            let wc = find_workload(config, name)?;
            let workload = Workload::from_config(config, wc)
                .map_err(|e| crate::policy::explain::ExplainError::BadWorkload(wc.to_string(), e))?;
            Some(Found { workload: Arc::new(workload), config: Some(wc.clone()) })
        }
        Caller::Address(ip) => {
            let there = state.registry.at(*ip);
            match there {
                [] => None,
                [first, rest @ ..] => {
                    if rest.iter().any(|w| w.identity != first.identity) {
                        let names: Vec<String> = there.iter().map(|w| w.key()).collect();
                        return Err(ExplainError::AmbiguousAddress { ip: *ip, names: names.join(", ") });
                    }
                    Some(found(config, first.clone()))
                }
            }
        }
    };

    // Where the call goes: a Service leads to one of its ready endpoints.
    let service = state.registry.service(query.to);
    let target: Option<SocketAddr> = match service {
        Some(s) => s.endpoints.first().copied(),
        None => Some(query.to),
    };
    let dest = target.and_then(|t| state.registry.find(t)).map(|w| found(config, w.clone()));

    let source_view = Source {
        kind: if source.is_some() { "workload" } else { "outside_mesh" }.to_owned(),
        address: match &query.from {
            Caller::Address(ip) => Some(ip.to_string()),
            Caller::Workload(_) => None,
        },
        workload: source.as_ref().map(|s| workload_view(inputs, s)),
    };
    let destination = Destination {
        address: query.to.to_string(),
        kind: match (service, &dest) {
            (Some(_), _) => "service",
            (None, Some(_)) => "workload",
            (None, None) => "outside_mesh",
        }
        .to_owned(),
        service: service.map(|s| ServiceView {
            name: s.service.clone(),
            ready_endpoints: s.endpoints.iter().map(ToString::to_string).collect(),
        }),
        workload: dest.as_ref().map(|d| workload_view(inputs, d)),
        expected_identity: dest.as_ref().map(|d| d.workload.identity.to_string()),
    };

    let policy = match (&dest, target) {
        (Some(Found { workload, config: Some(wc) }), Some(t)) => {
            let caller = source.as_ref().map(|s| &s.workload.identity);
            let d = decide(config, wc, workload, caller, t.port(), inputs.now);
            Some(PolicyView {
                caller: caller.map_or_else(|| "plaintext".to_owned(), ToString::to_string),
                port: t.port(),
                decision: d.verdict.as_str().to_owned(),
                reason: d.reason.to_owned(),
                policy: d.policy,
                rule: d.rule,
                note: d.note,
                dry_run: d.dry_run,
                decided_here: is_local(state, workload),
            })
        }
        _ => None,
    };

    let pair = Pair {
        source_workload: source.as_ref().map(|s| s.workload.key()),
        source_identity: source.as_ref().map(|s| s.workload.identity.to_string()),
        source_addresses: match (&source, &query.from) {
            (Some(s), _) => s.workload.addresses.iter().map(|a| canonical(*a)).collect(),
            (None, Caller::Address(ip)) => vec![*ip],
            (None, Caller::Workload(_)) => Vec::new(),
        },
        destination: Some(query.to),
        endpoints: service.map(|s| s.endpoints.clone()).unwrap_or_default(),
        destination_service: service.map(|s| s.service.clone()),
    };
    let matching = inputs
        .failures
        .matching(&pair, LISTED)
        .into_iter()
        .map(|record| {
            let age_seconds = failures::age_seconds(&record.time, inputs.now).unwrap_or(u64::MAX);
            FailureView { record, age_seconds, recent: age_seconds <= RECENT_SECONDS }
        })
        .collect();
    let failures = Failures {
        window_seconds: RECENT_SECONDS,
        held: inputs.failures.len(),
        capacity: failures::CAPACITY,
        matching,
    };

    let mut explanation = Explanation {
        verdict: super::model::Verdict { ok: true, cause: String::new(), summary: String::new() },
        query: QueryView { from: query.from_text.clone(), to: query.to.to_string() },
        node: config.node.name.clone(),
        time: humantime::format_rfc3339_seconds(inputs.now).to_string(),
        source: source_view,
        destination,
        trust: trust(inputs),
        policy,
        failures,
    };
    explanation.verdict = verdict::verdict(&explanation);
    Ok(explanation)
}

fn found(config: &crate::config::Config, workload: Arc<Workload>) -> Found {
    let wc = config.workloads.iter().find(|w| w.namespace == workload.namespace && w.name == workload.name);
    Found { config: wc.cloned(), workload }
}

fn is_local(state: &State, w: &Workload) -> bool {
    state.local.values().any(|l| l.workload.key() == w.key())
}

fn workload_view(inputs: &Inputs<'_>, f: &Found) -> WorkloadView {
    let config = &inputs.state.config;
    let w = &f.workload;
    let on_this_node = is_local(inputs.state, w) || w.node == config.node.name;
    let status = inputs.enrollment.iter().find(|s| s.workload == w.key());
    let identity = w.identity.to_string();
    let (mtls, authorization, default_deny, passthrough) = match &f.config {
        Some(wc) => {
            let modes = config.authorization_modes(wc);
            (config.mtls_mode(wc), modes.enforce, modes.default_deny, config.passthrough(wc))
        }
        None => (MtlsMode::default(), false, false, Passthrough::default()),
    };
    WorkloadView {
        name: w.key(),
        identity: identity.clone(),
        node: w.node.clone(),
        addresses: w.addresses.iter().map(ToString::to_string).collect(),
        on_this_node,
        enrollment: on_this_node.then(|| status.map_or("not_enrolled", |s| s.state).to_owned()),
        enrollment_error: status.and_then(|s| s.error.clone()),
        mtls: match mtls {
            MtlsMode::Strict => "strict",
            MtlsMode::Permissive => "permissive",
        }
        .to_owned(),
        authorization: if authorization { "enforce" } else { "audit" }.to_owned(),
        default_deny,
        outbound_passthrough: match passthrough {
            Passthrough::Allow => "allow",
            Passthrough::Refuse => "refuse",
        }
        .to_owned(),
        certificate: on_this_node
            .then(|| inputs.certs.identities.iter().find(|c| c.identity == identity).cloned())
            .flatten(),
    }
}

fn trust(inputs: &Inputs<'_>) -> Trust {
    let roots = inputs
        .bundle
        .roots()
        .iter()
        .map(|der| {
            let subject = X509Certificate::from_der(der)
                .map(|(_, x)| x.subject().to_string())
                .unwrap_or_else(|_| "(unreadable)".to_owned());
            let not_after = crate::tls::verify::not_after(der);
            let expires_in_seconds = not_after.map_or(0, |t| match t.duration_since(inputs.now) {
                Ok(d) => d.as_secs() as i64,
                Err(e) => -(e.duration().as_secs() as i64),
            });
            RootView {
                subject,
                fingerprint: crate::identity::cert::fingerprint(der),
                not_after: not_after
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                    .unwrap_or_default(),
                expires_in_seconds,
            }
        })
        .collect();
    Trust {
        trust_domain: inputs.state.config.trust_domain.to_string(),
        signing_root: inputs.certs.signing_root.clone(),
        roots,
    }
}
