//! Configuration: one TOML file, overridable by `STOREKEYD_*` environment variables.
//!
//! Every field has a default but the applications; every invalid field is reported by its dotted
//! name with what was expected. Secrets are never in the file: only where to read them.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::claims::Kind;
use crate::policy::schedule::Policy;

mod application;

pub use application::{
    Application, AssertionAlgorithm, CredentialKind, CredentialSource, FieldProblem,
};

pub const ENV_PREFIX: &str = "STOREKEYD_";
/// The top-level settings, which an override's name must start with.
const SETTINGS: [&str; 17] = [
    "database_url",
    "state_directory",
    "database_busy_timeout",
    "database_pool_size",
    "database_connect_timeout",
    "database_listen_url",
    "database_password_file",
    "endpoints",
    "entra",
    "applications",
    "renew",
    "breaker",
    "guard",
    "http",
    "events",
    "metrics",
    "log",
];
/// Variables with the prefix that are not config overrides.
const ENV_RESERVED: [&str; 3] = ["STOREKEYD_CONFIG", "STOREKEYD_LOG", "STOREKEYD_LOG_FORMAT"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `sqlite://PATH` or `postgres://USER@HOST/DATABASE`; defaults to `storekeyd.db` in the
    /// state directory.
    pub database_url: Option<String>,
    /// Defaults to `$STATE_DIRECTORY` (systemd's `StateDirectory=`) or `/var/lib/storekeyd`.
    pub state_directory: Option<PathBuf>,
    /// How long one statement waits for a lock another connection holds (a backend's long
    /// transaction) before failing; failed writes of renewal results are retried beyond it.
    #[serde(with = "human")]
    pub database_busy_timeout: Duration,
    /// PostgreSQL: connections per replica, the listener for new keys included.
    pub database_pool_size: u32,
    /// PostgreSQL: how long to wait for a connection before the call fails (and the daemon
    /// reports not-ready, spools and retries).
    #[serde(with = "human")]
    pub database_connect_timeout: Duration,
    /// PostgreSQL: a direct URL for the listener for new keys, where `database_url` goes through
    /// PgBouncer in transaction mode (which cannot hold a `LISTEN`).
    pub database_listen_url: Option<String>,
    /// PostgreSQL: a file holding the password (mode 0600, or a systemd credential: a relative
    /// name is looked up in `$CREDENTIALS_DIRECTORY`), so that it need not be in the URL.
    pub database_password_file: Option<PathBuf>,
    pub endpoints: Endpoints,
    pub entra: Entra,
    pub applications: Vec<Application>,
    pub renew: Renew,
    pub breaker: Breaker,
    pub guard: Guard,
    pub http: Http,
    pub events: Events,
    pub metrics: Metrics,
    pub log: Log,
}

/// The loopback HTTP listener for `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    pub enabled: bool,
    pub listen: std::net::SocketAddr,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            enabled: true,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    /// `human` or `json`; `--log-format` overrides it.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Endpoints {
    pub collections: String,
    pub purchase: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Entra {
    pub authority: String,
    pub scope: String,
    /// Where a managed identity's token comes from: Azure's instance metadata service.
    pub managed_identity_endpoint: String,
    /// The audience of a managed identity's token that is exchanged as a federated assertion;
    /// by default the one of `authority`'s cloud.
    pub token_exchange_audience: Option<String>,
    /// A certificate credential that expires sooner than this raises a warning, an alarm for
    /// `status`, and fails `check`.
    #[serde(with = "human")]
    pub certificate_expiry_warning: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Renew {
    #[serde(with = "human")]
    pub max_age: Duration,
    #[serde(with = "human")]
    pub margin: Duration,
    #[serde(with = "human")]
    pub jitter: Duration,
    #[serde(with = "human")]
    pub poll_interval: Duration,
    pub concurrency: usize,
    /// Renew calls per second, across all keys.
    pub rate_limit: f64,
    pub batch_size: u32,
    #[serde(with = "human")]
    pub backoff_base: Duration,
    #[serde(with = "human")]
    pub backoff_cap: Duration,
    /// How long a claimed key is reserved for one attempt; after a crash it is retried then.
    #[serde(with = "human")]
    pub lease: Duration,
    /// How long SIGTERM waits for in-flight renewals.
    #[serde(with = "human")]
    pub shutdown_grace: Duration,
    /// How long renewed keys wait for an unwritable database before they go to the spool file in
    /// the state directory (applied at the next start).
    #[serde(with = "human")]
    pub spool_after: Duration,
}

/// The outage breaker (one per renew endpoint).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Breaker {
    /// Different keys failing transiently (5xx, timeout, connection, 429) within `window` that
    /// open the breaker.
    pub threshold: usize,
    #[serde(with = "human")]
    pub window: Duration,
    /// The first wait before a probe; doubles after each failed probe, up to `probe_max`.
    #[serde(with = "human")]
    pub probe_initial: Duration,
    #[serde(with = "human")]
    pub probe_max: Duration,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            threshold: 10,
            window: Duration::from_secs(60),
            probe_initial: Duration::from_secs(15),
            probe_max: Duration::from_secs(300),
        }
    }
}

/// The false-revocation guard.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Guard {
    /// Different keys of one application refused with AuthenticationTokenInvalid within
    /// `window`, with no renewal of it since, that raise the credential alarm.
    pub threshold: usize,
    #[serde(with = "human")]
    pub window: Duration,
    /// At most one canary (a healthy key renewed early to test the credential) per application
    /// this often.
    #[serde(with = "human")]
    pub canary_interval: Duration,
    /// A canary is preferably a key issued at least this long ago: renewing a key renewed
    /// moments ago proves as much but gains nothing, and the Store may answer with the same
    /// expiry. A younger key is asked only when no older one is free (keys a backend re-stores
    /// at every login may all be young): that, or no evidence at all.
    #[serde(with = "human")]
    pub canary_min_age: Duration,
    /// A refused key whose application has no other key to test the credential with is flagged
    /// revoked once its refusals span this long.
    #[serde(with = "human")]
    pub lone_key_after: Duration,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            threshold: 5,
            window: Duration::from_secs(900),
            canary_interval: Duration::from_secs(60),
            canary_min_age: Duration::from_secs(3600),
            lone_key_after: Duration::from_secs(6 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    #[serde(with = "human")]
    pub connect_timeout: Duration,
    /// The whole request, body included.
    #[serde(with = "human")]
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    /// How far the host clock may be from the `Date` of the Store's and Entra's answers before
    /// the clock alarm is raised (expiry is judged on their time either way).
    #[serde(with = "human")]
    pub max_clock_offset: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Events {
    #[serde(with = "human")]
    pub retention: Duration,
}

const DAY: u64 = 86_400;
/// Azure's instance metadata service: plain http on a link-local address, by design.
pub const IMDS_TOKEN_URL: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: None,
            state_directory: None,
            database_busy_timeout: crate::storage::BUSY_TIMEOUT,
            database_pool_size: crate::storage::DbOptions::default().pool_size,
            database_connect_timeout: crate::storage::DbOptions::default().connect_timeout,
            database_listen_url: None,
            database_password_file: None,
            endpoints: Endpoints::default(),
            entra: Entra::default(),
            applications: Vec::new(),
            renew: Renew::default(),
            breaker: Breaker::default(),
            guard: Guard::default(),
            http: Http::default(),
            events: Events::default(),
            metrics: Metrics::default(),
            log: Log::default(),
        }
    }
}

impl Default for Endpoints {
    fn default() -> Self {
        Endpoints {
            collections: Kind::Collections.documented_renew_url().into(),
            purchase: Kind::Purchase.documented_renew_url().into(),
        }
    }
}

impl Default for Entra {
    fn default() -> Self {
        Entra {
            authority: "https://login.microsoftonline.com".into(),
            scope: "https://onestore.microsoft.com/.default".into(),
            managed_identity_endpoint: IMDS_TOKEN_URL.into(),
            token_exchange_audience: None,
            certificate_expiry_warning: Duration::from_secs(30 * DAY),
        }
    }
}

impl Entra {
    /// The exchange audience: configured, or the one Microsoft documents for the authority's
    /// cloud (global, US Government, China).
    pub fn token_exchange_audience(&self) -> String {
        if let Some(audience) = &self.token_exchange_audience {
            return audience.clone();
        }
        let host = reqwest::Url::parse(&self.authority)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
            .unwrap_or_default();
        if host.ends_with("microsoftonline.us") {
            "api://AzureADTokenExchangeUSGov".into()
        } else if host.ends_with("microsoftonline.cn") {
            "api://AzureADTokenExchangeChina".into()
        } else {
            "api://AzureADTokenExchange".into()
        }
    }
}

impl Default for Renew {
    fn default() -> Self {
        Renew {
            max_age: Duration::from_secs(14 * DAY),
            margin: Duration::from_secs(7 * DAY),
            jitter: Duration::from_secs(3600),
            poll_interval: Duration::from_secs(30),
            concurrency: 8,
            rate_limit: 20.0,
            batch_size: 64,
            backoff_base: Duration::from_secs(30),
            backoff_cap: Duration::from_secs(3600),
            lease: Duration::from_secs(120),
            shutdown_grace: Duration::from_secs(20),
            spool_after: Duration::from_secs(30),
        }
    }
}

impl Default for Http {
    fn default() -> Self {
        Http {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(20),
            max_body_bytes: 64 * 1024,
            max_clock_offset: Duration::from_secs(120),
        }
    }
}

impl Default for Events {
    fn default() -> Self {
        Events {
            retention: Duration::from_secs(30 * DAY),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("config: `{field}`: {message}")]
    Field { field: String, message: String },
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        message: message.into(),
    }
}

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

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_url("endpoints.collections", &self.endpoints.collections)?;
        check_url("endpoints.purchase", &self.endpoints.purchase)?;
        check_url("entra.authority", &self.entra.authority)?;
        if self.entra.managed_identity_endpoint != IMDS_TOKEN_URL {
            check_url(
                "entra.managed_identity_endpoint",
                &self.entra.managed_identity_endpoint,
            )?;
        }
        self.validate_database()?;
        self.validate_applications()?;
        self.validate_numbers()
    }

    fn validate_applications(&self) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        let mut labels = HashSet::new();
        for (i, app) in self.applications.iter().enumerate() {
            let field = |f: &str| format!("applications[{i}].{f}");
            if app.client_id.trim().is_empty() {
                return Err(field_error(
                    field("client_id"),
                    "must not be empty (a federated credential may take it from AZURE_CLIENT_ID)",
                ));
            }
            if app.tenant_id.trim().is_empty() || app.tenant_id.contains(['/', '?', '#']) {
                return Err(field_error(
                    field("tenant_id"),
                    "expected a tenant ID or domain (a federated credential may take it from AZURE_TENANT_ID)",
                ));
            }
            if !seen.insert(app.client_id.as_str()) {
                return Err(field_error(field("client_id"), "is configured twice"));
            }
            // Logs, metrics and alarms name an application by its label.
            if !labels.insert(app.label()) {
                return Err(field_error(
                    field("name"),
                    format!("`{}` names another application too", app.label()),
                ));
            }
            if let Err(p) = app.source() {
                return Err(field_error(field(p.field), p.message));
            }
        }
        Ok(())
    }

    fn validate_database(&self) -> Result<(), ConfigError> {
        use crate::storage::Backend;
        if let Some(url) = &self.database_url
            && Backend::of(url).is_none()
        {
            return Err(field_error(
                "database_url",
                "expected a `sqlite://PATH` or `postgres://USER@HOST/DATABASE` URL",
            ));
        }
        if let Some(url) = &self.database_listen_url
            && Backend::of(url) != Some(Backend::Postgres)
        {
            return Err(field_error(
                "database_listen_url",
                "expected a `postgres://` URL (the listener is for PostgreSQL only)",
            ));
        }
        if self.database_password_file.is_some()
            && Backend::of(&self.database_url()) != Some(Backend::Postgres)
        {
            return Err(field_error(
                "database_password_file",
                "a password file is for a `postgres://` database_url only",
            ));
        }
        if !(2..=1000).contains(&self.database_pool_size) {
            return Err(field_error(
                "database_pool_size",
                "expected 2 to 1000 connections (one is the listener's)",
            ));
        }
        if self.database_connect_timeout.is_zero() {
            return Err(field_error(
                "database_connect_timeout",
                "must be longer than zero",
            ));
        }
        Ok(())
    }

    fn validate_numbers(&self) -> Result<(), ConfigError> {
        let r = &self.renew;
        let positive = [
            ("renew.margin", r.margin),
            ("renew.max_age", r.max_age),
            ("renew.poll_interval", r.poll_interval),
            ("renew.backoff_base", r.backoff_base),
            ("renew.lease", r.lease),
            ("renew.spool_after", r.spool_after),
            ("http.connect_timeout", self.http.connect_timeout),
            ("http.request_timeout", self.http.request_timeout),
        ];
        for (name, d) in positive {
            if d.is_zero() {
                return Err(field_error(name, "must be longer than zero"));
            }
        }
        if r.concurrency == 0 {
            return Err(field_error("renew.concurrency", "must be at least 1"));
        }
        if !(r.rate_limit.is_finite() && r.rate_limit > 0.0) {
            return Err(field_error(
                "renew.rate_limit",
                "expected renewals per second, above 0",
            ));
        }
        if r.batch_size == 0 {
            return Err(field_error("renew.batch_size", "must be at least 1"));
        }
        if r.backoff_cap < r.backoff_base {
            return Err(field_error(
                "renew.backoff_cap",
                "must not be shorter than `renew.backoff_base`",
            ));
        }
        // A lease shorter than one attempt (token, renew, fresh token, renew) would let another
        // process start a second attempt while the first runs.
        if r.lease < self.http.request_timeout.saturating_mul(5) {
            return Err(field_error(
                "renew.lease",
                "must be at least five times `http.request_timeout` (an attempt can make four requests)",
            ));
        }
        if self.breaker.threshold < 2 {
            return Err(field_error(
                "breaker.threshold",
                "must be at least 2 (one failing key is that key's problem)",
            ));
        }
        if self.guard.threshold < 2 {
            return Err(field_error("guard.threshold", "must be at least 2"));
        }
        // A zero window would quietly switch the protection off.
        for (field, window) in [
            ("guard.window", self.guard.window),
            ("breaker.window", self.breaker.window),
        ] {
            if window < Duration::from_secs(1) {
                return Err(field_error(
                    field,
                    "must be at least 1s: a zero window would switch the protection off",
                ));
            }
        }
        if self.guard.canary_interval < Duration::from_secs(1) {
            return Err(field_error("guard.canary_interval", "must be at least 1s"));
        }
        if self.guard.lone_key_after < Duration::from_secs(3600) {
            return Err(field_error(
                "guard.lone_key_after",
                "must be at least 1h: a key is flagged on refusals alone only after hours of them",
            ));
        }
        if self.breaker.probe_initial.is_zero()
            || self.breaker.probe_max < self.breaker.probe_initial
        {
            return Err(field_error(
                "breaker.probe_max",
                "must be at least `breaker.probe_initial`, which must be above zero",
            ));
        }
        if self.http.max_clock_offset < Duration::from_secs(1) {
            return Err(field_error("http.max_clock_offset", "must be at least 1s"));
        }
        if self.http.max_body_bytes < 1024 {
            return Err(field_error("http.max_body_bytes", "must be at least 1024"));
        }
        Ok(())
    }

    pub fn endpoint(&self, kind: Kind) -> &str {
        match kind {
            Kind::Collections => &self.endpoints.collections,
            Kind::Purchase => &self.endpoints.purchase,
        }
    }

    pub fn state_directory(&self) -> PathBuf {
        self.state_directory
            .clone()
            .or_else(|| std::env::var_os("STATE_DIRECTORY").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/lib/storekeyd"))
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                self.state_directory().join("storekeyd.db").display()
            )
        })
    }

    pub fn db_options(&self) -> crate::storage::DbOptions {
        crate::storage::DbOptions {
            busy_timeout: self.database_busy_timeout,
            pool_size: self.database_pool_size,
            connect_timeout: self.database_connect_timeout,
            listen_url: self.database_listen_url.clone(),
            password_file: self.database_password_file.clone(),
        }
    }

    pub fn policy(&self) -> Policy {
        Policy {
            max_age: self.renew.max_age,
            margin: self.renew.margin,
            jitter: self.renew.jitter,
            backoff_base: self.renew.backoff_base,
            backoff_cap: self.renew.backoff_cap,
        }
    }

    pub fn breaker_policy(&self) -> crate::policy::breaker::BreakerPolicy {
        crate::policy::breaker::BreakerPolicy {
            threshold: self.breaker.threshold,
            window: self.breaker.window,
            probe_initial: self.breaker.probe_initial,
            probe_max: self.breaker.probe_max,
        }
    }

    pub fn guard_policy(&self) -> crate::policy::guard::GuardPolicy {
        crate::policy::guard::GuardPolicy {
            threshold: self.guard.threshold,
            window: self.guard.window,
            canary_interval: self.guard.canary_interval,
            lone_key_after: self.guard.lone_key_after,
        }
    }

    pub fn application(&self, client_id: &str) -> Option<&Application> {
        self.applications.iter().find(|a| a.client_id == client_id)
    }
}

impl crate::policy::checks::Configured for Config {
    fn endpoint(&self, kind: Kind) -> &str {
        Config::endpoint(self, kind)
    }

    fn knows(&self, client_id: &str) -> bool {
        self.application(client_id).is_some()
    }
}

/// `https` everywhere; plain `http` only to a loopback host (the emulator, tests), so a typo can
/// never send a service ticket in the clear.
fn check_url(field: &str, value: &str) -> Result<(), ConfigError> {
    let url = reqwest::Url::parse(value)
        .map_err(|e| field_error(field, format!("expected an absolute URL: {e}")))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(&url) => Ok(()),
        "http" => Err(field_error(
            field,
            "plain http is allowed only for loopback hosts; use https",
        )),
        other => Err(field_error(
            field,
            format!("expected an https URL, got scheme `{other}`"),
        )),
    }
}

pub fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    }
}

/// `STOREKEYD_RENEW__MARGIN=3d` sets `renew.margin`: `__` separates levels, as in most tools that
/// map env to nested config. Values are read as TOML when they parse (numbers, booleans) and as
/// strings otherwise.
fn apply_env(
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

/// Durations as humantime strings (`7d`, `90s`, `1h 30m`).
mod human {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, "test.toml", Vec::new())
    }

    pub(super) fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = parse("").unwrap();
        assert_eq!(c.renew.max_age, Duration::from_secs(14 * DAY));
        assert_eq!(c.renew.margin, Duration::from_secs(7 * DAY));
        assert_eq!(
            c.endpoint(Kind::Purchase),
            "https://purchase.mp.microsoft.com/v6.0/b2b/keys/renew"
        );
        assert_eq!(c.entra.authority, "https://login.microsoftonline.com");
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../config/storekeyd.example.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.applications.len(), 2);
    }

    #[test]
    fn bad_duration_names_the_field() {
        assert!(err("[renew]\nmargin = \"a week\"").starts_with(
            "config: `renew.margin`: expected a duration like `7d`, `90s` or `1h 30m`, got `a week`"
        ));
        assert!(err("[renew]\nmargin = 7").contains("`renew.margin`: expected a duration"));
    }

    #[test]
    fn settings_that_would_switch_a_protection_off_are_refused() {
        for (toml, field) in [
            (
                "[guard]\nwindow = \"0s\"",
                "`guard.window`: must be at least 1s",
            ),
            (
                "[breaker]\nwindow = \"0s\"",
                "`breaker.window`: must be at least 1s",
            ),
            (
                "[guard]\ncanary_interval = \"0s\"",
                "`guard.canary_interval`",
            ),
            (
                "[guard]\nlone_key_after = \"10m\"",
                "`guard.lone_key_after`: must be at least 1h",
            ),
        ] {
            assert!(err(toml).contains(field), "{toml}: {}", err(toml));
        }
    }

    #[test]
    fn wrong_types_and_unknown_fields_name_the_field() {
        assert!(
            err("[renew]\nconcurrency = \"many\"")
                .starts_with("config: `renew.concurrency`: invalid type")
        );
        assert!(err("[renew]\nmarginn = \"7d\"").contains("unknown field `marginn`"));
        assert!(
            err("[renew]\nconcurrency = 0").contains("`renew.concurrency`: must be at least 1")
        );
        assert!(err("this is not toml").starts_with("config: test.toml is not valid TOML"));
    }

    #[test]
    fn plain_http_only_for_loopback() {
        assert!(parse("[endpoints]\ncollections = \"http://127.0.0.1:9/renew\"").is_ok());
        assert!(parse("[endpoints]\ncollections = \"http://[::1]:9/renew\"").is_ok());
        assert!(parse("[entra]\nauthority = \"http://localhost:9\"").is_ok());
        assert!(
            err("[endpoints]\ncollections = \"http://example.com/renew\"")
                .contains("`endpoints.collections`: plain http is allowed only for loopback")
        );
        assert!(err("[entra]\nauthority = \"ftp://x\"").contains("`entra.authority`"));
    }

    #[test]
    fn the_exchange_audience_follows_the_cloud() {
        let audience = |toml: &str| parse(toml).unwrap().entra.token_exchange_audience();
        assert_eq!(audience(""), "api://AzureADTokenExchange");
        assert_eq!(
            audience("[entra]\nauthority = \"https://login.microsoftonline.us\""),
            "api://AzureADTokenExchangeUSGov"
        );
        assert_eq!(
            audience("[entra]\nauthority = \"https://login.partner.microsoftonline.cn\""),
            "api://AzureADTokenExchangeChina"
        );
        assert_eq!(
            audience("[entra]\ntoken_exchange_audience = \"api://Custom\""),
            "api://Custom"
        );
    }

    #[test]
    fn every_setting_can_be_overridden() {
        let text = toml::to_string(&Config::default()).unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        for key in table.keys() {
            assert!(
                SETTINGS.contains(&key.as_str()),
                "`{key}` missing from SETTINGS"
            );
        }
    }

    #[test]
    fn environment_overrides_file() {
        let env = vec![
            ("STOREKEYD_RENEW__MARGIN".to_owned(), "3d".to_owned()),
            ("STOREKEYD_RENEW__CONCURRENCY".to_owned(), "3".to_owned()),
            (
                "STOREKEYD_DATABASE_URL".to_owned(),
                "sqlite:///tmp/x.db".to_owned(),
            ),
            ("STOREKEYD_CONFIG".to_owned(), "/ignored".to_owned()),
            (
                "STOREKEYD_SECRET_MAIN".to_owned(),
                "a secret, not a setting".to_owned(),
            ),
            ("OTHER".to_owned(), "x".to_owned()),
        ];
        let c = Config::from_toml("[renew]\nmargin = \"5d\"", "t", env).unwrap();
        assert_eq!(c.renew.margin, Duration::from_secs(3 * DAY));
        assert_eq!(c.renew.concurrency, 3);
        assert_eq!(c.database_url(), "sqlite:///tmp/x.db");
        let typo = vec![("STOREKEYD_RENEW__JITTR".to_owned(), "1h".to_owned())];
        let e = Config::from_toml("", "t", typo).unwrap_err().to_string();
        assert!(e.contains("unknown field `jittr`"), "{e}");
        let bad = vec![("STOREKEYD_RENEW__JITTER".to_owned(), "soon".to_owned())];
        let e = Config::from_toml("", "t", bad).unwrap_err().to_string();
        assert!(
            e.starts_with("config: `renew.jitter`: expected a duration"),
            "{e}"
        );
    }
}
