//! `ztunnel precheck`: whether this node can run the tunnel, found out on the
//! node before anything is installed rather than from a failed start. Each
//! check gives one finding, pass or fail, and every failure says what to do.
//!
//! The eBPF checks load the tunnel's own object and try each of its programs
//! against a scratch cgroup or network namespace, so a pass means the kernel
//! accepted exactly what the tunnel will ask of it; the kernel version and BTF
//! lines explain a failure there, they do not replace it.
//!
//! | module | checks |
//! | --- | --- |
//! | `kernel` | the kernel's version against what the programs use; BTF |
//! | `cgroups` | cgroup v2 mounted, where, unified or hybrid; `capture.cgroup_root` |
//! | `caps` | the capabilities the tunnel uses, each with what it is for |
//! | `nofile` | RLIMIT_NOFILE against `capture.max_connections` |
//! | `ebpf` | the eBPF object and each of its programs: loaded, attached, detached |
//! | `bpffs` | a bpffs can be mounted |
//! | `pin_dir` | the pin directory: on bpffs, no pins of another map version |
//! | `netfilter` | another mesh's redirect rules or chains |
//! | `cni` | (Kubernetes) the CNI configuration directory |
//! | `event` | (Kubernetes) a failure as a Warning Event on the precheck's own pod |

mod bpffs;
mod caps;
mod cgroups;
mod cni;
mod ebpf;
pub mod event;
mod kernel;
mod netfilter;
mod nofile;
mod pin_dir;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::config::{CaptureConfig, Config};

/// Where the container runtime looks for CNI configuration by default.
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";

/// What to check.
#[derive(Debug, Clone)]
pub struct Options {
    /// The node's configuration file: its pin directory, cgroup root and
    /// connection limit are checked instead of the defaults.
    pub config: Option<PathBuf>,
    /// A Kubernetes node: the CNI configuration is checked too.
    pub kubernetes: bool,
    pub cni_conf_dir: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Self { config: None, kubernetes: false, cni_conf_dir: PathBuf::from(DEFAULT_CNI_CONF_DIR) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pass,
    Fail,
    /// Could not be looked at (a tool is missing); never fails the node.
    NotChecked,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "FAIL",
            Status::NotChecked => "not checked",
        }
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Which check: `kernel`, `ebpf-program`, `capability`, ...
    pub check: &'static str,
    /// What it was about, where a check has several findings (a program's
    /// name, a capability, a tool).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub status: Status,
    pub detail: String,
    /// What to do (failures only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn pass(check: &'static str, detail: impl Into<String>) -> Self {
        Self { check, subject: None, status: Status::Pass, detail: detail.into(), fix: None }
    }

    fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { check, subject: None, status: Status::Fail, detail: detail.into(), fix: Some(fix.into()) }
    }

    fn not_checked(check: &'static str, detail: impl Into<String>) -> Self {
        Self { check, subject: None, status: Status::NotChecked, detail: detail.into(), fix: None }
    }

    fn about(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// `check subject`, as the line names it.
    pub fn name(&self) -> String {
        match &self.subject {
            Some(s) => format!("{} {s}", self.check),
            None => self.check.to_owned(),
        }
    }

    /// The finding's line: status, name, detail and, for a failure, the fix.
    pub fn line(&self) -> String {
        let mut line = format!("{:<11}  {}: {}", self.status.label(), self.name(), self.detail);
        if let Some(fix) = &self.fix {
            let _ = write!(line, " -- fix: {fix}");
        }
        line
    }
}

/// Every finding of one precheck run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub checks: Vec<Finding>,
}

impl Report {
    fn new(checks: Vec<Finding>) -> Self {
        Self { ok: checks.iter().all(|f| f.status != Status::Fail), checks }
    }

    pub fn failures(&self) -> impl Iterator<Item = &Finding> {
        self.checks.iter().filter(|f| f.status == Status::Fail)
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|f| f.status == status).count()
    }

    /// One line: how many passed and failed, and the verdict.
    pub fn summary(&self) -> String {
        let mut s = format!("{} passed, {} failed", self.count(Status::Pass), self.count(Status::Fail));
        let not_checked = self.count(Status::NotChecked);
        if not_checked > 0 {
            let _ = write!(s, ", {not_checked} not checked");
        }
        if self.ok {
            s.push_str(": this node can run the tunnel");
        } else {
            s.push_str(": this node cannot run the tunnel until the failures above are fixed");
        }
        s
    }

    /// The report as `ztunnel precheck` prints it: a line per finding, then
    /// the summary.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for f in &self.checks {
            out.push_str(&f.line());
            out.push('\n');
        }
        out.push_str(&format!("precheck: {}\n", self.summary()));
        out
    }
}

/// The configuration values the checks read.
struct Settings {
    pin_dir: PathBuf,
    max_connections: u32,
    cgroup_root: Option<PathBuf>,
}

/// Runs every check. Needs root (or the capabilities it checks for) to say
/// anything useful: without them, the eBPF lines fail with the reason.
pub fn run(options: &Options) -> Report {
    let mut findings = Vec::new();
    let settings = settings(options.config.as_deref(), &mut findings);

    let (cgroup_findings, cgroup2) = cgroups::check(settings.cgroup_root.as_deref());
    let capabilities = caps::check();
    let nofile = nofile::check(settings.max_connections);
    let programs = ebpf::check(cgroup2.as_deref(), settings.max_connections);
    let programs_work = programs.iter().all(|f| f.status == Status::Pass);

    findings.push(kernel::version(programs_work));
    findings.push(kernel::btf(programs_work));
    findings.extend(cgroup_findings);
    findings.extend(capabilities);
    findings.push(nofile);
    findings.extend(programs);
    findings.push(bpffs::check());
    findings.extend(pin_dir::check(&settings.pin_dir));
    findings.extend(netfilter::check());
    if options.kubernetes {
        findings.push(cni::check(&options.cni_conf_dir));
    }
    Report::new(findings)
}

/// The configuration's capture settings (defaults without a file), and a
/// finding about the file when there is one.
fn settings(config: Option<&Path>, findings: &mut Vec<Finding>) -> Settings {
    let defaults = CaptureConfig::default();
    let capture = match config {
        None => defaults,
        Some(path) => match Config::load(path) {
            Ok(c) => {
                findings.push(Finding::pass(
                    "config",
                    format!(
                        "{}: valid (node {}, {} workloads)",
                        path.display(),
                        c.node.name,
                        c.workloads.len()
                    ),
                ));
                c.capture
            }
            Err(e) => {
                findings.push(Finding::fail(
                    "config",
                    e.to_string(),
                    "correct the file (`ztunnel validate --config` shows the same); the checks below use the defaults",
                ));
                defaults
            }
        },
    };
    Settings {
        pin_dir: capture.bpf_pin_dir,
        max_connections: capture.max_connections,
        cgroup_root: capture.cgroup_root,
    }
}

/// The last `os error` of an io::Error, for choosing the advice.
fn errno(e: &std::io::Error) -> Option<nix::errno::Errno> {
    e.raw_os_error().map(nix::errno::Errno::from_raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_line_carries_its_fix_and_the_report_fails() {
        let report = Report::new(vec![
            Finding::pass("kernel", "Linux 6.1"),
            Finding::fail("nofile", "hard 64", "raise it").about("RLIMIT_NOFILE"),
            Finding::not_checked("netfilter", "nft is not installed").about("nft"),
        ]);
        assert!(!report.ok);
        let text = report.text();
        assert!(text.contains("FAIL         nofile RLIMIT_NOFILE: hard 64 -- fix: raise it\n"), "{text}");
        assert!(text.contains("not checked  netfilter nft: nft is not installed\n"), "{text}");
        assert!(text.ends_with("1 passed, 1 failed, 1 not checked: this node cannot run the tunnel until the failures above are fixed\n"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["checks"][1]["status"], "fail");
        assert_eq!(json["checks"][1]["fix"], "raise it");
        assert!(json["checks"][0].get("fix").is_none());
    }

    #[test]
    fn not_checked_never_fails_the_node() {
        let report = Report::new(vec![Finding::not_checked("netfilter", "no tool")]);
        assert!(report.ok);
    }
}
