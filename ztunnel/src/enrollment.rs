//! Enrollment: makes the node's capture match its configuration, at start and
//! on every reload, without a restart and without touching workloads that did
//! not change.
//!
//! For each local workload: resolve its cgroup, open its namespace, open its
//! in-pod listeners (:15001 outbound, :15006 inbound plaintext), register the
//! inbound listener for its addresses, attach inbound steering to its
//! namespace, and only then mark it ready. A workload whose cgroup is known but
//! that cannot be served is enrolled *not ready*: its connections are refused,
//! never let out in the clear. Failures are retried on the next reload tick.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
};

use serde::Serialize;
use tokio::sync::watch;
use ztunnel_ebpf_common::{
    INBOUND_HBONE_PORT as HBONE_PORT, INBOUND_PLAINTEXT_PORT, MAX_CGROUP_DEPTH, OUTBOUND_PORT,
};

use crate::{
    capture::{Capture, DesiredMaps, WorkloadCapture, addr_key},
    cgroup::Cgroup,
    config::{Config, WorkloadConfig},
    handover::HandedListeners,
    identity::spiffe::SpiffeId,
    netns::{Netns, NetnsRef},
    proxy::{self, ProxyContext, outbound::ListenerScope},
    state::State,
    workload::{LocalWorkload, Registry, Workload},
};

/// What an operator sees of one local workload (admin `/config_dump`).
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadStatus {
    pub workload: String,
    pub identity: String,
    /// `enrolled`, `not_ready` (captured, connections refused) or `failed`
    /// (not captured: its cgroup is unknown).
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_id: Option<u32>,
    pub cgroup: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

struct Enrolled {
    local: Arc<LocalWorkload>,
    capture: WorkloadCapture,
    error: Option<String>,
    listeners: PodListeners,
}

impl Enrolled {
    /// Whether the workload's cgroup directory is no longer the one enrolled:
    /// removed, or removed and made again (a systemd unit's restart), which
    /// gives it a new id the programs do not know.
    fn cgroup_replaced(&self) -> bool {
        self.local.cgroup.id().ok() != Some(self.local.cgroup_id)
    }
}

/// A pod's in-pod listeners. Dropping this closes them.
#[derive(Default)]
struct PodListeners {
    /// Accept loops; each owns its listening socket.
    tasks: Vec<AbortOnDrop>,
    /// Duplicates of the :15006 sockets (IPv4, IPv6), kept so that steering
    /// can be pointed at them again when the pod's addresses change.
    inbound_v4: Option<OwnedFd>,
    inbound_v6: Option<OwnedFd>,
    /// Every listening socket, duplicated: what a successor is handed.
    sockets: Vec<OwnedFd>,
}

impl PodListeners {
    fn is_open(&self) -> bool {
        !self.tasks.is_empty()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct Enrollment {
    capture: Capture,
    cgroup_mount: PathBuf,
    tunnel_cgroup: Cgroup,
    node_netns: Netns,
    ctx: Arc<ProxyContext>,
    state_tx: watch::Sender<Arc<State>>,
    runtime: tokio::runtime::Handle,
    /// Workload ids an earlier tunnel gave (by cgroup id), kept so that
    /// connections captured across a restart stay attributable.
    earlier_ids: HashMap<u64, u32>,
    next_id: u32,
    enrolled: BTreeMap<String, Enrolled>,
    failed: BTreeMap<String, WorkloadStatus>,
    generation: u64,
    /// The configuration last published, to publish again only on change.
    published: Option<Arc<Config>>,
    /// Identities whose certificates are held for enrolled workloads.
    certificates: HashMap<String, SpiffeId>,
    /// The capture maps could not be brought in line with the configuration
    /// (a kernel error): retried on every tick until it succeeds.
    sync_error: Option<String>,
    /// The cgroup the programs are attached to: every workload is below it.
    cgroup_root: Cgroup,
    /// Listening sockets a predecessor handed over, used instead of binding
    /// until the first enrollment is done.
    handed: HandedListeners,
}

impl Enrollment {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        capture: Capture,
        cgroup_mount: PathBuf,
        cgroup_root: Cgroup,
        tunnel_cgroup: Cgroup,
        node_netns: Netns,
        ctx: Arc<ProxyContext>,
        state_tx: watch::Sender<Arc<State>>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let earlier_ids = capture.enrolled_ids();
        let next_id = earlier_ids.values().copied().max().unwrap_or(0) + 1;
        Self {
            capture,
            cgroup_mount,
            tunnel_cgroup,
            node_netns,
            ctx,
            state_tx,
            runtime,
            earlier_ids,
            next_id,
            enrolled: BTreeMap::new(),
            failed: BTreeMap::new(),
            generation: 0,
            published: None,
            certificates: HashMap::new(),
            sync_error: None,
            cgroup_root,
            handed: HandedListeners::default(),
        }
    }

    /// Pods' listeners are taken from `handed` (a predecessor's) where they
    /// exist instead of bound.
    pub fn use_handed(&mut self, handed: HandedListeners) {
        self.handed = handed;
    }

    /// Closes the handed-over listeners no workload took (pods the
    /// predecessor served that are gone); returns how many.
    pub fn release_handed(&mut self) -> usize {
        std::mem::take(&mut self.handed).len()
    }

    /// Makes the next `apply` write the capture maps in full (a would-be
    /// successor may have written them).
    pub fn force_sync(&mut self) {
        self.published = None;
    }

    /// Closes the copies of the pods' listening sockets kept for a successor
    /// (the sockets close with their accept loops then).
    pub fn drop_listener_copies(&mut self) {
        for e in self.enrolled.values_mut() {
            e.listeners.sockets.clear();
        }
    }

    /// See [`Capture::reclaim_links`].
    pub fn reclaim_capture_links(&self) {
        self.capture.reclaim_links();
    }

    /// See [`Capture::retire_delivery`].
    pub fn retire_delivery(&self, successor_cgroup: u64) {
        self.capture.retire_delivery(successor_cgroup);
    }

    /// Every pod listener this tunnel serves, for a successor.
    pub fn listener_fds(&self) -> impl Iterator<Item = std::os::fd::BorrowedFd<'_>> {
        self.enrolled.values().flat_map(|e| e.listeners.sockets.iter().map(AsFd::as_fd))
    }

    /// Asks the certificate manager for the identity of every enrolled
    /// workload and lets go of the ones that left (or changed identity).
    fn hold_certificates(&mut self) {
        let desired: HashMap<String, SpiffeId> =
            self.enrolled.iter().map(|(k, e)| (k.clone(), e.local.workload.identity.clone())).collect();
        let certs = &self.ctx.certs;
        self.certificates.retain(|key, id| {
            let keep = desired.get(key) == Some(id);
            if !keep {
                certs.release(id);
            }
            keep
        });
        for (key, id) in desired {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.certificates.entry(key) {
                certs.acquire(&id);
                slot.insert(id);
            }
        }
    }

    /// Whether some workload still waits for its cgroup, namespace or
    /// listeners: the controller retries those on every tick.
    pub fn has_pending(&self) -> bool {
        !self.failed.is_empty()
            || self.sync_error.is_some()
            || self.enrolled.values().any(|e| !e.capture.ready || e.cgroup_replaced())
    }

    /// Directories where a workload's cgroup can appear again: the guard
    /// cgroups and the parent of every local workload's cgroup.
    pub fn watched_dirs(&self, config: &Config) -> Vec<PathBuf> {
        let guards =
            config.capture.guard_cgroups.iter().filter_map(|g| Cgroup::resolve(&self.cgroup_mount, g).ok());
        let parents = config
            .local_workloads()
            .filter_map(|w| w.cgroup.as_ref())
            .filter_map(|c| Cgroup::resolve(&self.cgroup_mount, c).ok())
            .filter_map(|c| c.path().parent().map(|p| p.to_owned()));
        guards.map(|g| g.path().to_owned()).chain(parents).collect()
    }

    /// Why the capture maps do not match the configuration, if they do not.
    pub fn sync_error(&self) -> Option<&str> {
        self.sync_error.as_deref()
    }

    /// Makes capture match `config`. Returns the status of every local workload.
    pub fn apply(&mut self, config: &Arc<Config>) -> Vec<WorkloadStatus> {
        let desired: BTreeMap<String, &WorkloadConfig> =
            config.local_workloads().map(|w| (w.to_string(), w)).collect();

        // Workloads that left, or moved to another namespace, go first.
        let leaving: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(key, e)| desired.get(*key).is_none_or(|w| w.netns != e.local.config.netns))
            .map(|(key, _)| key.clone())
            .collect();
        let mut changed = !leaving.is_empty();
        for key in leaving {
            if let Some(e) = self.enrolled.remove(&key) {
                self.unenroll(&e);
            }
        }
        let failed_before = self.failed.len();
        self.failed.retain(|key, _| desired.contains_key(key));
        changed |= self.failed.len() != failed_before;

        for (key, wc) in &desired {
            let unchanged = self
                .enrolled
                .get(key)
                .is_some_and(|e| e.local.config == **wc && e.capture.ready && !e.cgroup_replaced());
            if unchanged {
                continue;
            }
            let previous = self.enrolled.remove(key);
            let before = previous.as_ref().map(|p| (p.capture.ready, p.error.clone(), p.local.cgroup_id));
            match self.enroll(config, wc, previous) {
                Ok(e) => {
                    changed |= self.failed.remove(key).is_some()
                        || before != Some((e.capture.ready, e.error.clone(), e.local.cgroup_id));
                    self.enrolled.insert(key.clone(), e);
                }
                Err(status) => {
                    changed |= self.failed.get(key).is_none_or(|s| s.error != status.error);
                    self.failed.insert(key.clone(), *status);
                }
            }
        }
        self.hold_certificates();
        let new_config = self.published.as_ref().is_none_or(|p| !Arc::ptr_eq(p, config));
        if !changed && !new_config && self.sync_error.is_none() {
            return self.statuses();
        }

        let mut desired_maps = DesiredMaps::default();
        for e in self.enrolled.values() {
            desired_maps.add(&e.capture);
        }
        let mut guard_error = None;
        for g in &config.capture.guard_cgroups {
            match Cgroup::resolve(&self.cgroup_mount, g).and_then(|c| c.id()) {
                Ok(id) => desired_maps.add_guard(id),
                Err(e) => guard_error = Some(format!("capture.guard_cgroups: {e}")),
            }
        }
        match self.capture.sync(&desired_maps) {
            Ok(()) if guard_error.is_some() => {
                tracing::error!("{}", guard_error.as_deref().unwrap_or_default());
                self.sync_error = guard_error;
            }
            Ok(()) => {
                if self.sync_error.take().is_some() {
                    tracing::info!("capture maps match the configuration again");
                }
            }
            Err(e) => {
                tracing::error!("updating capture maps (retried every tick): {e}");
                self.sync_error = Some(e.to_string());
            }
        }
        let keep: Vec<(String, String)> = self
            .enrolled
            .values()
            .filter(|e| e.local.is_pod())
            .map(|e| (e.local.workload.namespace.clone(), e.local.workload.name.clone()))
            .collect();
        if let Err(e) = self.capture.detach_stale_netns(&keep) {
            tracing::error!("detaching steering from departed pods: {e}");
        }
        self.publish(config);
        self.statuses()
    }

    fn publish(&mut self, config: &Arc<Config>) {
        self.generation += 1;
        self.published = Some(config.clone());
        let local: HashMap<u32, Arc<LocalWorkload>> =
            self.enrolled.values().map(|e| (e.local.id, e.local.clone())).collect();
        let by_key: HashMap<String, Arc<Workload>> =
            local.values().map(|l| (l.workload.key(), l.workload.clone())).collect();
        let registry = Registry::new(config.workloads.iter().filter_map(|w| {
            let key = w.to_string();
            by_key.get(&key).cloned().or_else(|| Workload::from_config(config, w).ok().map(Arc::new))
        }))
        .with_services(&config.services);
        self.ctx.budgets.retain(|id| local.contains_key(&id));
        let node_addresses = if config.authorization.node_probes == Some(true) {
            self.node_addresses()
        } else {
            Default::default()
        };
        let _ = self.state_tx.send(Arc::new(State {
            generation: self.generation,
            config: config.clone(),
            registry,
            local,
            node_addresses,
        }));
    }

    /// The addresses of the node's interfaces (the kubelet probes from one
    /// of them), read now: interfaces come and go with pods.
    fn node_addresses(&self) -> std::collections::HashSet<std::net::IpAddr> {
        let read = self.node_netns.run(|| {
            let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
            Ok(addrs
                .filter_map(|a| {
                    let a = a.address?;
                    let ip = a
                        .as_sockaddr_in()
                        .map(|v4| std::net::IpAddr::V4(v4.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))?;
                    Some(crate::workload::canonical(ip))
                })
                .collect())
        });
        read.unwrap_or_else(|e| {
            tracing::warn!("reading the node's addresses (for node probes): {e}");
            Default::default()
        })
    }

    pub fn statuses(&self) -> Vec<WorkloadStatus> {
        let mut out: Vec<WorkloadStatus> = self
            .enrolled
            .values()
            .map(|e| WorkloadStatus {
                workload: e.local.workload.key(),
                identity: e.local.workload.identity.to_string(),
                state: if e.capture.ready { "enrolled" } else { "not_ready" },
                error: e.error.clone(),
                workload_id: Some(e.local.id),
                cgroup: e.local.cgroup.to_string(),
                cgroup_id: Some(e.local.cgroup_id),
                netns: e.local.config.netns.as_ref().map(NetnsRef::display),
            })
            .collect();
        out.extend(self.failed.values().cloned());
        out.sort_by(|a, b| a.workload.cmp(&b.workload));
        out
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn unenroll(&mut self, e: &Enrolled) {
        if e.local.is_pod()
            && let Err(err) = self.capture.detach_netns(&e.local.workload.namespace, &e.local.workload.name)
        {
            tracing::error!(workload = %e.local.workload.key(), "detaching inbound steering: {err}");
        }
        tracing::info!(workload = %e.local.workload.key(), "workload removed from capture");
    }

    /// Enrolls one workload. `previous` is its earlier enrollment in the same
    /// namespace, whose id and listeners are kept.
    fn enroll(
        &mut self,
        config: &Config,
        wc: &WorkloadConfig,
        previous: Option<Enrolled>,
    ) -> Result<Enrolled, Box<WorkloadStatus>> {
        let key = wc.to_string();
        let failed = |error: String| {
            tracing::warn!(workload = %key, "cannot enroll: {error}");
            Box::new(WorkloadStatus {
                workload: key.clone(),
                identity: wc.spiffe_id(&config.trust_domain).map(|i| i.to_string()).unwrap_or_default(),
                state: "failed",
                error: Some(error),
                workload_id: None,
                cgroup: wc.cgroup.as_ref().map(|c| c.display().to_string()).unwrap_or_default(),
                cgroup_id: None,
                netns: wc.netns.as_ref().map(NetnsRef::display),
            })
        };
        let workload = Workload::from_config(config, wc).map_err(|e| failed(e.to_string()))?;
        let Some(cgroup_path) = &wc.cgroup else {
            return Err(failed("no cgroup configured".into()));
        };
        let cgroup = Cgroup::resolve(&self.cgroup_mount, cgroup_path).map_err(|e| failed(e.to_string()))?;
        if !cgroup.exists() {
            return Err(failed(format!("cgroup {cgroup} does not exist (yet)")));
        }
        if !self.cgroup_root.contains(&cgroup) {
            return Err(failed(format!(
                "cgroup {cgroup} is outside capture.cgroup_root {}: its connections could not be captured",
                self.cgroup_root
            )));
        }
        let cgroup_id = cgroup.id().map_err(|e| failed(e.to_string()))?;
        let depth = cgroup.depth(&self.cgroup_mount);
        if depth > MAX_CGROUP_DEPTH as usize {
            return Err(failed(format!(
                "cgroup {cgroup} is {depth} levels deep; capture finds workloads at most {MAX_CGROUP_DEPTH} levels below the cgroup root"
            )));
        }
        if cgroup.contains(&self.tunnel_cgroup) {
            return Err(failed(format!(
                "cgroup {cgroup} contains the tunnel's own cgroup {}: the tunnel never captures itself",
                self.tunnel_cgroup
            )));
        }
        let id = match &previous {
            Some(p) => p.local.id,
            None => self.earlier_ids.remove(&cgroup_id).unwrap_or_else(|| {
                let id = self.next_id;
                self.next_id += 1;
                id
            }),
        };
        let is_pod = wc.netns.is_some();
        let mut capture = WorkloadCapture {
            workload_id: id,
            cgroup_id,
            ready: false,
            host: !is_pod,
            max_sockets: config.sockets_per_workload(),
            exclude_outbound_ports: wc.capture.exclude_outbound_ports.clone(),
            exclude_outbound_cidrs: wc.capture.exclude_outbound_cidrs.clone(),
            exclude_inbound_ports: wc.capture.exclude_inbound_ports.clone(),
            // The workload's own addresses never leave it: like loopback, they
            // are not captured.
            own_addresses: workload.addresses.clone(),
            inbound_addresses: if is_pod { workload.addresses.clone() } else { Vec::new() },
        };

        let netns = match (&wc.netns, &previous) {
            (Some(_), Some(p)) => Ok(p.local.netns.clone()),
            (Some(netns), None) => Netns::open_ref(netns).map_err(|e| e.to_string()),
            (None, _) => Ok(self.node_netns.clone()),
        };
        let local = |netns: Netns| {
            Arc::new(LocalWorkload {
                id,
                workload: Arc::new(workload.clone()),
                cgroup: cgroup.clone(),
                cgroup_id,
                netns,
                config: wc.clone(),
            })
        };
        let netns = match netns {
            Ok(n) => n,
            Err(error) => {
                // Known cgroup, no way to serve it: enrolled, not ready.
                tracing::warn!(workload = %key, "enrolled but not ready: {error}");
                return Ok(Enrolled {
                    local: local(Netns::current()),
                    capture,
                    error: Some(error),
                    listeners: PodListeners::default(),
                });
            }
        };
        let local = local(netns);
        let mut error = None;
        let listeners = match previous {
            Some(p) if p.listeners.is_open() => p.listeners,
            _ if is_pod => self.open_pod_listeners(&local).unwrap_or_else(|e| {
                error = Some(e);
                PodListeners::default()
            }),
            _ => PodListeners::default(),
        };
        if is_pod
            && error.is_none()
            && let Err(e) = self.register_inbound(&local, &listeners)
        {
            error = Some(e);
        }
        capture.ready = error.is_none();
        match &error {
            None => tracing::info!(
                workload = %key,
                workload_id = id,
                cgroup = %local.cgroup,
                cgroup_id,
                netns = %local.netns.display(),
                "workload enrolled"
            ),
            Some(e) => tracing::warn!(workload = %key, "enrolled but not ready: {e}"),
        }
        Ok(Enrolled { local, capture, error, listeners })
    }

    /// Opens :15001 and :15006 (IPv4, and IPv6 when the pod has an IPv6
    /// address) on the pod's loopback.
    fn open_pod_listeners(&mut self, local: &Arc<LocalWorkload>) -> Result<PodListeners, String> {
        let _rt = self.runtime.enter();
        let mut out = PodListeners::default();
        let has_v6 = local.workload.addresses.iter().any(IpAddr::is_ipv6);
        let mut loopbacks: Vec<IpAddr> = vec![Ipv4Addr::LOCALHOST.into()];
        if has_v6 {
            loopbacks.push(Ipv6Addr::LOCALHOST.into());
        }
        for ip in loopbacks {
            let listener = self.listen(local, SocketAddr::new(ip, OUTBOUND_PORT), &mut out)?;
            let ctx = self.ctx.clone();
            let scope = ListenerScope::Pod(local.id);
            out.tasks.push(AbortOnDrop(self.runtime.spawn(proxy::accept_loop_for_pod(
                local.id,
                listener,
                ctx.clone(),
                move |s, p| proxy::outbound::handle(s, p, scope, ctx.clone()),
            ))));
            let listener = self.listen(local, SocketAddr::new(ip, INBOUND_PLAINTEXT_PORT), &mut out)?;
            let dup = listener
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("duplicating the :{INBOUND_PLAINTEXT_PORT} listener: {e}"))?;
            if ip.is_ipv4() {
                out.inbound_v4 = Some(dup);
            } else {
                out.inbound_v6 = Some(dup);
            }
            let ctx = self.ctx.clone();
            let id = local.id;
            out.tasks.push(AbortOnDrop(self.runtime.spawn(proxy::accept_loop_for_pod(
                local.id,
                listener,
                ctx.clone(),
                move |s, p| proxy::inbound::handle_plaintext(s, p, id, ctx.clone()),
            ))));
            // HBONE on every address of the pod (callers dial <pod ip>:15008).
            let any: IpAddr =
                if ip.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
            let listener = self.listen(local, SocketAddr::new(any, HBONE_PORT), &mut out)?;
            let ctx = self.ctx.clone();
            out.tasks.push(AbortOnDrop(self.runtime.spawn(proxy::accept_loop_for_pod(
                local.id,
                listener,
                ctx.clone(),
                move |s, p| proxy::hbone::server::serve_connection(s, p, scope, ctx.clone()),
            ))));
        }
        // Replies to callers' addresses come back to the tunnel (see delivery).
        self.runtime.block_on(proxy::delivery::prepare(&local.netns)).map_err(|e| e.to_string())?;
        Ok(out)
    }

    /// The pod's listener at `addr`: the predecessor's if it handed one
    /// over, else a new one.
    fn listen(
        &mut self,
        local: &LocalWorkload,
        addr: SocketAddr,
        out: &mut PodListeners,
    ) -> Result<tokio::net::TcpListener, String> {
        self.handed.take_or_bind(&local.netns, addr, &mut out.sockets).map_err(|e| e.to_string())
    }

    /// Points inbound steering for the pod's addresses at its :15006
    /// listeners and attaches steering to its namespace.
    fn register_inbound(&mut self, local: &LocalWorkload, listeners: &PodListeners) -> Result<(), String> {
        let Some(netns) = local.config.netns.clone() else {
            return Ok(());
        };
        for addr in &local.workload.addresses {
            let listener = if addr.is_ipv4() { &listeners.inbound_v4 } else { &listeners.inbound_v6 };
            let Some(listener) = listener else {
                return Err(format!("no :{INBOUND_PLAINTEXT_PORT} listener for {addr}'s family"));
            };
            self.capture
                .set_inbound_listener(addr_key(*addr), listener)
                .map_err(|e| format!("registering the inbound listener for {addr}: {e}"))?;
        }
        self.capture
            .attach_netns(&local.workload.namespace, &local.workload.name, &netns)
            .map_err(|e| format!("attaching inbound steering: {e}"))
    }
}
