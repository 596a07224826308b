//! The objects, one global resourceVersion (etcd's revision), and a bounded
//! history of changes from which watches resume and paginated lists read a
//! consistent snapshot.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, VecDeque},
    net::Ipv4Addr,
    ops::Bound,
    sync::Arc,
    time::SystemTime,
};

use base64::Engine as _;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::{
    resources::{RESOURCES, ResourceDef, by_name, index_of},
    select::Selection,
    status::ApiError,
};

/// Where Services get a ClusterIP when they name none: inside the testbed's
/// address range, never routed anywhere.
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 128, 0), 17);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, as etcd records it.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub resource: usize,
    pub key: String,
    pub kind: EventType,
    /// The object after the change; for a deletion its last state, stamped
    /// with the deletion's resourceVersion (as the real watch sends it).
    pub object: Arc<Value>,
    /// The object before the change; None for a creation.
    pub old: Option<Arc<Value>>,
}

/// A change made through PATCH.
pub enum Patch {
    /// RFC 7386, `application/merge-patch+json`.
    Merge(Value),
    /// RFC 6902, `application/json-patch+json`.
    Json(json_patch::Patch),
}

/// LIST options, as the query string carries them.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub version_match: Option<String>,
}

#[derive(Debug)]
pub struct ListPage {
    pub items: Vec<Arc<Value>>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy)]
pub enum WatchFrom {
    /// Changes from now on only.
    Now,
    /// Synthetic ADDED events for the current state (which must have
    /// reached `not_older_than`), then changes.
    CurrentState { not_older_than: u64 },
    /// Changes after this resourceVersion, replayed from the history.
    After(u64),
}

pub struct WatchStart {
    /// The resourceVersion the start reflects.
    pub rv: u64,
    /// Objects to send as synthetic ADDED events.
    pub initial: Vec<Arc<Value>>,
    /// Changes to replay, oldest first.
    pub replay: Vec<Arc<Event>>,
    /// Every later change of the resource.
    pub live: broadcast::Receiver<Arc<Event>>,
}

/// Why a watch could not start where it was asked to.
pub enum WatchRefusal {
    /// The resourceVersion is older than the history: sent as a 410 ERROR event.
    Expired(ApiError),
    /// Refused before the stream starts.
    Error(ApiError),
}

pub struct Store {
    rv: u64,
    objects: Vec<BTreeMap<String, Arc<Value>>>,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// Every change after this resourceVersion is in `history`.
    compacted: u64,
    channels: Vec<broadcast::Sender<Arc<Event>>>,
    next_service_ip: u32,
}

impl Store {
    pub fn new(history_limit: usize, watch_buffer: usize) -> Self {
        // etcd starts its revisions above 1 on a fresh cluster; 1 keeps "0"
        // ("any version") distinct from every real one.
        let rv = 1;
        Self {
            rv,
            objects: RESOURCES.iter().map(|_| BTreeMap::new()).collect(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: rv,
            channels: RESOURCES.iter().map(|_| broadcast::channel(watch_buffer.max(1)).0).collect(),
            next_service_ip: 1,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Forgets the history: older resourceVersions now get 410 Gone.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    pub fn get(&self, res: &ResourceDef, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        self.objects[index_of(res)]
            .get(&key(res, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    pub fn create(
        &mut self,
        res: &'static ResourceDef,
        ns: &str,
        mut obj: Value,
    ) -> Result<Arc<Value>, ApiError> {
        if res.create_only {
            return Err(ApiError::method_not_allowed());
        }
        let meta = metadata_of(&mut obj)?;
        let ns = object_namespace(res, ns, meta)?;
        if res.namespaced {
            let namespaces = by_name("namespaces").ok_or_else(ApiError::no_route)?;
            if !self.objects[index_of(namespaces)].contains_key(&ns) {
                return Err(ApiError::not_found(namespaces, &ns));
            }
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        let name = match meta.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) {
            Some(n) => n.to_owned(),
            None => match meta.get("generateName").and_then(Value::as_str).filter(|n| !n.is_empty()) {
                Some(prefix) => format!("{prefix}{}", random_suffix()),
                None => {
                    return Err(ApiError::invalid(
                        res.kind,
                        "",
                        "metadata.name: Required value: name or generateName is required".into(),
                    ));
                }
            },
        };
        if !is_dns_subdomain(&name) {
            return Err(ApiError::invalid(
                res.kind,
                &name,
                format!(
                    "metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                ),
            ));
        }
        let k = key(res, &ns, &name);
        if self.objects[index_of(res)].contains_key(&k) {
            return Err(ApiError::already_exists(res, &name));
        }
        meta.insert("name".into(), json!(name));
        if meta.get("uid").and_then(Value::as_str).is_none_or(str::is_empty) {
            meta.insert("uid".into(), json!(random_uid()));
        }
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        meta.insert("generation".into(), json!(1));
        meta.remove("deletionTimestamp");
        self.apply_defaults(res, &mut obj);
        set_type(res, &mut obj);
        Ok(self.commit(res, k, EventType::Added, obj, None))
    }

    /// PUT: the whole object (or, for `/status`, its status).
    pub fn replace(
        &mut self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
        mut body: Value,
        status_only: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let old = self.get(res, ns, name)?;
        let precondition = resource_version_of(&body).filter(|v| !v.is_empty()).map(str::to_owned);
        if status_only {
            let status = body.get_mut("status").map(Value::take);
            body = (*old).clone();
            set_status(&mut body, status);
        }
        self.update(res, ns, name, old, body, precondition)
    }

    /// PATCH: a merge or JSON patch of the object (or, for `/status`, of its status).
    pub fn patch(
        &mut self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
        patch: &Patch,
        status_only: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let old = self.get(res, ns, name)?;
        let mut new = (*old).clone();
        match patch {
            Patch::Merge(p) => json_patch::merge(&mut new, p),
            Patch::Json(p) => json_patch::patch(&mut new, p)
                .map_err(|e| ApiError::invalid(res.kind, name, format!("the JSON patch failed: {e}")))?,
        }
        // A patch that sets metadata.resourceVersion makes it a precondition.
        let precondition =
            resource_version_of(&new).filter(|v| Some(*v) != resource_version_of(&old)).map(str::to_owned);
        if status_only {
            let status = new.get_mut("status").map(Value::take);
            new = (*old).clone();
            set_status(&mut new, status);
        }
        self.update(res, ns, name, old, new, precondition)
    }

    fn update(
        &mut self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
        old: Arc<Value>,
        mut new: Value,
        precondition: Option<String>,
    ) -> Result<Arc<Value>, ApiError> {
        if res.create_only {
            return Err(ApiError::method_not_allowed());
        }
        if precondition.is_some_and(|v| Some(v.as_str()) != resource_version_of(&old)) {
            return Err(ApiError::conflict(res, name));
        }
        let meta = metadata_of(&mut new)?;
        if let Some(body_name) = meta.get("name").and_then(Value::as_str).filter(|n| !n.is_empty())
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let ns = object_namespace(res, ns, meta)?;
        let old_meta = old.get("metadata").cloned().unwrap_or_default();
        let old_uid = old_meta.get("uid").cloned().unwrap_or_default();
        if let Some(uid) = meta.get("uid").filter(|u| u.as_str().is_some_and(|u| !u.is_empty()))
            && *uid != old_uid
        {
            return Err(ApiError::conflict_uid(res, name, &old_uid, uid));
        }
        meta.insert("name".into(), json!(name));
        if res.namespaced {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.insert("uid".into(), old_uid);
        for field in ["creationTimestamp", "generation", "resourceVersion"] {
            match old_meta.get(field) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
        set_type(res, &mut new);
        // Updates that change nothing are no-ops: no new resourceVersion, no event.
        if new == *old {
            return Ok(old);
        }
        if without_meta_and_status(&new) != without_meta_and_status(&old) {
            let generation = old_meta.get("generation").and_then(Value::as_i64).unwrap_or(0) + 1;
            if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                m.insert("generation".into(), json!(generation));
            }
        }
        Ok(self.commit(res, key(res, &ns, name), EventType::Modified, new, Some(old)))
    }

    /// DELETE: the object goes at once (no finalizers, no grace period).
    pub fn delete(
        &mut self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        if res.create_only {
            return Err(ApiError::method_not_allowed());
        }
        let old = self.get(res, ns, name)?;
        Ok(self.commit(res, key(res, ns, name), EventType::Deleted, (*old).clone(), Some(old)))
    }

    /// Stamps the next resourceVersion on `obj`, stores (or removes) it and
    /// records the change.
    fn commit(
        &mut self,
        res: &ResourceDef,
        k: String,
        kind: EventType,
        mut obj: Value,
        old: Option<Arc<Value>>,
    ) -> Arc<Value> {
        self.rv += 1;
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("resourceVersion".into(), json!(self.rv.to_string()));
        }
        let obj = Arc::new(obj);
        let idx = index_of(res);
        if kind == EventType::Deleted {
            self.objects[idx].remove(&k);
        } else {
            self.objects[idx].insert(k.clone(), obj.clone());
        }
        let event = Arc::new(Event { rv: self.rv, resource: idx, key: k, kind, object: obj.clone(), old });
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            if let Some(e) = self.history.pop_front() {
                self.compacted = e.rv;
            }
        }
        // No receiver is not an error: nobody is watching.
        let _ = self.channels[idx].send(event);
        obj
    }

    fn apply_defaults(&mut self, res: &ResourceDef, obj: &mut Value) {
        match res.kind {
            "Namespace" | "Pod" if obj.pointer("/status/phase").is_none() => {
                let phase = if res.kind == "Pod" { "Pending" } else { "Active" };
                match obj.get_mut("status").and_then(Value::as_object_mut) {
                    Some(s) => {
                        s.insert("phase".into(), json!(phase));
                    }
                    None => obj["status"] = json!({ "phase": phase }),
                }
            }
            "Service" => {
                let spec = &mut obj["spec"];
                if !spec.is_object() {
                    *spec = json!({});
                }
                if spec.get("type").is_none() {
                    spec["type"] = json!("ClusterIP");
                }
                let needs_ip = spec["type"] != "ExternalName"
                    && spec.get("clusterIP").and_then(Value::as_str).is_none_or(str::is_empty);
                if needs_ip {
                    let (base, prefix) = SERVICE_CIDR;
                    let size = 1u32 << (32 - prefix);
                    let ip = Ipv4Addr::from(u32::from(base) + self.next_service_ip % (size - 1));
                    self.next_service_ip += 1;
                    spec["clusterIP"] = json!(ip.to_string());
                    spec["clusterIPs"] = json!([ip.to_string()]);
                }
            }
            _ => {}
        }
    }

    /// A page of the objects of `res` that `sel` selects.
    pub fn list(&self, res: &ResourceDef, sel: &Selection, q: &ListQuery) -> Result<ListPage, ApiError> {
        let rv_asked = q.resource_version.as_deref().filter(|v| !v.is_empty());
        let (at, after) = match &q.continue_token {
            Some(token) => {
                if rv_asked.is_some() {
                    return Err(invalid_list_options(
                        "resourceVersion: Forbidden: specifying resource version is not allowed when using continue",
                    ));
                }
                let (at, after) = decode_continue(token)?;
                if at < self.compacted {
                    return Err(ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue value from this response.".into()));
                }
                if at > self.rv {
                    return Err(ApiError::bad_request(
                        "continue key is not valid: resource version is in the future".into(),
                    ));
                }
                (at, Some(after))
            }
            None => (self.list_version(rv_asked, q.version_match.as_deref())?, None),
        };
        let view = self.snapshot(index_of(res), at);
        let range = match &after {
            Some(k) => view.range::<String, _>((Bound::Excluded(k), Bound::Unbounded)),
            None => view.range::<String, _>(..),
        };
        let limit = q.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut matching = range.filter(|(_, o)| sel.matches(o, res));
        let items: Vec<Arc<Value>> = matching.by_ref().take(limit).map(|(_, o)| o.clone()).collect();
        let mut page = ListPage { items, resource_version: at, continue_token: None, remaining: None };
        let rest =
            if sel.has_selectors() { usize::from(matching.next().is_some()) } else { matching.count() };
        if rest > 0 {
            let last = page.items.last().and_then(|o| object_key(res, o)).unwrap_or_default();
            page.continue_token = Some(encode_continue(at, &last));
            // As etcd, the count is only known without selectors.
            page.remaining = (!sel.has_selectors()).then_some(rest);
        }
        Ok(page)
    }

    /// The resourceVersion a LIST without continue token reads at.
    fn list_version(&self, asked: Option<&str>, version_match: Option<&str>) -> Result<u64, ApiError> {
        let Some(asked) = asked else {
            if version_match.is_some_and(|m| !m.is_empty()) {
                return Err(invalid_list_options(
                    "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
            return Ok(self.rv);
        };
        let exact = match version_match.unwrap_or("") {
            "" | "NotOlderThan" => false,
            "Exact" => true,
            other => {
                return Err(invalid_list_options(&format!(
                    "resourceVersionMatch: Unsupported value: {other:?}: supported values: \"Exact\", \"NotOlderThan\", \"\""
                )));
            }
        };
        let v = parse_resource_version(asked)?;
        if v == 0 && exact {
            return Err(invalid_list_options(
                "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            ));
        }
        if v > self.rv {
            return Err(ApiError::too_large_resource_version(v, self.rv));
        }
        if !exact {
            return Ok(self.rv);
        }
        if v < self.compacted {
            return Err(ApiError::expired("The resourceVersion for the provided list is too old.".into()));
        }
        Ok(v)
    }

    /// The objects of resource `idx` as they were at resourceVersion `at`
    /// (not older than `compacted`): today's, with later changes undone.
    fn snapshot(&self, idx: usize, at: u64) -> Cow<'_, BTreeMap<String, Arc<Value>>> {
        let mut before: HashMap<&str, Option<Arc<Value>>> = HashMap::new();
        for e in self.history.iter().filter(|e| e.rv > at && e.resource == idx) {
            before.entry(e.key.as_str()).or_insert_with(|| e.old.clone());
        }
        if before.is_empty() {
            return Cow::Borrowed(&self.objects[idx]);
        }
        let mut view = self.objects[idx].clone();
        for (k, old) in before {
            match old {
                Some(o) => view.insert(k.to_owned(), o),
                None => view.remove(k),
            };
        }
        Cow::Owned(view)
    }

    pub fn watch(&self, res: &ResourceDef, from: WatchFrom) -> Result<WatchStart, WatchRefusal> {
        let idx = index_of(res);
        let mut start = WatchStart {
            rv: self.rv,
            initial: Vec::new(),
            replay: Vec::new(),
            live: self.channels[idx].subscribe(),
        };
        match from {
            WatchFrom::Now => {}
            WatchFrom::CurrentState { not_older_than: v } | WatchFrom::After(v) if v > self.rv => {
                return Err(WatchRefusal::Error(ApiError::too_large_resource_version(v, self.rv)));
            }
            WatchFrom::CurrentState { .. } => start.initial = self.objects[idx].values().cloned().collect(),
            WatchFrom::After(v) if v < self.compacted => {
                return Err(WatchRefusal::Expired(ApiError::expired(format!(
                    "too old resource version: {v} ({})",
                    self.compacted
                ))));
            }
            WatchFrom::After(v) => {
                start.replay =
                    self.history.iter().filter(|e| e.rv > v && e.resource == idx).cloned().collect();
            }
        }
        Ok(start)
    }

    /// For bookmarks: the current resourceVersion if `live` has nothing
    /// left to deliver (both read under the store's lock).
    pub fn caught_up(&self, live: &broadcast::Receiver<Arc<Event>>) -> Option<u64> {
        live.is_empty().then_some(self.rv)
    }
}

fn key(res: &ResourceDef, ns: &str, name: &str) -> String {
    if res.namespaced { format!("{ns}/{name}") } else { name.to_owned() }
}

fn object_key(res: &ResourceDef, obj: &Value) -> Option<String> {
    let name = obj.pointer("/metadata/name")?.as_str()?;
    let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
    Some(key(res, ns, name))
}

fn metadata_of(obj: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    let Some(o) = obj.as_object_mut() else {
        return Err(ApiError::bad_request("the object must be a JSON object".into()));
    };
    let meta = o.entry("metadata").or_insert_with(|| json!({}));
    if meta.is_null() {
        *meta = json!({});
    }
    meta.as_object_mut().ok_or_else(|| ApiError::bad_request("metadata must be a JSON object".into()))
}

/// The namespace a write is for: the request's, which the object may repeat
/// but not contradict (the handle may leave the request's empty).
fn object_namespace(res: &ResourceDef, ns: &str, meta: &Map<String, Value>) -> Result<String, ApiError> {
    if !res.namespaced {
        return Ok(String::new());
    }
    let in_object = meta.get("namespace").and_then(Value::as_str).filter(|n| !n.is_empty());
    match (ns, in_object) {
        ("", None) => Err(ApiError::invalid(
            res.kind,
            meta.get("name").and_then(Value::as_str).unwrap_or(""),
            "metadata.namespace: Required value".into(),
        )),
        ("", Some(n)) => Ok(n.to_owned()),
        (ns, Some(n)) if n != ns => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request".into(),
        )),
        (ns, _) => Ok(ns.to_owned()),
    }
}

fn resource_version_of(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/resourceVersion").and_then(Value::as_str)
}

fn set_type(res: &ResourceDef, obj: &mut Value) {
    obj["apiVersion"] = json!(res.api_version());
    obj["kind"] = json!(res.kind);
}

fn set_status(obj: &mut Value, status: Option<Value>) {
    match (obj.as_object_mut(), status) {
        (Some(o), Some(s)) => {
            o.insert("status".into(), s);
        }
        (Some(o), None) => {
            o.remove("status");
        }
        (None, _) => {}
    }
}

fn without_meta_and_status(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

fn invalid_list_options(message: &str) -> ApiError {
    ApiError::invalid("ListOptions.meta.k8s.io", "", message.into())
}

pub fn parse_resource_version(v: &str) -> Result<u64, ApiError> {
    v.parse().map_err(|_| ApiError::bad_request(format!("invalid resource version: {v:?}")))
}

/// The continue token: base64url of what the real server puts in it.
fn encode_continue(rv: u64, last_key: &str) -> String {
    let token = json!({ "v": "meta.k8s.io/v1", "rv": rv, "start": format!("{last_key}\u{0}") });
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let raw =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| bad("not base64url"))?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad("not JSON"))?;
    if v["v"] != "meta.k8s.io/v1" {
        return Err(bad("unknown version"));
    }
    let rv = v["rv"].as_u64().ok_or_else(|| bad("no resource version"))?;
    let start =
        v["start"].as_str().and_then(|s| s.strip_suffix('\u{0}')).ok_or_else(|| bad("no start key"))?;
    Ok((rv, start.to_owned()))
}

fn is_dns_subdomain(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() <= 253
        && b.first().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.last().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.'))
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; N];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // Uniqueness is all that matters here; the clock gives it.
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        for (i, x) in b.iter_mut().enumerate() {
            *x = (nanos >> ((i % 16) * 8)) as u8;
        }
    }
    b
}

/// A random (version 4) UUID.
pub fn random_uid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// What generateName appends: five of the characters the real server uses.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    random_bytes::<5>().iter().map(|x| ALPHABET[*x as usize % ALPHABET.len()] as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(history: usize) -> Store {
        let mut s = Store::new(history, 16);
        s.create(by_name("namespaces").unwrap(), "", json!({ "metadata": { "name": "a" } })).unwrap();
        s
    }

    fn pods() -> &'static ResourceDef {
        by_name("pods").unwrap()
    }

    fn names(page: &ListPage) -> Vec<String> {
        page.items.iter().map(|o| o["metadata"]["name"].as_str().unwrap().to_owned()).collect()
    }

    #[test]
    fn writes_stamp_metadata_and_conflict_as_the_api_server() {
        let mut s = store_with(100);
        let p = s.create(pods(), "a", json!({ "metadata": { "name": "p" }, "spec": { "x": 1 } })).unwrap();
        assert_eq!(p["metadata"]["resourceVersion"], "3");
        assert_eq!(p["metadata"]["generation"], 1);
        assert_eq!(p["kind"], "Pod");
        assert_eq!(p["status"]["phase"], "Pending");
        assert!(p["metadata"]["uid"].as_str().unwrap().len() == 36);
        assert_eq!(s.create(pods(), "a", json!({ "metadata": { "name": "p" } })).unwrap_err().code, 409);
        assert_eq!(s.create(pods(), "b", json!({ "metadata": { "name": "p" } })).unwrap_err().code, 404);
        let stale = json!({ "metadata": { "name": "p", "resourceVersion": "2" }, "spec": { "x": 2 } });
        assert_eq!(s.replace(pods(), "a", "p", stale, false).unwrap_err().reason, "Conflict");
        let same = s.patch(pods(), "a", "p", &Patch::Merge(json!({ "spec": { "x": 1 } })), false).unwrap();
        assert_eq!(same["metadata"]["resourceVersion"], "3", "a no-op patch is no write");
        let m = s.patch(pods(), "a", "p", &Patch::Merge(json!({ "spec": { "x": 2 } })), false).unwrap();
        assert_eq!(
            (m["metadata"]["resourceVersion"].as_str(), m["metadata"]["generation"].as_i64()),
            (Some("4"), Some(2))
        );
        let st = s
            .patch(pods(), "a", "p", &Patch::Merge(json!({ "status": { "podIP": "198.19.1.11" } })), true)
            .unwrap();
        assert_eq!(st["metadata"]["generation"], 2);
        let d = s.delete(pods(), "a", "p").unwrap();
        assert_eq!(d["metadata"]["resourceVersion"], "6");
        assert_eq!(s.get(pods(), "a", "p").unwrap_err().code, 404);
    }

    #[test]
    fn pages_read_one_snapshot_until_it_is_compacted() {
        let mut s = store_with(100);
        for i in 0..5 {
            s.create(pods(), "a", json!({ "metadata": { "name": format!("p{i}") } })).unwrap();
        }
        let q = ListQuery { limit: Some(2), ..Default::default() };
        let first = s.list(pods(), &Selection::default(), &q).unwrap();
        assert_eq!((names(&first), first.remaining), (vec!["p0".to_owned(), "p1".into()], Some(3)));
        // Changes after the first page do not show in the next ones.
        s.delete(pods(), "a", "p2").unwrap();
        s.create(pods(), "a", json!({ "metadata": { "name": "p9" } })).unwrap();
        let q =
            ListQuery { limit: Some(2), continue_token: first.continue_token.clone(), ..Default::default() };
        let second = s.list(pods(), &Selection::default(), &q).unwrap();
        assert_eq!(names(&second), ["p2", "p3"]);
        assert_eq!(second.resource_version, first.resource_version);
        s.compact();
        assert_eq!(s.list(pods(), &Selection::default(), &q).unwrap_err().code, 410);
    }
}
