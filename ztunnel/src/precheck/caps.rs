//! The capabilities the tunnel uses, read from the effective set
//! (`CapEff` in /proc/self/status), each with what it is for.

use super::Finding;

/// (bit, name, what the tunnel does with it).
const NEEDED: &[(u32, &str, &str)] = &[
    (39, "CAP_BPF", "create the capture maps and load the programs"),
    (38, "CAP_PERFMON", "load programs that read socket and cgroup data (the verifier's pointer rules)"),
    (12, "CAP_NET_ADMIN", "attach programs to cgroups and network namespaces; mark delivery sockets"),
    (21, "CAP_SYS_ADMIN", "mount bpffs, pin links, enter workloads' network namespaces (setns)"),
    (13, "CAP_NET_RAW", "IP_TRANSPARENT: deliver to a workload with the caller's address as source"),
    (19, "CAP_SYS_PTRACE", "open a pod's network namespace through its processes (/proc/PID/ns/net)"),
    (1, "CAP_DAC_OVERRIDE", "write cgroup.procs, and pins and sockets owned by other users"),
];

pub(super) fn check() -> Vec<Finding> {
    let effective = match std::fs::read_to_string("/proc/self/status").map(|s| cap_eff(&s)) {
        Ok(Some(bits)) => bits,
        Ok(None) => return vec![Finding::not_checked("capability", "no CapEff line in /proc/self/status")],
        Err(e) => {
            return vec![Finding::not_checked("capability", format!("cannot read /proc/self/status: {e}"))];
        }
    };
    NEEDED
        .iter()
        .map(|(bit, name, what)| {
            if effective & (1u64 << bit) != 0 {
                Finding::pass("capability", format!("present: {what}")).about(*name)
            } else {
                Finding::fail(
                    "capability",
                    format!("missing; needed to {what}"),
                    format!(
                        "run as root, or grant {name} (Kubernetes: securityContext.capabilities.add; \
                         systemd: AmbientCapabilities=)"
                    ),
                )
                .about(*name)
            }
        })
        .collect()
}

fn cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_set() {
        let status = "Name:\tx\nCapPrm:\t0000000000000000\nCapEff:\t0000008000001000\n";
        let bits = cap_eff(status).unwrap();
        assert_ne!(bits & (1 << 39), 0, "CAP_BPF");
        assert_ne!(bits & (1 << 12), 0, "CAP_NET_ADMIN");
        assert_eq!(bits & (1 << 21), 0, "CAP_SYS_ADMIN");
        assert_eq!(cap_eff("Name:\tx\n"), None);
    }
}
