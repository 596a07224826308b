//! Inbound plaintext: connections sk_lookup steered to a pod's :15006.
//!
//! The accepted socket's local address is the original destination (the pod's
//! address and the port the caller dialled). The connection is handed to the
//! workload over the pod's loopback, which steering never touches.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;

use super::{Failure, ProxyContext, dial, outbound::relay_tcp};
use crate::{access_log::Entry, sockopt};

pub async fn handle_plaintext(stream: TcpStream, peer: SocketAddr, workload_id: u32, ctx: Arc<ProxyContext>) {
    let started = Instant::now();
    let mut entry = Entry::now("inbound", "plaintext");
    entry.source_address = Some(peer.to_string());
    if let Err((failure, error)) = carry(stream, workload_id, &ctx, &mut entry).await {
        if !matches!(failure, Failure::Reset | Failure::Io) {
            entry.decision = "deny";
        }
        entry.reason = failure.reason().to_owned();
        entry.error = Some(error);
    }
    entry.duration_ms = started.elapsed().as_millis() as u64;
    ctx.metrics.count_connection(entry.direction, entry.mode, &entry.reason);
    ctx.access_log.log(entry);
}

async fn carry(
    stream: TcpStream,
    workload_id: u32,
    ctx: &ProxyContext,
    entry: &mut Entry,
) -> Result<(), (Failure, String)> {
    let original_dst = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => {
            sockopt::reset_on_close(&stream);
            return Err((Failure::Io, e.to_string()));
        }
    };
    entry.destination_address = original_dst.to_string();
    let state = ctx.state.borrow().clone();
    let Some(workload) = state.local.get(&workload_id).cloned() else {
        sockopt::reset_on_close(&stream);
        return Err((Failure::UnknownWorkload, format!("workload id {workload_id}")));
    };
    entry.destination_workload = Some(workload.workload.key());
    entry.destination_identity = Some(workload.workload.identity.to_string());
    let upstream = match dial(&workload.netns, original_dst, ctx.connect_timeout).await {
        Ok(s) => s,
        Err((failure, error)) => {
            sockopt::reset_on_close(&stream);
            return Err((failure, error));
        }
    };
    relay_tcp(stream, upstream, entry).await
}
