//! The testbed: simulated nodes, pods and plain-host workloads on one machine,
//! shared by ztunnel's integration tests, its demo and its benchmark.
//!
//! ```text
//!                 fabric netns (bridge br0, no route anywhere else)
//!          198.18.0.1 |                         | 198.18.0.2
//!     node n1 netns (router)               node n2 netns (router)
//!       |p1       |p2                         |p1
//!   pod netns  pod netns                   pod netns
//!   198.19.1.11 198.19.1.12                198.19.2.11
//! ```
//!
//! * A node is a network namespace on the fabric bridge with a cgroup subtree
//!   (the tunnel's `capture.cgroup_root`); a pod is a network namespace routed
//!   through its node plus a cgroup in the node's subtree; a plain-host workload
//!   is a cgroup in the node's subtree, in the node's namespace.
//! * Every address is from the benchmark range 198.18.0.0/15 or the ULA prefix
//!   fd7a:7e57:7e57::/48 and exists only inside the testbed's namespaces, which have
//!   no route out of the machine: a capture that fails cannot put a packet on a
//!   real network.
//! * Names are unique per run (`ztb-<tag>-<pid>-<n>`); everything a run makes
//!   (namespaces, veths, cgroups, bpffs pins, processes) is removed when the
//!   `Testbed` is dropped, also on panic, and leftovers of runs whose process
//!   died are swept by the next run.

pub mod agent;
pub mod ca;
mod cgroup;
pub mod http;
pub mod kube;
mod net;
mod sweep;
pub mod tunnel;

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

pub use crate::{net::in_netns, tunnel::Tunnel};

/// The testbed's IPv6 /48 (ULA): nodes on subnet 0, node k's pods on subnet k.
pub const ULA: &str = "fd7a:7e57:7e57";

/// Prefix of every name the testbed creates.
pub const PREFIX: &str = "ztb";

static RUNS: AtomicU32 = AtomicU32::new(0);

/// Where a process runs: a cgroup, and a network namespace (none: the node's).
#[derive(Debug, Clone)]
pub struct Place {
    pub cgroup: PathBuf,
    /// Name under /var/run/netns.
    pub netns: String,
}

/// A simulated node.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub index: u8,
    pub netns: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The node's cgroup subtree: the tunnel's capture root.
    pub cgroup: PathBuf,
    /// The cgroup of the tunnel serving this node (outside the subtree).
    pub tunnel_cgroup: PathBuf,
}

impl Node {
    /// A place on the node that is inside the capture root but not enrolled.
    pub fn unenrolled(&self) -> Place {
        Place { cgroup: self.cgroup.join("unenrolled"), netns: self.netns.clone() }
    }
}

/// A simulated workload.
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub cgroup: PathBuf,
    /// The pod's own namespace; None for a plain-host workload.
    pub pod_netns: Option<String>,
    /// The namespace the workload's processes run in.
    pub netns: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl Workload {
    pub fn place(&self) -> Place {
        Place { cgroup: self.cgroup.clone(), netns: self.netns.clone() }
    }

    /// The workload's SPIFFE ID under the default trust domain.
    pub fn identity(&self) -> String {
        format!("spiffe://cluster.local/ns/{}/sa/{}", self.namespace, self.service_account)
    }

    /// `namespace/name`, as ztunnel logs it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn addr4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip4), port)
    }

    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6), port)
    }

    /// A child cgroup of the workload (a pod's container).
    pub fn child(&self, name: &str) -> anyhow::Result<Place> {
        let cgroup = self.cgroup.join(name);
        std::fs::create_dir_all(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
        Ok(Place { cgroup, netns: self.netns.clone() })
    }
}

/// One testbed run.
pub struct Testbed {
    pub id: String,
    fabric: String,
    pub nodes: Vec<Node>,
    pub workloads: Vec<Workload>,
    /// `<cgroup2 mount>/<id>`: every cgroup of the run is below it.
    pub cgroup_base: PathBuf,
    /// `/sys/fs/bpf/<id>`: every tunnel's pins are below it.
    pub pin_base: PathBuf,
    dir: tempfile::TempDir,
    netns: Vec<String>,
}

impl Testbed {
    /// Builds an empty testbed (a fabric, no nodes). `tag` names the test:
    /// up to 8 lowercase letters and digits.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        if tag.is_empty()
            || tag.len() > 8
            || !tag.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            bail!("testbed tag `{tag}` must be 1-8 lowercase letters or digits");
        }
        if !nix::unistd::geteuid().is_root() {
            bail!("the testbed needs root (network namespaces, cgroups, eBPF)");
        }
        sweep::stale_runs();
        let id = format!("{PREFIX}-{tag}-{}-{}", std::process::id(), RUNS.fetch_add(1, Ordering::Relaxed));
        let cgroup_base = cgroup::mount()?.join(&id);
        std::fs::create_dir_all(&cgroup_base).with_context(|| format!("mkdir {}", cgroup_base.display()))?;
        let dir = tempfile::Builder::new().prefix(&format!("{id}-")).tempdir()?;
        let mut tb = Self {
            fabric: format!("{id}-fab"),
            pin_base: PathBuf::from("/sys/fs/bpf").join(&id),
            id,
            nodes: Vec::new(),
            workloads: Vec::new(),
            cgroup_base,
            dir,
            netns: Vec::new(),
        };
        let fabric = tb.fabric.clone();
        tb.add_netns(&fabric)?;
        net::ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
        net::ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
        Ok(tb)
    }

    /// A directory for the run's files (configurations, logs), removed with it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The run's CA (`ztunnel ca init`, trust domain cluster.local), made on
    /// first use; every tunnel's embedded CA signs from it by default, so the
    /// testbed's nodes trust each other.
    pub fn ca_dir(&self) -> PathBuf {
        let dir = self.dir.path().join("ca");
        if !dir.join("active").exists() {
            let out = Command::new(bins::ztunnel().unwrap_or_else(|_| PathBuf::from("ztunnel")))
                .args(["ca", "init", "--trust-domain", "cluster.local", "--dir"])
                .arg(&dir)
                .output();
            if let Ok(o) = out
                && !o.status.success()
            {
                eprintln!("ztunnel ca init: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
        dir
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        net::ip(&["netns", "add", name])?;
        self.netns.push(name.to_owned());
        // No duplicate address detection: every address is unique by
        // construction, and tentative link-local addresses would delay the
        // first IPv6 connections by a second or more.
        net::sysctl(name, &["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])?;
        net::ip(&["-n", name, "link", "set", "lo", "up"])
    }

    /// Adds a node on the fabric, routed to every other node's pods.
    pub fn add_node(&mut self, name: &str) -> anyhow::Result<Node> {
        let index = u8::try_from(self.nodes.len() + 1).ok().filter(|i| *i < 250).context("too many nodes")?;
        let node = Node {
            name: name.to_owned(),
            index,
            netns: format!("{}-{name}", self.id),
            ip4: Ipv4Addr::new(198, 18, 0, index),
            ip6: format!("{ULA}::{index:x}").parse()?,
            cgroup: self.cgroup_base.join(name),
            tunnel_cgroup: self.cgroup_base.join(format!("tunnel-{name}")),
        };
        std::fs::create_dir_all(node.cgroup.join("unenrolled"))?;
        let ns = node.netns.clone();
        self.add_netns(&ns)?;
        let fabric_end = format!("n{index}");
        net::ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            &fabric_end,
            "netns",
            &self.fabric,
        ])?;
        net::ip(&["-n", &self.fabric, "link", "set", &fabric_end, "master", "br0", "up"])?;
        net::ip(&["-n", &ns, "addr", "add", &format!("{}/24", node.ip4), "dev", "eth0"])?;
        net::ip(&["-n", &ns, "addr", "add", &format!("{}/64", node.ip6), "dev", "eth0", "nodad"])?;
        net::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        net::sysctl(&ns, &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        for other in &self.nodes {
            route_between(&node, other)?;
            route_between(other, &node)?;
        }
        self.nodes.push(node.clone());
        Ok(node)
    }

    /// Adds a pod in the `default` namespace (own network namespace and
    /// address, routed via its node).
    pub fn add_pod(&mut self, node: &Node, name: &str) -> anyhow::Result<Workload> {
        self.add_pod_in(node, "default", name)
    }

    /// Adds a pod in Kubernetes namespace `namespace` (service account: its
    /// name). Pod names are unique per node, whatever their namespace.
    pub fn add_pod_in(&mut self, node: &Node, namespace: &str, name: &str) -> anyhow::Result<Workload> {
        if self.workloads.iter().any(|w| w.node == node.name && w.name == name) {
            bail!("node {} already has a workload named {name}", node.name);
        }
        let on_node = self.workloads.iter().filter(|w| w.node == node.name && w.pod_netns.is_some()).count();
        let host =
            u8::try_from(11 + on_node).ok().filter(|h| *h < 250).context("too many pods on the node")?;
        let k = node.index;
        let netns = format!("{}-{}-{name}", self.id, node.name);
        let w = Workload {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: name.to_owned(),
            node: node.name.clone(),
            cgroup: node.cgroup.join(name),
            pod_netns: Some(netns.clone()),
            netns: netns.clone(),
            ip4: Ipv4Addr::new(198, 19, k, host),
            ip6: format!("{ULA}:{k:x}::{host:x}").parse()?,
        };
        std::fs::create_dir_all(&w.cgroup)?;
        self.add_netns(&netns)?;
        let node_end = format!("p{}", on_node + 1);
        let gw4 = format!("198.19.{k}.1");
        let gw6 = format!("{ULA}:{k:x}::1");
        net::ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &netns,
            "type",
            "veth",
            "peer",
            "name",
            &node_end,
            "netns",
            &node.netns,
        ])?;
        net::ip(&["-n", &netns, "addr", "add", &format!("{}/32", w.ip4), "dev", "eth0"])?;
        net::ip(&["-n", &netns, "addr", "add", &format!("{}/128", w.ip6), "dev", "eth0", "nodad"])?;
        net::ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        net::ip(&["-n", &netns, "route", "add", &gw4, "dev", "eth0", "scope", "link"])?;
        net::ip(&["-n", &netns, "route", "add", "198.18.0.0/15", "via", &gw4, "dev", "eth0"])?;
        net::ip(&["-n", &netns, "-6", "route", "add", &gw6, "dev", "eth0"])?;
        net::ip(&["-n", &netns, "-6", "route", "add", &format!("{ULA}::/48"), "via", &gw6, "dev", "eth0"])?;
        net::ip(&["-n", &node.netns, "addr", "add", &format!("{gw4}/32"), "dev", &node_end])?;
        net::ip(&["-n", &node.netns, "addr", "add", &format!("{gw6}/128"), "dev", &node_end, "nodad"])?;
        net::ip(&["-n", &node.netns, "link", "set", &node_end, "up"])?;
        net::ip(&["-n", &node.netns, "route", "add", &format!("{}/32", w.ip4), "dev", &node_end])?;
        net::ip(&["-n", &node.netns, "-6", "route", "add", &format!("{}/128", w.ip6), "dev", &node_end])?;
        self.workloads.push(w.clone());
        Ok(w)
    }

    /// Adds a plain-host workload: a cgroup on the node, in the node's
    /// namespace, reached at the node's addresses.
    pub fn add_host_workload(&mut self, node: &Node, name: &str) -> anyhow::Result<Workload> {
        let w = Workload {
            name: name.to_owned(),
            namespace: "default".into(),
            service_account: name.to_owned(),
            node: node.name.clone(),
            cgroup: node.cgroup.join(name),
            pod_netns: None,
            netns: node.netns.clone(),
            ip4: node.ip4,
            ip6: node.ip6,
        };
        std::fs::create_dir_all(&w.cgroup)?;
        self.workloads.push(w.clone());
        Ok(w)
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// A command that runs in `place`: it joins the cgroup, then the network
    /// namespace, between fork and exec, so that every socket it opens is
    /// the workload's.
    pub fn command(&self, place: &Place, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let procs = File::options()
            .write(true)
            .open(place.cgroup.join("cgroup.procs"))
            .with_context(|| format!("open {}/cgroup.procs", place.cgroup.display()))?;
        let netns = File::open(net::netns_path(&place.netns))
            .with_context(|| format!("open netns {}", place.netns))?;
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the child between fork and exec and only
        // makes async-signal-safe system calls on fds opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let mut buf = [0u8; 12];
                let pid = itoa(libc::getpid() as u32, &mut buf);
                if libc::write(procs.as_raw_fd(), pid.as_ptr().cast(), pid.len()) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// `tb-agent` in `place`.
    pub fn agent(&self, place: &Place) -> anyhow::Result<Command> {
        self.command(place, bins::agent()?)
    }

    /// The node tunnel's configuration: the node, and the workloads of the
    /// whole testbed, of which `enrolled` (on this node) are captured. Tests
    /// edit the returned JSON before starting the tunnel.
    pub fn tunnel_config(&self, node: &Node, enrolled: &[&Workload]) -> serde_json::Value {
        tunnel::config(self, node, enrolled)
    }

    /// Starts `ztunnel run` for `node` with `config` and waits until it is ready.
    pub fn start_tunnel(&self, node: &Node, config: serde_json::Value) -> anyhow::Result<Tunnel> {
        Tunnel::start(self, node, config)
    }

    fn teardown(&mut self) {
        cgroup::kill_all(&self.cgroup_base);
        if self.pin_base.exists() {
            let _ = std::fs::remove_dir_all(&self.pin_base);
        }
        for ns in self.netns.drain(..).rev() {
            let _ = net::ip(&["netns", "del", &ns]);
        }
        cgroup::remove_tree(&self.cgroup_base);
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Routes `from`'s node to `to`'s pods.
fn route_between(from: &Node, to: &Node) -> anyhow::Result<()> {
    net::ip(&[
        "-n",
        &from.netns,
        "route",
        "add",
        &format!("198.19.{}.0/24", to.index),
        "via",
        &to.ip4.to_string(),
    ])?;
    net::ip(&[
        "-n",
        &from.netns,
        "-6",
        "route",
        "add",
        &format!("{ULA}:{:x}::/64", to.index),
        "via",
        &to.ip6.to_string(),
    ])
}

/// Formats `n` in decimal without allocating (usable after fork).
fn itoa(mut n: u32, buf: &mut [u8; 12]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Where the binaries under test are.
pub mod bins {
    use std::path::PathBuf;

    use anyhow::Context as _;

    /// `$ZTUNNEL_BIN`, or `ztunnel` next to the running test binary's
    /// `deps/` directory (cargo's layout), or next to the running binary.
    pub fn ztunnel() -> anyhow::Result<PathBuf> {
        find("ZTUNNEL_BIN", "ztunnel")
    }

    pub fn agent() -> anyhow::Result<PathBuf> {
        find("TB_AGENT_BIN", "tb-agent")
    }

    fn find(var: &str, name: &str) -> anyhow::Result<PathBuf> {
        if let Some(p) = std::env::var_os(var) {
            return Ok(PathBuf::from(p));
        }
        let exe = std::env::current_exe().context("current_exe")?;
        let mut dir = exe.parent().context("binary has no directory")?.to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let candidate = dir.join(name);
        anyhow::ensure!(
            candidate.exists(),
            "{} not found; build it first (`cargo xtask test` does), or set {var}",
            candidate.display()
        );
        Ok(candidate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn itoa_formats_pids() {
        let mut b = [0u8; 12];
        assert_eq!(itoa(0, &mut b), b"0");
        assert_eq!(itoa(4_194_304, &mut b), b"4194304");
    }
}
