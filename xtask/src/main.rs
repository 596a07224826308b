//! `cargo xtask <task>`: the project's tasks.
//!
//! | task | what |
//! | --- | --- |
//! | `setup` | installs what builds and tests need (idempotent, quick when done), then `ztunnel precheck` |
//! | `build` | setup, then builds every binary |
//! | `test` | setup, build, then the whole test suite (the test binaries as root) |
//! | `fuzz [--seconds N] [TARGET...]` | setup, then each fuzz target for N s (30) from its seed corpus |
//! | `demo` | setup, build, then the demo on the testbed (as root) |
//! | `bench [--json]` | setup, release build, then the benchmark (as root) |
//! | `soak [--minutes N]` | setup, release build, then minutes of mixed traffic, reloads, renewals and a CA outage (as root) |
//! | `kind-demo` | ztunnel in a two-node kind cluster (docker, kind, kubectl) |
//!
//! Run by an ordinary user, every task builds as that user and runs only what
//! needs root through sudo (see `root`); run as root, everything runs directly.

mod bench;
mod bench_k8s;
mod demo;
mod deploy_tools;
mod fuzz;
mod kind_demo;
mod precheck;
mod root;
mod setup;
mod soak;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

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
    /// rust-src, bpf-linker built against the nightly's LLVM; then build
    /// ztunnel and run `ztunnel precheck` on this machine.
    Setup,
    /// Build every binary (debug, or --release).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run the whole test suite: unit tests and the integration tests over
    /// real eBPF capture and network namespaces (the test binaries run as root).
    Test {
        /// Tests run this many at a time.
        #[arg(long, env = "ZTUNNEL_TEST_THREADS", default_value_t = 2)]
        test_threads: usize,
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Run the cargo-fuzz targets of fuzz/ for a bounded time each, from
    /// their committed seed corpora (nightly, cargo-fuzz).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// Bring up simulated nodes and workloads and show capture at work.
    Demo,
    /// Minutes of mixed traffic with reloads, renewals and a CA outage,
    /// printing the tunnels' memory, descriptors and threads (as root; not
    /// part of `test`).
    Soak {
        #[arg(long, default_value_t = 5)]
        minutes: u64,
    },
    /// Measure the same workloads directly and through the tunnels.
    Bench(BenchArgs),
    /// The root part of `demo` or `bench`, started through sudo by the same
    /// task run as an ordinary user, once everything is built.
    #[command(hide = true)]
    AsRoot {
        #[command(subcommand)]
        task: RootTask,
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

#[derive(clap::Args, Clone)]
struct BenchArgs {
    /// One flat JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Only this measurement: throughput, rr or crr; or k8s (Kubernetes
    /// mode's memory and time to capture with 10,000 pods, run only when asked).
    #[arg(long)]
    only: Option<String>,
}

impl BenchArgs {
    fn args(&self) -> Vec<String> {
        let mut args = vec!["--seconds".to_owned(), self.seconds.to_string()];
        if self.json {
            args.push("--json".into());
        }
        if let Some(only) = &self.only {
            args.extend(["--only".to_owned(), only.clone()]);
        }
        args
    }
}

#[derive(Subcommand)]
enum RootTask {
    Demo,
    Bench(BenchArgs),
}

const WHY_DEMO: &str = "the precheck and the demo attach eBPF programs and make network namespaces and cgroups, \
                        so they run as root";
const WHY_TEST: &str = "the precheck and the test binaries attach eBPF programs and make network namespaces \
                        and cgroups, so they run as root";
const WHY_BENCH: &str = "the precheck and the benchmark attach eBPF programs and make network namespaces and \
                         cgroups, so they run as root";
const WHY_SETUP: &str = "the precheck loads and attaches the tunnel's eBPF programs, so it runs as root";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(Some(WHY_SETUP))
            .and_then(|()| build(Profile::Debug, Output::Quiet))
            .and_then(|()| precheck::on_this_machine(Profile::Debug)),
        Task::Build { release } => {
            setup::run(None).and_then(|()| build(Profile::from(release), Output::Full))
        }
        Task::Test { test_threads, filter } => setup::run(Some(WHY_TEST))
            .and_then(|()| build(Profile::Debug, Output::Full))
            .and_then(|()| precheck::for_the_testbed(Profile::Debug))
            .and_then(|()| {
                // A filtered run is someone iterating on a few tests: no fuzzing.
                let fuzz_after = filter.is_none();
                test(test_threads, filter)?;
                if fuzz_after { fuzz::run(&fuzz::Options::default()) } else { Ok(()) }
            }),
        Task::Fuzz { seconds, targets } => {
            setup::run(None).and_then(|()| fuzz::run(&fuzz::Options { seconds, targets }))
        }
        Task::Demo => setup::run(Some(WHY_DEMO))
            .and_then(|()| build(Profile::Debug, Output::Quiet))
            .and_then(|()| precheck::for_the_testbed(Profile::Debug))
            .and_then(|()| as_root(&["demo".to_owned()], demo::run)),
        Task::Bench(args) => setup::run(Some(WHY_BENCH))
            .and_then(|()| build(Profile::Release, Output::Quiet))
            .and_then(|()| precheck::for_the_testbed(Profile::Release))
            .and_then(|()| {
                let mut root_args = vec!["bench".to_owned()];
                root_args.extend(args.args());
                as_root(&root_args, || bench_run(&args))
            }),
        Task::AsRoot { task } => {
            if !root::is_root() {
                eprintln!("xtask: `as-root` is started by xtask itself, through sudo");
                return ExitCode::FAILURE;
            }
            match task {
                RootTask::Demo => demo::run(),
                RootTask::Bench(args) => bench_run(&args),
            }
        }
        Task::Soak { minutes } => setup::run(Some(WHY_BENCH))
            .and_then(|()| build(Profile::Release, Output::Quiet))
            .and_then(|()| precheck::for_the_testbed(Profile::Release))
            .and_then(|()| soak::run(minutes)),
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

fn bench_run(args: &BenchArgs) -> anyhow::Result<()> {
    bench::run(&bench::Options { json: args.json, seconds: args.seconds, only: args.only.clone() })
}

/// Runs `task` here when root; else this same xtask binary with `as-root
/// <args>` through sudo (everything is built by then).
fn as_root(args: &[String], task: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    if root::is_root() {
        return task();
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut cmd = root::command(exe);
    cmd.arg("as-root").args(args);
    let what = format!("{cmd:?}");
    let s = cmd.status().with_context(|| format!("cannot run {what}"))?;
    if !s.success() {
        // The root part has printed why.
        bail!("{} failed ({s})", args.join(" "));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl From<bool> for Profile {
    fn from(release: bool) -> Self {
        if release { Profile::Release } else { Profile::Debug }
    }
}

impl Profile {
    pub fn dir_name(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// Whether cargo's progress lines are shown (`build`, `test`) or kept out of
/// the task's output (`demo`, `bench`, `setup`); warnings and errors always show.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    Full,
    Quiet,
}

/// Where cargo puts what it builds: this xtask binary is in `<target>/debug`.
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .with_context(|| format!("{} is not in a cargo target directory", exe.display()))
}

/// A built binary.
pub fn built(profile: Profile, name: &str) -> anyhow::Result<PathBuf> {
    Ok(target_dir()?.join(profile.dir_name()).join(name))
}

/// The repository's root (xtask's parent directory).
pub fn workspace_root() -> PathBuf {
    let xtask = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().map_or(xtask.clone(), PathBuf::from)
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

fn build(profile: Profile, output: Output) -> anyhow::Result<()> {
    setup::check_ownership(&target_dir()?)?;
    let mut cmd = cargo();
    cmd.args(["build", "--package", "ztunnel", "--package", "ztunnel-testbed", "--bins"]);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    if output == Output::Quiet {
        eprintln!(
            "xtask: building ztunnel and the testbed ({}; the first build takes minutes)",
            profile.dir_name()
        );
        cmd.arg("--quiet");
    }
    status(&mut cmd)
}

/// cargo builds the tests as the user; each test binary then runs as root
/// through cargo's `runner` (nothing to change as root).
fn test(threads: usize, filter: Option<String>) -> anyhow::Result<()> {
    let mut cmd = cargo();
    // The eBPF crate only builds for the BPF target (ztunnel's build.rs does that).
    cmd.args(["test", "--workspace", "--exclude", "ztunnel-ebpf", "--no-fail-fast"]);
    if !root::is_root() {
        cmd.args(["--config", &root::cargo_runner_config()]);
    }
    cmd.arg("--");
    cmd.arg(format!("--test-threads={threads}"));
    if let Some(f) = filter {
        cmd.arg(f);
    }
    status(&mut cmd)
}
