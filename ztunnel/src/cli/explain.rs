//! `ztunnel explain`: why a call works or fails, asked of a running tunnel
//! (its admin endpoint's `GET /explain`) and printed for a person, or as
//! the endpoint's JSON.

use std::{net::SocketAddr, process::ExitCode};

use anyhow::Context as _;

use crate::explain::{
    Query,
    model::{Explanation, WorkloadView},
};

/// Exit 0 when the call would be allowed and no failure between the two was
/// recorded recently, 1 otherwise; errors (bad input, no tunnel) are the
/// caller's to map (2).
pub fn explain(admin: SocketAddr, from: &str, to: &str, json: bool) -> anyhow::Result<ExitCode> {
    // Checked here too, so a typo is told without a round trip.
    Query::new(from, to)?;
    let path = format!("/explain?{}", Query::to_query_string(from, to));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (status, body) = runtime
        .block_on(crate::http::get(admin, &path))
        .with_context(|| format!("asking the tunnel's admin endpoint {admin}"))?;
    anyhow::ensure!(
        status.is_success(),
        "{admin}/explain answered {status}: {}",
        String::from_utf8_lossy(&body).trim()
    );
    let e: Explanation = serde_json::from_slice(&body).context("the admin endpoint's answer")?;
    if json {
        println!("{}", String::from_utf8_lossy(&body).trim_end());
    } else {
        print!("{}", render(&e));
    }
    Ok(if e.verdict.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The explanation for a person: the verdict first, then each part.
pub fn render(e: &Explanation) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let head = if e.verdict.ok { "OK" } else { "FAILS" };
    let _ = writeln!(out, "{head}: {}", e.verdict.summary);
    let _ = writeln!(out, "  cause: {} (asked of node {} at {})", e.verdict.cause, e.node, e.time);
    let _ = writeln!(out);

    let _ = writeln!(out, "from {}", e.query.from);
    match &e.source.workload {
        Some(w) => workload(&mut out, w),
        None => {
            let _ = writeln!(out, "  outside the mesh: calls in plaintext");
        }
    }
    let d = &e.destination;
    let _ = writeln!(out, "to {}", d.address);
    if let Some(s) = &d.service {
        let endpoints =
            if s.ready_endpoints.is_empty() { "none".to_owned() } else { s.ready_endpoints.join(", ") };
        let _ = writeln!(out, "  service {} (ready endpoints: {endpoints})", s.name);
    }
    match &d.workload {
        Some(w) => workload(&mut out, w),
        None => {
            let _ = writeln!(out, "  outside the mesh: no workload of the mesh has this address");
        }
    }
    if let Some(id) = &d.expected_identity {
        let _ = writeln!(out, "  expected identity {id}");
    }

    let _ = writeln!(out, "trust domain {}", e.trust.trust_domain);
    for r in &e.trust.roots {
        let signing = if r.fingerprint == e.trust.signing_root { ", signing" } else { "" };
        let _ = writeln!(
            out,
            "  root {} {} (not after {}, in {}{signing})",
            r.fingerprint,
            r.subject,
            r.not_after,
            super::human_seconds(r.expires_in_seconds)
        );
    }

    match &e.policy {
        Some(p) => {
            let by = match (&p.policy, p.rule) {
                (Some(policy), Some(rule)) => format!(", policy {policy} rule {rule}"),
                (Some(policy), None) => format!(", policy {policy}"),
                _ => String::new(),
            };
            let whose = if p.decided_here {
                "this node decides"
            } else {
                "this node's view; the destination's node decides"
            };
            let _ = writeln!(
                out,
                "policy {} for {} on port {}: {}{by} ({whose})",
                p.decision.to_uppercase(),
                p.caller,
                p.port,
                p.reason
            );
            if let Some(n) = &p.note {
                let _ = writeln!(out, "  note: {n}");
            }
            for d in &p.dry_run {
                let _ = writeln!(out, "  dry-run: {d}");
            }
        }
        None => {
            let _ = writeln!(out, "policy: none applies (the destination is outside the mesh)");
        }
    }

    let f = &e.failures;
    let recent = f.matching.iter().filter(|x| x.recent).count();
    let _ = writeln!(
        out,
        "failures between the two: {} recorded, {recent} in the last {}s (ring: {}/{})",
        f.matching.len(),
        f.window_seconds,
        f.held,
        f.capacity
    );
    for x in &f.matching {
        let r = &x.record;
        let _ =
            writeln!(out, "  {} {} {} {} ({}s ago)", r.time, r.direction, r.mode, r.reason, x.age_seconds);
        if let Some(c) = &r.certificate {
            if let (Some(found), Some(want)) = (&c.presented_identity, &c.expected) {
                let _ = writeln!(out, "    presented {found}, expected {want}");
            }
            if let Some(t) = &c.not_after {
                let _ = writeln!(out, "    certificate not after {t}");
            }
            if let Some(t) = &c.not_before {
                let _ = writeln!(out, "    certificate not before {t}");
            }
        }
        if let Some(p) = &r.policy {
            let rule = r.rule.map(|n| format!(" rule {n}")).unwrap_or_default();
            let _ = writeln!(out, "    policy {p}{rule}");
        }
        if !r.detail.is_empty() {
            let _ = writeln!(out, "    {}", r.detail);
        }
    }
    out
}

fn workload(out: &mut String, w: &WorkloadView) {
    use std::fmt::Write as _;
    let place = if w.on_this_node { format!("on {} (this node)", w.node) } else { format!("on {}", w.node) };
    let _ = writeln!(out, "  workload {} {place}, identity {}", w.name, w.identity);
    let enrollment = w.enrollment.as_deref().map(|s| format!("{s}, ")).unwrap_or_default();
    let _ = writeln!(
        out,
        "  {enrollment}mTLS {}, authorization {}{}, outbound passthrough {}",
        w.mtls,
        w.authorization,
        if w.default_deny { " (default-deny)" } else { "" },
        w.outbound_passthrough
    );
    if let Some(e) = &w.enrollment_error {
        let _ = writeln!(out, "  enrollment error: {e}");
    }
    if let Some(c) = &w.certificate {
        let expiry = match (&c.not_after, c.expires_in_seconds) {
            (Some(t), Some(s)) => format!("not after {t} (in {})", super::human_seconds(s)),
            _ => "no certificate yet".to_owned(),
        };
        let _ = writeln!(
            out,
            "  certificate {} serial {}, {expiry}",
            c.state,
            c.serial.as_deref().unwrap_or("-")
        );
        let _ = writeln!(
            out,
            "    last renewal {}, last error {}",
            c.last_renewal.as_deref().unwrap_or("-"),
            c.last_error.as_deref().unwrap_or("-")
        );
    }
}
