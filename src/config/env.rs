//! `STOREKEYD_*` environment variables over the file.

use std::collections::BTreeMap;

use super::{ConfigError, ENV_PREFIX, ENV_RESERVED, SETTINGS, field_error};

/// `STOREKEYD_RENEW__MARGIN=3d` sets `renew.margin`: `__` separates levels, as in most tools that
/// map env to nested config. Values are read as TOML when they parse (numbers, booleans) and as
/// strings otherwise.
pub(super) fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let vars: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !ENV_RESERVED.contains(&k.as_str()))
        .collect();
    for (name, raw) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        // Only names that start with a setting override it: STOREKEYD_SECRET_MAIN (a secret
        // named by client_secret_env) or a tool's own STOREKEYD_* variable is not config.
        if !path
            .first()
            .is_some_and(|top| SETTINGS.contains(&top.as_str()))
        {
            continue;
        }
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        set_path(table, &path, value)
            .map_err(|m| field_error(path.join("."), format!("from {name}: {m}")))?;
    }
    Ok(())
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty name")?;
    let mut current = table;
    for part in parents {
        let entry = current
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{part}` is not a section"))?;
    }
    current.insert(last.clone(), value);
    Ok(())
}
