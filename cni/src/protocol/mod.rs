//! The enrollment protocol between the CNI plugin and the node's tunnel.
//!
//! A unix stream socket (default [`DEFAULT_SOCKET_PATH`]), one request per
//! connection:
//!
//! 1. The plugin connects and sends one JSON [`Request`] terminated by `\n`.
//!    For `add` and `check` the same `sendmsg` carries the pod's network
//!    namespace as an `SCM_RIGHTS` file descriptor; `del` carries none (the
//!    namespace may already be gone when a pod is deleted).
//! 2. The tunnel answers one JSON [`Response`] line and closes.
//!
//! ```text
//! -> {"version":1,"command":"add","container_id":"4f1c..","pod_namespace":"shop",
//!     "pod_name":"cart-7d9","pod_uid":"0b6e..","netns_path":"/var/run/netns/cni-1b2",
//!     "interface":"eth0","ips":["10.244.1.5","fd00::5"]}      + SCM_RIGHTS [netns fd]
//! <- {"result":"enrolled","message":""}
//! ```
//!
//! The answer that means success depends on the command: `enrolled` for
//! `add`, `removed` for `del`, `ok` for `check` ([`Command::success`]); any
//! other answer, `error` included, is a failure and `message` says why.
//!
//! The fd, not `netns_path`, is what the tunnel must use: the path is only for
//! logs. A path can be unmounted or reused between the plugin's open and the
//! tunnel's; the fd pins the namespace the runtime handed to the plugin.
//!
//! The plugin's half is [`client::request`] (blocking); the tunnel's half is
//! [`server::read_request`] and [`server::write_response`] (tokio), or
//! [`server::serve_connection`], which does the whole exchange.

use std::{io, net::IpAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

pub mod client;
pub mod server;

/// Where the tunnel listens unless configured otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/ztunnel/cni.sock";
/// The only protocol version so far.
pub const PROTOCOL_VERSION: u32 = 1;
/// A generous bound on a request line (newline included): a real request is
/// a few hundred bytes, and the bound is what stops a peer from making the
/// tunnel buffer without end.
pub const DEFAULT_MAX_REQUEST_LEN: usize = 64 * 1024;
/// The bound on a response line the plugin accepts.
pub const MAX_RESPONSE_LEN: usize = 64 * 1024;
/// How long [`server::serve_connection`] waits for a request by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// Enroll the pod whose namespace travels with the request.
    Add,
    /// Forget the pod (its sandbox is being torn down).
    Del,
    /// Is the pod (whose namespace travels with the request) enrolled?
    Check,
}

impl Command {
    /// The answer that means the command succeeded.
    pub fn success(self) -> Outcome {
        match self {
            Command::Add => Outcome::Enrolled,
            Command::Del => Outcome::Removed,
            Command::Check => Outcome::Ok,
        }
    }

    /// Whether the request must carry the pod's network namespace.
    pub fn carries_netns(self) -> bool {
        matches!(self, Command::Add | Command::Check)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "add",
            Command::Del => "del",
            Command::Check => "check",
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One request line from the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// [`PROTOCOL_VERSION`]; a server refuses versions it does not speak.
    pub version: u32,
    pub command: Command,
    /// The sandbox (infra container) id: the one key the runtime gives for
    /// ADD, CHECK and DEL of the same pod sandbox alike.
    pub container_id: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// The runtime's path to the namespace, for logs only; may be empty for `del`.
    #[serde(default)]
    pub netns_path: String,
    /// The pod's interface inside its namespace (`CNI_IFNAME`, e.g. `eth0`).
    pub interface: String,
    /// The pod's addresses from the previous plugin's result, without prefix
    /// length; empty for `del`.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Enrolled,
    Removed,
    Ok,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Enrolled => "enrolled",
            Outcome::Removed => "removed",
            Outcome::Ok => "ok",
            Outcome::Error => "error",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one response line from the tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub result: Outcome,
    /// Why, for `error`; free text otherwise (may be empty).
    #[serde(default)]
    pub message: String,
}

impl Response {
    pub fn new(result: Outcome, message: impl Into<String>) -> Self {
        Self { result, message: message.into() }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self::new(Outcome::Error, message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("cannot connect to the tunnel at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("timed out after {0:?} waiting for the tunnel")]
    Timeout(Duration),
    #[error("cannot send the request: {0}")]
    Send(io::Error),
    #[error("cannot receive: {0}")]
    Receive(io::Error),
    #[error("the peer closed the connection after {received} bytes, before a complete line")]
    Closed { received: usize },
    #[error("the line is longer than {max} bytes")]
    LineTooLong { max: usize },
    #[error("malformed message: {0}")]
    Malformed(serde_json::Error),
    #[error("cannot encode the message: {0}")]
    Encode(serde_json::Error),
    #[error("protocol version {0} is not supported (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u32),
    #[error("`{0}` must carry the pod's network namespace fd, and none came")]
    MissingNetns(Command),
    #[error("`{0}` must not carry a file descriptor")]
    UnexpectedFd(Command),
    #[error("{0} file descriptors came with the request; exactly one is allowed")]
    TooManyFds(usize),
    #[error("the request's control data was truncated by the kernel")]
    ControlTruncated,
    #[error("the fd that came with the request is not a network namespace: {0}")]
    NotANetns(String),
}

impl ProtocolError {
    /// Whether the tunnel could not be reached or did not answer in time, as
    /// opposed to answering something wrong: the runtime should try again later.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ProtocolError::Connect { .. }
                | ProtocolError::Timeout(_)
                | ProtocolError::Send(_)
                | ProtocolError::Receive(_)
                | ProtocolError::Closed { .. }
        )
    }
}

/// Encodes a message as its line: compact JSON and `\n`.
fn encode_line<T: Serialize>(message: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut line = serde_json::to_vec(message).map_err(ProtocolError::Encode)?;
    line.push(b'\n');
    Ok(line)
}

/// The position of the line's terminating newline, or an error once `buf`
/// holds `max` bytes without one.
fn find_line_end(buf: &[u8], max: usize) -> Result<Option<usize>, ProtocolError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) if end < max => Ok(Some(end)),
        Some(_) => Err(ProtocolError::LineTooLong { max }),
        None if buf.len() >= max => Err(ProtocolError::LineTooLong { max }),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_form_is_the_documented_one() {
        let req = Request {
            version: 1,
            command: Command::Add,
            container_id: "c1".into(),
            pod_namespace: "shop".into(),
            pod_name: "cart".into(),
            pod_uid: "u1".into(),
            netns_path: "/var/run/netns/x".into(),
            interface: "eth0".into(),
            ips: vec!["10.244.1.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        };
        let line = String::from_utf8(encode_line(&req).unwrap()).unwrap();
        assert_eq!(
            line,
            r#"{"version":1,"command":"add","container_id":"c1","pod_namespace":"shop","pod_name":"cart","pod_uid":"u1","netns_path":"/var/run/netns/x","interface":"eth0","ips":["10.244.1.5","fd00::5"]}"#
                .to_owned()
                + "\n"
        );
        let resp: Response = serde_json::from_str(r#"{"result":"enrolled","message":"hi"}"#).unwrap();
        assert_eq!(resp, Response::new(Outcome::Enrolled, "hi"));
        let resp: Response = serde_json::from_str(r#"{"result":"removed"}"#).unwrap();
        assert_eq!(resp.message, "");
    }

    #[test]
    fn a_line_ends_within_its_bound() {
        assert_eq!(find_line_end(b"abc", 4).unwrap(), None);
        assert_eq!(find_line_end(b"abc\n", 4).unwrap(), Some(3));
        assert!(matches!(find_line_end(b"abcd", 4), Err(ProtocolError::LineTooLong { max: 4 })));
        assert!(matches!(find_line_end(b"abcd\n", 4), Err(ProtocolError::LineTooLong { .. })));
    }
}
