//! WATCH: a held-open chunked stream of JSON lines, started from the current
//! state, a resourceVersion, or a streaming list, with bookmarks, a timeout,
//! and selector transitions sent as the real server sends them.

use std::{collections::HashMap, io, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::{
    resources::ResourceDef,
    select::Selection,
    server::{Body, ChannelBody, Shared, response},
    status::ApiError,
    store::{Event, EventType, WatchFrom, WatchRefusal, WatchStart, parse_resource_version},
};

/// When a watch without `timeoutSeconds` ends (the real server picks
/// 30-60 minutes).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// Batches of initial events are sent at about this size.
const BATCH: usize = 64 * 1024;

struct Params {
    from: WatchFrom,
    bookmarks: bool,
    /// sendInitialEvents=true: end the initial events with a bookmark
    /// annotated `k8s.io/initial-events-end`.
    initial_events_end: bool,
    timeout: Duration,
}

fn params(query: &HashMap<String, String>) -> Result<Params, ApiError> {
    let get = |k: &str| query.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let invalid = |m: &str| ApiError::invalid("ListOptions.meta.k8s.io", "", m.into());
    let rv = get("resourceVersion").map(parse_resource_version).transpose()?;
    let bookmarks = get("allowWatchBookmarks") == Some("true");
    let send_initial = get("sendInitialEvents").map(|v| v == "true");
    let rv_match = get("resourceVersionMatch");
    let from = match send_initial {
        None => {
            if rv_match.is_some() {
                return Err(invalid(
                    "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
                ));
            }
            match rv {
                None | Some(0) => WatchFrom::CurrentState { not_older_than: 0 },
                Some(v) => WatchFrom::After(v),
            }
        }
        Some(send) => {
            if rv_match != Some("NotOlderThan") {
                return Err(invalid(
                    "resourceVersionMatch: Unsupported value: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if !bookmarks {
                return Err(invalid(
                    "allowWatchBookmarks: Required value: sendInitialEvents requires allowWatchBookmarks=true",
                ));
            }
            match (send, rv) {
                (true, v) => WatchFrom::CurrentState { not_older_than: v.unwrap_or(0) },
                (false, None | Some(0)) => WatchFrom::Now,
                (false, Some(v)) => WatchFrom::After(v),
            }
        }
    };
    let timeout = match get("timeoutSeconds") {
        Some(t) => Duration::from_secs(
            t.parse().map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds: {t:?}")))?,
        ),
        None => DEFAULT_TIMEOUT,
    };
    Ok(Params { from, bookmarks, initial_events_end: send_initial == Some(true), timeout })
}

/// Answers a WATCH: 200 and a stream, or an error before any byte.
pub fn start(
    shared: Arc<Shared>,
    res: &'static ResourceDef,
    sel: Selection,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let p = params(query)?;
    let started = shared.store().watch(res, p.from);
    let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(16);
    let body = ChannelBody(rx).boxed();
    match started {
        Ok(start) => {
            let kill = shared.streams_token();
            tokio::spawn(async move {
                shared.count(res, |c| c.open_watches += 1);
                let end =
                    Stream { shared: &shared, res, sel: &sel, tx: &tx, kill: &kill }.run(start, &p).await;
                if let End::Killed = end {
                    let _ = tx.send(Err(io::Error::other("watch stream killed"))).await;
                }
                shared.count(res, |c| c.open_watches = c.open_watches.saturating_sub(1));
            });
        }
        Err(WatchRefusal::Error(e)) => return Err(e),
        Err(WatchRefusal::Expired(e)) => {
            // As the real server: 200, then one ERROR event, then the end.
            let line = Bytes::from(line("ERROR", &e.status()));
            tokio::spawn(async move {
                let _ = tx.send(Ok(line)).await;
            });
        }
    }
    Ok(response(StatusCode::OK, "application/json", body))
}

enum End {
    /// Timeout, client gone, or a watcher too slow for the buffer: the
    /// stream ends cleanly.
    Done,
    /// `kill_streams`: the connection is cut mid-stream.
    Killed,
}

struct Stream<'a> {
    shared: &'a Shared,
    res: &'static ResourceDef,
    sel: &'a Selection,
    tx: &'a mpsc::Sender<Result<Bytes, io::Error>>,
    kill: &'a CancellationToken,
}

impl Stream<'_> {
    async fn run(&self, start: WatchStart, p: &Params) -> End {
        let mut buf = Vec::new();
        for obj in &start.initial {
            if self.sel.matches(obj, self.res) {
                buf.extend(line("ADDED", obj));
                if buf.len() >= BATCH
                    && let Err(end) = self.send(std::mem::take(&mut buf)).await
                {
                    return end;
                }
            }
        }
        for event in &start.replay {
            if let Some((kind, obj)) = self.transition(event) {
                buf.extend(line(kind.as_str(), obj));
            }
        }
        if p.initial_events_end {
            buf.extend(self.bookmark(start.rv, true));
        }
        if !buf.is_empty()
            && let Err(end) = self.send(buf).await
        {
            return end;
        }
        let mut live = start.live;
        let deadline = tokio::time::sleep(p.timeout);
        tokio::pin!(deadline);
        let interval = self.shared.options.bookmark_interval.max(Duration::from_millis(10));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            let next = tokio::select! {
                () = self.kill.cancelled() => return End::Killed,
                () = self.tx.closed() => return End::Done,
                () = &mut deadline => return End::Done,
                _ = ticker.tick() => {
                    if !p.bookmarks {
                        continue;
                    }
                    let caught_up = self.shared.store().caught_up(&live);
                    match caught_up {
                        Some(rv) => self.bookmark(rv, false),
                        None => continue,
                    }
                }
                event = live.recv() => match event {
                    Ok(e) => match self.transition(&e) {
                        Some((kind, obj)) => line(kind.as_str(), obj),
                        None => continue,
                    },
                    // The real server closes a watcher that cannot keep up;
                    // the client resumes from its last resourceVersion.
                    Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return End::Done,
                },
            };
            if let Err(end) = self.send(next).await {
                return end;
            }
        }
    }

    async fn send(&self, bytes: Vec<u8>) -> Result<(), End> {
        tokio::select! {
            () = self.kill.cancelled() => Err(End::Killed),
            sent = self.tx.send(Ok(Bytes::from(bytes))) => sent.map_err(|_| End::Done),
        }
    }

    /// What a change looks like through the selection: an object that
    /// starts matching is ADDED, one that stops matching is DELETED.
    fn transition<'e>(&self, e: &'e Event) -> Option<(EventType, &'e Value)> {
        let now = self.sel.matches(&e.object, self.res);
        match e.kind {
            EventType::Added | EventType::Deleted => now.then_some((e.kind, e.object.as_ref())),
            EventType::Modified => {
                let before = e.old.as_ref().is_some_and(|o| self.sel.matches(o, self.res));
                match (before, now) {
                    (true, true) => Some((EventType::Modified, &e.object)),
                    (false, true) => Some((EventType::Added, &e.object)),
                    (true, false) => Some((EventType::Deleted, &e.object)),
                    (false, false) => None,
                }
            }
        }
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Vec<u8> {
        let mut metadata = json!({ "resourceVersion": rv.to_string(), "creationTimestamp": null });
        if initial_events_end {
            metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        line(
            "BOOKMARK",
            &json!({ "kind": self.res.kind, "apiVersion": self.res.api_version(), "metadata": metadata }),
        )
    }
}

fn line(kind: &str, object: &Value) -> Vec<u8> {
    let mut out = format!("{{\"type\":\"{kind}\",\"object\":").into_bytes();
    // Writing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, object);
    out.extend_from_slice(b"}\n");
    out
}
