//! The CNI commands: what the runtime asked for, what the plugin prints,
//! and the exit code.
//!
//! * ADD: a pod outside the mesh passes through untouched (the previous
//!   result is printed as it came) without the tunnel being asked. A pod in
//!   the mesh is enrolled first: its namespace fd goes to the tunnel, and only
//!   `enrolled` lets ADD succeed. Everything else fails ADD, so the kubelet
//!   tries again and the pod never runs unprotected.
//! * DEL never fails: a failing DEL wedges pod deletion. The tunnel is told on
//!   a best-effort basis.
//! * CHECK: a mesh pod must be enrolled.
//! * VERSION, STATUS, GC: as the spec says.

use std::{
    fs::File,
    io,
    os::fd::{AsFd as _, BorrowedFd},
    time::Instant,
};

use tracing::{info, warn};

use crate::{
    config::{ConfigError, PluginConfig, result_ips},
    membership::{self, Membership, MembershipError},
    protocol::{self, Command, PROTOCOL_VERSION, ProtocolError, Request, Response},
    spec::{
        self, CniCommand, CniEnv, ErrorResult, K8sArgs, LATEST_VERSION, MalformedArgs, MissingEnv,
        VersionResult, code,
    },
};

/// What the process prints on stdout and exits with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub stdout: String,
    pub code: i32,
}

impl Exit {
    fn success(stdout: impl Into<String>) -> Self {
        Self { stdout: stdout.into(), code: 0 }
    }
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("CNI_COMMAND {0:?} is not a CNI command")]
    UnknownCommand(Option<String>),
    #[error(transparent)]
    MissingEnv(#[from] MissingEnv),
    #[error(transparent)]
    MalformedArgs(#[from] MalformedArgs),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("CNI version {0} is not supported; supported: {supported}", supported = spec::SUPPORTED_VERSIONS.join(", "))]
    IncompatibleVersion(String),
    #[error(
        "the configuration has no prevResult: ztunnel-cni is a chained plugin and must come after the plugin that sets up the pod's interface"
    )]
    NoPrevResult,
    #[error("the plugin's configuration names no kubeconfig, so the pod cannot be looked up")]
    NoKubeconfig,
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("cannot start the plugin's async runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot open the pod's network namespace {path}: {source}")]
    Netns { path: String, source: io::Error },
    #[error("{0}; the pod waits until ztunnel runs on this node")]
    Unreachable(ProtocolError),
    #[error("ztunnel answered out of protocol: {0}")]
    Protocol(ProtocolError),
    #[error("ztunnel refused to enroll the pod: {0}")]
    Refused(String),
    #[error("ztunnel does not hold the pod as enrolled: {0}")]
    NotEnrolled(String),
}

impl Failure {
    fn code(&self) -> u32 {
        match self {
            Failure::UnknownCommand(_) | Failure::MissingEnv(_) | Failure::MalformedArgs(_) => {
                code::INVALID_ENVIRONMENT
            }
            Failure::Config(ConfigError::Json(_) | ConfigError::PrevResult(_)) => code::DECODE_FAILURE,
            Failure::Config(_) | Failure::NoPrevResult | Failure::NoKubeconfig => {
                code::INVALID_NETWORK_CONFIG
            }
            Failure::IncompatibleVersion(_) => code::INCOMPATIBLE_VERSION,
            Failure::Membership(MembershipError::Kubeconfig { .. } | MembershipError::Client { .. }) => {
                code::INVALID_NETWORK_CONFIG
            }
            Failure::Membership(MembershipError::UidMismatch { .. }) => code::CONTAINER_UNKNOWN,
            Failure::Membership(_) => code::TRY_AGAIN_LATER,
            Failure::Runtime(_) => code::IO_FAILURE,
            Failure::Netns { .. } => code::CONTAINER_UNKNOWN,
            Failure::Unreachable(_) => code::TRY_AGAIN_LATER,
            Failure::Protocol(_) | Failure::Refused(_) => code::ENROLLMENT_REFUSED,
            Failure::NotEnrolled(_) => code::NOT_ENROLLED,
        }
    }

    /// The short line a `kubectl describe pod` event shows.
    fn msg(&self) -> &'static str {
        match self {
            Failure::UnknownCommand(_) | Failure::MissingEnv(_) | Failure::MalformedArgs(_) => {
                "ztunnel-cni: invalid runtime environment"
            }
            Failure::Config(_)
            | Failure::IncompatibleVersion(_)
            | Failure::NoPrevResult
            | Failure::NoKubeconfig => "ztunnel-cni: invalid network configuration",
            Failure::Membership(MembershipError::Kubeconfig { .. } | MembershipError::Client { .. }) => {
                "ztunnel-cni: cannot use its kubeconfig"
            }
            Failure::Membership(_) | Failure::Runtime(_) => {
                "ztunnel-cni: cannot tell from the API server whether the pod is in the mesh"
            }
            Failure::Netns { .. } => "ztunnel-cni: the pod's network namespace is gone",
            Failure::Unreachable(_) => "ztunnel-cni: ztunnel is not reachable on this node",
            Failure::Protocol(_) | Failure::Refused(_) => "ztunnel-cni: ztunnel did not enroll the pod",
            Failure::NotEnrolled(_) => "ztunnel-cni: the pod is in the mesh but not enrolled",
        }
    }
}

/// Runs the command the environment names. `config` is the parsed stdin;
/// `stdin` itself is only consulted for the version when `config` failed.
pub fn run(env: &CniEnv, stdin: &str, config: Result<PluginConfig, ConfigError>) -> Exit {
    let version = match &config {
        Ok(c) => Some(c.cni_version.clone()),
        Err(_) => PluginConfig::version_of(stdin),
    };
    let command = env.command.as_deref().map(str::parse::<CniCommand>);
    let failed = |failure: Failure| error_exit(version.as_deref(), failure);
    match command {
        Some(Ok(CniCommand::Version)) => version_exit(version.as_deref()),
        Some(Ok(CniCommand::Status | CniCommand::Gc)) => Exit::success(""),
        Some(Ok(CniCommand::Del)) => {
            del(env, config.ok());
            Exit::success("")
        }
        Some(Ok(CniCommand::Add)) => match config.map_err(Failure::from).and_then(|c| add(env, &c)) {
            Ok(result) => Exit::success(result),
            Err(failure) => failed(failure),
        },
        Some(Ok(CniCommand::Check)) => match config.map_err(Failure::from).and_then(|c| check(env, &c)) {
            Ok(()) => Exit::success(""),
            Err(failure) => failed(failure),
        },
        Some(Err(_)) | None => failed(Failure::UnknownCommand(env.command.clone())),
    }
}

fn version_exit(requested: Option<&str>) -> Exit {
    let cni_version = requested.filter(|v| spec::is_supported(v)).unwrap_or(LATEST_VERSION);
    let result =
        VersionResult { cni_version: cni_version.to_owned(), supported_versions: spec::SUPPORTED_VERSIONS };
    Exit::success(serde_json::to_string(&result).unwrap_or_default())
}

fn error_exit(version: Option<&str>, failure: Failure) -> Exit {
    warn!("{failure}");
    let result = ErrorResult {
        cni_version: version.unwrap_or(LATEST_VERSION).to_owned(),
        code: failure.code(),
        msg: failure.msg().to_owned(),
        details: failure.to_string(),
    };
    Exit { stdout: serde_json::to_string(&result).unwrap_or_default(), code: 1 }
}

fn check_version(config: &PluginConfig) -> Result<(), Failure> {
    if spec::is_supported(&config.cni_version) {
        Ok(())
    } else {
        Err(Failure::IncompatibleVersion(config.cni_version.clone()))
    }
}

/// The previous result, printed as it came, once the pod is enrolled or
/// known to be outside the mesh.
fn add(env: &CniEnv, config: &PluginConfig) -> Result<String, Failure> {
    check_version(config)?;
    let prev = config.prev_result.as_ref().ok_or(Failure::NoPrevResult)?;
    let container_id = CniEnv::require(&env.container_id, "CNI_CONTAINERID")?;
    let netns_path = CniEnv::require(&env.netns, "CNI_NETNS")?;
    let interface = CniEnv::require(&env.ifname, "CNI_IFNAME")?;
    let k8s = K8sArgs::parse(env.args.as_deref())?;
    let Some((namespace, name)) = k8s.pod() else {
        info!(
            "ADD {container_id}: not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME); passing through"
        );
        return Ok(prev.get().to_owned());
    };
    let deadline = Instant::now() + config.timeout;
    if let Membership::NotInMesh(why) = judge(config, &k8s, deadline)? {
        info!("ADD {namespace}/{name}: not in the mesh ({why}); passing through");
        return Ok(prev.get().to_owned());
    }
    let req = Request {
        version: PROTOCOL_VERSION,
        command: Command::Add,
        container_id: container_id.to_owned(),
        pod_namespace: namespace.to_owned(),
        pod_name: name.to_owned(),
        pod_uid: k8s.pod_uid.clone().unwrap_or_default(),
        netns_path: netns_path.to_owned(),
        interface: interface.to_owned(),
        ips: result_ips(prev)?,
    };
    let netns = open_netns(netns_path)?;
    let resp = ask(config, &req, Some(netns.as_fd()), deadline)?;
    if resp.result == Command::Add.success() {
        info!("ADD {namespace}/{name}: enrolled ({:?})", req.ips);
        Ok(prev.get().to_owned())
    } else {
        Err(Failure::Refused(answer_text(&resp)))
    }
}

fn check(env: &CniEnv, config: &PluginConfig) -> Result<(), Failure> {
    check_version(config)?;
    let container_id = CniEnv::require(&env.container_id, "CNI_CONTAINERID")?;
    let netns_path = CniEnv::require(&env.netns, "CNI_NETNS")?;
    let interface = CniEnv::require(&env.ifname, "CNI_IFNAME")?;
    let k8s = K8sArgs::parse(env.args.as_deref())?;
    let Some((namespace, name)) = k8s.pod() else {
        return Ok(());
    };
    let deadline = Instant::now() + config.timeout;
    if let Membership::NotInMesh(_) = judge(config, &k8s, deadline)? {
        return Ok(());
    }
    let req = Request {
        version: PROTOCOL_VERSION,
        command: Command::Check,
        container_id: container_id.to_owned(),
        pod_namespace: namespace.to_owned(),
        pod_name: name.to_owned(),
        pod_uid: k8s.pod_uid.clone().unwrap_or_default(),
        netns_path: netns_path.to_owned(),
        interface: interface.to_owned(),
        ips: config.prev_result.as_deref().map(result_ips).transpose()?.unwrap_or_default(),
    };
    let netns = open_netns(netns_path)?;
    let resp = ask(config, &req, Some(netns.as_fd()), deadline)?;
    if resp.result == Command::Check.success() {
        Ok(())
    } else {
        Err(Failure::NotEnrolled(answer_text(&resp)))
    }
}

/// Best effort, never an error: the tunnel forgets the pod if it held it.
/// The API server is not asked (the pod may be gone from it already), so
/// every pod's DEL reaches the tunnel, which answers `removed` for pods it
/// never held.
fn del(env: &CniEnv, config: Option<PluginConfig>) {
    let Some(config) = config else {
        // Which socket the tunnel listens on is in the configuration we
        // cannot read; guessing could tell another tunnel.
        warn!("DEL with an unusable network configuration; the tunnel is not told");
        return;
    };
    let k8s = K8sArgs::parse(env.args.as_deref()).unwrap_or_default();
    let req = Request {
        version: PROTOCOL_VERSION,
        command: Command::Del,
        container_id: env.container_id.clone().unwrap_or_default(),
        pod_namespace: k8s.pod_namespace.clone().unwrap_or_default(),
        pod_name: k8s.pod_name.clone().unwrap_or_default(),
        pod_uid: k8s.pod_uid.clone().unwrap_or_default(),
        netns_path: env.netns.clone().unwrap_or_default(),
        interface: env.ifname.clone().unwrap_or_default(),
        ips: Vec::new(),
    };
    let pod = format!("{}/{}", req.pod_namespace, req.pod_name);
    match protocol::client::request(&config.socket, &req, None, config.timeout) {
        Ok(resp) if resp.result == Command::Del.success() => info!("DEL {pod}: removed"),
        Ok(resp) => warn!("DEL {pod}: ztunnel answered {}; deleting anyway", answer_text(&resp)),
        Err(e) => warn!("DEL {pod}: {e}; deleting anyway"),
    }
}

/// Is the pod in the mesh? Asks the API server with the configured kubeconfig.
fn judge(config: &PluginConfig, k8s: &K8sArgs, deadline: Instant) -> Result<Membership, Failure> {
    let kubeconfig = config.kubeconfig().ok_or(Failure::NoKubeconfig)?;
    let (namespace, name) = k8s.pod().unwrap_or_default();
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Failure::Runtime)?;
    runtime.block_on(async {
        let client = membership::client(kubeconfig, deadline).await?;
        Ok(membership::lookup(&client, namespace, name, k8s.pod_uid.as_deref(), deadline).await?)
    })
}

fn open_netns(path: &str) -> Result<File, Failure> {
    File::open(path).map_err(|source| Failure::Netns { path: path.to_owned(), source })
}

fn ask(
    config: &PluginConfig,
    req: &Request,
    netns: Option<BorrowedFd<'_>>,
    deadline: Instant,
) -> Result<Response, Failure> {
    let left = deadline.saturating_duration_since(Instant::now());
    protocol::client::request(&config.socket, req, netns, left)
        .map_err(|e| if e.is_unreachable() { Failure::Unreachable(e) } else { Failure::Protocol(e) })
}

fn answer_text(resp: &Response) -> String {
    if resp.message.is_empty() {
        resp.result.to_string()
    } else {
        format!("{}: {}", resp.result, resp.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> CniEnv {
        CniEnv { command: Some(command.into()), ..Default::default() }
    }

    fn parse(stdin: &str) -> Result<PluginConfig, ConfigError> {
        PluginConfig::parse(stdin)
    }

    #[test]
    fn version_lists_what_we_speak() {
        let stdin = r#"{"cniVersion":"0.4.0"}"#;
        let exit = run(&env("VERSION"), stdin, parse(stdin));
        assert_eq!(exit.code, 0);
        assert_eq!(
            exit.stdout,
            r#"{"cniVersion":"0.4.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#
        );
    }

    #[test]
    fn add_without_prev_result_fails() {
        let stdin = r#"{"cniVersion":"1.0.0","kubeconfig":"/nonexistent"}"#;
        let mut e = env("ADD");
        e.container_id = Some("c".into());
        e.netns = Some("/proc/self/ns/net".into());
        e.ifname = Some("eth0".into());
        let exit = run(&e, stdin, parse(stdin));
        assert_eq!(exit.code, 1);
        let err: serde_json::Value = serde_json::from_str(&exit.stdout).unwrap();
        assert_eq!(err["code"], code::INVALID_NETWORK_CONFIG);
        assert_eq!(err["cniVersion"], "1.0.0");
    }

    #[test]
    fn add_outside_kubernetes_passes_through() {
        let prev = r#"{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/24"}]}"#;
        let stdin = format!(r#"{{"cniVersion":"1.0.0","prevResult":{prev}}}"#);
        let mut e = env("ADD");
        e.container_id = Some("c".into());
        e.netns = Some("/proc/self/ns/net".into());
        e.ifname = Some("eth0".into());
        let exit = run(&e, &stdin, parse(&stdin));
        assert_eq!(exit, Exit::success(prev));
    }

    #[test]
    fn unsupported_version_and_unknown_command_fail() {
        let stdin = r#"{"cniVersion":"0.2.0","prevResult":{}}"#;
        let mut e = env("ADD");
        e.container_id = Some("c".into());
        let exit = run(&e, stdin, parse(stdin));
        let err: serde_json::Value = serde_json::from_str(&exit.stdout).unwrap();
        assert_eq!((exit.code, err["code"].as_u64()), (1, Some(code::INCOMPATIBLE_VERSION as u64)));

        let exit = run(&env("FROB"), stdin, parse(stdin));
        let err: serde_json::Value = serde_json::from_str(&exit.stdout).unwrap();
        assert_eq!((exit.code, err["code"].as_u64()), (1, Some(code::INVALID_ENVIRONMENT as u64)));
    }

    #[test]
    fn del_succeeds_whatever_the_input() {
        let exit = run(&env("DEL"), "not json", parse("not json"));
        assert_eq!(exit, Exit::success(""));
        let stdin = r#"{"cniVersion":"1.0.0","socket":"/nonexistent/cni.sock"}"#;
        assert_eq!(run(&env("DEL"), stdin, parse(stdin)), Exit::success(""));
        assert_eq!(run(&env("STATUS"), stdin, parse(stdin)), Exit::success(""));
        assert_eq!(run(&env("GC"), stdin, parse(stdin)), Exit::success(""));
    }
}
