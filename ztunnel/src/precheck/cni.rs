//! The CNI configuration directory of a Kubernetes node: the container
//! runtime uses the first configuration file in name order (the primary
//! network), and ztunnel-cni chains itself into that file's plugin list. So
//! there must be one, it must parse, and no other mesh's plugin may already be
//! in its chain (two meshes enrolling the same pods break both).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::Finding;

/// CNI plugin types of other meshes.
const FOREIGN_PLUGINS: [&str; 3] = ["istio-cni", "linkerd-cni", "kuma-cni"];

/// Our own plugin, which may already be chained (a reinstall).
const OURS: &str = "ztunnel-cni";

pub(super) fn check(dir: &Path) -> Finding {
    let shown = dir.display();
    let primary = match primary(dir) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Finding::fail(
                "cni",
                format!("no CNI configuration (*.conflist, *.conf, *.json) in {shown}"),
                "install the cluster's network plugin first (ztunnel-cni chains into it), or pass \
                 --cni-conf-dir where the container runtime reads it",
            );
        }
        Err(e) => {
            return Finding::fail(
                "cni",
                format!("cannot read {shown}: {e}"),
                "mount the host's CNI configuration directory into the precheck container",
            );
        }
    };
    let name = primary.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let chain = match std::fs::read_to_string(&primary)
        .map_err(|e| e.to_string())
        .and_then(|text| plugin_types(&text))
    {
        Ok(chain) => chain,
        Err(e) => {
            return Finding::fail(
                "cni",
                format!("the primary configuration {} cannot be read: {e}", primary.display()),
                "the container runtime cannot read it either: fix or remove it",
            );
        }
    };
    let foreign: Vec<&str> =
        chain.iter().map(String::as_str).filter(|t| FOREIGN_PLUGINS.contains(t)).collect();
    if !foreign.is_empty() {
        return Finding::fail(
            "cni",
            format!("another mesh's CNI plugin in the chain of {name}: {}", foreign.join(", ")),
            "remove that mesh (istioctl uninstall, linkerd uninstall) so that its plugin leaves the chain, \
             then install ztunnel",
        );
    }
    let ours = if chain.iter().any(|t| t == OURS) { "; ztunnel-cni already chained" } else { "" };
    Finding::pass("cni", format!("primary {name} in {shown}: plugins {}{ours}", chain.join(", ")))
}

/// The file the container runtime uses: the first configuration by name.
fn primary(dir: &Path) -> std::io::Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| p.extension().is_some_and(|e| e == "conflist" || e == "conf" || e == "json"))
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// The plugin types of a .conflist (`plugins[].type`) or a single .conf
/// (`type`).
fn plugin_types(text: &str) -> Result<Vec<String>, String> {
    let config: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let plugins: Vec<&Value> = match config.get("plugins") {
        Some(Value::Array(list)) => list.iter().collect(),
        Some(_) => return Err("`plugins` is not a list".into()),
        None => vec![&config],
    };
    let types: Vec<String> =
        plugins.iter().filter_map(|p| p.get("type").and_then(Value::as_str)).map(str::to_owned).collect();
    if types.is_empty() {
        return Err("no plugin has a `type`".into());
    }
    Ok(types)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::precheck::Status;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    const CALICO: &str =
        r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"calico"},{"type":"portmap"}]}"#;

    #[test]
    fn the_first_file_is_the_primary_and_its_chain_is_read() {
        let dir = dir_with(&[
            ("10-calico.conflist", CALICO),
            ("99-other.conf", r#"{"type":"istio-cni"}"#),
            ("README", "not a config"),
        ]);
        let f = check(dir.path());
        assert_eq!(f.status, Status::Pass, "{}", f.detail);
        assert!(f.detail.contains("primary 10-calico.conflist") && f.detail.contains("calico, portmap"));
    }

    #[test]
    fn another_mesh_in_the_chain_fails() {
        let dir = dir_with(&[(
            "10-calico.conflist",
            r#"{"name":"k8s-pod-network","plugins":[{"type":"calico"},{"type":"istio-cni"}]}"#,
        )]);
        let f = check(dir.path());
        assert_eq!(f.status, Status::Fail);
        assert!(f.detail.contains("istio-cni"), "{}", f.detail);
    }

    #[test]
    fn an_empty_or_broken_directory_fails() {
        assert_eq!(check(dir_with(&[]).path()).status, Status::Fail);
        assert_eq!(check(dir_with(&[("10-x.conflist", "{")]).path()).status, Status::Fail);
        assert_eq!(check(Path::new("/nonexistent/cni")).status, Status::Fail);
        assert_eq!(plugin_types(r#"{"type":"bridge"}"#).unwrap(), vec!["bridge"]);
    }
}
