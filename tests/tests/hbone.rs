//! The mTLS data path end to end: real capture, real HBONE between two node
//! tunnels, real certificates from a real CA.

use std::time::Duration;

use ztunnel_testbed::{
    Testbed,
    agent::{self, Server},
};
use ztunnel_tests::field;

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn pod_to_pod_across_nodes_goes_over_mtls_and_the_server_sees_the_real_caller() -> anyhow::Result<()> {
    let mut tb = Testbed::new("hbone")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let server = Server::start(&tb, &db.place(), &[db.addr4(5432), db.addr6(5432)])?;
    let t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;

    for dst in [db.addr4(5432), db.addr6(5432)] {
        let r = agent::connect(&tb, &web.place(), dst, 3, 3)?;
        assert_eq!(r.ok, 3, "{dst}: {:?}\n{}", r.errors, t1.log_tail(20));
    }
    let out = t1.wait_access_log(6, WAIT, |e| e["direction"] == "outbound")?;
    for e in &out {
        assert_eq!(field(e, "mode"), "hbone", "{e}");
        assert_eq!(field(e, "reason"), "ok", "{e}");
        assert_eq!(field(e, "destination_identity"), db.identity());
    }
    let inbound = t2.wait_access_log(6, WAIT, |e| e["direction"] == "inbound")?;
    for e in &inbound {
        assert_eq!(field(e, "mode"), "hbone", "{e}");
        assert_eq!(field(e, "source_identity"), web.identity(), "{e}");
    }
    // The application saw the caller's own address, not a tunnel's.
    for a in server.accepted() {
        let peer = field(&a, "peer");
        assert!(
            peer.starts_with(&format!("{}:", web.ip4)) || peer.starts_with(&format!("[{}]:", web.ip6)),
            "{a}"
        );
    }
    Ok(())
}
