//! Discovery: watches Namespaces, Pods, Services, EndpointSlices and
//! AuthorizationPolicies cluster-wide, keeps a compact entry per object and
//! publishes a [`ClusterState`] on a watch channel.
//!
//! kube's watcher does the protocol (list, watch from the list's
//! resourceVersion, bookmarks, relist after 410 Gone or a lost stream); this
//! module keeps the cache right across it: a relist is gathered aside and
//! swapped in whole at its end, so objects deleted while the stream was down
//! disappear, and nothing is seen half-listed. Bursts are coalesced: one
//! state is published at most every `debounce`, and nothing before every
//! watcher has listed once.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Namespace as K8sNamespace, Pod as K8sPod, Service as K8sService},
    discovery::v1::EndpointSlice as K8sEndpointSlice,
};
use kube::{
    Api, Client, CustomResourceExt as _,
    api::DynamicObject,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    cluster::{
        ClusterState, EndpointSlice, Filter, Interner, Namespace, ObjectKey, Pod, PolicyEntry, Service,
    },
    crd::AuthorizationPolicy,
    metrics::{K8sMetrics, ResourceLabels},
};

/// What discovery needs to know.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// This node's name (`spec.nodeName` of its pods).
    pub node: String,
    /// The tunnel's own namespace: its pods are never workloads.
    pub tunnel_namespace: String,
    /// Changes are published at most this often (a relist of thousands of
    /// objects is one state, not thousands).
    pub debounce: Duration,
}

impl DiscoveryConfig {
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            tunnel_namespace: "ztunnel-system".into(),
            debounce: Duration::from_millis(100),
        }
    }
}

/// Starts discovery on the current tokio runtime. The receiver holds an
/// unsynced, empty state until every watcher has listed once.
pub fn spawn(
    client: Client,
    config: DiscoveryConfig,
    metrics: K8sMetrics,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<ClusterState>> {
    let (tx, rx) = watch::channel(Arc::new(ClusterState::default()));
    tokio::spawn(run(client, config, metrics, tx, shutdown));
    rx
}

/// One event from one of the watchers.
// Each update is moved once, from its stream to the cache: boxing the large
// variants would cost an allocation per event and save nothing.
#[allow(clippy::large_enum_variant)]
enum Update {
    Namespace(watcher::Result<Event<K8sNamespace>>),
    Pod(watcher::Result<Event<K8sPod>>),
    Service(watcher::Result<Event<K8sService>>),
    EndpointSlice(watcher::Result<Event<K8sEndpointSlice>>),
    Policy(watcher::Result<Event<DynamicObject>>),
}

/// Runs discovery until `shutdown`, publishing on `tx`.
pub async fn run(
    client: Client,
    config: DiscoveryConfig,
    metrics: K8sMetrics,
    tx: watch::Sender<Arc<ClusterState>>,
    shutdown: CancellationToken,
) {
    // Lists are served from the API server's watch cache (resourceVersion
    // 0), as the kubelet's and kube-proxy's are: thousands of nodes
    // relisting at once must not each make a quorum read of etcd.
    let wc = watcher::Config::default().any_semantic();
    let policies = Api::<DynamicObject>::all_with(client.clone(), &AuthorizationPolicy::api_resource());
    let streams: Vec<BoxStream<'static, Update>> = vec![
        watcher::watcher(Api::<K8sNamespace>::all(client.clone()), wc.clone())
            .default_backoff()
            .map(Update::Namespace)
            .boxed(),
        watcher::watcher(Api::<K8sPod>::all(client.clone()), wc.clone())
            .default_backoff()
            .map(Update::Pod)
            .boxed(),
        watcher::watcher(Api::<K8sService>::all(client.clone()), wc.clone())
            .default_backoff()
            .map(Update::Service)
            .boxed(),
        watcher::watcher(Api::<K8sEndpointSlice>::all(client.clone()), wc.clone())
            .default_backoff()
            .map(Update::EndpointSlice)
            .boxed(),
        watcher::watcher(policies, wc).default_backoff().map(Update::Policy).boxed(),
    ];
    let mut updates = futures::stream::select_all(streams);
    let debounce = config.debounce;
    let mut cache =
        Cache::new(Filter { node: config.node, tunnel_namespace: config.tunnel_namespace, metrics });
    let mut due: Option<Instant> = None;
    loop {
        let wake = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            update = updates.next() => {
                let Some(update) = update else { return };
                if cache.apply(update) && due.is_none() {
                    due = Some(Instant::now() + debounce);
                }
            }
            _ = tokio::time::sleep_until(wake), if due.is_some() => {
                due = None;
                if let Some(state) = cache.publish()
                    && tx.send(Arc::new(state)).is_err()
                {
                    return;
                }
            }
        }
    }
}

/// One resource's entries, with the relist in progress gathered aside.
struct Store<K, V> {
    resource: &'static str,
    live: Arc<BTreeMap<K, Arc<V>>>,
    relist: Option<BTreeMap<K, Arc<V>>>,
    /// Whether a full list has completed once.
    listed: bool,
}

impl<K: Ord + Clone, V: PartialEq> Store<K, V> {
    fn new(resource: &'static str) -> Self {
        Self { resource, live: Arc::default(), relist: None, listed: false }
    }

    /// Applies one event; true when the live entries changed (or the first
    /// list completed). `convert` gets the object and its entry in force.
    fn apply<O>(
        &mut self,
        event: Event<O>,
        metrics: &K8sMetrics,
        key: impl Fn(&O) -> Option<K>,
        mut convert: impl FnMut(&O, Option<&V>) -> Option<V>,
    ) -> bool {
        match event {
            Event::Init => {
                if self.listed {
                    K8sMetrics::resource(&metrics.relists, self.resource).inc();
                    tracing::info!(resource = self.resource, "relisting");
                }
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(obj) => {
                let Some(k) = key(&obj) else { return false };
                let before = self.live.get(&k);
                if let Some(v) = convert(&obj, before.map(|b| &**b)) {
                    // An unchanged entry is shared, so the swap below can
                    // tell a relist that changed nothing by pointers.
                    let v = match before {
                        Some(b) if **b == v => b.clone(),
                        _ => Arc::new(v),
                    };
                    self.relist.get_or_insert_with(BTreeMap::new).insert(k, v);
                }
                false
            }
            Event::InitDone => {
                let first = !self.listed;
                self.listed = true;
                // kube's watcher always starts a list with Init; without one
                // there is nothing to swap in.
                let Some(listed) = self.relist.take() else {
                    return first;
                };
                let same = listed.len() == self.live.len()
                    && listed
                        .iter()
                        .zip(self.live.iter())
                        .all(|((k1, v1), (k2, v2))| k1 == k2 && Arc::ptr_eq(v1, v2));
                if !same {
                    self.live = Arc::new(listed);
                }
                metrics
                    .cached
                    .get_or_create(&ResourceLabels { resource: self.resource.into() })
                    .set(self.live.len() as i64);
                first || !same
            }
            Event::Apply(obj) => {
                let Some(k) = key(&obj) else { return false };
                let before = self.live.get(&k).cloned();
                let changed = match convert(&obj, before.as_deref()) {
                    Some(v) if before.as_deref() == Some(&v) => false,
                    Some(v) => {
                        Arc::make_mut(&mut self.live).insert(k, Arc::new(v));
                        true
                    }
                    // No longer of interest (a pod that finished, a Service
                    // made headless): as good as deleted.
                    None => before.is_some() && Arc::make_mut(&mut self.live).remove(&k).is_some(),
                };
                metrics
                    .cached
                    .get_or_create(&ResourceLabels { resource: self.resource.into() })
                    .set(self.live.len() as i64);
                changed
            }
            Event::Delete(obj) => {
                let Some(k) = key(&obj) else { return false };
                let changed =
                    self.live.contains_key(&k) && Arc::make_mut(&mut self.live).remove(&k).is_some();
                metrics
                    .cached
                    .get_or_create(&ResourceLabels { resource: self.resource.into() })
                    .set(self.live.len() as i64);
                changed
            }
        }
    }
}

/// The compact cache of everything discovery watches.
pub struct Cache {
    filter: Filter,
    interner: Interner,
    namespaces: Store<Arc<str>, Namespace>,
    pods: Store<Arc<str>, Pod>,
    services: Store<ObjectKey, Service>,
    endpoint_slices: Store<ObjectKey, EndpointSlice>,
    policies: Store<ObjectKey, PolicyEntry>,
    generation: u64,
}

fn object_key(meta: &kube::core::ObjectMeta) -> Option<ObjectKey> {
    Some((Arc::from(meta.namespace.as_deref()?), meta.name.as_deref()?.into()))
}

impl Cache {
    pub fn new(filter: Filter) -> Self {
        Self {
            filter,
            interner: Interner::default(),
            namespaces: Store::new("Namespace"),
            pods: Store::new("Pod"),
            services: Store::new("Service"),
            endpoint_slices: Store::new("EndpointSlice"),
            policies: Store::new("AuthorizationPolicy"),
            generation: 0,
        }
    }

    fn watch_error(&self, resource: &str, e: &watcher::Error) {
        K8sMetrics::resource(&self.filter.metrics.watch_errors, resource).inc();
        let hint = match e {
            watcher::Error::InitialListFailed(kube::Error::Api(s))
                if s.code == 404 && resource == "AuthorizationPolicy" =>
            {
                " (is the AuthorizationPolicy CRD installed? `ztunnel crd` prints it)"
            }
            watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
                if s.code == 403 =>
            {
                " (the tunnel's ServiceAccount needs list and watch on it, cluster-wide)"
            }
            _ => "",
        };
        tracing::warn!(resource, "watch failed, retrying with backoff: {e}{hint}");
    }

    /// Applies one watcher event; true when the cache changed.
    fn apply(&mut self, update: Update) -> bool {
        let (f, i) = (&self.filter, &mut self.interner);
        let m = &f.metrics;
        match update {
            Update::Namespace(Ok(e)) => self.namespaces.apply(
                e,
                m,
                |o: &K8sNamespace| o.metadata.name.as_deref().map(Arc::from),
                |o, before| Namespace::from_k8s(o, before, f, i),
            ),
            Update::Pod(Ok(e)) => self.pods.apply(
                e,
                m,
                |o: &K8sPod| o.metadata.uid.as_deref().map(Arc::from),
                |o, _| Pod::from_k8s(o, f, i),
            ),
            Update::Service(Ok(e)) => self.services.apply(
                e,
                m,
                |o: &K8sService| object_key(&o.metadata),
                |o, _| Service::from_k8s(o, i),
            ),
            Update::EndpointSlice(Ok(e)) => self.endpoint_slices.apply(
                e,
                m,
                |o: &K8sEndpointSlice| object_key(&o.metadata),
                |o, _| EndpointSlice::from_k8s(o, i),
            ),
            Update::Policy(Ok(e)) => self.policies.apply(
                e,
                m,
                |o: &DynamicObject| object_key(&o.metadata),
                |o, _| PolicyEntry::from_k8s(o, f),
            ),
            Update::Namespace(Err(e)) => {
                self.watch_error("Namespace", &e);
                false
            }
            Update::Pod(Err(e)) => {
                self.watch_error("Pod", &e);
                false
            }
            Update::Service(Err(e)) => {
                self.watch_error("Service", &e);
                false
            }
            Update::EndpointSlice(Err(e)) => {
                self.watch_error("EndpointSlice", &e);
                false
            }
            Update::Policy(Err(e)) => {
                self.watch_error("AuthorizationPolicy", &e);
                false
            }
        }
    }

    /// Whether every watcher has listed once.
    pub fn synced(&self) -> bool {
        self.namespaces.listed
            && self.pods.listed
            && self.services.listed
            && self.endpoint_slices.listed
            && self.policies.listed
    }

    /// The state to publish, once synced.
    fn publish(&mut self) -> Option<ClusterState> {
        if !self.synced() {
            let waiting: Vec<&str> = [
                (self.namespaces.listed, self.namespaces.resource),
                (self.pods.listed, self.pods.resource),
                (self.services.listed, self.services.resource),
                (self.endpoint_slices.listed, self.endpoint_slices.resource),
                (self.policies.listed, self.policies.resource),
            ]
            .into_iter()
            .filter(|(listed, _)| !listed)
            .map(|(_, r)| r)
            .collect();
            tracing::debug!(?waiting, "not publishing before every resource has been listed");
            return None;
        }
        self.interner.purge_if_grown();
        self.generation += 1;
        let state = self.snapshot();
        if self.generation == 1 {
            tracing::info!(
                namespaces_in_mesh = state.namespace_configs().count(),
                mesh_pods = state.mesh_pods().count(),
                services = state.services.len(),
                policies = state.policies.len(),
                "Kubernetes discovery synced"
            );
        }
        let m = &self.filter.metrics;
        m.synced.set(1);
        m.publications.inc();
        m.policies_failed_closed.set(state.failed_closed_policies() as i64);
        Some(state)
    }

    /// The cache as a state (shares the maps; the next change to one copies
    /// its index, never the entries).
    pub fn snapshot(&self) -> ClusterState {
        ClusterState {
            synced: self.synced(),
            generation: self.generation,
            namespaces: self.namespaces.live.clone(),
            pods: self.pods.live.clone(),
            services: self.services.live.clone(),
            endpoint_slices: self.endpoint_slices.live.clone(),
            policies: self.policies.live.clone(),
        }
    }

    /// Feeds events directly (tests, benchmarks).
    #[doc(hidden)]
    pub fn apply_pod(&mut self, e: Event<K8sPod>) -> bool {
        self.apply(Update::Pod(Ok(e)))
    }
    #[doc(hidden)]
    pub fn apply_namespace(&mut self, e: Event<K8sNamespace>) -> bool {
        self.apply(Update::Namespace(Ok(e)))
    }
    #[doc(hidden)]
    pub fn apply_service(&mut self, e: Event<K8sService>) -> bool {
        self.apply(Update::Service(Ok(e)))
    }
    #[doc(hidden)]
    pub fn apply_endpoint_slice(&mut self, e: Event<K8sEndpointSlice>) -> bool {
        self.apply(Update::EndpointSlice(Ok(e)))
    }
    #[doc(hidden)]
    pub fn apply_policy(&mut self, e: Event<DynamicObject>) -> bool {
        self.apply(Update::Policy(Ok(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::cluster::tests::{filter, pod};

    fn listed(cache: &mut Cache) {
        for done in [
            Update::Namespace(Ok(Event::InitDone)),
            Update::Service(Ok(Event::InitDone)),
            Update::EndpointSlice(Ok(Event::InitDone)),
            Update::Policy(Ok(Event::InitDone)),
        ] {
            cache.apply(done);
        }
    }

    #[test]
    fn nothing_is_published_before_every_resource_has_listed() {
        let mut c = Cache::new(filter());
        listed(&mut c);
        assert!(c.publish().is_none(), "pods not listed yet");
        c.apply_pod(Event::Init);
        c.apply_pod(Event::InitApply(pod("shop", "web", "node-b", &["198.19.1.2"])));
        assert!(c.publish().is_none(), "pods still mid-list");
        assert!(c.apply_pod(Event::InitDone));
        let s = c.publish().unwrap();
        assert!(s.synced);
        assert_eq!(s.pods.len(), 1);
    }

    #[test]
    fn a_relist_drops_what_was_deleted_while_disconnected() {
        let mut c = Cache::new(filter());
        listed(&mut c);
        c.apply_pod(Event::Init);
        for name in ["a", "b", "c"] {
            c.apply_pod(Event::InitApply(pod("shop", name, "node-b", &["198.19.1.2"])));
        }
        c.apply_pod(Event::InitDone);
        let before = c.publish().unwrap();
        assert_eq!(before.pods.len(), 3);

        // The stream drops; `b` is deleted and `d` created meanwhile; the
        // watcher relists.
        assert!(!c.apply_pod(Event::Init));
        for name in ["a", "c", "d"] {
            assert!(!c.apply_pod(Event::InitApply(pod("shop", name, "node-b", &["198.19.1.2"]))));
            assert_eq!(c.snapshot().pods.len(), 3, "the old state stays whole until the relist completes");
        }
        assert!(c.apply_pod(Event::InitDone));
        let after = c.publish().unwrap();
        let mut names: Vec<&str> = after.pods.values().map(|p| &*p.name).collect();
        names.sort();
        assert_eq!(names, ["a", "c", "d"]);
        assert_eq!(
            c.filter.metrics.relists.get_or_create(&ResourceLabels { resource: "Pod".into() }).get(),
            1
        );
        // Unchanged entries are the same allocations: nothing was copied.
        let a = |s: &ClusterState| s.pods.values().find(|p| &*p.name == "a").unwrap().clone();
        assert!(Arc::ptr_eq(&a(&before), &a(&after)));
    }

    #[test]
    fn a_relist_that_changes_nothing_is_no_change() {
        let mut c = Cache::new(filter());
        listed(&mut c);
        c.apply_pod(Event::Init);
        c.apply_pod(Event::InitApply(pod("shop", "a", "node-b", &["198.19.1.2"])));
        c.apply_pod(Event::InitDone);
        c.publish().unwrap();
        c.apply_pod(Event::Init);
        c.apply_pod(Event::InitApply(pod("shop", "a", "node-b", &["198.19.1.2"])));
        assert!(!c.apply_pod(Event::InitDone));
        // And a real change after it is one.
        c.apply_pod(Event::Init);
        c.apply_pod(Event::InitApply(pod("shop", "a", "node-b", &["198.19.1.3"])));
        assert!(c.apply_pod(Event::InitDone));
    }

    #[test]
    fn apply_and_delete_change_the_cache_only_when_the_entry_changes() {
        let mut c = Cache::new(filter());
        listed(&mut c);
        c.apply_pod(Event::Init);
        c.apply_pod(Event::InitDone);
        let web = pod("shop", "web", "node-b", &["198.19.1.2"]);
        assert!(c.apply_pod(Event::Apply(web.clone())));
        let mut annotated = web.clone();
        annotated.metadata.annotations = Some([("x".to_owned(), "y".to_owned())].into());
        assert!(!c.apply_pod(Event::Apply(annotated)), "nothing the tunnel keeps changed");
        let mut finished = web.clone();
        finished.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(c.apply_pod(Event::Apply(finished)), "a pod that stops being a workload goes");
        assert!(c.snapshot().pods.is_empty());
        assert!(!c.apply_pod(Event::Delete(web.clone())), "already gone");
        assert!(c.apply_pod(Event::Apply(web.clone())));
        assert!(c.apply_pod(Event::Delete(web)));
        assert!(c.snapshot().pods.is_empty());
    }

    #[test]
    fn a_published_state_never_changes_under_its_reader() {
        let mut c = Cache::new(filter());
        listed(&mut c);
        c.apply_pod(Event::Init);
        c.apply_pod(Event::InitApply(pod("shop", "a", "node-b", &["198.19.1.2"])));
        c.apply_pod(Event::InitDone);
        let held = c.publish().unwrap();
        c.apply_pod(Event::Apply(pod("shop", "b", "node-b", &["198.19.1.3"])));
        assert_eq!(held.pods.len(), 1);
        assert_eq!(c.snapshot().pods.len(), 2);
    }
}
