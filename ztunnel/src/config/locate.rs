//! Finds the line of a node in a YAML document by its path.
//!
//! serde_yaml_ng reports a line for errors raised while deserializing, but the
//! checks that span several fields (a duplicate name, a missing field that only
//! a local workload needs) run after parsing, when positions are gone. To give
//! those errors a line too, the document is walked once more along the path
//! and the walk fails on purpose at the target node: the error serde_yaml_ng
//! returns then carries the node's position.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a path into the document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Key(k) => write!(f, ".{k}"),
            Step::Index(i) => write!(f, "[{i}]"),
        }
    }
}

/// Renders a path the way serde_yaml_ng does: `workloads[2].name`.
pub fn render(path: &[Step]) -> String {
    let s: String = path.iter().map(Step::to_string).collect();
    s.strip_prefix('.').map(str::to_owned).unwrap_or(s)
}

const FOUND: &str = "\u{0}located";

/// Line and column (1-based) of the node at `path`, if the document has it.
pub fn locate(text: &str, path: &[Step]) -> Option<(usize, usize)> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    match (Walk { path }).deserialize(de) {
        Ok(()) => None,
        Err(e) if e.to_string().contains(FOUND) => e.location().map(|l| (l.line(), l.column())),
        Err(_) => None,
    }
}

struct Walk<'a> {
    path: &'a [Step],
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.path.split_first() {
            // Let the deserializer visit the node so that it stamps the error
            // with the node's own position.
            None => d.deserialize_any(Found),
            Some((Step::Key(key), rest)) => d.deserialize_map(InMap { key, rest }),
            Some((Step::Index(index), rest)) => d.deserialize_seq(InSeq { index: *index, rest }),
        }
    }
}

struct Found;

macro_rules! found {
    ($($name:ident($t:ty)),*) => {
        $(fn $name<E: de::Error>(self, _: $t) -> Result<(), E> { Err(E::custom(FOUND)) })*
    };
}

impl<'de> Visitor<'de> for Found {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any node")
    }

    found!(visit_bool(bool), visit_i64(i64), visit_u64(u64), visit_f64(f64), visit_str(&str));

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
}

struct InMap<'a> {
    key: &'a str,
    rest: &'a [Step],
}

impl<'de> Visitor<'de> for InMap<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == self.key {
                // An empty rest means the key itself is wanted: its value's
                // position is the closest serde can report.
                return map.next_value_seed(Walk { path: self.rest });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

struct InSeq<'a> {
    index: usize,
    rest: &'a [Step],
}

impl<'de> Visitor<'de> for InSeq<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        for _ in 0..self.index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Walk { path: self.rest })?;
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
node:
  name: a
workloads:
  - name: one
    addresses: [198.18.1.2]
  - name: two
    addresses:
      - 198.18.1.3
      - 198.18.1.4
";

    fn key(k: &str) -> Step {
        Step::Key(k.into())
    }

    #[test]
    fn finds_nested_nodes() {
        assert_eq!(locate(DOC, &[key("node"), key("name")]), Some((2, 9)));
        assert_eq!(locate(DOC, &[key("workloads"), Step::Index(1)]), Some((6, 5)));
        assert_eq!(
            locate(DOC, &[key("workloads"), Step::Index(1), key("addresses"), Step::Index(1)]),
            Some((9, 9))
        );
    }

    #[test]
    fn missing_nodes_have_no_line() {
        assert_eq!(locate(DOC, &[key("workloads"), Step::Index(5)]), None);
        assert_eq!(locate(DOC, &[key("nope")]), None);
    }

    #[test]
    fn renders_like_serde_yaml() {
        assert_eq!(render(&[key("workloads"), Step::Index(2), key("name")]), "workloads[2].name");
    }
}
