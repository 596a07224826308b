//! `cargo xtask <task>`: the project's tasks.
//!
//! | task | what |
//! | --- | --- |
//! | `setup` | installs what builds and tests need (idempotent, quick when done) |
//! | `build` | setup, then builds every binary |
//! | `test` | setup, build, then the whole test suite (root) |
//! | `demo` | setup, build, then the demo on the testbed (root) |
//! | `bench [--json]` | setup, release build, then the benchmark (root) |
//! | `kind-demo` | ztunnel in a two-node kind cluster (docker, kind, kubectl) |

mod bench;
mod demo;
mod deploy_tools;
mod kind_demo;
mod setup;

use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need: Debian packages, nightly
    /// rust-src, bpf-linker built against the nightly's LLVM.
    Setup,
    /// Build every binary (debug, or --release).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run the whole test suite: unit tests and the integration tests over
    /// real eBPF capture and network namespaces (needs root).
    Test {
        /// Tests run this many at a time.
        #[arg(long, env = "ZTUNNEL_TEST_THREADS", default_value_t = 2)]
        test_threads: usize,
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Bring up simulated nodes and workloads and show capture at work.
    Demo,
    /// Measure the same workloads directly and through the tunnels.
    Bench {
        /// One flat JSON object on stdout instead of a table.
        #[arg(long)]
        json: bool,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Only this measurement: throughput, rr or crr.
        #[arg(long)]
        only: Option<String>,
    },
    /// ztunnel in a two-node kind cluster: build and load the image, make
    /// the CA's Secret, apply the kind overlay and the samples, and show
    /// calls, a denial and a rollback. Needs docker (a running engine),
    /// kind and kubectl; the Rust toolchains are not used (the image build
    /// has its own).
    KindDemo {
        /// The kind cluster (kubectl context kind-<name>); made if missing.
        #[arg(long, default_value = "ztunnel-demo")]
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Build { release } => setup::run().and_then(|()| build(release)),
        Task::Test { test_threads, filter } => {
            setup::run().and_then(|()| build(false)).and_then(|()| test(test_threads, filter))
        }
        Task::Demo => setup::run().and_then(|()| build(false)).and_then(|()| demo::run()),
        Task::Bench { json, seconds, only } => setup::run()
            .and_then(|()| build(true))
            .and_then(|()| bench::run(&bench::Options { json, seconds, only })),
        Task::KindDemo { name } => kind_demo::run(&kind_demo::Options { name }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo` with ~/.cargo/bin on PATH (where bpf-linker is installed).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.env("PATH", setup::path_with_cargo_bin());
    cmd
}

/// Runs `cmd`, its output on stderr: stdout is kept for what xtask itself
/// prints (`bench --json` prints one JSON object there, nothing else).
pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let what = format!("{cmd:?}");
    let s = cmd
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .with_context(|| format!("cannot run {what}"))?;
    if !s.success() {
        bail!("{what} failed ({s})");
    }
    Ok(())
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "ztunnel", "--package", "ztunnel-testbed", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)
}

fn test(threads: usize, filter: Option<String>) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the test suite needs root: it attaches eBPF programs and makes network namespaces");
    }
    let mut cmd = cargo();
    // The eBPF crate only builds for the BPF target (ztunnel's build.rs does that).
    cmd.args(["test", "--workspace", "--exclude", "ztunnel-ebpf", "--no-fail-fast", "--"]);
    cmd.arg(format!("--test-threads={threads}"));
    if let Some(f) = filter {
        cmd.arg(f);
    }
    status(&mut cmd)
}

pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
