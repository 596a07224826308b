//! Editing a CNI configuration as text: our entry goes in and comes out
//! without any other byte of the file changing.
//!
//! The file is parsed only to learn where things are: `serde_json`'s
//! borrowed [`RawValue`]s are slices of the input, so each plugin entry's
//! byte span comes straight from the parser. The edit itself is a text
//! insertion or deletion at those spans; nothing is re-serialized, so an
//! operator's (or another installer's) formatting, key order, tabs, CRLF and
//! unicode survive, and removing our entry gives back the original bytes.

use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The plugin's `type`, which is also its binary's name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "ztunnel-cni";

/// Other meshes' chained plugins: two meshes redirecting the same pod fight
/// over its traffic.
pub const FOREIGN_MESH_PLUGINS: &[&str] = &["istio-cni", "linkerd-cni", "kuma-cni", "consul-cni"];

/// The key that marks a `.conflist` we made from a single-plugin `.conf`,
/// naming the file it came from. Runtimes ignore keys they do not know.
pub const CONVERTED_FROM_KEY: &str = "ztunnel_cni_converted_from";

#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("has no \"plugins\" list")]
    NoPlugins,
    #[error("its \"plugins\" list is empty")]
    EmptyPlugins,
    #[error("plugin entry {0} is not an object with a \"type\"")]
    BadEntry(usize),
    #[error("has no \"type\", so it is not a single-plugin configuration")]
    NoType,
    #[error("has no \"name\" (the runtime refuses a list without one)")]
    NoName,
}

/// Where a list's plugin entries are.
#[derive(Debug)]
pub struct PluginList {
    /// The `plugins` array, brackets included.
    pub array: Range<usize>,
    pub entries: Vec<Entry>,
    /// [`CONVERTED_FROM_KEY`], when present.
    pub converted_from: Option<String>,
}

#[derive(Debug)]
pub struct Entry {
    pub span: Range<usize>,
    pub plugin_type: String,
}

impl PluginList {
    pub fn ours(&self) -> Option<usize> {
        self.entries.iter().position(|e| e.plugin_type == PLUGIN_TYPE)
    }

    /// Other meshes' plugins in the chain.
    pub fn foreign_mesh_plugins(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| FOREIGN_MESH_PLUGINS.contains(&e.plugin_type.as_str()))
            .map(|e| e.plugin_type.clone())
            .collect()
    }
}

/// Where `inner` (a slice of `outer`) starts in `outer`.
fn offset_in(outer: &str, inner: &str) -> usize {
    inner.as_ptr() as usize - outer.as_ptr() as usize
}

/// Parses a `.conflist` as the runtime would accept it (a `name`, a non-empty
/// `plugins` list of objects with a `type`) and reports its spans.
pub fn parse_list(text: &str) -> Result<PluginList, ConfError> {
    #[derive(Deserialize)]
    struct List<'a> {
        #[serde(borrow)]
        name: Option<&'a RawValue>,
        #[serde(borrow)]
        plugins: Option<&'a RawValue>,
        #[serde(rename = "ztunnel_cni_converted_from")]
        converted_from: Option<String>,
    }
    #[derive(Deserialize)]
    struct Plugin {
        #[serde(rename = "type")]
        plugin_type: String,
    }
    let list: List<'_> = serde_json::from_str(text).map_err(ConfError::Json)?;
    if list.name.is_none_or(|n| !n.get().starts_with('"')) {
        return Err(ConfError::NoName);
    }
    let plugins = list.plugins.ok_or(ConfError::NoPlugins)?;
    let raw_entries: Vec<&RawValue> =
        serde_json::from_str(plugins.get()).map_err(|_| ConfError::NoPlugins)?;
    if raw_entries.is_empty() {
        return Err(ConfError::EmptyPlugins);
    }
    let entries = raw_entries
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let plugin: Plugin = serde_json::from_str(raw.get()).map_err(|_| ConfError::BadEntry(i))?;
            if plugin.plugin_type.is_empty() {
                return Err(ConfError::BadEntry(i));
            }
            let start = offset_in(text, raw.get());
            Ok(Entry { span: start..start + raw.get().len(), plugin_type: plugin.plugin_type })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let start = offset_in(text, plugins.get());
    Ok(PluginList { array: start..start + plugins.get().len(), entries, converted_from: list.converted_from })
}

/// A single-plugin `.conf`/`.json` as the runtime accepts it: an object with
/// a `type`. Returns its `type`, `name` and `cniVersion`.
pub fn parse_single(text: &str) -> Result<SinglePlugin, ConfError> {
    #[derive(Deserialize)]
    struct Single {
        #[serde(rename = "type", default)]
        plugin_type: String,
        #[serde(default)]
        name: String,
        #[serde(rename = "cniVersion", default)]
        cni_version: String,
    }
    let single: Single = serde_json::from_str(text).map_err(ConfError::Json)?;
    if single.plugin_type.is_empty() {
        return Err(ConfError::NoType);
    }
    Ok(SinglePlugin { plugin_type: single.plugin_type, name: single.name, cni_version: single.cni_version })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinglePlugin {
    pub plugin_type: String,
    pub name: String,
    pub cni_version: String,
}

/// `text` with `entry` as the last plugin of its list. An entry of ours
/// already there, identical and last, leaves the text as it is (`None`);
/// one that differs or is not last is taken out first.
pub fn with_entry_last(text: &str, entry: &str) -> Result<Option<String>, ConfError> {
    let list = parse_list(text)?;
    if let Some(ours) = list.ours() {
        let is_last = ours + 1 == list.entries.len();
        let only_one = list.entries.iter().filter(|e| e.plugin_type == PLUGIN_TYPE).count() == 1;
        if is_last && only_one && &text[list.entries[ours].span.clone()] == entry {
            return Ok(None);
        }
    }
    let mut text = without_entries(text)?.unwrap_or_else(|| text.to_owned());
    let list = parse_list(&text)?;
    let last = &list.entries[list.entries.len() - 1];
    let insertion = format!(",{}{entry}", separator(&text, &list));
    text.insert_str(last.span.end, &insertion);
    Ok(Some(text))
}

/// The whitespace that separates entries in this list, so that ours lines
/// up with its neighbours: what precedes the last entry (after the comma
/// before it), or for a one-entry list what follows the `[`.
fn separator<'t>(text: &'t str, list: &PluginList) -> &'t str {
    let n = list.entries.len();
    if n >= 2 {
        let between = &text[list.entries[n - 2].span.end..list.entries[n - 1].span.start];
        between.split_once(',').map_or(between, |(_, after)| after)
    } else {
        &text[list.array.start + 1..list.entries[0].span.start]
    }
}

/// `text` without any entry of ours (`None` when it has none). An entry is
/// removed with the comma and whitespace that join it to the one before, the
/// exact inverse of [`with_entry_last`].
pub fn without_entries(text: &str) -> Result<Option<String>, ConfError> {
    let mut text = text.to_owned();
    let mut changed = false;
    loop {
        let list = parse_list(&text)?;
        let Some(ours) = list.ours() else { break };
        let cut = if ours > 0 {
            list.entries[ours - 1].span.end..list.entries[ours].span.end
        } else if list.entries.len() > 1 {
            list.entries[0].span.start..list.entries[1].span.start
        } else {
            // A list of only ours (not one we made): leave an empty list
            // rather than a broken one.
            list.entries[0].span.clone()
        };
        text.replace_range(cut, "");
        changed = true;
        if list.entries.len() == 1 {
            break;
        }
    }
    Ok(changed.then_some(text))
}

/// A `.conflist` made from a single-plugin configuration, the way the
/// runtime itself reads a `.conf` (libcni's `ConfListFromConf`: a list with
/// the plugin's `name` and `cniVersion` and the plugin as its only entry),
/// with our entry after it. The original text is embedded byte for byte as
/// the first entry (JSON allows any whitespace around a value), so
/// [`original_of_converted`] gives it back exactly.
pub fn converted(original: &str, single: &SinglePlugin, from_file: &str, entry: &str) -> String {
    let json = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
    format!(
        "{{\n  \"cniVersion\": {},\n  \"name\": {},\n  \"{CONVERTED_FROM_KEY}\": {},\n  \"plugins\": [{original},\n    {entry}\n  ]\n}}\n",
        json(&single.cni_version),
        json(&single.name),
        json(from_file),
    )
}

/// The file name and text a list made by [`converted`] came from, when it
/// still holds exactly the original plugin and ours (if another installer
/// has since added its own entry, restoring the `.conf` would drop theirs).
pub fn original_of_converted(text: &str) -> Option<(String, String)> {
    let list = parse_list(text).ok()?;
    let from = list.converted_from.clone()?;
    if list.entries.len() != 2 || list.ours() != Some(1) {
        return None;
    }
    let rest = &text[list.entries[0].span.end..];
    let comma = list.entries[0].span.end + rest.find(',')?;
    let original = &text[list.array.start + 1..comma];
    parse_single(original).ok()?;
    Some((from, original.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY: &str = r#"{"type":"ztunnel-cni","socket":"/var/run/ztunnel/cni.sock"}"#;

    #[test]
    fn spans_are_the_entries_text() {
        let text = "{\"name\":\"k\",\"plugins\":[ {\"type\":\"a\"} ,\n\t{\"type\":\"b\",\"x\":[1,2]}\n]}";
        let list = parse_list(text).unwrap();
        assert_eq!(&text[list.array.clone()], "[ {\"type\":\"a\"} ,\n\t{\"type\":\"b\",\"x\":[1,2]}\n]");
        assert_eq!(&text[list.entries[0].span.clone()], "{\"type\":\"a\"}");
        assert_eq!(&text[list.entries[1].span.clone()], "{\"type\":\"b\",\"x\":[1,2]}");
        assert_eq!(list.ours(), None);
    }

    #[test]
    fn append_lines_up_with_the_neighbours_and_removal_restores() {
        let text = "{\n  \"name\": \"k\",\n  \"plugins\": [\n    {\"type\": \"a\"},\n    {\"type\": \"b\"}\n  ]\n}\n";
        let with = with_entry_last(text, ENTRY).unwrap().unwrap();
        assert_eq!(
            with,
            format!(
                "{{\n  \"name\": \"k\",\n  \"plugins\": [\n    {{\"type\": \"a\"}},\n    {{\"type\": \"b\"}},\n    {ENTRY}\n  ]\n}}\n"
            )
        );
        assert_eq!(with_entry_last(&with, ENTRY).unwrap(), None);
        assert_eq!(without_entries(&with).unwrap().unwrap(), text);
        assert_eq!(without_entries(text).unwrap(), None);
    }

    #[test]
    fn a_changed_entry_is_replaced_in_place_of_the_old() {
        let text = "{\"name\":\"k\",\"plugins\":[{\"type\":\"a\"}]}";
        let old = with_entry_last(text, r#"{"type":"ztunnel-cni","socket":"/old"}"#).unwrap().unwrap();
        let new = with_entry_last(&old, ENTRY).unwrap().unwrap();
        assert_eq!(new, with_entry_last(text, ENTRY).unwrap().unwrap());
        assert_eq!(without_entries(&new).unwrap().unwrap(), text);
    }

    #[test]
    fn ours_not_last_moves_to_the_end() {
        let text =
            format!("{{\"name\":\"k\",\"plugins\":[{{\"type\":\"a\"}}, {ENTRY}, {{\"type\":\"b\"}}]}}");
        let moved = with_entry_last(&text, ENTRY).unwrap().unwrap();
        assert_eq!(
            moved,
            format!("{{\"name\":\"k\",\"plugins\":[{{\"type\":\"a\"}}, {{\"type\":\"b\"}}, {ENTRY}]}}")
        );
    }

    #[test]
    fn foreign_mesh_plugins_are_named() {
        let text = "{\"name\":\"k\",\"plugins\":[{\"type\":\"calico\"},{\"type\":\"istio-cni\"}]}";
        assert_eq!(parse_list(text).unwrap().foreign_mesh_plugins(), vec!["istio-cni".to_owned()]);
    }

    #[test]
    fn what_the_runtime_would_refuse_is_refused() {
        assert!(matches!(parse_list("{\"plugins\":[{\"type\":\"a\"}]}"), Err(ConfError::NoName)));
        assert!(matches!(parse_list("{\"name\":\"k\"}"), Err(ConfError::NoPlugins)));
        assert!(matches!(parse_list("{\"name\":\"k\",\"plugins\":[]}"), Err(ConfError::EmptyPlugins)));
        assert!(matches!(
            parse_list("{\"name\":\"k\",\"plugins\":[{\"x\":1}]}"),
            Err(ConfError::BadEntry(0))
        ));
        assert!(matches!(parse_list("{\"name\":\"k\",\"plugins\":[1]}"), Err(ConfError::BadEntry(0))));
        assert!(matches!(parse_list("{\"name\":\"k\",\"plugins\":[] "), Err(ConfError::Json(_))));
        assert!(matches!(parse_single("{\"name\":\"k\",\"plugins\":[]}"), Err(ConfError::NoType)));
    }

    #[test]
    fn a_converted_conf_gives_back_its_original() {
        let original = "{\r\n\t\"cniVersion\": \"0.3.1\",\r\n\t\"name\": \"br\u{e9}\",\r\n\t\"type\": \"bridge\"\r\n}\r\n";
        let single = parse_single(original).unwrap();
        let list = converted(original, &single, "10-bridge.conf", ENTRY);
        let parsed = parse_list(&list).unwrap();
        assert_eq!(parsed.entries.len(), 2);
        assert_eq!(parsed.ours(), Some(1));
        assert_eq!(parsed.converted_from.as_deref(), Some("10-bridge.conf"));
        let value: serde_json::Value = serde_json::from_str(&list).unwrap();
        assert_eq!((value["name"].as_str(), value["cniVersion"].as_str()), (Some("br\u{e9}"), Some("0.3.1")));
        assert_eq!(original_of_converted(&list), Some(("10-bridge.conf".to_owned(), original.to_owned())));
        // Our entry identical and last: nothing to do.
        assert_eq!(with_entry_last(&list, ENTRY).unwrap(), None);
    }
}
