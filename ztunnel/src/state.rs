//! What the proxies read on every connection: the current registry and this
//! node's enrolled workloads, replaced as a whole on each configuration change.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use crate::{
    config::Config,
    workload::{LocalWorkload, Registry},
};

#[derive(Debug)]
pub struct State {
    /// Incremented on every applied configuration.
    pub generation: u64,
    pub config: Arc<Config>,
    pub registry: Registry,
    /// Enrolled workloads by capture workload id.
    pub local: HashMap<u32, Arc<LocalWorkload>>,
    /// The node's own addresses, when `authorization.node_probes` admits
    /// plaintext from them (else empty).
    pub node_addresses: HashSet<IpAddr>,
}

impl State {
    pub fn empty(config: Arc<Config>) -> Self {
        Self {
            generation: 0,
            config,
            registry: Registry::default(),
            local: HashMap::new(),
            node_addresses: HashSet::new(),
        }
    }
}

/// Readers take a snapshot per connection; the controller publishes new ones.
pub type StateWatch = tokio::sync::watch::Receiver<Arc<State>>;
