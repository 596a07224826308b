//! Istio's L4 labels on `istio_tcp_*`, derived the way Istio's ztunnel
//! derives them (its `CommonTrafficLabels`), so that Istio's dashboards and
//! recording rules read ztunnel's series unchanged.
//!
//! Every value is bounded by the mesh's workloads, services and identities:
//! no address, port or connection id is ever a label.

use prometheus_client::encoding::EncodeLabelSet;

use crate::{access_log::Entry, workload::Workload};

/// What Istio writes for a label it cannot fill.
pub const UNKNOWN: &str = "unknown";
/// Istio's cluster id when none is configured (istiod's `Kubernetes`); this
/// tunnel serves one cluster.
pub const CLUSTER: &str = "Kubernetes";
/// The cluster DNS domain of Istio's `destination_service` host names.
const CLUSTER_DOMAIN: &str = "cluster.local";

/// Istio's standard TCP labels, in Istio's order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (the caller's tunnel) or `destination` (the callee's).
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    /// `-` for every connection counted here: the series are counted from
    /// the moment a connection is carried, with the labels it opened with,
    /// so that opened minus closed is the number open. How a connection
    /// ended is `ztunnel_connections_total{reason}` and the access log's.
    pub response_flags: &'static str,
    /// `mutual_tls`, or `unknown` for plaintext (as Istio's ztunnel writes).
    pub connection_security_policy: &'static str,
}

/// One end of a connection as the labels see it.
struct End {
    workload: String,
    canonical_service: String,
    canonical_revision: String,
    namespace: String,
    principal: String,
    cluster: String,
}

impl End {
    fn new(workload: Option<&Workload>, principal: Option<&str>) -> Self {
        let unknown = || UNKNOWN.to_owned();
        let principal_text = principal.map_or_else(unknown, str::to_owned);
        match workload {
            Some(w) => Self {
                workload: workload_name(w).to_owned(),
                canonical_service: canonical_service(w).to_owned(),
                canonical_revision: canonical_revision(w).to_owned(),
                namespace: w.namespace.clone(),
                principal: principal_text,
                cluster: CLUSTER.to_owned(),
            },
            // An identity without a known workload still names its
            // namespace (Istio's "derived source").
            None => Self {
                workload: unknown(),
                canonical_service: unknown(),
                canonical_revision: unknown(),
                namespace: principal.and_then(spiffe_namespace).map_or_else(unknown, str::to_owned),
                principal: principal_text,
                cluster: unknown(),
            },
        }
    }
}

impl TcpLabels {
    /// The labels of a connection about to be carried; `entry` holds its
    /// identities, the Service dialled and whether it is mutual TLS.
    pub fn new(
        reporter: &'static str,
        source: Option<&Workload>,
        destination: Option<&Workload>,
        entry: &Entry,
    ) -> Self {
        let src = End::new(source, entry.source_identity.as_deref());
        let dst = End::new(destination, entry.destination_identity.as_deref());
        let service = entry.destination_service.as_deref().and_then(|s| s.split_once('/'));
        let (service_host, service_namespace, service_name) = match service {
            Some((ns, name)) => (format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"), ns.to_owned(), name.to_owned()),
            None => (UNKNOWN.to_owned(), UNKNOWN.to_owned(), UNKNOWN.to_owned()),
        };
        Self {
            reporter,
            source_app: src.canonical_service.clone(),
            source_version: src.canonical_revision.clone(),
            source_workload: src.workload,
            source_canonical_service: src.canonical_service,
            source_canonical_revision: src.canonical_revision,
            source_workload_namespace: src.namespace,
            source_principal: src.principal,
            source_cluster: src.cluster,
            destination_service: service_host,
            destination_service_namespace: service_namespace,
            destination_service_name: service_name,
            destination_app: dst.canonical_service.clone(),
            destination_version: dst.canonical_revision.clone(),
            destination_workload: dst.workload,
            destination_canonical_service: dst.canonical_service,
            destination_canonical_revision: dst.canonical_revision,
            destination_workload_namespace: dst.namespace,
            destination_principal: dst.principal,
            destination_cluster: dst.cluster,
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: if entry.connection_security_policy == "mutual_tls" {
                "mutual_tls"
            } else {
                UNKNOWN
            },
        }
    }
}

/// The workload a pod belongs to, read from the labels its controller sets
/// (Istio reads the owner references, which the registry does not carry),
/// so that a rollout or a rescheduled pod does not mint new series:
/// a Deployment's `<name>-<pod-template-hash>-<suffix>`, a StatefulSet's
/// `<name>-<ordinal>` and a DaemonSet's `<name>-<suffix>` are `<name>`, a
/// Job's pod is its Job. Any other name is the workload's own.
pub fn workload_name(w: &Workload) -> &str {
    let label = |k: &str| w.labels.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let controller = if let Some(hash) = label("pod-template-hash") {
        w.name.rsplit_once(&format!("-{hash}-")).map(|(n, _)| n).filter(|n| !n.is_empty())
    } else if label("statefulset.kubernetes.io/pod-name").is_some()
        || label("pod-template-generation").is_some()
    {
        w.name.rsplit_once('-').map(|(n, _)| n).filter(|n| !n.is_empty())
    } else {
        label("batch.kubernetes.io/job-name").or_else(|| label("job-name"))
    };
    controller.unwrap_or(&w.name)
}

/// Istio's canonical service: the first of these labels, else the workload.
pub fn canonical_service(w: &Workload) -> &str {
    ["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|k| w.labels.get(*k).filter(|v| !v.is_empty()))
        .map_or_else(|| workload_name(w), String::as_str)
}

/// Istio's canonical revision: the first of these labels, else `latest`.
pub fn canonical_revision(w: &Workload) -> &str {
    ["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"]
        .iter()
        .find_map(|k| w.labels.get(*k).filter(|v| !v.is_empty()))
        .map_or("latest", String::as_str)
}

/// The namespace of `spiffe://<td>/ns/<namespace>/sa/<account>`.
fn spiffe_namespace(id: &str) -> Option<&str> {
    let (_, rest) = id.strip_prefix("spiffe://")?.split_once("/ns/")?;
    rest.split_once("/sa/").map(|(ns, _)| ns).filter(|ns| !ns.is_empty() && !ns.contains('/'))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::identity::spiffe::{SpiffeId, TrustDomain};

    fn workload(name: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            name: name.into(),
            namespace: "shop".into(),
            service_account: "sa".into(),
            identity: SpiffeId::new(TrustDomain::default(), "shop", "sa").unwrap(),
            node: "n".into(),
            addresses: vec![],
            ports: vec![],
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
            has_netns: true,
        }
    }

    #[test]
    fn canonical_names_follow_istios_label_order() {
        let w = workload("web-7d9f8c6b5-x2x4q", &[("pod-template-hash", "7d9f8c6b5")]);
        assert_eq!(workload_name(&w), "web");
        assert_eq!(canonical_service(&w), "web");
        assert_eq!(canonical_revision(&w), "latest");
        let w = workload("web-0", &[("app", "web"), ("version", "v2")]);
        assert_eq!(
            (workload_name(&w), canonical_service(&w), canonical_revision(&w)),
            ("web-0", "web", "v2")
        );
        let w = workload("db-2", &[("statefulset.kubernetes.io/pod-name", "db-2")]);
        assert_eq!(workload_name(&w), "db");
        let w = workload("agent-x7k2p", &[("pod-template-generation", "3")]);
        assert_eq!(workload_name(&w), "agent");
        let w = workload("backup-28764120-abcde", &[("batch.kubernetes.io/job-name", "backup-28764120")]);
        assert_eq!(workload_name(&w), "backup-28764120");
        // A label that does not fit the name leaves the name as it is.
        let w = workload("odd", &[("pod-template-hash", "abc")]);
        assert_eq!(workload_name(&w), "odd");
        let w = workload(
            "x",
            &[
                ("app", "a"),
                ("app.kubernetes.io/name", "k"),
                ("service.istio.io/canonical-name", "c"),
                ("app.kubernetes.io/version", "kv"),
                ("service.istio.io/canonical-revision", "cr"),
            ],
        );
        assert_eq!((canonical_service(&w), canonical_revision(&w)), ("c", "cr"));
    }

    #[test]
    fn unknown_ends_are_unknown_but_an_identity_still_names_its_namespace() {
        let mut entry = Entry::now("inbound", "hbone");
        entry.source_identity = Some("spiffe://cluster.local/ns/web/sa/frontend".into());
        let dst = workload("db", &[("app", "db")]);
        entry.destination_identity = Some(dst.identity.to_string());
        let l = TcpLabels::new("destination", None, Some(&dst), &entry);
        assert_eq!(l.source_workload, UNKNOWN);
        assert_eq!(l.source_cluster, UNKNOWN);
        assert_eq!(l.source_workload_namespace, "web");
        assert_eq!(l.source_principal, "spiffe://cluster.local/ns/web/sa/frontend");
        assert_eq!((l.destination_workload.as_str(), l.destination_app.as_str()), ("db", "db"));
        assert_eq!(l.destination_cluster, CLUSTER);
        assert_eq!(l.destination_service, UNKNOWN);
        assert_eq!(
            (l.connection_security_policy, l.response_flags, l.request_protocol),
            ("mutual_tls", "-", "tcp")
        );

        let mut entry = Entry::now("outbound", "passthrough");
        entry.destination_service = Some("shop/cart".into());
        let l = TcpLabels::new("source", None, None, &entry);
        assert_eq!(l.destination_service, "cart.shop.svc.cluster.local");
        assert_eq!(
            (l.destination_service_namespace.as_str(), l.destination_service_name.as_str()),
            ("shop", "cart")
        );
        assert_eq!(l.source_principal, UNKNOWN);
        assert_eq!(l.connection_security_policy, UNKNOWN);
    }

    #[test]
    fn spiffe_namespaces() {
        assert_eq!(spiffe_namespace("spiffe://td/ns/a/sa/b"), Some("a"));
        assert_eq!(spiffe_namespace("spiffe://td/x/a/sa/b"), None);
        assert_eq!(spiffe_namespace("not an id"), None);
    }
}
