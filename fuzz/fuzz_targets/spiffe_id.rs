//! SPIFFE IDs as peers present them (a certificate's URI SAN) and as the
//! configuration writes them: parsing never panics, what parses prints back
//! exactly as written (parsing is strict, so there is one spelling per ID),
//! and no string is two kinds of identity at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel::identity::{
    node_id::PeerId,
    spiffe::{SpiffeId, TrustDomain},
};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };

    let workload = s.parse::<SpiffeId>();
    if let Ok(id) = &workload {
        assert_eq!(id.to_string(), s, "a SPIFFE ID prints as it was written");
        assert_eq!(id.to_string().parse::<SpiffeId>().as_ref(), Ok(id));
    }

    let peer = s.parse::<PeerId>();
    if let Ok(p) = &peer {
        assert_eq!(p.to_string(), s, "a peer ID prints as it was written");
        assert_eq!(p.to_string().parse::<PeerId>().as_ref(), Ok(p));
    }
    // A workload's ID is the same workload as a peer; a node's or the CA's
    // is never a workload's.
    match (&workload, &peer) {
        (Ok(id), Ok(PeerId::Workload(p))) => assert_eq!(id, p),
        (Ok(id), p) => panic!("{id} parses as a workload but as a peer it is {p:?}"),
        (Err(_), Ok(PeerId::Workload(p))) => panic!("{p} is a workload only as a peer"),
        (Err(_), _) => {}
    }

    if let Ok(td) = s.parse::<TrustDomain>() {
        assert_eq!(td.to_string(), s);
    }
});
