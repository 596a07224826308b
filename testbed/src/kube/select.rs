//! Label and field selectors, parsed and matched as the API server does.

use serde_json::Value;

use super::resources::ResourceDef;

#[derive(Debug, thiserror::Error)]
pub enum SelectorError {
    #[error("unable to parse requirement: {0}")]
    Label(String),
    #[error("invalid selector: {0}")]
    Field(String),
    #[error("field label not supported: {0}")]
    UnsupportedField(String),
}

#[derive(Debug, Clone, PartialEq)]
enum LabelOp {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    GreaterThan(i64),
    LessThan(i64),
}

/// `labelSelector`: requirements joined by commas, all of which must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<(String, LabelOp)>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self::default());
        }
        split_terms(text)
            .into_iter()
            .map(|term| parse_requirement(term.trim()))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        self.0.iter().all(|(key, op)| {
            let value = labels.and_then(|l| l.get(key)).and_then(Value::as_str);
            match op {
                LabelOp::Equals(v) => value == Some(v.as_str()),
                LabelOp::NotEquals(v) => value != Some(v.as_str()),
                LabelOp::In(vs) => value.is_some_and(|x| vs.iter().any(|v| v == x)),
                LabelOp::NotIn(vs) => value.is_none_or(|x| vs.iter().all(|v| v != x)),
                LabelOp::Exists => value.is_some(),
                LabelOp::DoesNotExist => value.is_none(),
                LabelOp::GreaterThan(n) => value.and_then(|x| x.parse::<i64>().ok()).is_some_and(|x| x > *n),
                LabelOp::LessThan(n) => value.and_then(|x| x.parse::<i64>().ok()).is_some_and(|x| x < *n),
            }
        })
    }
}

/// Splits at the commas that are not inside `( )`.
fn split_terms(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

fn parse_requirement(term: &str) -> Result<(String, LabelOp), SelectorError> {
    let err = |why: &str| SelectorError::Label(format!("{term:?}: {why}"));
    if term.is_empty() {
        return Err(err("empty requirement"));
    }
    if let Some(key) = term.strip_prefix('!') {
        return Ok((label_key(key.trim()).map_err(|e| err(&e))?, LabelOp::DoesNotExist));
    }
    if let Some(open) = term.find('(') {
        let close = term.strip_suffix(')').ok_or_else(|| err("a set must end with `)`"))?;
        let head: Vec<&str> = term[..open].split_whitespace().collect();
        let [key, op] = head[..] else { return Err(err("expected `key in (...)` or `key notin (...)`")) };
        let values = close[open + 1..]
            .split(',')
            .map(|v| label_value(v.trim()).map_err(|e| err(&e)))
            .collect::<Result<Vec<_>, _>>()?;
        let key = label_key(key).map_err(|e| err(&e))?;
        return match op {
            "in" => Ok((key, LabelOp::In(values))),
            "notin" => Ok((key, LabelOp::NotIn(values))),
            _ => Err(err("the set operator must be `in` or `notin`")),
        };
    }
    for (sym, make) in
        [("!=", LabelOp::NotEquals as fn(String) -> LabelOp), ("==", LabelOp::Equals), ("=", LabelOp::Equals)]
    {
        if let Some((key, value)) = term.split_once(sym) {
            let key = label_key(key.trim()).map_err(|e| err(&e))?;
            return Ok((key, make(label_value(value.trim()).map_err(|e| err(&e))?)));
        }
    }
    for (sym, greater) in [(">", true), ("<", false)] {
        if let Some((key, value)) = term.split_once(sym) {
            let key = label_key(key.trim()).map_err(|e| err(&e))?;
            let n: i64 = value.trim().parse().map_err(|_| err("`>` and `<` take an integer"))?;
            return Ok((key, if greater { LabelOp::GreaterThan(n) } else { LabelOp::LessThan(n) }));
        }
    }
    Ok((label_key(term).map_err(|e| err(&e))?, LabelOp::Exists))
}

/// A qualified name: `[prefix/]name`, the prefix a DNS subdomain.
fn label_key(key: &str) -> Result<String, String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            let ok = !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|part| {
                    !part.is_empty()
                        && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && !part.starts_with('-')
                        && !part.ends_with('-')
                });
            if !ok {
                return Err(format!("prefix of key {key:?} must be a DNS subdomain"));
            }
            name
        }
        None => key,
    };
    if name.is_empty() || !is_label_name(name) {
        return Err(format!(
            "name part of key {key:?} must be 1-63 alphanumerics, `-`, `_` or `.`, starting and ending with an alphanumeric"
        ));
    }
    Ok(key.to_owned())
}

fn label_value(value: &str) -> Result<String, String> {
    if value.is_empty() || is_label_name(value) {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "value {value:?} must be at most 63 alphanumerics, `-`, `_` or `.`, starting and ending with an alphanumeric"
        ))
    }
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() <= 63
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// `fieldSelector`: `field=value`, `field==value`, `field!=value`, joined by
/// commas; `\` escapes `,`, `=`, `!` and itself in values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, String, bool)>);

impl FieldSelector {
    /// Parses `text` and checks that `res` supports every field it names.
    pub fn parse(text: &str, res: &ResourceDef) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for term in split_unescaped(text.trim(), ',') {
            if term.is_empty() && text.trim().is_empty() {
                break;
            }
            let (field, value, negate) = if let Some((f, v)) = split_op(&term, "!=") {
                (f, v, true)
            } else if let Some((f, v)) = split_op(&term, "==").or_else(|| split_op(&term, "=")) {
                (f, v, false)
            } else {
                return Err(SelectorError::Field(format!("'{term}'; can't understand '{term}'")));
            };
            let field = field.trim().to_owned();
            if res.field_value(&Value::Null, &field).is_none() {
                return Err(SelectorError::UnsupportedField(field));
            }
            reqs.push((field, unescape(value.trim()), negate));
        }
        Ok(Self(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, obj: &Value, res: &ResourceDef) -> bool {
        self.0.iter().all(|(field, value, negate)| {
            let actual = res.field_value(obj, field).unwrap_or_default();
            (actual == *value) != *negate
        })
    }
}

fn split_unescaped(text: &str, sep: char) -> Vec<String> {
    let (mut parts, mut current, mut escaped) = (Vec::new(), String::new(), false);
    for c in text.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(std::mem::take(&mut current));
            continue;
        }
        current.push(c);
    }
    parts.push(current);
    parts
}

/// Splits at the first unescaped `op`.
fn split_op<'a>(term: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
    let mut escaped = false;
    for (i, c) in term.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if term[i..].starts_with(op) {
            return Some((&term[..i], &term[i + op.len()..]));
        }
    }
    None
}

fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What a LIST or WATCH selects: a namespace (or all), labels, fields.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selection {
    pub fn matches(&self, obj: &Value, res: &ResourceDef) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns))
            && self.labels.matches(obj)
            && self.fields.matches(obj, res)
    }

    /// Whether the selection filters beyond a namespace.
    pub fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::kube::resources::by_name;

    fn pod(labels: Value) -> Value {
        json!({ "metadata": { "name": "p", "namespace": "a", "labels": labels },
                "spec": { "nodeName": "n1" }, "status": { "phase": "Running" } })
    }

    #[test]
    fn label_selectors_follow_the_api_server() {
        let p = pod(json!({ "app": "web", "tier": "1" }));
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app in (web, db)", true),
            ("app in (db)", false),
            ("app notin (db)", true),
            ("missing notin (db)", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app=web,tier=1", true),
            ("app=web,tier=2", false),
            ("tier>0", true),
            ("tier<1", false),
            ("example.com/role", false),
        ] {
            assert_eq!(LabelSelector::parse(sel).unwrap().matches(&p), want, "{sel}");
        }
        for bad in ["app=we b", "app in (web", "=web", "a,,b", "app in web)", "-app"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn field_selectors_follow_the_api_server() {
        let pods = by_name("pods").unwrap();
        let p = pod(json!({}));
        for (sel, want) in [
            ("spec.nodeName=n1", true),
            ("spec.nodeName==n1,metadata.namespace=a", true),
            ("spec.nodeName!=n1", false),
            ("status.phase=Running,metadata.name=p", true),
            ("spec.serviceAccountName=", true),
            ("metadata.name=x\\,y", false),
        ] {
            assert_eq!(FieldSelector::parse(sel, pods).unwrap().matches(&p, pods), want, "{sel}");
        }
        let err = FieldSelector::parse("spec.hostname=x", pods).unwrap_err();
        assert_eq!(err.to_string(), "field label not supported: spec.hostname");
        assert!(FieldSelector::parse("spec.nodeName", pods).is_err());
        assert!(FieldSelector::parse("spec.nodeName=n1", by_name("services").unwrap()).is_err());
    }
}
