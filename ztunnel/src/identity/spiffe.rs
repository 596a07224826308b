//! SPIFFE IDs of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The same form names Kubernetes pods and plain-host workloads (whose namespace
//! and service account come from configuration). Parsing is strict: anything
//! that is not exactly this form is refused with the reason, because an ID that
//! parses loosely is an ID that can be spoofed.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a SPIFFE ID, trust domain or path segment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("`{0}` does not start with spiffe://")]
    Scheme(String),
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error("trust domain `{0}` is longer than 255 characters")]
    TrustDomainTooLong(String),
    #[error("trust domain `{0}` may contain only lowercase letters, digits, '.', '-' and '_'")]
    TrustDomainChars(String),
    #[error("`{id}` is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape { id: String },
    #[error("{what} is empty")]
    EmptySegment { what: &'static str },
    #[error("{what} `{value}` may contain only letters, digits, '.', '-' and '_'")]
    SegmentChars { what: &'static str, value: String },
    #[error("{what} may not be `.` or `..`")]
    DotSegment { what: &'static str },
    #[error("SPIFFE ID is longer than 2048 bytes")]
    TooLong,
}

/// A SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(s: &str) -> Result<Self, SpiffeError> {
        if s.is_empty() {
            return Err(SpiffeError::EmptyTrustDomain);
        }
        if s.len() > 255 {
            return Err(SpiffeError::TrustDomainTooLong(s.to_owned()));
        }
        let ok = s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !ok {
            return Err(SpiffeError::TrustDomainChars(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        Self("cluster.local".to_owned())
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Checks one path segment (a namespace or a service account).
pub fn validate_segment(what: &'static str, value: &str) -> Result<(), SpiffeError> {
    if value.is_empty() {
        return Err(SpiffeError::EmptySegment { what });
    }
    if value == "." || value == ".." {
        return Err(SpiffeError::DotSegment { what });
    }
    let ok = value.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(SpiffeError::SegmentChars { what, value: value.to_owned() });
    }
    Ok(())
}

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeError> {
        validate_segment("namespace", namespace)?;
        validate_segment("service account", service_account)?;
        Ok(Self {
            trust_domain,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 2048 {
            return Err(SpiffeError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| SpiffeError::Scheme(s.to_owned()))?;
        let shape = || SpiffeError::Shape { id: s.to_owned() };
        let (td, path) = rest.split_once('/').ok_or_else(shape)?;
        let trust_domain = TrustDomain::new(td)?;
        let mut parts = path.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => SpiffeId::new(trust_domain, ns, sa),
            _ => Err(shape()),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::config::from_str(d)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::config::from_str(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
    }

    #[test]
    fn refuses_malformed_ids_with_a_reason() {
        let cases = [
            ("http://cluster.local/ns/a/sa/b", "does not start with spiffe://"),
            ("spiffe://", "not of the form"),
            ("spiffe:///ns/a/sa/b", "trust domain is empty"),
            ("spiffe://Cluster.Local/ns/a/sa/b", "lowercase"),
            ("spiffe://td/ns/a/sa/b/extra", "not of the form"),
            ("spiffe://td/ns/a/sa", "not of the form"),
            ("spiffe://td/ns//sa/b", "namespace is empty"),
            ("spiffe://td/ns/a/sa/b%20c", "service account `b%20c`"),
            ("spiffe://td/ns/../sa/b", "may not be"),
            ("spiffe://td/sa/b/ns/a", "not of the form"),
            ("spiffe://td:8443/ns/a/sa/b", "lowercase"),
            ("spiffe://user@td/ns/a/sa/b", "lowercase"),
        ];
        for (input, reason) in cases {
            let err = input.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(err.contains(reason), "{input}: got `{err}`, want `{reason}`");
        }
        let long = format!("spiffe://td/ns/{}/sa/b", "a".repeat(2100));
        assert_eq!(long.parse::<SpiffeId>().unwrap_err(), SpiffeError::TooLong);
    }
}
