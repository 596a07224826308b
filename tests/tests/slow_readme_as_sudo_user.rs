//! SLOW (minutes: a cold build, and bpf-linker built for the user): the
//! README's demo command, run as a newcomer runs it. An ordinary user with
//! sudo rights (Debian's sudo, default `secure_path`, so cargo is not on PATH
//! under sudo) clones the repository fresh into its home and runs the command
//! the README gives, word for word. It must work, and leave no file owned by
//! root in the checkout (target/ included) or anywhere in the user's home.
//!
//! The installed toolchains are lent to the user without copying them:
//! read-only bind mounts of root's rustup and cargo homes (root's home is
//! 0700), used as the user's RUSTUP_HOME and a PATH entry. The user's own
//! CARGO_HOME starts with a copy of root's registry cache only, and cargo runs
//! offline, so the test needs no network. The user, its home, the mounts and
//! the sudoers file are removed at the end, also on failure.

use std::{
    fs,
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// Not a measurement: only what ends a hung run (a cold build here takes
/// about six minutes).
const HANG: Duration = Duration::from_secs(45 * 60);

/// A user made for this test, with everything made for it; all of it is
/// removed when dropped.
struct SudoUser {
    name: String,
    home: PathBuf,
    sudoers: PathBuf,
    /// Where root's toolchains are lent: `<lent>/rustup`, `<lent>/cargo`.
    lent: PathBuf,
    mounted: Vec<PathBuf>,
}

impl SudoUser {
    fn create() -> anyhow::Result<Self> {
        let name = format!("ztbfirstrun{}", std::process::id());
        let mut user = Self {
            home: PathBuf::from("/home").join(&name),
            sudoers: PathBuf::from("/etc/sudoers.d").join(&name),
            lent: PathBuf::from("/run").join(&name),
            mounted: Vec::new(),
            name,
        };
        run(Command::new("useradd")
            .args(["--create-home", "--user-group", "--shell", "/bin/bash"])
            .arg(&user.name))?;
        // sudo as Debian sets it up for a user, without a password to type.
        fs::write(&user.sudoers, format!("{} ALL=(ALL:ALL) NOPASSWD: ALL\n", user.name))?;
        fs::set_permissions(&user.sudoers, fs::Permissions::from_mode(0o440))?;
        run(Command::new("visudo").arg("-cqf").arg(&user.sudoers))?;

        for (what, from) in [("rustup", rustup_home()), ("cargo", cargo_home())] {
            let to = user.lent.join(what);
            fs::create_dir_all(&to)?;
            run(Command::new("mount").args(["--bind", "-o", "ro"]).arg(&from).arg(&to))?;
            user.mounted.push(to);
        }
        fs::set_permissions(&user.lent, fs::Permissions::from_mode(0o755))?;

        // The user's own cargo home, with root's downloaded crates (not its
        // toolchains) so that the build runs offline.
        let registry = user.home.join(".cargo").join("registry");
        fs::create_dir_all(&registry)?;
        for part in ["cache", "index"] {
            run(Command::new("cp").arg("-a").arg(cargo_home().join("registry").join(part)).arg(&registry))?;
        }
        run(Command::new("chown")
            .arg("-R")
            .arg(format!("{0}:{0}", user.name))
            .arg(user.home.join(".cargo")))?;
        Ok(user)
    }

    /// `bash -c script` as the user, in a login-like environment: its HOME,
    /// a Debian user's PATH plus the lent cargo bin, nothing of ours.
    fn command(&self, script: &str) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", &self.name, "--", "env", "-i"])
            .arg(format!("HOME={}", self.home.display()))
            .arg(format!("USER={}", self.name))
            .arg(format!("LOGNAME={}", self.name))
            .arg("LANG=C.UTF-8")
            .arg(format!("PATH={}/cargo/bin:/usr/local/bin:/usr/bin:/bin", self.lent.display()))
            .arg(format!("RUSTUP_HOME={}/rustup", self.lent.display()))
            .arg(format!("CARGO_HOME={}/.cargo", self.home.display()))
            .arg("CARGO_NET_OFFLINE=true")
            .args(["bash", "-c", script]);
        cmd
    }
}

impl Drop for SudoUser {
    fn drop(&mut self) {
        // --force: even if something of the user's still runs.
        let _ = Command::new("userdel").args(["--remove", "--force"]).arg(&self.name).output();
        let _ = fs::remove_dir_all(&self.home);
        let _ = fs::remove_file(&self.sudoers);
        for m in self.mounted.drain(..).rev() {
            let _ = Command::new("umount").arg("--lazy").arg(&m).output();
            let _ = fs::remove_dir(&m);
        }
        let _ = fs::remove_dir(&self.lent);
    }
}

fn rustup_home() -> PathBuf {
    std::env::var_os("RUSTUP_HOME").map_or_else(|| home().join(".rustup"), PathBuf::from)
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME").map_or_else(|| home().join(".cargo"), PathBuf::from)
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The demo command of the README's first command block.
fn readme_demo_command(repo: &Path) -> anyhow::Result<String> {
    let readme = fs::read_to_string(repo.join("README.md"))?;
    let block = readme.split("```sh\n").nth(1).context("README has no ```sh block")?;
    let block = block.split("```").next().unwrap_or_default();
    let line =
        block.lines().find(|l| l.contains("xtask demo")).context("no demo command in the first block")?;
    Ok(line.split('#').next().unwrap_or_default().trim().to_owned())
}

/// Every path under `dir` (not following links) owned by root (user or group).
fn owned_by_root(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(path) = todo.pop() {
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        if meta.uid() == 0 || meta.gid() == 0 {
            found.push(path.clone());
        }
        if meta.is_dir()
            && let Ok(entries) = fs::read_dir(&path)
        {
            todo.extend(entries.filter_map(Result::ok).map(|e| e.path()));
        }
    }
    found
}

#[test]
fn slow_readme_demo_works_for_an_ordinary_user_with_sudo_and_leaves_nothing_owned_by_root()
-> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "this test makes a user: it needs root (cargo xtask test runs it so)"
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?.to_owned();
    let command = readme_demo_command(&repo)?;
    ensure!(
        command == "cargo xtask demo",
        "the README's demo command is `{command}`: a newcomer types no sudo"
    );

    let user = SudoUser::create()?;
    // sudo's secure_path, as Debian ships it, has no cargo: the demo must not
    // need cargo as root.
    let sudo_path = user.command("sudo -n sh -c 'command -v cargo || echo none'").output()?;
    ensure!(String::from_utf8_lossy(&sudo_path.stdout).trim() == "none", "cargo is on sudo's PATH here");

    let checkout = user.home.join("ztunnel");
    run(Command::new("git").args(["clone", "--quiet", "--no-hardlinks"]).arg(&repo).arg(&checkout))?;
    run(Command::new("chown").arg("-R").arg(format!("{0}:{0}", user.name)).arg(&checkout))?;

    // The check below would see a root-owned file: prove it, then start clean.
    let probe = user.home.join("probe-owned-by-root");
    fs::write(&probe, "")?;
    ensure!(
        owned_by_root(&user.home) == vec![probe.clone()],
        "the ownership check missed {}",
        probe.display()
    );
    fs::remove_file(&probe)?;

    let log_path = std::env::temp_dir().join(format!("{}-demo.log", user.name));
    let log = fs::File::create(&log_path)?;
    let mut cmd = user.command(&format!("cd ~/ztunnel && {command}"));
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // Its own process group, so that a hung run can be ended whole.
    cmd.process_group(0);
    let mut child = cmd.spawn()?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > HANG {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            bail!("`{command}` still ran after {HANG:?}; its output is in {}", log_path.display());
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let output = fs::read_to_string(&log_path)?;
    let _ = fs::remove_file(&log_path);
    let tail: String =
        output.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    eprintln!("`{command}` as {} took {:?}", user.name, started.elapsed());

    ensure!(status.success(), "`{command}` failed ({status}) as {}:\n{tail}", user.name);
    ensure!(output.contains("demo: all 7 calls behaved as expected"), "the demo did not finish:\n{tail}");
    let asked: Vec<&str> = output.lines().filter(|l| l.starts_with("xtask: sudo: ")).collect();
    ensure!(asked.len() == 1, "sudo is asked for once, with why; saw {asked:?}");
    let noise: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("warning: ztunnel@") || l.trim_start().starts_with("Compiling "))
        .collect();
    ensure!(noise.is_empty(), "build noise in the demo's output: {:?}", &noise[..noise.len().min(5)]);

    // setup built bpf-linker as the user, into the user's own cargo home.
    let linker = fs::metadata(user.home.join(".cargo/bin/bpf-linker")).context("the user's bpf-linker")?;
    ensure!(linker.uid() != 0, "bpf-linker was installed as root");
    ensure!(checkout.join("target/debug/ztunnel").exists(), "the build is not in the user's checkout");
    let rooted = owned_by_root(&user.home);
    ensure!(
        rooted.is_empty(),
        "{} paths owned by root in {}, e.g. {:?}",
        rooted.len(),
        user.home.display(),
        &rooted[..rooted.len().min(10)]
    );
    Ok(())
}
