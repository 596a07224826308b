//! Node authentication in a cluster: a request's bearer token, reviewed by
//! the API server, must be bound to a live pod of the node tunnel's
//! DaemonSet (its namespace and ServiceAccount); the caller's node is that
//! pod's node. What the node may then obtain is `pods::PodIndex`'s answer.

use hyper::StatusCode;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};

use super::{
    pods::{PodFacts, PodIndex},
    tokens::{ReviewError, Reviewed, TokenReviewer},
};

/// The node tunnel's pods: their namespace and ServiceAccount.
#[derive(Debug, Clone)]
pub struct TunnelAccount {
    pub namespace: String,
    pub service_account: String,
}

impl TunnelAccount {
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.service_account)
    }
}

/// An authenticated node tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub node: String,
    /// The tunnel pod the token is bound to.
    pub pod: String,
}

/// Why a caller was not accepted; each has a fixed reason for logs and
/// the answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("no bearer token: send the projected ServiceAccount token as `Authorization: Bearer <token>`")]
    NoToken,
    #[error(transparent)]
    Review(#[from] ReviewError),
    #[error("{username} is not the node tunnel's ServiceAccount ({want})")]
    NotATunnel { username: String, want: String },
    #[error(
        "the token is not bound to a pod: use a projected ServiceAccount token (serviceAccountToken volume)"
    )]
    NotBound,
    #[error("the tunnel pod {namespace}/{name} the token is bound to does not exist (deleted?)")]
    PodGone { namespace: String, name: String },
    #[error(
        "the tunnel pod {namespace}/{name} was replaced: the token is bound to uid {bound}, the pod is {found}"
    )]
    PodReplaced { namespace: String, name: String, bound: String, found: String },
    #[error("the tunnel pod {name} runs on node {pod_node}, but the token names node {token_node}")]
    NodeMismatch { name: String, pod_node: String, token_node: String },
    #[error("the tunnel pod {name} is not running on a node (phase {phase})")]
    PodNotLive { name: String, phase: String },
    #[error("looking up the tunnel pod {name}: {error}")]
    Lookup { name: String, error: String },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoToken => "no_token",
            Refusal::Review(e) => e.reason(),
            Refusal::NotATunnel { .. } => "not_a_tunnel",
            Refusal::NotBound => "token_not_bound",
            Refusal::PodGone { .. } | Refusal::PodReplaced { .. } => "tunnel_pod_gone",
            Refusal::NodeMismatch { .. } => "node_mismatch",
            Refusal::PodNotLive { .. } => "tunnel_pod_not_running",
            Refusal::Lookup { .. } => "pod_lookup_failed",
        }
    }

    /// 503 when the CA could not decide (the API server is away: the node
    /// retries), 403 when it decided no.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Review(ReviewError::Unavailable(_)) | Refusal::Lookup { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::FORBIDDEN,
        }
    }

    /// The node the token named, when known (for the log line).
    pub fn node(&self) -> Option<&str> {
        match self {
            Refusal::NodeMismatch { token_node, .. } => Some(token_node),
            _ => None,
        }
    }
}

/// Authenticates node tunnels.
pub struct Authenticator {
    pub reviewer: TokenReviewer,
    pub pods: PodIndex,
    pub tunnel: TunnelAccount,
    pub client: Client,
}

impl Authenticator {
    /// The node tunnel presenting `token` (the `Authorization` header's
    /// bearer token, if any).
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Caller, Refusal> {
        let token = token.ok_or(Refusal::NoToken)?;
        let reviewed = self.reviewer.review(token).await?;
        self.check(&reviewed).await
    }

    /// The pod checks, made on every request (reviews are cached; pods
    /// change): the bound pod exists with the bound uid, is the tunnel's,
    /// and runs on the node the token names.
    pub async fn check(&self, r: &Reviewed) -> Result<Caller, Refusal> {
        let want = self.tunnel.username();
        if r.username != want {
            return Err(Refusal::NotATunnel { username: r.username.clone(), want });
        }
        let bound = r.pod.as_ref().ok_or(Refusal::NotBound)?;
        let ns = &self.tunnel.namespace;
        let facts = match self.pods.get(ns, &bound.name) {
            Some(f) => f,
            // Not in the cache yet (a tunnel pod seconds old): ask.
            None => self.get_pod(&bound.name).await?,
        };
        if facts.uid != bound.uid {
            return Err(Refusal::PodReplaced {
                namespace: ns.clone(),
                name: bound.name.clone(),
                bound: bound.uid.clone(),
                found: facts.uid,
            });
        }
        if !facts.is_live() {
            return Err(Refusal::PodNotLive { name: bound.name.clone(), phase: facts.phase });
        }
        if let Some(token_node) = &r.node
            && token_node != &facts.node
        {
            return Err(Refusal::NodeMismatch {
                name: bound.name.clone(),
                pod_node: facts.node,
                token_node: token_node.clone(),
            });
        }
        Ok(Caller { node: facts.node, pod: bound.name.clone() })
    }

    async fn get_pod(&self, name: &str) -> Result<PodFacts, Refusal> {
        let ns = &self.tunnel.namespace;
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        let pod = api
            .get_opt(name)
            .await
            .map_err(|e| Refusal::Lookup { name: name.to_owned(), error: e.to_string() })?
            .ok_or_else(|| Refusal::PodGone { namespace: ns.clone(), name: name.to_owned() })?;
        PodFacts::from_pod(&pod).map(|(_, f)| f).ok_or_else(|| Refusal::Lookup {
            name: name.to_owned(),
            error: "the API server returned a pod without name or namespace".into(),
        })
    }
}
