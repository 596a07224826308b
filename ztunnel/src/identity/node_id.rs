//! The identities a peer certificate can carry: a workload's SPIFFE ID, a
//! node tunnel's (`spiffe://<td>/ztunnel/node/<node>`, used to reach the CA),
//! or the signing service's own (`spiffe://<td>/ztunnel/ca`).

use std::{fmt, str::FromStr};

use super::spiffe::{SpiffeError, SpiffeId, TrustDomain, validate_segment};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerId {
    Workload(SpiffeId),
    Node { trust_domain: TrustDomain, node: String },
    CaService { trust_domain: TrustDomain },
}

impl PeerId {
    pub fn node(trust_domain: TrustDomain, node: &str) -> Result<Self, SpiffeError> {
        validate_segment("node name", node)?;
        Ok(Self::Node { trust_domain, node: node.to_owned() })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        match self {
            PeerId::Workload(id) => id.trust_domain(),
            PeerId::Node { trust_domain, .. } | PeerId::CaService { trust_domain } => trust_domain,
        }
    }
}

impl FromStr for PeerId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, SpiffeError> {
        if let Some(rest) = s.strip_prefix("spiffe://")
            && let Some((td, path)) = rest.split_once('/')
            && let Some(ztunnel) = path.strip_prefix("ztunnel/")
        {
            let trust_domain = TrustDomain::new(td)?;
            return match ztunnel.split('/').collect::<Vec<_>>().as_slice() {
                ["ca"] => Ok(PeerId::CaService { trust_domain }),
                ["node", node] => PeerId::node(trust_domain, node),
                _ => Err(SpiffeError::Shape { id: s.to_owned() }),
            };
        }
        s.parse().map(PeerId::Workload)
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerId::Workload(id) => id.fmt(f),
            PeerId::Node { trust_domain, node } => write!(f, "spiffe://{trust_domain}/ztunnel/node/{node}"),
            PeerId::CaService { trust_domain } => write!(f, "spiffe://{trust_domain}/ztunnel/ca"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        for s in [
            "spiffe://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ztunnel/node/node-1",
            "spiffe://cluster.local/ztunnel/ca",
        ] {
            assert_eq!(s.parse::<PeerId>().unwrap().to_string(), s);
        }
        assert!("spiffe://td/ztunnel/node/a/b".parse::<PeerId>().is_err());
        assert!("spiffe://td/ztunnel/other".parse::<PeerId>().is_err());
        assert!(matches!("spiffe://td/ns/a/sa/b".parse::<PeerId>().unwrap(), PeerId::Workload(_)));
    }
}
