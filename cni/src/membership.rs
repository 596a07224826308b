//! Is this pod in the mesh? Decided from the API server alone, so that the
//! answer does not depend on the tunnel being up: a pod outside the mesh
//! starts even when the tunnel is down, and a pod inside it never starts
//! without the tunnel.
//!
//! A pod is in the mesh when its namespace has `ztunnel.dev/dataplane=enabled`,
//! unless the pod itself has `ztunnel.dev/dataplane=disabled` or runs in the
//! node's network namespace (`hostNetwork: true`: there is no pod namespace
//! to enroll, and the kubelet does not call CNI for such pods anyway).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig, KubeconfigError},
};
use tracing::{debug, warn};

/// The label that opts a namespace in and a pod out.
pub const DATAPLANE_LABEL: &str = "ztunnel.dev/dataplane";
pub const DATAPLANE_ENABLED: &str = "enabled";
pub const DATAPLANE_DISABLED: &str = "disabled";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    InMesh,
    NotInMesh(Exclusion),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exclusion {
    NamespaceNotEnabled,
    PodOptedOut,
    HostNetwork,
}

impl std::fmt::Display for Exclusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Exclusion::NamespaceNotEnabled => "its namespace is not labelled ztunnel.dev/dataplane=enabled",
            Exclusion::PodOptedOut => "the pod is labelled ztunnel.dev/dataplane=disabled",
            Exclusion::HostNetwork => "the pod uses the host's network",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig { path: PathBuf, source: KubeconfigError },
    #[error("cannot build an API client from {path}: {source}")]
    Client { path: PathBuf, source: kube::Error },
    #[error("the API server has no {what}")]
    NotFound { what: String },
    #[error(
        "the API server refused to show {what} ({code}): {message}; may the kubeconfig's identity get pods and namespaces?"
    )]
    Refused { what: String, code: u16, message: String },
    #[error("cannot get {what} from the API server: {source}")]
    Unreachable { what: String, source: kube::Error },
    #[error("no answer from the API server within the timeout (last error: {last})")]
    Timeout { last: String },
    #[error(
        "pod {pod} has uid {found} in the API server, not {expected}: the sandbox belongs to a pod that is gone"
    )]
    UidMismatch { pod: String, expected: String, found: String },
}

impl MembershipError {
    /// Worth trying again: the API server may answer on a later attempt.
    fn is_transient(&self) -> bool {
        matches!(self, MembershipError::Unreachable { .. })
    }
}

/// The decision, from the objects as the API server has them.
pub fn decide(namespace: &Namespace, pod: Option<&Pod>) -> Membership {
    if label(&namespace.metadata.labels) != Some(DATAPLANE_ENABLED) {
        return Membership::NotInMesh(Exclusion::NamespaceNotEnabled);
    }
    let Some(pod) = pod else {
        return Membership::InMesh;
    };
    if label(&pod.metadata.labels) == Some(DATAPLANE_DISABLED) {
        return Membership::NotInMesh(Exclusion::PodOptedOut);
    }
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Membership::NotInMesh(Exclusion::HostNetwork);
    }
    Membership::InMesh
}

fn label(labels: &Option<std::collections::BTreeMap<String, String>>) -> Option<&str> {
    labels.as_ref()?.get(DATAPLANE_LABEL).map(String::as_str)
}

/// A client for the API server named by `kubeconfig`, whose every request
/// gives up by `deadline`.
pub async fn client(kubeconfig: &Path, deadline: Instant) -> Result<Client, MembershipError> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .map_err(|source| MembershipError::Kubeconfig { path: kubeconfig.to_owned(), source })?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|source| MembershipError::Kubeconfig { path: kubeconfig.to_owned(), source })?;
    let left = deadline.saturating_duration_since(Instant::now());
    config.connect_timeout = Some(left);
    config.read_timeout = Some(left);
    config.write_timeout = Some(left);
    Client::try_from(config).map_err(|source| MembershipError::Client { path: kubeconfig.to_owned(), source })
}

/// Looks the pod and its namespace up and decides, retrying an API server
/// that does not answer until `deadline`, and never past it. The pod is
/// fetched only when the namespace is in the mesh. `uid`, when the runtime
/// gave one, must be the pod's: a pod deleted and made again under its name
/// is another pod.
pub async fn lookup(
    client: &Client,
    namespace: &str,
    pod: &str,
    uid: Option<&str>,
    deadline: Instant,
) -> Result<Membership, MembershipError> {
    // kube-rs retries 429/503/504 itself, with a backoff of its own that
    // knows nothing of our deadline: each attempt is cut off at it.
    let cutoff = tokio::time::Instant::from_std(deadline);
    let mut last = String::from("no attempt finished");
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = tokio::time::timeout_at(cutoff, lookup_once(client, namespace, pod, uid)).await;
        match attempt {
            Err(_) => return Err(MembershipError::Timeout { last }),
            Ok(Err(e)) if e.is_transient() => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left < backoff {
                    return Err(MembershipError::Timeout { last: e.to_string() });
                }
                warn!("{e}; trying again in {backoff:?}");
                last = e.to_string();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Ok(decided) => return decided,
        }
    }
}

async fn lookup_once(
    client: &Client,
    namespace: &str,
    pod: &str,
    uid: Option<&str>,
) -> Result<Membership, MembershipError> {
    let ns_what = format!("namespace {namespace}");
    let ns = get(Api::<Namespace>::all(client.clone()), namespace, &ns_what).await?;
    if let Membership::NotInMesh(exclusion) = decide(&ns, None) {
        return Ok(Membership::NotInMesh(exclusion));
    }
    let pod_what = format!("pod {namespace}/{pod}");
    let found = get(Api::<Pod>::namespaced(client.clone(), namespace), pod, &pod_what).await?;
    if let (Some(expected), Some(found_uid)) = (uid, found.metadata.uid.as_deref())
        && expected != found_uid
    {
        return Err(MembershipError::UidMismatch {
            pod: format!("{namespace}/{pod}"),
            expected: expected.to_owned(),
            found: found_uid.to_owned(),
        });
    }
    let decided = decide(&ns, Some(&found));
    debug!("{pod_what}: {decided:?}");
    Ok(decided)
}

async fn get<K>(api: Api<K>, name: &str, what: &str) -> Result<K, MembershipError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get(name).await.map_err(|e| match e {
        kube::Error::Api(status) if status.code == 404 => MembershipError::NotFound { what: what.to_owned() },
        // Authorization and bad requests do not get better by asking again;
        // a busy or failing server (429, 5xx) may.
        kube::Error::Api(status) if status.code < 500 && status.code != 429 => {
            MembershipError::Refused { what: what.to_owned(), code: status.code, message: status.message }
        }
        source => MembershipError::Unreachable { what: what.to_owned(), source },
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PodSpec;
    use kube::api::ObjectMeta;

    use super::*;

    fn ns(label: Option<&str>) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some("shop".into()),
                labels: label.map(|v| [(DATAPLANE_LABEL.to_owned(), v.to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pod(label: Option<&str>, host_network: Option<bool>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                labels: label.map(|v| [(DATAPLANE_LABEL.to_owned(), v.to_owned())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec { host_network, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn the_namespace_opts_in_and_the_pod_may_opt_out() {
        use Membership::*;
        assert_eq!(decide(&ns(None), Some(&pod(None, None))), NotInMesh(Exclusion::NamespaceNotEnabled));
        assert_eq!(decide(&ns(Some("disabled")), None), NotInMesh(Exclusion::NamespaceNotEnabled));
        assert_eq!(decide(&ns(Some("Enabled")), None), NotInMesh(Exclusion::NamespaceNotEnabled));
        assert_eq!(decide(&ns(Some("enabled")), Some(&pod(None, None))), InMesh);
        assert_eq!(decide(&ns(Some("enabled")), Some(&pod(Some("enabled"), Some(false)))), InMesh);
        assert_eq!(
            decide(&ns(Some("enabled")), Some(&pod(Some("disabled"), None))),
            NotInMesh(Exclusion::PodOptedOut)
        );
        assert_eq!(
            decide(&ns(Some("enabled")), Some(&pod(None, Some(true)))),
            NotInMesh(Exclusion::HostNetwork)
        );
        // A pod label alone never enrolls a pod of a namespace that is not in the mesh.
        assert_eq!(
            decide(&ns(None), Some(&pod(Some("enabled"), None))),
            NotInMesh(Exclusion::NamespaceNotEnabled)
        );
    }
}
