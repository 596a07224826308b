//! ztunnel's eBPF programs.
//!
//! * `ztunnel_connect4` / `ztunnel_connect6` (cgroup/connect4, cgroup/connect6,
//!   attached once to the cgroup subtree that holds the node's workloads): a TCP
//!   connect() by a task whose cgroup, or an ancestor of it, is enrolled is
//!   rewritten to the tunnel's outbound listener on loopback:15001 of the task's
//!   own network namespace; the original destination, the cgroup and the pid are
//!   recorded under the socket cookie.
//! * `ztunnel_sockops` (sockops, same cgroup): once the client socket has its
//!   local port (TCP_CONNECT_CB), re-keys that record by what the listener will
//!   see as its peer, (netns cookie, address, port); deletes it when the client
//!   socket closes, so the map holds only live connections.
//! * `ztunnel_sk_lookup` (sk_lookup, one link per enrolled pod namespace): inbound
//!   TCP to a workload address, any port but 15008, goes to the tunnel's plaintext
//!   listener (15006) of that namespace; the accepted socket keeps the original
//!   destination as its local address.
//! * `ztunnel_sock_create` / `ztunnel_sock_release` (cgroup/sock_create and
//!   sock_release, on the capture root): record which workload created each TCP
//!   socket, and hold each workload to its quota of sockets. A socket belongs to
//!   where it was created: connect() by a task of another workload (a socket
//!   passed over a unix socket, or made in one cgroup and used from another) is
//!   refused, never attributed to the caller.
//!
//! Every path fails closed: a workload that is enrolled but not ready, a full
//! map, or a missing listener refuses the connection; nothing enrolled ever
//! goes out or comes in around the tunnel.
#![no_std]
#![no_main]
// The BPF target has no atomic read-modify-write types in core; the
// intrinsic compiles to the BPF atomic add the kernel has had since 5.12.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_netns_cookie, bpf_get_socket_cookie,
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkLookupContext, SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use ztunnel_ebpf_common::{
    AF_INET, AF_INET6, AddrKey, CIDR_KEY_FIXED_BITS, CIDR_OWN_ADDRESS, CaptureRecord, CidrKey, ConnTuple,
    DELIVERY_MARK, DIRECTION_INBOUND, DIRECTION_OUTBOUND, DeliveryKey, EnrolledWorkload, INBOUND_HBONE_PORT,
    MAX_CGROUP_DEPTH, MAX_ENROLLED_CGROUPS, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, MAX_INBOUND_ADDRS,
    MAX_WORKLOAD_SOCKETS, OUTBOUND_PORT, PortKey, SocketOwner, WORKLOAD_GUARD, WORKLOAD_HOST, WORKLOAD_READY,
    counter, is_tunnel_port, may_be_tunnel_port,
};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_MPTCP: u32 = 262;
const TCP_ESTABLISHED: u32 = 1;
const TCP_CLOSE: u32 = 7;
/// cgroup/connect verdicts.
const CONNECT_ALLOW: i32 = 1;
const CONNECT_REFUSE: i32 = 0;
/// cgroup/sock_create verdicts.
const SOCK_ALLOW: i32 = 1;
const SOCK_REFUSE: i32 = 0;
/// sk_lookup verdicts.
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
/// Every network namespace's loopback device has ifindex 1.
const LOOPBACK_IFINDEX: u32 = 1;
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// Word 2 of an IPv4-mapped IPv6 address (::ffff:a.b.c.d), as stored.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
const LOOPBACK6_LAST_WORD: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

/// Set by the loader: the tunnel's own cgroup. Sockets of tasks in it (or
/// below it) are never captured, whatever is enrolled: loop-freedom does not
/// depend on the operator enrolling the right cgroups.
#[unsafe(no_mangle)]
static TUNNEL_CGROUP_ID: Global<u64> = Global::new(0);

// Sizes are defaults; the loader may override them from configuration.
#[map]
static ENROLLED_CGROUPS: HashMap<u64, EnrolledWorkload> = HashMap::with_max_entries(MAX_ENROLLED_CGROUPS, 0);
// LRU: a record lives here only between connect() and TCP_CONNECT_CB; one whose
// connect() fails in between is never moved, and must age out, not pile up.
#[map]
static CAPTURED_BY_COOKIE: LruHashMap<u64, CaptureRecord> = LruHashMap::with_max_entries(65536, 0);
// Not LRU: evicting the record of a live connection would make the tunnel
// refuse it. Entries are removed when the client socket closes.
#[map]
static CAPTURED_BY_TUPLE: HashMap<ConnTuple, CaptureRecord> = HashMap::with_max_entries(65536, 0);
#[map]
static EXCLUDED_CIDRS: LpmTrie<CidrKey, u8> = LpmTrie::with_max_entries(MAX_EXCLUDED_CIDRS, 0);
#[map]
static EXCLUDED_PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(MAX_EXCLUDED_PORTS, 0);
#[map]
static INBOUND_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_INBOUND_ADDRS, 0);
#[map]
static INBOUND_LISTENERS: SockHash<AddrKey> = SockHash::with_max_entries(MAX_INBOUND_ADDRS, 0);
#[map]
static CAPTURE_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);
// Connections the tunnel is handing to a workload, registered by
// ztunnel_delivery_sockops for the length of their handshake.
#[map]
static DELIVERIES: HashMap<DeliveryKey, u8> = HashMap::with_max_entries(16384, 0);
// Which workload created each live TCP socket (allocated on use: most
// sockets on a node are nobody's).
#[map]
static SOCKET_OWNERS: HashMap<u64, SocketOwner> =
    HashMap::with_max_entries(MAX_WORKLOAD_SOCKETS, BPF_F_NO_PREALLOC);
// TCP sockets each workload holds, against its `max_sockets`.
#[map]
static WORKLOAD_SOCKETS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_ENROLLED_CGROUPS, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = CAPTURE_COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently.
        unsafe { *slot += 1 };
    }
}

/// What the calling task is, by its cgroup.
#[derive(Clone, Copy)]
enum Task {
    /// In no enrolled workload (and under no guard).
    Outside,
    /// In the tunnel's own cgroup: never captured.
    Tunnel,
    /// Below a guarded cgroup, in no enrolled workload below it.
    Guarded,
    Workload(EnrolledWorkload),
}

/// The calling task's deepest enrolled cgroup among its own and its
/// ancestors, so that a pod's containers (children of the pod's cgroup) are
/// the pod.
#[inline(always)]
fn current_task() -> Task {
    let tunnel = TUNNEL_CGROUP_ID.load();
    let mut found = None;
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH {
        // SAFETY: plain helper call; returns 0 past the task's depth.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        if id == tunnel {
            return Task::Tunnel;
        }
        // SAFETY: the value is copied out before the map can change.
        if let Some(w) = unsafe { ENROLLED_CGROUPS.get(&id) } {
            found = Some(*w);
        }
        level += 1;
    }
    match found {
        None => Task::Outside,
        Some(w) if w.flags & WORKLOAD_GUARD != 0 => Task::Guarded,
        Some(w) => Task::Workload(w),
    }
}

enum Exclusion {
    None,
    /// An operator's port or prefix exclusion.
    Excluded,
    /// One of the workload's own addresses.
    OwnAddress,
}

#[inline(always)]
fn exclusion(workload_id: u32, family: u16, addr: [u32; 4], port: u16) -> Exclusion {
    let key = Key::new(CIDR_KEY_FIXED_BITS + 128, CidrKey { workload_id, family: u32::from(family), addr });
    match EXCLUDED_CIDRS.get(&key) {
        Some(v) if *v == CIDR_OWN_ADDRESS => return Exclusion::OwnAddress,
        Some(_) => return Exclusion::Excluded,
        None => {}
    }
    let port_key = PortKey { workload_id, port, direction: DIRECTION_OUTBOUND };
    // SAFETY: only presence is read.
    if unsafe { EXCLUDED_PORTS.get(&port_key) }.is_some() {
        return Exclusion::Excluded;
    }
    Exclusion::None
}

enum Verdict {
    Pass,
    Refuse,
    Redirect,
}

/// Decides what happens to a TCP connect() to `addr`:`port`, and records the
/// original destination when the connection is captured. `loopback`: the
/// destination is the task's own loopback (or the unspecified address).
#[inline(always)]
fn capture(
    ctx: &SockAddrContext,
    protocol: u32,
    family: u16,
    addr: [u32; 4],
    port: u16,
    loopback: bool,
) -> Verdict {
    // Most loopback traffic is an application talking to itself: no lookup.
    if loopback && !may_be_tunnel_port(port) {
        return Verdict::Pass;
    }
    let task = current_task();
    // SAFETY: the context is a valid bpf_sock_addr.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out.
    let owner = unsafe { SOCKET_OWNERS.get(&cookie) }.copied();
    let workload = match (task, owner) {
        (Task::Tunnel, _) | (Task::Outside, None) => return Verdict::Pass,
        (Task::Guarded, _) => {
            count(counter::UNENROLLED_IN_GUARD);
            return Verdict::Refuse;
        }
        (Task::Workload(w), Some(o)) if o.workload_id == w.workload_id => w,
        // A socket of another workload, of none, or a workload's socket in
        // an outsider's hands: attributing it to either side could lend one
        // workload another's identity.
        _ => {
            count(counter::FOREIGN_SOCKET);
            return Verdict::Refuse;
        }
    };
    let host = workload.flags & WORKLOAD_HOST != 0;
    if loopback {
        if is_tunnel_port(port, host) {
            count(counter::SELF_CALL);
            return Verdict::Refuse;
        }
        return Verdict::Pass;
    }
    match exclusion(workload.workload_id, family, addr, port) {
        Exclusion::OwnAddress if is_tunnel_port(port, host) => {
            count(counter::SELF_CALL);
            return Verdict::Refuse;
        }
        Exclusion::OwnAddress | Exclusion::Excluded => {
            count(counter::EXCLUDED);
            return Verdict::Pass;
        }
        Exclusion::None => {}
    }
    // MPTCP subflows are separate sockets the records would not follow.
    if protocol == IPPROTO_MPTCP {
        count(counter::REFUSED_PROTOCOL);
        return Verdict::Refuse;
    }
    if workload.flags & WORKLOAD_READY == 0 {
        count(counter::REFUSED_NOT_READY);
        return Verdict::Refuse;
    }
    let record = CaptureRecord {
        dst_addr: addr,
        dst_port: port,
        family,
        workload_id: workload.workload_id,
        // SAFETY: plain helper calls.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
    };
    if CAPTURED_BY_COOKIE.insert(&cookie, &record, 0).is_err() {
        count(counter::REFUSED_MAP_FULL);
        warn!(ctx, "ztunnel: capture record map full; connect() refused");
        return Verdict::Refuse;
    }
    count(counter::CAPTURED);
    Verdict::Redirect
}

#[inline(always)]
fn is_stream(protocol: u32) -> bool {
    protocol == IPPROTO_TCP || protocol == IPPROTO_MPTCP
}

#[cgroup_sock_addr(connect4)]
pub fn ztunnel_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let protocol = sa.protocol;
    if !is_stream(protocol) {
        return CONNECT_ALLOW;
    }
    let ip = sa.user_ip4;
    // 127/8 is the workload's own loopback; 0.0.0.0 means the same.
    let loopback = ip == 0 || ip.to_ne_bytes()[0] == 127;
    let port = u16::from_be(sa.user_port as u16);
    match capture(&ctx, protocol, AF_INET, [ip, 0, 0, 0], port, loopback) {
        Verdict::Pass => CONNECT_ALLOW,
        Verdict::Refuse => CONNECT_REFUSE,
        Verdict::Redirect => {
            sa.user_ip4 = LOOPBACK4;
            sa.user_port = u32::from(OUTBOUND_PORT.to_be());
            CONNECT_ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn ztunnel_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let protocol = sa.protocol;
    if !is_stream(protocol) {
        return CONNECT_ALLOW;
    }
    let ip6 = sa.user_ip6;
    let port = u16::from_be(sa.user_port as u16);
    // A dual-stack socket dialling an IPv4 address: treat it as IPv4 and send it
    // to the IPv4 listener through the mapped loopback address.
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD {
        let ip = ip6[3];
        let loopback = ip == 0 || ip.to_ne_bytes()[0] == 127;
        return match capture(&ctx, protocol, AF_INET, [ip, 0, 0, 0], port, loopback) {
            Verdict::Pass => CONNECT_ALLOW,
            Verdict::Refuse => CONNECT_REFUSE,
            Verdict::Redirect => {
                sa.user_ip6 = [0, 0, V4_MAPPED_WORD, LOOPBACK4];
                sa.user_port = u32::from(OUTBOUND_PORT.to_be());
                CONNECT_ALLOW
            }
        };
    }
    // ::1 and :: stay on the workload's own loopback.
    let loopback =
        ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && (ip6[3] == 0 || ip6[3] == LOOPBACK6_LAST_WORD);
    match capture(&ctx, protocol, AF_INET6, ip6, port, loopback) {
        Verdict::Pass => CONNECT_ALLOW,
        Verdict::Refuse => CONNECT_REFUSE,
        Verdict::Redirect => {
            sa.user_ip6 = [0, 0, 0, LOOPBACK6_LAST_WORD];
            sa.user_port = u32::from(OUTBOUND_PORT.to_be());
            CONNECT_ALLOW
        }
    }
}

/// Records which workload creates each TCP socket, within its quota.
#[cgroup_sock(sock_create)]
pub fn ztunnel_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock.
    let protocol = unsafe { (*ctx.sock).protocol };
    if !is_stream(protocol) {
        return SOCK_ALLOW;
    }
    let Task::Workload(workload) = current_task() else {
        return SOCK_ALLOW;
    };
    let id = workload.workload_id;
    // SAFETY: the value is read once; the count only guards a quota.
    let held = unsafe { WORKLOAD_SOCKETS.get(&id) }.copied().unwrap_or(0);
    if workload.max_sockets != 0 && held >= workload.max_sockets {
        count(counter::SOCKET_QUOTA);
        return SOCK_REFUSE;
    }
    // SAFETY: the context is a valid bpf_sock.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain helper call.
    let owner = SocketOwner { workload_id: id, _pad: 0, cgroup_id: unsafe { bpf_get_current_cgroup_id() } };
    if SOCKET_OWNERS.insert(&cookie, &owner, 0).is_err() {
        count(counter::SOCKET_MAP_FULL);
        return SOCK_REFUSE;
    }
    // BPF_NOEXIST: only the first socket of a workload creates its counter.
    let _ = WORKLOAD_SOCKETS.insert(&id, &0, 1);
    if let Some(n) = WORKLOAD_SOCKETS.get_ptr_mut(&id) {
        add(n, 1);
    }
    SOCK_ALLOW
}

/// Forgets a workload's socket when its last file descriptor closes.
#[cgroup_sock(sock_release)]
pub fn ztunnel_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock.
    if !is_stream(unsafe { (*ctx.sock).protocol }) {
        return SOCK_ALLOW;
    }
    // SAFETY: the context is a valid bpf_sock.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(owner) = (unsafe { SOCKET_OWNERS.get(&cookie) }).copied() else {
        return SOCK_ALLOW;
    };
    // Only the release that removes the entry gives the socket back.
    if SOCKET_OWNERS.remove(&cookie).is_ok()
        && let Some(n) = WORKLOAD_SOCKETS.get_ptr_mut(&owner.workload_id)
    {
        add(n, u32::MAX);
    }
    SOCK_ALLOW
}

/// Adds `delta` (u32::MAX: minus one) to a counter other CPUs update too.
#[inline(always)]
fn add(counter: *mut u32, delta: u32) {
    // SAFETY: `counter` points into a live map value, aligned for u32.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(counter, delta) };
}

/// The client end of the socket as the listener will see it: an IPv4-mapped
/// local address of a dual-stack socket is the IPv4 address the listener sees.
#[inline(always)]
fn local_tuple(ctx: &SockOpsContext) -> Option<ConnTuple> {
    let (family, addr) = match ctx.family() {
        f if f == u32::from(AF_INET) => (AF_INET, [ctx.local_ip4(), 0, 0, 0]),
        f if f == u32::from(AF_INET6) => {
            let ip6 = sock_ops_ip6(ctx.ops, Field::Local);
            if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD {
                (AF_INET, [ip6[3], 0, 0, 0])
            } else {
                (AF_INET6, ip6)
            }
        }
        _ => return None,
    };
    Some(ConnTuple {
        // SAFETY: the context is a valid bpf_sock_ops.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr,
        // bpf_sock_ops.local_port is host order.
        port: ctx.local_port() as u16,
        family,
        _pad: 0,
    })
}

#[sock_ops]
pub fn ztunnel_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_tcp_connect(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            if let Some(tuple) = local_tuple(&ctx) {
                let _ = CAPTURED_BY_TUPLE.remove(&tuple);
            }
        }
        _ => {}
    }
    1
}

#[inline(always)]
fn on_tcp_connect(ctx: &SockOpsContext) {
    // SAFETY: the context is a valid bpf_sock_ops.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the record is copied out before it is removed.
    let Some(record) = (unsafe { CAPTURED_BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    let _ = CAPTURED_BY_COOKIE.remove(&cookie);
    let Some(tuple) = local_tuple(ctx) else {
        return;
    };
    if CAPTURED_BY_TUPLE.insert(&tuple, &record, 0).is_err() {
        // The tunnel will find no record and refuse the connection.
        count(counter::TUPLE_MAP_FULL);
        warn!(ctx, "ztunnel: connection map full; connection will be refused");
        return;
    }
    // Ask for state callbacks so the record goes when the socket closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// Attached to the tunnel's own cgroup: registers each connection the tunnel
/// makes to hand a caller to a workload (its socket carries `DELIVERY_MARK`)
/// before its SYN leaves (TCP_CONNECT_CB, the source port is known), and
/// forgets it once the connection is established or fails. sk_lookup lets
/// registered connections through to the workload.
#[sock_ops]
pub fn ztunnel_delivery_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    let registering = op == BPF_SOCK_OPS_TCP_CONNECT_CB;
    let state = ctx.arg(1);
    let forgetting = op == BPF_SOCK_OPS_STATE_CB && (state == TCP_ESTABLISHED || state == TCP_CLOSE);
    if !registering && !forgetting {
        return 1;
    }
    // SAFETY: the context is a valid bpf_sock_ops; `sk` may be null.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() || unsafe { (*sk).mark } != DELIVERY_MARK {
        return 1;
    }
    let Some(key) = delivery_key(&ctx) else { return 1 };
    if registering {
        if DELIVERIES.insert(&key, &1, 0).is_err() {
            count(counter::DELIVERY_MAP_FULL);
            return 1;
        }
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    } else {
        let _ = DELIVERIES.remove(&key);
    }
    1
}

/// The delivery as sk_lookup will see its SYN: local = the workload's end.
#[inline(always)]
fn delivery_key(ctx: &SockOpsContext) -> Option<DeliveryKey> {
    // sock_ops.remote_port is the be16 port in the upper half: from_be
    // of the u32 yields it.
    let remote_port = u32::from_be(ctx.remote_port()) as u16;
    let local_port = ctx.local_port() as u16;
    let family = ctx.family();
    if family == u32::from(AF_INET) {
        Some(DeliveryKey {
            local_addr: [ctx.remote_ip4(), 0, 0, 0],
            remote_addr: [ctx.local_ip4(), 0, 0, 0],
            local_port: remote_port,
            remote_port: local_port,
            family,
        })
    } else if family == u32::from(AF_INET6) {
        Some(DeliveryKey {
            local_addr: sock_ops_ip6(ctx.ops, Field::Remote),
            remote_addr: sock_ops_ip6(ctx.ops, Field::Local),
            local_port: remote_port,
            remote_port: local_port,
            family,
        })
    } else {
        None
    }
}

#[sk_lookup]
pub fn ztunnel_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel passes a valid bpf_sk_lookup.
    let l = unsafe { &*ctx.lookup };
    // local_port is host order in bpf_sk_lookup.
    if l.protocol != IPPROTO_TCP || l.local_port == u32::from(INBOUND_HBONE_PORT) {
        return SK_PASS;
    }
    // Connections to loopback addresses never come from outside.
    if l.ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    let (key, source) = if l.family == u32::from(AF_INET) {
        (
            AddrKey { addr: [l.local_ip4, 0, 0, 0], family: u32::from(AF_INET) },
            AddrKey { addr: [l.remote_ip4, 0, 0, 0], family: u32::from(AF_INET) },
        )
    } else if l.family == u32::from(AF_INET6) {
        (
            AddrKey { addr: sk_lookup_ip6(ctx.lookup, Field::Local), family: u32::from(AF_INET6) },
            AddrKey { addr: sk_lookup_ip6(ctx.lookup, Field::Remote), family: u32::from(AF_INET6) },
        )
    } else {
        return SK_PASS;
    };
    // SAFETY: the value is copied out.
    let destination = unsafe { INBOUND_ADDRS.get(&key) }.copied();
    // A connection from one of this workload's own addresses was made inside
    // the namespace (the workload calling itself). It travels over loopback,
    // but the kernel reports the address's device as its ingress, so the
    // source is what tells. Only the workload's own addresses count: another
    // pod's source address (a pod whose outbound exclusions let it dial
    // directly) is steered like any caller. (IPv4 packets from outside with
    // a local source are dropped as martians; an IPv6 one could not complete
    // its handshake, whose replies stay inside the namespace.)
    // SAFETY: the value is copied out.
    let source_workload = unsafe { INBOUND_ADDRS.get(&source) }.copied();
    if let (Some(s), Some(d)) = (source_workload, destination)
        && s == d
    {
        return SK_PASS;
    }
    // The tunnel handing a connection to the workload with the caller's own
    // address as source (so the workload sees its real peer).
    let delivery = DeliveryKey {
        local_addr: key.addr,
        remote_addr: source.addr,
        local_port: l.local_port as u16,
        remote_port: u16::from_be(l.remote_port),
        family: key.family,
    };
    // SAFETY: only presence is read.
    if unsafe { DELIVERIES.get(&delivery) }.is_some() {
        return SK_PASS;
    }
    let Some(workload_id) = destination else {
        // This program runs only in enrolled namespaces: an address the tunnel
        // does not know is refused rather than let through in the clear.
        count(counter::INBOUND_UNKNOWN_ADDR);
        return SK_DROP;
    };
    let port_key = PortKey { workload_id, port: l.local_port as u16, direction: DIRECTION_INBOUND };
    // SAFETY: only presence is read.
    if unsafe { EXCLUDED_PORTS.get(&port_key) }.is_some() {
        return SK_PASS;
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => {
            count(counter::INBOUND_STEERED);
            SK_PASS
        }
        Err(_) => {
            count(counter::INBOUND_NO_LISTENER);
            SK_DROP
        }
    }
}

enum Field {
    Local,
    Remote,
}

/// `bpf_sk_lookup.{local,remote}_ip6`, one word at a time: copying the array
/// lets LLVM form a pointer into the context first, which the verifier
/// rejects ("dereference of modified ctx ptr").
#[inline(always)]
fn sk_lookup_ip6(l: *const aya_ebpf::bindings::bpf_sk_lookup, field: Field) -> [u32; 4] {
    // SAFETY: `l` is the program's context; each read is a fixed-offset load.
    unsafe {
        match field {
            Field::Local => [
                core::ptr::read_volatile(&raw const (*l).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*l).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*l).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*l).local_ip6[3]),
            ],
            Field::Remote => [
                core::ptr::read_volatile(&raw const (*l).remote_ip6[0]),
                core::ptr::read_volatile(&raw const (*l).remote_ip6[1]),
                core::ptr::read_volatile(&raw const (*l).remote_ip6[2]),
                core::ptr::read_volatile(&raw const (*l).remote_ip6[3]),
            ],
        }
    }
}

/// `bpf_sock_ops.{local,remote}_ip6`, one word at a time (see sk_lookup_ip6).
#[inline(always)]
fn sock_ops_ip6(ops: *const aya_ebpf::bindings::bpf_sock_ops, field: Field) -> [u32; 4] {
    // SAFETY: `ops` is the program's context; each read is a fixed-offset load.
    unsafe {
        match field {
            Field::Local => [
                core::ptr::read_volatile(&raw const (*ops).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[3]),
            ],
            Field::Remote => [
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[3]),
            ],
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
