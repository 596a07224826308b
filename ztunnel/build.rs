//! Builds the `ztunnel-ebpf` crate for bpfel-unknown-none with aya-build (nightly,
//! `-Z build-std=core`, linked by the `bpf-linker` on PATH) and leaves the object
//! at `$OUT_DIR/ztunnel-ebpf` for `include_bytes_aligned!`. `cargo xtask setup`
//! installs what this needs.
//!
//! aya-build passes every line of the inner cargo's output to cargo as a
//! `cargo:warning`, so a build would print its progress ("Compiling core ...")
//! as warnings. This script runs aya-build in a child process of its own
//! (itself, again) and sorts that child's lines: the whole output goes to
//! `$OUT_DIR/ebpf-build.log`; real warnings (rustc's and cargo's own) are
//! still shown; on failure the whole log is shown.
use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};
use aya_build::Toolchain;

/// Set in the child that runs aya-build.
const CHILD: &str = "ZTUNNEL_EBPF_BUILD_CHILD";

fn main() -> anyhow::Result<()> {
    if std::env::var_os(CHILD).is_some() {
        return build_ebpf();
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let log_path = out_dir.join("ebpf-build.log");
    let mut log = File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let exe = std::env::current_exe().context("current_exe")?;
    let mut child = Command::new(&exe)
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {} again for the eBPF build", exe.display()))?;
    // The child's own errors (stderr) are kept for a failure; it writes little.
    let stderr = child.stderr.take().context("child stderr")?;
    let stderr = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());

    let mut output = Vec::new();
    for line in BufReader::new(child.stdout.take().context("child stdout")?).lines() {
        let line = line.context("read the eBPF build's output")?;
        match line.strip_prefix("cargo:warning=").or_else(|| line.strip_prefix("cargo::warning=")) {
            Some(message) => {
                writeln!(log, "{message}")?;
                output.push(message.to_owned());
            }
            // rerun-if-changed and the like are for cargo.
            None => println!("{line}"),
        }
    }
    let status = child.wait().context("wait for the eBPF build")?;
    let stderr = stderr.join().map_err(|_| anyhow!("the stderr reader panicked"))?;
    log.write_all(stderr.as_bytes())?;
    if !status.success() {
        for line in &output {
            eprintln!("{line}");
        }
        eprint!("{stderr}");
        bail!("the eBPF build failed ({status}); its whole output is above and in {}", log_path.display());
    }
    let warnings = real_warnings(&output);
    for line in &warnings {
        println!("cargo:warning={line}");
    }
    if !warnings.is_empty() {
        println!("cargo:warning=(the eBPF build's whole output: {})", log_path.display());
    }
    Ok(())
}

fn build_ebpf() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "ztunnel-ebpf")
        .ok_or_else(|| anyhow!("package ztunnel-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;
    let package =
        aya_build::Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() };
    aya_build::build_ebpf([package], Toolchain::default())
}

/// The diagnostics among the eBPF build's lines: each block from a
/// `warning...`/`error...` line up to a blank line or cargo's next progress
/// line ("   Compiling ...", "    Finished ...").
fn real_warnings(lines: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in lines {
        if line.starts_with("warning") || line.starts_with("error") {
            in_block = true;
        } else if line.trim().is_empty() || is_progress(line) {
            in_block = false;
        }
        if in_block {
            out.push(line.clone());
        }
    }
    out
}

/// cargo's status lines: an indented capitalised verb ("   Compiling",
/// "    Finished", "  Downloaded").
fn is_progress(line: &str) -> bool {
    let Some(first) = line.strip_prefix(' ').map(str::trim_start).and_then(|l| l.split(' ').next()) else {
        return false;
    };
    first.len() > 2
        && first.starts_with(|c: char| c.is_ascii_uppercase())
        && first.chars().all(|c| c.is_ascii_alphabetic())
}
