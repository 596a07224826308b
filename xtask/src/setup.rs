//! `cargo xtask setup`: everything a fresh Debian machine with rustup and
//! sudo (or root) lacks to build and test ztunnel. Each step checks before it
//! acts, so a machine that is already set up passes in well under a second.
//! Only apt-get runs as root; the toolchain steps run as the user, into the
//! user's own rustup and cargo homes.

use std::{
    ffi::OsString,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{root, status};

/// Debian packages the build, tests, demo and benchmark use.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip: the testbed's namespaces, veths and routes"),
    ("bpftool", "tests inspect what is attached to cgroups and namespaces"),
    ("curl", "the demo's clients"),
    ("iperf3", "the benchmark's bulk throughput"),
    ("tshark", "tests read the traffic between nodes"),
    ("procps", "sysctl inside the testbed's namespaces"),
    ("prometheus", "promtool: checks and unit-tests the alert rules in deploy/prometheus"),
    ("systemd", "systemd-analyze verify: checks the units in deploy/systemd"),
    ("python3-venv", "the venv with kubernetes-validate that checks deploy/kubernetes"),
    (
        "iptables",
        "ztunnel precheck reads the node's iptables rules; its tests write some in a scratch namespace",
    ),
    ("nftables", "ztunnel precheck reads the node's nftables rules"),
    ("sudo", "an ordinary user's tasks run what needs root through it; a test runs the demo as such a user"),
    ("git", "a test clones the repository for an ordinary user"),
];

/// bpf-linker release matched to aya 0.14 and the nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs what is missing. `task_needs_root` says why the task will need
/// root later (None: it does not): sudo is asked for once, up front, with that
/// reason and apt-get's, so that no prompt comes after a long build.
pub fn run(task_needs_root: Option<&str>) -> anyhow::Result<()> {
    let missing = missing_packages();
    let mut reasons = Vec::new();
    if !missing.is_empty() {
        reasons.push(format!("apt-get installs {}", missing.join(" ")));
    }
    reasons.extend(task_needs_root.map(str::to_owned));
    if !reasons.is_empty() {
        root::ask(&reasons.join("; "))?;
    }
    debian_packages(&missing)?;
    nightly()?;
    rust_src()?;
    bpf_linker()?;
    crate::deploy_tools::ensure()?;
    Ok(())
}

/// cargo-fuzz release `cargo xtask fuzz` drives (its flags and output).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, pinned: `cargo xtask fuzz` builds and runs the fuzz targets
/// with it. Installed by the fuzz task itself (the demo and the bench never
/// need it).
pub fn cargo_fuzz() -> anyhow::Result<()> {
    let binary = home().join(".cargo/bin/cargo-fuzz");
    if cargo_fuzz_works(&binary) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    status(
        Command::new("cargo")
            .args([
                "install",
                "--quiet",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
                "--force",
            ])
            .env("PATH", path_with_cargo_bin()),
    )?;
    if !cargo_fuzz_works(&binary) {
        bail!("cargo-fuzz was installed but does not run; see the output above");
    }
    Ok(())
}

fn cargo_fuzz_works(binary: &Path) -> bool {
    Command::new(binary).arg("--version").output().is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).trim().ends_with(CARGO_FUZZ_VERSION)
    })
}

pub fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// Where rustup's cargo keeps its binaries and caches: $CARGO_HOME, else
/// ~/.cargo.
fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME").map_or_else(|| home().join(".cargo"), PathBuf::from)
}

/// Refuses to build into a target/ or cargo home that an earlier `sudo cargo`
/// left partly owned by root: the user's build would fail half-way with a
/// permission error.
pub fn check_ownership(target: &Path) -> anyhow::Result<()> {
    if root::is_root() {
        return Ok(());
    }
    let me = nix::unistd::geteuid().as_raw();
    let home = cargo_home();
    let mut places = vec![target.to_owned(), home.join("registry"), home.join("git")];
    for profile in ["debug", "release"] {
        for sub in ["", "build", "deps", ".fingerprint", "incremental"] {
            places.push(target.join(profile).join(sub));
        }
    }
    for place in places {
        if let Ok(meta) = std::fs::metadata(&place)
            && meta.uid() != me
        {
            bail!(
                "{} belongs to uid {}, not to you (an earlier `sudo cargo ...`?): \
                 `sudo chown -R \"$(id -un):\" {}` gives it back, then run this again",
                place.display(),
                meta.uid(),
                place.display()
            );
        }
    }
    Ok(())
}

/// PATH with the cargo bin directory first: bpf-linker lives there and
/// aya-build looks for it on PATH.
pub fn path_with_cargo_bin() -> OsString {
    let bin = cargo_home().join("bin");
    let mut paths = vec![bin];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn debian_packages(missing: &[&str]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    // As root directly; else through sudo (asked for by `run`).
    let apt = || {
        let mut cmd = root::command("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    status(apt().args(["update", "-qq"]))?;
    status(apt().args(["install", "-y", "-qq", "--no-install-recommends"]).args(missing))
}

/// The nightly toolchain builds the eBPF programs (-Z build-std). A machine
/// that has one keeps it: bpf-linker is built against its LLVM, and
/// replacing it would break that match. One without gets the current one.
fn nightly() -> anyhow::Result<()> {
    let present = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("setup: installing the nightly toolchain (the eBPF programs are built with it)");
    status(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("rustup: is it installed, with the nightly toolchain?")?;
    if !out.status.success() {
        bail!(
            "the nightly toolchain is missing (the eBPF programs need it): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn rust_src() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml").exists() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain (-Z build-std=core for the BPF target)");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The nightly's own libLLVM (`libLLVM.so.22.1-rust-1.97.0-nightly`) and its
/// major version.
fn nightly_llvm(sysroot: &Path) -> anyhow::Result<(PathBuf, String)> {
    let lib = sysroot.join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("read {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("libLLVM.so.") {
            let major = version.split('.').next().unwrap_or_default().to_owned();
            if !major.is_empty() && major.bytes().all(|b| b.is_ascii_digit()) {
                return Ok((lib.join(&name), major));
            }
        }
    }
    bail!("no libLLVM.so.<version> in {}", lib.display())
}

/// bpf-linker must be linked against the same LLVM as the nightly that
/// compiles the eBPF crate. Its build only needs `$LLVM_PREFIX/lib/libLLVM.so`,
/// so a prefix of symlinks to the nightly's libLLVM is enough; the prefix
/// stays, as bpf-linker's RUNPATH.
fn bpf_linker() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    let (llvm, major) = nightly_llvm(&sysroot)?;
    let prefix = home().join(".local/share/bpf-linker-llvm");
    let linked = std::fs::read_link(prefix.join("lib/libLLVM.so")).ok();
    let binary = cargo_home().join("bin/bpf-linker");
    if linked.as_deref() == Some(llvm.as_path()) && bpf_linker_works(&binary) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about 2 minutes)", llvm.display());
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    let file_name = llvm.file_name().context("libLLVM has no file name")?;
    for link in [lib.join("libLLVM.so"), lib.join(file_name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link).with_context(|| format!("symlink {}", link.display()))?;
    }
    status(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--quiet",
            ])
            .args(["--no-default-features", "--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix)
            .env("PATH", path_with_cargo_bin()),
    )?;
    if !bpf_linker_works(&binary) {
        bail!("bpf-linker was installed but does not run; see the output above");
    }
    Ok(())
}

fn bpf_linker_works(binary: &Path) -> bool {
    Command::new(binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}
