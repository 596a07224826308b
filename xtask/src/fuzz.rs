//! `cargo xtask fuzz [--seconds N] [TARGET...]`: builds the cargo-fuzz
//! targets of `fuzz/` (nightly, its own workspace) once, then runs each for
//! a bounded time from its committed seed corpus, two at a time.
//!
//! * Build: `$CARGO_TARGET_DIR/fuzz` (or `target/fuzz`), kept apart from
//!   the main build, whose flags differ. No sanitizer: the code under test
//!   is safe Rust, where a sanitizer finds little and doubles build and run
//!   time; panics, overflow checks and debug assertions are all on.
//! * Corpus: what a run finds goes to `<target dir>/fuzz/corpus/<target>`
//!   (kept between runs, so they build on each other); `fuzz/corpus/<target>`
//!   is only read.
//! * A crash, timeout or out-of-memory leaves its input in
//!   `fuzz/artifacts/<target>/`, which the failure names, with the command
//!   that reproduces it. It becomes a regression test in the ztunnel crate
//!   (fuzz/README.md).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Every fuzz target (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &["config", "policy", "spiffe_id", "connect", "hbone_server", "certificate"];

/// libFuzzer dictionaries (in `fuzz/dict/`) of the targets that have one.
const DICTIONARIES: &[(&str, &str)] = &[("config", "node_yaml.dict"), ("policy", "node_yaml.dict")];

/// The build flags every run of a target uses (reproducing one must use
/// them too).
const BUILD_FLAGS: &[&str] = &["--sanitizer", "none"];

/// Targets run at once: the machine's cores, at most two.
const PARALLEL: usize = 2;

/// Seconds each target runs for by default (CI: `cargo xtask test`).
pub const DEFAULT_SECONDS: u64 = 30;

#[derive(Debug, Clone)]
pub struct Options {
    pub seconds: u64,
    /// Empty: every target.
    pub targets: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self { seconds: DEFAULT_SECONDS, targets: Vec::new() }
    }
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    crate::setup::cargo_fuzz()?;
    let root = crate::workspace_root();
    let targets: Vec<&str> = if opts.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &opts.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("no fuzz target `{t}` (there are: {})", TARGETS.join(", "));
            }
        }
        opts.targets.iter().map(String::as_str).collect()
    };
    let build_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from).join("fuzz");

    let started = Instant::now();
    build(&root, &build_dir)?;
    let built = started.elapsed();
    eprintln!("fuzz: built in {}s", built.as_secs());

    let triple = host_triple()?;
    let runs: Vec<Run> = targets.iter().map(|t| Run::new(&root, &build_dir, &triple, t)).collect();
    let results = run_all(&runs, opts.seconds)?;
    let mut failed = Vec::new();
    for (run, outcome) in runs.iter().zip(&results) {
        match outcome {
            Ok(stats) => eprintln!("fuzz: {}: {stats}", run.target),
            Err(e) => failed.push(format!("{}: {e:#}", run.target)),
        }
    }
    eprintln!(
        "fuzz: {} targets in {}s (build {}s)",
        runs.len(),
        started.elapsed().as_secs(),
        built.as_secs()
    );
    if !failed.is_empty() {
        bail!("fuzzing found problems:\n{}", failed.join("\n"));
    }
    Ok(())
}

/// `cargo fuzz build` of every target, with the nightly toolchain.
fn build(root: &Path, build_dir: &Path) -> anyhow::Result<()> {
    let mut cmd = nightly_cargo();
    cmd.current_dir(root).args(["fuzz", "build"]).args(BUILD_FLAGS).arg("--target-dir").arg(build_dir);
    crate::status(&mut cmd).context("building the fuzz targets (`cargo xtask setup` installs cargo-fuzz)")
}

/// `cargo` of the nightly toolchain (cargo-fuzz needs it), whatever
/// toolchain runs xtask.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"]).env("PATH", crate::setup::path_with_cargo_bin());
    // The toolchain running xtask must not leak into the nightly build.
    for var in ["CARGO", "RUSTC", "RUSTDOC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTUP_TOOLCHAIN"] {
        cmd.env_remove(var);
    }
    cmd
}

/// One target's run: where its binary, corpora, artifacts and log are.
struct Run {
    target: String,
    binary: PathBuf,
    /// Where this run adds what it finds.
    corpus: PathBuf,
    /// The committed seeds, only read.
    seeds: PathBuf,
    dictionary: Option<PathBuf>,
    artifacts: PathBuf,
    log: PathBuf,
    build_dir: PathBuf,
}

impl Run {
    fn new(root: &Path, build_dir: &Path, triple: &str, target: &str) -> Self {
        Self {
            target: target.to_owned(),
            binary: build_dir.join(triple).join("release").join(target),
            corpus: build_dir.join("corpus").join(target),
            seeds: root.join("fuzz/corpus").join(target),
            dictionary: DICTIONARIES
                .iter()
                .find(|(t, _)| *t == target)
                .map(|(_, d)| root.join("fuzz/dict").join(d)),
            artifacts: root.join("fuzz/artifacts").join(target),
            log: build_dir.join("logs").join(format!("{target}.log")),
            build_dir: build_dir.to_owned(),
        }
    }

    fn start(&self, seconds: u64) -> anyhow::Result<Child> {
        for dir in [&self.corpus, &self.artifacts] {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        if let Some(dir) = self.log.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let log =
            std::fs::File::create(&self.log).with_context(|| format!("create {}", self.log.display()))?;
        let mut artifact_prefix = self.artifacts.clone().into_os_string();
        artifact_prefix.push("/");
        let mut prefix_arg = std::ffi::OsString::from("-artifact_prefix=");
        prefix_arg.push(artifact_prefix);
        let mut cmd = Command::new(&self.binary);
        cmd.arg(&self.corpus).arg(&self.seeds);
        if let Some(d) = &self.dictionary {
            let mut arg = std::ffi::OsString::from("-dict=");
            arg.push(d);
            cmd.arg(arg);
        }
        cmd.arg(format!("-max_total_time={seconds}"))
            // One input running this long is a hang: a finding.
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1")
            .arg(prefix_arg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", self.binary.display()))
    }

    /// What the run's log says: its figures, or the failure.
    fn outcome(&self, status: std::process::ExitStatus, took: Duration) -> anyhow::Result<String> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        if status.success() {
            return Ok(summary(&log, took));
        }
        let artifact = log
            .lines()
            .filter_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim().to_owned()))
            .next_back();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let reproduce = match &artifact {
            Some(a) => format!(
                "input: {a}\nreproduce: cargo +nightly fuzz run {} --target-dir {} {} {a}",
                BUILD_FLAGS.join(" "),
                self.build_dir.display(),
                self.target
            ),
            None => format!("no input was saved (artifacts go to {})", self.artifacts.display()),
        };
        bail!("{status}\n{reproduce}\nlog: {}\n{}", self.log.display(), tail.join("\n"))
    }
}

/// Runs `runs`, [`PARALLEL`] at a time; one outcome per run, in order.
fn run_all(runs: &[Run], seconds: u64) -> anyhow::Result<Vec<anyhow::Result<String>>> {
    let mut outcomes: Vec<Option<anyhow::Result<String>>> = runs.iter().map(|_| None).collect();
    let mut running: Vec<(usize, Child, Instant)> = Vec::new();
    let mut next = 0;
    while next < runs.len() || !running.is_empty() {
        while running.len() < PARALLEL && next < runs.len() {
            match runs[next].start(seconds) {
                Ok(child) => running.push((next, child, Instant::now())),
                Err(e) => outcomes[next] = Some(Err(e)),
            }
            next += 1;
        }
        let mut still = Vec::new();
        for (i, mut child, since) in running {
            match child.try_wait() {
                Ok(Some(status)) => outcomes[i] = Some(runs[i].outcome(status, since.elapsed())),
                Ok(None) => still.push((i, child, since)),
                Err(e) => outcomes[i] = Some(Err(e.into())),
            }
        }
        running = still;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(outcomes.into_iter().map(|o| o.unwrap_or_else(|| Err(anyhow::anyhow!("did not run")))).collect())
}

/// `12 s, 345678 runs, coverage 1234, corpus 56`, from libFuzzer's output.
fn summary(log: &str, took: Duration) -> String {
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map_or("?".to_owned(), |v| v.trim().to_owned())
    };
    // The last status line: `#123 DONE cov: 456 ft: 789 corp: 12/3456b ...`.
    let field = |line: &str, name: &str| {
        let mut words = line.split_whitespace();
        words.find(|w| *w == name).and_then(|_| words.next()).unwrap_or("?").to_owned()
    };
    let last = log.lines().rev().find(|l| l.starts_with('#') && l.contains("cov:")).unwrap_or_default();
    format!(
        "{}s, {} runs, coverage {}, corpus {}, no crash",
        took.as_secs(),
        stat("number_of_executed_units"),
        field(last, "cov:"),
        field(last, "corp:"),
    )
}

/// The host's target triple (cargo-fuzz builds for it), from the nightly
/// rustc.
fn host_triple() -> anyhow::Result<String> {
    let out =
        Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]).output().context("rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_owned())
        .context("`rustc -vV` names no host")
}
