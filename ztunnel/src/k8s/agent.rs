//! `ztunnel run --kubernetes`: the node agent's source of configuration.
//! Discovery's [`ClusterState`], this node's pods as found on the node
//! ([`LocalPods`]) and the CNI plugin's handovers are turned into the same
//! [`Config`] the file mode reads; the controller applies it as it applies
//! a reloaded file.
//!
//! The CNI plugin's ADD is answered only after the controller has applied a
//! configuration with the pod in it, and only `enrolled` when the pod's
//! cgroup is captured: a mesh pod never starts without its tunnel side
//! (a refusal fails the sandbox, and the kubelet retries).

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use ztunnel_cni::protocol::{self as cni, Command as CniCommand, Outcome, Request, Response};

use super::{
    ClusterState, CniVerdict, DiscoveryConfig, K8sMetrics, LocalPods, PodCgroups, build_config,
    node::DEFAULT_KUBEPODS_ROOTS,
};
use crate::{config::Config, enrollment::WorkloadStatus, netns::HeldNetns};

/// How `ztunnel run --kubernetes` reaches the cluster and the CNI plugin.
#[derive(Debug, Clone)]
pub struct KubernetesOptions {
    /// A kubeconfig file; None: in-cluster (the pod's ServiceAccount).
    pub kubeconfig: Option<PathBuf>,
    /// This node (`spec.nodeName` of its pods).
    pub node_name: String,
    /// The tunnel's own namespace: its pods are never workloads.
    pub tunnel_namespace: String,
    /// Where the CNI plugin connects.
    pub cni_socket: PathBuf,
    /// The kubelet's pod cgroups, relative to the cgroup v2 mount (empty:
    /// the usual layouts, see [`DEFAULT_KUBEPODS_ROOTS`]).
    pub kubepods_roots: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Client(#[from] super::ClientError),
    #[error("CNI socket {path}: {source}")]
    CniSocket { path: PathBuf, source: std::io::Error },
}

/// How long a CNI ADD waits for the API server to show a pod it has not
/// shown yet, and for the pod's capture: well inside the plugin's default
/// timeout (30 s), so the plugin gets an answer that says why.
const CNI_ADD_WAIT: Duration = Duration::from_secs(20);

/// One CNI request, waiting for the controller.
pub struct CniCall {
    request: Request,
    netns: Option<OwnedFd>,
    reply: oneshot::Sender<Response>,
    since: Instant,
}

impl CniCall {
    fn key(&self) -> String {
        format!("{}/{}", self.request.pod_namespace, self.request.pod_name)
    }

    fn answer(self, response: Response) {
        if response.result == Outcome::Error {
            tracing::warn!(pod = %self.key(), command = %self.request.command, "CNI: {}", response.message);
        } else {
            tracing::info!(pod = %self.key(), command = %self.request.command, result = %response.result, "CNI");
        }
        // The plugin may have given up; nothing to do then.
        let _ = self.reply.send(response);
    }
}

/// What woke the agent.
pub enum AgentEvent {
    /// Discovery published a new state.
    Cluster,
    /// The CNI plugin asked something.
    Cni(Box<CniCall>),
    /// Discovery stopped (shutdown).
    Closed,
}

/// The cluster as this node's controller sees it.
pub struct KubernetesSource {
    base: Arc<Config>,
    node: String,
    cluster: watch::Receiver<Arc<ClusterState>>,
    local: LocalPods,
    cni: mpsc::Receiver<CniCall>,
    /// ADDs whose pod is not shown yet or not captured yet.
    waiting: Vec<CniCall>,
    /// Taking over from a running tunnel: the CNI socket listens at this
    /// staging path until [`Self::publish_cni_socket`] moves it over the
    /// running tunnel's, so that a successor that fails leaves it in place.
    cni_staged: Option<(PathBuf, PathBuf)>,
}

impl KubernetesSource {
    /// Starts discovery and the CNI socket on the current runtime.
    pub async fn start(
        options: &KubernetesOptions,
        base: Arc<Config>,
        mount: &Path,
        metrics: K8sMetrics,
        shutdown: CancellationToken,
        taking_over: bool,
    ) -> Result<Self, AgentError> {
        let client = super::client(options.kubeconfig.as_deref()).await?;
        let mut discovery = DiscoveryConfig::new(options.node_name.clone());
        discovery.tunnel_namespace = options.tunnel_namespace.clone();
        let cluster = super::spawn_discovery(client, discovery, metrics.clone(), shutdown.clone());
        let cgroups = if options.kubepods_roots.is_empty() {
            PodCgroups::new(mount, DEFAULT_KUBEPODS_ROOTS)
        } else {
            PodCgroups::new(mount, options.kubepods_roots.clone())
        };
        let staging = taking_over.then(|| {
            let mut name = options.cni_socket.clone().into_os_string();
            name.push(".next");
            PathBuf::from(name)
        });
        let cni =
            listen_cni(staging.as_deref().unwrap_or(&options.cni_socket), &options.cni_socket, shutdown)?;
        Ok(Self {
            base,
            node: options.node_name.clone(),
            cluster,
            local: LocalPods::new(cgroups, metrics),
            cni,
            waiting: Vec::new(),
            cni_staged: staging.map(|s| (s, options.cni_socket.clone())),
        })
    }

    /// After taking over: the CNI plugin reaches this tunnel from now on.
    pub fn publish_cni_socket(&mut self) {
        if let Some((staging, path)) = self.cni_staged.take()
            && let Err(e) = std::fs::rename(&staging, &path)
        {
            tracing::error!(
                "moving the CNI socket {} to {}: {e} (CNI ADDs will fail until the tunnel restarts)",
                staging.display(),
                path.display()
            );
        }
    }

    /// Every watcher has listed once: until then the configuration holds
    /// only the file's workloads, and the tunnel is not ready.
    pub fn synced(&self) -> bool {
        self.cluster.borrow().synced
    }

    pub fn set_base(&mut self, base: Arc<Config>) {
        self.base = base;
    }

    /// Waits for the next thing to act on.
    pub async fn next(&mut self) -> AgentEvent {
        tokio::select! {
            changed = self.cluster.changed() => match changed {
                Ok(()) => AgentEvent::Cluster,
                Err(_) => AgentEvent::Closed,
            },
            call = self.cni.recv() => match call {
                Some(call) => AgentEvent::Cni(Box::new(call)),
                None => AgentEvent::Closed,
            },
        }
    }

    /// The configuration to apply now: the file's node settings and the
    /// cluster's workloads, modes, policies and Services. Local pods are
    /// looked for first (cheap when none is missing).
    pub fn config(&mut self) -> Config {
        let cluster = self.cluster.borrow_and_update().clone();
        self.local.resolve(&cluster, &self.node);
        build_config(&self.base, &cluster, &self.local, &self.node)
    }

    /// Whether a tick should rebuild: a local pod still lacks its cgroup or
    /// namespace, or a CNI ADD waits.
    pub fn has_pending(&self) -> bool {
        self.local.unresolved() > 0 || !self.waiting.is_empty()
    }

    /// Takes a CNI request. DEL and CHECK are answered at once; an ADD of a
    /// mesh pod waits for [`Self::answer_waiting`] after the next apply.
    pub fn take_cni(&mut self, call: Box<CniCall>) {
        let mut call = *call;
        let r = &call.request;
        match r.command {
            CniCommand::Del => {
                self.local.remove(&r.pod_uid);
                call.answer(Response::new(Outcome::Removed, ""));
            }
            CniCommand::Check => {
                let cluster = self.cluster.borrow().clone();
                let response = match cluster.cni_verdict(&r.pod_namespace, &r.pod_uid) {
                    CniVerdict::NotInMesh => Response::new(Outcome::Ok, "not in the mesh"),
                    _ if self.local.get(&r.pod_uid).is_some_and(|p| p.is_resolved()) => {
                        Response::new(Outcome::Ok, "")
                    }
                    _ => Response::error("the pod is in the mesh but not enrolled on this node"),
                };
                call.answer(response);
            }
            CniCommand::Add => {
                let Some(fd) = call.netns.take() else {
                    call.answer(Response::error("ADD without the pod's network namespace"));
                    return;
                };
                let name =
                    if r.netns_path.is_empty() { format!("pod {}", r.pod_uid) } else { r.netns_path.clone() };
                self.local.insert_from_cni(&r.pod_uid, HeldNetns::new(fd, name), r.ips.clone());
                self.waiting.push(call);
            }
        }
    }

    /// Answers the waiting ADDs after an apply whose outcome is `statuses`:
    /// `enrolled` once the pod's cgroup is captured; an error once it is
    /// clear it will not be (not in the mesh) or the wait is over.
    pub fn answer_waiting(&mut self, statuses: &[WorkloadStatus]) {
        let cluster = self.cluster.borrow().clone();
        for call in std::mem::take(&mut self.waiting) {
            let r = &call.request;
            let key = call.key();
            let status = statuses.iter().find(|s| s.workload == key);
            let captured = status.is_some_and(|s| s.state == "enrolled" || s.state == "not_ready");
            match cluster.cni_verdict(&r.pod_namespace, &r.pod_uid) {
                _ if captured => {
                    let state = status.map_or("", |s| s.state);
                    call.answer(Response::new(Outcome::Enrolled, state));
                }
                CniVerdict::NotInMesh if cluster.synced => {
                    self.local.remove(&r.pod_uid);
                    call.answer(Response::error(format!(
                        "{key} is not in the mesh as this node's tunnel sees it (namespace not opted in, or the pod opted out)"
                    )));
                }
                _ if call.since.elapsed() >= CNI_ADD_WAIT => {
                    let why = match status {
                        Some(s) => s.error.clone().unwrap_or_else(|| s.state.to_owned()),
                        None if !cluster.synced => "the tunnel has not listed the cluster yet".to_owned(),
                        None => "the API server has not shown the pod to this node's tunnel".to_owned(),
                    };
                    self.local.remove(&r.pod_uid);
                    call.answer(Response::error(format!(
                        "{key} not enrolled after {}s: {why}",
                        CNI_ADD_WAIT.as_secs()
                    )));
                }
                _ => self.waiting.push(call),
            }
        }
    }
}

/// Listens on the CNI socket (mode 0600: only root, the runtime's plugin,
/// may enroll) and hands each request to the controller.
fn listen_cni(
    path: &Path,
    published: &Path,
    shutdown: CancellationToken,
) -> Result<mpsc::Receiver<CniCall>, AgentError> {
    // A socket left by the previous tunnel (nothing listens on it any more)
    // is replaced.
    let (listener, file) = crate::unix_socket::bind(path)
        .map_err(|source| AgentError::CniSocket { path: path.to_owned(), source })?;
    let (tx, rx) = mpsc::channel(64);
    let path = path.to_owned();
    let published = published.to_owned();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("CNI socket {}: accept: {e}", path.display());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let served = cni::server::serve_connection(
                    stream,
                    cni::DEFAULT_MAX_REQUEST_LEN,
                    cni::DEFAULT_REQUEST_TIMEOUT,
                    |request, netns| async move {
                        if request.version != cni::PROTOCOL_VERSION {
                            return Response::error(format!(
                                "protocol version {} (this tunnel speaks {})",
                                request.version,
                                cni::PROTOCOL_VERSION
                            ));
                        }
                        let (reply, answer) = oneshot::channel();
                        let call = CniCall { request, netns, reply, since: Instant::now() };
                        if tx.send(call).await.is_err() {
                            return Response::error("the tunnel is shutting down");
                        }
                        answer.await.unwrap_or_else(|_| Response::error("the tunnel is shutting down"))
                    },
                )
                .await;
                if let Err(e) = served {
                    tracing::warn!("CNI request: {e}");
                }
            });
        }
        // Where it was bound (staged) or moved to (published).
        file.remove();
        file.remove_at(&published);
    });
    Ok(rx)
}
