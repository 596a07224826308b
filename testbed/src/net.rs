//! iproute2 and sysctl inside the testbed's namespaces.

use std::process::Command;

use anyhow::{Context as _, bail};

pub fn netns_path(name: &str) -> String {
    format!("/var/run/netns/{name}")
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args), &format!("ip {}", args.join(" ")))
}

/// Sets sysctls inside a namespace (`/proc/sys/net` is per namespace).
pub fn sysctl(netns: &str, settings: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "sysctl", "-q", "-w"]).args(settings);
    run(&mut cmd, &format!("sysctl {} in {netns}", settings.join(" ")))
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("{what}: cannot run"))?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `f` on a thread inside the namespace `name` (sockets it creates
/// belong there); the caller's thread is untouched.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    let ns = std::fs::File::open(netns_path(name)).with_context(|| format!("open netns {name}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns {name}"))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| bail!("thread in netns {name} panicked"))
    })
}
