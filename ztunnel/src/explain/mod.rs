//! `GET /explain?from=<workload|ip>&to=<ip:port>`: why a call works or
//! fails, from what the running tunnel knows now — both sides and their
//! modes, the source's certificate, the trust bundle, the policy decision
//! and the failures recorded between the two — with a one-line verdict.
//!
//! `model` is the answer's (stable) shape, `build` gathers it, `verdict`
//! names the cause.

mod build;
pub mod model;
mod verdict;

use std::net::{IpAddr, SocketAddr};

pub use self::build::{Inputs, explain};

/// Longest query string accepted, and longest value: a workload's
/// `namespace/name` (two DNS labels) or an address fit well within.
const QUERY_MAX: usize = 1024;
const VALUE_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("usage: GET /explain?from=<workload|namespace/workload|ip>&to=<ip:port>")]
    Usage,
    #[error("the query is longer than {QUERY_MAX} bytes")]
    TooLong,
    #[error("`{0}` is not ip:port (IPv6 in brackets)")]
    BadDestination(String),
    #[error(transparent)]
    Workload(#[from] crate::policy::explain::ExplainError),
    #[error("several workloads with different identities are at {ip} ({names}): name one")]
    AmbiguousAddress { ip: IpAddr, names: String },
}

impl ExplainError {
    /// Whether the query named something that does not exist (404) rather
    /// than being malformed (400).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ExplainError::Workload(crate::policy::explain::ExplainError::NoWorkload(_)))
    }
}

/// Who calls: a workload by name, or whoever has an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Workload(String),
    Address(IpAddr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub from: Caller,
    /// `from` as asked.
    pub from_text: String,
    pub to: SocketAddr,
}

impl Query {
    /// Reads `from` and `to` from a request's (form-encoded) query string.
    pub fn parse(query: Option<&str>) -> Result<Self, ExplainError> {
        let query = query.ok_or(ExplainError::Usage)?;
        if query.len() > QUERY_MAX {
            return Err(ExplainError::TooLong);
        }
        let (mut from, mut to) = (None, None);
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            if v.len() > VALUE_MAX {
                return Err(ExplainError::TooLong);
            }
            match k.as_ref() {
                "from" => from = Some(v.into_owned()),
                "to" => to = Some(v.into_owned()),
                _ => {}
            }
        }
        let (Some(from), Some(to)) = (from, to) else { return Err(ExplainError::Usage) };
        Self::new(&from, &to)
    }

    pub fn new(from: &str, to: &str) -> Result<Self, ExplainError> {
        let from = from.trim();
        if from.is_empty() {
            return Err(ExplainError::Usage);
        }
        let from_text = from.to_owned();
        let from = match from.parse::<IpAddr>() {
            Ok(ip) => Caller::Address(crate::workload::canonical(ip)),
            Err(_) => Caller::Workload(from.to_owned()),
        };
        let to = to.trim().parse::<SocketAddr>().map_err(|_| ExplainError::BadDestination(to.to_owned()))?;
        Ok(Self { from, from_text, to })
    }

    /// The query string that asks for this (the CLI's side).
    pub fn to_query_string(from: &str, to: &str) -> String {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("from", from)
            .append_pair("to", to)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_decoded_and_bounded() {
        let q =
            Query::parse(Some(&Query::to_query_string("shop/web", "[fd7a:7e57:7e57:2::b]:8080"))).unwrap();
        assert_eq!(q.from, Caller::Workload("shop/web".into()));
        assert_eq!(q.to, "[fd7a:7e57:7e57:2::b]:8080".parse().unwrap());
        let q = Query::parse(Some("from=198.19.1.11&to=198.19.2.11:80")).unwrap();
        assert_eq!(q.from, Caller::Address("198.19.1.11".parse().unwrap()));

        assert!(matches!(Query::parse(None), Err(ExplainError::Usage)));
        assert!(matches!(Query::parse(Some("from=web")), Err(ExplainError::Usage)));
        assert!(matches!(Query::parse(Some("from=web&to=db:80")), Err(ExplainError::BadDestination(_))));
        let long = format!("from={}&to=1.2.3.4:5", "a".repeat(300));
        assert!(matches!(Query::parse(Some(&long)), Err(ExplainError::TooLong)));
        let longer = format!("from=a&to=1.2.3.4:5&x={}", "a".repeat(2000));
        assert!(matches!(Query::parse(Some(&longer)), Err(ExplainError::TooLong)));
    }
}
