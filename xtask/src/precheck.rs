//! `ztunnel precheck` from xtask, as root, right after the build that makes
//! it (it loads the programs that build embeds).
//!
//! * `cargo xtask setup` prints every line, for a node with the default
//!   configuration, and goes on whatever they say: setup's job is the build
//!   toolchain, which a kernel or a limit does not change, and the lines are
//!   there to be read before installing on a node.
//! * `demo`, `test` and `bench` check for what the testbed's tunnels need and
//!   print one line when the machine can run them; when it cannot, they print
//!   the failures and stop, rather than fail later in a way that says less.

use std::process::Output;

use anyhow::{Context as _, bail};

use crate::{Profile, built, root, target_dir};

/// What the testbed's tunnels need: pins in a directory of their own, and a
/// few thousand connections at most (the benchmark's many short ones are
/// never open at once), not a production node's 65536.
const TESTBED_CONFIG: &str = "\
# Written by cargo xtask: what the testbed's tunnels need, for `ztunnel precheck`.
node:
  name: testbed
capture:
  bpf_pin_dir: /sys/fs/bpf/ztb-precheck
  max_connections: 4096
";

pub fn on_this_machine(profile: Profile) -> anyhow::Result<()> {
    let out = match run(profile, &[]) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("xtask: precheck did not run ({e:#}); setup is complete");
            return Ok(());
        }
    };
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        eprintln!(
            "xtask: precheck: the FAIL lines above are what a node running the tunnel with the default \
             configuration lacks; setup is complete (`ztunnel precheck --config <file>` checks a node's own)"
        );
    }
    Ok(())
}

pub fn for_the_testbed(profile: Profile) -> anyhow::Result<()> {
    let config = target_dir()?.join("xtask").join("precheck-testbed.yaml");
    if let Some(dir) = config.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }
    std::fs::write(&config, TESTBED_CONFIG).with_context(|| format!("write {}", config.display()))?;
    let out = run(profile, &["--config".as_ref(), config.as_os_str()])?;
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        if let Some(summary) = text.lines().last() {
            eprintln!("xtask: {summary}");
        }
        return Ok(());
    }
    for line in text.lines().filter(|l| !l.starts_with("pass")) {
        eprintln!("{line}");
    }
    bail!("this machine cannot run the testbed's tunnels: fix what the lines above say, then run this again")
}

fn run(profile: Profile, args: &[&std::ffi::OsStr]) -> anyhow::Result<Output> {
    let ztunnel = built(profile, "ztunnel")?;
    let mut cmd = root::command(&ztunnel);
    cmd.arg("precheck").args(args);
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    // 0: can run, 1: cannot; anything else is precheck's own failure.
    if !matches!(out.status.code(), Some(0 | 1)) {
        bail!(
            "{} precheck failed ({}): {}",
            ztunnel.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}
