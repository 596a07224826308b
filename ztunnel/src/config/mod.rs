//! The node tunnel's configuration file (YAML).
//!
//! Everything is checked before anything is started: a file that loads is a
//! file the tunnel can run. Every error names the file, the field and the line.

mod access_log;
pub mod limits;
mod locate;
pub mod registry;
pub mod service;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

pub use self::{
    access_log::AccessLogConfig,
    limits::{KeepaliveConfig, LimitsConfig, ResolvedLimits},
    locate::Step,
    service::{Endpoint, EndpointSlice, ServiceConfig, ServicePort},
};
use crate::{
    identity::spiffe::{SpiffeError, SpiffeId, TrustDomain, validate_segment},
    netns::NetnsRef,
    policy::{
        Modes, PolicySet,
        model::{EmergencyAllow, Policy},
    },
};

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}{field}: {message}", location(file, *line))]
    Invalid { file: PathBuf, line: Option<(usize, usize)>, field: String, message: String },
}

fn location(file: &Path, line: Option<(usize, usize)>) -> String {
    match line {
        Some((l, c)) => format!("{}:{l}:{c}: ", file.display()),
        None => format!("{}: ", file.display()),
    }
}

/// The whole configuration of one node tunnel.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub trust_domain: TrustDomain,
    #[serde(default)]
    pub capture: CaptureConfig,
    #[serde(default)]
    pub listeners: ListenerConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub access_log: AccessLogConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Modes per namespace (a workload may override them).
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceConfig>,
    #[serde(default)]
    pub authorization: AuthorizationConfig,
    /// Authorization policies (Istio's L4 AuthorizationPolicy shape).
    #[serde(default)]
    pub policies: Vec<Policy>,
    /// Time-bounded, logged exceptions.
    #[serde(default)]
    pub emergency_allows: Vec<EmergencyAllow>,
    /// The workloads of the mesh this node knows: its own (placed on this
    /// node), which it captures, and other nodes', which it can reach.
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    /// Virtual addresses carried to one of their endpoints (Kubernetes
    /// Services).
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    /// The node's network namespace, for a tunnel that runs outside it (the
    /// testbed). Absent: the namespace the tunnel starts in.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The node's own addresses: plain-host workloads share them.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Where the tunnel keeps its sockets and tokens: the admin token, the
    /// CNI plugin's socket (root only).
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
}

fn default_run_dir() -> PathBuf {
    PathBuf::from("/var/run/ztunnel")
}

impl NodeConfig {
    /// The admin token file.
    pub fn admin_token(&self) -> PathBuf {
        self.run_dir.join("admin.token")
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// The cgroup v2 directory the capture programs are attached to; every local
    /// workload's cgroup must be inside it. Absent: the cgroup v2 root.
    pub cgroup_root: Option<PathBuf>,
    /// The cgroup the tunnel moves itself into before it opens any socket. Its
    /// sockets, and those of anything below it, are never captured.
    /// Absent: the cgroup the tunnel was started in.
    pub tunnel_cgroup: Option<PathBuf>,
    /// Where programs, links and maps are pinned so that they outlive a
    /// restart of the tunnel (enrollment survives, nothing escapes capture).
    pub bpf_pin_dir: PathBuf,
    /// Captured connections that can be open at once on this node; beyond it
    /// new connections are refused (and counted). Fixed when the maps are first
    /// pinned: changing it takes `ztunnel uninstall` first.
    pub max_connections: u32,
    /// TCP sockets of workloads the node can hold at once (the socket owner
    /// map; allocated on use). Fixed when the maps are first pinned.
    pub max_sockets: u32,
    /// Cgroups whose every task must be in an enrolled workload (e.g. the
    /// slice of a host's workload units): a task below one in no enrolled
    /// workload is refused connect(), so a unit restarted into a new cgroup
    /// fails closed until it is enrolled again (at once: new cgroups below a
    /// guard are watched) instead of connecting uncaptured.
    pub guard_cgroups: Vec<PathBuf>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            cgroup_root: None,
            tunnel_cgroup: None,
            bpf_pin_dir: PathBuf::from("/sys/fs/bpf/ztunnel"),
            max_connections: 65536,
            max_sockets: ztunnel_ebpf_common::MAX_WORKLOAD_SOCKETS,
            guard_cgroups: Vec::new(),
        }
    }
}

/// Where the node-level listeners bind, in the node's network namespace.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            admin: SocketAddr::from(([127, 0, 0, 1], 15000)),
            metrics: SocketAddr::from(([0, 0, 0, 0], 15020)),
            readiness: SocketAddr::from(([0, 0, 0, 0], 15021)),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// How long a dial to a destination may take.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// On shutdown, how long open connections get to finish.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// How often the configuration file is checked for changes (it is also
    /// re-read at once on SIGHUP).
    #[serde(with = "duration")]
    pub reload_interval: Duration,
    /// A pooled HBONE connection with no stream for this long is closed.
    #[serde(with = "duration")]
    pub pool_idle_timeout: Duration,
    /// Threads running the data path. Every wake-up that crosses threads
    /// costs a context switch: on small nodes fewer threads carry more.
    pub worker_threads: usize,
    /// Keepalive on every socket the tunnel owns.
    pub tcp_keepalive: KeepaliveConfig,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            reload_interval: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(300),
            // The tunnel shares the node's cores with its workloads: half of
            // them (1 on a 2-core node, at most 4) measured best here.
            worker_threads: std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 4)),
            tcp_keepalive: KeepaliveConfig::default(),
        }
    }
}

/// Workload certificates: where they come from and how they are kept fresh.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    pub ca: CaSource,
    /// Lifetime asked of the CA (which may cap it).
    #[serde(with = "duration")]
    pub cert_lifetime: Duration,
    /// First retry after a failed request; doubles up to `retry_max`.
    #[serde(with = "duration")]
    pub retry_initial: Duration,
    #[serde(with = "duration")]
    pub retry_max: Duration,
    /// Clock difference tolerated when checking a peer's validity period.
    #[serde(with = "duration")]
    pub clock_skew: Duration,
    /// How long a connection waits for its workload's first certificate.
    #[serde(with = "duration")]
    pub cert_wait: Duration,
    /// How often the trust bundle is re-read from the CA.
    #[serde(with = "duration")]
    pub bundle_refresh: Duration,
    pub max_concurrent_requests: usize,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            ca: CaSource::default(),
            cert_lifetime: Duration::from_secs(24 * 3600),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            clock_skew: Duration::from_secs(60),
            cert_wait: Duration::from_secs(5),
            bundle_refresh: Duration::from_secs(60),
            max_concurrent_requests: 16,
        }
    }
}

/// `identity.ca`, e.g. `{kind: embedded, dir: /var/lib/ztunnel/ca}`,
/// `{kind: remote, address: 10.0.0.1:15012, node_credentials: /etc/ztunnel/node}` or
/// `{kind: kubernetes, address: "ztunnel-ca.ztunnel-system.svc:15012", token: ..., trust_bundle: ...}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", deny_unknown_fields, rename_all = "snake_case")]
pub enum CaSource {
    /// The CA runs inside the tunnel (single host, demo, tests). With `dir`
    /// (made by `ztunnel ca init`) several tunnels share one CA; without it
    /// the CA is made in memory at start and trusted by this tunnel only.
    Embedded {
        #[serde(default)]
        dir: Option<PathBuf>,
    },
    /// The signing service (`ztunnel ca serve`), reached with the node's
    /// credential (`ztunnel ca node-credential`).
    Remote { address: SocketAddr, node_credentials: PathBuf },
    /// The signing service in a cluster (`ztunnel ca serve --kubernetes`):
    /// the node proves itself with a projected ServiceAccount token (re-read
    /// at every request: the kubelet rotates it) and checks the service
    /// against `trust_bundle` (the ConfigMap the CA publishes, mounted).
    Kubernetes {
        /// `host:port`; a name is resolved in the node's network namespace
        /// at every connection.
        address: crate::identity::ca_address::CaAddress,
        token: PathBuf,
        trust_bundle: PathBuf,
    },
}

impl Default for CaSource {
    fn default() -> Self {
        Self::Embedded { dir: None }
    }
}

/// Where the access log (one JSON line per connection) goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub enum AccessLogTarget {
    #[default]
    Stdout,
    Off,
    File(PathBuf),
}

impl std::str::FromStr for AccessLogTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "off" => Ok(Self::Off),
            p if p.starts_with('/') => Ok(Self::File(PathBuf::from(p))),
            other => Err(format!("`{other}`: expected `stdout`, `off` or an absolute file path")),
        }
    }
}

impl<'de> Deserialize<'de> for AccessLogTarget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str(d)
    }
}

/// Deserializes a string through `FromStr`, failing inside the visitor so
/// that the error carries the scalar's own line.
pub fn from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    struct Visit<T>(std::marker::PhantomData<T>);
    impl<T: std::str::FromStr> serde::de::Visitor<'_> for Visit<T>
    where
        T::Err: fmt::Display,
    {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            v.parse().map_err(E::custom)
        }
    }
    d.deserialize_str(Visit(std::marker::PhantomData))
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    pub name: String,
    #[serde(default = "default_segment")]
    pub namespace: String,
    #[serde(default = "default_segment")]
    pub service_account: String,
    /// The node the workload runs on. Absent: this node.
    #[serde(default)]
    pub node: Option<String>,
    /// The workload's cgroup v2 directory (absolute, or relative to the cgroup
    /// v2 mount). Required for a workload on this node; processes in it and in
    /// its descendants are the workload.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// The workload's own network namespace (a pod). Absent: a plain-host
    /// workload in the node's namespace.
    #[serde(default)]
    pub netns: Option<NetnsRef>,
    /// Addresses the workload is reached at. A plain-host workload shares its
    /// node's addresses and tells its own traffic apart by `ports`.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Ports the workload serves. Required when several workloads share an
    /// address; empty means every port.
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub capture: WorkloadCaptureConfig,
    /// Overrides the namespace's mTLS mode for this workload.
    #[serde(default)]
    pub mtls: Option<MtlsMode>,
    /// Overrides the namespace's authorization mode for this workload.
    #[serde(default)]
    pub authorization: Option<AuthorizationMode>,
    /// Overrides the namespace's choice for outbound connections to
    /// destinations outside the mesh.
    #[serde(default)]
    pub outbound_passthrough: Option<Passthrough>,
}

/// What a workload's outbound connection to a destination outside the mesh
/// (no workload of the registry at that address) does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Passthrough {
    /// It goes to the destination in plaintext, as without the mesh.
    #[default]
    Allow,
    /// It is refused (reset): the workload may only talk to the mesh.
    Refuse,
}

/// Whether policy decisions are enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorizationMode {
    /// Decisions are computed and logged; a deny is a would-deny and the
    /// connection goes through.
    Audit,
    #[default]
    Enforce,
}

/// What happens to open connections that a new policy denies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPolicyChange {
    /// They are closed (reset), and the close is logged with the policy.
    #[default]
    Close,
    /// They may finish; only new connections see the new policy.
    Finish,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthorizationConfig {
    /// Policies in this namespace apply to the whole mesh (Istio's root
    /// namespace).
    pub root_namespace: String,
    pub on_policy_change: OnPolicyChange,
    /// Plaintext from one of this node's own addresses (the kubelet's
    /// health probes) reaches workloads whatever their mTLS mode and
    /// policies, logged with reason `node_probe`. Default: on in Kubernetes
    /// mode, off for plain hosts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_probes: Option<bool>,
}

impl Default for AuthorizationConfig {
    fn default() -> Self {
        Self {
            root_namespace: "ztunnel-system".to_owned(),
            on_policy_change: OnPolicyChange::Close,
            node_probes: None,
        }
    }
}

/// Whether a workload accepts plaintext callers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MtlsMode {
    /// Plaintext callers are accepted (and counted); mTLS callers too.
    #[default]
    Permissive,
    /// Only mTLS (HBONE) callers; plaintext is refused.
    Strict,
}

/// Modes of one namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceConfig {
    pub mtls: MtlsMode,
    pub authorization: AuthorizationMode,
    /// In enforce mode, deny what no ALLOW policy admits, even with no
    /// policy at all.
    pub default_deny: bool,
    pub outbound_passthrough: Passthrough,
}

pub(crate) fn default_segment() -> String {
    "default".to_owned()
}

/// Traffic of one workload that capture leaves alone.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadCaptureConfig {
    /// Outbound connections to these destination ports go direct.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound connections to these destination prefixes go direct.
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Inbound connections to these ports are not steered to the tunnel.
    pub exclude_inbound_ports: Vec<u16>,
}

impl WorkloadConfig {
    /// The workload's identity under `trust_domain` (always Ok for a loaded
    /// configuration: both segments were checked).
    pub fn spiffe_id(&self, trust_domain: &TrustDomain) -> Result<SpiffeId, SpiffeError> {
        SpiffeId::new(trust_domain.clone(), &self.namespace, &self.service_account)
    }

    /// Whether the workload runs on `node`.
    pub fn is_on(&self, node: &str) -> bool {
        self.node.as_deref().is_none_or(|n| n == node)
    }
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and checks `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let config: Config = parse_yaml(text, file)?;
        config.validate().map_err(|i| i.into_error(text, file))?;
        Ok(config)
    }

    /// [`Self::load`], with `node.name` set to `node` when given (Kubernetes
    /// mode: the node is the kubelet's, the file's name is left empty).
    pub fn load_as_node(path: &Path, node: Option<&str>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse_as_node(&text, path, node)
    }

    /// [`Self::parse`], with `node.name` set to `node` when given.
    pub fn parse_as_node(text: &str, file: &Path, node: Option<&str>) -> Result<Self, ConfigError> {
        let mut config: Config = parse_yaml(text, file)?;
        if let Some(node) = node {
            if !config.node.name.is_empty() && config.node.name != node {
                tracing::warn!(file = %config.node.name, node, "node.name in the file is not this node's name; using the node's");
            }
            config.node.name = node.to_owned();
        }
        config.validate().map_err(|i| i.into_error(text, file))?;
        Ok(config)
    }

    /// The mTLS mode in force for a workload: its own, else its namespace's.
    pub fn mtls_mode(&self, w: &WorkloadConfig) -> MtlsMode {
        w.mtls.or_else(|| self.namespaces.get(&w.namespace).map(|n| n.mtls)).unwrap_or_default()
    }

    /// Whether a workload may reach destinations outside the mesh.
    pub fn passthrough(&self, w: &WorkloadConfig) -> Passthrough {
        w.outbound_passthrough
            .or_else(|| self.namespaces.get(&w.namespace).map(|n| n.outbound_passthrough))
            .unwrap_or_default()
    }

    /// The authorization modes in force for a workload.
    pub fn authorization_modes(&self, w: &WorkloadConfig) -> Modes {
        let ns = self.namespaces.get(&w.namespace);
        let mode = w.authorization.or(ns.map(|n| n.authorization)).unwrap_or_default();
        Modes {
            enforce: mode == AuthorizationMode::Enforce,
            default_deny: ns.is_some_and(|n| n.default_deny),
        }
    }

    /// TCP sockets one workload may hold (the kernel's quota).
    pub fn sockets_per_workload(&self) -> u32 {
        self.limits.sockets_per_workload.unwrap_or((self.capture.max_connections / 4).max(64))
    }

    /// The policies in force, ready to evaluate.
    pub fn policy_set(&self) -> PolicySet<'_> {
        PolicySet {
            root_namespace: &self.authorization.root_namespace,
            policies: &self.policies,
            emergency_allows: &self.emergency_allows,
        }
    }

    /// Likely mistakes that still load (logged at start and reload, printed
    /// by `ztunnel validate`).
    pub fn warnings(&self) -> Vec<String> {
        let workloads: Vec<crate::workload::Workload> = self
            .workloads
            .iter()
            .filter_map(|w| crate::workload::Workload::from_config(self, w).ok())
            .collect();
        crate::policy::validate::warnings(
            &self.policies,
            &self.emergency_allows,
            &self.authorization.root_namespace,
            &workloads,
            std::time::SystemTime::now(),
        )
    }

    /// The workloads placed on this node.
    pub fn local_workloads(&self) -> impl Iterator<Item = &WorkloadConfig> {
        self.workloads.iter().filter(|w| w.is_on(&self.node.name))
    }

    fn validate(&self) -> Result<(), Invalid> {
        let key = |k: &str| Step::Key(k.to_owned());
        if self.node.name.is_empty() {
            return Err(Invalid::at([key("node"), key("name")], "must not be empty"));
        }
        let mut names: HashMap<(&str, &str), usize> = HashMap::new();
        let mut cgroups: HashMap<&Path, usize> = HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = |field: &str| [key("workloads"), Step::Index(i), key(field)];
            // The name becomes part of pin paths and log keys.
            validate_segment("workload name", &w.name).map_err(|e| Invalid::at(at("name"), e.to_string()))?;
            if let Some(first) = names.insert((&w.namespace, &w.name), i) {
                return Err(Invalid::at(
                    at("name"),
                    format!(
                        "duplicate workload `{}` in namespace `{}` (also workloads[{first}])",
                        w.name, w.namespace
                    ),
                ));
            }
            validate_segment("namespace", &w.namespace)
                .map_err(|e| Invalid::at(at("namespace"), e.to_string()))?;
            validate_segment("service account", &w.service_account)
                .map_err(|e| Invalid::at(at("service_account"), e.to_string()))?;
            if !w.is_on(&self.node.name) {
                continue;
            }
            let Some(cgroup) = &w.cgroup else {
                return Err(Invalid::at(
                    [key("workloads"), Step::Index(i)],
                    format!(
                        "workload `{}` runs on this node ({}) and needs `cgroup`",
                        w.name, self.node.name
                    ),
                ));
            };
            if let Some(first) = cgroups.insert(cgroup, i) {
                return Err(Invalid::at(
                    at("cgroup"),
                    format!("cgroup {} is also workloads[{first}]'s", cgroup.display()),
                ));
            }
            if let (Some(root), true) = (&self.capture.cgroup_root, cgroup.is_absolute())
                && !cgroup.starts_with(root)
            {
                return Err(Invalid::at(
                    at("cgroup"),
                    format!(
                        "{} is outside capture.cgroup_root {}: its connections could not be captured",
                        cgroup.display(),
                        root.display()
                    ),
                ));
            }
        }
        self.validate_addresses()?;
        self.validate_host_workloads()?;
        self.validate_services()?;
        self.validate_settings()?;
        self.validate_capacity()?;
        let entry = |list: &str, i: usize, field: &str| {
            let mut path = vec![key(list), Step::Index(i)];
            if !field.is_empty() {
                path.push(key(field));
            }
            path
        };
        if let Some((i, field, message)) = crate::policy::validate::policy_errors(&self.policies) {
            return Err(Invalid::at(entry("policies", i, field), message));
        }
        if let Some((i, field, message)) = crate::policy::validate::emergency_errors(&self.emergency_allows) {
            return Err(Invalid::at(entry("emergency_allows", i, field), message));
        }
        Ok(())
    }

    /// Durations and counts the tunnel divides by, waits on or sizes with:
    /// zero is never meant (and would spin, or panic a timer).
    fn validate_settings(&self) -> Result<(), Invalid> {
        let zero = Duration::ZERO;
        let durations = [
            ("proxy", "connect_timeout", self.proxy.connect_timeout),
            ("proxy", "reload_interval", self.proxy.reload_interval),
            ("proxy", "pool_idle_timeout", self.proxy.pool_idle_timeout),
            ("identity", "cert_lifetime", self.identity.cert_lifetime),
            ("identity", "retry_initial", self.identity.retry_initial),
            ("identity", "retry_max", self.identity.retry_max),
            ("identity", "bundle_refresh", self.identity.bundle_refresh),
        ];
        for (section, field, d) in durations {
            if d == zero {
                return Err(Invalid::at(
                    [Step::Key(section.into()), Step::Key(field.into())],
                    "must be more than 0s",
                ));
            }
        }
        if self.identity.retry_initial > self.identity.retry_max {
            return Err(Invalid::at(
                [Step::Key("identity".into()), Step::Key("retry_initial".into())],
                "must not be longer than identity.retry_max",
            ));
        }
        let counts = [
            ("capture", "max_connections", self.capture.max_connections as usize),
            ("identity", "max_concurrent_requests", self.identity.max_concurrent_requests),
            ("proxy", "worker_threads", self.proxy.worker_threads),
        ];
        for (section, field, n) in counts {
            if n == 0 {
                return Err(Invalid::at(
                    [Step::Key(section.into()), Step::Key(field.into())],
                    "must be at least 1",
                ));
            }
        }
        if let Some((field, message)) = self.limits.problem() {
            return Err(Invalid::at([Step::Key("limits".into()), Step::Key(field.into())], message));
        }
        // Beyond the kernel's limits (TCP_KEEPIDLE and TCP_KEEPINTVL 32767 s,
        // TCP_KEEPCNT 127) the options would be refused, and the give-up
        // time (idle + interval x probes) could overflow.
        let k = &self.proxy.tcp_keepalive;
        if k.idle.is_zero()
            || k.interval.is_zero()
            || k.probes == 0
            || k.idle.as_secs() > 32767
            || k.interval.as_secs() > 32767
            || k.probes > 127
        {
            return Err(Invalid::at(
                [Step::Key("proxy".into()), Step::Key("tcp_keepalive".into())],
                "idle and interval must be more than 0s and at most 32767s, probes 1 to 127",
            ));
        }
        for (i, g) in self.capture.guard_cgroups.iter().enumerate() {
            if let Some(root) = &self.capture.cgroup_root
                && g.is_absolute()
                && !g.starts_with(root)
            {
                return Err(Invalid::at(
                    [Step::Key("capture".into()), Step::Key("guard_cgroups".into()), Step::Index(i)],
                    format!("{} is outside capture.cgroup_root {}", g.display(), root.display()),
                ));
            }
        }
        Ok(())
    }

    /// The node's workloads must fit the capture maps: a workload that did
    /// not fit would not be captured, which is never acceptable.
    fn validate_capacity(&self) -> Result<(), Invalid> {
        use ztunnel_ebpf_common::{
            MAX_ENROLLED_CGROUPS, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, MAX_INBOUND_ADDRS,
        };
        let local: Vec<&WorkloadConfig> = self.local_workloads().collect();
        let addresses = |w: &WorkloadConfig| {
            if w.addresses.is_empty() && w.netns.is_none() {
                self.node.addresses.len()
            } else {
                w.addresses.len()
            }
        };
        let used = [
            ("local workloads", local.len(), MAX_ENROLLED_CGROUPS),
            (
                "port exclusions",
                local
                    .iter()
                    .map(|w| w.capture.exclude_outbound_ports.len() + w.capture.exclude_inbound_ports.len())
                    .sum(),
                MAX_EXCLUDED_PORTS,
            ),
            (
                "outbound CIDR exclusions (each workload's own addresses count)",
                local.iter().map(|w| w.capture.exclude_outbound_cidrs.len() + addresses(w)).sum(),
                MAX_EXCLUDED_CIDRS,
            ),
            (
                "pod addresses",
                local.iter().filter(|w| w.netns.is_some()).map(|w| w.addresses.len()).sum(),
                MAX_INBOUND_ADDRS,
            ),
        ];
        for (what, n, max) in used {
            if n > max as usize {
                return Err(Invalid::at(
                    [Step::Key("workloads".into())],
                    format!("{n} {what} on node {}; capture holds at most {max}", self.node.name),
                ));
            }
        }
        Ok(())
    }

    /// This node's plain-host workloads share its addresses and are told
    /// apart by port: with more than one, each names its ports and no port
    /// is claimed twice. None may claim a tunnel port, and none may be
    /// strict: its inbound plaintext is not steered to the tunnel (there is
    /// no namespace of its own to steer in), so strict could not be kept.
    fn validate_host_workloads(&self) -> Result<(), Invalid> {
        let hosts: Vec<(usize, &WorkloadConfig)> = self
            .workloads
            .iter()
            .enumerate()
            .filter(|(_, w)| w.is_on(&self.node.name) && w.netns.is_none())
            .collect();
        let at =
            |i: usize, field: &str| [Step::Key("workloads".into()), Step::Index(i), Step::Key(field.into())];
        for (n, &(i, w)) in hosts.iter().enumerate() {
            if let Some(p) = w.ports.iter().find(|p| ztunnel_ebpf_common::is_tunnel_port(**p, true)) {
                return Err(Invalid::at(
                    at(i, "ports"),
                    format!("port {p} of workload {w} is the tunnel's own"),
                ));
            }
            if self.mtls_mode(w) == MtlsMode::Strict {
                return Err(Invalid::at(
                    at(i, "mtls"),
                    format!(
                        "workload {w} is a plain-host workload: `mtls: strict` is not supported for those (its inbound \
                         plaintext cannot be steered to the tunnel); set `mtls: permissive` on it and firewall its ports, \
                         or run it in a network namespace of its own"
                    ),
                ));
            }
            for &(j, other) in &hosts[..n] {
                if w.ports.is_empty() || other.ports.is_empty() {
                    let (bare, named) = if w.ports.is_empty() { (w, other) } else { (other, w) };
                    return Err(Invalid::at(
                        at(i, "ports"),
                        format!(
                            "workloads {bare} and {named} both run on node {} and share its addresses: each needs `ports`, \
                             {bare} has none",
                            self.node.name
                        ),
                    ));
                }
                if let Some(p) = w.ports.iter().find(|p| other.ports.contains(p)) {
                    return Err(Invalid::at(
                        at(i, "ports"),
                        format!(
                            "port {p} is claimed by both workloads[{j}] ({other}) and workloads[{i}] ({w})"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Service addresses are virtual: one that is also a workload's, or
    /// another service's, would make a destination ambiguous.
    fn validate_services(&self) -> Result<(), Invalid> {
        let mut names: HashMap<(&str, &str), usize> = HashMap::new();
        let mut owners: HashMap<IpAddr, String> = HashMap::new();
        for w in &self.workloads {
            for a in &w.addresses {
                owners.insert(crate::workload::canonical(*a), format!("workload {w}"));
            }
        }
        for (i, s) in self.services.iter().enumerate() {
            let at = |field: &str| [Step::Key("services".into()), Step::Index(i), Step::Key(field.into())];
            validate_segment("service name", &s.name).map_err(|e| Invalid::at(at("name"), e.to_string()))?;
            validate_segment("namespace", &s.namespace)
                .map_err(|e| Invalid::at(at("namespace"), e.to_string()))?;
            if let Some(first) = names.insert((&s.namespace, &s.name), i) {
                return Err(Invalid::at(
                    at("name"),
                    format!("service {} is defined twice (also services[{first}])", s.key()),
                ));
            }
            if let Some((field, message)) = s.problem() {
                return Err(Invalid::at(at(field), message));
            }
            for a in &s.addresses {
                if let Some(owner) =
                    owners.insert(crate::workload::canonical(*a), format!("service {}", s.key()))
                {
                    return Err(Invalid::at(
                        at("addresses"),
                        format!("address {a} of service {} is also {owner}'s", s.key()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Two workloads may share an address only when both name their ports and
    /// the ports do not overlap: otherwise a destination would be ambiguous.
    fn validate_addresses(&self) -> Result<(), Invalid> {
        let mut owners: HashMap<IpAddr, Vec<usize>> = HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            for (j, addr) in w.addresses.iter().enumerate() {
                let others = owners.entry(*addr).or_default();
                for &o in others.iter() {
                    let other = &self.workloads[o];
                    let clash = w.ports.is_empty()
                        || other.ports.is_empty()
                        || w.ports.iter().any(|p| other.ports.contains(p));
                    if clash {
                        return Err(Invalid::at(
                            [
                                Step::Key("workloads".into()),
                                Step::Index(i),
                                Step::Key("addresses".into()),
                                Step::Index(j),
                            ],
                            format!(
                                "address {addr} is also workload `{}`'s; workloads sharing an address need disjoint `ports`",
                                other.name
                            ),
                        ));
                    }
                }
                others.push(i);
            }
        }
        Ok(())
    }
}

/// A failed cross-field check, located by path.
struct Invalid {
    path: Vec<Step>,
    message: String,
}

impl Invalid {
    fn at(path: impl IntoIterator<Item = Step>, message: impl Into<String>) -> Self {
        Self { path: path.into_iter().collect(), message: message.into() }
    }

    fn into_error(self, text: &str, file: &Path) -> ConfigError {
        ConfigError::Invalid {
            file: file.to_owned(),
            line: locate::locate(text, &self.path),
            field: locate::render(&self.path),
            message: self.message,
        }
    }
}

/// Deserializes YAML, turning serde errors into errors that name the file,
/// the line and the field.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    serde_yaml_ng::from_str(text).map_err(|e| {
        let line = e.location().map(|l| (l.line(), l.column()));
        let full = e.to_string();
        // serde_yaml_ng appends " at line L column C"; the line is shown first.
        let message = match full.rfind(" at line ") {
            Some(i) if line.is_some() => full[..i].to_owned(),
            _ => full,
        };
        let (field, message) = split_field(&message);
        ConfigError::Invalid { file: file.to_owned(), line, field, message }
    })
}

/// serde_yaml_ng prefixes messages with the field path (`workloads[1].name: ...`).
fn split_field(message: &str) -> (String, String) {
    match message.split_once(": ") {
        Some((field, rest)) if !field.contains(' ') && !field.is_empty() && !field.starts_with('`') => {
            (field.to_owned(), rest.to_owned())
        }
        _ => ("(document)".to_owned(), message.to_owned()),
    }
}

impl fmt::Display for WorkloadConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `humantime` durations in configuration ("10s", "5m", "24h").
pub mod duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct HumanDuration(Duration);
        impl std::str::FromStr for HumanDuration {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                humantime::parse_duration(s)
                    .map(HumanDuration)
                    .map_err(|e| format!("`{s}` is not a duration: {e}"))
            }
        }
        super::from_str::<D, HumanDuration>(d).map(|h| h.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("node.yaml")).map_err(|e| e.to_string())
    }

    const GOOD: &str = "\
node:
  name: node-a
  addresses: [198.18.0.1]
capture:
  cgroup_root: /sys/fs/cgroup/mesh
workloads:
  - name: web
    namespace: shop
    service_account: web-sa
    cgroup: /sys/fs/cgroup/mesh/web
    netns: /var/run/netns/web
    addresses: [198.19.1.2, 'fd7a:7e57:1::2']
    capture:
      exclude_outbound_ports: [53]
      exclude_outbound_cidrs: [198.19.200.0/24]
  - name: db
    node: node-b
    addresses: [198.19.2.2]
";

    #[test]
    fn loads_a_good_file() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.node.name, "node-a");
        assert_eq!(c.trust_domain.as_str(), "cluster.local");
        assert_eq!(c.local_workloads().count(), 1);
        let web = &c.workloads[0];
        assert_eq!(
            web.spiffe_id(&c.trust_domain).unwrap().to_string(),
            "spiffe://cluster.local/ns/shop/sa/web-sa"
        );
        assert_eq!(web.capture.exclude_outbound_ports, vec![53]);
        assert_eq!(c.proxy.connect_timeout, Duration::from_secs(10));
    }

    #[test]
    fn errors_name_field_and_line() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "node:\n  name: a\nworkloads:\n  - name: w\n    cgroup: /x\n    addresses: [10.0.0.300]\n",
                "node.yaml:6:",
                "workloads[0].addresses[0]: invalid IP address syntax",
            ),
            ("node:\n  name: a\n  colour: red\n", "node.yaml:3:", "unknown field `colour`"),
            (
                "node:\n  name: a\nworkloads:\n  - name: w\n",
                "node.yaml:4:",
                "workloads[0]: workload `w` runs on this node (a) and needs `cgroup`",
            ),
            (
                "node:\n  name: a\nworkloads:\n  - name: w\n    cgroup: /x\n  - name: w\n    cgroup: /y\n",
                "node.yaml:6:",
                "workloads[1].name: duplicate workload `w` in namespace `default`",
            ),
            (
                "node:\n  name: a\nworkloads:\n  - name: w\n    cgroup: /x\n    namespace: 'a b'\n",
                "node.yaml:6:",
                "workloads[0].namespace: namespace `a b` may contain only",
            ),
            ("node:\n  name: a\ntrust_domain: Bad.Domain\n", "node.yaml:3:", "lowercase"),
            (
                "node:\n  name: a\nproxy:\n  connect_timeout: soon\n",
                "node.yaml:4:",
                "`soon` is not a duration",
            ),
            (
                "node:\n  name: a\nworkloads:\n  - name: w\n    node: b\n    addresses: [198.19.0.1]\n  - name: v\n    node: c\n    addresses: [198.19.0.1]\n",
                "node.yaml:9:",
                "address 198.19.0.1 is also workload `w`'s",
            ),
            (
                "node:\n  name: a\ncapture:\n  cgroup_root: /sys/fs/cgroup/mesh\nworkloads:\n  - name: w\n    cgroup: /sys/fs/cgroup/other/w\n",
                "node.yaml:7:",
                "outside capture.cgroup_root",
            ),
            ("node:\n\tname: a\n", "node.yaml:2:", "cannot start any token"),
            (
                "node:\n  name: a\nproxy:\n  reload_interval: 0s\n",
                "node.yaml:4:",
                "proxy.reload_interval: must be more than 0s",
            ),
            (
                "node:\n  name: a\nidentity:\n  retry_initial: 1m\n  retry_max: 10s\n",
                "node.yaml:4:",
                "must not be longer than identity.retry_max",
            ),
            ("node:\n  name: a\ncapture:\n  max_connections: 0\n", "node.yaml:4:", "must be at least 1"),
            (
                "node:\n  name: a\nworkloads:\n  - name: 'w/../x'\n    cgroup: /x\n",
                "node.yaml:4:",
                "workloads[0].name: workload name `w/../x` may contain only",
            ),
            ("{}", "node.yaml", "missing field `node`"),
        ];
        for (text, at, want) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.starts_with(at), "{text:?}: `{err}` does not start with `{at}`");
            assert!(err.contains(want), "{text:?}: `{err}` lacks `{want}`");
        }
    }

    #[test]
    fn the_readme_configuration_loads() {
        let readme = include_str!("../../../README.md");
        let yaml = readme.split("```yaml\n").nth(1).and_then(|s| s.split("```").next()).unwrap();
        let c = parse(yaml).unwrap();
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    }

    #[test]
    fn plain_host_workloads_of_a_node_are_told_apart_by_port() {
        let head = "node: {name: a, addresses: [198.18.0.1]}\nworkloads:\n";
        let two = |p1: &str, p2: &str| {
            format!("{head}  - {{name: w1, cgroup: /x{p1}}}\n  - {{name: w2, cgroup: /y{p2}}}\n")
        };
        parse(&two(", ports: [7001]", ", ports: [7002]")).unwrap();
        let err = parse(&two("", ", ports: [7002]")).unwrap_err();
        assert!(err.contains("workloads default/w1 and default/w2 both run on node a"), "{err}");
        assert!(err.contains("default/w1 has none"), "{err}");
        let err = parse(&two(", ports: [7001, 7002]", ", ports: [7002]")).unwrap_err();
        assert!(
            err.contains(
                "port 7002 is claimed by both workloads[0] (default/w1) and workloads[1] (default/w2)"
            ),
            "{err}"
        );
        let err = parse(&format!("{head}  - {{name: w1, cgroup: /x, ports: [15008]}}\n")).unwrap_err();
        assert!(err.contains("port 15008 of workload default/w1 is the tunnel's own"), "{err}");
        let err = parse(&format!("{head}  - {{name: w1, cgroup: /x, mtls: strict}}\n")).unwrap_err();
        assert!(err.contains("`mtls: strict` is not supported"), "{err}");
        let ns_strict =
            format!("{head}  - {{name: w1, cgroup: /x}}\nnamespaces: {{default: {{mtls: strict}}}}\n");
        assert!(parse(&ns_strict).unwrap_err().contains("plain-host workload"));
        let overridden = format!(
            "{head}  - {{name: w1, cgroup: /x, mtls: permissive}}\nnamespaces: {{default: {{mtls: strict}}}}\n"
        );
        parse(&overridden).unwrap();
    }

    #[test]
    fn service_addresses_are_their_own() {
        let head = "node: {name: a}\nworkloads:\n  - {name: db, node: b, addresses: [198.19.2.11]}\n";
        let ok = format!(
            "{head}services:\n  - {{name: db, addresses: [10.96.0.10], ports: [{{port: 5432}}], endpoint_slices: [{{ports: [{{port: 5432}}], endpoints: [{{address: 198.19.2.11}}]}}]}}\n"
        );
        assert_eq!(parse(&ok).unwrap().services.len(), 1);
        let clash =
            format!("{head}services:\n  - {{name: db, addresses: [198.19.2.11], ports: [{{port: 5432}}]}}\n");
        let err = parse(&clash).unwrap_err();
        assert!(err.contains("services[0].addresses: address 198.19.2.11 of service default/db is also workload default/db's"), "{err}");
    }

    /// Crashed the `config` fuzz target (which also works out what the tunnel
    /// derives from a loaded file): this loaded, then the keepalive give-up
    /// time (idle + interval x probes) overflowed and panicked, as it would
    /// have for every socket the tunnel set up.
    #[test]
    fn keepalive_beyond_the_kernels_limits_is_refused_at_load() {
        let text =
            "node: {name: a}\nproxy:\n  tcp_keepalive: {idle: 180s, interval: 500000000000y, probes: 100}\n";
        let err = parse(text).unwrap_err();
        assert!(
            err.contains("proxy.tcp_keepalive: idle and interval must be more than 0s and at most 32767s"),
            "{err}"
        );
        for (idle, interval, probes) in [("32768s", "20s", 9), ("180s", "20s", 128)] {
            let text = format!(
                "node: {{name: a}}\nproxy:\n  tcp_keepalive: {{idle: {idle}, interval: {interval}, probes: {probes}}}\n"
            );
            assert!(parse(&text).is_err(), "{text}");
        }
        let widest =
            "node: {name: a}\nproxy:\n  tcp_keepalive: {idle: 32767s, interval: 32767s, probes: 127}\n";
        let c = parse(widest).unwrap();
        assert_eq!(c.proxy.tcp_keepalive.give_up_after(), Duration::from_secs(32767 * 128));
    }

    #[test]
    fn shared_addresses_need_disjoint_ports() {
        let text = "node:\n  name: a\n  addresses: [198.18.0.1]\nworkloads:\n  - name: w\n    cgroup: /x\n    addresses: [198.18.0.1]\n    ports: [80]\n  - name: v\n    cgroup: /y\n    addresses: [198.18.0.1]\n    ports: [81]\n";
        parse(text).unwrap();
    }
}
