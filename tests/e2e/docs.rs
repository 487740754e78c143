//! docs/configuration.md documents every setting the code has, with the code's default, and
//! every key of the example config.

use std::collections::BTreeMap;

use serde_json::Value;
use storekeyd::config::{Application, Config};

const DOC: &str = include_str!("../../docs/configuration.md");
const EXAMPLE: &str = include_str!("../../config/storekeyd.example.toml");
/// The heading of the section whose table lists an application's keys.
const APPLICATIONS_HEADING: &str = "## `[[applications]]`";

/// The page's tables: the first cell's name (in backticks) and the second cell, split by
/// whether the row is in the applications section.
struct Doc {
    settings: BTreeMap<String, String>,
    application_keys: BTreeMap<String, String>,
}

fn doc() -> Doc {
    let mut doc = Doc {
        settings: BTreeMap::new(),
        application_keys: BTreeMap::new(),
    };
    let mut in_applications = false;
    for line in DOC.lines() {
        if line.starts_with("## ") {
            in_applications = line == APPLICATIONS_HEADING;
            continue;
        }
        let Some(row) = line.strip_prefix('|') else {
            continue;
        };
        let cells: Vec<&str> = row.split(" | ").map(str::trim).collect();
        let Some(name) = cells
            .first()
            .and_then(|c| c.strip_prefix('`'))
            .and_then(|c| c.strip_suffix('`'))
        else {
            continue;
        };
        let second = cells.get(1).copied().unwrap_or_default().to_owned();
        let table = if in_applications {
            &mut doc.application_keys
        } else {
            &mut doc.settings
        };
        assert!(
            table.insert(name.to_owned(), second).is_none(),
            "`{name}` has two rows in docs/configuration.md"
        );
    }
    doc
}

/// Every setting of `Config::default()` by its dotted name, with its default as the config
/// serializes it (durations in humantime). `applications` is a list; its keys come from
/// [`application_keys`].
fn code_settings() -> BTreeMap<String, Value> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(fields) => {
                for (key, value) in fields {
                    let name = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&name, value, out);
                }
            }
            _ if prefix == "applications" => {}
            _ => {
                out.insert(prefix.to_owned(), value.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(
        "",
        &serde_json::to_value(Config::default()).unwrap(),
        &mut out,
    );
    out
}

fn application_keys() -> Vec<String> {
    match serde_json::to_value(Application::default()).unwrap() {
        Value::Object(fields) => fields.keys().cloned().collect(),
        other => panic!("an application serializes as {other}"),
    }
}

/// The first `…` span of a cell, read as JSON where it is a number or a boolean.
fn documented_default(cell: &str) -> Option<Value> {
    let (_, rest) = cell.split_once('`')?;
    let (text, _) = rest.split_once('`')?;
    Some(match serde_json::from_str::<Value>(text) {
        Ok(v @ (Value::Number(_) | Value::Bool(_))) => v,
        _ => Value::String(text.to_owned()),
    })
}

/// Equal, with durations compared as durations (`14d` is `14days`).
fn same(code: &Value, other: &Value) -> bool {
    if let (Value::String(a), Value::String(b)) = (code, other)
        && let (Ok(a), Ok(b)) = (
            humantime::parse_duration(a.trim()),
            humantime::parse_duration(b.trim()),
        )
    {
        return a == b;
    }
    code == other
}

#[test]
fn every_setting_is_documented_with_the_codes_default() {
    let doc = doc();
    let code = code_settings();
    assert!(code.len() > 40, "found only {} settings", code.len());
    for (name, default) in &code {
        let cell = doc
            .settings
            .get(name)
            .unwrap_or_else(|| panic!("`{name}` has no row in docs/configuration.md"));
        if default.is_null() {
            // No fixed default (derived from another setting or the environment): the row
            // says what it is in words.
            continue;
        }
        let documented = documented_default(cell).unwrap_or_else(|| {
            panic!("docs/configuration.md gives `{name}` no default in backticks: {cell}")
        });
        assert!(
            same(default, &documented),
            "docs/configuration.md gives `{name}` the default {documented}; the code has {default}"
        );
    }
    for name in doc.settings.keys() {
        assert!(
            code.contains_key(name),
            "docs/configuration.md documents `{name}`, which is not a setting"
        );
    }
    let keys = application_keys();
    for key in &keys {
        assert!(
            doc.application_keys.contains_key(key),
            "the application key `{key}` has no row under {APPLICATIONS_HEADING}"
        );
    }
    for key in doc.application_keys.keys() {
        assert!(
            keys.contains(key),
            "docs/configuration.md documents the application key `{key}`, which does not exist"
        );
    }
}

/// The example with its commented-out settings (`# key = value`, `# [section]`) switched on.
fn example_with_commented_settings() -> String {
    EXAMPLE
        .lines()
        .map(|line| {
            let Some(body) = line.strip_prefix('#').map(str::trim_start) else {
                return line.to_owned();
            };
            let is_header = body.starts_with('[')
                && body.ends_with(']')
                && body
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || "_.[]".contains(c));
            let is_setting = body.split_once('=').is_some_and(|(key, _)| {
                let key = key.trim();
                !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            });
            if is_header || is_setting {
                body.to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every key of a parsed example, as `section.key`, applications' keys apart.
fn example_keys(table: &toml::Table) -> (BTreeMap<String, toml::Value>, Vec<String>) {
    let mut settings = BTreeMap::new();
    let mut applications = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::Table(section) => {
                for (inner, value) in section {
                    settings.insert(format!("{key}.{inner}"), value.clone());
                }
            }
            toml::Value::Array(apps) if key == "applications" => {
                for app in apps {
                    let app = app.as_table().expect("an application is a table");
                    applications.extend(app.keys().cloned());
                }
            }
            _ => {
                settings.insert(key.clone(), value.clone());
            }
        }
    }
    (settings, applications)
}

#[test]
fn every_key_of_the_example_config_is_documented_and_shows_the_default() {
    let doc = doc();
    let all: toml::Table = toml::from_str(&example_with_commented_settings())
        .expect("the example with its commented settings switched on is valid TOML");
    let (settings, applications) = example_keys(&all);
    for name in settings.keys() {
        assert!(
            doc.settings.contains_key(name),
            "config/storekeyd.example.toml sets `{name}`, which docs/configuration.md does not document"
        );
    }
    for key in &applications {
        assert!(
            doc.application_keys.contains_key(key),
            "config/storekeyd.example.toml sets the application key `{key}`, which docs/configuration.md does not document"
        );
    }
    // The example's header says its values are the defaults, and it shows every one.
    for (name, default) in code_settings() {
        if default.is_null() {
            continue;
        }
        let value = settings.get(&name).unwrap_or_else(|| {
            panic!("config/storekeyd.example.toml does not show `{name}` (default {default})")
        });
        let value = serde_json::to_value(value).unwrap();
        assert!(
            same(&default, &value),
            "config/storekeyd.example.toml shows `{name}` as {value}; the default is {default}"
        );
    }
}
