//! Inbound plaintext: connections sk_lookup steered to a pod's :15006.
//!
//! The accepted socket's local address is the original destination (the pod's
//! address and the port the caller dialled). A workload in `strict` mTLS mode
//! refuses them (reset); in `permissive` mode they are handed to the workload
//! with the caller's address as source, and counted as plaintext. A
//! connection that reached the listener without being steered (dialled
//! directly, or the tunnel's own delivery come back) is refused: carried, it
//! would loop or lose its caller's identity.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;

use ztunnel_ebpf_common::{DELIVERY_MARK, is_tunnel_port};

use super::{Failure, ProxyContext, authz, delivery, outbound::relay_tcp};
use crate::{access_log::Entry, metrics::TcpLabels, sockopt, workload::canonical};

pub async fn handle_plaintext(stream: TcpStream, peer: SocketAddr, workload_id: u32, ctx: Arc<ProxyContext>) {
    let started = Instant::now();
    let mut entry = Entry::now("inbound", "plaintext");
    entry.source_address = Some(peer.to_string());
    if let Err((failure, error)) = carry(stream, peer, workload_id, &ctx, &mut entry).await {
        if !matches!(failure, Failure::Reset | Failure::Io) {
            entry.decision = "deny";
        }
        entry.reason = failure.reason().to_owned();
        entry.error = Some(error);
        ctx.failures.record_entry(&entry);
    }
    entry.duration_ms = started.elapsed().as_millis() as u64;
    ctx.metrics.count_connection(entry.direction, entry.mode, &entry.reason);
    ctx.access_log.log(entry);
}

async fn carry(
    stream: TcpStream,
    peer: SocketAddr,
    workload_id: u32,
    ctx: &ProxyContext,
    entry: &mut Entry,
) -> Result<(), (Failure, String)> {
    let refuse = |stream: &TcpStream, failure: Failure, error: String| {
        sockopt::reset_on_close(stream);
        Err((failure, error))
    };
    let original_dst = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => return refuse(&stream, Failure::Io, e.to_string()),
    };
    entry.destination_address = original_dst.to_string();
    // Steered connections keep the address and port the caller dialled; one
    // that names the listener itself dialled it directly (from inside the
    // namespace), and would be delivered back into this listener forever.
    let ip = canonical(original_dst.ip());
    if ip.is_loopback() || ip.is_unspecified() || is_tunnel_port(original_dst.port(), false) {
        return refuse(
            &stream,
            Failure::SelfCall,
            format!("{peer} dialled the tunnel's {original_dst} directly"),
        );
    }
    // With tcp_fwmark_accept, a SYN of the tunnel's own delivery marks the
    // socket it lands on: that delivery lost its registration (a full map)
    // and was steered back here. Carrying it would hand the workload a
    // connection with the caller's identity lost; it is refused instead.
    if sockopt::mark(&stream).is_ok_and(|m| m == DELIVERY_MARK) {
        tracing::warn!(%peer, %original_dst, "a delivery came back to the tunnel (registration lost): refused");
        return refuse(&stream, Failure::DeliveryLoop, format!("delivery from {peer} was not registered"));
    }
    let admitted =
        match authz::admit(ctx, None, workload_id, None, Some(peer.ip()), original_dst.port(), entry) {
            Ok(a) => a,
            Err((failure, error)) => return refuse(&stream, failure, error),
        };
    let workload = admitted.target.clone();
    let _permit = match ctx.limits.acquire(workload.id) {
        Ok(p) => p,
        Err(limit) => {
            return refuse(
                &stream,
                Failure::Limit(limit),
                format!("{} is at a limit", workload.workload.key()),
            );
        }
    };
    let upstream = match delivery::connect_as(ctx, &workload, peer.ip(), original_dst).await {
        Ok(s) => s,
        Err((failure, error)) => return refuse(&stream, failure, error),
    };
    let source = ctx.state.borrow().registry.source(peer.ip(), None).cloned();
    let labels = TcpLabels::new("destination", source.as_deref(), Some(&workload.workload), entry);
    let carried = ctx.traffic.open(&labels, entry);
    relay_tcp(stream, upstream, entry, Some(&admitted.registration), carried.transferred()).await
}
