//! `ztunnel policy check` and `ztunnel policy matrix`: the decisions the
//! tunnel would make, explained, from the configuration file alone.

use std::{path::PathBuf, process::ExitCode, time::SystemTime};

use anyhow::Context as _;
use clap::Subcommand;

use crate::{
    config::{Config, MtlsMode},
    identity::spiffe::SpiffeId,
    policy::{
        Verdict, decide,
        explain::{Column, Matrix, caller_name, find_workload},
    },
    workload::Workload,
};

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// One decision, and which policy and rule made it. Exit 0: allowed
    /// (including would-deny in audit mode); 1: denied; 2: bad input.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// A SPIFFE ID, or `plaintext` for a caller without mTLS.
        #[arg(long)]
        from: String,
        /// `<workload>:<port>`; the workload as `name` or `namespace/name`.
        #[arg(long)]
        to: String,
        /// Decide as if the workload's authorization mode were `enforce`:
        /// what switching an audited namespace to enforce would do.
        #[arg(long)]
        assume_enforce: bool,
    },
    /// Who may call what: every caller identity (and plaintext) against
    /// every workload and port the configuration names.
    Matrix {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = MatrixFormat::Text)]
        format: MatrixFormat,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum MatrixFormat {
    Text,
    Csv,
    Json,
}

/// Runs a policy command; returns the process exit code.
pub fn policy(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { config, from, to, assume_enforce } => {
            check(&config, &from, &to, assume_enforce)
        }
        PolicyCommand::Matrix { config, format } => {
            let config = load(&config)?;
            let matrix = Matrix::build(&config, SystemTime::now())?;
            match format {
                MatrixFormat::Text => print_text(&matrix),
                MatrixFormat::Csv => print_csv(&matrix),
                MatrixFormat::Json => println!("{}", serde_json::to_string_pretty(&matrix_json(&matrix))?),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    let config = Config::load(path)?;
    for w in config.warnings() {
        eprintln!("warning: {w}");
    }
    Ok(config)
}

fn check(path: &std::path::Path, from: &str, to: &str, assume_enforce: bool) -> anyhow::Result<ExitCode> {
    let config = load(path)?;
    let caller = match from {
        "plaintext" => None,
        id => Some(id.parse::<SpiffeId>().with_context(|| format!("--from {id}"))?),
    };
    let (name, port) =
        to.rsplit_once(':').with_context(|| format!("--to {to}: expected <workload>:<port>"))?;
    let port: u16 = port.parse().with_context(|| format!("--to {to}: `{port}` is not a port"))?;
    let wc = find_workload(&config, name)?;
    let workload = Workload::from_config(&config, wc)?;
    let modes = config.authorization_modes(wc);
    let mut decision = decide(&config, wc, &workload, caller.as_ref(), port, SystemTime::now());
    let verdict = match decision.verdict {
        Verdict::Allow => "ALLOW",
        Verdict::Deny => "DENY",
        Verdict::WouldDeny if assume_enforce => {
            decision.verdict = Verdict::Deny;
            "DENY (once enforced; the workload is in audit mode)"
        }
        Verdict::WouldDeny => "WOULD DENY (audit mode: the connection is allowed)",
    };
    println!("{verdict}: {from} -> {}:{port}", workload.key());
    println!("  reason: {}", decision.reason);
    match (&decision.policy, decision.rule) {
        (Some(p), Some(r)) => println!("  policy: {p}, rule {r}"),
        (Some(p), None) => println!("  policy: {p}"),
        _ => {}
    }
    if let Some(n) = &decision.note {
        println!("  note: {n}");
    }
    println!(
        "  mode: mTLS {}, authorization {}{}",
        match config.mtls_mode(wc) {
            MtlsMode::Strict => "strict",
            MtlsMode::Permissive => "permissive",
        },
        if modes.enforce { "enforce" } else { "audit" },
        if modes.default_deny { ", default-deny" } else { "" }
    );
    for d in &decision.dry_run {
        println!("  dry-run: {d}");
    }
    Ok(if decision.verdict.admits() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn letter(v: Verdict) -> char {
    match v {
        Verdict::Allow => 'A',
        Verdict::Deny => 'D',
        Verdict::WouldDeny => 'W',
    }
}

fn print_text(m: &Matrix) {
    println!("A = allow, D = deny, W = would deny (audit mode: allowed). Columns (`*`: any other port):");
    for (i, c) in m.columns.iter().enumerate() {
        println!("  {i:>3}  {}", c.name());
    }
    let names: Vec<String> = m.callers.iter().map(caller_name).collect();
    let width = names.iter().map(String::len).max().unwrap_or(9).max(9);
    let header: String = (0..m.columns.len()).map(|i| format!("{i:>4}")).collect();
    println!("{:<width$} {header}", "from \\ to");
    for (name, row) in names.iter().zip(&m.cells) {
        let cells: String = row.iter().map(|d| format!("{:>4}", letter(d.verdict))).collect();
        println!("{name:<width$} {cells}");
    }
}

fn print_csv(m: &Matrix) {
    let header: Vec<String> = m.columns.iter().map(Column::name).collect();
    println!("from,{}", header.join(","));
    for (caller, row) in m.callers.iter().zip(&m.cells) {
        let cells: Vec<&str> = row.iter().map(|d| d.verdict.as_str()).collect();
        println!("{},{}", caller_name(caller), cells.join(","));
    }
}

fn matrix_json(m: &Matrix) -> serde_json::Value {
    let mut out = Vec::new();
    for (caller, row) in m.callers.iter().zip(&m.cells) {
        for (column, d) in m.columns.iter().zip(row) {
            out.push(serde_json::json!({
                "from": caller_name(caller),
                "to": column.name(),
                "decision": d.verdict.as_str(),
                "reason": d.reason,
                "policy": d.policy,
                "rule": d.rule,
            }));
        }
    }
    serde_json::Value::Array(out)
}
