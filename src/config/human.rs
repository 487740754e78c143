//! Durations as humantime strings (`7d`, `90s`, `1h 30m`).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Other(toml::Value),
    }
    match Raw::deserialize(d)? {
        Raw::Text(s) => humantime::parse_duration(s.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "expected a duration like `7d`, `90s` or `1h 30m`, got `{s}` ({e})"
            ))
        }),
        Raw::Other(v) => Err(serde::de::Error::custom(format!(
            "expected a duration like `7d`, `90s` or `1h 30m` in quotes, got {}",
            v.type_str()
        ))),
    }
}
