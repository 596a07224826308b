//! The production identity path on the testbed: `ztunnel ca serve` on a node,
//! node credentials from `ztunnel ca node-credential`, tunnels that reach
//! the service over mutual TLS.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{Node, Testbed, bins};

pub const CA_PORT: u16 = 15012;

/// A running signing service; killed when dropped.
pub struct CaServer {
    child: Option<Child>,
    node: Node,
    args: Vec<String>,
    pub log_path: PathBuf,
    pub address: SocketAddr,
    cgroup: PathBuf,
}

impl Testbed {
    /// The mesh registry (every workload with its node), for `ca serve`.
    pub fn registry(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir().join("registry.yaml");
        let workloads: Vec<Value> = self
            .workloads
            .iter()
            .map(|w| {
                json!({
                    "name": w.name,
                    "namespace": w.namespace,
                    "service_account": w.service_account,
                    "node": w.node,
                })
            })
            .collect();
        std::fs::write(&path, serde_yaml_ng::to_string(&json!({ "workloads": workloads }))?)?;
        Ok(path)
    }

    /// Starts `ztunnel ca serve` on `node` (outside any workload), with the
    /// testbed's CA and registry; `extra` are more flags.
    pub fn start_ca(&self, node: &Node, extra: &[&str]) -> anyhow::Result<CaServer> {
        let address = SocketAddr::from((node.ip4, CA_PORT));
        let mut args: Vec<String> = vec!["ca".into(), "serve".into(), "--dir".into()];
        args.push(self.ca_dir().display().to_string());
        args.extend(["--registry".into(), self.registry()?.display().to_string()]);
        args.extend(["--listen".into(), address.to_string()]);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let cgroup = self.cgroup_base.join(format!("ca-{}", node.name));
        std::fs::create_dir_all(&cgroup)?;
        let mut ca = CaServer {
            child: None,
            node: node.clone(),
            args,
            log_path: self.dir().join("ca.log"),
            address,
            cgroup,
        };
        ca.spawn(self)?;
        Ok(ca)
    }

    /// A node's credential for the signing service, written by
    /// `ztunnel ca node-credential`.
    pub fn node_credentials(&self, node: &Node) -> anyhow::Result<PathBuf> {
        let out = self.dir().join(format!("node-credentials-{}", node.name));
        let status = Command::new(bins::ztunnel()?)
            .args(["ca", "node-credential", "--node", &node.name, "--dir"])
            .arg(self.ca_dir())
            .arg("--out")
            .arg(&out)
            .output()?;
        if !status.status.success() {
            bail!("ztunnel ca node-credential: {}", String::from_utf8_lossy(&status.stderr));
        }
        Ok(out)
    }

    /// `config` reaching the signing service `ca` with `node`'s credential.
    pub fn use_remote_ca(&self, config: &mut Value, ca: &CaServer, node: &Node) -> anyhow::Result<()> {
        config["identity"]["ca"] = json!({
            "kind": "remote",
            "address": ca.address.to_string(),
            "node_credentials": self.node_credentials(node)?,
        });
        Ok(())
    }
}

impl CaServer {
    fn spawn(&mut self, tb: &Testbed) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path)?;
        let place = crate::Place { cgroup: self.cgroup.clone(), netns: self.node.netns.clone() };
        let child = tb
            .command(&place, bins::ztunnel()?)?
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn ztunnel ca serve")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if std::fs::read_to_string(&self.log_path)
                .unwrap_or_default()
                .contains("CA signing service ready")
            {
                return Ok(());
            }
            if let Some(c) = &mut self.child
                && let Some(status) = c.try_wait()?
            {
                bail!("ztunnel ca serve exited with {status}: {}", std::fs::read_to_string(&self.log_path)?);
            }
            if Instant::now() > deadline {
                bail!("ztunnel ca serve not ready: {}", std::fs::read_to_string(&self.log_path)?);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the service (an outage).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again after an outage.
    pub fn start_again(&mut self, tb: &Testbed) -> anyhow::Result<()> {
        // The log is appended to: count readiness lines from here on.
        let _ = std::fs::write(&self.log_path, "");
        self.spawn(tb)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for CaServer {
    fn drop(&mut self) {
        self.stop();
    }
}
