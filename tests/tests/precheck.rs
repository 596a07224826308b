//! `ztunnel precheck` on this machine: every line passes, and each check made
//! to fail where that can be arranged without touching the host (a child
//! without a capability or with a low open-file limit, a stale pin directory
//! of our own, a sample CNI directory, rules in a namespace that dies with
//! the child) fails on its own line, with its fix, and the exit code says so.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;
use ztunnel_testbed::bins;

/// Generous: the child only loads and attaches a few programs.
const WAIT: Duration = Duration::from_secs(60);

/// A directory under /sys/fs/bpf for one test's pins, removed when dropped.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> Self {
        let path = PathBuf::from(format!("/sys/fs/bpf/ztb-precheck-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        Self(path)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node configuration whose connection limit fits this machine's open-file
/// limit, so that the nofile line passes on any machine the suite runs on.
fn config(dir: &Path, pin_dir: &Path) -> PathBuf {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let fitting = (hard.saturating_sub(1024) / 2).min(4096);
    assert!(fitting >= 64, "this machine's hard RLIMIT_NOFILE ({hard}) is too low for any tunnel");
    let path = dir.join("node.yaml");
    std::fs::write(
        &path,
        format!(
            "node:\n  name: precheck\ncapture:\n  bpf_pin_dir: {}\n  max_connections: {fitting}\n",
            pin_dir.display()
        ),
    )
    .unwrap();
    path
}

/// A CNI directory whose primary configuration chains `plugins`.
fn cni_dir(dir: &Path, plugins: &[&str]) -> PathBuf {
    let cni = dir.join("net.d");
    std::fs::create_dir_all(&cni).unwrap();
    let chain: Vec<Value> = plugins.iter().map(|p| serde_json::json!({"type": p})).collect();
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": chain});
    std::fs::write(cni.join("10-calico.conflist"), conf.to_string()).unwrap();
    cni
}

fn precheck() -> Command {
    assert!(nix::unistd::geteuid().is_root(), "precheck tests need root (cargo xtask test runs them so)");
    let mut cmd = Command::new(bins::ztunnel().unwrap());
    cmd.arg("precheck");
    cmd
}

fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, text)
}

/// The one line of `check` (`capability CAP_NET_ADMIN`, `nofile RLIMIT_NOFILE`, ...).
fn line<'a>(text: &'a str, check: &str) -> &'a str {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.get(13..).is_some_and(|rest| rest.starts_with(&format!("{check}:"))))
        .collect();
    assert_eq!(lines.len(), 1, "one `{check}` line expected in:\n{text}");
    lines[0]
}

fn failed(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with("FAIL")).collect()
}

#[test]
fn precheck_passes_on_this_machine_and_json_parses() {
    let dir = tempfile::tempdir().unwrap();
    let pins = PinDir::new("pass");
    let config = config(dir.path(), &pins.0);
    let cni = cni_dir(dir.path(), &["calico", "portmap"]);
    let args = |cmd: &mut Command| {
        cmd.arg("--config").arg(&config).arg("--kubernetes").arg("--cni-conf-dir").arg(&cni);
    };

    let mut cmd = precheck();
    args(&mut cmd);
    let (out, text) = run(&mut cmd);
    assert!(out.status.success(), "{}\n{text}", String::from_utf8_lossy(&out.stderr));
    let (checks, summary) = text.trim_end().rsplit_once('\n').unwrap();
    for l in checks.lines() {
        assert!(l.starts_with("pass "), "every line passes on this machine: {l}\n{text}");
    }
    assert!(summary.starts_with("precheck: ") && summary.ends_with("0 failed: this node can run the tunnel"));
    // Every program of the object was tried, by type, each where it attaches.
    let mount = ztunnel::cgroup::cgroup2_mount().unwrap();
    for program in ["ztunnel_connect4", "ztunnel_connect6", "ztunnel_sockops"] {
        let l = line(&text, &format!("ebpf-program {program}"));
        let scratch =
            l.split_once("attached to scratch cgroup ").and_then(|(_, rest)| rest.split_once(", detached"));
        let scratch = Path::new(scratch.unwrap_or_else(|| panic!("{l}")).0);
        assert!(scratch.starts_with(&mount), "the scratch cgroup is under the cgroup v2 mount: {l}");
        assert!(!scratch.exists(), "the scratch cgroup is removed: {l}");
    }
    assert!(
        line(&text, "ebpf-program ztunnel_sk_lookup").contains("attached to a scratch network namespace")
    );
    assert!(line(&text, "cni").contains("calico, portmap"));
    for check in ["kernel", "btf", "cgroup2", "nofile RLIMIT_NOFILE", "bpffs", "pin-dir", "pin-version"] {
        line(&text, check);
    }
    assert!(!pins.0.exists(), "precheck must not pin anything");

    let mut cmd = precheck();
    cmd.arg("--json");
    args(&mut cmd);
    let (out, json) = run(&mut cmd);
    assert!(out.status.success());
    let report: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["ok"], true);
    let checks = report["checks"].as_array().unwrap();
    assert_eq!(checks.len(), text.lines().count() - 1, "the same checks as the lines");
    for c in checks {
        assert_eq!(c["status"], "pass", "{c}");
        assert!(c["detail"].as_str().is_some_and(|d| !d.is_empty()), "{c}");
    }
}

#[test]
fn a_missing_capability_fails_its_own_line_with_what_it_is_for() {
    let dir = tempfile::tempdir().unwrap();
    let pins = PinDir::new("caps");
    let config = config(dir.path(), &pins.0);
    // Root keeps only what the bounding set allows across exec.
    let mut cmd = Command::new("setpriv");
    cmd.args(["--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"])
        .arg(bins::ztunnel().unwrap())
        .args(["precheck", "--config"])
        .arg(&config);
    assert!(nix::unistd::geteuid().is_root());
    let (out, text) = run(&mut cmd);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let missing = line(&text, "capability CAP_NET_ADMIN");
    assert!(missing.starts_with("FAIL"), "{missing}");
    assert!(missing.contains("needed to attach programs to cgroups"), "{missing}");
    assert!(missing.contains("-- fix: run as root, or grant CAP_NET_ADMIN"), "{missing}");
    // Only that capability: the others are still there.
    for cap in ["CAP_BPF", "CAP_SYS_ADMIN", "CAP_PERFMON"] {
        assert!(line(&text, &format!("capability {cap}")).starts_with("pass"), "{text}");
    }
    assert!(text.ends_with("this node cannot run the tunnel until the failures above are fixed\n"));
}

#[test]
fn a_low_open_file_limit_fails_the_nofile_line() {
    let dir = tempfile::tempdir().unwrap();
    let pins = PinDir::new("nofile");
    let config = config(dir.path(), &pins.0);
    let mut cmd = precheck();
    cmd.arg("--config").arg(&config);
    // SAFETY: setrlimit is async-signal-safe; it only changes the child.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 256, rlim_max: 256 };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (out, text) = run(&mut cmd);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let nofile = line(&text, "nofile RLIMIT_NOFILE");
    assert!(nofile.starts_with("FAIL") && nofile.contains("soft 256, hard 256 <"), "{nofile}");
    assert!(nofile.contains("-- fix: raise the hard limit to"), "{nofile}");
    assert_eq!(failed(&text), vec![nofile], "only the limit is wrong:\n{text}");
}

#[test]
fn pins_of_another_map_version_fail_the_pin_version_line() {
    let dir = tempfile::tempdir().unwrap();
    let pins = PinDir::new("stale");
    let config = config(dir.path(), &pins.0);
    // First, with nothing pinned, the line passes: it would see no versions.
    let (out, text) = run(precheck().arg("--config").arg(&config));
    assert!(out.status.success(), "{text}");
    assert!(line(&text, "pin-version").starts_with("pass"));

    // A directory as an earlier release's tunnel leaves it (bpffs allows mkdir).
    std::fs::create_dir_all(pins.0.join("v0").join("maps")).unwrap();
    let (out, text) = run(precheck().arg("--config").arg(&config));
    assert_eq!(out.status.code(), Some(1), "{text}");
    let stale = line(&text, "pin-version");
    assert!(stale.starts_with("FAIL") && stale.contains("map version v0"), "{stale}");
    assert!(stale.contains(&format!("`ztunnel uninstall --pin-dir {}`", pins.0.display())), "{stale}");
    assert_eq!(failed(&text), vec![stale], "{text}");
}

#[test]
fn another_mesh_in_the_cni_chain_fails_the_cni_line() {
    let dir = tempfile::tempdir().unwrap();
    let pins = PinDir::new("cni");
    let config = config(dir.path(), &pins.0);
    let cni = cni_dir(dir.path(), &["calico", "istio-cni"]);
    let (out, text) =
        run(precheck().arg("--config").arg(&config).arg("--kubernetes").arg("--cni-conf-dir").arg(&cni));
    assert_eq!(out.status.code(), Some(1), "{text}");
    let chain = line(&text, "cni");
    assert!(chain.starts_with("FAIL") && chain.contains("istio-cni"), "{chain}");
    assert!(chain.contains("-- fix: remove that mesh"), "{chain}");
    assert_eq!(failed(&text), vec![chain], "{text}");
}

#[test]
fn another_mesh_redirect_rules_fail_the_netfilter_lines() {
    let dir = tempfile::tempdir().unwrap();
    let pins = PinDir::new("nf");
    let config = config(dir.path(), &pins.0);
    // Istio's sidecar rules, in a network namespace of the child's own that
    // goes away with it; the host's rules are never touched.
    let script = r#"iptables -t nat -N ISTIO_OUTPUT &&
        iptables -t nat -A OUTPUT -p tcp -j REDIRECT --to-ports 15001 &&
        exec "$0" precheck --config "$1""#;
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "--", "sh", "-c", script]).arg(bins::ztunnel().unwrap()).arg(&config);
    let (out, text) = run(&mut cmd);
    assert_eq!(out.status.code(), Some(1), "{}\n{text}", String::from_utf8_lossy(&out.stderr));
    let iptables = line(&text, "netfilter iptables-save");
    assert!(iptables.starts_with("FAIL"), "{iptables}");
    assert!(iptables.contains("`:ISTIO_OUTPUT - [0:0]`"), "{iptables}");
    assert!(iptables.contains("`-A OUTPUT -p tcp -j REDIRECT --to-ports 15001`"), "{iptables}");
    assert!(iptables.contains("-- fix: remove that mesh from this node first"), "{iptables}");
    // The same rules seen through nft (iptables-nft writes nftables).
    assert!(line(&text, "netfilter nft").starts_with("FAIL"), "{text}");
    assert!(failed(&text).iter().all(|l| l.contains("netfilter")), "{text}");
}

/// Stands in for the Kubernetes API server, which cannot run here: answers
/// GET of one pod and records what is POSTed (an Event), over HTTP/1.1 on
/// loopback, as kube-rs speaks to a plain-http server.
struct FakeApiServer {
    addr: std::net::SocketAddr,
    requests: mpsc::Receiver<(String, String, String)>,
}

impl FakeApiServer {
    fn start(pod_uid: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, requests) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut stream = stream;
                    loop {
                        let mut request_line = String::new();
                        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut length = 0;
                        loop {
                            let mut header = String::new();
                            reader.read_line(&mut header).unwrap();
                            if header.trim().is_empty() {
                                break;
                            }
                            if let Some((name, value)) = header.split_once(':')
                                && name.eq_ignore_ascii_case("content-length")
                            {
                                length = value.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; length];
                        reader.read_exact(&mut body).unwrap();
                        let body = String::from_utf8(body).unwrap();
                        let mut parts = request_line.split_whitespace();
                        let method = parts.next().unwrap_or("").to_owned();
                        // kube-rs adds an empty query to a POST.
                        let path = parts.next().unwrap_or("").split('?').next().unwrap_or("").to_owned();
                        let answer = if method == "GET" {
                            let name = path.rsplit('/').next().unwrap_or("");
                            serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                                "metadata": {"name": name, "namespace": "ztunnel-system", "uid": pod_uid}})
                            .to_string()
                        } else {
                            // Created: the object back, as the API server does.
                            body.clone()
                        };
                        let status = if method == "GET" { "200 OK" } else { "201 Created" };
                        let _ = tx.send((method, path, body));
                        let _ = write!(
                            stream,
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                            answer.len()
                        );
                    }
                });
            }
        });
        Self { addr, requests }
    }
}

#[test]
fn report_event_posts_a_warning_event_on_its_pod_and_holds() {
    let dir = tempfile::tempdir().unwrap();
    let pins = PinDir::new("event");
    let config = config(dir.path(), &pins.0);
    let cni = cni_dir(dir.path(), &["calico", "linkerd-cni"]);
    let api = FakeApiServer::start("6f1c2d2e-0000-4000-8000-000000000001");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n",
            api.addr
        ),
    )
    .unwrap();
    let mut child = precheck()
        .args(["--kubernetes", "--report-event", "--config"])
        .arg(&config)
        .arg("--cni-conf-dir")
        .arg(&cni)
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAME", "ztunnel-abcde")
        .env("POD_NAMESPACE", "ztunnel-system")
        .env_remove("POD_UID")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            let _ = lines_tx.send(l);
        }
    });

    // No uid given: it reads its pod, then posts the event on it.
    let (method, path, _) = api.requests.recv_timeout(WAIT).expect("the pod is read");
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("GET", "/api/v1/namespaces/ztunnel-system/pods/ztunnel-abcde")
    );
    let (method, path, body) = api.requests.recv_timeout(WAIT).expect("an event is posted");
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("POST", "/apis/events.k8s.io/v1/namespaces/ztunnel-system/events")
    );
    let event: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["type"], "Warning", "{event}");
    assert_eq!(event["reason"], "PrecheckFailed", "{event}");
    assert_eq!(event["regarding"]["kind"], "Pod", "{event}");
    assert_eq!(event["regarding"]["name"], "ztunnel-abcde", "{event}");
    assert_eq!(event["regarding"]["uid"], "6f1c2d2e-0000-4000-8000-000000000001", "{event}");
    let note = event["note"].as_str().unwrap();
    assert!(note.contains("cni: another mesh's CNI plugin") && note.contains("linkerd-cni"), "{note}");
    assert!(note.contains("fix: remove that mesh"), "{note}");

    // One clear log line, and the process holds rather than exiting.
    let holding = std::iter::from_fn(|| lines.recv_timeout(WAIT).ok())
        .find(|l| l.contains("holding instead of exiting"))
        .expect("a log line saying it holds");
    assert!(
        holding.contains("posted Warning event PrecheckFailed on pod ztunnel-system/ztunnel-abcde"),
        "{holding}"
    );
    assert!(child.try_wait().unwrap().is_none(), "precheck exited instead of holding");

    // Deleting the pod (SIGTERM) ends it, with the failure's exit code.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{status:?} (signal {:?})", status.signal());
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(line(&stdout, "cni").starts_with("FAIL"), "{stdout}");
}
