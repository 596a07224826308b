//! Transparent capture: loads ztunnel's eBPF programs, keeps them attached
//! across restarts, and gives the rest of the tunnel typed access to the maps.
//!
//! The programs are attached once, to the cgroup that holds every workload of
//! the node (`capture.cgroup_root`), and act only for enrolled cgroups: enrolling
//! or removing a workload is a map update, never an attach or detach, so it
//! cannot disturb anyone else's connections. See docs/architecture.md.

mod link_swap;
mod maps;
pub mod pins;

use std::{
    collections::HashMap as StdHashMap,
    fs::File,
    mem::size_of,
    net::SocketAddr,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, MapInfo, SockHash},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, SkLookup, SockOps, links::FdLink},
};
use nix::sys::stat::fstat;
use ztunnel_ebpf_common::{
    AddrKey, CaptureRecord, CidrKey, ConnTuple, DeliveryKey, EnrolledWorkload, PortKey, SocketOwner, counter,
    global_name, map_name, program_name,
};

pub use ztunnel_ebpf_common::MAP_ABI_VERSION;

pub use self::maps::{
    CaptureCounters, CaptureRecords, CapturedConnection, DesiredMaps, WorkloadCapture, addr_key,
};
use self::{
    link_swap::{LinkTarget, SwapError},
    pins::{PinError, Pins},
};
use crate::{cgroup::Cgroup, netns::NetnsRef};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {kind} `{name}` (build mismatch)")]
    Missing { kind: &'static str, name: &'static str },
    #[error("program `{name}`: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("link of `{name}`: {source}")]
    Link { name: &'static str, source: aya::programs::links::LinkError },
    #[error("map `{name}`: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error(
        "pinned map {path} has key/value sizes {found:?}, this tunnel needs {want:?}: \
         it was pinned by an incompatible version; run `ztunnel uninstall` first"
    )]
    Incompatible { path: PathBuf, found: (u32, u32), want: (u32, u32) },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("cannot open network namespace {path}: {source}")]
    Netns { path: PathBuf, source: std::io::Error },
}

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel-ebpf"));

/// What [`Capture::install`] needs to know.
#[derive(Debug, Clone)]
pub struct CaptureSettings {
    pub pin_dir: PathBuf,
    pub cgroup_root: Cgroup,
    /// The tunnel's own cgroup: never captured; its delivery connections are
    /// registered by the delivery sockops program attached to it.
    pub tunnel_cgroup: Cgroup,
    pub tunnel_cgroup_id: u64,
    pub max_connections: u32,
    /// Size of the socket owner map: TCP sockets of workloads on the node.
    pub max_sockets: u32,
    /// A tunnel this one takes over from still serves: its delivery link
    /// (another cgroup's, in Kubernetes) must stay until it exits.
    pub predecessor_running: bool,
}

/// The loaded, attached capture programs and their maps.
pub struct Capture {
    /// Holds the programs; the maps are taken out into the fields below.
    ebpf: Ebpf,
    pins: Pins,
    enrolled: HashMap<MapData, u64, EnrolledWorkload>,
    excluded_cidrs: LpmTrie<MapData, CidrKey, u8>,
    excluded_ports: HashMap<MapData, PortKey, u8>,
    inbound_addrs: HashMap<MapData, AddrKey, u32>,
    inbound_listeners: SockHash<MapData, AddrKey>,
    workload_sockets: HashMap<MapData, u32, u32>,
    records: Arc<CaptureRecords>,

    counters: Arc<CaptureCounters>,
    /// The tunnel's cgroup, whose delivery link this tunnel pinned.
    tunnel_cgroup_id: u64,
}

impl Capture {
    /// Loads the programs (reusing maps pinned by an earlier tunnel, so that
    /// enrollment survives restarts) and attaches them to the cgroup root,
    /// replacing the links of the earlier tunnel without a gap.
    pub fn install(settings: &CaptureSettings) -> Result<Self, CaptureError> {
        pins::ensure_bpffs(&settings.pin_dir)?;
        let pins = Pins::new(&settings.pin_dir);
        pins.create()?;
        let mut ebpf = load_object(
            Some(&pins),
            settings.tunnel_cgroup_id,
            settings.max_connections,
            settings.max_sockets,
        )?;
        check_pinned_maps(&pins)?;
        warn_if_resized(&pins, settings.max_connections);
        forward_kernel_logs(&mut ebpf);

        let cgroup = File::open(settings.cgroup_root.path()).map_err(|source| CaptureError::Cgroup {
            path: settings.cgroup_root.path().to_owned(),
            source,
        })?;
        let cgroup_root_id = fstat(cgroup.as_fd())
            .map_err(|e| CaptureError::Cgroup {
                path: settings.cgroup_root.path().to_owned(),
                source: e.into(),
            })?
            .st_ino;
        // CgroupSockAddr and SockOps share no trait for attach/take_link.
        macro_rules! attach_to_cgroup {
            ($ty:ty, $name:expr) => {{
                let name: &'static str = $name;
                let err = |source| CaptureError::Program { name, source };
                let program: &mut $ty = program_mut(&mut ebpf, name)?;
                program.load().map_err(err)?;
                let pin = pins.link(name);
                if !swapped(
                    &pin,
                    LinkTarget::Cgroup(cgroup_root_id),
                    program.fd().map_err(err)?.as_fd(),
                    name,
                ) {
                    // bpf_link_create takes no flags for cgroups (EINVAL): links
                    // always coexist with other programs, as ALLOW_MULTI would.
                    let id = program.attach(cgroup.as_fd(), CgroupAttachMode::Single).map_err(err)?;
                    let link = FdLink::try_from(program.take_link(id).map_err(err)?)
                        .map_err(|source| CaptureError::Link { name, source })?;
                    pins.replace_link(&pin, link)?;
                }
            }};
        }
        attach_to_cgroup!(CgroupSockAddr, program_name::CONNECT4);
        attach_to_cgroup!(CgroupSockAddr, program_name::CONNECT6);
        attach_to_cgroup!(SockOps, program_name::SOCKOPS);
        attach_to_cgroup!(CgroupSock, program_name::SOCK_CREATE);
        attach_to_cgroup!(CgroupSock, program_name::SOCK_RELEASE);
        {
            let name = program_name::DELIVERY_SOCKOPS;
            let err = |source| CaptureError::Program { name, source };
            let tunnel = File::open(settings.tunnel_cgroup.path()).map_err(|source| {
                CaptureError::Cgroup { path: settings.tunnel_cgroup.path().to_owned(), source }
            })?;
            let program: &mut SockOps = program_mut(&mut ebpf, name)?;
            program.load().map_err(err)?;
            let pin = pins.delivery_link(settings.tunnel_cgroup_id);
            let target = LinkTarget::Cgroup(settings.tunnel_cgroup_id);
            if !swapped(&pin, target, program.fd().map_err(err)?.as_fd(), name) {
                let id = program.attach(tunnel.as_fd(), CgroupAttachMode::Single).map_err(err)?;
                let link = FdLink::try_from(program.take_link(id).map_err(err)?)
                    .map_err(|source| CaptureError::Link { name, source })?;
                pins.replace_link(&pin, link)?;
            }
            if !settings.predecessor_running {
                pins.remove_delivery_links_except(settings.tunnel_cgroup_id)?;
            }
        }
        {
            let name = program_name::SK_LOOKUP;
            let program: &mut SkLookup = program_mut(&mut ebpf, name)?;
            program.load().map_err(|source| CaptureError::Program { name, source })?;
        }
        tracing::info!(
            cgroup_root = %settings.cgroup_root,
            pin_dir = %settings.pin_dir.display(),
            tunnel_cgroup_id = settings.tunnel_cgroup_id,
            "capture programs attached"
        );

        Ok(Self {
            enrolled: take_map(&mut ebpf, map_name::ENROLLED_CGROUPS)?,
            excluded_cidrs: take_map(&mut ebpf, map_name::EXCLUDED_CIDRS)?,
            excluded_ports: take_map(&mut ebpf, map_name::EXCLUDED_PORTS)?,
            inbound_addrs: take_map(&mut ebpf, map_name::INBOUND_ADDRS)?,
            inbound_listeners: take_map(&mut ebpf, map_name::INBOUND_LISTENERS)?,
            workload_sockets: take_map(&mut ebpf, map_name::WORKLOAD_SOCKETS)?,
            records: Arc::new(CaptureRecords::new(take_map(&mut ebpf, map_name::CAPTURED_BY_TUPLE)?)),

            counters: Arc::new(CaptureCounters::new(take_map(&mut ebpf, map_name::CAPTURE_COUNTERS)?)),
            pins,
            ebpf,
            tunnel_cgroup_id: settings.tunnel_cgroup_id,
        })
    }

    /// Removes every pin of the installation at `pin_dir`: capture programs
    /// detach from the cgroup and from every namespace. Returns false when
    /// nothing was installed.
    pub fn uninstall(pin_dir: &Path) -> Result<bool, CaptureError> {
        Ok(Pins::remove_all(pin_dir)?)
    }

    /// Workload ids by cgroup id, as the pinned map holds them (an earlier
    /// tunnel's, after a restart).
    pub fn enrolled_ids(&self) -> StdHashMap<u64, u32> {
        self.enrolled
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.flags & ztunnel_ebpf_common::WORKLOAD_GUARD == 0)
            .map(|(k, v)| (k, v.workload_id))
            .collect()
    }

    /// TCP sockets each workload holds now, by workload id (the kernel's
    /// count, against each workload's quota).
    pub fn workload_sockets(&self) -> StdHashMap<u32, u32> {
        self.workload_sockets.iter().filter_map(Result::ok).collect()
    }

    /// Capture records, shared with the proxies that look them up.
    pub fn records(&self) -> Arc<CaptureRecords> {
        self.records.clone()
    }

    pub fn counters(&self) -> Arc<CaptureCounters> {
        self.counters.clone()
    }

    /// Attaches inbound steering to a pod's network namespace (replacing the
    /// link an earlier tunnel pinned for it).
    pub fn attach_netns(
        &mut self,
        namespace: &str,
        workload: &str,
        netns: &NetnsRef,
    ) -> Result<(), CaptureError> {
        let file = netns
            .open_fd()
            .map_err(|source| CaptureError::Netns { path: PathBuf::from(netns.display()), source })?;
        let name = program_name::SK_LOOKUP;
        let err = |source| CaptureError::Program { name, source };
        let inode = fstat(file.as_fd())
            .map_err(|e| CaptureError::Netns { path: PathBuf::from(netns.display()), source: e.into() })?
            .st_ino;
        let program: &mut SkLookup = program_mut(&mut self.ebpf, name)?;
        let pin = self.pins.netns_link(namespace, workload);
        if !swapped(&pin, LinkTarget::Netns(inode), program.fd().map_err(err)?.as_fd(), name) {
            let id = program.attach(file).map_err(err)?;
            let link: FdLink = program.take_link(id).map_err(err)?.into();
            self.pins.replace_link(&pin, link)?;
        }
        Ok(())
    }

    /// After a handover, as this tunnel exits: its delivery link goes unless
    /// the successor runs in the same cgroup (then the link is the
    /// successor's).
    pub fn retire_delivery(&self, successor_cgroup: u64) {
        if successor_cgroup != self.tunnel_cgroup_id
            && let Err(e) = self.pins.remove_link(&self.pins.delivery_link(self.tunnel_cgroup_id))
        {
            tracing::warn!("removing this tunnel's delivery link: {e}");
        }
    }

    /// After a successor failed to take over: it swapped its programs into
    /// the pinned links, where they would keep running with it gone (a new
    /// version's, perhaps the reason it failed). This tunnel's go back in,
    /// in place as on install, so no connect() sees two programs.
    pub fn reclaim_links(&self) {
        let mut links: Vec<(PathBuf, &'static str)> = [
            program_name::CONNECT4,
            program_name::CONNECT6,
            program_name::SOCKOPS,
            program_name::SOCK_CREATE,
            program_name::SOCK_RELEASE,
        ]
        .into_iter()
        .map(|name| (self.pins.link(name), name))
        .collect();
        links.push((self.pins.delivery_link(self.tunnel_cgroup_id), program_name::DELIVERY_SOCKOPS));
        match self.pins.netns_links() {
            Ok(pods) => {
                links.extend(pods.into_iter().filter(|(_, name)| !pins::is_staging(name)).map(
                    |(namespace, name)| (self.pins.netns_link(&namespace, &name), program_name::SK_LOOKUP),
                ))
            }
            Err(e) => tracing::warn!("listing the pods' pinned links to take them back: {e}"),
        }
        for (pin, name) in links {
            let program = match self.ebpf.program(name).map(aya::programs::Program::fd) {
                Some(Ok(program)) => program,
                Some(Err(e)) => {
                    tracing::warn!(program = name, "this tunnel's program has no descriptor: {e}");
                    continue;
                }
                None => {
                    tracing::warn!(program = name, "this tunnel has no such program loaded");
                    continue;
                }
            };
            match link_swap::put_back(&pin, program.as_fd()) {
                Ok(()) | Err(SwapError::NotPinned) => {}
                Err(e) => tracing::warn!(
                    program = name,
                    pin = %pin.display(),
                    "cannot put this tunnel's program back into the pinned link; the failed successor's runs there: {e}"
                ),
            }
        }
    }

    /// Detaches inbound steering from a pod's namespace.
    pub fn detach_netns(&mut self, namespace: &str, name: &str) -> Result<(), CaptureError> {
        Ok(self.pins.remove_link(&self.pins.netns_link(namespace, name))?)
    }

    /// Detaches steering from every namespace not in `keep` (pods an earlier
    /// tunnel enrolled that are gone from the configuration).
    pub fn detach_stale_netns(&mut self, keep: &[(String, String)]) -> Result<(), CaptureError> {
        for (namespace, name) in self.pins.netns_links()? {
            if pins::is_staging(&name) || !keep.contains(&(namespace.clone(), name.clone())) {
                self.pins.remove_link(&self.pins.netns_link(&namespace, &name))?;
            }
        }
        Ok(())
    }

    /// Registers the 15006 listener that takes inbound connections to `key`.
    pub fn set_inbound_listener(
        &mut self,
        key: AddrKey,
        listener: &impl std::os::fd::AsRawFd,
    ) -> Result<(), CaptureError> {
        let name = map_name::INBOUND_LISTENERS;
        self.inbound_listeners
            .insert(key, listener.as_raw_fd(), 0)
            .map_err(|source| CaptureError::Map { name, source })
    }

    /// Makes the maps hold exactly `desired`. Exclusions and inbound addresses
    /// are written before enrollment, and enrollment is removed before them,
    /// so that a half-applied state never captures what should be excluded
    /// and never leaves a removed workload half-captured.
    pub fn sync(&mut self, desired: &DesiredMaps) -> Result<(), CaptureError> {
        // Removals that stop capture come first.
        let stale: Vec<u64> = keys(&self.enrolled, map_name::ENROLLED_CGROUPS)?
            .into_iter()
            .filter(|k| !desired.enrolled.contains_key(k))
            .collect();
        for k in stale {
            remove(&mut self.enrolled, &k, map_name::ENROLLED_CGROUPS)?;
        }
        sync_set(&mut self.excluded_ports, &desired.excluded_ports, map_name::EXCLUDED_PORTS)?;
        sync_cidrs(&mut self.excluded_cidrs, &desired.excluded_cidrs)?;
        sync_map(&mut self.inbound_addrs, &desired.inbound_addrs, map_name::INBOUND_ADDRS)?;
        let stale: Vec<AddrKey> = self
            .inbound_listeners
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CaptureError::Map { name: map_name::INBOUND_LISTENERS, source })?
            .into_iter()
            .filter(|k| !desired.inbound_addrs.contains_key(k))
            .collect();
        for k in stale {
            self.inbound_listeners
                .remove(&k)
                .map_err(|source| CaptureError::Map { name: map_name::INBOUND_LISTENERS, source })?;
        }
        // Enrollment last.
        for (k, v) in &desired.enrolled {
            self.enrolled
                .insert(k, v, 0)
                .map_err(|source| CaptureError::Map { name: map_name::ENROLLED_CGROUPS, source })?;
        }
        Ok(())
    }
}

/// The tunnel's eBPF object in the kernel: its maps created (or, with
/// `pins`, reused from an earlier tunnel) and sized, its globals set; its
/// programs are not loaded yet. `Capture::install` goes on to load and attach
/// them; `ztunnel precheck` tries each one against a scratch cgroup or network
/// namespace, with maps of its own.
pub(crate) fn load_object(
    pins: Option<&Pins>,
    tunnel_cgroup_id: u64,
    max_connections: u32,
    max_sockets: u32,
) -> Result<Ebpf, CaptureError> {
    let map_paths: Vec<(&str, PathBuf)> = match pins {
        Some(pins) => map_name::PINNED.iter().map(|name| (*name, pins.map(name))).collect(),
        None => Vec::new(),
    };
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let log_level = aya_log_level();
    loader
        .override_global(global_name::TUNNEL_CGROUP_ID, &tunnel_cgroup_id, true)
        .override_global("AYA_LOG_LEVEL", &log_level, false)
        .map_max_entries(map_name::CAPTURED_BY_TUPLE, max_connections)
        .map_max_entries(map_name::CAPTURED_BY_COOKIE, max_connections)
        .map_max_entries(map_name::SOCKET_OWNERS, max_sockets)
        .load(EBPF_OBJECT)
        .map_err(CaptureError::Load)
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(CaptureError::Missing { kind: "program", name })?;
    program.try_into().map_err(|source| CaptureError::Program { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

/// Refuses maps pinned with another layout: reading them would misattribute
/// connections. (MAP_ABI_VERSION in the pin path makes this a safety net.)
fn check_pinned_maps(pins: &Pins) -> Result<(), CaptureError> {
    let sizes: [(&str, u32, u32); 11] = [
        (map_name::ENROLLED_CGROUPS, size_of::<u64>() as u32, size_of::<EnrolledWorkload>() as u32),
        (map_name::CAPTURED_BY_COOKIE, size_of::<u64>() as u32, size_of::<CaptureRecord>() as u32),
        (map_name::CAPTURED_BY_TUPLE, size_of::<ConnTuple>() as u32, size_of::<CaptureRecord>() as u32),
        (map_name::EXCLUDED_CIDRS, 4 + size_of::<CidrKey>() as u32, 1),
        (map_name::EXCLUDED_PORTS, size_of::<PortKey>() as u32, 1),
        (map_name::INBOUND_ADDRS, size_of::<AddrKey>() as u32, 4),
        (map_name::INBOUND_LISTENERS, size_of::<AddrKey>() as u32, 4),
        (map_name::CAPTURE_COUNTERS, 4, 8),
        (map_name::DELIVERIES, size_of::<DeliveryKey>() as u32, 1),
        (map_name::SOCKET_OWNERS, 8, size_of::<SocketOwner>() as u32),
        (map_name::WORKLOAD_SOCKETS, 4, 4),
    ];
    for (name, key, value) in sizes {
        let path = pins.map(name);
        let info = MapInfo::from_pin(&path)
            .map_err(|source| CaptureError::Map { name: map_name_static(name), source })?;
        let found = (info.key_size(), info.value_size());
        if found != (key, value) {
            return Err(CaptureError::Incompatible { path, found, want: (key, value) });
        }
    }
    Ok(())
}

fn map_name_static(name: &str) -> &'static str {
    map_name::PINNED.iter().find(|n| **n == name).copied().unwrap_or("?")
}

fn warn_if_resized(pins: &Pins, max_connections: u32) {
    if let Ok(info) = MapInfo::from_pin(pins.map(map_name::CAPTURED_BY_TUPLE))
        && info.max_entries() != max_connections
    {
        tracing::warn!(
            pinned = info.max_entries(),
            configured = max_connections,
            "capture.max_connections differs from the pinned maps' size, which stays in force; \
             `ztunnel uninstall` then a restart applies it"
        );
    }
}

/// aya-log level matching the tunnel's: warnings by default.
fn aya_log_level() -> u8 {
    if tracing::enabled!(target: "ebpf", tracing::Level::DEBUG) { 4 } else { 2 }
}

/// Forwards the programs' log lines (aya-log) to tracing, target `ebpf`.
fn forward_kernel_logs(ebpf: &mut Ebpf) {
    struct ToTracing;
    impl log::Log for ToTracing {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            match record.level() {
                log::Level::Error => tracing::error!(target: "ebpf", "{}", record.args()),
                log::Level::Warn => tracing::warn!(target: "ebpf", "{}", record.args()),
                log::Level::Info => tracing::info!(target: "ebpf", "{}", record.args()),
                _ => tracing::debug!(target: "ebpf", "{}", record.args()),
            }
        }
        fn flush(&self) {}
    }
    let logger = match aya_log::EbpfLogger::init_with_logger(ebpf, ToTracing) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!("eBPF log forwarding unavailable: {e}");
            return;
        }
    };
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        // SAFETY: the logger owns its ring buffer fd and keeps it open for as
        // long as it lives, which is as long as the AsyncFd that owns it.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let mut logger = match registered {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!("eBPF log forwarding unavailable: {e}");
                return;
            }
        };
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Whether the program went into the link pinned at `pin` in place (see
/// [`link_swap`]); when not, the caller attaches a link of its own.
fn swapped(pin: &Path, target: LinkTarget, program: BorrowedFd<'_>, name: &'static str) -> bool {
    match link_swap::swap_program(pin, target, program) {
        Ok(()) => {
            tracing::debug!(program = name, pin = %pin.display(), "program swapped into the pinned link");
            true
        }
        Err(SwapError::NotPinned) => false,
        Err(e @ SwapError::OtherTarget { .. }) => {
            tracing::info!(program = name, pin = %pin.display(), "attaching a new link: {e}");
            false
        }
        Err(e) => {
            tracing::warn!(
                program = name,
                pin = %pin.display(),
                "cannot swap the program into the pinned link ({e}); attaching a new link, so for a moment \
                 both programs run and a connect() then may be refused"
            );
            false
        }
    }
}

fn keys<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<K>, CaptureError> {
    map.keys().collect::<Result<Vec<_>, _>>().map_err(|source| CaptureError::Map { name, source })
}

fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), CaptureError> {
    match map.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(CaptureError::Map { name, source }),
    }
}

fn sync_map<K, V>(
    map: &mut HashMap<MapData, K, V>,
    desired: &StdHashMap<K, V>,
    name: &'static str,
) -> Result<(), CaptureError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    for (k, v) in desired {
        map.insert(k, v, 0).map_err(|source| CaptureError::Map { name, source })?;
    }
    for k in keys(map, name)? {
        if !desired.contains_key(&k) {
            remove(map, &k, name)?;
        }
    }
    Ok(())
}

fn sync_set<K>(
    map: &mut HashMap<MapData, K, u8>,
    desired: &std::collections::HashSet<K>,
    name: &'static str,
) -> Result<(), CaptureError>
where
    K: aya::Pod + Eq + std::hash::Hash,
{
    for k in desired {
        map.insert(k, 1, 0).map_err(|source| CaptureError::Map { name, source })?;
    }
    for k in keys(map, name)? {
        if !desired.contains(&k) {
            remove(map, &k, name)?;
        }
    }
    Ok(())
}

fn sync_cidrs(
    map: &mut LpmTrie<MapData, CidrKey, u8>,
    desired: &[(u32, CidrKey, u8)],
) -> Result<(), CaptureError> {
    let name = map_name::EXCLUDED_CIDRS;
    let err = |source| CaptureError::Map { name, source };
    for (prefix_len, data, value) in desired {
        map.insert(&aya::maps::lpm_trie::Key::new(*prefix_len, *data), *value, 0).map_err(err)?;
    }
    let existing = map.keys().collect::<Result<Vec<_>, _>>().map_err(err)?;
    for key in existing {
        let (prefix_len, data) = (key.prefix_len(), key.data());
        if !desired.iter().any(|(p, d, _)| *p == prefix_len && *d == data) {
            match map.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(err(source)),
            }
        }
    }
    Ok(())
}

/// The capture record of an accepted connection's peer, as the maps key it.
pub fn conn_tuple(netns_cookie: u64, peer: SocketAddr) -> ConnTuple {
    let (addr, family) = maps::addr_words(peer.ip());
    ConnTuple { netns_cookie, addr, port: peer.port(), family, _pad: 0 }
}

/// Indexes of `CAPTURE_COUNTERS` with their metric label.
pub const COUNTER_NAMES: [(u32, &str); counter::COUNT as usize] = [
    (counter::CAPTURED, "captured"),
    (counter::REFUSED_NOT_READY, "refused_not_ready"),
    (counter::REFUSED_MAP_FULL, "refused_map_full"),
    (counter::TUPLE_MAP_FULL, "tuple_map_full"),
    (counter::INBOUND_STEERED, "inbound_steered"),
    (counter::INBOUND_NO_LISTENER, "inbound_no_listener"),
    (counter::INBOUND_UNKNOWN_ADDR, "inbound_unknown_address"),
    (counter::EXCLUDED, "excluded"),
    (counter::DELIVERY_MAP_FULL, "delivery_map_full"),
    (counter::SELF_CALL, "self_call"),
    (counter::SOCKET_QUOTA, "socket_quota"),
    (counter::FOREIGN_SOCKET, "foreign_socket"),
    (counter::UNENROLLED_IN_GUARD, "unenrolled_in_guard"),
    (counter::SOCKET_MAP_FULL, "socket_map_full"),
    (counter::REFUSED_PROTOCOL, "refused_protocol"),
];
