//! `ztunnel-cni install|uninstall` run as the DaemonSet runs them, over a
//! node's directories made in a temporary directory.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

const ORIGINAL: &str = "{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"kindnet\",\n  \"plugins\": [\n    {\"type\": \"ptp\"},\n    {\"type\": \"portmap\", \"capabilities\": {\"portMappings\": true}}\n  ]\n}\n";

struct Node {
    root: tempfile::TempDir,
}

impl Node {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        for d in ["net.d", "bin", "sa"] {
            fs::create_dir(root.path().join(d)).unwrap();
        }
        fs::write(root.path().join("sa/token"), "the-token\n").unwrap();
        fs::write(root.path().join("sa/ca.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        fs::write(root.path().join("net.d/10-kindnet.conflist"), ORIGINAL).unwrap();
        Self { root }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztunnel-cni"));
        cmd.args(args)
            .args(["--conf-dir", self.path("net.d").to_str().unwrap()])
            .args(["--bin-dir", self.path("bin").to_str().unwrap()])
            .env_clear()
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .env("KUBERNETES_SERVICE_PORT", "443");
        if args[0] == "install" {
            cmd.args(["--service-account-dir", self.path("sa").to_str().unwrap()]);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }
}

fn conflist(node: &Node) -> String {
    fs::read_to_string(node.path("net.d/10-kindnet.conflist")).unwrap()
}

fn is_chained(text: &str) -> bool {
    let value: serde_json::Value = serde_json::from_str(text).unwrap();
    value["plugins"].as_array().unwrap().last().unwrap()["type"] == "ztunnel-cni"
}

#[test]
fn install_then_uninstall_from_the_command_line() {
    let node = Node::new();
    let out = node.run(&["install", "--timeout", "10s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("10-kindnet.conflist (written)"));
    let text = conflist(&node);
    assert!(is_chained(&text), "{text}");
    assert!(
        text.contains(r#""kubeconfig": "/etc/cni/net.d/ztunnel-cni.kubeconfig", "timeout": "10s""#),
        "{text}"
    );
    // The binary installed is this very program.
    assert_eq!(
        fs::read(node.path("bin/ztunnel-cni")).unwrap(),
        fs::read(env!("CARGO_BIN_EXE_ztunnel-cni")).unwrap()
    );
    assert!(fs::read_to_string(node.path("net.d/ztunnel-cni.kubeconfig")).unwrap().contains("the-token"));

    let out = node.run(&["uninstall"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(conflist(&node), ORIGINAL);
    assert!(!node.path("net.d/ztunnel-cni.kubeconfig").exists());
    assert!(!node.path("bin/ztunnel-cni").exists());
}

#[test]
fn strict_refuses_another_mesh_and_says_so() {
    let node = Node::new();
    let with_istio =
        ORIGINAL.replace("{\"type\": \"ptp\"}", "{\"type\": \"ptp\"},\n    {\"type\": \"istio-cni\"}");
    fs::write(node.path("net.d/10-kindnet.conflist"), &with_istio).unwrap();
    let out = node.run(&["install", "--strict"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("istio-cni"));
    assert_eq!(conflist(&node), with_istio);
}

/// Kills the reconciling installer when the test ends, also on failure.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls until `done`; only a broken installer takes the whole (generous) while.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With --reconcile-every, install waits for a primary configuration that
/// is not there yet, and puts the entry back when the primary plugin
/// rewrites its file.
#[test]
fn reconcile_waits_for_the_primary_and_restores_the_entry() {
    let node = Node::new();
    fs::remove_file(node.path("net.d/10-kindnet.conflist")).unwrap();
    let mut child =
        node.command(&["install", "--reconcile-every", "100ms"]).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let _running = Running(child);
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    // It has tried and found no configuration ...
    let line = lines.recv_timeout(Duration::from_secs(120)).expect("the installer says why it waits");
    assert!(line.contains("no network configuration"), "{line}");
    // ... and has written nothing: the binary comes with the entry.
    assert!(!node.path("bin/ztunnel-cni").exists());

    fs::write(node.path("net.d/10-kindnet.conflist"), ORIGINAL).unwrap();
    wait_until("the entry is installed", || is_chained(&conflist(&node)));
    assert!(node.path("bin/ztunnel-cni").exists());

    // The primary plugin writes its configuration again, without us.
    fs::write(node.path("net.d/10-kindnet.conflist"), ORIGINAL).unwrap();
    wait_until("the entry is back", || is_chained(&conflist(&node)));
}

#[test]
fn the_kubeconfig_must_stay_in_the_conf_dir() {
    let node = Node::new();
    let out = node.run(&["install", "--kubeconfig-out", "/etc/passwd"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!Path::new(&node.path("bin/ztunnel-cni")).exists());
}
