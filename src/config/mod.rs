//! Configuration: one TOML file, overridable by `STOREKEYD_*` environment variables.
//!
//! Every field has a default but the applications; every invalid field is reported by its dotted
//! name with what was expected. Secrets are never in the file: only where to read them.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::claims::Kind;

mod application;
mod derived;
mod env;
mod human;
mod load;
mod validate;

use env::apply_env;
pub use validate::is_loopback;

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

#[cfg(test)]
mod tests;
