//! Services: a virtual address (a Kubernetes ClusterIP) and ports, carried to
//! one ready endpoint chosen by the tunnel.
//!
//! The shape mirrors a Service and its EndpointSlices, so the Kubernetes mode
//! fills it as the API server has it, and a file can say the same:
//!
//! ```yaml
//! services:
//!   - name: db
//!     namespace: shop
//!     addresses: [10.96.0.10]
//!     ports: [{name: pg, port: 5432}]
//!     endpoint_slices:
//!       - ports: [{name: pg, port: 15432}]     # the targetPort, resolved per slice
//!         endpoints:
//!           - {address: 198.19.2.11, node: node-b}
//!           - {address: 198.19.2.12, ready: false}
//! ```
//!
//! A service port reaches, in each slice, the slice port of the same name
//! (the unnamed port matches the unnamed one): named target ports are already
//! resolved there, per pod, by whoever wrote the slice.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    #[serde(default = "super::default_segment")]
    pub namespace: String,
    /// The virtual addresses clients dial (ClusterIPs, IPv4 and IPv6).
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoint_slices: Vec<EndpointSlice>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// Empty for a service's only, unnamed port.
    #[serde(default)]
    pub name: String,
    pub port: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSlice {
    /// The endpoints' ports, by the service port's name.
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub address: IpAddr,
    #[serde(default = "ready")]
    pub ready: bool,
    /// The node it runs on, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

fn ready() -> bool {
    true
}

impl ServiceConfig {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The ready endpoints of service port `port`, as (address, target port).
    pub fn ready_endpoints(&self, port: u16) -> Vec<(IpAddr, u16)> {
        let Some(name) = self.ports.iter().find(|p| p.port == port).map(|p| p.name.as_str()) else {
            return Vec::new();
        };
        self.endpoint_slices
            .iter()
            .filter_map(|s| s.ports.iter().find(|p| p.name == name).map(|p| (s, p.port)))
            .flat_map(|(s, target)| s.endpoints.iter().filter(|e| e.ready).map(move |e| (e.address, target)))
            .collect()
    }

    /// What cannot be meant: (field, message).
    pub(super) fn problem(&self) -> Option<(&'static str, String)> {
        if self.addresses.is_empty() {
            return Some(("addresses", format!("service {} has no address", self.key())));
        }
        if self.ports.is_empty() {
            return Some(("ports", format!("service {} has no port", self.key())));
        }
        for (i, p) in self.ports.iter().enumerate() {
            if self.ports[..i].iter().any(|q| q.port == p.port || q.name == p.name) {
                return Some((
                    "ports",
                    format!("service {}: port {} (`{}`) is listed twice", self.key(), p.port, p.name),
                ));
            }
            if self.ports.len() > 1 && p.name.is_empty() {
                return Some((
                    "ports",
                    format!("service {}: with several ports every port needs a name", self.key()),
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> ServiceConfig {
        serde_yaml_ng::from_str(
            "name: db\nnamespace: shop\naddresses: [10.96.0.10]\nports: [{name: pg, port: 5432}, {name: admin, port: 8080}]\nendpoint_slices:\n  - ports: [{name: pg, port: 15432}]\n    endpoints: [{address: 198.19.2.11}, {address: 198.19.2.12, ready: false}]\n  - ports: [{name: pg, port: 25432}, {name: admin, port: 9090}]\n    endpoints: [{address: 'fd7a::11', node: n2}]\n",
        )
        .unwrap()
    }

    #[test]
    fn a_service_port_reaches_each_slices_port_of_the_same_name() {
        let s = service();
        let pg = s.ready_endpoints(5432);
        assert_eq!(pg, vec![("198.19.2.11".parse().unwrap(), 15432), ("fd7a::11".parse().unwrap(), 25432)]);
        assert_eq!(s.ready_endpoints(8080), vec![("fd7a::11".parse().unwrap(), 9090)]);
        assert!(s.ready_endpoints(1).is_empty(), "not a service port");
        assert_eq!(s.problem(), None);
    }

    #[test]
    fn ambiguous_ports_are_refused() {
        let mut s = service();
        s.ports[1].name = "pg".into();
        assert!(s.problem().unwrap().1.contains("listed twice"));
        let mut s = service();
        s.ports[1].name.clear();
        assert!(s.problem().unwrap().1.contains("every port needs a name"));
    }
}
