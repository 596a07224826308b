//! `ztunnel-cni`: with no arguments, the CNI plugin (the runtime's
//! `CNI_COMMAND` environment and stdin); with a subcommand, its install into
//! or removal from the node's CNI configuration.

use std::{io::Read as _, path::PathBuf, process::ExitCode, time::Duration};

use tracing::{info, warn};

use clap::{Args, Parser, Subcommand};
use ztunnel_cni::{
    config::{DEFAULT_LOG_LEVEL, PluginConfig},
    install::{self, DEFAULT_KUBECONFIG_NAME, InstallOptions, Layout, kubeconfig},
    logging, plugin,
    protocol::DEFAULT_SOCKET_PATH,
    spec::CniEnv,
};

/// The chained CNI plugin that enrolls pods with ztunnel. Run with no
/// arguments by the container runtime (CNI_COMMAND and stdin); run with
/// `install`/`uninstall` by the ztunnel DaemonSet.
#[derive(Parser)]
#[command(name = "ztunnel-cni", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Put the binary, a kubeconfig and the plugin's entry into the node's CNI configuration.
    Install(Box<InstallArgs>),
    /// Take out exactly what install put in.
    Uninstall(LayoutArgs),
}

#[derive(Args)]
struct LayoutArgs {
    /// The node's CNI configuration directory, as mounted here.
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The node's CNI binary directory, as mounted here.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The plugin's kubeconfig: a file name in the configuration directory
    /// (or a path directly inside it).
    #[arg(long, default_value = DEFAULT_KUBECONFIG_NAME)]
    kubeconfig_out: PathBuf,
}

#[derive(Args)]
struct InstallArgs {
    #[command(flatten)]
    layout: LayoutArgs,
    /// The configuration directory as the host sees it (the plugin runs on
    /// the host and finds its kubeconfig there).
    #[arg(long, default_value = "/etc/cni/net.d")]
    host_conf_dir: PathBuf,
    /// The tunnel's enrollment socket, on the host.
    #[arg(long, default_value = DEFAULT_SOCKET_PATH)]
    socket: PathBuf,
    /// The plugin's `timeout` (default in the plugin: 30s).
    #[arg(long)]
    timeout: Option<String>,
    /// The plugin's `log_level` (default in the plugin: info).
    #[arg(long)]
    log_level: Option<String>,
    /// The plugin's `log_file`, on the host (default: stderr, which the runtime keeps).
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// The API server's host as the node reaches it.
    #[arg(long, env = "KUBERNETES_SERVICE_HOST")]
    api_server_host: Option<String>,
    /// The API server's port as the node reaches it.
    #[arg(long, env = "KUBERNETES_SERVICE_PORT")]
    api_server_port: Option<String>,
    /// Where the pod's service account token and ca.crt are mounted.
    #[arg(long, default_value = kubeconfig::DEFAULT_SERVICE_ACCOUNT_DIR)]
    service_account_dir: PathBuf,
    /// The binary to install (default: this program).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Refuse (and change nothing) when another mesh's plugin is in the chain.
    #[arg(long)]
    strict: bool,
    /// Keep running and install again at this interval (e.g. 10s): puts the
    /// entry back when the primary plugin rewrites its configuration, follows
    /// token rotation, and waits for a primary configuration that is not
    /// there yet. Stops on SIGTERM without uninstalling, so that mesh pods
    /// keep failing closed while ztunnel is away (e.g. during an upgrade).
    #[arg(long, value_parser = humantime::parse_duration)]
    reconcile_every: Option<Duration>,
}

fn main() -> ExitCode {
    // The runtime runs a plugin with no arguments; anything else is an operator.
    if std::env::args_os().len() <= 1 && std::env::var_os("CNI_COMMAND").is_some() {
        return ExitCode::from(run_plugin());
    }
    let cli = Cli::parse();
    logging::init(DEFAULT_LOG_LEVEL, None);
    match run_command(cli.command) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ztunnel-cni: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_command(command: Command) -> anyhow::Result<String> {
    match command {
        Command::Install(args) => {
            let args = *args;
            let layout = layout(args.layout)?;
            let api_server = match (args.api_server_host, args.api_server_port) {
                (Some(host), Some(port)) => Some(kubeconfig::ApiServer { host, port }),
                _ => None,
            };
            let binary = match args.binary {
                Some(b) => b,
                None => std::env::current_exe()?,
            };
            let opts = InstallOptions {
                layout,
                host_conf_dir: args.host_conf_dir,
                socket: args.socket,
                timeout: args.timeout,
                log_level: args.log_level,
                log_file: args.log_file,
                api_server,
                service_account_dir: args.service_account_dir,
                binary,
                strict: args.strict,
            };
            match args.reconcile_every {
                None => Ok(install::install(&opts)?.to_string()),
                Some(every) => reconcile(&opts, every),
            }
        }
        Command::Uninstall(args) => Ok(install::uninstall(&layout(args)?)?.to_string()),
    }
}

/// Installs every `every`, forever. Logs every change, and a failure or a
/// warning once until it changes.
fn reconcile(opts: &InstallOptions, every: Duration) -> ! {
    let mut last = String::new();
    loop {
        match install::install(opts) {
            Ok(report) => {
                let line = report.to_string();
                if report.changed_anything() || line != last {
                    info!("install: {line}");
                }
                last = line;
            }
            Err(e) => {
                let line = e.to_string();
                if line != last {
                    warn!("install: {line}; trying again every {every:?}");
                }
                last = line;
            }
        }
        std::thread::sleep(every);
    }
}

fn layout(args: LayoutArgs) -> anyhow::Result<Layout> {
    Ok(Layout::new(args.conf_dir, args.bin_dir, &args.kubeconfig_out)?)
}

fn run_plugin() -> u8 {
    let mut stdin = String::new();
    // An unreadable stdin is an empty configuration: the command's own
    // checks then say what is missing.
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let config = PluginConfig::parse(&stdin);
    match &config {
        Ok(c) => logging::init(&c.log_level, c.log_file.as_deref()),
        Err(_) => logging::init(DEFAULT_LOG_LEVEL, None),
    }
    // kube-rs builds its TLS client on the process's provider: ring, as everywhere in ztunnel.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exit = plugin::run(&CniEnv::from_process(), &stdin, config);
    print!("{}", exit.stdout);
    u8::try_from(exit.code).unwrap_or(1)
}
