//! HBONE's HTTP/2 as a peer speaks it: the input is everything a client
//! sends after TLS (the preface, then frames), fed to the tunnel's own h2
//! server settings (`server_builder`) over an in-memory pipe. Each request
//! is handled as the HBONE server does: `check_connect` on its method and
//! `:authority`, a refusal answered with its status, an accepted CONNECT
//! answered 200 and its body read (window released) to the end. Never a
//! panic, never a hang (libFuzzer's -timeout catches one).
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::OnceLock,
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response};
use libfuzzer_sys::fuzz_target;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    runtime::Runtime,
    task::JoinSet,
};
use ztunnel::proxy::{
    h2::server_builder,
    hbone::{check_connect, parse_authority},
};

/// Where the fuzzed connection landed: a node address of each family (the
/// seeds' CONNECTs name them).
const LANDED_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 5));
const LANDED_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd7a, 0x7e57, 0x7e57, 0, 0, 0, 0, 5));

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(exchange(data));
});

async fn exchange(data: &[u8]) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let send = async {
        // The server may close first (a protocol error): that is an answer.
        let _ = to_server.write_all(data).await;
        let _ = to_server.shutdown().await;
    };
    let drain = async {
        let mut buf = vec![0; 16 * 1024];
        while matches!(from_server.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    tokio::join!(send, drain, serve(server));
}

async fn serve(io: tokio::io::DuplexStream) {
    let Ok(mut connection) = server_builder().handshake::<_, Bytes>(io).await else { return };
    let mut streams = JoinSet::new();
    while let Some(Ok((request, respond))) = connection.accept().await {
        streams.spawn(stream(request, respond));
    }
    drop(connection);
    while streams.join_next().await.is_some() {}
}

async fn stream(request: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let landed = match parse_authority(request.uri().authority()) {
        Some(a) if a.is_ipv6() => LANDED_V6,
        _ => LANDED_V4,
    };
    // The access log records the authority before it is checked.
    let _ = request.uri().to_string();
    if let Err(refusal) = check_connect(request.method(), request.uri(), landed) {
        let mut r = Response::new(());
        *r.status_mut() = refusal.status;
        let _ = respond.send_response(r, true);
        return;
    }
    let Ok(mut send) = respond.send_response(Response::new(()), false) else { return };
    let mut body = request.into_body();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let _ = send.send_data(Bytes::new(), true);
}
