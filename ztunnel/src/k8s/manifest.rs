//! `ztunnel validate --manifest`: checks the policy objects of a multi-document
//! YAML manifest against the CRD's type and the policy checks, before an API
//! server sees them. Other kinds are skipped (tools that bundle the API
//! server's schemas check those; they skip custom resources).

use std::path::Path;

use kube::CustomResourceExt as _;
use serde::Deserialize as _;
use serde_json::Value;

use super::crd::{self, AuthorizationPolicy};

pub const API_VERSION: &str = "security.ztunnel.dev/v1";
pub const KIND: &str = "AuthorizationPolicy";

/// One problem, naming the document and the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// 1-based position of the document in the file.
    pub document: usize,
    /// `AuthorizationPolicy shop/db-from-web`, when the name can be read.
    pub object: String,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "document {} ({}): ", self.document, self.object)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// What a manifest held.
#[derive(Debug, Default)]
pub struct ManifestReport {
    /// Policy documents checked.
    pub policies: usize,
    /// Documents of other kinds, skipped.
    pub skipped: usize,
    pub errors: Vec<ManifestError>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestFileError {
    #[error("cannot read {path}: {source}")]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("{path}: document {document} is not YAML: {source}")]
    Yaml { path: std::path::PathBuf, document: usize, source: serde_yaml_ng::Error },
}

/// `path` itself, or the YAML files (`.yaml`, `.yml`) under it when it is a
/// directory, in name order.
pub fn manifest_files(path: &Path) -> Result<Vec<std::path::PathBuf>, ManifestFileError> {
    let read = |p: &Path| {
        let p = p.to_owned();
        move |source| ManifestFileError::Read { path: p, source }
    };
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(read(&dir))? {
            let p = entry.map_err(read(&dir))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Reads and checks `path`.
pub fn validate_file(path: &Path) -> Result<ManifestReport, ManifestFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ManifestFileError::Read { path: path.to_owned(), source })?;
    validate(&text).map_err(|(document, source)| ManifestFileError::Yaml {
        path: path.to_owned(),
        document,
        source,
    })
}

/// Checks every policy document of `text`. Err: a document that is not YAML
/// at all (its position, the parser's error).
pub fn validate(text: &str) -> Result<ManifestReport, (usize, serde_yaml_ng::Error)> {
    let mut report = ManifestReport::default();
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = serde_yaml_ng::Value::deserialize(document).map_err(|e| (n, e))?;
        if value.is_null() {
            continue;
        }
        let api_version = value.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default();
        let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or_default();
        let group = api_version.split_once('/').map_or("", |(g, _)| g);
        let ours = group == "security.ztunnel.dev";
        if !(ours || kind == "List") {
            report.skipped += 1;
            continue;
        }
        if kind == "List" {
            // `kubectl get -o yaml` output: check the items as documents.
            let items = value.get("items").and_then(|v| v.as_sequence()).cloned().unwrap_or_default();
            for item in items {
                check_document(n, &item, &mut report);
            }
            continue;
        }
        check_document(n, &value, &mut report);
    }
    Ok(report)
}

fn check_document(n: usize, value: &serde_yaml_ng::Value, report: &mut ManifestReport) {
    let api_version = value.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default();
    let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or_default();
    if !api_version.starts_with("security.ztunnel.dev/") {
        report.skipped += 1;
        return;
    }
    let name = value.get("metadata").and_then(|m| m.get("name")).and_then(|v| v.as_str()).unwrap_or("?");
    let namespace = value.get("metadata").and_then(|m| m.get("namespace")).and_then(|v| v.as_str());
    let object = match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    };
    let error = |field: &str, message: String| ManifestError {
        document: n,
        object: object.clone(),
        field: field.to_owned(),
        message,
    };
    if api_version != API_VERSION || kind != KIND {
        report.errors.push(error(
            "",
            format!(
                "`{api_version}` `{kind}` is not a kind ztunnel serves (it serves `{API_VERSION}` `{KIND}`)"
            ),
        ));
        return;
    }
    report.policies += 1;
    let json = match serde_json::to_value(value) {
        Ok(j) => j,
        Err(e) => {
            report.errors.push(error("", format!("not representable as JSON: {e}")));
            return;
        }
    };
    // First as the API server would: the CRD's schema (unknown fields,
    // types, enums, patterns).
    let crd = AuthorizationPolicy::crd();
    let schema = crd
        .spec
        .versions
        .iter()
        .find(|v| v.name == "v1")
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or_default();
    let mut problems = Vec::new();
    check_schema(&json, &schema, "", &mut problems);
    if value.get("metadata").and_then(|m| m.get("name")).and_then(|v| v.as_str()).is_none_or(str::is_empty) {
        problems.push(("metadata.name".into(), "a policy needs a name".into()));
    }
    if !problems.is_empty() {
        report.errors.extend(problems.into_iter().map(|(field, message)| error(&field, message)));
        return;
    }
    // Then as the tunnel would.
    let mut policy: AuthorizationPolicy = match serde_json::from_value(json) {
        Ok(p) => p,
        Err(e) => {
            report.errors.push(error("", e.to_string()));
            return;
        }
    };
    // Namespaced objects without one get the namespace they are applied to.
    if policy.metadata.namespace.is_none() {
        policy.metadata.namespace = Some("default".to_owned());
    }
    let converted = crd::convert(&policy);
    for p in converted.problems {
        report.errors.push(error(&p.field, p.message));
    }
}

/// Checks `value` against a structural OpenAPI v3 schema (the subset CRDs
/// use), collecting (field, message).
fn check_schema(value: &Value, schema: &Value, at: &str, out: &mut Vec<(String, String)>) {
    let field = |k: &str| if at.is_empty() { k.to_owned() } else { format!("{at}.{k}") };
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) && schema.get("type").is_some() {
            out.push((at.to_owned(), "must not be null".into()));
        }
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let names: Vec<String> = allowed.iter().filter(|v| !v.is_null()).map(ToString::to_string).collect();
        out.push((at.to_owned(), format!("{value} is not one of {}", names.join(", "))));
        return;
    }
    let want = schema.get("type").and_then(Value::as_str).unwrap_or_default();
    let got = match value {
        Value::Object(_) => "object",
        Value::Array(_) => "array",
        Value::String(_) => "string",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::Null => "null",
    };
    let type_ok = want.is_empty() || want == got || (want == "number" && got == "integer");
    if !type_ok {
        out.push((at.to_owned(), format!("expected {want}, found {got} {value}")));
        return;
    }
    match value {
        Value::Object(map) => {
            if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
                return;
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if let Some(k) = required.as_str()
                    && !map.contains_key(k)
                {
                    out.push((field(k), "missing required field".into()));
                }
            }
            for (k, v) in map {
                // The root schema of a CRD describes `spec` (and `status`); the
                // API server itself checks the fields every object has.
                if at.is_empty() && ["apiVersion", "kind", "metadata"].contains(&k.as_str()) {
                    continue;
                }
                match (properties.and_then(|p| p.get(k)), additional) {
                    (Some(s), _) => check_schema(v, s, &field(k), out),
                    (None, Some(s)) => check_schema(v, s, &format!("{at}[{k}]"), out),
                    (None, None) if properties.is_none() => {}
                    (None, None) => {
                        let mut known: Vec<&str> =
                            properties.into_iter().flat_map(|p| p.keys()).map(String::as_str).collect();
                        known.sort_unstable();
                        out.push((
                            field(k),
                            format!("unknown field `{k}`, expected one of {}", known.join(", ")),
                        ));
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    check_schema(v, s, &format!("{at}[{i}]"), out);
                }
            }
        }
        Value::String(s) => {
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
                match regex::Regex::new(pattern) {
                    Ok(re) if re.is_match(s) => {}
                    Ok(_) if pattern == crd::PORT_PATTERN => out.push((
                        at.to_owned(),
                        format!("`{s}` is not a port number (1-65535, no leading zero)"),
                    )),
                    Ok(_) => out.push((at.to_owned(), format!("`{s}` does not match {pattern}"))),
                    Err(e) => out
                        .push((at.to_owned(), format!("the schema's pattern {pattern} is not a regex: {e}"))),
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {ztunnel.dev/dataplane: enabled}}
---
apiVersion: security.ztunnel.dev/v1
kind: AuthorizationPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules:
    - from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]
      to: [{operation: {ports: ['5432']}}]
---
";

    #[test]
    fn a_good_manifest_passes_and_other_kinds_are_skipped() {
        let r = validate(GOOD).unwrap();
        assert_eq!((r.policies, r.skipped), (1, 1));
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }

    #[test]
    fn errors_name_the_document_and_the_field() {
        let cases = [
            (
                "spec:\n  rules: [{to: [{operation: {portz: ['80']}}]}]\n",
                "document 2 (AuthorizationPolicy shop/p): spec.rules[0].to[0].operation.portz: unknown field `portz`",
            ),
            (
                "spec:\n  action: AUDIT\n",
                "document 2 (AuthorizationPolicy shop/p): spec.action: \"AUDIT\" is not one of \"ALLOW\", \"DENY\"",
            ),
            (
                "spec:\n  rules: [{to: [{operation: {ports: ['0080']}}]}]\n",
                "document 2 (AuthorizationPolicy shop/p): spec.rules[0].to[0].operation.ports[0]: `0080` is not a port number",
            ),
            (
                "spec:\n  rules: [{to: [{operation: {ports: [80]}}]}]\n",
                "document 2 (AuthorizationPolicy shop/p): spec.rules[0].to[0].operation.ports[0]: expected string, found integer 80",
            ),
            (
                "spec:\n  rules: [{from: [{source: {namespaces: ['a*b']}}]}]\n",
                "document 2 (AuthorizationPolicy shop/p): spec.rules[0].from[0].source: namespaces value `a*b`",
            ),
            (
                "spec:\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n",
                "document 2 (AuthorizationPolicy shop/p): spec.rules[0].to[0].operation.methods: `methods` is not supported",
            ),
            ("status: {}\n", "document 2 (AuthorizationPolicy shop/p): status: unknown field `status`"),
        ];
        for (tail, want) in cases {
            let text = format!(
                "kind: ConfigMap\napiVersion: v1\n---\napiVersion: security.ztunnel.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\n{tail}"
            );
            let r = validate(&text).unwrap();
            let errors: Vec<String> = r.errors.iter().map(ToString::to_string).collect();
            assert!(errors.iter().any(|e| e.starts_with(want)), "{tail}: {errors:?} lacks `{want}`");
        }
    }

    #[test]
    fn another_version_of_our_group_is_an_error_not_a_skip() {
        let r = validate(
            "apiVersion: security.ztunnel.dev/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n",
        )
        .unwrap();
        assert_eq!(r.errors.len(), 1);
        assert!(r.errors[0].message.contains("not a kind ztunnel serves"), "{:?}", r.errors);
    }

    #[test]
    fn a_directory_is_its_yaml_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        for f in ["b.yaml", "a.yml", "sub/c.yaml", "README.md"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let files = manifest_files(dir.path()).unwrap();
        let names: Vec<String> =
            files.iter().map(|f| f.strip_prefix(dir.path()).unwrap().display().to_string()).collect();
        assert_eq!(names, ["a.yml", "b.yaml", "sub/c.yaml"]);
        assert_eq!(manifest_files(&dir.path().join("b.yaml")).unwrap().len(), 1);
    }

    #[test]
    fn list_items_are_checked() {
        let r = validate(
            "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: security.ztunnel.dev/v1\n    kind: AuthorizationPolicy\n    metadata: {name: p}\n    spec: {action: NOPE}\n",
        )
        .unwrap();
        assert_eq!(r.policies, 1);
        assert!(r.errors[0].to_string().contains("spec.action: \"NOPE\" is not one of"), "{:?}", r.errors);
    }
}
