//! `cargo xtask kind-demo` on a machine that cannot run it: it must say what
//! is missing in one line and fail before it does anything (no cluster, no
//! image build). These machines have a docker client without an engine,
//! which is the first case.

use std::process::{Command, Output};

fn kind_demo(configure: impl FnOnce(&mut Command)) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.arg("kind-demo");
    configure(&mut cmd);
    cmd.output().unwrap()
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr).lines().map(str::to_owned).collect()
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|dir| dir.join(tool).is_file()))
}

#[test]
fn without_a_docker_engine_it_says_so_in_one_line_and_fails() {
    // A socket nobody listens on: whatever this machine has, there is no
    // engine behind it.
    let out = kind_demo(|c| {
        c.env("DOCKER_HOST", "unix:///nonexistent/ztunnel-test/docker.sock");
    });
    assert!(!out.status.success(), "exit status {}", out.status);
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "one line, got: {lines:#?}");
    assert!(lines[0].starts_with("xtask: kind-demo needs docker with a running engine, kind and kubectl: "));
    let expected = if on_path("docker") {
        "docker: no running engine (`docker info`: "
    } else {
        "docker: not found on PATH"
    };
    assert!(lines[0].contains(expected), "{expected:?} missing from {:?}", lines[0]);
    assert!(out.stdout.is_empty(), "it printed as if it ran: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn every_missing_tool_is_named_in_the_one_line() {
    let out = kind_demo(|c| {
        c.env("PATH", "/nonexistent/ztunnel-test/bin");
    });
    assert!(!out.status.success(), "exit status {}", out.status);
    let lines = stderr_lines(&out);
    assert_eq!(
        lines,
        ["xtask: kind-demo needs docker with a running engine, kind and kubectl: \
          docker: not found on PATH; kind: not found on PATH; kubectl: not found on PATH"]
    );
    assert!(out.stdout.is_empty());
}
