//! Who a bearer token belongs to, asked of the API server (TokenReview, with
//! the CA's audience), and remembered briefly: a node renewing many
//! certificates at once costs one review, not one per CSR.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use tokio::sync::Semaphore;

/// How long a review is reused. Short: it also bounds how long a revoked
/// token (its pod deleted) would keep working, were the pod checks not made
/// on every request anyway.
pub const REVIEW_TTL: Duration = Duration::from_secs(10);
/// How long a refusal is reused (a node with a bad token retrying).
pub const REFUSAL_TTL: Duration = Duration::from_secs(2);
/// Reviews in flight at once.
const CONCURRENT_REVIEWS: usize = 8;
/// Tokens remembered at most (one per node, normally).
const MAX_CACHED: usize = 16_384;

const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// What the API server said about a token it authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub username: String,
    /// The pod the token is bound to (a projected token), if any.
    pub pod: Option<BoundPod>,
    /// The node that pod runs on, when the API server says so (1.32+).
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    pub name: String,
    pub uid: String,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The API server does not authenticate it (unknown, expired, revoked,
    /// another audience).
    #[error("the API server rejects the token: {0}")]
    Rejected(String),
    /// It authenticated, but not for our audience.
    #[error("the token is not for audience {want} (it is for {got:?})")]
    Audience { want: String, got: Vec<String> },
    /// The review could not be made.
    #[error("TokenReview failed (API server unreachable?): {0}")]
    Unavailable(String),
}

impl ReviewError {
    pub fn reason(&self) -> &'static str {
        match self {
            ReviewError::Rejected(_) | ReviewError::Audience { .. } => "token_rejected",
            ReviewError::Unavailable(_) => "review_unavailable",
        }
    }
}

/// Reads a review's answer: authenticated, for our audience, and who.
pub fn read_review(review: &TokenReview, audience: &str) -> Result<Reviewed, ReviewError> {
    let status = review.status.clone().unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(ReviewError::Rejected(status.error.unwrap_or_else(|| "not authenticated".into())));
    }
    // A server that ignores spec.audiences answers without status.audiences:
    // then the token might be for anyone, and is refused.
    let got = status.audiences.unwrap_or_default();
    if !got.iter().any(|a| a == audience) {
        return Err(ReviewError::Audience { want: audience.to_owned(), got });
    }
    let user = status.user.unwrap_or_default();
    let extra: BTreeMap<String, Vec<String>> = user.extra.unwrap_or_default();
    let first = |k: &str| extra.get(k).and_then(|v| v.first()).filter(|s| !s.is_empty()).cloned();
    let pod = match (first(EXTRA_POD_NAME), first(EXTRA_POD_UID)) {
        (Some(name), Some(uid)) => Some(BoundPod { name, uid }),
        _ => None,
    };
    Ok(Reviewed { username: user.username.unwrap_or_default(), pod, node: first(EXTRA_NODE_NAME) })
}

/// SHA-256 of a token.
type TokenHash = [u8; 32];
type Answer = Result<Reviewed, ReviewError>;

/// Reviews tokens with the API server, remembering answers briefly.
pub struct TokenReviewer {
    client: Client,
    audience: String,
    cache: Mutex<HashMap<TokenHash, (Instant, Answer)>>,
    in_flight: Semaphore,
}

impl TokenReviewer {
    pub fn new(client: Client, audience: String) -> Self {
        Self {
            client,
            audience,
            cache: Mutex::new(HashMap::new()),
            in_flight: Semaphore::new(CONCURRENT_REVIEWS),
        }
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Keyed by the token's SHA-256: the cache never holds a token itself.
    fn key(token: &str) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut k = [0u8; 32];
        k.copy_from_slice(d.as_ref());
        k
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Result<Reviewed, ReviewError>> {
        let cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (at, answer) = cache.get(key)?;
        let ttl = if answer.is_ok() { REVIEW_TTL } else { REFUSAL_TTL };
        (at.elapsed() < ttl).then(|| answer.clone())
    }

    fn remember(&self, key: [u8; 32], answer: &Result<Reviewed, ReviewError>) {
        // An unreachable API server is not remembered: the next request
        // tries again.
        if matches!(answer, Err(ReviewError::Unavailable(_))) {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (at, a)| at.elapsed() < if a.is_ok() { REVIEW_TTL } else { REFUSAL_TTL });
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), answer.clone()));
    }

    /// Who `token` belongs to, for our audience.
    pub async fn review(&self, token: &str) -> Result<Reviewed, ReviewError> {
        let key = Self::key(token);
        if let Some(answer) = self.cached(&key) {
            return answer;
        }
        let _permit = self.in_flight.acquire().await.map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        // Another request may have reviewed it while this one waited.
        if let Some(answer) = self.cached(&key) {
            return answer;
        }
        let answer = self.ask(token).await;
        self.remember(key, &answer);
        answer
    }

    async fn ask(&self, token: &str) -> Result<Reviewed, ReviewError> {
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api = Api::<TokenReview>::all(self.client.clone());
        let review = api
            .create(&PostParams::default(), &request)
            .await
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        read_review(&review, &self.audience)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn review(status: serde_json::Value) -> TokenReview {
        serde_json::from_value(json!({ "spec": {}, "status": status })).unwrap()
    }

    #[test]
    fn a_review_names_the_bound_pod_and_node_and_checks_the_audience() {
        let ok = review(json!({
            "authenticated": true,
            "audiences": ["ztunnel-ca"],
            "user": {
                "username": "system:serviceaccount:ztunnel-system:ztunnel",
                "extra": {
                    "authentication.kubernetes.io/pod-name": ["ztunnel-abcde"],
                    "authentication.kubernetes.io/pod-uid": ["u-1"],
                    "authentication.kubernetes.io/node-name": ["node-a"],
                },
            },
        }));
        let r = read_review(&ok, "ztunnel-ca").unwrap();
        assert_eq!(r.username, "system:serviceaccount:ztunnel-system:ztunnel");
        assert_eq!(r.pod, Some(BoundPod { name: "ztunnel-abcde".into(), uid: "u-1".into() }));
        assert_eq!(r.node.as_deref(), Some("node-a"));

        let e = read_review(&ok, "other").unwrap_err();
        assert_eq!(e.reason(), "token_rejected");
        assert!(e.to_string().contains("audience other"), "{e}");

        let no_audiences = review(json!({ "authenticated": true, "user": { "username": "x" } }));
        assert!(matches!(read_review(&no_audiences, "ztunnel-ca"), Err(ReviewError::Audience { .. })));

        let rejected = review(
            json!({ "user": {}, "error": "[invalid bearer token, service account token has expired]" }),
        );
        let e = read_review(&rejected, "ztunnel-ca").unwrap_err();
        assert!(e.to_string().contains("has expired"), "{e}");
    }
}
