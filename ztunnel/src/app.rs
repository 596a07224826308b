//! `ztunnel run`: wires configuration, capture, enrollment, the proxies and
//! the node endpoints together, reloads configuration, and shuts down
//! gracefully.
//!
//! Order matters: the tunnel moves into its own cgroup before it opens any
//! socket (sockets keep the cgroup they were created in, and the tunnel's
//! must never be captured), and everything that can be checked is checked
//! before capture is touched, so a bad start leaves the node as it was.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{signal::unix::SignalKind, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use ztunnel_ebpf_common::OUTBOUND_PORT;

use crate::{
    access_log::AccessLog,
    admin::{Admin, AdminToken, AdminView, LogLevelSetter},
    capture::{Capture, CaptureSettings},
    cgroup::{Cgroup, cgroup2_mount},
    config::{Config, OnPolicyChange},
    enrollment::Enrollment,
    failures::FailureRing,
    handover::{self, HandedListeners, HandoverError, HandoverListener, Predecessor, Successor},
    http,
    identity::runtime::IdentityRuntime,
    k8s::{
        K8sMetrics,
        agent::{AgentEvent, KubernetesOptions, KubernetesSource},
    },
    limits::{ConnectionLimits, PerSource, Refusals, WorkloadBudgets},
    metrics::Metrics,
    netns::Netns,
    proxy::{
        self, ProxyContext,
        hbone::{
            HBONE_PORT,
            pool::{Pool, PoolSettings},
        },
        outbound::ListenerScope,
        traffic::Traffic,
    },
    sd_notify,
    sockopt::{self, SocketPolicy},
    state::State,
};

/// Runs the node tunnel until SIGTERM or SIGINT: from the configuration
/// file alone, or (`kubernetes`) with the cluster's workloads, Services and
/// policies added to the file's node settings.
pub fn run(
    config_path: &Path,
    set_log_level: LogLevelSetter,
    kubernetes: Option<KubernetesOptions>,
) -> anyhow::Result<()> {
    let node_name = kubernetes.as_ref().map(|k| k.node_name.as_str());
    let config = Arc::new(Config::load_as_node(config_path, node_name)?);
    let mount = cgroup2_mount()?;
    let cgroup_root = match &config.capture.cgroup_root {
        Some(p) => Cgroup::resolve(&mount, p).context("capture.cgroup_root")?,
        None => Cgroup::root(&mount),
    };
    anyhow::ensure!(
        cgroup_root.exists(),
        "capture.cgroup_root {cgroup_root} does not exist or is not a cgroup v2 directory"
    );
    let tunnel_cgroup = match &config.capture.tunnel_cgroup {
        Some(p) => {
            let c = Cgroup::resolve(&mount, p).context("capture.tunnel_cgroup")?;
            c.join().with_context(|| format!("moving the tunnel into {c}"))?;
            c
        }
        None => Cgroup::current(&mount)?,
    };
    let tunnel_cgroup_id = tunnel_cgroup.id()?;
    let (files_before, files) = sockopt::raise_nofile_limit();
    let limits = config.limits.resolve(files);
    tracing::info!(
        open_files = files,
        raised_from = files_before,
        max_connections = limits.max_connections,
        soft_connections = limits.soft_connections,
        connections_per_workload = limits.connections_per_workload,
        sockets_per_workload = config.sockets_per_workload(),
        "limits"
    );
    if limits.max_connections as u64 * 2 + 1024 > files {
        tracing::warn!(
            open_files = files,
            max_connections = limits.max_connections,
            "limits.max_connections needs two descriptors per connection: the open-file limit will be reached first"
        );
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(config.proxy.worker_threads.max(1))
        .thread_name("ztunnel")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(serve(Start {
        limits,
        config,
        config_path: config_path.to_owned(),
        mount,
        cgroup_root,
        tunnel_cgroup,
        tunnel_cgroup_id,
        set_log_level,
        kubernetes,
    }))
}

struct Start {
    limits: crate::config::ResolvedLimits,
    config: Arc<Config>,
    config_path: PathBuf,
    mount: PathBuf,
    cgroup_root: Cgroup,
    tunnel_cgroup: Cgroup,
    tunnel_cgroup_id: u64,
    set_log_level: LogLevelSetter,
    kubernetes: Option<KubernetesOptions>,
}

async fn serve(start: Start) -> anyhow::Result<()> {
    let Start {
        limits,
        config,
        config_path,
        mount,
        cgroup_root,
        tunnel_cgroup,
        tunnel_cgroup_id,
        set_log_level,
        kubernetes,
    } = start;
    let node_netns = Netns::open_or_current(config.node.netns.as_deref()).context("node.netns")?;
    // A tunnel already running on this node hands its listening sockets over
    // (upgrade without resets): they are used instead of bound.
    let handover_path = handover::socket_path(&config.node.run_dir);
    let upgrade_started = std::time::Instant::now();
    let (mut predecessor, mut handed) = match tokio::task::block_in_place(|| {
        Predecessor::connect(&handover_path, &config.node.name, tunnel_cgroup_id)
    })
    .context("taking over from the tunnel running on this node")?
    {
        Some((p, handed)) => {
            tracing::info!(
                predecessor = p.pid,
                listeners = handed.len(),
                "a tunnel runs on this node: taking over its listeners"
            );
            (Some(p), handed)
        }
        None => (None, HandedListeners::default()),
    };
    let mut node_sockets = Vec::new();
    let mut bind = |addr: SocketAddr, what: &str| -> anyhow::Result<tokio::net::TcpListener> {
        handed.take_or_bind(&node_netns, addr, &mut node_sockets).with_context(|| format!("{what} listener"))
    };
    // Node listeners first: a port conflict must stop the start before
    // capture is touched.
    let admin_listener = bind(config.listeners.admin, "admin")?;
    let metrics_listener = bind(config.listeners.metrics, "metrics")?;
    let readiness_listener = bind(config.listeners.readiness, "readiness")?;
    let node_outbound_v4 = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)), "outbound")?;
    let node_outbound_v6 = bind(SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT)), "outbound")
        .map_err(|e| tracing::warn!("no IPv6 outbound listener on the node: {e:#}"))
        .ok();
    let node_hbone_v4 = bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, HBONE_PORT)), "HBONE")?;
    let node_hbone_v6 = bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, HBONE_PORT)), "HBONE")
        .map_err(|e| tracing::warn!("no IPv6 HBONE listener on the node: {e:#}"))
        .ok();
    let k8s_metrics = K8sMetrics::default();
    let metrics = Arc::new(match &kubernetes {
        Some(_) => Metrics::with_kubernetes(&k8s_metrics),
        None => Metrics::new(),
    });
    let access_log =
        Arc::new(AccessLog::start(&config.access_log.target, metrics.access_log_dropped.clone())?);
    let shutdown = CancellationToken::new();
    // Taking over: the running tunnel's token stays valid for both (a POST
    // may reach either while they overlap, and the old one must keep
    // working if this one fails).
    let token = match predecessor {
        Some(_) => AdminToken::adopt(&config.node.admin_token()),
        None => AdminToken::create(&config.node.admin_token()),
    }
    .with_context(|| format!("the admin token {}", config.node.admin_token().display()))?;
    // Identity before capture: a CA or credential problem must stop the start
    // while the node is still untouched.
    let identity = IdentityRuntime::start(&config, &node_netns, metrics.clone(), shutdown.clone())?;

    // Kubernetes mode: the API server is reached before capture is touched
    // (a bad kubeconfig leaves the node as it was); ready once the cluster
    // has been listed and applied.
    let mut cluster = match &kubernetes {
        Some(options) => Some(
            KubernetesSource::start(
                options,
                config.clone(),
                &mount,
                k8s_metrics,
                shutdown.clone(),
                predecessor.is_some(),
            )
            .await
            .context("Kubernetes mode")?,
        ),
        None => None,
    };

    let capture = Capture::install(&CaptureSettings {
        pin_dir: config.capture.bpf_pin_dir.clone(),
        cgroup_root: cgroup_root.clone(),
        tunnel_cgroup: tunnel_cgroup.clone(),
        tunnel_cgroup_id,
        max_connections: config.capture.max_connections,
        max_sockets: config.capture.max_sockets,
        predecessor_running: predecessor.is_some(),
    })?;
    metrics.set_capture(capture.counters());
    let (state_tx, state_rx) = watch::channel(Arc::new(State::empty(config.clone())));
    let failures = Arc::new(FailureRing::default());
    let admin = Arc::new(Admin {
        token,
        view: Mutex::new(AdminView {
            node: config.node.name.clone(),
            pid: std::process::id(),
            config_file: config_path.display().to_string(),
            ..AdminView::default()
        }),
        ready: AtomicBool::new(false),
        heartbeat: Mutex::new(std::time::Instant::now()),
        capture: capture.counters(),
        metrics: metrics.clone(),
        certs: identity.manager.clone(),
        set_log_level,
        state: state_rx.clone(),
        failures: failures.clone(),
    });

    let sockets = SocketPolicy::from_config(&config.proxy.tcp_keepalive);
    let refusals = Refusals::new(metrics.limit_refusals.clone());
    let l = &config.limits;
    let pool = Pool::new(
        PoolSettings {
            idle_timeout: config.proxy.pool_idle_timeout,
            connect_timeout: config.proxy.connect_timeout,
            clock_skew: config.identity.clock_skew,
            wait_timeout: l.pool_wait_timeout,
            sockets,
            ..PoolSettings::default()
        },
        identity.manager.bundle(),
    );
    metrics.process.set_runtime(tokio::runtime::Handle::current());
    let weak_pool = Arc::downgrade(&pool);
    metrics.process.set_pool(move || weak_pool.upgrade().map(|p| p.stats()));
    let ctx = Arc::new(ProxyContext {
        state: state_rx,
        records: capture.records(),
        access_log: access_log.clone(),
        failures,
        metrics: metrics.clone(),
        certs: identity.manager.clone(),
        pool,
        traffic: Traffic::new(metrics.clone(), access_log.clone(), Some(config.access_log.interval)),
        limits: ConnectionLimits::new(limits, refusals.clone()),
        handshakes: PerSource::handshakes(l.handshakes_per_source, l.handshakes, refusals.clone()),
        hbone_sources: PerSource::connections(l.hbone_connections_per_source, refusals),
        budgets: WorkloadBudgets::new(l.early_data_per_workload, l.deliveries_per_workload),
        early_data_per_stream: l.early_data_per_stream,
        handshake_timeout: l.handshake_timeout,
        sockets,

        open: Arc::default(),
        cert_wait: config.identity.cert_wait,
        clock_skew: config.identity.clock_skew,
        connect_timeout: config.proxy.connect_timeout,
        connections: TaskTracker::new(),
        shutdown: shutdown.clone(),
    });

    let servers = TaskTracker::new();
    {
        let a = admin.clone();
        servers.spawn(http::serve(admin_listener, shutdown.clone(), move |p| a.handle_admin(p)));
        let a = admin.clone();
        servers.spawn(http::serve(readiness_listener, shutdown.clone(), move |p| a.handle_readiness(p)));
        let a = admin.clone();
        servers.spawn(http::serve(metrics_listener, shutdown.clone(), move |p| a.handle_metrics(p)));
    }
    for listener in std::iter::once(node_outbound_v4).chain(node_outbound_v6) {
        let c = ctx.clone();
        servers.spawn(proxy::accept_loop(listener, c.clone(), move |s, p| {
            proxy::outbound::handle(s, p, ListenerScope::Node, c.clone())
        }));
    }
    for listener in std::iter::once(node_hbone_v4).chain(node_hbone_v6) {
        let c = ctx.clone();
        servers.spawn(proxy::accept_loop(listener, c.clone(), move |s, p| {
            proxy::hbone::server::serve_connection(s, p, ListenerScope::Node, c.clone())
        }));
    }
    // Plain-host workloads receive their callers in the node's namespace.
    if let Err(e) = proxy::delivery::prepare(&node_netns).await {
        tracing::warn!(
            "the node's namespace cannot deliver with the caller's address (callers will appear as the node): {e}"
        );
    }

    let mut enrollment = Enrollment::new(
        capture,
        mount,
        cgroup_root,
        tunnel_cgroup,
        node_netns,
        ctx.clone(),
        state_tx,
        tokio::runtime::Handle::current(),
    );
    enrollment.use_handed(handed);
    // In Kubernetes mode the file has no workloads: applying it would empty
    // the pinned enrollment the previous tunnel left (its pods' connections
    // would go out uncaptured until the cluster is listed). The first
    // listing is the first apply; until then the pins stay as they are
    // (refused while no tunnel listens; served by a predecessor during a
    // handover).
    if cluster.is_none() {
        let statuses = tokio::task::block_in_place(|| enrollment.apply(&config));
        publish_status(&admin, &metrics, &enrollment, statuses, false);
        admin.set_ready(true);
        tracing::info!(node = %config.node.name, "ztunnel ready");
    }
    for warning in config.warnings() {
        tracing::warn!("configuration: {warning}");
    }

    let mut reloader = Reloader::new(&config_path, kubernetes.as_ref().map(|k| k.node_name.clone()));
    let mut current = config;
    let mut base = current.clone();
    let mut sighup = tokio::signal::unix::signal(SignalKind::hangup())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    // SIGUSR2: start this binary again as this tunnel's successor (how a
    // systemd unit upgrades without resets: `systemctl kill -s SIGUSR2`).
    let mut sigusr2 = tokio::signal::unix::signal(SignalKind::user_defined2())?;
    let mut spawned: Option<std::process::Child> = None;
    let mut told_ready = false;
    let mut tick = tokio::time::interval(current.proxy.reload_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cgroups = crate::cgroup::CgroupWatcher::new().context("watching cgroups")?;
    cgroups.watch(enrollment.watched_dirs(&current));
    let mut last_lapse_check = std::time::SystemTime::now();
    let mut trimmer = crate::memory::Trimmer::default();
    // The successor's side of an upgrade listens once it serves.
    let mut handover_listener = match predecessor {
        Some(_) => None,
        None => listen_for_successor(&handover_path),
    };
    let mut handed_over = None;
    let mut ready_since = None;
    loop {
        trimmer.tick();
        admin.beat();
        if admin.is_ready() && !told_ready {
            sd_notify::tell("READY=1");
            told_ready = true;
        }
        if let Some(child) = spawned.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            tracing::warn!(successor = child.id(), "the successor exited ({status}) before taking over");
            spawned = None;
        }
        // Taking over once every local identity holds a certificate (the
        // running tunnel has its own; a CA outage during an upgrade leaves
        // the old one serving), or after CERTIFICATES_LIMIT regardless (an
        // identity the CA never signs must not block every upgrade).
        if admin.is_ready() && ready_since.is_none() {
            ready_since = Some(std::time::Instant::now());
        }
        let waiting_for_certificates = predecessor.is_some()
            && ready_since.is_some_and(|t| t.elapsed() < CERTIFICATES_LIMIT)
            && !identity.manager.view().identities.iter().all(|c| c.state == "valid");
        if admin.is_ready()
            && !waiting_for_certificates
            && let Some(p) = predecessor.take()
        {
            let unused = enrollment.release_handed();
            let pid_of_predecessor = p.pid;
            match tokio::task::block_in_place(|| p.taken()) {
                Ok(pid) => tracing::info!(
                    predecessor = pid,
                    handover_ms = upgrade_started.elapsed().as_millis() as u64,
                    unused_listeners = unused,
                    "took over from the tunnel that ran on this node; it drains and exits"
                ),
                Err(e) if handover::is_running(pid_of_predecessor) => {
                    // It gave up waiting (HANDOVER_LIMIT) and serves on:
                    // two tunnels must not both serve the node.
                    anyhow::bail!(
                        "the running tunnel (pid {pid_of_predecessor}) gave up waiting for this one to be ready ({e}); it keeps serving, this one exits"
                    );
                }
                Err(e) => tracing::warn!("the tunnel this one took over from went away first: {e}"),
            }
            if let Some(source) = cluster.as_mut() {
                source.publish_cni_socket();
            }
            handover_listener = listen_for_successor(&handover_path);
        }
        let forced = tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(50)), if waiting_for_certificates => continue,
            successor = next_successor(handover_listener.as_ref()) => {
                match successor {
                    Ok(successor) if successor.node != current.node.name => {
                        let why = format!("this tunnel serves node {}, not {}", current.node.name, successor.node);
                        tracing::warn!(successor = successor.pid, "handover refused: {why} (do two tunnels share node.run_dir?)");
                        if let Err(e) = tokio::task::block_in_place(|| successor.refuse(&why)) {
                            tracing::warn!("handover socket: {e}");
                        }
                    }
                    Ok(successor) => {
                        let listeners: Vec<_> =
                            node_sockets.iter().map(|s| s.as_fd()).chain(enrollment.listener_fds()).collect();
                        let pid = successor.pid;
                        let successor_cgroup = successor.tunnel_cgroup;
                        match hand_over(successor, &listeners, &admin, &mut sigterm).await {
                            HandOver::Taken | HandOver::Stopped => {
                                handed_over = Some((pid, successor_cgroup));
                                // Our own child: systemd follows it as the
                                // unit's main process from now on.
                                if spawned.as_ref().map(std::process::Child::id) == Some(pid) {
                                    sd_notify::tell(&format!("MAINPID={pid}"));
                                }
                                break;
                            }
                            HandOver::Failed => {
                                // The would-be successor may have put its
                                // programs into the pinned links and written
                                // the shared maps: make them this tunnel's again.
                                enrollment.reclaim_capture_links();
                                enrollment.force_sync();
                                let statuses = tokio::task::block_in_place(|| enrollment.apply(&current));
                                publish_status(&admin, &metrics, &enrollment, statuses, false);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!("handover socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                continue;
            }
            event = next_cluster_event(&mut cluster) => {
                let Some(source) = cluster.as_mut() else { continue };
                match event {
                    AgentEvent::Closed => continue,
                    AgentEvent::Cni(call) => source.take_cni(call),
                    AgentEvent::Cluster => {}
                }
                if source.synced() {
                    current = apply_cluster(source, &mut enrollment, &identity, &ctx, &admin, &metrics);
                    trimmer.after_change();
                }
                continue;
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sigusr2.recv() => {
                match &spawned {
                    Some(child) => tracing::warn!(successor = child.id(), "SIGUSR2: a successor is already starting"),
                    None => match start_successor() {
                        Ok(child) => {
                            tracing::info!(successor = child.id(), "SIGUSR2: started a successor; it takes over once ready");
                            spawned = Some(child);
                        }
                        Err(e) => tracing::error!("SIGUSR2: cannot start a successor: {e}"),
                    },
                }
                continue;
            }
            _ = sighup.recv() => true,
            _ = tick.tick() => false,
            () = cgroups.changed() => {
                // A cgroup came or went: a restarted unit is enrolled again
                // now, not at the next tick (in Kubernetes mode once the
                // cluster is listed: before, there is nothing to apply).
                if cluster.as_ref().is_none_or(KubernetesSource::synced) {
                    let statuses = tokio::task::block_in_place(|| enrollment.apply(&current));
                    publish_status(&admin, &metrics, &enrollment, statuses, false);
                }
                continue;
            }
        };
        match reloader.check(forced) {
            Reload::Unchanged if cluster.as_ref().is_some_and(|c| !c.synced() && c.has_pending()) => {
                // Not listed yet: CNI ADDs that waited too long are told why
                // (and their namespaces let go) rather than kept.
                if let Some(source) = cluster.as_mut() {
                    source.answer_waiting(&[]);
                }
            }
            Reload::Unchanged if cluster.as_ref().is_some_and(|c| c.synced() && c.has_pending()) => {
                if let Some(source) = cluster.as_mut() {
                    current = apply_cluster(source, &mut enrollment, &identity, &ctx, &admin, &metrics);
                }
            }
            Reload::Unchanged if enrollment.has_pending() => {
                let statuses = tokio::task::block_in_place(|| enrollment.apply(&current));
                publish_status(&admin, &metrics, &enrollment, statuses, false);
            }
            Reload::Unchanged => {}
            Reload::Invalid(error) => {
                tracing::error!("configuration not reloaded, keeping the running one: {error}");
                metrics.config_reloads.get_or_create(&result("invalid")).inc();
                admin.update(|v| v.last_reload_error = Some(error));
            }
            Reload::Changed(new) if cluster.is_some() => {
                warn_unreloadable(&base, &new);
                base = Arc::new(*new);
                if let Some(source) = cluster.as_mut() {
                    source.set_base(base.clone());
                    if source.synced() {
                        current = apply_cluster(source, &mut enrollment, &identity, &ctx, &admin, &metrics);
                    }
                }
                metrics.config_reloads.get_or_create(&result("applied")).inc();
                tracing::info!(generation = enrollment.generation(), "configuration file reloaded");
            }
            Reload::Changed(new) => {
                warn_unreloadable(&current, &new);
                let new = Arc::new(*new);
                identity.update_placement(&new);
                let statuses = tokio::task::block_in_place(|| enrollment.apply(&new));
                publish_status(&admin, &metrics, &enrollment, statuses, true);
                for warning in new.warnings() {
                    tracing::warn!("configuration: {warning}");
                }
                if new.authorization.on_policy_change == OnPolicyChange::Close {
                    revalidate(&ctx, "the new configuration");
                }
                metrics.config_reloads.get_or_create(&result("applied")).inc();
                tracing::info!(generation = enrollment.generation(), "configuration reloaded");
                trimmer.after_change();
                current = new;
            }
        }
        cgroups.watch(enrollment.watched_dirs(&current));
        // An emergency allow that lapsed takes the connections it admitted
        // with it, as a policy change would.
        let now = std::time::SystemTime::now();
        if let Some(lapsed) =
            current.emergency_allows.iter().find(|e| e.expires > last_lapse_check && e.expires <= now)
        {
            tracing::warn!(emergency_allow = %lapsed.key(), "emergency allow expired: it admits nothing any more");
            if current.authorization.on_policy_change == OnPolicyChange::Close {
                revalidate(&ctx, "an expired emergency allow");
            }
        }
        last_lapse_check = now;
    }

    match handed_over {
        Some((successor, _)) => {
            tracing::info!(
                successor,
                drain = ?current.proxy.drain_timeout,
                "handed over: no longer accepting; draining open connections, then exiting"
            );
        }
        None => {
            sd_notify::tell("STOPPING=1");
            tracing::info!(drain = ?current.proxy.drain_timeout, "shutting down: no new connections, draining open ones")
        }
    }
    if let Some(l) = &handover_listener {
        l.remove();
    }
    // The copies kept for a successor: without them the listening sockets
    // close with the accept loops (at a plain stop, new connections are then
    // refused at once instead of queued and reset at exit).
    drop(node_sockets);
    enrollment.drop_listener_copies();
    admin.set_ready(false);
    shutdown.cancel();
    ctx.connections.close();
    if tokio::time::timeout(current.proxy.drain_timeout, ctx.connections.wait()).await.is_err() {
        tracing::warn!(open = ctx.connections.len(), "drain timeout reached; closing remaining connections");
    }
    servers.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), servers.wait()).await;
    access_log.flushed(Duration::from_secs(2)).await;
    if let Some((_, successor_cgroup)) = handed_over {
        enrollment.retire_delivery(successor_cgroup);
    }
    // Capture stays attached (pinned): enrolled workloads are refused until
    // the next tunnel starts, never let out in the clear.
    drop(enrollment);
    tracing::info!("stopped; capture stays installed (`ztunnel uninstall` removes it)");
    Ok(())
}

/// How long a successor may take from receiving the listeners to being
/// ready (certificates, and in Kubernetes mode the cluster's first listing);
/// enrollment here is paused meanwhile.
const HANDOVER_LIMIT: Duration = Duration::from_secs(120);

/// How long a successor that is ready waits for its certificates before it
/// takes over anyway.
const CERTIFICATES_LIMIT: Duration = Duration::from_secs(30);

/// This binary, run again with this process's arguments. The file may have
/// been replaced by the new version (what an upgrade does): the path is
/// run, not this process's (deleted) image.
fn start_successor() -> std::io::Result<std::process::Child> {
    let exe = std::env::current_exe()?;
    let exe = match exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
        Some(path) => PathBuf::from(path),
        None => exe,
    };
    std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .stdin(std::process::Stdio::null())
        .spawn()
}

fn listen_for_successor(path: &Path) -> Option<HandoverListener> {
    HandoverListener::bind(path)
        .map_err(|e| {
            tracing::warn!("no upgrade by handover (a new tunnel will have to restart this one): {e}")
        })
        .ok()
}

async fn next_successor(listener: Option<&HandoverListener>) -> Result<Successor, HandoverError> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Hands the listening sockets to a successor and waits, with enrollment
/// paused (no listener may appear or go meanwhile), until it has taken over.
/// False: it did not, and this tunnel carries on.
async fn hand_over(
    mut successor: Successor,
    listeners: &[std::os::fd::BorrowedFd<'_>],
    admin: &Admin,
    sigterm: &mut tokio::signal::unix::Signal,
) -> HandOver {
    let pid = successor.pid;
    tracing::info!(
        successor = pid,
        listeners = listeners.len(),
        "a new tunnel is taking over: enrollment paused"
    );
    if let Err(e) = tokio::task::block_in_place(|| successor.offer(listeners)) {
        tracing::warn!(successor = pid, "handover failed, carrying on: {e}");
        return HandOver::Failed;
    }
    // Not ready while it is under way: a probe of the node's readiness port
    // may reach either process, and neither can promise the other.
    admin.set_ready(false);
    let taken = successor.wait_taken(HANDOVER_LIMIT);
    tokio::pin!(taken);
    loop {
        tokio::select! {
            r = &mut taken => return match r {
                Ok(()) => HandOver::Taken,
                Err(e) => {
                    tracing::warn!(successor = pid, "the new tunnel did not take over, carrying on: {e}");
                    admin.set_ready(true);
                    HandOver::Failed
                }
            },
            // Stopped meanwhile (the old pod deleted): the successor already
            // holds the sockets and serves once ready; connections wait in
            // their queues until then.
            _ = sigterm.recv() => {
                tracing::info!(successor = pid, "SIGTERM during the handover: stopping; the new tunnel keeps the sockets");
                return HandOver::Stopped;
            }
            // Alive while waiting: the controller is paused, not wedged.
            () = tokio::time::sleep(Duration::from_secs(1)) => admin.beat(),
        }
    }
}

enum HandOver {
    Taken,
    /// SIGTERM came first.
    Stopped,
    Failed,
}

/// The next event of Kubernetes mode (never, in file mode).
async fn next_cluster_event(source: &mut Option<KubernetesSource>) -> AgentEvent {
    match source {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Applies the cluster's configuration as a reload is applied, answers the
/// CNI plugin's waiting ADDs, and says ready after the first full sync.
/// Returns the configuration in force.
fn apply_cluster(
    source: &mut KubernetesSource,
    enrollment: &mut Enrollment,
    identity: &IdentityRuntime,
    ctx: &ProxyContext,
    admin: &Admin,
    metrics: &Metrics,
) -> Arc<Config> {
    let new = Arc::new(source.config());
    identity.update_placement(&new);
    let statuses = tokio::task::block_in_place(|| enrollment.apply(&new));
    source.answer_waiting(&statuses);
    publish_status(admin, metrics, enrollment, statuses, false);
    // As for a reloaded file: a pod that left, changed identity or lost a
    // policy's allow takes its open connections with it.
    if new.authorization.on_policy_change == OnPolicyChange::Close {
        revalidate(ctx, "the cluster's new policies");
    }
    if !admin.is_ready() {
        admin.set_ready(true);
        tracing::info!(node = %new.node.name, workloads = new.workloads.len(), "cluster synced; ztunnel ready");
    }
    new
}

/// Closes the open connections that the state now in force denies.
fn revalidate(ctx: &ProxyContext, why: &str) {
    let state = ctx.state.borrow().clone();
    let closed = ctx.open.revalidate(&state);
    if closed > 0 {
        tracing::info!(closed, "open connections that {why} denies were closed");
    }
}

fn result(r: &str) -> crate::metrics::ResultLabels {
    crate::metrics::ResultLabels { result: r.to_owned() }
}

fn publish_status(
    admin: &Admin,
    metrics: &Metrics,
    enrollment: &Enrollment,
    statuses: Vec<crate::enrollment::WorkloadStatus>,
    reloaded: bool,
) {
    for state in ["enrolled", "not_ready", "failed"] {
        let n = statuses.iter().filter(|s| s.state == state).count();
        metrics
            .workloads
            .get_or_create(&crate::metrics::WorkloadStateLabels { state: state.to_owned() })
            .set(n as i64);
    }
    admin.update(|v| {
        v.generation = enrollment.generation();
        v.capture_error = enrollment.sync_error().map(str::to_owned);
        v.workloads = statuses;
        if reloaded {
            v.last_reload_error = None;
        }
    });
}

/// Settings that only take effect at start.
fn warn_unreloadable(old: &Config, new: &Config) {
    fn json<T: serde::Serialize>(t: &T) -> String {
        serde_json::to_string(t).unwrap_or_default()
    }
    for (what, changed) in [
        ("node", json(&old.node) != json(&new.node)),
        ("trust_domain", old.trust_domain != new.trust_domain),
        ("capture", json(&old.capture) != json(&new.capture)),
        ("listeners", json(&old.listeners) != json(&new.listeners)),
        ("proxy", json(&old.proxy) != json(&new.proxy)),
        ("access_log", old.access_log != new.access_log),
        ("limits", json(&old.limits) != json(&new.limits)),
    ] {
        if changed {
            tracing::warn!("`{what}` changed in the configuration file; it takes effect at the next restart");
        }
    }
}

enum Reload {
    Unchanged,
    Invalid(String),
    Changed(Box<Config>),
}

/// Notices configuration file changes (by content, so that editors' atomic
/// renames and Kubernetes' symlink swaps count).
struct Reloader {
    path: PathBuf,
    last: Option<Vec<u8>>,
    /// Kubernetes mode: the node's name, whatever the file says.
    node_name: Option<String>,
}

impl Reloader {
    fn new(path: &Path, node_name: Option<String>) -> Self {
        Self { path: path.to_owned(), last: std::fs::read(path).ok(), node_name }
    }

    fn check(&mut self, forced: bool) -> Reload {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) => return Reload::Invalid(format!("cannot read {}: {e}", self.path.display())),
        };
        if !forced && self.last.as_ref() == Some(&bytes) {
            return Reload::Unchanged;
        }
        self.last = Some(bytes.clone());
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(_) => return Reload::Invalid(format!("{} is not UTF-8", self.path.display())),
        };
        match Config::parse_as_node(&text, &self.path, self.node_name.as_deref()) {
            Ok(c) => Reload::Changed(Box::new(c)),
            Err(e) => Reload::Invalid(e.to_string()),
        }
    }
}
