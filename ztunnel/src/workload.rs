//! The workloads a node knows: the mesh registry (who is at which address,
//! under which identity, on which node) and this node's enrolled workloads.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;

use crate::{
    cgroup::Cgroup,
    config::{Config, WorkloadConfig},
    identity::spiffe::{SpiffeError, SpiffeId},
    netns::Netns,
};

/// One workload of the mesh, local or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub identity: SpiffeId,
    pub node: String,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<u16>,
    pub labels: BTreeMap<String, String>,
    /// Whether the workload has a network namespace of its own (a pod).
    pub has_netns: bool,
}

impl Workload {
    pub fn from_config(config: &Config, w: &WorkloadConfig) -> Result<Self, SpiffeError> {
        let on_this_node = w.is_on(&config.node.name);
        // A plain-host workload on this node shares the node's addresses.
        let addresses = if w.addresses.is_empty() && on_this_node && w.netns.is_none() {
            config.node.addresses.clone()
        } else {
            w.addresses.clone()
        };
        Ok(Self {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            identity: w.spiffe_id(&config.trust_domain)?,
            node: w.node.clone().unwrap_or_else(|| config.node.name.clone()),
            addresses,
            ports: w.ports.clone(),
            labels: w.labels.clone(),
            has_netns: w.netns.is_some(),
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the workload serves `port` (a workload without `ports`
    /// serves every port).
    pub fn serves(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }
}

/// Who is at which address.
#[derive(Debug, Default)]
pub struct Registry {
    by_address: HashMap<IpAddr, Vec<Arc<Workload>>>,
    /// Service virtual addresses (ClusterIP, port) to their ready endpoints.
    services: HashMap<SocketAddr, Arc<ServiceRoute>>,
}

/// Where a Service's virtual address leads.
#[derive(Debug, PartialEq, Eq)]
pub struct ServiceRoute {
    /// `namespace/name`.
    pub service: String,
    /// Ready endpoints (address, target port); empty: the Service has none.
    pub endpoints: Vec<SocketAddr>,
}

impl ServiceRoute {
    /// One ready endpoint, chosen at random (as kube-proxy's iptables mode
    /// spreads connections), or None.
    pub fn pick(&self) -> Option<SocketAddr> {
        match self.endpoints.len() {
            0 => None,
            n => Some(self.endpoints[fastrand::usize(..n)]),
        }
    }
}

impl Registry {
    pub fn new(workloads: impl IntoIterator<Item = Arc<Workload>>) -> Self {
        let mut by_address: HashMap<IpAddr, Vec<Arc<Workload>>> = HashMap::new();
        for w in workloads {
            for a in &w.addresses {
                by_address.entry(canonical(*a)).or_default().push(w.clone());
            }
        }
        Self { by_address, services: HashMap::new() }
    }

    /// Adds the Services' virtual addresses (their ready endpoints as the
    /// configuration has them now).
    pub fn with_services(mut self, services: &[crate::config::ServiceConfig]) -> Self {
        for s in services {
            for port in &s.ports {
                let endpoints: Vec<SocketAddr> = s
                    .ready_endpoints(port.port)
                    .into_iter()
                    .map(|(ip, target)| SocketAddr::new(canonical(ip), target))
                    .collect();
                let route = Arc::new(ServiceRoute { service: s.key(), endpoints });
                for a in &s.addresses {
                    self.services.insert(SocketAddr::new(canonical(*a), port.port), route.clone());
                }
            }
        }
        self
    }

    /// The Service whose virtual address is `dst`, if any.
    pub fn service(&self, dst: SocketAddr) -> Option<&Arc<ServiceRoute>> {
        if self.services.is_empty() {
            return None;
        }
        self.services.get(&SocketAddr::new(canonical(dst.ip()), dst.port()))
    }

    /// The workload serving `dst`, if the mesh has one.
    pub fn find(&self, dst: SocketAddr) -> Option<&Arc<Workload>> {
        self.by_address.get(&canonical(dst.ip()))?.iter().find(|w| w.serves(dst.port()))
    }

    /// Every workload at `ip` (several: a node's plain-host workloads).
    pub fn at(&self, ip: IpAddr) -> &[Arc<Workload>] {
        self.by_address.get(&canonical(ip)).map_or(&[], Vec::as_slice)
    }

    /// The workload a connection from `ip` came from: the one there holding
    /// `identity` when the caller proved one, else the only one there.
    pub fn source(&self, ip: IpAddr, identity: Option<&SpiffeId>) -> Option<&Arc<Workload>> {
        let there = self.at(ip);
        match identity {
            Some(id) => there.iter().find(|w| &w.identity == id),
            None if there.len() == 1 => there.first(),
            None => None,
        }
    }

    /// Whether several workloads share `ip` (a node's plain-host workloads),
    /// telling their traffic apart by port.
    pub fn is_shared(&self, ip: IpAddr) -> bool {
        self.by_address.get(&canonical(ip)).is_some_and(|w| w.len() > 1)
    }
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A workload enrolled on this node.
#[derive(Debug)]
pub struct LocalWorkload {
    /// The number capture stamps on this workload's connections.
    pub id: u32,
    pub workload: Arc<Workload>,
    pub cgroup: Cgroup,
    pub cgroup_id: u64,
    /// The namespace the workload's sockets live in: its own (a pod) or the
    /// node's (a plain-host workload).
    pub netns: Netns,
    pub config: WorkloadConfig,
}

impl LocalWorkload {
    pub fn is_pod(&self) -> bool {
        self.workload.has_netns
    }

    /// The workload's own address of `dst`'s family, used as the source a peer
    /// sees (and in `forwarded`).
    pub fn source_ip_for(&self, dst: SocketAddr) -> Option<IpAddr> {
        let want_v4 = canonical(dst.ip()).is_ipv4();
        self.workload.addresses.iter().copied().find(|a| a.is_ipv4() == want_v4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::spiffe::TrustDomain;

    fn workload(name: &str, addrs: &[&str], ports: &[u16]) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.into(),
            namespace: "default".into(),
            service_account: name.into(),
            identity: SpiffeId::new(TrustDomain::default(), "default", name).unwrap(),
            node: "n".into(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ports: ports.to_vec(),
            labels: BTreeMap::new(),
            has_netns: false,
        })
    }

    #[test]
    fn finds_workloads_by_address_and_port() {
        let reg = Registry::new([
            workload("pod", &["198.19.1.2", "fd7a:7e57:1::2"], &[]),
            workload("host-a", &["198.18.0.1"], &[80]),
            workload("host-b", &["198.18.0.1"], &[443]),
        ]);
        let find = |s: &str| reg.find(s.parse().unwrap()).map(|w| w.name.clone());
        assert_eq!(find("198.19.1.2:1234").as_deref(), Some("pod"));
        assert_eq!(find("[fd7a:7e57:1::2]:1").as_deref(), Some("pod"));
        assert_eq!(find("[::ffff:198.19.1.2]:1").as_deref(), Some("pod"));
        assert_eq!(find("198.18.0.1:80").as_deref(), Some("host-a"));
        assert_eq!(find("198.18.0.1:443").as_deref(), Some("host-b"));
        assert_eq!(find("198.18.0.1:22"), None);
        assert!(reg.is_shared("198.18.0.1".parse().unwrap()));
        assert!(!reg.is_shared("198.19.1.2".parse().unwrap()));
        assert_eq!(find("198.19.9.9:80"), None);
        let source =
            |s: &str, id: Option<&SpiffeId>| reg.source(s.parse().unwrap(), id).map(|w| w.name.clone());
        assert_eq!(source("198.19.1.2", None).as_deref(), Some("pod"));
        // A shared address names its workload only with the caller's identity.
        assert_eq!(source("198.18.0.1", None), None);
        let b = SpiffeId::new(TrustDomain::default(), "default", "host-b").unwrap();
        assert_eq!(source("198.18.0.1", Some(&b)).as_deref(), Some("host-b"));
        assert_eq!(source("198.19.9.9", None), None);
    }
}
