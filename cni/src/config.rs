//! The network configuration the runtime passes on stdin: the spec's
//! fields, our keys, and the previous plugin's result.
//!
//! ```json
//! {
//!   "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "ztunnel-cni",
//!   "socket": "/var/run/ztunnel/cni.sock",
//!   "kubeconfig": "/etc/cni/net.d/ztunnel-cni.kubeconfig",
//!   "timeout": "30s", "log_level": "info", "log_file": "/var/log/ztunnel-cni.log",
//!   "prevResult": { "cniVersion": "1.0.0", "ips": [{ "address": "10.244.1.5/24" }], ... }
//! }
//! ```

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol::DEFAULT_SOCKET_PATH;

/// How long a command may take, the API lookup and the tunnel's answer
/// together, unless configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_LOG_LEVEL: &str = "info";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the network configuration is not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("the network configuration has no cniVersion")]
    NoVersion,
    #[error("timeout {value:?} is not a duration such as \"30s\": {source}")]
    Timeout { value: String, source: humantime::DurationError },
    #[error("timeout must be more than zero")]
    ZeroTimeout,
    #[error("prevResult is malformed: {0}")]
    PrevResult(serde_json::Error),
    #[error("prevResult has an address {0:?} that is not an IP address with a prefix length")]
    PrevResultAddress(String),
}

/// Our plugin's configuration, as the runtime gave it.
#[derive(Debug)]
pub struct PluginConfig {
    pub cni_version: String,
    pub socket: PathBuf,
    /// The kubeconfig the plugin reads the API server with. Without one, a pod
    /// cannot be judged and ADD fails.
    pub kubeconfig: Option<PathBuf>,
    pub timeout: Duration,
    pub log_level: String,
    pub log_file: Option<PathBuf>,
    /// The previous plugin's result, byte for byte, for handing on.
    pub prev_result: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "cniVersion", default)]
    cni_version: Option<String>,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Box<RawValue>>,
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    log_level: Option<String>,
    #[serde(default)]
    log_file: Option<PathBuf>,
}

impl PluginConfig {
    pub fn parse(stdin: &str) -> Result<Self, ConfigError> {
        let raw: Raw = serde_json::from_str(stdin).map_err(ConfigError::Json)?;
        let cni_version = raw.cni_version.filter(|v| !v.is_empty()).ok_or(ConfigError::NoVersion)?;
        let timeout = match raw.timeout {
            None => DEFAULT_TIMEOUT,
            Some(value) => {
                let timeout = humantime::parse_duration(&value)
                    .map_err(|source| ConfigError::Timeout { value: value.clone(), source })?;
                if timeout.is_zero() {
                    return Err(ConfigError::ZeroTimeout);
                }
                timeout
            }
        };
        // `"prevResult": null` is no result.
        let prev_result = raw.prev_result.filter(|r| r.get() != "null");
        Ok(Self {
            cni_version,
            socket: raw.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH)),
            kubeconfig: raw.kubeconfig,
            timeout,
            log_level: raw.log_level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned()),
            log_file: raw.log_file,
            prev_result,
        })
    }

    /// Only the version, from a configuration that may be otherwise broken
    /// (so that even an error can be printed in the runtime's version).
    pub fn version_of(stdin: &str) -> Option<String> {
        #[derive(Deserialize)]
        struct V {
            #[serde(rename = "cniVersion")]
            cni_version: String,
        }
        serde_json::from_str::<V>(stdin).ok().map(|v| v.cni_version)
    }

    pub fn kubeconfig(&self) -> Option<&Path> {
        self.kubeconfig.as_deref()
    }
}

/// The pod's addresses in a result (`ips[].address`, prefix length dropped).
/// Every version we support (0.3.0 onwards) has this list.
pub fn result_ips(result: &RawValue) -> Result<Vec<IpAddr>, ConfigError> {
    #[derive(Deserialize)]
    struct Result {
        #[serde(default)]
        ips: Vec<IpConfig>,
    }
    #[derive(Deserialize)]
    struct IpConfig {
        address: String,
    }
    let result: Result = serde_json::from_str(result.get()).map_err(ConfigError::PrevResult)?;
    result
        .ips
        .into_iter()
        .map(|ip| {
            let addr = ip.address.split_once('/').map(|(addr, _)| addr);
            addr.and_then(|a| a.parse().ok()).ok_or(ConfigError::PrevResultAddress(ip.address))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_our_keys() {
        let c = PluginConfig::parse(r#"{"cniVersion":"1.0.0","name":"n","type":"ztunnel-cni"}"#).unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.log_level, "info");
        assert!(c.kubeconfig.is_none() && c.log_file.is_none() && c.prev_result.is_none());

        let c = PluginConfig::parse(
            r#"{"cniVersion":"0.3.1","socket":"/s","kubeconfig":"/k","timeout":"1m 5s","log_level":"debug","log_file":"/l"}"#,
        )
        .unwrap();
        assert_eq!(
            (c.socket.to_str(), c.kubeconfig(), c.timeout, c.log_level.as_str(), c.log_file.as_deref()),
            (Some("/s"), Some(Path::new("/k")), Duration::from_secs(65), "debug", Some(Path::new("/l")))
        );
        assert!(matches!(
            PluginConfig::parse(r#"{"cniVersion":"1.0.0","timeout":"soon"}"#),
            Err(ConfigError::Timeout { .. })
        ));
        assert!(matches!(
            PluginConfig::parse(r#"{"cniVersion":"1.0.0","timeout":"0s"}"#),
            Err(ConfigError::ZeroTimeout)
        ));
        assert!(matches!(PluginConfig::parse(r#"{"name":"x"}"#), Err(ConfigError::NoVersion)));
        assert_eq!(
            PluginConfig::version_of(r#"{"cniVersion":"0.4.0","timeout":7}"#).as_deref(),
            Some("0.4.0")
        );
    }

    #[test]
    fn prev_result_is_kept_byte_for_byte() {
        let prev = "{ \"cniVersion\" : \"1.0.0\",\n  \"ips\": [ {\"address\":\"10.244.1.5/24\",\"interface\":0} ] ,\"z\":1, \"a\":2 }";
        let c = PluginConfig::parse(&format!(r#"{{"cniVersion":"1.0.0","prevResult":{prev}}}"#)).unwrap();
        assert_eq!(c.prev_result.as_ref().unwrap().get(), prev);
        let c = PluginConfig::parse(r#"{"cniVersion":"1.0.0","prevResult":null}"#).unwrap();
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn result_ips_drop_the_prefix_length() {
        let r = RawValue::from_string(
            r#"{"ips":[{"address":"10.244.1.5/24","gateway":"10.244.1.1"},{"version":"6","address":"fd00::5/64"}]}"#
                .into(),
        )
        .unwrap();
        let ips = result_ips(&r).unwrap();
        assert_eq!(ips, vec!["10.244.1.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
        let none = RawValue::from_string(r#"{"cniVersion":"1.0.0"}"#.into()).unwrap();
        assert!(result_ips(&none).unwrap().is_empty());
        let bad = RawValue::from_string(r#"{"ips":[{"address":"10.244.1.5"}]}"#.into()).unwrap();
        assert!(matches!(result_ips(&bad), Err(ConfigError::PrevResultAddress(_))));
    }
}
