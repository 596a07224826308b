//! RLIMIT_NOFILE against `capture.max_connections`: every carried connection
//! holds two descriptors (the workload's side and the peer's), on top of the
//! tunnel's own (listeners per pod, namespaces, maps, logs). The tunnel raises
//! its soft limit to the hard one at start, so the hard limit decides.

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};

use super::Finding;

/// Descriptors the tunnel holds besides its connections.
const RESERVE: u64 = 1024;

pub(super) fn check(max_connections: u32) -> Finding {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => return Finding::not_checked("nofile", format!("getrlimit(RLIMIT_NOFILE): {e}")),
    };
    judge(soft, hard, max_connections).about("RLIMIT_NOFILE")
}

fn judge(soft: u64, hard: u64, max_connections: u32) -> Finding {
    let needed = 2 * u64::from(max_connections) + RESERVE;
    let show = |n: u64| if n == RLIM_INFINITY { "unlimited".to_owned() } else { n.to_string() };
    let limits = format!("soft {}, hard {}", show(soft), show(hard));
    let need = format!(
        "{needed} for capture.max_connections {max_connections} (2 per connection + {RESERVE} for the tunnel)"
    );
    if hard >= needed {
        let raised = if soft < needed { "; the tunnel raises the soft limit to the hard one" } else { "" };
        Finding::pass("nofile", format!("{limits} >= {need}{raised}"))
    } else {
        let mut fix = format!(
            "raise the hard limit to {needed} or more (systemd: LimitNOFILE={needed}; container runtime: \
             its nofile ulimit)"
        );
        let fitting = hard.saturating_sub(RESERVE) / 2;
        if fitting > 0 {
            fix.push_str(&format!(", or set capture.max_connections to {fitting} or less"));
        }
        Finding::fail("nofile", format!("{limits} < {need}"), fix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::precheck::Status;

    #[test]
    fn the_hard_limit_decides() {
        let ok = judge(1024, 1 << 20, 65536);
        assert_eq!(ok.status, Status::Pass, "{}", ok.detail);
        assert!(ok.detail.contains("raises the soft limit"), "{}", ok.detail);
        let low = judge(256, 256, 65536);
        assert_eq!(low.status, Status::Fail);
        assert!(low.detail.contains("< 132096 for capture.max_connections 65536"), "{}", low.detail);
        assert!(low.fix.unwrap().contains("LimitNOFILE=132096"));
        let fits = judge(20000, 20000, 65536).fix.unwrap();
        assert!(fits.ends_with("or set capture.max_connections to 9488 or less"), "{fits}");
        assert_eq!(judge(RLIM_INFINITY, RLIM_INFINITY, u32::MAX).status, Status::Pass);
    }
}
