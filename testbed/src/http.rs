//! A minimal HTTP/1.1 GET for the tunnel's admin, readiness and metrics
//! endpoints, made from inside a namespace.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::Context as _;

use crate::net::in_netns;

/// `METHOD path` on `addr` inside `netns`: (status, body).
pub fn request(netns: &str, addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    request_with(netns, addr, method, path, "")
}

/// The same with extra header lines (`Name: value\r\n` each).
pub fn request_with(
    netns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> anyhow::Result<(u16, String)> {
    in_netns(netns, || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\nContent-Length: 0\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("bad status line in {head:?}"))?;
        // The tunnel's endpoints send bodies with a length or close; chunked
        // bodies are de-chunked crudely (good enough for JSON and text).
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_owned()
        };
        Ok((status, body))
    })
}

pub fn get(netns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    request(netns, addr, "GET", path)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
