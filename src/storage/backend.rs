//! Which database a URL names, how to open it, and the migrations embedded in the binary.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use sqlx::SqlSafeStr as _;
use sqlx::migrate::{Migration, MigrationType, Migrator};

use super::{DbError, Result, Storage, postgres, sqlite};

/// A backend's long transaction holds the write lock; wait this long before calling it a failure.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(15);

/// How storekeyd connects: the config's `database_*` settings.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// How long a statement waits for a lock another connection holds.
    pub busy_timeout: Duration,
    /// PostgreSQL: connections per replica (SQLite keeps its own four).
    pub pool_size: u32,
    /// PostgreSQL: how long to wait for a connection, new or from the pool.
    pub connect_timeout: Duration,
    /// PostgreSQL: where the listener for new keys connects, if not where the pool does (a
    /// direct connection past PgBouncer in transaction mode).
    pub listen_url: Option<String>,
    /// PostgreSQL: a file holding the password, read when the pool is made (at start), unless
    /// the URL has a password of its own.
    pub password_file: Option<std::path::PathBuf>,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            busy_timeout: BUSY_TIMEOUT,
            pool_size: 10,
            connect_timeout: Duration::from_secs(5),
            listen_url: None,
            password_file: None,
        }
    }
}

/// The database a URL names, by its scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of(url: &str) -> Option<Backend> {
        let scheme = url.split_once(':')?.0.to_ascii_lowercase();
        match scheme.as_str() {
            "sqlite" => Some(Backend::Sqlite),
            "postgres" | "postgresql" => Some(Backend::Postgres),
            _ => None,
        }
    }
}

/// Opens the database a URL names, creating and migrating it: what the daemon does.
pub async fn open(url: &str, options: &DbOptions) -> Result<Arc<dyn Storage>> {
    let store = connect(url, options).await?;
    store.migrate().await?;
    Ok(store)
}

/// Opens the database a URL names without touching its schema: what the CLI does, so an upgrade
/// migrates only when asked to.
pub async fn connect(url: &str, options: &DbOptions) -> Result<Arc<dyn Storage>> {
    match Backend::of(url) {
        Some(Backend::Sqlite) => Ok(Arc::new(
            sqlite::SqliteStore::connect(url, options.busy_timeout).await?,
        )),
        Some(Backend::Postgres) => Ok(Arc::new(postgres::PgStore::connect(url, options)?)),
        None => Err(DbError::Scheme {
            url: redact_url(url),
        }),
    }
}

/// The URL without its password (`postgres://app:***@db/keys`), for errors and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => format!("{user}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// Runs `batch`, a delete of at most 1,000 rows, until one deletes fewer or `max_batches` ran;
/// returns how many rows went and whether more remain.
pub(super) async fn in_batches<F, Fut>(max_batches: u32, mut batch: F) -> Result<(u64, bool)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64>>,
{
    let mut total = 0;
    for _ in 0..max_batches {
        let n = batch().await?;
        total += n;
        if n < 1000 {
            return Ok((total, false));
        }
    }
    Ok((total, true))
}

/// A schema embedded in the binary: `(version, name, sql)` per migration.
pub(super) fn embedded(migrations: &[(i64, &'static str, &'static str)]) -> Migrator {
    Migrator::with_migrations(
        migrations
            .iter()
            .map(|&(version, name, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(name),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// The schema is at `migrator`'s last version (`found`: the last applied, none on an empty
/// database).
pub(super) fn expect_version(found: Option<i64>, migrator: &Migrator) -> Result<()> {
    let expected = migrator.iter().map(|m| m.version).max();
    if found != expected {
        return Err(DbError::Schema { found, expected });
    }
    Ok(())
}
