//! The resources the fake serves. Adding one is a line in [`RESOURCES`].

use serde_json::{Value, json};

/// One resource type, as discovery describes it.
#[derive(Debug)]
pub struct ResourceDef {
    /// API group; "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    /// Only POST: a review, answered and never stored (TokenReview).
    pub create_only: bool,
    /// Field selectors beyond metadata.name and metadata.namespace: the
    /// selector's name and the JSON pointer of the value it compares.
    pub fields: &'static [(&'static str, &'static str)],
}

const POD_FIELDS: &[(&str, &str)] = &[
    ("spec.nodeName", "/spec/nodeName"),
    ("spec.serviceAccountName", "/spec/serviceAccountName"),
    ("spec.restartPolicy", "/spec/restartPolicy"),
    ("spec.schedulerName", "/spec/schedulerName"),
    ("status.phase", "/status/phase"),
    ("status.podIP", "/status/podIP"),
    ("status.nominatedNodeName", "/status/nominatedNodeName"),
];

#[rustfmt::skip]
pub const RESOURCES: &[ResourceDef] = &[
    ResourceDef { group: "", version: "v1", kind: "Pod", plural: "pods", singular: "pod", namespaced: true, create_only: false, fields: POD_FIELDS },
    ResourceDef { group: "", version: "v1", kind: "Namespace", plural: "namespaces", singular: "namespace", namespaced: false, create_only: false, fields: &[("status.phase", "/status/phase")] },
    ResourceDef { group: "", version: "v1", kind: "Service", plural: "services", singular: "service", namespaced: true, create_only: false, fields: &[] },
    ResourceDef { group: "", version: "v1", kind: "ConfigMap", plural: "configmaps", singular: "configmap", namespaced: true, create_only: false, fields: &[] },
    ResourceDef { group: "", version: "v1", kind: "Node", plural: "nodes", singular: "node", namespaced: false, create_only: false, fields: &[("spec.unschedulable", "/spec/unschedulable")] },
    ResourceDef { group: "discovery.k8s.io", version: "v1", kind: "EndpointSlice", plural: "endpointslices", singular: "endpointslice", namespaced: true, create_only: false, fields: &[("addressType", "/addressType")] },
    ResourceDef { group: "security.ztunnel.dev", version: "v1", kind: "AuthorizationPolicy", plural: "authorizationpolicies", singular: "authorizationpolicy", namespaced: true, create_only: false, fields: &[] },
    ResourceDef { group: "authentication.k8s.io", version: "v1", kind: "TokenReview", plural: "tokenreviews", singular: "tokenreview", namespaced: false, create_only: true, fields: &[] },
];

impl ResourceDef {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods`, or `authorizationpolicies.security.ztunnel.dev`: how messages name it.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.to_owned() } else { format!("{}.{}", self.plural, self.group) }
    }

    /// The value a field selector compares: "" where the object has none,
    /// as the real server's field sets do.
    pub fn field_value(&self, obj: &Value, field: &str) -> Option<String> {
        let pointer = match field {
            "metadata.name" => "/metadata/name",
            "metadata.namespace" => "/metadata/namespace",
            f => self.fields.iter().find(|(name, _)| *name == f)?.1,
        };
        Some(match obj.pointer(pointer) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(v) => v.to_string(),
        })
    }

    fn discovery_entry(&self) -> Value {
        let verbs: &[&str] = if self.create_only {
            &["create"]
        } else {
            &["create", "delete", "get", "list", "patch", "update", "watch"]
        };
        json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
        })
    }
}

/// The resource named `name`: its plural (`pods`) or its kind (`Pod`).
pub fn by_name(name: &str) -> Option<&'static ResourceDef> {
    RESOURCES.iter().find(|r| r.plural == name || r.kind == name)
}

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceDef> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Index of a resource in [`RESOURCES`].
pub fn index_of(res: &ResourceDef) -> usize {
    RESOURCES.iter().position(|r| std::ptr::eq(r, res)).unwrap_or_default()
}

fn groups() -> Vec<&'static str> {
    let mut groups = Vec::new();
    for r in RESOURCES {
        if !r.group.is_empty() && !groups.contains(&r.group) {
            groups.push(r.group);
        }
    }
    groups
}

/// `/api`.
pub fn core_versions(server: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": server }],
    })
}

fn group_doc(group: &str) -> Value {
    let mut vs: Vec<&str> = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group) {
        if !vs.contains(&r.version) {
            vs.push(r.version);
        }
    }
    let versions: Vec<Value> =
        vs.iter().map(|v| json!({ "groupVersion": format!("{group}/{v}"), "version": v })).collect();
    json!({
        "name": group,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or(Value::Null),
    })
}

/// `/apis`.
pub fn group_list() -> Value {
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": groups().into_iter().map(group_doc).collect::<Vec<_>>(),
    })
}

/// `/apis/{group}`, if the fake serves that group.
pub fn group(group: &str) -> Option<Value> {
    groups().contains(&group).then(|| {
        let mut doc = group_doc(group);
        doc["kind"] = json!("APIGroup");
        doc["apiVersion"] = json!("v1");
        doc
    })
}

/// `/api/v1` or `/apis/{group}/{version}`, if the fake serves it.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(ResourceDef::discovery_entry)
        .collect();
    let group_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    (!resources.is_empty()).then(|| {
        json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        })
    })
}

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-ztunnel-testbed",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}
