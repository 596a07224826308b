//! Kubernetes mode: the cluster, as the API server has it, turned into the
//! same [`Config`] the file mode reads, so that the controller (enrollment,
//! registry, policy) is the same in both modes.
//!
//! | module | job |
//! | --- | --- |
//! | `agent` | `run --kubernetes`: the controller's source of configuration, the CNI socket |
//! | `discovery` | watchers and the compact cache, publishing [`ClusterState`] |
//! | `cluster` | the compact entries, made from API objects |
//! | `crd` | the AuthorizationPolicy CRD and its conversion (fail closed) |
//! | `manifest` | `ztunnel validate --manifest` |
//! | `node` | a pod's cgroup and network namespace on this node |
//! | `metrics` | `ztunnel_k8s_*` series |
//!
//! The flow: discovery publishes a [`ClusterState`]; [`LocalPods::resolve`]
//! finds this node's pods' cgroups and namespaces (or the CNI plugin hands a
//! namespace over, [`LocalPods::insert_from_cni`]); [`build_config`] makes
//! the `Config` the controller applies.

pub mod agent;
pub mod cluster;
pub mod crd;
pub mod discovery;
pub mod manifest;
pub mod metrics;
pub mod node;

use std::{
    collections::{HashMap, hash_map::Entry},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

pub use self::{
    cluster::{ClusterState, CniVerdict},
    discovery::{DiscoveryConfig, spawn as spawn_discovery},
    metrics::K8sMetrics,
    node::PodCgroups,
};
use self::{
    metrics::WhatLabels,
    node::{PodNetns, same_namespace},
};
use crate::{
    config::{Config, WorkloadConfig},
    netns::{HeldNetns, NetnsRef},
};

/// The API server could not be reached as configured.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig { path: PathBuf, source: kube::config::KubeconfigError },
    #[error("no Kubernetes configuration (not in a pod, no KUBECONFIG, no ~/.kube/config): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("cannot make a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for the API server: from `kubeconfig` when given (its current
/// context), else in-cluster (the pod's ServiceAccount) or `$KUBECONFIG`.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| ClientError::Kubeconfig { path: path.to_owned(), source };
            let file = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(file, &Default::default()).await.map_err(err)?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// How long a namespace handed over by the CNI plugin is kept for a pod the
/// API server has not shown yet (the ADD can come before the watch event).
pub const CNI_GRACE: Duration = Duration::from_secs(120);

/// Where a local pod's network namespace came from.
#[derive(Clone)]
enum NetnsSource {
    /// The CNI plugin passed it at sandbox creation: the pod's own, for sure.
    Cni,
    /// Opened from a process of the pod's cgroup.
    Proc(PodNetns),
}

/// One of this node's pods, as far as it has been found.
#[derive(Clone)]
pub struct LocalPod {
    /// The pod's cgroup directory (absolute).
    pub cgroup: Option<PathBuf>,
    netns: Option<(HeldNetns, NetnsSource)>,
    /// The pod's addresses as the CNI plugin reported them, used until the
    /// API server reports them.
    pub cni_addresses: Vec<IpAddr>,
    /// Why it is not resolved yet.
    pub waiting_for: Option<String>,
    cni_at: Option<Instant>,
    /// Whether the API server has shown the pod (once gone from it, it is
    /// forgotten at once; before, a CNI handover waits for it).
    seen: bool,
    since: Instant,
    warned: bool,
}

impl LocalPod {
    fn new() -> Self {
        Self {
            cgroup: None,
            netns: None,
            cni_addresses: Vec::new(),
            waiting_for: None,
            cni_at: None,
            seen: false,
            since: Instant::now(),
            warned: false,
        }
    }

    pub fn netns(&self) -> Option<&HeldNetns> {
        self.netns.as_ref().map(|(n, _)| n)
    }

    /// Both cgroup and namespace known: the pod can be enrolled.
    pub fn is_resolved(&self) -> bool {
        self.cgroup.is_some() && self.netns.is_some()
    }

    pub fn from_cni(&self) -> bool {
        matches!(self.netns, Some((_, NetnsSource::Cni)))
    }
}

/// This node's mesh pods: UID -> cgroup, network namespace (held open) and
/// the addresses the CNI plugin reported.
pub struct LocalPods {
    cgroups: PodCgroups,
    pods: HashMap<Arc<str>, LocalPod>,
    metrics: K8sMetrics,
}

impl LocalPods {
    pub fn new(cgroups: PodCgroups, metrics: K8sMetrics) -> Self {
        Self { cgroups, pods: HashMap::new(), metrics }
    }

    pub fn get(&self, uid: &str) -> Option<&LocalPod> {
        self.pods.get(uid)
    }

    /// Local mesh pods not resolved yet.
    pub fn unresolved(&self) -> usize {
        self.pods.values().filter(|p| !p.is_resolved()).count()
    }

    /// The CNI plugin's namespace for a pod (ADD): it takes priority over one
    /// found through /proc, and is held until the pod goes (or DEL). The
    /// pod's cgroup is looked up at once: the kubelet makes it before the
    /// sandbox. Returns whether the pod is now resolved.
    pub fn insert_from_cni(&mut self, uid: &str, netns: HeldNetns, ips: Vec<IpAddr>) -> bool {
        let pod = self.pods.entry(Arc::from(uid)).or_insert_with(LocalPod::new);
        pod.netns = Some((netns, NetnsSource::Cni));
        pod.cni_addresses = ips;
        pod.cni_at = Some(Instant::now());
        if pod.cgroup.is_none() {
            match self.cgroups.find(uid) {
                Ok(c) => pod.cgroup = Some(c),
                Err(e) => {
                    self.metrics
                        .resolution_retries
                        .get_or_create(&WhatLabels { what: "cgroup".into() })
                        .inc();
                    pod.waiting_for = Some(e.to_string());
                }
            }
        }
        if pod.is_resolved() {
            pod.waiting_for = None;
        }
        pod.is_resolved()
    }

    /// The CNI plugin's DEL: the sandbox is gone, and with it the namespace.
    pub fn remove(&mut self, uid: &str) -> bool {
        self.pods.remove(uid).is_some()
    }

    /// Finds the cgroup and namespace of every local mesh pod of `cluster`
    /// that lacks one, checks that namespaces opened through /proc are still
    /// the pod's, and forgets pods that left. Cheap when nothing is
    /// pending: call it on every cluster change and on every tick while
    /// [`Self::unresolved`] is not 0. Returns whether anything changed.
    pub fn resolve(&mut self, cluster: &ClusterState, node: &str) -> bool {
        let before = self.pods.len();
        self.pods.retain(|uid, p| match cluster.pods.get(uid) {
            Some(pod) => &*pod.node == node && cluster.mesh_pod(uid).is_some(),
            // Not shown by the API server yet: only a fresh CNI handover waits.
            None => !p.seen && p.cni_at.is_some_and(|t| t.elapsed() < CNI_GRACE),
        });
        let mut changed = self.pods.len() != before;
        for pod in cluster.mesh_pods().filter(|p| &*p.node == node) {
            let entry = match self.pods.entry(pod.uid.clone()) {
                Entry::Occupied(o) => o.into_mut(),
                // A pod that does not run yet is enrolled through its CNI
                // handover, not found through /proc half made.
                Entry::Vacant(_) if !pod.running => continue,
                Entry::Vacant(v) => v.insert(LocalPod::new()),
            };
            entry.seen = true;
            changed |= resolve_one(&self.cgroups, &self.metrics, pod, entry);
        }
        self.metrics.pods_unresolved.set(self.unresolved() as i64);
        changed
    }
}

/// Resolves what `local` lacks; true when its cgroup or namespace changed.
fn resolve_one(cgroups: &PodCgroups, metrics: &K8sMetrics, pod: &cluster::Pod, local: &mut LocalPod) -> bool {
    let key = format!("{}/{}", pod.namespace, pod.name);
    let mut changed = false;
    let retry =
        |what: &str| metrics.resolution_retries.get_or_create(&WhatLabels { what: what.into() }).inc();
    if local.cgroup.is_none() {
        match cgroups.find(&pod.uid) {
            Ok(c) => {
                local.cgroup = Some(c);
                changed = true;
            }
            Err(e) => {
                retry("cgroup");
                local.waiting_for = Some(e.to_string());
            }
        }
    }
    let Some(cgroup) = local.cgroup.clone() else {
        return changed | warn_if_long(&key, local);
    };
    // A namespace found through a process is checked against that process:
    // when it is gone the pod may have a new sandbox, and a new namespace.
    let stale =
        matches!(&local.netns, Some((_, NetnsSource::Proc(found))) if !cgroups.still_running(&cgroup, found));
    if local.netns.is_none() || stale {
        match cgroups.open_netns(&cgroup, &key) {
            Ok(found) => {
                let same =
                    local.netns.as_ref().is_some_and(|(held, _)| same_namespace(held.fd(), found.netns.fd()));
                if same {
                    // Keep the fd the controller knows: an equal namespace is
                    // no change.
                    if let Some((_, source)) = &mut local.netns {
                        *source = NetnsSource::Proc(found);
                    }
                } else {
                    if stale {
                        tracing::info!(pod = %key, "the pod's network namespace changed (new sandbox)");
                    }
                    local.netns = Some((found.netns.clone(), NetnsSource::Proc(found)));
                    changed = true;
                }
            }
            Err(e) if stale => {
                // The process went; until another shows up the namespace
                // held is still the best knowledge (a container restart
                // keeps the sandbox).
                tracing::debug!(pod = %key, "no process to re-check the network namespace from: {e}");
            }
            Err(e) => {
                retry("netns");
                local.waiting_for = Some(e.to_string());
            }
        }
    }
    if local.is_resolved() {
        if local.waiting_for.take().is_some() || local.warned {
            tracing::info!(pod = %key, cgroup = %cgroup.display(), "pod's cgroup and network namespace found");
        }
        local.warned = false;
        return changed;
    }
    changed | warn_if_long(&key, local)
}

/// Says once when a pod has waited long for its cgroup or namespace.
fn warn_if_long(key: &str, local: &mut LocalPod) -> bool {
    if !local.warned && local.since.elapsed() > Duration::from_secs(30) {
        local.warned = true;
        tracing::warn!(
            pod = %key,
            "pod not enrolled after 30s, still retrying: {}",
            local.waiting_for.as_deref().unwrap_or("unknown")
        );
    }
    false
}

/// The configuration for the controller: `base`'s node-level sections (and
/// anything it lists itself), plus the cluster's workloads, namespaces'
/// modes, policies and services. Every mesh pod of the cluster is a workload;
/// this node's have `cgroup` and `netns` once both are found (until then
/// neither: the controller reports them not enrolled, and they are already
/// destinations). A namespace's modes from the cluster replace the base's;
/// `node.name` is `node`.
pub fn build_config(base: &Config, cluster: &ClusterState, local: &LocalPods, node: &str) -> Config {
    let mut config = base.clone();
    // The node is the one the pods are matched against, whatever the base says.
    config.node.name = node.to_owned();
    let mut index: HashMap<(&str, &str), usize> = HashMap::with_capacity(cluster.pods.len());
    for (i, w) in config.workloads.iter().enumerate() {
        index.insert((&w.namespace, &w.name), i);
    }
    let index_base = config.workloads.len();
    let mut ranks: Vec<u8> = Vec::new();
    let mut added: Vec<WorkloadConfig> = Vec::with_capacity(cluster.pods.len());
    for pod in cluster.mesh_pods() {
        let here = &*pod.node == node;
        let found = if here { local.get(&pod.uid) } else { None };
        let resolved = found.is_some_and(LocalPod::is_resolved);
        if !pod.running && !found.is_some_and(|l| l.is_resolved() && l.from_cni()) {
            // Pending, and not handed over by the CNI plugin yet.
            continue;
        }
        let addresses = if pod.ips.is_empty() {
            found.map(|l| l.cni_addresses.clone()).unwrap_or_default()
        } else {
            pod.ips.to_vec()
        };
        let (cgroup, netns) = match found {
            Some(l) if resolved => (l.cgroup.clone(), l.netns().cloned().map(NetnsRef::Held)),
            _ => (None, None),
        };
        let workload = WorkloadConfig {
            name: pod.name.to_string(),
            namespace: pod.namespace.to_string(),
            service_account: pod.service_account.to_string(),
            node: Some(pod.node.to_string()),
            cgroup,
            netns,
            addresses,
            ports: Vec::new(),
            labels: (*pod.labels).clone(),
            capture: Default::default(),
            mtls: None,
            authorization: None,
            outbound_passthrough: None,
        };
        // Two pods of one name (a StatefulSet's pod made again before the
        // old one's deletion was seen): the running, resolved one wins.
        let rank = u8::from(pod.running) + u8::from(resolved);
        match index.entry((&pod.namespace, &pod.name)) {
            std::collections::hash_map::Entry::Occupied(o) => {
                let at = *o.get();
                if at >= index_base && ranks[at - index_base] < rank {
                    added[at - index_base] = workload;
                    ranks[at - index_base] = rank;
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(index_base + added.len());
                added.push(workload);
                ranks.push(rank);
            }
        }
    }
    drop(index);
    give_addresses_one_owner(&config.workloads, &mut added, &ranks);
    config.workloads.extend(added);
    for (name, modes) in cluster.namespace_configs() {
        config.namespaces.insert(name.to_owned(), modes.clone());
    }
    // The kubelet probes pods from the node in plaintext: a strict pod
    // must still pass its readiness probe.
    config.authorization.node_probes.get_or_insert(true);
    let root = config.authorization.root_namespace.clone();
    config.policies.extend(cluster.policies_for(&root).map(|p| p.policy.clone()));
    config.services.extend(cluster.service_configs());
    config
}

/// An address belongs to one workload. Two running pods can claim one only
/// while the API server lags (an IP freed by a pod whose deletion has not
/// been seen yet, and given to a new one): the address stays with the
/// better-known pod (resolved on this node, then running), or the first,
/// and the other loses it until the lag is over, rather than making every
/// destination at that address ambiguous.
fn give_addresses_one_owner(base: &[WorkloadConfig], added: &mut [WorkloadConfig], ranks: &[u8]) {
    let mut owner: HashMap<IpAddr, String> = HashMap::with_capacity(added.len());
    for w in base {
        for a in &w.addresses {
            owner.insert(crate::workload::canonical(*a), w.to_string());
        }
    }
    let mut order: Vec<usize> = (0..added.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(ranks[i]));
    for i in order {
        let w = &mut added[i];
        let key = w.to_string();
        w.addresses.retain(|a| match owner.entry(crate::workload::canonical(*a)) {
            Entry::Vacant(v) => {
                v.insert(key.clone());
                true
            }
            Entry::Occupied(o) => {
                tracing::warn!(pod = %key, address = %a, "address is also {}'s (the API server lags?); left to it", o.get());
                false
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use kube::runtime::watcher::Event;

    use super::*;
    use crate::{
        config::{MtlsMode, NamespaceConfig},
        k8s::{
            cluster::{
                DATAPLANE_LABEL, MTLS_LABEL,
                tests::{filter, pod, uid},
            },
            discovery::Cache,
        },
    };

    const BASE: &str = "node: {name: node-a}\n";

    fn base() -> Config {
        Config::parse(BASE, Path::new("base.yaml")).unwrap()
    }

    fn ns(name: &str, labels: &[(&str, &str)]) -> k8s_openapi::api::core::v1::Namespace {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()}
        }))
        .unwrap()
    }
    use std::collections::BTreeMap;

    fn policy(ns: &str, name: &str, spec: serde_json::Value) -> kube::api::DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec,
        }))
        .unwrap()
    }

    /// A cache listed with `shop` (strict, in the mesh) and `dev` (not),
    /// pods on node-a and node-b, and a policy in each namespace.
    fn cluster() -> ClusterState {
        let mut c = Cache::new(filter());
        c.apply_namespace(Event::Init);
        c.apply_namespace(Event::InitApply(ns(
            "shop",
            &[(DATAPLANE_LABEL, "enabled"), (MTLS_LABEL, "strict")],
        )));
        c.apply_namespace(Event::InitApply(ns("dev", &[])));
        c.apply_namespace(Event::InitDone);
        c.apply_pod(Event::Init);
        c.apply_pod(Event::InitApply(pod("shop", "web", "node-a", &["198.19.1.2"])));
        c.apply_pod(Event::InitApply(pod("shop", "db", "node-b", &["198.19.2.2"])));
        c.apply_pod(Event::InitApply(pod("shop", "starting", "node-a", &[])));
        c.apply_pod(Event::InitApply(pod("dev", "tool", "node-a", &["198.19.1.9"])));
        c.apply_pod(Event::InitDone);
        c.apply_policy(Event::Init);
        c.apply_policy(Event::InitApply(policy(
            "shop",
            "db",
            serde_json::json!({"selector": {"matchLabels": {"app": "db"}}, "rules": [{}]}),
        )));
        c.apply_policy(Event::InitApply(policy(
            "dev",
            "x",
            serde_json::json!({"action": "DENY", "rules": [{}]}),
        )));
        c.apply_policy(Event::InitApply(policy("ztunnel-system", "mesh", serde_json::json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]}))));
        c.apply_policy(Event::InitDone);
        c.apply_service(Event::Init);
        c.apply_service(Event::InitDone);
        c.apply_endpoint_slice(Event::Init);
        c.apply_endpoint_slice(Event::InitDone);
        c.snapshot()
    }

    /// This node's running pod, found through /proc: its cgroup made in the
    /// kubelet's layout, a process in a container cgroup inside a network
    /// namespace; then the pod's sandbox made again in another namespace.
    #[test]
    fn a_running_pods_cgroup_and_netns_are_found_and_followed() {
        use crate::k8s::node::tests::{Fixture, inode};
        let mut f = Fixture::new("local");
        let uid = uid("shop", "web");
        let slice = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        );
        let pod_cgroup = f.make(&slice);
        let container = f.make(&format!("{slice}/cri-containerd-aaa.scope"));
        let metrics = K8sMetrics::default();
        let mut local =
            LocalPods::new(PodCgroups::new(&f.mount, [f.root("kubepods.slice")]), metrics.clone());
        let state = cluster();

        // The cgroup exists, no process yet: not resolved, counted, retried.
        assert!(local.resolve(&state, "node-a"), "the cgroup was found");
        assert_eq!(local.unresolved(), 1);
        assert!(metrics.resolution_retries.get_or_create(&WhatLabels { what: "netns".into() }).get() >= 1);
        let c = build_config(&base(), &state, &local, "node-a");
        let web = c.workloads.iter().find(|w| w.name == "web").unwrap();
        assert_eq!((web.cgroup.as_ref(), web.netns.as_ref()), (None, None), "neither until both are known");

        f.spawn_in(&container, 0);
        assert!(local.resolve(&state, "node-a"));
        assert_eq!(local.unresolved(), 0);
        let c = build_config(&base(), &state, &local, "node-a");
        let web = c.workloads.iter().find(|w| w.name == "web").unwrap().clone();
        assert_eq!(web.cgroup.as_deref(), Some(pod_cgroup.as_path()));
        let Some(NetnsRef::Held(held)) = &web.netns else { panic!("no held netns: {web:?}") };
        assert_eq!(inode(held.fd()), f.netns_inode(0));
        assert!(!local.resolve(&state, "node-a"), "nothing changed");
        assert_eq!(
            build_config(&base(), &state, &local, "node-a").workloads.iter().find(|w| w.name == "web"),
            Some(&web)
        );

        // A container restarts in the same sandbox: same namespace, no change.
        f.kill_all();
        f.spawn_in(&container, 0);
        assert!(!local.resolve(&state, "node-a"), "the same namespace is no change");
        assert_eq!(
            build_config(&base(), &state, &local, "node-a").workloads.iter().find(|w| w.name == "web"),
            Some(&web)
        );

        // The sandbox is made again: a new namespace, followed.
        f.kill_all();
        let second = f.add_netns();
        f.spawn_in(&container, second);
        assert!(local.resolve(&state, "node-a"), "a new sandbox is a change");
        let c = build_config(&base(), &state, &local, "node-a");
        let Some(NetnsRef::Held(held)) = &c.workloads.iter().find(|w| w.name == "web").unwrap().netns else {
            panic!()
        };
        assert_eq!(inode(held.fd()), f.netns_inode(second));

        // The pod leaves the mesh: forgotten, its namespace fd closed.
        let mut gone = state.clone();
        Arc::make_mut(&mut gone.pods).retain(|_, p| &*p.name != "web");
        assert!(local.resolve(&gone, "node-a"));
        assert!(local.get(&uid).is_none());
    }

    /// What the cluster makes is a configuration the file mode would load
    /// (its checks run on the YAML it prints as).
    #[test]
    fn the_config_passes_the_files_checks() {
        let state = cluster();
        let config = build_config(&base(), &state, &local(), "node-c");
        let mut value = serde_yaml_ng::to_value(&config).unwrap();
        // (`access_log` does not print as it reads; it is the base's anyway.)
        value.as_mapping_mut().unwrap().remove("access_log");
        let yaml = serde_yaml_ng::to_string(&value).unwrap();
        let reloaded =
            Config::parse(&yaml, Path::new("built.yaml")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(reloaded.workloads.len(), config.workloads.len());
    }

    #[test]
    fn an_address_claimed_twice_has_one_owner() {
        let mut c = Cache::new(filter());
        c.apply_namespace(Event::Init);
        c.apply_namespace(Event::InitApply(ns("shop", &[(DATAPLANE_LABEL, "enabled")])));
        c.apply_namespace(Event::InitDone);
        c.apply_pod(Event::Init);
        c.apply_pod(Event::InitApply(pod("shop", "old", "node-b", &["198.19.2.2"])));
        c.apply_pod(Event::InitApply(pod("shop", "new", "node-b", &["198.19.2.2", "fd7a:7e57::2"])));
        c.apply_pod(Event::InitDone);
        let config = build_config(&base(), &c.snapshot(), &local(), "node-a");
        let mut owners: Vec<(&str, IpAddr)> = config
            .workloads
            .iter()
            .flat_map(|w| w.addresses.iter().map(move |a| (w.name.as_str(), *a)))
            .collect();
        owners.sort();
        let v4: IpAddr = "198.19.2.2".parse().unwrap();
        assert_eq!(owners.iter().filter(|(_, a)| *a == v4).count(), 1, "{owners:?}");
        assert!(owners.contains(&("new", "fd7a:7e57::2".parse().unwrap())), "other addresses stay");
    }

    fn local() -> LocalPods {
        LocalPods::new(
            PodCgroups::new("/nonexistent-cgroup-mount", ["kubepods.slice"]),
            K8sMetrics::default(),
        )
    }

    #[test]
    fn the_cluster_becomes_the_files_sections() {
        let state = cluster();
        let c = build_config(&base(), &state, &local(), "node-a");
        let mut names: Vec<String> = c.workloads.iter().map(|w| format!("{w} on {:?}", w.node)).collect();
        names.sort();
        assert_eq!(
            names,
            ["shop/db on Some(\"node-b\")", "shop/web on Some(\"node-a\")"],
            "dev is not in the mesh; `starting` is not running"
        );
        let web = c.workloads.iter().find(|w| w.name == "web").unwrap();
        assert_eq!(web.service_account, "web-sa");
        assert_eq!((web.cgroup.as_ref(), web.netns.as_ref()), (None, None), "not resolved yet");
        assert_eq!(
            c.namespaces.get("shop"),
            Some(&NamespaceConfig { mtls: MtlsMode::Strict, ..NamespaceConfig::default() })
        );
        assert!(!c.namespaces.contains_key("dev"));
        let mut policies: Vec<String> = c.policies.iter().map(|p| p.key()).collect();
        policies.sort();
        assert_eq!(
            policies,
            ["shop/db", "ztunnel-system/mesh"],
            "policies of mesh namespaces and the root namespace"
        );
        assert_eq!(c.node.name, "node-a");
    }

    #[test]
    fn a_pod_handed_over_by_the_cni_plugin_is_a_local_workload_before_it_runs() {
        let state = cluster();
        let dir = tempfile::tempdir().unwrap();
        let uid = &*uid("shop", "starting");
        let cg = dir.path().join(format!("kubepods.slice/kubepods-pod{}.slice", uid.replace('-', "_")));
        std::fs::create_dir_all(&cg).unwrap();
        std::fs::write(cg.join("cgroup.procs"), "").unwrap();
        let mut local =
            LocalPods::new(PodCgroups::new(dir.path(), ["kubepods.slice"]), K8sMetrics::default());
        let fd = std::os::fd::OwnedFd::from(std::fs::File::open("/proc/self/ns/net").unwrap());
        let ip: IpAddr = "198.19.1.7".parse().unwrap();
        assert!(local.insert_from_cni(uid, HeldNetns::new(fd, "cni shop/starting"), vec![ip]));
        let c = build_config(&base(), &state, &local, "node-a");
        let w = c.workloads.iter().find(|w| w.name == "starting").expect("enrolled from the CNI handover");
        assert_eq!(w.cgroup.as_deref(), Some(cg.as_path()));
        assert!(matches!(&w.netns, Some(NetnsRef::Held(_))));
        assert_eq!(w.addresses, vec![ip]);
        // Called again: the same held namespace, so the controller sees no change.
        let again = build_config(&base(), &state, &local, "node-a");
        assert_eq!(again.workloads.iter().find(|w| w.name == "starting"), Some(w));
        // Resolution keeps a CNI handover (nothing to re-check) ...
        assert!(!local.resolve(&state, "node-a"));
        assert!(local.get(uid).unwrap().from_cni());
        // ... and DEL forgets it.
        assert!(local.remove(uid));
        assert!(
            build_config(&base(), &state, &local, "node-a").workloads.iter().all(|w| w.name != "starting")
        );
    }
}
