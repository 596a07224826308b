//! What the tunnel reads from a peer's certificate, which is the peer's to
//! choose: the SPIFFE ID in the URI SAN (`peer_id`), the validity period
//! (`validity`, `not_after`: when an inbound connection stops taking
//! streams), the whole check a handshake makes (`verify_peer`), and a
//! certificate as a trust bundle root. Any DER: never a panic, and an ID
//! that is found is a valid one (it prints back as it parsed).
#![no_main]

use std::{
    sync::OnceLock,
    time::{Duration, UNIX_EPOCH},
};

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::{CertificateDer, UnixTime};
use ztunnel::{
    ca::store::CaState,
    identity::{node_id::PeerId, spiffe::TrustDomain},
    tls::verify::{Expect, TrustBundle, not_after, peer_id, root_of, validity, verify_peer},
};

/// A real CA's bundle, as the tunnel trusts one.
fn bundle() -> &'static TrustBundle {
    static BUNDLE: OnceLock<TrustBundle> = OnceLock::new();
    BUNDLE.get_or_init(|| CaState::ephemeral(&TrustDomain::default()).expect("an in-memory CA").bundle)
}

fuzz_target!(|data: &[u8]| {
    let cert = CertificateDer::from(data);

    if let Ok(id) = peer_id(&cert) {
        assert_eq!(id.to_string().parse::<PeerId>().as_ref(), Ok(&id));
    }

    let v = validity(&cert);
    let expires = not_after(&cert);
    assert_eq!(
        v.map(|(_, after)| after),
        expires.map(|t| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())),
        "not_after is validity's end"
    );

    let td = TrustDomain::default();
    let now = UnixTime::now();
    let skew = Duration::from_secs(60);
    for expect in [Expect::TrustDomain(td.clone()), Expect::AnyNode(td)] {
        if let Err(e) = verify_peer(&cert, &[], bundle(), &expect, now, skew) {
            let _ = (e.reason(), e.to_string());
        }
    }
    let _ = root_of(std::slice::from_ref(&cert), bundle());
    let _ = TrustBundle::new(vec![cert.clone().into_owned()]);
});
