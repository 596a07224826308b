//! Bearer tokens: the handle's admin token and registered service account
//! tokens, for authenticating requests and answering TokenReview as the
//! API server's service account token authenticator does.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use serde_json::{Value, json};

use super::{resources::by_name, store::Store};

/// The API server's own audience: a token must carry it to authenticate a
/// request, and a TokenReview without `spec.audiences` checks against it.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// An object a token is bound to (a pod, a node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundObject {
    pub name: String,
    pub uid: String,
}

/// What the fake knows of a service account token it "issued": who it is for,
/// for whom (audiences), until when, and what it is bound to.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub namespace: String,
    pub service_account: String,
    pub audiences: Vec<String>,
    pub expires_at: SystemTime,
    /// A projected token is bound to its pod: it stops authenticating once
    /// no pod of that name and uid exists.
    pub pod: Option<BoundObject>,
    /// The node the pod runs on (the extra `node-name`/`node-uid`).
    pub node: Option<BoundObject>,
}

impl TokenInfo {
    /// A token for `namespace/service_account`, valid for `lifetime`.
    pub fn new(namespace: &str, service_account: &str, audiences: &[&str], lifetime: Duration) -> Self {
        Self {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
            expires_at: SystemTime::now() + lifetime,
            pod: None,
            node: None,
        }
    }

    pub fn bound_to_pod(mut self, name: &str, uid: &str) -> Self {
        self.pod = Some(BoundObject { name: name.to_owned(), uid: uid.to_owned() });
        self
    }

    pub fn on_node(mut self, name: &str, uid: &str) -> Self {
        self.node = Some(BoundObject { name: name.to_owned(), uid: uid.to_owned() });
        self
    }

    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.service_account)
    }
}

/// A registered token and the credential id (JWT `jti`) it was issued with.
#[derive(Debug, Clone)]
pub struct Registered {
    pub info: TokenInfo,
    pub jti: String,
    /// The service account's uid, stable per registration.
    pub sa_uid: String,
}

/// A TokenReview's `status`.
pub struct Review {
    pub authenticated: bool,
    pub status: Value,
}

/// Reviews `token` for `requested` audiences (none: the API server's).
pub fn review(
    tokens: &HashMap<String, Registered>,
    store: &Store,
    token: &str,
    requested: &[String],
) -> Review {
    let requested: Vec<String> =
        if requested.is_empty() { vec![API_AUDIENCE.to_owned()] } else { requested.to_vec() };
    let rejected = |why: String| Review {
        authenticated: false,
        status: json!({ "user": {}, "error": format!("[invalid bearer token, {why}]") }),
    };
    let Some(reg) = tokens.get(token) else {
        return rejected("square/go-jose: error in cryptographic primitive".into());
    };
    let info = &reg.info;
    let audiences: Vec<String> = info.audiences.iter().filter(|a| requested.contains(a)).cloned().collect();
    if audiences.is_empty() {
        return rejected(format!(
            "token audiences {} is invalid for the target audiences {}",
            go_quoted(&info.audiences),
            go_quoted(&requested)
        ));
    }
    if SystemTime::now() >= info.expires_at {
        return rejected("service account token has expired".into());
    }
    if let Some(pod) = &info.pod {
        let live = by_name("pods").and_then(|pods| store.get(pods, &info.namespace, &pod.name).ok());
        if live.is_none_or(|p| p.pointer("/metadata/uid").and_then(Value::as_str) != Some(pod.uid.as_str())) {
            return rejected("service account token has been invalidated".into());
        }
    }
    let mut extra = serde_json::Map::new();
    extra.insert("authentication.kubernetes.io/credential-id".into(), json!([format!("JTI={}", reg.jti)]));
    for (kind, bound) in [("pod", &info.pod), ("node", &info.node)] {
        if let Some(b) = bound {
            extra.insert(format!("authentication.kubernetes.io/{kind}-name"), json!([b.name]));
            extra.insert(format!("authentication.kubernetes.io/{kind}-uid"), json!([b.uid]));
        }
    }
    Review {
        authenticated: true,
        status: json!({
            "authenticated": true,
            "user": {
                "username": info.username(),
                "uid": reg.sa_uid,
                "groups": [
                    "system:serviceaccounts",
                    format!("system:serviceaccounts:{}", info.namespace),
                    "system:authenticated",
                ],
                "extra": extra,
            },
            "audiences": audiences,
        }),
    }
}

/// A string list as Go's `%q` prints it: `["a" "b"]`.
fn go_quoted(list: &[String]) -> String {
    format!("[{}]", list.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(" "))
}
