//! Map keys, values and constants shared by ztunnel's eBPF programs and its user
//! space, so that every map's layout is defined exactly once.
//!
//! Addresses are kept as `[u32; 4]` exactly as the kernel hands them to the
//! programs (`bpf_sock_addr.user_ip6`, `bpf_sock_ops.local_ip6`, ...): each word
//! holds four address bytes in network order. An IPv4 address occupies word 0
//! and the rest is zero; `family` tells the two apart. Ports are host order.
#![no_std]

/// Outbound capture listener: redirected connections arrive here.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture listener (steered by sk_lookup).
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Inbound HBONE listener; never steered, it is reached directly.
pub const INBOUND_HBONE_PORT: u16 = 15008;
/// The node's admin, metrics and readiness endpoints.
pub const ADMIN_PORT: u16 = 15000;
pub const METRICS_PORT: u16 = 15020;
pub const READINESS_PORT: u16 = 15021;

/// Whether a workload dialling `port` on one of its own addresses (loopback
/// included) would reach its own tunnel instead of an application: the
/// in-pod listeners, and for a plain-host workload (which shares the node's
/// namespace) the node's endpoints too. Such a connection is refused, never
/// looped back into the tunnel.
#[inline(always)]
pub const fn is_tunnel_port(port: u16, host_workload: bool) -> bool {
    matches!(port, OUTBOUND_PORT | INBOUND_PLAINTEXT_PORT | INBOUND_HBONE_PORT)
        || (host_workload && matches!(port, ADMIN_PORT | METRICS_PORT | READINESS_PORT))
}

/// Whether any workload could be refused a connection to `port` on loopback.
#[inline(always)]
pub const fn may_be_tunnel_port(port: u16) -> bool {
    is_tunnel_port(port, true)
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Deepest cgroup level the programs inspect when they look for the enrolled
/// ancestor of a task's cgroup. Kubernetes pods sit at depth 4-6.
pub const MAX_CGROUP_DEPTH: u32 = 24;

/// Capacities of the maps enrollment fills. The configuration is checked
/// against them when it is loaded, so a file that loads always fits and
/// enrollment never meets a full map.
pub const MAX_ENROLLED_CGROUPS: u32 = 16384;
pub const MAX_EXCLUDED_PORTS: u32 = 16384;
pub const MAX_EXCLUDED_CIDRS: u32 = 16384;
pub const MAX_INBOUND_ADDRS: u32 = 16384;

/// Bumped whenever a map's key or value layout changes: maps are pinned under a
/// directory named after it, so an upgraded tunnel never reinterprets the bytes
/// of a map pinned by an older one.
pub const MAP_ABI_VERSION: u32 = 2;

/// Value of the `ENROLLED_CGROUPS` map, keyed by cgroup v2 id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledWorkload {
    /// The tunnel's number for the workload; stamped on every capture record.
    pub workload_id: u32,
    /// `WORKLOAD_*` flags.
    pub flags: u32,
    /// TCP sockets the workload may hold at once (0: no limit). Bounds its
    /// share of every capture map, so one workload cannot fill them for all.
    pub max_sockets: u32,
    pub _pad: u32,
}

/// The tunnel can serve this workload's outbound connections now. Without it
/// the workload is enrolled but not ready, and its connect() fails (EPERM):
/// capture fails closed, it never lets a connection go out in the clear.
pub const WORKLOAD_READY: u32 = 1;
/// A plain-host workload: it shares the node's namespace, so the node's
/// admin, metrics and readiness ports are its tunnel's too.
pub const WORKLOAD_HOST: u32 = 2;
/// Not a workload but a guarded cgroup (e.g. the slice of a host's workload
/// units): a task below it that is in no enrolled workload is refused, so a
/// unit restarted into a new cgroup fails closed until it is enrolled again
/// instead of connecting uncaptured.
pub const WORKLOAD_GUARD: u32 = 4;

/// Value of `SOCKET_OWNERS`, keyed by socket cookie: the workload whose task
/// created the socket. A socket is attributed to where it was created (the
/// cgroup its cgroup-BPF hooks belong to); a connect() by a task of another
/// workload, or of none, is refused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOwner {
    pub workload_id: u32,
    pub _pad: u32,
    /// cgroup v2 id of the task that created the socket.
    pub cgroup_id: u64,
}

/// Value of `EXCLUDED_CIDRS` for an operator's exclusion.
pub const CIDR_EXCLUDED: u8 = 1;
/// Value of `EXCLUDED_CIDRS` for one of the workload's own addresses (never
/// captured, like loopback).
pub const CIDR_OWN_ADDRESS: u8 = 2;

/// Default size of `SOCKET_OWNERS`: TCP sockets of workloads open at once on
/// the node (allocated on use, not in advance).
pub const MAX_WORKLOAD_SOCKETS: u32 = 262_144;

/// What connect4/connect6 learn about a captured connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureRecord {
    /// Original destination address (see the crate docs for the encoding).
    pub dst_addr: [u32; 4],
    /// Original destination port, host order.
    pub dst_port: u16,
    pub family: u16,
    pub workload_id: u32,
    /// cgroup v2 id of the task that called connect(): the workload's own
    /// cgroup or one of its descendants (a pod's container).
    pub cgroup_id: u64,
    pub pid: u32,
    pub _pad: u32,
}

/// Key of the `CAPTURED_BY_TUPLE` map: the client end of a redirected
/// connection as the tunnel's listener sees it in `getpeername()`, qualified by
/// the network namespace because every namespace reuses 127.0.0.1 and the same
/// ephemeral ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnTuple {
    pub netns_cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Data part of the `EXCLUDED_CIDRS` LPM-trie key: a workload's excluded
/// destination prefixes. The trie's prefix length counts the 64 bits of
/// `workload_id` and `family` plus the CIDR's own length, so a lookup only
/// matches prefixes of the same workload and family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrKey {
    pub workload_id: u32,
    pub family: u32,
    pub addr: [u32; 4],
}

/// Bits of `workload_id` and `family` that precede the address in [`CidrKey`].
pub const CIDR_KEY_FIXED_BITS: u32 = 64;

/// Key of the `EXCLUDED_PORTS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub workload_id: u32,
    pub port: u16,
    /// `DIRECTION_*`.
    pub direction: u16,
}

pub const DIRECTION_OUTBOUND: u16 = 0;
pub const DIRECTION_INBOUND: u16 = 1;

/// Key of `INBOUND_ADDRS` (local address -> workload) and `INBOUND_LISTENERS`
/// (local address -> the 15006 listener of the namespace that owns it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr: [u32; 4],
    pub family: u32,
}

/// Key of `DELIVERIES`: a connection the tunnel is handing to a workload with
/// the caller's address as its source (IP_TRANSPARENT). sk_lookup lets these
/// through instead of steering them back to the tunnel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    /// Host order.
    pub local_port: u16,
    /// Host order.
    pub remote_port: u16,
    pub family: u32,
}

/// The mark on the tunnel's delivery sockets (Istio's in-pod mark): the
/// delivery sockops program registers connections carrying it.
pub const DELIVERY_MARK: u32 = 0x539;

/// Indexes of the per-CPU `CAPTURE_COUNTERS` array.
pub mod counter {
    /// Outbound connections redirected to the tunnel.
    pub const CAPTURED: u32 = 0;
    /// connect() refused because the workload is enrolled but not ready.
    pub const REFUSED_NOT_READY: u32 = 1;
    /// connect() refused because a capture map was full.
    pub const REFUSED_MAP_FULL: u32 = 2;
    /// A captured connection's record could not be re-keyed (map full); the
    /// tunnel finds no record and refuses the connection.
    pub const TUPLE_MAP_FULL: u32 = 3;
    /// Inbound connections steered to the plaintext listener.
    pub const INBOUND_STEERED: u32 = 4;
    /// Inbound connections dropped because no listener was registered for the
    /// destination address (tunnel down or restarting).
    pub const INBOUND_NO_LISTENER: u32 = 5;
    /// Inbound connections dropped because the destination address belongs to
    /// no enrolled workload.
    pub const INBOUND_UNKNOWN_ADDR: u32 = 6;
    /// Outbound connections left alone because of a port or CIDR exclusion.
    pub const EXCLUDED: u32 = 7;
    /// A delivery could not be registered (map full): it would be steered
    /// back to the tunnel, which then refuses it.
    pub const DELIVERY_MAP_FULL: u32 = 8;
    /// connect() refused: a workload dialled one of its own tunnel's ports.
    pub const SELF_CALL: u32 = 9;
    /// socket() refused: the workload holds its quota of TCP sockets.
    pub const SOCKET_QUOTA: u32 = 10;
    /// connect() refused: the socket was created in another workload's
    /// cgroup, or outside any, than the task connecting it.
    pub const FOREIGN_SOCKET: u32 = 11;
    /// connect() refused: a task of a guarded cgroup in no enrolled workload.
    pub const UNENROLLED_IN_GUARD: u32 = 12;
    /// socket() refused: the socket owner map is full.
    pub const SOCKET_MAP_FULL: u32 = 13;
    /// connect() refused: a protocol capture cannot carry (MPTCP).
    pub const REFUSED_PROTOCOL: u32 = 14;
    pub const COUNT: u32 = 15;
}

/// Names of the maps, shared so that pin paths and lookups cannot drift.
pub mod map_name {
    pub const ENROLLED_CGROUPS: &str = "ENROLLED_CGROUPS";
    pub const CAPTURED_BY_COOKIE: &str = "CAPTURED_BY_COOKIE";
    pub const CAPTURED_BY_TUPLE: &str = "CAPTURED_BY_TUPLE";
    pub const EXCLUDED_CIDRS: &str = "EXCLUDED_CIDRS";
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    pub const INBOUND_ADDRS: &str = "INBOUND_ADDRS";
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const CAPTURE_COUNTERS: &str = "CAPTURE_COUNTERS";
    pub const DELIVERIES: &str = "DELIVERIES";
    pub const SOCKET_OWNERS: &str = "SOCKET_OWNERS";
    pub const WORKLOAD_SOCKETS: &str = "WORKLOAD_SOCKETS";
    /// Every map that outlives the tunnel process (pinned in bpffs).
    pub const PINNED: [&str; 11] = [
        ENROLLED_CGROUPS,
        CAPTURED_BY_COOKIE,
        CAPTURED_BY_TUPLE,
        EXCLUDED_CIDRS,
        EXCLUDED_PORTS,
        INBOUND_ADDRS,
        INBOUND_LISTENERS,
        CAPTURE_COUNTERS,
        DELIVERIES,
        SOCKET_OWNERS,
        WORKLOAD_SOCKETS,
    ];
}

/// Names of the programs.
pub mod program_name {
    pub const CONNECT4: &str = "ztunnel_connect4";
    pub const CONNECT6: &str = "ztunnel_connect6";
    pub const SOCKOPS: &str = "ztunnel_sockops";
    pub const SK_LOOKUP: &str = "ztunnel_sk_lookup";
    pub const DELIVERY_SOCKOPS: &str = "ztunnel_delivery_sockops";
    pub const SOCK_CREATE: &str = "ztunnel_sock_create";
    pub const SOCK_RELEASE: &str = "ztunnel_sock_release";
}

/// Names of the globals the loader sets.
pub mod global_name {
    /// cgroup v2 id of the tunnel's own cgroup: sockets created in it or below
    /// are never captured, whatever is enrolled.
    pub const TUNNEL_CGROUP_ID: &str = "TUNNEL_CGROUP_ID";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: every type is #[repr(C)], made only of integers and integer
    // arrays, with explicit padding fields, so any bit pattern is valid.
    unsafe impl aya::Pod for super::EnrolledWorkload {}
    unsafe impl aya::Pod for super::CaptureRecord {}
    unsafe impl aya::Pod for super::ConnTuple {}
    unsafe impl aya::Pod for super::CidrKey {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::DeliveryKey {}
    unsafe impl aya::Pod for super::SocketOwner {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn the_node_endpoints_are_only_a_host_workloads_own() {
        for p in [15001, 15006, 15008] {
            assert!(is_tunnel_port(p, false) && is_tunnel_port(p, true));
        }
        for p in [15000, 15020, 15021] {
            assert!(!is_tunnel_port(p, false), "a pod's own :{p} is its application's");
            assert!(is_tunnel_port(p, true));
        }
        assert!(!may_be_tunnel_port(8080));
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<EnrolledWorkload>(), 16);
        assert_eq!(size_of::<SocketOwner>(), 16);
        assert_eq!(size_of::<CaptureRecord>(), 16 + 2 + 2 + 4 + 8 + 4 + 4);
        assert_eq!(size_of::<ConnTuple>(), 8 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<CidrKey>(), 4 + 4 + 16);
        assert_eq!(size_of::<PortKey>(), 8);
        assert_eq!(size_of::<AddrKey>(), 20);
        assert_eq!(size_of::<DeliveryKey>(), 40);
    }
}
