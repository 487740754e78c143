//! Connecting to PostgreSQL: one pool sized by the config, the server-side timeouts that keep a
//! stuck statement from holding a connection, TLS as the URL's `sslmode` asks (the system's
//! roots), and the schema embedded from `migrations/postgres`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};

use crate::storage::{DbError, DbOptions, Result};

/// How to reach the server `url` names. A server reached over the network gets TLS with its
/// certificate verified against the system's roots and its name (`verify-full`) unless the URL
/// or `PGSSLMODE` says otherwise: sqlx's own default, `prefer`, takes any certificate or none.
/// Loopback and a Unix socket keep that default.
pub(super) fn connect_options(url: &str) -> Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(url).map_err(|source| DbError::Open {
        url: crate::storage::redact_url(url),
        source,
    })?;
    let explicit = std::env::var_os("PGSSLMODE").is_some() || names_ssl_mode(url);
    Ok(if explicit || is_local(&options) {
        options
    } else {
        options.ssl_mode(PgSslMode::VerifyFull)
    })
}

fn names_ssl_mode(url: &str) -> bool {
    sqlx_core::Url::parse(url).is_ok_and(|u| {
        u.query_pairs()
            .any(|(key, _)| key == "sslmode" || key == "ssl-mode")
    })
}

/// Loopback or a Unix socket: nothing between the two ends to trust.
fn is_local(options: &PgConnectOptions) -> bool {
    let host = options
        .get_host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    options.get_socket().is_some()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The password in `file` (its first line), if the file is private enough for it.
pub(super) fn password(file: &std::path::Path) -> Result<secrecy::SecretString> {
    use std::io::Read as _;
    use std::os::unix::fs::MetadataExt as _;
    let path = crate::secret_file::resolve(file);
    let failed = |why: String| DbError::PasswordFile {
        path: path.clone(),
        why,
    };
    let file = std::fs::File::open(&path).map_err(|e| failed(e.to_string()))?;
    let mode = file.metadata().map_err(|e| failed(e.to_string()))?.mode();
    if !crate::secret_file::private_enough(&path, mode) {
        return Err(failed(format!(
            "readable by group or others (mode {:o}); chmod 600 it",
            mode & 0o777
        )));
    }
    let mut text = zeroize::Zeroizing::new(String::new());
    file.take(4096)
        .read_to_string(&mut text)
        .map_err(|_| failed("not text of at most 4 KiB".to_owned()))?;
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        return Err(failed(
            "empty; put the password on its first line".to_owned(),
        ));
    }
    Ok(secrecy::SecretString::from(line.to_owned()))
}

/// The listener's own URL, with the password file's password unless the URL has one.
pub(super) fn listen_options(url: &str, options: &DbOptions) -> Result<PgConnectOptions> {
    with_password(url, connect_options(url)?, options)
}

/// `connect` with the password file's password, unless `url` has one of its own.
fn with_password(
    url: &str,
    connect: PgConnectOptions,
    options: &DbOptions,
) -> Result<PgConnectOptions> {
    let has_password = sqlx_core::Url::parse(url).is_ok_and(|u| u.password().is_some());
    Ok(match &options.password_file {
        Some(file) if !has_password => {
            connect.password(secrecy::ExposeSecret::expose_secret(&password(file)?))
        }
        _ => connect,
    })
}

/// Connections are opened when needed and checked before use: after a server restart the pool
/// drops the dead ones instead of failing a query on each.
pub(super) fn pool(url: &str, options: &DbOptions) -> Result<PgPool> {
    let connect = with_password(url, connect_options(url)?, options)?
        .application_name("storekeyd")
        .options(server_timeouts(options.busy_timeout));
    Ok(PgPoolOptions::new()
        .max_connections(options.pool_size.max(2))
        .min_connections(0)
        .acquire_timeout(options.connect_timeout)
        .idle_timeout(Duration::from_secs(300))
        .test_before_acquire(true)
        .connect_lazy_with(connect))
}

/// `lock_timeout` is SQLite's busy timeout: how long a statement waits on a row a backend's
/// transaction holds. `statement_timeout` bounds the rest; a transaction left idle (a replica
/// frozen mid-batch) is ended by the server so its row locks go.
fn server_timeouts(busy: Duration) -> [(&'static str, String); 3] {
    let ms = |d: Duration| d.as_millis().max(1).to_string();
    [
        ("lock_timeout", ms(busy)),
        (
            "statement_timeout",
            ms(busy.saturating_mul(2).max(Duration::from_secs(30))),
        ),
        (
            "idle_in_transaction_session_timeout",
            ms(Duration::from_secs(60)),
        ),
    ]
}

pub(super) async fn check_schema(pool: &PgPool) -> Result<()> {
    let (tables,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM information_schema.tables
         WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'",
    )
    .fetch_one(pool)
    .await?;
    let version = if tables == 0 {
        None
    } else {
        let (v,): (Option<i64>,) =
            sqlx::query_as("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(pool)
                .await?;
        v
    };
    crate::storage::expect_version(version, &migrator())
}

/// The schema, embedded in the binary from `migrations/postgres`. sqlx takes an advisory lock
/// while it migrates, so replicas starting together migrate once.
pub fn migrator() -> Migrator {
    let migrations: [(i64, &'static str, &'static str); 5] = [
        (
            1,
            "init",
            include_str!("../../../migrations/postgres/0001_init.sql"),
        ),
        (
            2,
            "lighter renewals",
            include_str!("../../../migrations/postgres/0002_lighter_renewals.sql"),
        ),
        (
            3,
            "pinned search path",
            include_str!("../../../migrations/postgres/0003_pinned_search_path.sql"),
        ),
        (
            4,
            "proven first",
            include_str!("../../../migrations/postgres/0004_proven_first.sql"),
        ),
        (
            5,
            "unanswered",
            include_str!("../../../migrations/postgres/0005_unanswered.sql"),
        ),
    ];
    crate::storage::embedded(&migrations)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> PgSslMode {
        connect_options(url).unwrap().get_ssl_mode()
    }

    #[test]
    fn a_server_over_the_network_is_verified_unless_the_url_says_otherwise() {
        if std::env::var_os("PGSSLMODE").is_some() {
            return;
        }
        for (url, expected) in [
            ("postgres://u@db.internal/keys", PgSslMode::VerifyFull),
            ("postgres://u@10.0.0.5:5432/keys", PgSslMode::VerifyFull),
            (
                "postgres://u@db.internal/keys?hostaddr=127.0.0.1",
                PgSslMode::VerifyFull,
            ),
            (
                "postgres://u@db.internal/keys?sslmode=verify-ca",
                PgSslMode::VerifyCa,
            ),
            (
                "postgres://u@db.internal/keys?sslmode=disable",
                PgSslMode::Disable,
            ),
        ] {
            assert_eq!(format!("{:?}", mode(url)), format!("{expected:?}"), "{url}");
        }
        for local in [
            "postgres://u@localhost/keys",
            "postgres://u@127.0.0.1:5432/keys",
            "postgres://u@[::1]/keys",
            "postgres://u@%2Frun%2Fpostgresql/keys",
            "postgres:///keys?host=/run/postgresql",
        ] {
            assert!(matches!(mode(local), PgSslMode::Prefer), "{local}");
        }
    }
}
