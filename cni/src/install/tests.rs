//! Install and uninstall over real directories of CNI configuration.

use std::{fs, os::unix::fs::PermissionsExt as _};

use tempfile::TempDir;

use super::*;

/// A node's directories: conf, bin, the service account, and a binary to
/// install.
struct Node {
    root: TempDir,
}

impl Node {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        for d in ["net.d", "bin", "sa"] {
            fs::create_dir(root.path().join(d)).unwrap();
        }
        fs::write(root.path().join("sa/token"), "token-1\n").unwrap();
        fs::write(root.path().join("sa/ca.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        fs::write(root.path().join("ztunnel-cni.build"), b"\x7fELF plugin binary").unwrap();
        Self { root }
    }

    fn conf_dir(&self) -> PathBuf {
        self.root.path().join("net.d")
    }

    fn conf(&self, name: &str) -> PathBuf {
        self.conf_dir().join(name)
    }

    fn write(&self, name: &str, text: &str) {
        fs::write(self.conf(name), text).unwrap();
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.conf(name)).unwrap()
    }

    fn layout(&self) -> Layout {
        Layout::new(self.conf_dir(), self.root.path().join("bin"), Path::new(DEFAULT_KUBECONFIG_NAME))
            .unwrap()
    }

    fn options(&self) -> InstallOptions {
        InstallOptions {
            layout: self.layout(),
            host_conf_dir: PathBuf::from("/etc/cni/net.d"),
            socket: PathBuf::from("/var/run/ztunnel/cni.sock"),
            timeout: None,
            log_level: None,
            log_file: None,
            api_server: Some(ApiServer { host: "10.96.0.1".into(), port: "443".into() }),
            service_account_dir: self.root.path().join("sa"),
            binary: self.root.path().join("ztunnel-cni.build"),
            strict: false,
        }
    }

    /// Every file of the conf dir with its bytes, for "nothing else changed".
    fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = fs::read_dir(self.conf_dir())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).unwrap()))
            .collect();
        files.sort();
        files
    }
}

const ENTRY: &str = r#"{"type": "ztunnel-cni", "socket": "/var/run/ztunnel/cni.sock", "kubeconfig": "/etc/cni/net.d/ztunnel-cni.kubeconfig"}"#;

const ONE_PLUGIN: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "kindnet",
  "plugins": [
    {
      "type": "ptp",
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}
    }
  ]
}
"#;

/// Install, check the result is the original with our entry last, install
/// again (nothing changes), uninstall (the original bytes are back).
fn install_twice_then_uninstall(node: &Node, name: &str, original: &str, expected: &str) {
    node.write(name, original);
    let report = install(&node.options()).unwrap();
    assert_eq!(report.conf_file, node.conf(name));
    assert!(report.conf_changed && report.binary_changed && report.kubeconfig_changed);
    assert_eq!(node.read(name), expected);
    // What the runtime will parse: our plugin last, the others as they were.
    let value: serde_json::Value = serde_json::from_str(&node.read(name)).unwrap();
    let plugins = value["plugins"].as_array().unwrap();
    assert_eq!(plugins.last().unwrap()["type"], "ztunnel-cni");

    let before = node.snapshot();
    let again = install(&node.options()).unwrap();
    assert!(!again.changed_anything(), "{again}");
    assert_eq!(node.snapshot(), before);

    let removed = uninstall(&node.layout()).unwrap();
    assert_eq!(removed.edited, vec![node.conf(name)]);
    assert!(removed.removed_kubeconfig && removed.removed_binary);
    assert_eq!(node.snapshot(), vec![(name.to_owned(), original.as_bytes().to_vec())]);
    assert!(fs::read_dir(node.root.path().join("bin")).unwrap().next().is_none());
}

#[test]
fn a_list_with_one_plugin() {
    let node = Node::new();
    let expected = ONE_PLUGIN.replace("    }\n  ]", &format!("    }},\n    {ENTRY}\n  ]"));
    install_twice_then_uninstall(&node, "10-kindnet.conflist", ONE_PLUGIN, &expected);
}

#[test]
fn a_list_with_several_plugins() {
    let node = Node::new();
    let original = "{\n    \"name\": \"k8s-pod-network\",\n    \"cniVersion\": \"0.3.1\",\n    \"plugins\": [\n        {\"type\": \"calico\", \"datastore_type\": \"kubernetes\"},\n        {\"type\": \"portmap\", \"snat\": true, \"capabilities\": {\"portMappings\": true}},\n        {\"type\": \"bandwidth\", \"capabilities\": {\"bandwidth\": true}}\n    ]\n}";
    let expected = original
        .replace("{\"bandwidth\": true}}\n", &format!("{{\"bandwidth\": true}}}},\n        {ENTRY}\n"));
    install_twice_then_uninstall(&node, "10-calico.conflist", original, &expected);
}

#[test]
fn odd_formatting_survives_byte_for_byte() {
    let node = Node::new();
    // Tabs, CRLF, unicode in values and keys, escapes, a compact tail.
    let original = "{\r\n\t\"name\":\t\"r\u{e9}seau-\u{1F680}\",\r\n\t\"cniVersion\" : \"1.0.0\" ,\r\n\t\"plugins\" :\t[\r\n\t\t{ \"type\" : \"bridge\", \"bridge\": \"cni\\u0030\", \"\u{e9}t\u{e9}\": \"\\\"quoted\\\"\" } ,\r\n\t\t{\"type\":\"firewall\"}\t]\r\n}\r\n";
    let expected =
        original.replace("{\"type\":\"firewall\"}", &format!("{{\"type\":\"firewall\"}},\r\n\t\t{ENTRY}"));
    install_twice_then_uninstall(&node, "05-bridge.conflist", original, &expected);
}

#[test]
fn a_compact_one_line_list() {
    let node = Node::new();
    let original = r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"ptp"}]}"#;
    let expected = format!(r#"{{"cniVersion":"1.0.0","name":"n","plugins":[{{"type":"ptp"}},{ENTRY}]}}"#);
    install_twice_then_uninstall(&node, "10-n.conflist", original, &expected);
}

/// A bare .conf becomes a .conflist the runtime picks in its place; the
/// .conf comes back byte for byte on uninstall.
#[test]
fn a_bare_conf_is_converted_and_restored() {
    let node = Node::new();
    let original = "{\n\t\"cniVersion\": \"0.3.1\",\n\t\"name\": \"mynet\",\n\t\"type\": \"bridge\",\n\t\"ipam\": {\"type\": \"host-local\", \"subnet\": \"10.22.0.0/16\"}\n}\n";
    node.write("10-mynet.conf", original);
    node.write("99-loopback.conf", "{\"cniVersion\": \"0.3.1\", \"name\": \"lo\", \"type\": \"loopback\"}");
    let report = install(&node.options()).unwrap();
    assert_eq!(report.conf_file, node.conf("10-mynet.conflist"));
    assert_eq!(report.converted_from, Some(node.conf("10-mynet.conf")));
    assert!(!node.conf("10-mynet.conf").exists());

    // The runtime's view: a list named as the .conf, its plugin first, ours last.
    let list: serde_json::Value = serde_json::from_str(&node.read("10-mynet.conflist")).unwrap();
    assert_eq!((list["name"].as_str(), list["cniVersion"].as_str()), (Some("mynet"), Some("0.3.1")));
    let plugins = list["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 2);
    assert_eq!(plugins[0], serde_json::from_str::<serde_json::Value>(original).unwrap());
    assert_eq!(plugins[1]["type"], "ztunnel-cni");
    // ... and it is the file the runtime now chooses.
    let found = candidates(&node.conf_dir(), DEFAULT_KUBECONFIG_NAME).unwrap();
    assert_eq!(found[primary(&found, &node.conf_dir()).unwrap()].path, node.conf("10-mynet.conflist"));

    let before = node.snapshot();
    assert!(!install(&node.options()).unwrap().changed_anything());
    assert_eq!(node.snapshot(), before);

    // A changed entry (another socket) is rewritten, and still undone exactly.
    let mut moved = node.options();
    moved.socket = PathBuf::from("/run/ztunnel/other.sock");
    assert!(install(&moved).unwrap().conf_changed);
    assert!(node.read("10-mynet.conflist").contains("/run/ztunnel/other.sock"));

    let removed = uninstall(&node.layout()).unwrap();
    assert_eq!(removed.restored, vec![(node.conf("10-mynet.conflist"), node.conf("10-mynet.conf"))]);
    assert_eq!(node.read("10-mynet.conf"), original);
    assert!(!node.conf("10-mynet.conflist").exists());
}

/// The primary plugin writes its .conf again after we converted it (some
/// do on every start): the runtime would pick the .conf, without us. Install
/// again makes the list from the new .conf; uninstall gives back the new one.
#[test]
fn a_conf_written_again_after_conversion_is_converted_again() {
    let node = Node::new();
    node.write("10-mynet.conf", r#"{"cniVersion": "1.0.0", "name": "mynet", "type": "bridge", "mtu": 1500}"#);
    install(&node.options()).unwrap();
    let rewritten = r#"{"cniVersion": "1.0.0", "name": "mynet", "type": "bridge", "mtu": 9000}"#;
    node.write("10-mynet.conf", rewritten);

    let report = install(&node.options()).unwrap();
    assert_eq!((report.conf_file, report.conf_changed), (node.conf("10-mynet.conflist"), true));
    assert!(!node.conf("10-mynet.conf").exists());
    assert!(node.read("10-mynet.conflist").contains("9000"));
    uninstall(&node.layout()).unwrap();
    assert_eq!(node.snapshot(), vec![("10-mynet.conf".to_owned(), rewritten.as_bytes().to_vec())]);

    // A .conflist that is not ours is never replaced.
    node.write("10-mynet.conflist", ONE_PLUGIN);
    node.write("05-other.conf", r#"{"cniVersion": "1.0.0", "name": "o", "type": "ptp"}"#);
    node.write("05-other.conflist", ONE_PLUGIN);
    let err = install(&node.options()).unwrap_err();
    assert!(matches!(err, InstallError::TargetExists { .. }), "{err}");
}

#[test]
fn a_bare_json_is_converted_too() {
    let node = Node::new();
    let original = r#"{"cniVersion": "1.0.0", "name": "j", "type": "ptp"}"#;
    node.write("10-j.json", original);
    let report = install(&node.options()).unwrap();
    assert_eq!(report.conf_file, node.conf("10-j.conflist"));
    uninstall(&node.layout()).unwrap();
    assert_eq!(node.snapshot(), vec![("10-j.json".to_owned(), original.as_bytes().to_vec())]);
}

/// A conversion that would let another file win the runtime's choice is refused.
#[test]
fn a_conversion_that_would_lose_precedence_is_refused() {
    let node = Node::new();
    node.write("10-a.conf", r#"{"cniVersion": "1.0.0", "name": "a", "type": "ptp"}"#);
    // Sorts after 10-a.conf but before 10-a.conflist, and is loadable.
    node.write("10-a.conf.json", r#"{"cniVersion": "1.0.0", "name": "b", "type": "bridge"}"#);
    let before = node.snapshot();
    let err = install(&node.options()).unwrap_err();
    assert!(
        matches!(&err, InstallError::LosesPrecedence { winner, .. } if winner.ends_with("10-a.conf.json")),
        "{err}"
    );
    assert_eq!(node.snapshot(), before);
}

/// The runtime's choice among several files: the first loadable one in byte
/// order; broken files, directories, other extensions and our kubeconfig are
/// passed over.
#[test]
fn the_runtime_s_file_is_chosen_among_several() {
    let node = Node::new();
    node.write("00-broken.conflist", "{\"name\": \"x\", \"plugins\": [");
    node.write("01-empty.conflist", "{\"name\": \"x\", \"plugins\": []}");
    node.write("02-list-in-a.conf", ONE_PLUGIN);
    node.write("03-no-name.conflist", "{\"plugins\": [{\"type\": \"ptp\"}]}");
    node.write("04-readme.txt", "not a config");
    fs::create_dir(node.conf("05-dir.conflist")).unwrap();
    node.write("10-Calico.conflist", ONE_PLUGIN);
    node.write("10-calico.conflist", ONE_PLUGIN);
    node.write("20-flannel.conflist", ONE_PLUGIN);
    node.write("99-loopback.conf", "{\"cniVersion\": \"0.3.1\", \"name\": \"lo\", \"type\": \"loopback\"}");
    // Our kubeconfig, even if an operator names it like a configuration.
    let mut opts = node.options();
    opts.layout =
        Layout::new(node.conf_dir(), node.root.path().join("bin"), Path::new("00-ztunnel.json")).unwrap();
    let before = node.snapshot();

    let report = install(&opts).unwrap();
    // "10-C" sorts before "10-c" in byte order, as in Go's sort.Strings.
    assert_eq!(report.conf_file, node.conf("10-Calico.conflist"));
    let after = node.snapshot();
    let changed: Vec<_> =
        after.iter().filter(|f| !before.contains(f)).map(|(name, _)| name.as_str()).collect();
    assert_eq!(changed, vec!["00-ztunnel.json", "10-Calico.conflist"]);
    assert!(!install(&opts).unwrap().changed_anything());

    uninstall(&opts.layout).unwrap();
    assert_eq!(node.snapshot(), before);
}

#[test]
fn a_directory_without_a_loadable_file_has_no_primary() {
    let node = Node::new();
    node.write("00-broken.conflist", "{");
    let err = install(&node.options()).unwrap_err();
    assert!(
        matches!(&err, InstallError::NoPrimary { skipped, .. } if skipped.contains("00-broken")),
        "{err}"
    );
    // Nothing was installed.
    assert!(fs::read_dir(node.root.path().join("bin")).unwrap().next().is_none());
}

/// A file that already chains us (from an earlier install by another
/// version, say) is left as it is when the entry is the same.
#[test]
fn an_already_chained_file_is_left_alone() {
    let node = Node::new();
    let chained = format!("{{\"name\": \"k\", \"plugins\": [{{\"type\": \"ptp\"}}, {ENTRY}]}}");
    node.write("10-k.conflist", &chained);
    let report = install(&node.options()).unwrap();
    assert!(!report.conf_changed);
    assert_eq!(node.read("10-k.conflist"), chained);
}

#[test]
fn the_kubeconfig_is_private_and_names_the_api_server() {
    let node = Node::new();
    node.write("10-kindnet.conflist", ONE_PLUGIN);
    install(&node.options()).unwrap();
    let path = node.conf(DEFAULT_KUBECONFIG_NAME);
    assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("server: https://10.96.0.1:443") && text.contains("token: token-1"), "{text}");
    assert_eq!(
        fs::metadata(node.root.path().join("bin/ztunnel-cni")).unwrap().permissions().mode() & 0o777,
        0o755
    );

    // A rotated token is written again; nothing else changes.
    fs::write(node.root.path().join("sa/token"), "token-2\n").unwrap();
    let report = install(&node.options()).unwrap();
    assert_eq!((report.kubeconfig_changed, report.conf_changed, report.binary_changed), (true, false, false));
    assert!(fs::read_to_string(&path).unwrap().contains("token: token-2"));
}

#[test]
fn the_entry_carries_the_plugin_settings() {
    let node = Node::new();
    let mut opts = node.options();
    opts.timeout = Some("10s".into());
    opts.log_level = Some("debug".into());
    opts.log_file = Some(PathBuf::from("/var/log/ztunnel-cni.log"));
    let entry: serde_json::Value = serde_json::from_str(&opts.entry()).unwrap();
    assert_eq!(
        entry,
        serde_json::json!({
            "type": "ztunnel-cni",
            "socket": "/var/run/ztunnel/cni.sock",
            "kubeconfig": "/etc/cni/net.d/ztunnel-cni.kubeconfig",
            "timeout": "10s",
            "log_level": "debug",
            "log_file": "/var/log/ztunnel-cni.log",
        })
    );
    // And the plugin reads it as its configuration.
    let conf =
        crate::config::PluginConfig::parse(&opts.entry().replacen('{', "{\"cniVersion\": \"1.0.0\", ", 1))
            .unwrap();
    assert_eq!(conf.kubeconfig(), Some(Path::new("/etc/cni/net.d/ztunnel-cni.kubeconfig")));
    assert_eq!(conf.timeout, std::time::Duration::from_secs(10));
}

/// Another mesh's plugin in the chain: a warning (reported) by default; with
/// strict, an error before anything is written.
#[test]
fn a_foreign_mesh_plugin_is_reported() {
    let node = Node::new();
    let original = "{\"name\": \"k\", \"plugins\": [{\"type\": \"ptp\"}, {\"type\": \"istio-cni\"}]}";
    node.write("10-k.conflist", original);

    let mut strict = node.options();
    strict.strict = true;
    let err = install(&strict).unwrap_err();
    assert!(matches!(&err, InstallError::ForeignMesh { plugins, .. } if plugins == &["istio-cni"]), "{err}");
    assert_eq!(node.snapshot(), vec![("10-k.conflist".to_owned(), original.as_bytes().to_vec())]);
    assert!(fs::read_dir(node.root.path().join("bin")).unwrap().next().is_none());

    let report = install(&node.options()).unwrap();
    assert_eq!(report.foreign_mesh_plugins, vec!["istio-cni".to_owned()]);
    assert!(report.to_string().contains("WARNING"));
    let value: serde_json::Value = serde_json::from_str(&node.read("10-k.conflist")).unwrap();
    assert_eq!(value["plugins"][2]["type"], "ztunnel-cni");
}

/// Uninstall finds our entry wherever it is, also outside today's primary.
#[test]
fn uninstall_takes_our_entry_out_of_every_file() {
    let node = Node::new();
    node.write(
        "20-old.conflist",
        &format!("{{\"name\": \"o\", \"plugins\": [{{\"type\": \"ptp\"}}, {ENTRY}]}}"),
    );
    node.write("10-new.conflist", ONE_PLUGIN);
    install(&node.options()).unwrap();
    let report = uninstall(&node.layout()).unwrap();
    assert_eq!(report.edited, vec![node.conf("10-new.conflist"), node.conf("20-old.conflist")]);
    assert_eq!(node.read("10-new.conflist"), ONE_PLUGIN);
    assert_eq!(node.read("20-old.conflist"), "{\"name\": \"o\", \"plugins\": [{\"type\": \"ptp\"}]}");
    // Nothing left to do the second time.
    assert_eq!(uninstall(&node.layout()).unwrap(), UninstallReport::default());
}

#[test]
fn a_symlinked_primary_is_refused() {
    let node = Node::new();
    node.write("real.txt", ONE_PLUGIN);
    std::os::unix::fs::symlink(node.conf("real.txt"), node.conf("10-link.conflist")).unwrap();
    assert!(matches!(install(&node.options()), Err(InstallError::Symlink { .. })));
}

#[test]
fn the_kubeconfig_stays_in_the_conf_dir() {
    let dir = PathBuf::from("/host/etc/cni/net.d");
    let bin = PathBuf::from("/host/opt/cni/bin");
    assert_eq!(Layout::new(dir.clone(), bin.clone(), Path::new("k")).unwrap().kubeconfig_name, "k");
    assert_eq!(
        Layout::new(dir.clone(), bin.clone(), Path::new("/host/etc/cni/net.d/k")).unwrap().kubeconfig_name,
        "k"
    );
    assert!(Layout::new(dir.clone(), bin.clone(), Path::new("/etc/k")).is_err());
    assert!(Layout::new(dir.clone(), bin.clone(), Path::new("sub/k")).is_err());
    assert!(Layout::new(dir, bin, Path::new("..")).is_err());
}
