//! The subcommands that are not `run`: the CA's, `certs`, `policy` (in
//! `policy`) and `explain` (in `explain`).

mod explain;
mod policy;

pub use self::{
    explain::explain,
    policy::{PolicyCommand, policy},
};

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Subcommand;
use tokio_util::sync::CancellationToken;

use crate::{
    ca::{
        cacerts::Cacerts,
        server::{ServeSettings, write_node_credentials},
        signer::SignerPolicy,
        store::{CaDir, CaLifetimes},
    },
    identity::{manager::CertsView, spiffe::TrustDomain},
};

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a CA: a root (whose key can then be moved offline) and an
    /// intermediate that signs workload certificates. Never overwrites an
    /// existing CA without --force.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: TrustDomain,
        #[arg(long)]
        force: bool,
        #[arg(long, value_parser = duration, default_value = "10y")]
        root_lifetime: Duration,
        #[arg(long, value_parser = duration, default_value = "1y")]
        intermediate_lifetime: Duration,
        /// Also write the signing material (intermediate, its key, the roots;
        /// never the root key) as the Secret `ztunnel-ca` for
        /// `ca serve --kubernetes`, to this file (mode 0600).
        #[arg(long)]
        kubernetes_secret: Option<PathBuf>,
    },
    /// Take over an operator's own CA: a directory in Istio's `cacerts`
    /// layout (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem) is
    /// checked and made a CA directory (and, with --kubernetes-secret, the
    /// Secret `ca serve --kubernetes` mounts).
    Import {
        /// The `cacerts` directory.
        #[arg(long)]
        from: PathBuf,
        /// The CA directory to create.
        #[arg(long)]
        dir: PathBuf,
        /// When `from` has no `trust-domain` file (default cluster.local).
        #[arg(long)]
        trust_domain: Option<TrustDomain>,
        #[arg(long)]
        force: bool,
        #[arg(long)]
        kubernetes_secret: Option<PathBuf>,
    },
    /// Write a CA directory's active signing material (never the root key)
    /// as the Secret `ca serve --kubernetes` mounts: after `ca init` without
    /// --kubernetes-secret, and after each `ca rotate` step.
    Export {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        kubernetes_secret: PathBuf,
    },
    /// The signing service. Without --kubernetes: node tunnels send CSRs over
    /// mutual TLS with their node credentials and a node gets certificates
    /// only for workloads placed on it (per --registry). With --kubernetes:
    /// node tunnels send their projected ServiceAccount token, checked with
    /// TokenReview, and a node gets certificates only for service accounts
    /// with a pod on it now.
    Serve {
        #[arg(long, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
        dir: Option<PathBuf>,
        /// YAML listing the mesh's workloads with their `node`.
        #[arg(long, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
        registry: Option<PathBuf>,
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        #[command(flatten)]
        kubernetes: KubernetesServeArgs,
        /// Workload certificates never live longer than this.
        #[arg(long, value_parser = duration, default_value = "24h")]
        max_lifetime: Duration,
        #[arg(long, value_parser = duration, default_value = "7d")]
        node_credential_lifetime: Duration,
        #[arg(long, value_parser = duration, default_value = "60s")]
        clock_skew: Duration,
    },
    /// Issue a node's credential for reaching the signing service (key 0600,
    /// chain and trust bundle) into --out.
    NodeCredential {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_parser = duration, default_value = "7d")]
        lifetime: Duration,
    },
    /// Root rotation, one step at a time (see docs/runbook.md).
    Rotate {
        #[command(subcommand)]
        step: RotateStep,
    },
    /// The CA's generations, the active one and the trusted roots.
    Status {
        #[arg(long)]
        dir: PathBuf,
    },
}

/// `ca serve --kubernetes` and its settings.
#[derive(clap::Args, Clone, Debug)]
pub struct KubernetesServeArgs {
    /// Authorize nodes by ServiceAccount token and the pods on their node.
    #[arg(long)]
    pub kubernetes: bool,
    /// The mounted Secret, in Istio's `cacerts` layout.
    #[arg(long, requires = "kubernetes", required_if_eq("kubernetes", "true"))]
    pub plugin_ca_dir: Option<PathBuf>,
    /// The audience node tokens must carry.
    #[arg(long, requires = "kubernetes", default_value = "ztunnel-ca")]
    pub audience: String,
    /// Where the trust bundle ConfigMap is published [default: $POD_NAMESPACE, else ztunnel-system].
    #[arg(long, requires = "kubernetes")]
    pub namespace: Option<String>,
    /// The node tunnels' namespace [default: --namespace].
    #[arg(long, requires = "kubernetes")]
    pub tunnel_namespace: Option<String>,
    /// The node tunnels' ServiceAccount.
    #[arg(long, requires = "kubernetes", default_value = "ztunnel")]
    pub tunnel_service_account: String,
    /// When the Secret has no `trust-domain` file [default: cluster.local].
    #[arg(long, requires = "kubernetes")]
    pub trust_domain: Option<TrustDomain>,
    /// Default: in-cluster, else $KUBECONFIG or ~/.kube/config.
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Subcommand, Clone)]
pub enum RotateStep {
    /// Step 1: make a new root (and intermediate) and add the root to the
    /// trust bundle. Wait until every node reports it (`ztunnel certs`).
    Begin(CaDirArg),
    /// Step 2: sign with the new intermediate. Nodes re-issue under the new
    /// root within seconds; wait until every certificate shows it.
    Activate(CaDirArg),
    /// Step 3: drop the old root from the trust bundle.
    Finish(CaDirArg),
}

#[derive(clap::Args, Clone)]
pub struct CaDirArg {
    #[arg(long)]
    pub dir: PathBuf,
}

pub fn ca(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init {
            dir,
            trust_domain,
            force,
            root_lifetime,
            intermediate_lifetime,
            kubernetes_secret,
        } => {
            let lifetimes = CaLifetimes { root: root_lifetime, intermediate: intermediate_lifetime };
            let ca = CaDir::new(&dir);
            ca.init(&trust_domain, force, lifetimes)?;
            println!("CA for trust domain {trust_domain} created in {}", dir.display());
            println!("  gen-1/root-key.pem is only needed to make intermediates: move it offline");
            if let Some(file) = kubernetes_secret {
                Cacerts::from_ca_dir(&ca)?.write_secret(&file)?;
                print_secret_written(&file);
            }
            Ok(())
        }
        CaCommand::Import { from, dir, trust_domain, force, kubernetes_secret } => {
            let material = Cacerts::read(&from, trust_domain.as_ref())?;
            let state = material.import_into(&CaDir::new(&dir), force)?;
            println!(
                "CA for trust domain {} imported from {} into {} (signing root {}, {} trusted root(s))",
                state.trust_domain,
                from.display(),
                dir.display(),
                state.signing_root,
                state.bundle.roots().len()
            );
            if let Some(file) = kubernetes_secret {
                material.write_secret(&file)?;
                print_secret_written(&file);
            }
            Ok(())
        }
        CaCommand::Export { dir, kubernetes_secret } => {
            Cacerts::from_ca_dir(&CaDir::new(&dir))?.write_secret(&kubernetes_secret)?;
            print_secret_written(&kubernetes_secret);
            Ok(())
        }
        CaCommand::Serve {
            dir,
            registry,
            listen,
            kubernetes,
            max_lifetime,
            node_credential_lifetime,
            clock_skew,
        } => {
            let policy = SignerPolicy {
                max_lifetime,
                node_lifetime: node_credential_lifetime,
                ..SignerPolicy::default()
            };
            if kubernetes.kubernetes {
                let settings = kubernetes_settings(kubernetes, listen, policy)?;
                return run_until_signal(async move |shutdown| {
                    crate::ca::kubernetes::serve(settings, shutdown).await.map_err(anyhow::Error::from)
                });
            }
            let (Some(dir), Some(registry)) = (dir, registry) else {
                anyhow::bail!("ca serve needs --dir and --registry (or --kubernetes)");
            };
            let settings = ServeSettings { dir, listen, registry, policy, clock_skew };
            run_until_signal(async move |shutdown| crate::ca::server::serve(settings, shutdown).await)
        }
        CaCommand::NodeCredential { dir, node, out, lifetime } => {
            write_node_credentials(&dir, &node, &out, lifetime)?;
            println!("node credential for {node} written to {}", out.display());
            Ok(())
        }
        CaCommand::Rotate { step } => {
            let (RotateStep::Begin(d) | RotateStep::Activate(d) | RotateStep::Finish(d)) = &step;
            let ca = CaDir::new(&d.dir);
            match step {
                RotateStep::Begin(_) => {
                    let g = ca.rotate_begin(CaLifetimes::default())?;
                    println!(
                        "generation {g} created; its root is now in the trust bundle (still signing with {})",
                        ca.active()?
                    );
                    println!(
                        "next: wait until every node's `ztunnel certs` lists {} roots, then `rotate activate`",
                        ca.bundle()?.roots().len()
                    );
                }
                RotateStep::Activate(_) => {
                    let g = ca.rotate_activate()?;
                    println!(
                        "generation {g} signs now; nodes re-issue their certificates under it within seconds"
                    );
                    println!(
                        "next: wait until every certificate in `ztunnel certs` shows the new root, then `rotate finish`"
                    );
                }
                RotateStep::Finish(_) => {
                    let removed = ca.rotate_finish()?;
                    println!(
                        "{removed} old root(s) removed from the trust bundle; generation {} is the only root",
                        ca.active()?
                    );
                }
            }
            Ok(())
        }
        CaCommand::Status { dir } => {
            let ca = CaDir::new(&dir);
            let state = ca.load()?;
            println!("trust domain: {}", state.trust_domain);
            println!("active generation: {} (root {})", state.generation, state.signing_root);
            println!("trusted roots: {}", state.bundle.fingerprints().join(", "));
            Ok(())
        }
    }
}

fn print_secret_written(file: &std::path::Path) {
    println!("Secret ztunnel-ca written to {} (mode 0600; it holds the signing key):", file.display());
    println!("  kubectl apply -f {0} && rm {0}", file.display());
}

fn kubernetes_settings(
    args: KubernetesServeArgs,
    listen: SocketAddr,
    policy: SignerPolicy,
) -> anyhow::Result<crate::ca::kubernetes::KubernetesSettings> {
    let plugin_ca_dir = args.plugin_ca_dir.context("--kubernetes needs --plugin-ca-dir")?;
    let namespace = args
        .namespace
        .or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "ztunnel-system".to_owned());
    Ok(crate::ca::kubernetes::KubernetesSettings {
        plugin_ca_dir,
        trust_domain: args.trust_domain,
        listen,
        audience: args.audience,
        tunnel: crate::ca::kubernetes::caller::TunnelAccount {
            namespace: args.tunnel_namespace.unwrap_or_else(|| namespace.clone()),
            service_account: args.tunnel_service_account,
        },
        namespace,
        kubeconfig: args.kubeconfig,
        policy,
    })
}

/// Runs `service` on a new runtime until SIGINT or SIGTERM.
fn run_until_signal<F>(service: impl FnOnce(CancellationToken) -> F) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            stop.cancel();
        });
        service(shutdown).await
    })
}

/// `ztunnel certs`: what a running tunnel holds.
pub fn certs(admin: SocketAddr, json: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (status, body) = runtime
        .block_on(crate::http::get(admin, "/certs"))
        .with_context(|| format!("asking the tunnel's admin endpoint {admin}"))?;
    anyhow::ensure!(
        status.is_success(),
        "{admin}/certs answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let view: CertsView = serde_json::from_slice(&body).context("the admin endpoint's answer")?;
    println!("trust bundle: {}", view.trust_bundle.join(", "));
    println!("signing root: {}", view.signing_root);
    for c in view.identities {
        println!();
        println!("{} ({}, {})", c.identity, c.kind, c.state);
        println!("  serial        {}", c.serial.as_deref().unwrap_or("-"));
        match (&c.not_after, c.expires_in_seconds) {
            (Some(t), Some(s)) => println!("  not after     {t} (in {})", human_seconds(s)),
            _ => println!("  not after     -"),
        }
        println!("  next request  in {}", human_seconds(c.next_request_in_seconds));
        println!("  root          {}", c.root.as_deref().unwrap_or("-"));
        println!("  last renewal  {}", c.last_renewal.as_deref().unwrap_or("-"));
        match &c.last_error {
            Some(e) => println!("  last error    {e} ({} in a row)", c.consecutive_failures),
            None => println!("  last error    -"),
        }
        println!("  issued        {} (failed requests: {})", c.issued, c.failed);
    }
    Ok(())
}

fn human_seconds(s: i64) -> String {
    let sign = if s < 0 { "-" } else { "" };
    let s = s.unsigned_abs();
    match s {
        0..60 => format!("{sign}{s}s"),
        60..3600 => format!("{sign}{}m{}s", s / 60, s % 60),
        _ => format!("{sign}{}h{}m", s / 3600, (s % 3600) / 60),
    }
}
