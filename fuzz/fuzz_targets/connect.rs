//! The HBONE server's check of a CONNECT (`check_connect`): method and
//! `:authority` as a peer sends them, against the address the connection
//! landed on. It never panics; what it accepts is a workload's address and
//! port that the tunnel may dial, and the tunnel's own client would have
//! sent a CONNECT for it that the check accepts as well.
//!
//! Input: `<method> <uri>[ <landed address>]`. Without a landed address the
//! connection landed on the authority's own IP (where it parses), so the
//! checks after the address match are reached too.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;
use ztunnel::{
    proxy::hbone::{check_connect, connect_request, is_reserved_port, parse_authority},
    workload::{Workload, canonical},
};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == b' ');
    let (Some(method), Some(uri)) = (parts.next(), parts.next()) else { return };
    let Ok(method) = Method::from_bytes(method) else { return };
    let Ok(uri) = Uri::try_from(uri) else { return };
    let landed = parts
        .next()
        .and_then(|l| std::str::from_utf8(l).ok()?.parse::<IpAddr>().ok())
        .or_else(|| parse_authority(uri.authority()).map(|a| a.ip()))
        .unwrap_or(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 5)));

    let Ok(dst) = check_connect(&method, &uri, landed) else { return };
    assert_eq!(method, Method::CONNECT);
    assert_eq!(Some(dst), parse_authority(uri.authority()), "the destination is the authority");
    let ip = canonical(dst.ip());
    assert_eq!(ip, canonical(landed), "{dst} is not where the connection landed ({landed})");
    assert!(!ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast(), "{dst}");
    assert!(dst.port() != 0 && !is_reserved_port(dst.port()), "{dst}");

    // Our own client's CONNECT for this destination passes the same check.
    let req = connect_request(dst, &caller(), SocketAddr::from(([198, 19, 0, 7], 40000)));
    assert_eq!(check_connect(req.method(), req.uri(), landed).ok(), Some(dst), "{}", req.uri());
});

fn caller() -> Workload {
    Workload {
        name: "web".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
        identity: ztunnel::identity::spiffe::SpiffeId::new(Default::default(), "shop", "web")
            .expect("a valid identity"),
        node: "n1".into(),
        addresses: vec![],
        ports: vec![],
        labels: Default::default(),
        has_netns: true,
    }
}
