//! Inbound plaintext: connections sk_lookup steered to a pod's :15006.
//!
//! The accepted socket's local address is the original destination (the pod's
//! address and the port the caller dialled). A workload in `strict` mTLS mode
//! refuses them (reset); in `permissive` mode they are handed to the workload
//! with the caller's address as source, and counted as plaintext.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;

use super::{Failure, ProxyContext, authz, delivery, outbound::relay_tcp};
use crate::{access_log::Entry, config::MtlsMode, sockopt};

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
    }
    entry.duration_ms = started.elapsed().as_millis() as u64;
    ctx.metrics.count_connection(entry.direction, entry.mode, &entry.reason);
    ctx.metrics.count_tcp(&entry, "destination");
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
    let state = ctx.state.borrow().clone();
    let Some(workload) = state.local.get(&workload_id).cloned() else {
        return refuse(&stream, Failure::UnknownWorkload, format!("workload id {workload_id}"));
    };
    entry.destination_workload = Some(workload.workload.key());
    entry.destination_identity = Some(workload.workload.identity.to_string());
    let mode = state.config.mtls_mode(&workload.config);
    if mode == MtlsMode::Strict {
        return refuse(
            &stream,
            Failure::PlaintextRefused,
            format!("{} is in strict mTLS mode: plaintext from {peer} refused", workload.workload.key()),
        );
    }
    let decision = authz::decide(ctx, &state, None, &workload, original_dst.port(), entry);
    if !decision.verdict.admits() {
        return refuse(&stream, Failure::PolicyDenied(decision.reason), decision.explain());
    }
    let registration = ctx.open.register(None, workload.id, original_dst.port());
    let upstream =
        match delivery::connect_as(&workload.netns, peer.ip(), original_dst, ctx.connect_timeout).await {
            Ok(s) => s,
            Err((failure, error)) => return refuse(&stream, failure, error),
        };
    relay_tcp(stream, upstream, entry, Some(&registration)).await
}
