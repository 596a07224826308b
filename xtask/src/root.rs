//! What must run as root, when xtask is run by an ordinary user: apt-get,
//! the precheck, the demo and the benchmark, and the test binaries. Everything
//! else (cargo, rustup, the build) runs as the user, so no root-owned file ever
//! lands in the checkout, its target/ or the user's cargo home.
//!
//! sudo is asked for once, with one line saying why, before the first step
//! that needs it; the ticket is then kept fresh for as long as xtask runs, so
//! a long build never ends in a second prompt. Run as root, xtask runs
//! everything directly, as it always did.

use std::{
    ffi::{OsStr, OsString},
    process::Command,
    sync::Once,
    time::Duration,
};

use anyhow::{Context as _, bail};

/// Variables that point root's writes into the user's directories: root's
/// HOME is its own (sudo -H), and these are dropped.
const USER_DIRS: &[&str] =
    &["XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR", "TMPDIR"];

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Makes sure sudo will not prompt later: the first call prints `why` and
/// asks for the password (if sudo needs one); later calls do nothing. As
/// root, does nothing.
pub fn ask(why: &str) -> anyhow::Result<()> {
    if is_root() {
        return Ok(());
    }
    static KEEP_FRESH: Once = Once::new();
    if KEEP_FRESH.is_completed() {
        return Ok(());
    }
    eprintln!("xtask: sudo: {why}; building stays yours");
    let status = Command::new("sudo").arg("-v").status().context(
        "cannot run sudo: install it (apt-get install sudo) and give this user sudo rights, or run as root",
    )?;
    if !status.success() {
        bail!("sudo refused ({status}): this task needs root for the steps named above");
    }
    KEEP_FRESH.call_once(|| {
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_secs(60));
                // -n: never prompt from here; a lapsed ticket prompts at the next step.
                let _ = Command::new("sudo").args(["-n", "-v"]).status();
            }
        });
    });
    Ok(())
}

/// The words that run a program as root: nothing as root; else sudo with
/// the user's environment (test filters, log levels, ZTB_* settings), root's
/// own HOME and none of the user's directories.
pub fn prefix() -> Vec<OsString> {
    if is_root() {
        return Vec::new();
    }
    let mut words: Vec<OsString> =
        ["sudo", "--preserve-env", "--set-home", "--", "env"].map(Into::into).into();
    for var in USER_DIRS {
        words.push("-u".into());
        words.push((*var).into());
    }
    words
}

/// `program` as root (see [`prefix`]). Call [`ask`] first.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut words = prefix();
    match words.is_empty() {
        true => Command::new(program),
        false => {
            words.push(program.as_ref().to_owned());
            let mut cmd = Command::new(&words[0]);
            cmd.args(&words[1..]);
            cmd
        }
    }
}

/// cargo's `--config` value that runs test binaries with [`prefix`].
pub fn cargo_runner_config() -> String {
    let words: Vec<String> = prefix()
        .iter()
        .map(|w| format!("\"{}\"", w.to_string_lossy().replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("target.'cfg(all())'.runner = [{}]", words.join(", "))
}
