//! `cargo xtask kind-demo`: ztunnel in a two-node kind cluster, on a machine
//! with docker (a running engine), kind and kubectl.
//!
//! Creates the cluster (deploy/kind/cluster.yaml), builds the image
//! (deploy/Dockerfile) and loads it into the nodes, makes the CA's Secret
//! with `ztunnel ca init --kubernetes-secret`, applies
//! deploy/kubernetes/overlays/kind and waits for the rollout, applies the
//! samples, then calls between them and prints, from the ztunnel pods' JSON
//! access log lines, who called whom under which identities, a call that
//! policy denies, and a strict -> permissive rollback by one namespace label.
//! It fails if anything it expects did not happen.
//!
//! Without a docker engine, kind or kubectl it says so in one line and fails
//! before doing anything. The cluster is left running to look around; the
//! last line says how to delete it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::status;

/// The image the kind overlay runs (imagePullPolicy: Never).
const IMAGE: &str = "ztunnel:dev";
const SYSTEM_NAMESPACE: &str = "ztunnel-system";
const TRUST_DOMAIN: &str = "cluster.local";
/// The namespace label that switches a namespace's mTLS mode (strict or
/// permissive) at run time.
const MTLS_LABEL: &str = "ztunnel.dev/mtls";
/// How long one call may take to behave as expected: the first calls wait
/// for certificates and for policies to reach the tunnels.
const SETTLE: Duration = Duration::from_secs(90);

pub struct Options {
    /// The kind cluster's name; kubectl talks to context `kind-<name>` only.
    pub name: String,
}

/// What is missing on this machine for the demo, in one line; None when
/// docker (with a running engine), kind and kubectl are all there.
pub fn missing_tools() -> Option<String> {
    let mut missing = Vec::new();
    match Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            missing.push("docker: not found on PATH".to_owned())
        }
        Err(e) => missing.push(format!("docker: cannot run it ({e})")),
        Ok(o) if !o.status.success() => missing.push(format!(
            "docker: no running engine (`docker info`: {})",
            first_line(&o.stderr).unwrap_or("failed")
        )),
        Ok(_) => {}
    }
    for (tool, args) in [("kind", &["version"][..]), ("kubectl", &["version", "--client"][..])] {
        match Command::new(tool).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(format!("{tool}: not found on PATH"))
            }
            Err(e) => missing.push(format!("{tool}: cannot run it ({e})")),
            Ok(s) if !s.success() => {
                missing.push(format!("{tool}: `{tool} {}` failed ({s})", args.join(" ")))
            }
            Ok(_) => {}
        }
    }
    (!missing.is_empty()).then(|| {
        format!("kind-demo needs docker with a running engine, kind and kubectl: {}", missing.join("; "))
    })
}

fn first_line(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()?.lines().map(str::trim).find(|l| !l.is_empty())
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if let Some(missing) = missing_tools() {
        bail!("{missing}");
    }
    let repo = repo_root();
    let cluster = Cluster { name: opts.name.clone(), context: format!("kind-{}", opts.name) };
    cluster.create(&repo)?;
    cluster.mount_bpffs_on_nodes()?;

    eprintln!("kind-demo: building {IMAGE} from deploy/Dockerfile (the first build takes a while)");
    status(
        Command::new("docker")
            .args(["build", "-f", "deploy/Dockerfile", "-t", IMAGE, "."])
            .current_dir(&repo),
    )?;
    status(Command::new("kind").args(["load", "docker-image", IMAGE, "--name", &cluster.name]))?;

    cluster.kubectl_status(&["apply", "-f", "deploy/kubernetes/base/namespace.yaml"], &repo)?;
    cluster.ca_secret(&repo)?;
    cluster.kubectl_status(&["apply", "-k", "deploy/kubernetes/overlays/kind"], &repo)?;
    for what in ["deployment/ztunnel-ca", "daemonset/ztunnel"] {
        cluster
            .kubectl_status(&["rollout", "status", "-n", SYSTEM_NAMESPACE, what, "--timeout=300s"], &repo)?;
    }
    if !cluster.kubectl(&["get", "crd", "authorizationpolicies.security.ztunnel.dev"])?.status.success() {
        bail!(
            "the AuthorizationPolicy CRD is not in the cluster: deploy/kubernetes/base/crd-authorizationpolicies.yaml \
             is not part of the base yet (see the TODO in deploy/kubernetes/base/kustomization.yaml)"
        );
    }
    cluster.kubectl_status(&["apply", "-k", "deploy/kubernetes/samples"], &repo)?;
    for (ns, what) in [("shop", "deployment/web"), ("shop", "deployment/db"), ("legacy", "deployment/client")]
    {
        cluster.kubectl_status(&["rollout", "status", "-n", ns, what, "--timeout=300s"], &repo)?;
    }

    cluster.print_layout()?;
    let failures = cluster.calls()?;
    println!("\nthe cluster stays up: kubectl --context {} ...", cluster.context);
    println!("delete it with: kind delete cluster --name {}", cluster.name);
    if failures.is_empty() {
        println!("kind-demo: every call behaved as expected");
        Ok(())
    } else {
        bail!("kind-demo: {} unexpected:\n  {}", failures.len(), failures.join("\n  "))
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// One call of the demo and what it must produce.
struct Call {
    what: &'static str,
    /// Namespace and Deployment of the caller (its container has curl).
    from: (&'static str, &'static str),
    url: &'static str,
    /// Whether curl gets an answer.
    answered: bool,
    /// The caller's identity when its namespace is enrolled: its tunnel logs
    /// an outbound HBONE line under it, and the callee's tunnel sees it.
    caller: Option<&'static str>,
    /// The callee's tunnel's inbound line: mode and reason.
    inbound: (&'static str, &'static str),
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn web_to_db() -> Call {
    Call {
        what: "shop/web -> shop/db:8080 (db-callers allows web)",
        from: ("shop", "web"),
        url: "http://db.shop.svc.cluster.local:8080/hostname",
        answered: true,
        caller: Some(WEB),
        inbound: ("hbone", "ok"),
    }
}

fn legacy_to_web(answered: bool) -> Call {
    Call {
        what: if answered {
            "legacy/client -> shop/web:8080, plaintext, shop permissive"
        } else {
            "legacy/client -> shop/web:8080, plaintext, shop strict"
        },
        from: ("legacy", "client"),
        url: "http://web.shop.svc.cluster.local:8080/hostname",
        answered,
        caller: None,
        inbound: if answered { ("plaintext", "ok") } else { ("plaintext", "plaintext_refused") },
    }
}

struct Cluster {
    name: String,
    context: String,
}

impl Cluster {
    fn create(&self, repo: &Path) -> anyhow::Result<()> {
        let out = Command::new("kind").args(["get", "clusters"]).output().context("kind get clusters")?;
        if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == self.name) {
            eprintln!("kind-demo: using the existing kind cluster {}", self.name);
            return Ok(());
        }
        status(
            Command::new("kind")
                .args(["create", "cluster", "--name", &self.name, "--config", "deploy/kind/cluster.yaml"])
                .args(["--wait", "180s"])
                .current_dir(repo),
        )
    }

    /// kind nodes are containers whose systemd leaves /sys/fs/bpf unmounted;
    /// on a real node systemd mounts it at boot. The node agent needs the
    /// node's bpffs there (its pins outlive the agent).
    fn mount_bpffs_on_nodes(&self) -> anyhow::Result<()> {
        let out = Command::new("kind").args(["get", "nodes", "--name", &self.name]).output()?;
        for node in String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|l| !l.is_empty()) {
            status(Command::new("docker").args([
                "exec",
                node,
                "sh",
                "-c",
                "grep -q ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf",
            ]))?;
        }
        Ok(())
    }

    fn kubectl(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new("kubectl")
            .arg("--context")
            .arg(&self.context)
            .args(args)
            .output()
            .with_context(|| format!("kubectl {}", args.join(" ")))
    }

    fn kubectl_status(&self, args: &[&str], dir: &Path) -> anyhow::Result<()> {
        status(Command::new("kubectl").arg("--context").arg(&self.context).args(args).current_dir(dir))
    }

    fn kubectl_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = self.kubectl(args)?;
        if !out.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        serde_json::from_slice(&out.stdout).context("kubectl printed no JSON")
    }

    /// The CA's Secret (Istio's cacerts layout), made once per cluster. The
    /// root key stays on this machine under target/kind-demo/<cluster>/ca.
    fn ca_secret(&self, repo: &Path) -> anyhow::Result<()> {
        if self.kubectl(&["get", "secret", "-n", SYSTEM_NAMESPACE, "ztunnel-ca"])?.status.success() {
            eprintln!("kind-demo: the CA Secret exists, keeping it");
            return Ok(());
        }
        let dir = repo.join("target").join("kind-demo").join(&self.name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let volume = format!("{}:/out", dir.display());
        let user = format!("{}:{}", nix::unistd::getuid(), nix::unistd::getgid());
        status(Command::new("docker").args(["run", "--rm", "--user", &user, "-v", &volume, IMAGE]).args([
            "ca",
            "init",
            "--dir",
            "/out/ca",
            "--trust-domain",
            TRUST_DOMAIN,
            "--kubernetes-secret",
            "/out/ztunnel-ca-secret.yaml",
        ]))?;
        let secret = dir.join("ztunnel-ca-secret.yaml");
        self.kubectl_status(&["apply", "-f", &secret.to_string_lossy()], repo)?;
        println!(
            "CA made for trust domain {TRUST_DOMAIN}; its root key stays in {}",
            dir.join("ca").display()
        );
        Ok(())
    }

    fn print_layout(&self) -> anyhow::Result<()> {
        let pods = self.kubectl_json(&["get", "pods", "-A", "-o", "json"])?;
        println!("\nkind cluster {}", self.name);
        for pod in pods["items"].as_array().into_iter().flatten() {
            let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
            if ![SYSTEM_NAMESPACE, "shop", "legacy"].contains(&ns) {
                continue;
            }
            let sa = pod["spec"]["serviceAccountName"].as_str().unwrap_or("default");
            let identity = if ns == "shop" {
                format!("as spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
            } else {
                "not enrolled".to_owned()
            };
            println!(
                "  {ns}/{} on {} at {} {identity}",
                pod["metadata"]["name"].as_str().unwrap_or("?"),
                pod["spec"]["nodeName"].as_str().unwrap_or("?"),
                pod["status"]["podIP"].as_str().unwrap_or("?"),
            );
        }
        println!(
            "namespace shop: ztunnel.dev/dataplane=enabled, {MTLS_LABEL}=strict; policy db-callers lets only web call db:8080\n"
        );
        Ok(())
    }

    fn calls(&self) -> anyhow::Result<Vec<String>> {
        let mut failures = Vec::new();
        let mut n = 0;
        let mut step = |call: &Call, failures: &mut Vec<String>| -> anyhow::Result<()> {
            n += 1;
            if let Err(why) = self.call(n, call)? {
                failures.push(format!("[{n}] {}: {why}", call.what));
            }
            Ok(())
        };
        step(&web_to_db(), &mut failures)?;
        step(
            &Call {
                what: "shop/web -> shop/db:9376, db's admin port: no policy allows it",
                from: ("shop", "web"),
                url: "http://db.shop.svc.cluster.local:9376/",
                answered: false,
                caller: Some(WEB),
                inbound: ("hbone", "no_allow_matched"),
            },
            &mut failures,
        )?;
        step(&legacy_to_web(false), &mut failures)?;

        println!("rollback: one label on one namespace, nothing restarts");
        println!("  kubectl label namespace shop {MTLS_LABEL}=permissive --overwrite\n");
        self.label_shop("permissive")?;
        step(&legacy_to_web(true), &mut failures)?;
        step(
            &Call {
                what: "legacy/client -> shop/db:8080, plaintext, shop permissive: policy still wants web's identity",
                from: ("legacy", "client"),
                url: "http://db.shop.svc.cluster.local:8080/hostname",
                answered: false,
                caller: None,
                inbound: ("plaintext", "no_allow_matched"),
            },
            &mut failures,
        )?;
        step(&web_to_db(), &mut failures)?;

        println!("back to strict:");
        println!("  kubectl label namespace shop {MTLS_LABEL}=strict --overwrite\n");
        self.label_shop("strict")?;
        step(&legacy_to_web(false), &mut failures)?;
        Ok(failures)
    }

    fn label_shop(&self, mode: &str) -> anyhow::Result<()> {
        let label = format!("{MTLS_LABEL}={mode}");
        let out = self.kubectl(&["label", "namespace", "shop", &label, "--overwrite"])?;
        if !out.status.success() {
            bail!("kubectl label namespace shop {label}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Calls until the call behaves as expected or SETTLE passes, then
    /// prints the last attempt with the access log lines it produced.
    /// Ok(Err(why)) is a call that did not behave.
    fn call(&self, n: usize, call: &Call) -> anyhow::Result<Result<(), String>> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let tunnels = self.tunnel_pods()?;
            let before: Vec<usize> =
                tunnels.iter().map(|t| self.access_log(t).map(|l| l.len())).collect::<Result<_, _>>()?;
            let body = self.curl(call)?;
            let new_lines = || -> anyhow::Result<Vec<(String, Value)>> {
                let mut lines = Vec::new();
                for (t, seen) in tunnels.iter().zip(&before) {
                    lines.extend(self.access_log(t)?.into_iter().skip(*seen).map(|l| (t.node.clone(), l)));
                }
                Ok(lines)
            };
            // Lines are written when a connection ends: give them a moment.
            let lines_deadline = Instant::now() + Duration::from_secs(10);
            let mut lines = new_lines()?;
            while expectation_unmet(call, body.is_some(), &lines).is_some() && Instant::now() < lines_deadline
            {
                std::thread::sleep(Duration::from_millis(500));
                lines = new_lines()?;
            }
            let unmet = expectation_unmet(call, body.is_some(), &lines);
            if unmet.is_none() || Instant::now() > deadline {
                println!(
                    "[{n}] {}\n    curl {} -> {}",
                    call.what,
                    call.url,
                    body.as_deref().unwrap_or("no answer (connection reset)")
                );
                for (node, line) in &lines {
                    println!("    {node} {}", crate::demo::summarize(line));
                }
                if call.caller.is_none() && unmet.is_none() {
                    println!("    not captured on its way out: the caller's namespace is not enrolled");
                }
                println!();
                return Ok(unmet.map_or(Ok(()), Err));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    fn curl(&self, call: &Call) -> anyhow::Result<Option<String>> {
        let (ns, deployment) = call.from;
        let target = format!("deploy/{deployment}");
        let out = self.kubectl(&[
            "exec",
            "-n",
            ns,
            &target,
            "-c",
            deployment,
            "--",
            "curl",
            "-sS",
            "--max-time",
            "5",
            call.url,
        ])?;
        Ok(out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    }

    fn tunnel_pods(&self) -> anyhow::Result<Vec<TunnelPod>> {
        let pods = self.kubectl_json(&[
            "get",
            "pods",
            "-n",
            SYSTEM_NAMESPACE,
            "-l",
            "app.kubernetes.io/name=ztunnel",
            "-o",
            "json",
        ])?;
        Ok(pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| TunnelPod {
                name: p["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
                node: p["spec"]["nodeName"].as_str().unwrap_or_default().to_owned(),
            })
            .collect())
    }

    /// The JSON access log lines a tunnel pod wrote (stdout; its own log
    /// goes to stderr and is not JSON with a `direction`).
    fn access_log(&self, pod: &TunnelPod) -> anyhow::Result<Vec<Value>> {
        let out = self.kubectl(&["logs", "-n", SYSTEM_NAMESPACE, &pod.name, "-c", "ztunnel"])?;
        if !out.status.success() {
            bail!("kubectl logs {}: {}", pod.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["direction"].is_string())
            .collect())
    }
}

struct TunnelPod {
    name: String,
    node: String,
}

/// Why `lines` (the access log lines since the call) and the call's outcome
/// do not match what `call` expects; None when they do.
fn expectation_unmet(call: &Call, answered: bool, lines: &[(String, Value)]) -> Option<String> {
    if answered != call.answered {
        return Some(if call.answered { "the call failed".into() } else { "the call got through".into() });
    }
    let port = call.url.rsplit(':').next().and_then(|p| p.split('/').next()).unwrap_or_default();
    let (mode, reason) = call.inbound;
    let inbound = lines.iter().any(|(_, l)| {
        l["direction"] == "inbound"
            && l["mode"] == mode
            && l["reason"] == reason
            && l["destination_address"].as_str().is_some_and(|a| a.ends_with(&format!(":{port}")))
            && call.caller.is_none_or(|id| l["source_identity"] == id)
    });
    if !inbound {
        return Some(format!("no inbound {mode} line with reason {reason} for port {port}"));
    }
    let outbound = lines.iter().any(|(_, l)| l["direction"] == "outbound");
    match call.caller {
        Some(id)
            if !lines.iter().any(|(_, l)| {
                l["direction"] == "outbound" && l["mode"] == "hbone" && l["source_identity"] == id
            }) =>
        {
            Some(format!("no outbound hbone line from {id}"))
        }
        None if outbound => {
            Some("captured on its way out, but the caller's namespace is not enrolled".into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn line(v: Value) -> (String, Value) {
        ("kind-worker".to_owned(), v)
    }

    #[test]
    fn a_denied_call_needs_the_callees_line_with_its_reason() {
        let call = Call {
            what: "web -> db admin",
            from: ("shop", "web"),
            url: "http://db.shop.svc.cluster.local:9376/",
            answered: false,
            caller: Some(WEB),
            inbound: ("hbone", "no_allow_matched"),
        };
        let out = line(json!({"direction": "outbound", "mode": "hbone", "source_identity": WEB}));
        let denied = line(json!({
            "direction": "inbound", "mode": "hbone", "reason": "no_allow_matched",
            "source_identity": WEB, "destination_address": "10.244.1.7:9376",
        }));
        assert_eq!(expectation_unmet(&call, false, &[out.clone(), denied.clone()]), None);
        assert_eq!(
            expectation_unmet(&call, true, &[out.clone(), denied]).as_deref(),
            Some("the call got through")
        );
        assert!(expectation_unmet(&call, false, &[out]).is_some_and(|w| w.contains("no inbound hbone line")));
    }

    #[test]
    fn a_plaintext_caller_must_not_be_captured() {
        let call = legacy_to_web(true);
        let inbound = line(json!({
            "direction": "inbound", "mode": "plaintext", "reason": "ok", "destination_address": "10.244.0.5:8080",
        }));
        assert_eq!(expectation_unmet(&call, true, std::slice::from_ref(&inbound)), None);
        let captured = line(json!({"direction": "outbound", "mode": "passthrough"}));
        assert!(
            expectation_unmet(&call, true, &[inbound, captured]).is_some_and(|w| w.contains("not enrolled"))
        );
    }
}
