//! The pin directory (`capture.bpf_pin_dir`): on bpffs (or where the tunnel
//! will mount one), and holding no pins of another map version. Pins live
//! under `<pin_dir>/v<MAP_ABI_VERSION>`; another version's links stay attached
//! as long as they are pinned, so its programs would capture beside this
//! tunnel's with maps this tunnel cannot read.

use std::path::Path;

use ztunnel_ebpf_common::MAP_ABI_VERSION;

use super::Finding;
use crate::capture::pins;

pub(super) fn check(pin_dir: &Path) -> Vec<Finding> {
    vec![on_bpffs(pin_dir), versions(pin_dir)]
}

fn on_bpffs(pin_dir: &Path) -> Finding {
    let check = "pin-dir";
    let shown = pin_dir.display();
    let ancestor = pins::existing_ancestor(pin_dir);
    if pins::on_bpffs(&ancestor) {
        Finding::pass(check, format!("{shown}: on bpffs ({} is)", ancestor.display()))
    } else if pin_dir.starts_with(pins::BPFFS_MOUNT) {
        Finding::pass(check, format!("{shown}: the tunnel mounts bpffs at {} first", pins::BPFFS_MOUNT))
    } else {
        Finding::fail(
            check,
            format!("{shown} is not on a bpf filesystem ({} is not)", ancestor.display()),
            format!("set capture.bpf_pin_dir under {} (or under another bpffs mount)", pins::BPFFS_MOUNT),
        )
    }
}

fn versions(pin_dir: &Path) -> Finding {
    let check = "pin-version";
    let shown = pin_dir.display();
    let ours = format!("v{MAP_ABI_VERSION}");
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Finding::pass(
                check,
                format!("{shown}: nothing pinned yet; this tunnel pins under {ours}"),
            );
        }
        Err(e) => return Finding::fail(check, format!("cannot read {shown}: {e}"), "run precheck as root"),
    };
    let mut others = Vec::new();
    let mut has_ours = false;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == ours {
            has_ours = true;
        } else if name
            .strip_prefix('v')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            others.push(name);
        }
    }
    others.sort();
    if !others.is_empty() {
        return Finding::fail(
            check,
            format!(
                "{shown} holds pins of map version {} from another ztunnel release (this one uses {ours}): \
                 its programs stay attached and capture beside this tunnel's",
                others.join(", ")
            ),
            format!("stop that tunnel, then `ztunnel uninstall --pin-dir {shown}`, then install this one"),
        );
    }
    if has_ours {
        Finding::pass(
            check,
            format!("{shown}/{ours}: pinned by a tunnel of this version; a restart keeps enrollment"),
        )
    } else {
        Finding::pass(check, format!("{shown}: no ztunnel pins; this tunnel pins under {ours}"))
    }
}
