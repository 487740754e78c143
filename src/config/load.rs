//! Loading: the file, then the environment on top, then validation.

use std::path::Path;

use super::{Config, ConfigError, apply_env, field_error};

impl Config {
    /// Reads the file (if any), applies the environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        let name = path.map_or_else(|| "(defaults)".to_owned(), |p| p.display().to_string());
        Config::from_toml(&text, &name, std::env::vars())
    }

    /// Parses TOML text with the given environment on top. Split out so tests need neither files
    /// nor the process environment.
    pub fn from_toml(
        text: &str,
        name: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: name.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        let env: Vec<(String, String)> = env.into_iter().collect();
        apply_env(&mut table, env.iter().cloned())?;
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| field_error(e.path().to_string(), e.inner().to_string()))?;
        let var = |name: &str| {
            env.iter()
                .find(|(k, v)| k == name && !v.is_empty())
                .map(|(_, v)| v.clone())
        };
        for app in &mut config.applications {
            app.apply_azure_env(var);
        }
        config.validate()?;
        Ok(config)
    }
}
