//! `--report-event`: in a DaemonSet, a failed precheck becomes one Warning
//! Event on the precheck's own pod (`kubectl describe pod` shows it) and one
//! clear log line, and the process then holds instead of exiting, so the pod
//! sits in its init step with that event rather than crash-looping through a
//! stack of errors. It exits when the pod is deleted (SIGTERM).
//!
//! The pod is named by the downward API: POD_NAME and POD_NAMESPACE, and
//! POD_UID when given (else it is read from the API server), since
//! `kubectl describe` matches events by the pod's uid.

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::{
    Api, Client, Resource as _,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::signal::unix::{SignalKind, signal};

use super::Report;

/// Events carry at most 1 kB of message.
const NOTE_LIMIT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("{0} is not set (give it from the downward API: metadata.name, metadata.namespace)")]
    MissingEnv(&'static str),
    #[error("no Kubernetes client configuration: {0}")]
    Client(#[source] kube::Error),
    #[error("posting the event on pod {namespace}/{name}: {source}")]
    Publish { namespace: String, name: String, source: kube::Error },
    #[error("cannot start the runtime that posts the event: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Posts the failure as a Warning Event on this pod, logs one line, and
/// holds until SIGTERM or SIGINT. Returns after the signal (or at once if
/// the signals cannot be watched).
pub fn report_and_hold(report: &Report) -> Result<(), EventError> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(EventError::Runtime)?;
    runtime.block_on(async {
        let posted = publish(report).await;
        let failed: Vec<String> = report.failures().map(|f| f.name()).collect();
        match &posted {
            Ok(pod) => tracing::error!(
                failed = %failed.join(", "),
                "precheck failed: this node cannot run the tunnel; posted Warning event PrecheckFailed on pod \
                 {pod}; holding instead of exiting (the lines above say what to fix)"
            ),
            Err(e) => tracing::error!(
                failed = %failed.join(", "),
                "precheck failed: this node cannot run the tunnel; the event could not be posted ({e}); \
                 holding instead of exiting (the lines above say what to fix)"
            ),
        }
        hold().await;
        posted.map(|_| ())
    })
}

/// Posts the event; returns `namespace/name` of the pod.
async fn publish(report: &Report) -> Result<String, EventError> {
    let name = std::env::var("POD_NAME").map_err(|_| EventError::MissingEnv("POD_NAME"))?;
    let namespace = std::env::var("POD_NAMESPACE").map_err(|_| EventError::MissingEnv("POD_NAMESPACE"))?;
    let client = Client::try_default().await.map_err(EventError::Client)?;
    let reference = pod_reference(&client, &name, &namespace).await;
    let recorder = Recorder::new(
        client,
        Reporter { controller: "ztunnel-precheck".into(), instance: Some(name.clone()) },
    );
    let event = Event {
        type_: EventType::Warning,
        reason: "PrecheckFailed".into(),
        note: Some(note(report)),
        action: "Precheck".into(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await.map_err(|source| EventError::Publish {
        namespace: namespace.clone(),
        name: name.clone(),
        source,
    })?;
    Ok(format!("{namespace}/{name}"))
}

/// The pod with its uid: from POD_UID, else from the API server. Without
/// either, the event still names the pod, though `kubectl describe` may not
/// list it.
async fn pod_reference(client: &Client, name: &str, namespace: &str) -> ObjectReference {
    let by_name = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        uid: std::env::var("POD_UID").ok().filter(|u| !u.is_empty()),
        ..Default::default()
    };
    if by_name.uid.is_some() {
        return by_name;
    }
    match Api::<Pod>::namespaced(client.clone(), namespace).get(name).await {
        Ok(pod) => pod.object_ref(&()),
        Err(e) => {
            tracing::warn!(
                "cannot read pod {namespace}/{name} for its uid ({e}); the event names it without"
            );
            by_name
        }
    }
}

/// The event's message: each failure and its fix, cut to the 1 kB limit.
fn note(report: &Report) -> String {
    let mut note = String::from("ztunnel precheck failed:");
    for f in report.failures() {
        note.push_str(&format!(" {}: {}", f.name(), f.detail));
        if let Some(fix) = &f.fix {
            note.push_str(&format!(" (fix: {fix})"));
        }
        note.push(';');
    }
    if note.len() > NOTE_LIMIT {
        let mut end = NOTE_LIMIT - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}

async fn hold() {
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::precheck::Finding;

    #[test]
    fn the_note_lists_failures_with_fixes_within_the_limit() {
        let report = Report::new(vec![
            Finding::pass("kernel", "fine"),
            Finding::fail("cni", "istio-cni in the chain", "remove it"),
        ]);
        assert_eq!(note(&report), "ztunnel precheck failed: cni: istio-cni in the chain (fix: remove it);");
        let long =
            Report::new((0..50).map(|_| Finding::fail("nofile", "é".repeat(30), "raise it")).collect());
        let n = note(&long);
        assert!(n.len() <= NOTE_LIMIT && n.ends_with("..."), "{}", n.len());
    }
}
