//! The `ztunnel` command.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _};
use ztunnel::{capture::Capture, config::Config};

#[derive(Parser)]
#[command(name = "ztunnel", version, about = "Node-level transparent mTLS tunnel")]
struct Cli {
    /// Log filter (tracing EnvFilter syntax: `info`, `ztunnel=debug,info`, ...).
    #[arg(long, global = true, env = "ZTUNNEL_LOG", default_value = "info")]
    log_level: String,
    /// Log line format (logs go to stderr; the access log is separate).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node tunnel.
    Run {
        /// The node's settings (and, without --kubernetes, its workloads,
        /// Services and policies).
        #[arg(long)]
        config: PathBuf,
        /// Kubernetes mode: workloads, namespaces' modes, Services and
        /// AuthorizationPolicies come from the API server.
        #[arg(long)]
        kubernetes: bool,
        /// A kubeconfig (default: in-cluster, then $KUBECONFIG).
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// This node's name (the downward API's spec.nodeName).
        #[arg(long, env = "NODE_NAME", requires = "kubernetes")]
        node_name: Option<String>,
        /// The tunnel's own namespace (its pods are never workloads).
        #[arg(long, env = "POD_NAMESPACE", default_value = "ztunnel-system")]
        tunnel_namespace: String,
        /// Where the CNI plugin enrolls pods.
        #[arg(long, default_value = ztunnel_cni::protocol::DEFAULT_SOCKET_PATH)]
        cni_socket: PathBuf,
        /// The kubelet's pod cgroups, relative to the cgroup v2 mount
        /// (repeatable; default: kubepods.slice, kubepods and kind's).
        #[arg(long = "kubepods-cgroup")]
        kubepods_cgroups: Vec<PathBuf>,
    },
    /// Check a configuration file, or the AuthorizationPolicy documents of a
    /// Kubernetes manifest (other kinds are skipped), and exit (0: valid).
    Validate {
        #[arg(long, required_unless_present = "manifest", conflicts_with = "manifest")]
        config: Option<PathBuf>,
        /// A multi-document YAML manifest (`kubectl kustomize` output), or a
        /// directory of them.
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Print the AuthorizationPolicy CustomResourceDefinition (YAML).
    Crd,
    /// Authorization policy: explain one decision, or print who may call what.
    Policy {
        #[command(subcommand)]
        command: ztunnel::cli::PolicyCommand,
    },
    /// The certificate authority.
    Ca {
        #[command(subcommand)]
        command: ztunnel::cli::CaCommand,
    },
    /// Identities a running tunnel holds: serial, expiry, next renewal, last error.
    Certs {
        /// The tunnel's admin endpoint (in the node's network namespace).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        #[arg(long)]
        json: bool,
    },
    /// Why a call works or fails, from the running tunnel of this node: both
    /// sides and their modes, the source's certificate, the trust bundle,
    /// the policy decision and the failures recorded between the two, with
    /// a one-line verdict first. Exit 0: the call would be allowed and no
    /// failure was recorded in the last 5 minutes; 1: otherwise; 2: bad
    /// input or no tunnel.
    Explain {
        /// The caller: a workload (`name` or `namespace/name`) or an address.
        #[arg(long)]
        from: String,
        /// The address called: `ip:port` (IPv6 in brackets).
        #[arg(long)]
        to: String,
        /// The tunnel's admin endpoint (in the node's network namespace).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        /// The admin endpoint's JSON (docs/admin-api.md) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check whether this node can run the tunnel, before anything is
    /// installed: kernel and BTF, cgroup v2, each eBPF program loaded and
    /// attached to a scratch cgroup or namespace, bpffs, capabilities, open
    /// file limit, other meshes' rules, the pin directory. One line per
    /// check; exit 0 only when the node can run the tunnel. Run as root.
    Precheck {
        /// One JSON object on stdout instead of lines.
        #[arg(long)]
        json: bool,
        /// Read the pin directory, cgroup root and connection limit from
        /// this configuration file (default: the defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// A Kubernetes node: check the CNI configuration too.
        #[arg(long)]
        kubernetes: bool,
        /// Where the container runtime reads CNI configuration.
        #[arg(long, default_value = ztunnel::precheck::DEFAULT_CNI_CONF_DIR, requires = "kubernetes")]
        cni_conf_dir: PathBuf,
        /// On failure, post a Warning Event on this pod (POD_NAME,
        /// POD_NAMESPACE, POD_UID) and hold instead of exiting, so that a
        /// DaemonSet shows one clear event rather than a crash loop.
        #[arg(long, requires = "kubernetes")]
        report_event: bool,
    },
    /// Remove capture from this node: unpin every program, link and map, so
    /// nothing stays attached to any cgroup or namespace. Stop the tunnel
    /// first; enrolled workloads then connect directly again.
    Uninstall {
        /// Read the pin directory from this configuration file.
        #[arg(long, conflicts_with = "pin_dir", required_unless_present = "pin_dir")]
        config: Option<PathBuf>,
        /// The pin directory (capture.bpf_pin_dir).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let set_log_level = match init_logging(&cli.log_level, cli.log_format) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ztunnel: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Run {
            config,
            kubernetes,
            kubeconfig,
            node_name,
            tunnel_namespace,
            cni_socket,
            kubepods_cgroups,
        } => {
            let k8s = match (kubernetes, node_name) {
                (false, _) => Ok(None),
                (true, None) => {
                    Err(anyhow::anyhow!("--kubernetes needs the node's name: --node-name or NODE_NAME"))
                }
                (true, Some(node_name)) => Ok(Some(ztunnel::k8s::agent::KubernetesOptions {
                    kubeconfig,
                    node_name,
                    tunnel_namespace,
                    cni_socket,
                    kubepods_roots: kubepods_cgroups,
                })),
            };
            k8s.and_then(|k8s| ztunnel::app::run(&config, set_log_level, k8s))
        }
        Command::Validate { config: Some(config), .. } => Config::load(&config)
            .inspect(|c| {
                for w in c.warnings() {
                    eprintln!("warning: {w}");
                }
            })
            .map(|c| {
                println!(
                    "{}: valid ({} workloads, {} on node {})",
                    config.display(),
                    c.workloads.len(),
                    c.local_workloads().count(),
                    c.node.name
                );
            })
            .map_err(Into::into),
        Command::Validate { config: None, manifest } => match manifest {
            Some(m) => validate_manifest(&m),
            None => Err(anyhow::anyhow!("--config or --manifest is required")),
        },
        Command::Crd => ztunnel::k8s::crd::crd_yaml().map(|yaml| print!("{yaml}")).map_err(Into::into),
        Command::Uninstall { config, pin_dir } => uninstall(config, pin_dir),
        Command::Ca { command } => ztunnel::cli::ca(command),
        Command::Policy { command } => {
            return match ztunnel::cli::policy(command) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("ztunnel: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Certs { admin, json } => ztunnel::cli::certs(admin, json),
        Command::Explain { from, to, admin, json } => {
            return match ztunnel::cli::explain(admin, &from, &to, json) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("ztunnel: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Precheck { json, config, kubernetes, cni_conf_dir, report_event } => {
            let options = ztunnel::precheck::Options { config, kubernetes, cni_conf_dir };
            return precheck(&options, json, report_event);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztunnel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `validate --manifest`: a file, or every YAML file under a directory.
fn validate_manifest(path: &std::path::Path) -> anyhow::Result<()> {
    use ztunnel::k8s::manifest;
    let (mut problems, mut policies, mut skipped) = (0, 0, 0);
    for file in manifest::manifest_files(path)? {
        let report = manifest::validate_file(&file)?;
        for e in &report.errors {
            eprintln!("{}: {e}", file.display());
        }
        problems += report.errors.len();
        policies += report.policies;
        skipped += report.skipped;
    }
    anyhow::ensure!(
        problems == 0,
        "{}: {problems} problem(s) in {policies} AuthorizationPolicy document(s)",
        path.display()
    );
    println!(
        "{}: valid ({policies} AuthorizationPolicy documents, {skipped} other documents skipped)",
        path.display()
    );
    Ok(())
}

fn uninstall(config: Option<PathBuf>, pin_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let pin_dir = match (config, pin_dir) {
        (_, Some(p)) => p,
        (Some(c), None) => Config::load(&c)?.capture.bpf_pin_dir,
        (None, None) => anyhow::bail!("--config or --pin-dir is required"),
    };
    if Capture::uninstall(&pin_dir)? {
        println!("removed capture pinned at {}", pin_dir.display());
    } else {
        println!("nothing installed at {}", pin_dir.display());
    }
    Ok(())
}

/// Exit 0 when the node can run the tunnel, 1 when it cannot, 2 when the
/// report cannot be written.
fn precheck(options: &ztunnel::precheck::Options, json: bool, report_event: bool) -> ExitCode {
    let report = ztunnel::precheck::run(options);
    let written = if json {
        serde_json::to_string_pretty(&report).map(|text| println!("{text}")).map_err(anyhow::Error::from)
    } else {
        print!("{}", report.text());
        Ok(())
    };
    let written = written.and_then(|()| std::io::Write::flush(&mut std::io::stdout()).map_err(Into::into));
    if let Err(e) = written {
        eprintln!("ztunnel: {e:#}");
        return ExitCode::from(2);
    }
    if report.ok {
        return ExitCode::SUCCESS;
    }
    if report_event && let Err(e) = ztunnel::precheck::event::report_and_hold(&report) {
        eprintln!("ztunnel: {e}");
    }
    ExitCode::FAILURE
}

fn init_logging(filter: &str, format: LogFormat) -> anyhow::Result<ztunnel::admin::LogLevelSetter> {
    let filter = EnvFilter::try_new(filter).map_err(|e| anyhow::anyhow!("--log-level {filter}: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // Colour only for a person at a terminal, never into files or journald.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
            .init(),
        LogFormat::Json => {
            registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).init()
        }
    }
    Ok(Box::new(move |level: &str| {
        let f = EnvFilter::try_new(level).map_err(|e| format!("invalid filter `{level}`: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    }))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
