//! Typed views of the capture maps.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use aya::maps::{HashMap, MapData, PerCpuArray};
use ipnet::IpNet;
use ztunnel_ebpf_common::{
    AF_INET, AF_INET6, AddrKey, CIDR_EXCLUDED, CIDR_KEY_FIXED_BITS, CIDR_OWN_ADDRESS, CaptureRecord, CidrKey,
    ConnTuple, DIRECTION_INBOUND, DIRECTION_OUTBOUND, EnrolledWorkload, PortKey, WORKLOAD_GUARD,
    WORKLOAD_HOST, WORKLOAD_READY,
};

use super::COUNTER_NAMES;

/// An accepted connection, as capture recorded it at connect().
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapturedConnection {
    pub workload_id: u32,
    pub original_dst: SocketAddr,
    /// The cgroup of the task that connected (the workload's, or a child's).
    pub cgroup_id: u64,
    pub pid: u32,
}

/// Records of captured connections, keyed by the client end.
pub struct CaptureRecords {
    by_tuple: HashMap<MapData, ConnTuple, CaptureRecord>,
}

impl CaptureRecords {
    pub(super) fn new(by_tuple: HashMap<MapData, ConnTuple, CaptureRecord>) -> Self {
        Self { by_tuple }
    }

    /// The record of the connection whose client end is `peer` in the
    /// namespace with `netns_cookie`. The record stays until the client socket
    /// closes (sockops removes it), so a lookup never races the client.
    pub fn lookup(&self, netns_cookie: u64, peer: SocketAddr) -> Option<CapturedConnection> {
        let key = super::conn_tuple(netns_cookie, peer);
        let r = self.by_tuple.get(&key, 0).ok()?;
        Some(CapturedConnection {
            workload_id: r.workload_id,
            original_dst: SocketAddr::new(words_to_ip(r.dst_addr, r.family)?, r.dst_port),
            cgroup_id: r.cgroup_id,
            pid: r.pid,
        })
    }
}

/// The programs' per-CPU event counters.
pub struct CaptureCounters {
    map: PerCpuArray<MapData, u64>,
}

impl CaptureCounters {
    pub(super) fn new(map: PerCpuArray<MapData, u64>) -> Self {
        Self { map }
    }

    /// Every counter, summed over CPUs, with its metric label.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        COUNTER_NAMES
            .iter()
            .map(|(index, name)| {
                let total = self.map.get(index, 0).map_or(0, |v| v.iter().sum());
                (*name, total)
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> u64 {
        self.snapshot().into_iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| v)
    }
}

/// What one workload asks of capture.
#[derive(Debug, Clone, Default)]
pub struct WorkloadCapture {
    pub workload_id: u32,
    pub cgroup_id: u64,
    pub ready: bool,
    /// A plain-host workload (in the node's namespace).
    pub host: bool,
    /// TCP sockets it may hold at once (0: no limit).
    pub max_sockets: u32,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<IpNet>,
    pub exclude_inbound_ports: Vec<u16>,
    /// The workload's own addresses: never captured, and its tunnel's ports
    /// on them are refused.
    pub own_addresses: Vec<IpAddr>,
    /// Addresses steered inbound (a pod's own); empty for plain-host workloads.
    pub inbound_addresses: Vec<IpAddr>,
}

/// The full contents the capture maps should have.
#[derive(Debug, Default)]
pub struct DesiredMaps {
    pub enrolled: StdHashMap<u64, EnrolledWorkload>,
    pub excluded_ports: HashSet<PortKey>,
    /// (prefix length, key, CIDR_EXCLUDED or CIDR_OWN_ADDRESS).
    pub excluded_cidrs: Vec<(u32, CidrKey, u8)>,
    pub inbound_addrs: StdHashMap<AddrKey, u32>,
}

impl DesiredMaps {
    /// A guarded cgroup: tasks below it in no enrolled workload are refused.
    pub fn add_guard(&mut self, cgroup_id: u64) {
        self.enrolled.entry(cgroup_id).or_insert(EnrolledWorkload {
            workload_id: 0,
            flags: WORKLOAD_GUARD,
            max_sockets: 0,
            _pad: 0,
        });
    }

    pub fn add(&mut self, w: &WorkloadCapture) {
        let id = w.workload_id;
        let mut flags = if w.ready { WORKLOAD_READY } else { 0 };
        if w.host {
            flags |= WORKLOAD_HOST;
        }
        // A workload's own entry wins over a guard on the same cgroup.
        self.enrolled.insert(
            w.cgroup_id,
            EnrolledWorkload { workload_id: id, flags, max_sockets: w.max_sockets, _pad: 0 },
        );
        for &port in &w.exclude_outbound_ports {
            self.excluded_ports.insert(PortKey { workload_id: id, port, direction: DIRECTION_OUTBOUND });
        }
        for &port in &w.exclude_inbound_ports {
            self.excluded_ports.insert(PortKey { workload_id: id, port, direction: DIRECTION_INBOUND });
        }
        let own = w.own_addresses.iter().map(|a| (IpNet::from(*a), CIDR_OWN_ADDRESS));
        for (net, value) in w.exclude_outbound_cidrs.iter().map(|n| (*n, CIDR_EXCLUDED)).chain(own) {
            let net = net.trunc();
            let (addr, family) = addr_words(net.addr());
            let key = CidrKey { workload_id: id, family: u32::from(family), addr };
            let prefix = CIDR_KEY_FIXED_BITS + u32::from(net.prefix_len());
            // An own address is a host prefix: it wins over any exclusion.
            self.excluded_cidrs.retain(|(p, k, _)| !(*p == prefix && *k == key));
            self.excluded_cidrs.push((prefix, key, value));
        }
        for ip in &w.inbound_addresses {
            self.inbound_addrs.insert(addr_key(*ip), id);
        }
    }
}

/// An address as the programs store it, and its family.
pub fn addr_words(ip: IpAddr) -> ([u32; 4], u16) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], AF_INET),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => addr_words(IpAddr::V4(v4)),
            None => {
                let o = v6.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                ([w(0), w(4), w(8), w(12)], AF_INET6)
            }
        },
    }
}

pub fn addr_key(ip: IpAddr) -> AddrKey {
    let (addr, family) = addr_words(ip);
    AddrKey { addr, family: u32::from(family) }
}

fn words_to_ip(words: [u32; 4], family: u16) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))),
        AF_INET6 => {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_kernel_encoding() {
        for ip in ["198.18.0.1", "fd7a:7e57::1", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (w, f) = addr_words(ip);
            assert_eq!(words_to_ip(w, f), Some(ip));
        }
        // IPv4 is stored in network order in word 0, as bpf_sock_addr.user_ip4.
        let (w, f) = addr_words("198.18.0.1".parse().unwrap());
        assert_eq!(f, AF_INET);
        assert_eq!(w[0].to_ne_bytes(), [198, 18, 0, 1]);
        // A mapped address is its IPv4 address, as the listener sees it.
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().unwrap();
        assert_eq!(addr_words(mapped), addr_words("198.18.0.1".parse().unwrap()));
    }

    #[test]
    fn exclusions_become_map_entries() {
        let mut d = DesiredMaps::default();
        d.add(&WorkloadCapture {
            workload_id: 7,
            cgroup_id: 99,
            ready: true,
            exclude_outbound_ports: vec![53],
            exclude_outbound_cidrs: vec!["198.19.0.9/16".parse().unwrap()],
            exclude_inbound_ports: vec![9090],
            own_addresses: vec!["198.19.1.2".parse().unwrap()],
            inbound_addresses: vec!["198.19.1.2".parse().unwrap()],
            ..WorkloadCapture::default()
        });
        assert_eq!(d.excluded_cidrs[1].2, CIDR_OWN_ADDRESS, "own addresses are told apart");
        assert_eq!(
            d.enrolled[&99],
            EnrolledWorkload { workload_id: 7, flags: WORKLOAD_READY, max_sockets: 0, _pad: 0 }
        );
        assert!(d.excluded_ports.contains(&PortKey {
            workload_id: 7,
            port: 53,
            direction: DIRECTION_OUTBOUND
        }));
        assert!(d.excluded_ports.contains(&PortKey {
            workload_id: 7,
            port: 9090,
            direction: DIRECTION_INBOUND
        }));
        let (prefix, key, value) = d.excluded_cidrs[0];
        assert_eq!(value, CIDR_EXCLUDED);
        assert_eq!(prefix, 64 + 16);
        assert_eq!(key.addr[0].to_ne_bytes(), [198, 19, 0, 0], "host bits cleared");
        assert_eq!(d.inbound_addrs.len(), 1);
    }
}
