//! What the tunnel keeps of the cluster: a compact entry per object, made
//! from the API server's objects as they arrive and never the objects
//! themselves (a full Pod is kilobytes; a node of a 150,000-pod cluster keeps
//! every mesh pod). Strings repeated across objects (namespaces, service
//! accounts, nodes) and whole label sets (a Deployment's pods share theirs)
//! are interned.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::Hash,
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace as K8sNamespace, Pod as K8sPod, Service as K8sService},
    discovery::v1::EndpointSlice as K8sEndpointSlice,
};

use super::{crd, metrics::K8sMetrics};
use crate::{
    config::{self, AuthorizationMode, MtlsMode, NamespaceConfig, Passthrough, ServiceConfig, ServicePort},
    policy::model::Policy,
};

/// `ztunnel.dev/dataplane`: `enabled` on a namespace opts it in, `disabled`
/// on a pod opts the pod out.
pub const DATAPLANE_LABEL: &str = "ztunnel.dev/dataplane";
pub const MTLS_LABEL: &str = "ztunnel.dev/mtls";
pub const AUTHORIZATION_LABEL: &str = "ztunnel.dev/authorization";
pub const DEFAULT_DENY_LABEL: &str = "ztunnel.dev/default-deny";
pub const PASSTHROUGH_LABEL: &str = "ztunnel.dev/outbound-passthrough";
/// The label an EndpointSlice names its Service by.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

pub type Labels = BTreeMap<String, String>;

/// A mesh-relevant pod. Kept: pods Running with an IP (destinations, on any
/// node), and pods of this node that are not yet (their CNI ADD may come
/// before the API server reports an IP) or that opted out (so that a CNI
/// ADD for one can be told "not in the mesh" rather than "not seen yet").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub uid: Arc<str>,
    pub namespace: Arc<str>,
    pub name: Box<str>,
    pub service_account: Arc<str>,
    pub node: Arc<str>,
    pub labels: Arc<Labels>,
    /// `status.podIPs`, in the API server's order.
    pub ips: Box<[IpAddr]>,
    /// Running with an IP: a destination other workloads can reach.
    pub running: bool,
    /// Labelled `ztunnel.dev/dataplane=disabled` (kept for this node's pods
    /// only; never a workload).
    pub opted_out: bool,
}

/// A namespace: opted in or not, and its modes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: Arc<str>,
    pub enabled: bool,
    pub modes: NamespaceConfig,
}

/// A Service with a cluster IP and TCP ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: Arc<str>,
    pub name: Box<str>,
    pub addresses: Box<[IpAddr]>,
    pub ports: Box<[ServicePort]>,
}

/// An EndpointSlice's TCP ports and endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    pub namespace: Arc<str>,
    pub name: Box<str>,
    /// The Service it belongs to (`kubernetes.io/service-name`).
    pub service: Box<str>,
    pub ports: Box<[ServicePort]>,
    pub endpoints: Box<[Endpoint]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    pub ready: bool,
    pub node: Option<Arc<str>>,
}

/// A policy object, converted (fail-closed when it could not be used as written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyEntry {
    pub policy: Policy,
    pub failed_closed: bool,
}

/// What the conversions need to know and where they report.
#[derive(Clone)]
pub struct Filter {
    /// This node: its pods are kept before they run.
    pub node: String,
    /// The tunnel's own namespace: its pods are never workloads.
    pub tunnel_namespace: String,
    pub metrics: K8sMetrics,
}

/// Shares equal strings and label sets between entries.
#[derive(Default)]
pub struct Interner {
    strings: HashSet<Arc<str>>,
    labels: HashSet<Arc<Labels>>,
    /// Sizes after the last purge: purge again when they have doubled.
    purged_at: (usize, usize),
}

impl Interner {
    pub fn str(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.strings.insert(a.clone());
        a
    }

    pub fn labels(&mut self, labels: Option<&Labels>) -> Arc<Labels> {
        let empty = Labels::new();
        let labels = labels.unwrap_or(&empty);
        if let Some(a) = self.labels.get(labels) {
            return a.clone();
        }
        let a = Arc::new(labels.clone());
        self.labels.insert(a.clone());
        a
    }

    /// Drops what no entry uses any more (label sets of pods long gone,
    /// e.g. every rollout's pod-template-hash), once the sets have doubled.
    pub fn purge_if_grown(&mut self) {
        if self.strings.len() < 2 * self.purged_at.0 + 64 && self.labels.len() < 2 * self.purged_at.1 + 64 {
            return;
        }
        purge(&mut self.strings);
        purge(&mut self.labels);
        self.purged_at = (self.strings.len(), self.labels.len());
    }
}

fn purge<T: ?Sized + Eq + Hash>(set: &mut HashSet<Arc<T>>) {
    set.retain(|a| Arc::strong_count(a) > 1);
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().map(crate::workload::canonical)
}

impl Pod {
    /// The pod's entry, or None when it is no workload of the mesh (in any
    /// namespace: whether its namespace is opted in is decided later, since
    /// a namespace can be labelled at any time).
    pub fn from_k8s(pod: &K8sPod, filter: &Filter, interner: &mut Interner) -> Option<Pod> {
        let meta = &pod.metadata;
        let (uid, namespace, name) =
            (meta.uid.as_deref()?, meta.namespace.as_deref()?, meta.name.as_deref()?);
        if namespace == filter.tunnel_namespace {
            return None;
        }
        let spec = pod.spec.as_ref()?;
        if spec.host_network == Some(true) {
            return None;
        }
        let opted_out = match meta.labels.as_ref().and_then(|l| l.get(DATAPLANE_LABEL)).map(String::as_str) {
            Some("disabled") => true,
            None | Some("enabled") => false,
            Some(other) => {
                // Not an opt-out: the pod stays in the mesh (the side a typo
                // must fall on), and the typo is reported.
                tracing::warn!(
                    pod = %format!("{namespace}/{name}"),
                    "label {DATAPLANE_LABEL}={other:?} is neither `enabled` nor `disabled`; the pod is not opted out"
                );
                filter.metrics.invalid("Pod", DATAPLANE_LABEL);
                false
            }
        };
        let node = spec.node_name.as_deref().filter(|n| !n.is_empty())?;
        if opted_out && node != filter.node {
            return None;
        }
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        if matches!(phase, "Succeeded" | "Failed") {
            return None;
        }
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().filter_map(|p| parse_ip(&p.ip)).collect())
            .unwrap_or_default();
        if ips.is_empty()
            && let Some(ip) = status.and_then(|s| s.pod_ip.as_deref()).and_then(parse_ip)
        {
            ips.push(ip);
        }
        ips.dedup();
        let running = phase == "Running" && !ips.is_empty();
        if !running && node != filter.node {
            return None;
        }
        let service_account =
            spec.service_account_name.as_deref().filter(|s| !s.is_empty()).unwrap_or("default");
        Some(Pod {
            uid: Arc::from(uid),
            namespace: interner.str(namespace),
            name: name.into(),
            service_account: interner.str(service_account),
            node: interner.str(node),
            labels: interner.labels(meta.labels.as_ref()),
            ips: ips.into(),
            running,
            opted_out,
        })
    }
}

/// A mode label's value, or why it cannot be read.
fn mode<T: Copy>(
    labels: Option<&Labels>,
    label: &str,
    values: &[(&str, T)],
    previous: T,
    default: T,
    namespace: &str,
    filter: &Filter,
) -> T {
    let Some(value) = labels.and_then(|l| l.get(label)) else {
        return default;
    };
    if let Some((_, v)) = values.iter().find(|(name, _)| name == value) {
        return *v;
    }
    let allowed: Vec<&str> = values.iter().map(|(n, _)| *n).collect();
    tracing::warn!(
        namespace,
        "label {label}={value:?} is not one of {allowed:?}; keeping the value in force"
    );
    filter.metrics.invalid("Namespace", label);
    previous
}

impl Namespace {
    /// `previous`: the entry before this change (an invalid label keeps
    /// its value: a typo must never downgrade a namespace).
    pub fn from_k8s(
        ns: &K8sNamespace,
        previous: Option<&Namespace>,
        filter: &Filter,
        interner: &mut Interner,
    ) -> Option<Namespace> {
        let name = ns.metadata.name.as_deref()?;
        let labels = ns.metadata.labels.as_ref();
        let before = previous.map(|p| p.modes.clone()).unwrap_or_default();
        let default = NamespaceConfig::default();
        let enabled = match labels.and_then(|l| l.get(DATAPLANE_LABEL)).map(String::as_str) {
            Some("enabled") => true,
            None | Some("disabled") => false,
            Some(other) => {
                let keep = previous.is_some_and(|p| p.enabled);
                tracing::warn!(
                    namespace = name,
                    "label {DATAPLANE_LABEL}={other:?} is neither `enabled` nor `disabled`; the namespace stays {}",
                    if keep { "in the mesh" } else { "out of the mesh" }
                );
                filter.metrics.invalid("Namespace", DATAPLANE_LABEL);
                keep
            }
        };
        let modes = NamespaceConfig {
            mtls: mode(
                labels,
                MTLS_LABEL,
                &[("strict", MtlsMode::Strict), ("permissive", MtlsMode::Permissive)],
                before.mtls,
                default.mtls,
                name,
                filter,
            ),
            authorization: mode(
                labels,
                AUTHORIZATION_LABEL,
                &[("enforce", AuthorizationMode::Enforce), ("audit", AuthorizationMode::Audit)],
                before.authorization,
                default.authorization,
                name,
                filter,
            ),
            default_deny: mode(
                labels,
                DEFAULT_DENY_LABEL,
                &[("true", true), ("false", false)],
                before.default_deny,
                default.default_deny,
                name,
                filter,
            ),
            outbound_passthrough: mode(
                labels,
                PASSTHROUGH_LABEL,
                &[("allow", Passthrough::Allow), ("refuse", Passthrough::Refuse)],
                before.outbound_passthrough,
                default.outbound_passthrough,
                name,
                filter,
            ),
        };
        Some(Namespace { name: interner.str(name), enabled, modes })
    }
}

fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

impl Service {
    /// None for a Service with no cluster IP (headless, ExternalName) or no
    /// TCP port: nothing to carry.
    pub fn from_k8s(svc: &K8sService, interner: &mut Interner) -> Option<Service> {
        let (namespace, name) = (svc.metadata.namespace.as_deref()?, svc.metadata.name.as_deref()?);
        let spec = svc.spec.as_ref()?;
        let mut addresses: Vec<IpAddr> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().filter_map(|ip| parse_ip(ip)).collect(),
            _ => spec.cluster_ip.as_deref().and_then(parse_ip).into_iter().collect(),
        };
        addresses.dedup();
        let ports: Vec<ServicePort> = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| is_tcp(p.protocol.as_deref()))
            .filter_map(|p| {
                Some(ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    port: u16::try_from(p.port).ok()?,
                })
            })
            .collect();
        if addresses.is_empty() || ports.is_empty() {
            return None;
        }
        Some(Service {
            namespace: interner.str(namespace),
            name: name.into(),
            addresses: addresses.into(),
            ports: ports.into(),
        })
    }
}

impl EndpointSlice {
    /// None for slices of no Service, of FQDN addresses, or without a TCP port.
    pub fn from_k8s(slice: &K8sEndpointSlice, interner: &mut Interner) -> Option<EndpointSlice> {
        let meta = &slice.metadata;
        let (namespace, name) = (meta.namespace.as_deref()?, meta.name.as_deref()?);
        let service = meta.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            return None;
        }
        let ports: Vec<ServicePort> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| is_tcp(p.protocol.as_deref()))
            .filter_map(|p| {
                Some(ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    port: p.port.and_then(|p| u16::try_from(p).ok())?,
                })
            })
            .collect();
        if ports.is_empty() {
            return None;
        }
        let endpoints: Vec<Endpoint> = slice
            .endpoints
            .iter()
            .flat_map(|e| {
                let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                let node = e.node_name.as_deref().map(|n| interner.str(n));
                e.addresses
                    .iter()
                    .filter_map(|a| parse_ip(a))
                    .map(move |address| Endpoint { address, ready, node: node.clone() })
                    .collect::<Vec<_>>()
            })
            .collect();
        Some(EndpointSlice {
            namespace: interner.str(namespace),
            name: name.into(),
            service: service.as_str().into(),
            ports: ports.into(),
            endpoints: endpoints.into(),
        })
    }
}

impl PolicyEntry {
    /// Converts, logs and counts a policy object that fails closed.
    pub fn from_k8s(obj: &kube::api::DynamicObject, filter: &Filter) -> Option<PolicyEntry> {
        let c = crd::convert_dynamic(obj);
        if c.policy.name.is_empty() || c.policy.namespace.is_empty() {
            return None;
        }
        for p in &c.problems {
            if c.failed_closed && p.reason != "invalid_annotation" {
                tracing::error!(
                    policy = %c.policy.key(),
                    "AuthorizationPolicy cannot be used as written ({p}); it fails closed: {}",
                    match c.policy.action {
                        crate::policy::model::Action::Deny => "it denies every caller of what it selects",
                        crate::policy::model::Action::Allow => "it admits nothing",
                    }
                );
            } else {
                tracing::warn!(policy = %c.policy.key(), "AuthorizationPolicy: {p}");
            }
            filter.metrics.invalid("AuthorizationPolicy", p.reason);
        }
        Some(PolicyEntry { policy: c.policy, failed_closed: c.failed_closed })
    }
}

/// For the CNI server: whether a pod at sandbox creation is enrolled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniVerdict {
    /// A mesh pod: enroll it before answering.
    Enroll,
    /// Its namespace is not opted in, or it opted out: pass it through.
    NotInMesh,
    /// The namespace is in the mesh but the watch has not shown the pod yet
    /// (the ADD can come first): wait for the next state.
    NotSeenYet,
}

/// `namespace/name`.
pub type ObjectKey = (Arc<str>, Box<str>);

/// One consistent view of the cluster, published by discovery. Cloning it
/// is cheap (the maps are shared); it is never modified once published.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    /// Every watcher has delivered its first full list: until then nothing
    /// is published (a partial view could enroll a pod before the DENY
    /// policy that covers it is known).
    pub synced: bool,
    /// Counts publications (each a new state).
    pub generation: u64,
    pub namespaces: Arc<BTreeMap<Arc<str>, Arc<Namespace>>>,
    /// By UID.
    pub pods: Arc<BTreeMap<Arc<str>, Arc<Pod>>>,
    pub services: Arc<BTreeMap<ObjectKey, Arc<Service>>>,
    pub endpoint_slices: Arc<BTreeMap<ObjectKey, Arc<EndpointSlice>>>,
    pub policies: Arc<BTreeMap<ObjectKey, Arc<PolicyEntry>>>,
}

impl ClusterState {
    /// Whether the namespace is opted in.
    pub fn enabled(&self, namespace: &str) -> bool {
        self.namespaces.get(namespace).is_some_and(|n| n.enabled)
    }

    /// Pods of opted-in namespaces that did not opt out (Running with an
    /// IP, or of this node).
    pub fn mesh_pods(&self) -> impl Iterator<Item = &Arc<Pod>> {
        self.pods.values().filter(|p| self.is_mesh(p))
    }

    /// The mesh pod with this UID.
    pub fn mesh_pod(&self, uid: &str) -> Option<&Arc<Pod>> {
        self.pods.get(uid).filter(|p| self.is_mesh(p))
    }

    fn is_mesh(&self, p: &Pod) -> bool {
        !p.opted_out && self.enabled(&p.namespace)
    }

    /// What a CNI ADD for this node's pod `uid` in `namespace` should do.
    pub fn cni_verdict(&self, namespace: &str, uid: &str) -> CniVerdict {
        if !self.enabled(namespace) {
            return CniVerdict::NotInMesh;
        }
        match self.pods.get(uid) {
            Some(p) if p.opted_out => CniVerdict::NotInMesh,
            Some(_) => CniVerdict::Enroll,
            None => CniVerdict::NotSeenYet,
        }
    }

    /// Modes of the opted-in namespaces.
    pub fn namespace_configs(&self) -> impl Iterator<Item = (&str, &NamespaceConfig)> {
        self.namespaces.values().filter(|n| n.enabled).map(|n| (&*n.name, &n.modes))
    }

    /// Services with their endpoint slices joined.
    pub fn service_configs(&self) -> Vec<ServiceConfig> {
        let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for s in self.endpoint_slices.values() {
            slices.entry((&s.namespace, &s.service)).or_default().push(s);
        }
        self.services
            .values()
            .map(|svc| ServiceConfig {
                name: svc.name.to_string(),
                namespace: svc.namespace.to_string(),
                addresses: svc.addresses.to_vec(),
                ports: svc.ports.to_vec(),
                endpoint_slices: slices
                    .get(&(&*svc.namespace, &*svc.name))
                    .into_iter()
                    .flatten()
                    .map(|s| config::EndpointSlice {
                        ports: s.ports.to_vec(),
                        endpoints: s
                            .endpoints
                            .iter()
                            .map(|e| config::Endpoint {
                                address: e.address,
                                ready: e.ready,
                                node: e.node.as_deref().map(str::to_owned),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// Policies of opted-in namespaces and of `root_namespace` (mesh-wide).
    pub fn policies_for(&self, root_namespace: &str) -> impl Iterator<Item = &PolicyEntry> {
        self.policies
            .values()
            .map(|p| &**p)
            .filter(move |p| p.policy.namespace == root_namespace || self.enabled(&p.policy.namespace))
    }

    /// Policies in force that fail closed.
    pub fn failed_closed_policies(&self) -> usize {
        self.policies.values().filter(|p| p.failed_closed).count()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus, ServiceSpec};
    use kube::core::ObjectMeta;

    use super::*;

    pub fn filter() -> Filter {
        Filter {
            node: "node-a".into(),
            tunnel_namespace: "ztunnel-system".into(),
            metrics: K8sMetrics::default(),
        }
    }

    /// A UUID-shaped UID made from the pod's key (the API server's are UUIDs).
    pub fn uid(ns: &str, name: &str) -> String {
        let hex: String = format!("{ns}/{name}")
            .bytes()
            .map(|b| format!("{b:02x}"))
            .chain(std::iter::repeat("0".into()))
            .take(32)
            .collect();
        format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
    }

    pub fn pod(ns: &str, name: &str, node: &str, ips: &[&str]) -> K8sPod {
        K8sPod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                uid: Some(uid(ns, name)),
                labels: Some([("app".to_owned(), name.to_owned())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                service_account_name: Some(format!("{name}-sa")),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(if ips.is_empty() { "Pending" } else { "Running" }.into()),
                pod_ips: Some(ips.iter().map(|ip| PodIP { ip: (*ip).into() }).collect()),
                ..PodStatus::default()
            }),
        }
    }

    fn namespace(name: &str, labels: &[(&str, &str)]) -> K8sNamespace {
        K8sNamespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
                ..ObjectMeta::default()
            },
            ..K8sNamespace::default()
        }
    }

    #[test]
    fn a_running_pod_is_a_workload_with_its_identity_node_labels_and_ips() {
        let mut i = Interner::default();
        let p =
            Pod::from_k8s(&pod("shop", "web", "node-b", &["198.19.1.2", "fd7a:7e57::2"]), &filter(), &mut i)
                .unwrap();
        assert_eq!(
            (&*p.namespace, &*p.name, &*p.service_account, &*p.node),
            ("shop", "web", "web-sa", "node-b")
        );
        assert_eq!(*p.uid, uid("shop", "web"));
        assert_eq!(p.ips.len(), 2);
        assert!(p.running);
        assert_eq!(p.labels.get("app").map(String::as_str), Some("web"));

        let mut no_sa = pod("shop", "web", "node-b", &["198.19.1.2"]);
        no_sa.spec.as_mut().unwrap().service_account_name = None;
        assert_eq!(&*Pod::from_k8s(&no_sa, &filter(), &mut i).unwrap().service_account, "default");

        let mut only_pod_ip = pod("shop", "web", "node-b", &[]);
        let status = only_pod_ip.status.as_mut().unwrap();
        status.phase = Some("Running".into());
        status.pod_ip = Some("198.19.1.3".into());
        assert!(Pod::from_k8s(&only_pod_ip, &filter(), &mut i).unwrap().running);
    }

    #[test]
    fn pods_that_are_no_workloads_are_not_kept() {
        let mut i = Interner::default();
        let f = filter();
        let mut host = pod("shop", "h", "node-b", &["198.19.1.2"]);
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut out = pod("shop", "o", "node-b", &["198.19.1.2"]);
        out.metadata.labels = Some([(DATAPLANE_LABEL.to_owned(), "disabled".to_owned())].into());
        let mut done = pod("shop", "d", "node-b", &["198.19.1.2"]);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut unscheduled = pod("shop", "u", "", &[]);
        unscheduled.spec.as_mut().unwrap().node_name = None;
        let mut out_here = out.clone();
        out_here.spec.as_mut().unwrap().node_name = Some("node-a".into());
        for (why, p) in [
            ("host network", host),
            ("opted out, elsewhere", out),
            ("finished", done),
            ("the tunnel's own", pod("ztunnel-system", "ztunnel-x", "node-b", &["198.19.1.9"])),
            ("not running, elsewhere", pod("shop", "p", "node-b", &[])),
            ("unscheduled", unscheduled),
        ] {
            assert_eq!(Pod::from_k8s(&p, &f, &mut i), None, "{why}");
        }
        // This node's pod is kept before it runs (its CNI ADD may come first),
        // and when it opted out (its CNI ADD is answered "not in the mesh").
        let here = Pod::from_k8s(&pod("shop", "p", "node-a", &[]), &f, &mut i).unwrap();
        assert!(!here.running);
        assert!(Pod::from_k8s(&out_here, &f, &mut i).unwrap().opted_out);
    }

    #[test]
    fn the_cni_verdict_tells_not_in_the_mesh_from_not_seen_yet() {
        let mut i = Interner::default();
        let f = filter();
        let mut state = ClusterState::default();
        let ns = Namespace::from_k8s(&namespace("shop", &[(DATAPLANE_LABEL, "enabled")]), None, &f, &mut i)
            .unwrap();
        Arc::make_mut(&mut state.namespaces).insert(ns.name.clone(), Arc::new(ns));
        let mut out = pod("shop", "out", "node-a", &[]);
        out.metadata.labels = Some([(DATAPLANE_LABEL.to_owned(), "disabled".to_owned())].into());
        for p in [pod("shop", "in", "node-a", &[]), out] {
            let p = Pod::from_k8s(&p, &f, &mut i).unwrap();
            Arc::make_mut(&mut state.pods).insert(p.uid.clone(), Arc::new(p));
        }
        assert_eq!(state.cni_verdict("shop", &uid("shop", "in")), CniVerdict::Enroll);
        assert_eq!(state.cni_verdict("shop", &uid("shop", "out")), CniVerdict::NotInMesh);
        assert_eq!(state.cni_verdict("shop", &uid("shop", "later")), CniVerdict::NotSeenYet);
        assert_eq!(state.cni_verdict("dev", &uid("dev", "x")), CniVerdict::NotInMesh);
        assert_eq!(state.mesh_pods().count(), 1, "an opted-out pod is no workload");
    }

    #[test]
    fn pods_of_one_deployment_share_their_labels() {
        let mut i = Interner::default();
        let mut a = pod("shop", "web-1", "n", &["198.19.1.2"]);
        let mut b = pod("shop", "web-2", "n", &["198.19.1.3"]);
        let labels: Labels = [("app".to_owned(), "web".to_owned())].into();
        a.metadata.labels = Some(labels.clone());
        b.metadata.labels = Some(labels);
        let (a, b) =
            (Pod::from_k8s(&a, &filter(), &mut i).unwrap(), Pod::from_k8s(&b, &filter(), &mut i).unwrap());
        assert!(Arc::ptr_eq(&a.labels, &b.labels));
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace));
        drop((a, b));
        i.purged_at = (0, 0);
        for n in 0..100 {
            i.str(&format!("gone-{n}"));
        }
        i.purge_if_grown();
        assert!(i.strings.is_empty() && i.labels.is_empty(), "nothing uses them any more");
    }

    #[test]
    fn namespace_labels_carry_the_modes() {
        let mut i = Interner::default();
        let f = filter();
        let ns = Namespace::from_k8s(
            &namespace(
                "shop",
                &[
                    (DATAPLANE_LABEL, "enabled"),
                    (MTLS_LABEL, "strict"),
                    (AUTHORIZATION_LABEL, "audit"),
                    (DEFAULT_DENY_LABEL, "true"),
                    (PASSTHROUGH_LABEL, "refuse"),
                ],
            ),
            None,
            &f,
            &mut i,
        )
        .unwrap();
        assert!(ns.enabled);
        assert_eq!(
            ns.modes,
            NamespaceConfig {
                mtls: MtlsMode::Strict,
                authorization: AuthorizationMode::Audit,
                default_deny: true,
                outbound_passthrough: Passthrough::Refuse,
            }
        );
        let plain = Namespace::from_k8s(&namespace("dev", &[]), None, &f, &mut i).unwrap();
        assert!(!plain.enabled);
        assert_eq!(plain.modes, NamespaceConfig::default());
    }

    #[test]
    fn an_invalid_mode_label_keeps_the_value_in_force_and_is_counted() {
        let mut i = Interner::default();
        let f = filter();
        let strict = Namespace::from_k8s(
            &namespace("shop", &[(DATAPLANE_LABEL, "enabled"), (MTLS_LABEL, "strict")]),
            None,
            &f,
            &mut i,
        )
        .unwrap();
        let typo = Namespace::from_k8s(
            &namespace(
                "shop",
                &[(DATAPLANE_LABEL, "enabeld"), (MTLS_LABEL, "strcit"), (DEFAULT_DENY_LABEL, "yes")],
            ),
            Some(&strict),
            &f,
            &mut i,
        )
        .unwrap();
        assert!(typo.enabled, "a typo in the opt-in label keeps the namespace in");
        assert_eq!(typo.modes.mtls, MtlsMode::Strict, "never a silent downgrade to permissive");
        assert!(!typo.modes.default_deny);
        assert_eq!(f.metrics.invalid_count("Namespace", MTLS_LABEL), 1);
        assert_eq!(f.metrics.invalid_count("Namespace", DATAPLANE_LABEL), 1);
        assert_eq!(f.metrics.invalid_count("Namespace", DEFAULT_DENY_LABEL), 1);
        // With nothing before it, an invalid value is the default.
        let fresh =
            Namespace::from_k8s(&namespace("new", &[(MTLS_LABEL, "strcit")]), None, &f, &mut i).unwrap();
        assert_eq!(fresh.modes.mtls, MtlsMode::Permissive);
        // Removing a label is a change, not an error: the default again.
        let removed = Namespace::from_k8s(
            &namespace("shop", &[(DATAPLANE_LABEL, "enabled")]),
            Some(&strict),
            &f,
            &mut i,
        )
        .unwrap();
        assert_eq!(removed.modes.mtls, MtlsMode::Permissive);
    }

    #[test]
    fn services_keep_cluster_ips_and_tcp_ports() {
        use k8s_openapi::api::core::v1::ServicePort as K8sPort;
        let mut i = Interner::default();
        let svc = |cluster_ips: Vec<&str>, ports: Vec<(&str, i32, &str)>| K8sService {
            metadata: ObjectMeta {
                name: Some("db".into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: cluster_ips.first().map(|s| (*s).to_owned()),
                cluster_ips: Some(cluster_ips.iter().map(|s| (*s).to_owned()).collect()),
                ports: Some(
                    ports
                        .into_iter()
                        .map(|(name, port, protocol)| K8sPort {
                            name: Some(name.into()),
                            port,
                            protocol: Some(protocol.into()),
                            ..K8sPort::default()
                        })
                        .collect(),
                ),
                ..ServiceSpec::default()
            }),
            ..K8sService::default()
        };
        let s = Service::from_k8s(
            &svc(vec!["10.96.0.10", "fd00::10"], vec![("pg", 5432, "TCP"), ("dns", 53, "UDP")]),
            &mut i,
        )
        .unwrap();
        assert_eq!(s.addresses.len(), 2);
        assert_eq!(&*s.ports, &[ServicePort { name: "pg".into(), port: 5432 }]);
        assert_eq!(
            Service::from_k8s(&svc(vec!["None"], vec![("pg", 5432, "TCP")]), &mut i),
            None,
            "headless"
        );
        assert_eq!(Service::from_k8s(&svc(vec![], vec![("pg", 5432, "TCP")]), &mut i), None, "ExternalName");
        assert_eq!(
            Service::from_k8s(&svc(vec!["10.96.0.10"], vec![("dns", 53, "UDP")]), &mut i),
            None,
            "no TCP"
        );
    }

    pub fn slice(
        ns: &str,
        name: &str,
        service: &str,
        address_type: &str,
        endpoints: serde_json::Value,
    ) -> K8sEndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": address_type,
            "ports": [{"name": "pg", "port": 15432, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    #[test]
    fn endpoint_slices_keep_tcp_ports_and_readiness() {
        let mut i = Interner::default();
        let s = EndpointSlice::from_k8s(
            &slice(
                "shop",
                "db-abc",
                "db",
                "IPv4",
                serde_json::json!([
                    {"addresses": ["198.19.2.11"], "nodeName": "node-b"},
                    {"addresses": ["198.19.2.12"], "conditions": {"ready": false}},
                    {"addresses": ["198.19.2.13"], "conditions": {"ready": true, "serving": true}},
                ]),
            ),
            &mut i,
        )
        .unwrap();
        assert_eq!(&*s.service, "db");
        assert_eq!(&*s.ports, &[ServicePort { name: "pg".into(), port: 15432 }]);
        let ready: Vec<(String, bool, Option<&str>)> =
            s.endpoints.iter().map(|e| (e.address.to_string(), e.ready, e.node.as_deref())).collect();
        assert_eq!(
            ready,
            vec![
                ("198.19.2.11".into(), true, Some("node-b")),
                ("198.19.2.12".into(), false, None),
                ("198.19.2.13".into(), true, None)
            ]
        );
        assert_eq!(
            EndpointSlice::from_k8s(&slice("shop", "x", "db", "FQDN", serde_json::json!([])), &mut i),
            None
        );
        let mut orphan = slice("shop", "x", "db", "IPv4", serde_json::json!([]));
        orphan.metadata.labels = None;
        assert_eq!(EndpointSlice::from_k8s(&orphan, &mut i), None, "no service-name label");
    }

    #[test]
    fn a_service_joins_its_slices_by_name_and_namespace() {
        let mut i = Interner::default();
        let mut state = ClusterState::default();
        let svc = Service {
            namespace: i.str("shop"),
            name: "db".into(),
            addresses: vec!["10.96.0.10".parse().unwrap()].into(),
            ports: vec![ServicePort { name: "pg".into(), port: 5432 }].into(),
        };
        let key = |ns: &str, n: &str| (Arc::<str>::from(ns), Box::<str>::from(n));
        Arc::make_mut(&mut state.services).insert(key("shop", "db"), Arc::new(svc));
        let eps = serde_json::json!([{"addresses": ["198.19.2.11"]}]);
        for (ns, name, service) in [
            ("shop", "db-1", "db"),
            ("shop", "db-2", "db"),
            ("other", "db-1", "db"),
            ("shop", "web-1", "web"),
        ] {
            let s = EndpointSlice::from_k8s(&slice(ns, name, service, "IPv4", eps.clone()), &mut i).unwrap();
            Arc::make_mut(&mut state.endpoint_slices).insert(key(ns, name), Arc::new(s));
        }
        let services = state.service_configs();
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].endpoint_slices.len(), 2);
        assert_eq!(services[0].ready_endpoints(5432), vec![("198.19.2.11".parse().unwrap(), 15432); 2]);
    }
}
