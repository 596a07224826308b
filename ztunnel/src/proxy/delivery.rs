//! Handing a connection to the destination workload with the caller's real
//! address as its source, so the application sees its true peer (as Istio's
//! ztunnel does with IP_TRANSPARENT).
//!
//! Inside the workload's namespace the tunnel's socket binds the caller's
//! address (IP_TRANSPARENT) and carries the mark `DELIVERY_MARK`. Three things
//! make the two directions work:
//!
//! * Out: a sockops program on the tunnel's own cgroup registers the marked
//!   connection in the `DELIVERIES` map before its SYN leaves (and forgets it
//!   once established), so inbound steering (sk_lookup) lets it reach the
//!   application instead of sending it back to the tunnel.
//! * Back: `net.ipv4.tcp_fwmark_accept=1` gives the application's accepted
//!   socket the mark of the SYN that created it, and a policy rule sends
//!   marked packets to a table whose only route is `local default dev lo`:
//!   the application's replies to the caller's address come back to the
//!   tunnel's socket instead of leaving the namespace. `fwmark_reflect=1`
//!   does the same for replies the kernel makes itself (the RST of a closed
//!   port), so an unreachable destination is known at once, not at timeout.
//! * Nothing else is affected: only sockets whose SYN carried the mark (the
//!   tunnel's own deliveries) are marked.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{FromRawFd as _, IntoRawFd as _},
};

use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{
        route::{RouteScope, RouteType},
        rule::RuleAction,
    },
};
use tokio::net::TcpStream;

use super::{Failure, ProxyContext};
use crate::limits::LimitExceeded;
use crate::{netns::Netns, workload::LocalWorkload};

pub use ztunnel_ebpf_common::DELIVERY_MARK;
/// The routing table holding `local default dev lo`.
pub const DELIVERY_TABLE: u32 = 15009;
/// The policy rule's priority: after `local` (0), before `main` (32766).
pub const DELIVERY_RULE_PRIORITY: u32 = 15009;

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("in {netns}: {what}: {error}")]
    Setup { netns: String, what: &'static str, error: String },
}

/// Prepares a namespace for transparent delivery: the sysctl, the rules and
/// routes. Idempotent; run at enrollment.
pub async fn prepare(netns: &Netns) -> Result<(), DeliveryError> {
    let err = |what: &'static str| {
        let name = netns.display();
        move |e: &dyn std::fmt::Display| DeliveryError::Setup { netns: name, what, error: e.to_string() }
    };
    for sysctl in ["ipv4/tcp_fwmark_accept", "ipv4/fwmark_reflect", "ipv6/fwmark_reflect"] {
        netns
            .run_async(move || std::fs::write(format!("/proc/sys/net/{sysctl}"), "1"))
            .await
            .map_err(|e| err("sysctl")(&format!("net.{}=1: {e}", sysctl.replace('/', "."))))?;
    }
    let fd = netns
        .run_async(|| {
            let mut s = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
            s.bind_auto()?;
            s.set_non_blocking(true)?;
            Ok(s.into_raw_fd())
        })
        .await
        .map_err(|e| err("netlink socket")(&e))?;
    // SAFETY: `fd` is the netlink socket just created and handed over; nothing
    // else owns it.
    let socket = unsafe { netlink_sys::TokioSocket::from_raw_fd(fd) };
    let (connection, handle, _) = rtnetlink::from_socket(socket);
    let connection = tokio::spawn(connection);
    let result = async {
        for v6 in [false, true] {
            let rule = handle
                .rule()
                .add()
                .fw_mark(DELIVERY_MARK)
                .table_id(DELIVERY_TABLE)
                .priority(DELIVERY_RULE_PRIORITY)
                .action(RuleAction::ToTable);
            let added = if v6 { rule.v6().execute().await } else { rule.v4().execute().await };
            ignore_exists(added).map_err(|e| err("policy rule")(&e))?;
            let route = if v6 {
                RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                    .kind(RouteType::Local)
                    .scope(RouteScope::Host)
                    .table_id(DELIVERY_TABLE)
                    .output_interface(1)
                    .build()
            } else {
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                    .kind(RouteType::Local)
                    .scope(RouteScope::Host)
                    .table_id(DELIVERY_TABLE)
                    .output_interface(1)
                    .build()
            };
            handle.route().add(route).replace().execute().await.map_err(|e| err("local route")(&e))?;
        }
        Ok(())
    }
    .await;
    connection.abort();
    result
}

fn ignore_exists(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        other => other,
    }
}

/// Connects to `dst` inside `target`'s namespace with `source` (the caller's
/// address) as the source, when the families match; otherwise from the
/// workload's own address. The source port is picked at connect() from the
/// whole 4-tuple (IP_BIND_ADDRESS_NO_PORT), so ports in TIME_WAIT toward
/// other destinations are not lost; the delivery sockops program registers
/// the connection before its SYN leaves. A workload has only so many
/// deliveries in flight (`limits.deliveries_per_workload`): one that does
/// not answer cannot fill the registrations every workload needs.
pub async fn connect_as(
    ctx: &ProxyContext,
    target: &LocalWorkload,
    source: IpAddr,
    dst: SocketAddr,
) -> Result<TcpStream, (Failure, String)> {
    let budget = ctx.budgets.of(target.id);
    let Ok(_in_flight) = budget.deliveries.try_acquire() else {
        ctx.metrics.limit_refused(LimitExceeded::Deliveries);
        return Err((
            Failure::Limit(LimitExceeded::Deliveries),
            format!("{} has too many connections being opened to it", target.workload.key()),
        ));
    };
    let timeout = ctx.connect_timeout;
    let transparent = source.is_ipv4() == dst.is_ipv4() && source != dst.ip();
    let socket =
        target.netns.socket_for(dst).await.map_err(|e| (Failure::Io, format!("delivery socket: {e}")))?;
    ctx.sockets.apply(&socket);
    if transparent {
        let configure = || -> std::io::Result<()> {
            if dst.is_ipv4() {
                socket.set_ip_transparent_v4(true)?;
            } else {
                socket.set_ip_transparent_v6(true)?;
            }
            socket.set_mark(DELIVERY_MARK)?;
            crate::sockopt::bind_address_no_port(&socket)?;
            socket.bind(&SocketAddr::new(source, 0).into())
        };
        configure().map_err(|e| (Failure::Io, format!("delivery socket as {source}: {e}")))?;
    }
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err((Failure::DestinationUnreachable, e.to_string())),
        Err(_) => Err((Failure::ConnectTimeout, format!("no answer from {dst} within {timeout:?}"))),
    }
}
