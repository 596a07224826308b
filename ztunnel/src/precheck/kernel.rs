//! The kernel's version against the features the programs use, and BTF.
//!
//! Both explain rather than decide: distribution kernels backport BPF
//! features, so a kernel older than the table below passes when every program
//! loads and attaches (the `ebpf-program` lines), and fails only when they do
//! not, naming what its version predates.

use std::path::Path;

use super::Finding;

/// The oldest upstream kernel that has each feature the tunnel uses.
const FEATURES: &[((u32, u32), &str)] = &[
    ((4, 13), "sock_ops programs"),
    ((4, 17), "cgroup connect4/connect6 programs"),
    ((5, 7), "bpf_link for cgroup programs, pinned across tunnel restarts"),
    ((5, 8), "BPF ring buffer (kernel-side logs), CAP_BPF and CAP_PERFMON"),
    ((5, 9), "sk_lookup programs (inbound steering)"),
    ((5, 15), "bpf_get_netns_cookie in sock_ops programs"),
];

const BTF: &str = "/sys/kernel/btf/vmlinux";

fn minimum() -> (u32, u32) {
    FEATURES.iter().map(|(v, _)| *v).max().unwrap_or((0, 0))
}

/// `6.1.0-18-amd64` -> (6, 1).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

pub(super) fn version(programs_work: bool) -> Finding {
    let release = match std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        Ok(r) => r.trim().to_owned(),
        Err(e) => {
            return Finding::not_checked("kernel", format!("cannot read /proc/sys/kernel/osrelease: {e}"));
        }
    };
    let (min_major, min_minor) = minimum();
    let Some(version) = parse_release(&release) else {
        return Finding::not_checked("kernel", format!("Linux {release}: version not understood"));
    };
    let missing: Vec<String> = FEATURES
        .iter()
        .filter(|(v, _)| version < *v)
        .map(|((major, minor), what)| format!("{what} ({major}.{minor})"))
        .collect();
    if missing.is_empty() {
        Finding::pass(
            "kernel",
            format!(
                "Linux {release}: {min_major}.{min_minor} or later has every BPF feature the tunnel uses"
            ),
        )
    } else if programs_work {
        Finding::pass(
            "kernel",
            format!(
                "Linux {release} predates {}, but every program loads and attaches: its distribution backports them",
                missing.join(", ")
            ),
        )
    } else {
        Finding::fail(
            "kernel",
            format!("Linux {release} predates {}", missing.join(", ")),
            format!(
                "run Linux {min_major}.{min_minor} or later on this node (or a distribution kernel that backports these)"
            ),
        )
    }
}

pub(super) fn btf(programs_work: bool) -> Finding {
    match std::fs::metadata(Path::new(BTF)) {
        Ok(m) => Finding::pass(
            "btf",
            format!("{BTF} ({} KiB): the kernel describes its own types", m.len() / 1024),
        ),
        Err(_) if programs_work => {
            Finding::pass("btf", format!("{BTF} is absent, and not needed: every program loads without it"))
        }
        Err(e) => Finding::fail(
            "btf",
            format!("{BTF}: {e}"),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's is)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_distribution_releases() {
        assert_eq!(parse_release("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.14.0-362.el9.x86_64"), Some((5, 14)));
        assert_eq!(parse_release("6.18.44-fc-v1098"), Some((6, 18)));
        assert_eq!(parse_release("garbage"), None);
    }

    #[test]
    fn the_minimum_is_the_newest_feature() {
        assert_eq!(minimum(), (5, 15));
        assert!((5, 10) < minimum() && (6, 0) > minimum());
    }
}
