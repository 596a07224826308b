//! Failures as the API server reports them: a `Status` object with the
//! HTTP code, a machine-readable reason and a message worded like the real one.

use serde_json::{Value, json};

use super::resources::ResourceDef;

/// A request the fake refused, with what the real API server would answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("HTTP {code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    /// `Status.reason`: NotFound, AlreadyExists, Conflict, Expired, Invalid, ...
    pub reason: &'static str,
    pub message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String) -> Self {
        Self { code, reason, message, details: None }
    }

    fn about(mut self, res: &ResourceDef, name: &str) -> Self {
        let mut details = json!({ "name": name, "kind": res.plural });
        if !res.group.is_empty() {
            details["group"] = json!(res.group);
        }
        self.details = Some(details);
        self
    }

    pub(crate) fn not_found(res: &ResourceDef, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{name}\" not found", res.qualified())).about(res, name)
    }

    pub(crate) fn no_route() -> Self {
        Self::new(404, "NotFound", "the server could not find the requested resource".into())
    }

    pub(crate) fn already_exists(res: &ResourceDef, name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", res.qualified()))
            .about(res, name)
    }

    pub(crate) fn conflict(res: &ResourceDef, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                res.qualified()
            ),
        )
        .about(res, name)
    }

    pub(crate) fn conflict_uid(res: &ResourceDef, name: &str, stored: &Value, sent: &Value) -> Self {
        let uid = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {}, UID in object meta: {}",
                res.qualified(),
                uid(sent),
                uid(stored)
            ),
        )
        .about(res, name)
    }

    /// 410: a resourceVersion or continue token older than the history kept.
    pub(crate) fn expired(message: String) -> Self {
        Self::new(410, "Expired", message)
    }

    /// 422, as field validation reports it.
    pub(crate) fn invalid(kind: &str, name: &str, message: String) -> Self {
        let mut e = Self::new(422, "Invalid", format!("{kind} \"{name}\" is invalid: {message}"));
        e.details = Some(json!({ "name": name, "kind": kind }));
        e
    }

    pub(crate) fn bad_request(message: String) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized".into())
    }

    pub(crate) fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".into(),
        )
    }

    pub(crate) fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json (got {content_type:?})"
            ),
        )
    }

    pub(crate) fn too_large(message: String) -> Self {
        Self::new(413, "RequestEntityTooLarge", message)
    }

    pub(crate) fn unavailable() -> Self {
        Self::new(503, "ServiceUnavailable", "the server is currently unable to handle the request".into())
    }

    /// 504, as the watch cache answers a resourceVersion it has not reached.
    pub(crate) fn too_large_resource_version(asked: u64, current: u64) -> Self {
        let mut e =
            Self::new(504, "Timeout", format!("Too large resource version: {asked}, current: {current}"));
        e.details = Some(json!({
            "causes": [{ "reason": "ResourceVersionTooLarge", "message": "Too large resource version" }],
            "retryAfterSeconds": 1,
        }));
        e
    }

    /// The `Status` object the real API server sends.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}
