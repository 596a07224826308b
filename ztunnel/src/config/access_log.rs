//! The `access_log` section: where lines go, and how often a long
//! connection gets a periodic line while it runs.
//!
//! ```yaml
//! access_log: /var/log/ztunnel/access.log        # as before: the target alone
//! access_log: {target: stdout, interval: 30s}    # or with the interval
//! ```

use std::{fmt, time::Duration};

use serde::{
    Deserialize, Deserializer, Serialize,
    de::{self, MapAccess, Visitor, value::MapAccessDeserializer},
};

use super::AccessLogTarget;

/// The periodic line interval when none is given.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessLogConfig {
    pub target: AccessLogTarget,
    /// A connection open this long gets a `periodic` line, and one more each
    /// interval after; `0s` turns periodic lines off.
    #[serde(with = "super::duration")]
    pub interval: Duration,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self { target: AccessLogTarget::default(), interval: DEFAULT_INTERVAL }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    #[serde(default)]
    target: AccessLogTarget,
    #[serde(default = "default_interval", with = "super::duration")]
    interval: Duration,
}

fn default_interval() -> Duration {
    DEFAULT_INTERVAL
}

impl<'de> Deserialize<'de> for AccessLogConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = AccessLogConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`stdout`, `off`, an absolute file path, or a map of `target` and `interval`")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<AccessLogConfig, E> {
                let target = s.parse().map_err(E::custom)?;
                Ok(AccessLogConfig { target, ..AccessLogConfig::default() })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<AccessLogConfig, A::Error> {
                let s = Section::deserialize(MapAccessDeserializer::new(map))?;
                Ok(AccessLogConfig { target: s.target, interval: s.interval })
            }
        }
        d.deserialize_any(Visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<AccessLogConfig, String> {
        serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn a_target_alone_or_a_section_with_the_interval() {
        assert_eq!(parse("stdout").unwrap(), AccessLogConfig::default());
        let c = parse("/var/log/a.log").unwrap();
        assert_eq!(c.target, AccessLogTarget::File("/var/log/a.log".into()));
        assert_eq!(c.interval, DEFAULT_INTERVAL);
        let c = parse("{target: off, interval: 30s}").unwrap();
        assert_eq!((c.target, c.interval), (AccessLogTarget::Off, Duration::from_secs(30)));
        assert_eq!(parse("{interval: 0s}").unwrap().interval, Duration::ZERO);
        assert!(parse("relative.log").unwrap_err().contains("absolute"));
        assert!(parse("{target: stdout, every: 1s}").unwrap_err().contains("unknown field"));
        assert!(parse("{interval: soon}").unwrap_err().contains("not a duration"));
    }
}
