//! The two exposition formats of `/metrics`. Prometheus asks for OpenMetrics
//! (its `Accept` header says so) and gets prometheus_client's output as is;
//! anything else (curl, `promtool check metrics`, older scrapers) gets the
//! classic text format 0.0.4, where a counter's `# HELP`/`# TYPE` name is
//! its sample name (`..._total`) and there is no `# EOF`.

use std::collections::HashSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Text,
}

impl Format {
    /// The format a request's `Accept` header asks for.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// OpenMetrics text (as prometheus_client writes it) in the classic format.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, kind)| *kind == "counter")
        .map(|(name, _)| name)
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = line.strip_prefix("# HELP ").map(|r| ("# HELP ", r));
        let descriptor = descriptor.or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match descriptor {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) && !name.ends_with("_total") {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_samples_and_eof_goes() {
        let om = "# HELP a_reloads Reloads.\n# TYPE a_reloads counter\na_reloads_total{result=\"ok\"} 1\n\
                  # HELP a_ready Ready.\n# TYPE a_ready gauge\na_ready 1\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP a_reloads_total Reloads.\n# TYPE a_reloads_total counter\na_reloads_total{result=\"ok\"} 1\n\
             # HELP a_ready Ready.\n# TYPE a_ready gauge\na_ready 1\n"
        );
    }

    #[test]
    fn prometheus_gets_openmetrics_and_everyone_else_text() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(Format::negotiate(None), Format::Text);
    }
}
