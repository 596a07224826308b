//! Which pods run where, as the CA needs it: a compact cache of every pod's
//! uid, node, service account and phase, fed by one watch of all pods (no
//! API request per certificate), indexed by (node, namespace, service
//! account) for node authorization.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{ca::signer::NodeAuthorizer, identity::spiffe::SpiffeId};

/// What the CA keeps of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    /// Empty until scheduled.
    pub node: String,
    pub service_account: String,
    pub phase: String,
}

impl PodFacts {
    pub fn from_pod(pod: &Pod) -> Option<((String, String), Self)> {
        let ns = pod.metadata.namespace.clone()?;
        let name = pod.metadata.name.clone()?;
        let spec = pod.spec.as_ref();
        let facts = Self {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            // The API server defaults it to `default`.
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned()),
            phase: pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_else(|| "Pending".to_owned()),
        };
        Some(((ns, name), facts))
    }

    /// Scheduled and not finished: being started (Pending, the tunnel enrols
    /// it at sandbox creation and it needs its certificate before its first
    /// connection) or Running. Succeeded and Failed pods hold nothing.
    pub fn is_live(&self) -> bool {
        !self.node.is_empty() && matches!(self.phase.as_str(), "Pending" | "Running" | "Unknown")
    }
}

type PodKey = (String, String);
/// (node, namespace, service account).
type PlaceKey = (String, String, String);

#[derive(Default)]
struct Index {
    pods: HashMap<PodKey, PodFacts>,
    /// Live pods per (node, namespace, service account).
    placed: HashMap<PlaceKey, usize>,
    /// A relist in progress (kube's watcher: Init, InitApply..., InitDone).
    relist: Option<HashMap<PodKey, PodFacts>>,
}

impl Index {
    fn place_key(ns: &str, f: &PodFacts) -> PlaceKey {
        (f.node.clone(), ns.to_owned(), f.service_account.clone())
    }

    fn count(&mut self, ns: &str, f: &PodFacts, add: bool) {
        if !f.is_live() {
            return;
        }
        let k = Self::place_key(ns, f);
        if add {
            *self.placed.entry(k).or_default() += 1;
        } else if let Some(n) = self.placed.get_mut(&k) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.placed.remove(&k);
            }
        }
    }

    fn upsert(&mut self, key: PodKey, facts: PodFacts) {
        let ns = key.0.clone();
        if let Some(old) = self.pods.insert(key, facts.clone()) {
            self.count(&ns, &old, false);
        }
        self.count(&ns, &facts, true);
    }

    fn remove(&mut self, key: &PodKey) {
        if let Some(old) = self.pods.remove(key) {
            self.count(&key.0, &old, false);
        }
    }

    fn replace_all(&mut self, pods: HashMap<PodKey, PodFacts>) {
        self.pods.clear();
        self.placed.clear();
        for (k, f) in pods {
            self.upsert(k, f);
        }
    }

    fn apply(&mut self, event: Event<Pod>) {
        match event {
            Event::Init => self.relist = Some(HashMap::new()),
            Event::InitApply(pod) => {
                if let Some((k, f)) = PodFacts::from_pod(&pod) {
                    self.relist.get_or_insert_with(HashMap::new).insert(k, f);
                }
            }
            Event::InitDone => {
                if let Some(listed) = self.relist.take() {
                    self.replace_all(listed);
                }
            }
            Event::Apply(pod) => {
                if let Some((k, f)) = PodFacts::from_pod(&pod) {
                    self.upsert(k, f);
                }
            }
            Event::Delete(pod) => {
                if let Some((k, _)) = PodFacts::from_pod(&pod) {
                    self.remove(&k);
                }
            }
        }
    }
}

/// The pod cache. Cheap to clone; answers from memory.
#[derive(Clone, Default)]
pub struct PodIndex {
    inner: Arc<RwLock<Index>>,
}

impl PodIndex {
    fn read<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        match self.inner.read() {
            Ok(i) => f(&i),
            Err(p) => f(&p.into_inner()),
        }
    }

    fn write(&self, f: impl FnOnce(&mut Index)) {
        match self.inner.write() {
            Ok(mut i) => f(&mut i),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    pub fn apply(&self, event: Event<Pod>) {
        self.write(|i| i.apply(event));
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        self.read(|i| i.pods.get(&(namespace.to_owned(), name.to_owned())).cloned())
    }

    pub fn len(&self) -> usize {
        self.read(|i| i.pods.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a live pod of `namespace/service_account` is on `node`.
    pub fn is_placed(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        let k = (node.to_owned(), namespace.to_owned(), service_account.to_owned());
        self.read(|i| i.placed.contains_key(&k))
    }

    /// Watches every pod until `shutdown`; `synced` turns true after the
    /// first complete list. Watch errors are retried with kube's backoff and
    /// logged (the cache keeps its last state meanwhile).
    pub async fn run(self, client: Client, synced: watch::Sender<bool>, shutdown: CancellationToken) {
        // From the API server's watch cache (resourceVersion 0), as the
        // kubelet's lists are.
        let config = watcher::Config::default().any_semantic();
        let mut events = watcher::watcher(Api::<Pod>::all(client), config).default_backoff().boxed();
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                e = events.next() => match e {
                    Some(e) => e,
                    None => return,
                },
            };
            match event {
                Ok(e) => {
                    let done = matches!(e, Event::InitDone);
                    self.apply(e);
                    if done && !*synced.borrow() {
                        tracing::info!(target: "ca", pods = self.len(), "pod list synced");
                        synced.send_replace(true);
                    }
                }
                Err(e) => tracing::warn!(target: "ca", "watching pods (retrying): {e}"),
            }
        }
    }
}

impl NodeAuthorizer for PodIndex {
    fn workload(&self, id: &SpiffeId, node: &str) -> Result<(), String> {
        let (ns, sa) = (id.namespace(), id.service_account());
        if self.is_placed(node, ns, sa) {
            Ok(())
        } else {
            Err(format!("no running pod with service account {ns}/{sa} is on node {node}"))
        }
    }

    fn node_credential(&self, _node: &str) -> Result<(), String> {
        Err("in a cluster a node proves itself with its ServiceAccount token; node credentials are not issued".into())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(ns: &str, name: &str, sa: &str, node: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "namespace": ns, "name": name, "uid": format!("uid-{name}") },
            "spec": { "nodeName": node, "serviceAccountName": sa, "containers": [] },
            "status": { "phase": phase },
        }))
        .unwrap()
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        format!("spiffe://cluster.local/ns/{ns}/sa/{sa}").parse().unwrap()
    }

    #[test]
    fn identities_follow_their_pods_across_nodes_and_phases() {
        let index = PodIndex::default();
        index.apply(Event::Init);
        index.apply(Event::InitApply(pod("shop", "web-1", "web", "node-a", "Running")));
        index.apply(Event::InitApply(pod("shop", "web-2", "web", "node-a", "Pending")));
        index.apply(Event::InitDone);
        assert!(index.workload(&id("shop", "web"), "node-a").is_ok());
        let e = index.workload(&id("shop", "web"), "node-b").unwrap_err();
        assert_eq!(e, "no running pod with service account shop/web is on node node-b");

        // One of two pods goes: the other still holds the identity.
        index.apply(Event::Delete(pod("shop", "web-1", "web", "node-a", "Running")));
        assert!(index.workload(&id("shop", "web"), "node-a").is_ok());
        // The last one finishes: nothing left on node-a.
        index.apply(Event::Apply(pod("shop", "web-2", "web", "node-a", "Succeeded")));
        assert!(index.workload(&id("shop", "web"), "node-a").is_err());
        // Rescheduled elsewhere.
        index.apply(Event::Apply(pod("shop", "web-3", "web", "node-b", "Running")));
        assert!(index.workload(&id("shop", "web"), "node-b").is_ok());
        assert!(index.workload(&id("shop", "web"), "node-a").is_err());

        // A relist replaces everything.
        index.apply(Event::Init);
        index.apply(Event::InitApply(pod("shop", "db-1", "db", "node-a", "Running")));
        index.apply(Event::InitDone);
        assert!(index.workload(&id("shop", "web"), "node-b").is_err(), "web-3 was not relisted");
        assert!(index.workload(&id("shop", "db"), "node-a").is_ok());
        assert_eq!(index.get("shop", "db-1").unwrap().uid, "uid-db-1");
        assert!(index.node_credential("node-a").is_err());
    }
}
