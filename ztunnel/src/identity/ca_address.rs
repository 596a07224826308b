//! Where a node tunnel finds the signing service: `host:port`, the host an IP
//! address or a DNS name (a Kubernetes Service, `ztunnel-ca.ztunnel-system.svc`).

use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

/// `host:port`; `[v6]:port` for IPv6 literals. Names are resolved at each
/// connection (the Service's address may change), never at load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CaAddress {
    host: String,
    port: u16,
}

impl CaAddress {
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host, when it is an IP address (no resolution needed).
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl TryFrom<String> for CaAddress {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let bad = |why: &str| format!("`{s}` is not host:port ({why})");
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(|| bad("port must be 1-65535"))?;
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => {
                v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad("not an IPv6 address in brackets"))?;
                v6
            }
            None if host.contains(':') => return Err(bad("write IPv6 addresses in brackets")),
            None => host,
        };
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if host.parse::<IpAddr>().is_err() && !name_ok {
            return Err(bad("the host is neither an IP address nor a DNS name"));
        }
        Ok(Self { host: host.to_owned(), port })
    }
}

impl std::str::FromStr for CaAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::try_from(s.to_owned())
    }
}

impl From<std::net::SocketAddr> for CaAddress {
    fn from(a: std::net::SocketAddr) -> Self {
        Self { host: a.ip().to_string(), port: a.port() }
    }
}

impl From<CaAddress> for String {
    fn from(a: CaAddress) -> String {
        a.to_string()
    }
}

impl fmt::Display for CaAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses_parse_and_print_back() {
        for s in ["ztunnel-ca.ztunnel-system.svc:15012", "10.0.0.1:15012", "[fd00::1]:15012", "localhost:1"] {
            let a: CaAddress = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        let a: CaAddress = "10.0.0.1:15012".parse().unwrap();
        assert_eq!(a.ip(), Some("10.0.0.1".parse().unwrap()));
        assert_eq!("ca.svc:15012".parse::<CaAddress>().unwrap().ip(), None);
    }

    #[test]
    fn malformed_addresses_say_why() {
        for (s, why) in [
            ("ztunnel-ca.svc", "no port"),
            ("ca:0", "1-65535"),
            ("ca:99999", "1-65535"),
            ("fd00::1:15012", "brackets"),
            (":15012", "neither"),
            ("bad_name:15012", "neither"),
            ("[nope]:1", "IPv6"),
        ] {
            let e = s.parse::<CaAddress>().unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }
}
