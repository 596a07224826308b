//! What the CNI specification fixes: the runtime's environment, the
//! versions we speak, and the error object a failed command prints.
//!
//! Spec: <https://github.com/containernetworking/cni/blob/main/SPEC.md>.

use std::str::FromStr;

use serde::Serialize;

/// Result versions this plugin can hand on. A chained plugin's result is its
/// `prevResult`, which the runtime has already converted to the
/// configuration's version, so every version with an `ips` list works alike.
/// (0.1.0/0.2.0 results have no `ips` list.) CHECK exists from 0.4.0, STATUS
/// and GC from 1.1.0; the runtime only sends what the version has.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version used when the runtime named none we know.
pub const LATEST_VERSION: &str = "1.1.0";

pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl FromStr for CniCommand {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "ADD" => CniCommand::Add,
            "DEL" => CniCommand::Del,
            "CHECK" => CniCommand::Check,
            "VERSION" => CniCommand::Version,
            "STATUS" => CniCommand::Status,
            "GC" => CniCommand::Gc,
            other => return Err(other.to_owned()),
        })
    }
}

/// The runtime's `CNI_*` environment. Each command needs a different part of
/// it, so the parts are checked where they are used ([`CniEnv::require`]).
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    /// `CNI_COMMAND`, as given.
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl CniEnv {
    pub fn from_process() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Empty values count as absent (the spec allows an empty `CNI_NETNS` on DEL).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        Self {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        }
    }

    /// A variable the command cannot do without; `name` is the variable's.
    pub fn require<'a>(value: &'a Option<String>, name: &'static str) -> Result<&'a str, MissingEnv> {
        value.as_deref().ok_or(MissingEnv(name))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the runtime did not set {0}")]
pub struct MissingEnv(pub &'static str);

/// The Kubernetes part of `CNI_ARGS` (`K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;..`),
/// set by the kubelet's runtime. Absent outside Kubernetes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct K8sArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub infra_container_id: Option<String>,
    pub pod_uid: Option<String>,
}

impl K8sArgs {
    /// Unknown keys (`IgnoreUnknown=1`, other plugins' args) are skipped, as
    /// the spec's conventions ask; a pair without `=` is malformed.
    pub fn parse(cni_args: Option<&str>) -> Result<Self, MalformedArgs> {
        let mut args = K8sArgs::default();
        for pair in cni_args.unwrap_or("").split(';').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| MalformedArgs(pair.to_owned()))?;
            let value = Some(value.to_owned()).filter(|v| !v.is_empty());
            match key {
                "K8S_POD_NAMESPACE" => args.pod_namespace = value,
                "K8S_POD_NAME" => args.pod_name = value,
                "K8S_POD_INFRA_CONTAINER_ID" => args.infra_container_id = value,
                "K8S_POD_UID" => args.pod_uid = value,
                _ => {}
            }
        }
        Ok(args)
    }

    /// Namespace and name, when this is a Kubernetes pod at all.
    pub fn pod(&self) -> Option<(&str, &str)> {
        Some((self.pod_namespace.as_deref()?, self.pod_name.as_deref()?))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("CNI_ARGS has a malformed pair {0:?} (expected KEY=VALUE)")]
pub struct MalformedArgs(pub String);

/// Error codes the spec reserves (0-99), and ours (100+).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const CONTAINER_UNKNOWN: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// "The plugin detects some transient condition that should clear up":
    /// the tunnel or the API server is not reachable yet.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The tunnel answered and refused to enroll the pod.
    pub const ENROLLMENT_REFUSED: u32 = 100;
    /// CHECK: a mesh pod the tunnel does not hold as enrolled.
    pub const NOT_ENROLLED: u32 = 101;
}

/// The error object a failed command prints on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// The answer to VERSION.
#[derive(Debug, Serialize)]
pub struct VersionResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(rename = "supportedVersions")]
    pub supported_versions: &'static [&'static str],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k8s_args_as_the_kubelet_sets_them() {
        let args = K8sArgs::parse(Some(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-7d9;K8S_POD_INFRA_CONTAINER_ID=4f1c;K8S_POD_UID=0b6e",
        ))
        .unwrap();
        assert_eq!(args.pod(), Some(("shop", "cart-7d9")));
        assert_eq!(args.infra_container_id.as_deref(), Some("4f1c"));
        assert_eq!(args.pod_uid.as_deref(), Some("0b6e"));
        assert_eq!(K8sArgs::parse(None).unwrap().pod(), None);
        assert_eq!(K8sArgs::parse(Some("K8S_POD_NAME=x")).unwrap().pod(), None);
        assert!(K8sArgs::parse(Some("K8S_POD_NAME")).is_err());
    }

    #[test]
    fn empty_environment_values_are_absent() {
        let env = CniEnv::from_lookup(|k| match k {
            "CNI_COMMAND" => Some("DEL".into()),
            "CNI_NETNS" => Some(String::new()),
            _ => None,
        });
        assert_eq!(env.command.as_deref(), Some("DEL"));
        assert!(env.netns.is_none());
        assert!(CniEnv::require(&env.netns, "CNI_NETNS").is_err());
    }

    #[test]
    fn error_result_shape() {
        let e =
            ErrorResult { cni_version: "1.0.0".into(), code: 11, msg: "m".into(), details: String::new() };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"cniVersion":"1.0.0","code":11,"msg":"m","details":""}"#
        );
    }
}
