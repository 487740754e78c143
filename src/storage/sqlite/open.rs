//! Opening a SQLite database: a private file, WAL, `synchronous=FULL`, the busy timeout, and the
//! schema embedded from `migrations/sqlite`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::storage::{DbError, Result};

/// The writer's page cache (negative: KiB): the hot pages of a drain; it fills only as pages are
/// used. The other connections keep SQLite's default (2 MiB).
const WRITER_CACHE: &str = "-8192";
const WRITER_BUSY: Duration = Duration::from_secs(2);

/// Two pools on one file: the writer's own connection, and three for claims, the loop's reads
/// and reports. The writer keeps one connection (and so one warm page cache) instead of taking
/// whichever is free; in WAL mode readers never wait for it.
pub(super) async fn pools(url: &str, busy_timeout: Duration) -> Result<(SqlitePool, SqlitePool)> {
    // The writer retries a refused batch itself (and spools past a bound), so it waits for the
    // lock in short steps: a stop never waits out a long busy timeout.
    let writer = pool(url, busy_timeout.min(WRITER_BUSY), 1, WRITER_CACHE).await?;
    let others = pool(url, busy_timeout, 3, "-2000").await?;
    Ok((writer, others))
}

async fn pool(
    url: &str,
    busy_timeout: Duration,
    connections: u32,
    cache_size: &'static str,
) -> Result<SqlitePool> {
    let open_err = |source| DbError::Open {
        url: url.to_owned(),
        source,
    };
    let options = SqliteConnectOptions::from_str(url)
        .map_err(open_err)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: a renewed key that was acknowledged is on disk, even across a power cut.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(busy_timeout)
        // A multi-row UPDATE keeps its statement journal in memory instead of a temp file
        // created and unlinked for every batch.
        .pragma("temp_store", "memory")
        .pragma("cache_size", cache_size);
    let path = options.get_filename().to_owned();
    create_shared_with_group(&path)?;
    match SqlitePoolOptions::new()
        .max_connections(connections)
        .min_connections(0)
        // Idle connections go, and their page caches with them.
        .idle_timeout(Duration::from_secs(120))
        .connect_with(options)
        .await
    {
        Ok(pool) => Ok(pool),
        // SQLite only says "unable to open database file"; say why when we can tell.
        Err(e) => Err(not_writable(&path).unwrap_or_else(|| open_err(e))),
    }
}

pub(super) async fn check_schema(pool: &SqlitePool) -> Result<()> {
    let (tables,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
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

/// The schema, embedded in the binary from `migrations/sqlite`.
pub fn migrator() -> Migrator {
    let migrations: [(i64, &'static str, &'static str); 10] = [
        (
            1,
            "init",
            include_str!("../../../migrations/sqlite/0001_init.sql"),
        ),
        (
            2,
            "alarms",
            include_str!("../../../migrations/sqlite/0002_alarms.sql"),
        ),
        (
            3,
            "per kind claims",
            include_str!("../../../migrations/sqlite/0003_per_kind_claims.sql"),
        ),
        (
            4,
            "user id",
            include_str!("../../../migrations/sqlite/0004_user_id.sql"),
        ),
        (
            5,
            "refusal times",
            include_str!("../../../migrations/sqlite/0005_refusal_times.sql"),
        ),
        (
            6,
            "lineage",
            include_str!("../../../migrations/sqlite/0006_lineage.sql"),
        ),
        (
            7,
            "guard repairs",
            include_str!("../../../migrations/sqlite/0007_guard_repairs.sql"),
        ),
        (
            8,
            "fleet",
            include_str!("../../../migrations/sqlite/0008_fleet.sql"),
        ),
        (
            9,
            "proven first",
            include_str!("../../../migrations/sqlite/0009_proven_first.sql"),
        ),
        (
            10,
            "unanswered",
            include_str!("../../../migrations/sqlite/0010_unanswered.sql"),
        ),
    ];
    crate::storage::embedded(&migrations)
}

/// Whether the database file cannot be opened for writing (a read-only file system, say).
fn not_writable(path: &Path) -> Option<DbError> {
    if path.as_os_str().is_empty() || path.to_str() == Some(":memory:") {
        return None;
    }
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .err()
        .map(|cause| DbError::NotWritable {
            path: path.display().to_string(),
            cause,
        })
}

/// SQLite would create the database with 0644 less the umask; a file of bearer credentials is
/// never for others, but the backend's user shares it through the group (the unit's umask 0007
/// leaves it 0660). SQLite gives the -wal and -shm files the main file's mode.
fn create_shared_with_group(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.as_os_str().is_empty() || path.to_str() == Some(":memory:") || path.exists() {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o660)
        .open(path)
        .map(drop)
        .map_err(|source| DbError::Create {
            path: path.display().to_string(),
            source,
        })
}
