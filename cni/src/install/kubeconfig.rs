//! The kubeconfig the plugin reads the API server with.
//!
//! The plugin runs on the host, outside any pod, so it cannot use a service
//! account the in-cluster way. The installer (which does run in the
//! DaemonSet's pod) writes the pod's own credentials into a kubeconfig on the
//! host: the service account token and CA from the mounted service account
//! directory, and the API server from `KUBERNETES_SERVICE_HOST/PORT`, the way
//! Istio's install-cni does. The token is written inline because the pod's
//! token path means nothing on the host; the file is therefore mode 0600.
//! Tokens rotate: run the install again (it rewrites only what changed).

use std::{
    fs,
    path::{Path, PathBuf},
};

use base64::Engine as _;
use serde::Serialize;

pub const DEFAULT_SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error(
        "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set (is this running in a pod?); pass --api-server-host/--api-server-port"
    )]
    NoApiServer,
    #[error("cannot read the service account's {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the service account token {0} is empty")]
    EmptyToken(PathBuf),
    #[error("cannot render the kubeconfig: {0}")]
    Render(serde_yaml_ng::Error),
}

/// The API server as the host reaches it.
#[derive(Debug, Clone)]
pub struct ApiServer {
    pub host: String,
    pub port: String,
}

impl ApiServer {
    pub fn url(&self) -> String {
        if self.host.contains(':') {
            format!("https://[{}]:{}", self.host, self.port)
        } else {
            format!("https://{}:{}", self.host, self.port)
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Kubeconfig<'a> {
    api_version: &'a str,
    kind: &'a str,
    clusters: [Named<'a, Cluster>; 1],
    users: [Named<'a, User>; 1],
    contexts: [Named<'a, Context<'a>>; 1],
    current_context: &'a str,
}

#[derive(Serialize)]
struct Named<'a, T> {
    name: &'a str,
    #[serde(flatten)]
    value: T,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    cluster: ClusterData,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ClusterData {
    server: String,
    certificate_authority_data: String,
}

#[derive(Serialize)]
struct User {
    user: UserData,
}

#[derive(Serialize)]
struct UserData {
    token: String,
}

#[derive(Serialize)]
struct Context<'a> {
    context: ContextData<'a>,
}

#[derive(Serialize)]
struct ContextData<'a> {
    cluster: &'a str,
    user: &'a str,
}

const NAME: &str = "ztunnel-cni";

/// The kubeconfig text for `api`, with the token and CA of the service
/// account mounted at `service_account_dir`.
pub fn render(api: &ApiServer, service_account_dir: &Path) -> Result<String, KubeconfigError> {
    let read = |name: &str| {
        let path = service_account_dir.join(name);
        fs::read(&path).map_err(|source| KubeconfigError::Read { path, source })
    };
    let token = String::from_utf8_lossy(&read("token")?).trim().to_owned();
    if token.is_empty() {
        return Err(KubeconfigError::EmptyToken(service_account_dir.join("token")));
    }
    let ca = base64::engine::general_purpose::STANDARD.encode(read("ca.crt")?);
    let config = Kubeconfig {
        api_version: "v1",
        kind: "Config",
        clusters: [Named {
            name: NAME,
            value: Cluster { cluster: ClusterData { server: api.url(), certificate_authority_data: ca } },
        }],
        users: [Named { name: NAME, value: User { user: UserData { token } } }],
        contexts: [Named {
            name: NAME,
            value: Context { context: ContextData { cluster: NAME, user: NAME } },
        }],
        current_context: NAME,
    };
    serde_yaml_ng::to_string(&config).map_err(KubeconfigError::Render)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What we write is what kube-rs (the plugin's reader) understands.
    #[tokio::test]
    async fn the_plugin_reads_what_the_installer_writes() {
        let sa = tempfile::tempdir().unwrap();
        fs::write(sa.path().join("token"), "eyJhbGciOi.token\n").unwrap();
        // Any bytes: the CA is carried, not interpreted, here.
        fs::write(sa.path().join("ca.crt"), "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
            .unwrap();
        let text = render(&ApiServer { host: "10.96.0.1".into(), port: "443".into() }, sa.path()).unwrap();
        let kc = kube::config::Kubeconfig::from_yaml(&text).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some(NAME));
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.96.0.1:443"));
        let ca = base64::engine::general_purpose::STANDARD
            .decode(cluster.certificate_authority_data.as_deref().unwrap())
            .unwrap();
        assert!(ca.starts_with(b"-----BEGIN CERTIFICATE-----"));
        assert_eq!(kc.auth_infos[0].name, NAME);
        assert!(kc.auth_infos[0].auth_info.as_ref().unwrap().token.is_some());
        // kube-rs keeps the token secret; read it back as plain YAML.
        let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(yaml["users"][0]["user"]["token"].as_str(), Some("eyJhbGciOi.token"));
    }

    #[test]
    fn ipv6_api_servers_are_bracketed() {
        assert_eq!(ApiServer { host: "fd00::1".into(), port: "6443".into() }.url(), "https://[fd00::1]:6443");
    }

    #[test]
    fn a_missing_token_is_named() {
        let sa = tempfile::tempdir().unwrap();
        let err = render(&ApiServer { host: "h".into(), port: "1".into() }, sa.path()).unwrap_err();
        assert!(matches!(&err, KubeconfigError::Read { path, .. } if path.ends_with("token")), "{err}");
    }
}
