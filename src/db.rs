//! The keys table and the events table on SQLite. Every write that storekeyd makes to a key is a
//! compare-and-swap on the key text it read, in one transaction with its event row.

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{SqlSafeStr as _, SqlitePool, Transaction};

use crate::claims::{Claims, KeyText};
use crate::fingerprint::Fingerprint;

/// A backend's long transaction holds the write lock; wait this long before calling it a failure.
const BUSY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: cannot open `{url}`: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("database: cannot create `{path}` with mode 0600: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("database: migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: {0}")]
    Query(#[from] sqlx::Error),
}

/// The states a key row can be in; the strings are the backend contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Pending,
    Active,
    Revoked,
    Expired,
    Invalid,
    Misconfigured,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Pending,
        State::Active,
        State::Revoked,
        State::Expired,
        State::Invalid,
        State::Misconfigured,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Active => "active",
            State::Revoked => "revoked",
            State::Expired => "expired",
            State::Invalid => "invalid",
            State::Misconfigured => "misconfigured",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// One row of attempt history.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub key_id: i64,
    pub at: i64,
    pub outcome: &'static str,
    pub key_fp: Option<String>,
    pub http_status: Option<u16>,
    pub error_code: Option<String>,
    pub detail: Option<String>,
    pub correlation_id: Option<String>,
    pub request_id: Option<String>,
    pub cv: Option<String>,
    pub duration_ms: Option<i64>,
}

/// A row written by a backend and not yet checked.
#[derive(Debug, Clone)]
pub struct PendingRow {
    pub id: i64,
    pub kind: String,
    pub key: KeyText,
}

/// A due row reserved for one attempt.
#[derive(Debug, Clone)]
pub struct ClaimedRow {
    pub id: i64,
    pub key: KeyText,
    pub attempts: u32,
}

/// How a checked or renewed key is written back.
#[derive(Debug, Clone)]
pub struct Activation<'a> {
    pub claims: &'a Claims,
    pub key_fp: Fingerprint,
    pub next_attempt_at: i64,
}

#[derive(Debug, Clone)]
pub struct Db {
    pool: SqlitePool,
}

impl Db {
    /// Opens (creating if needed, mode 0600) and migrates the database.
    pub async fn open(url: &str) -> Result<Db, DbError> {
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
            .busy_timeout(BUSY_TIMEOUT);
        create_private(options.get_filename())?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(open_err)?;
        let db = Db { pool };
        db.migrate().await?;
        Ok(db)
    }

    pub async fn migrate(&self) -> Result<(), DbError> {
        migrator().run(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Keys written by a backend since the last look, oldest first.
    pub async fn pending(&self, limit: u32) -> Result<Vec<PendingRow>, DbError> {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT id, kind, key FROM store_keys WHERE state = 'pending' ORDER BY id LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, kind, key)| PendingRow {
                id,
                kind,
                key: KeyText::new(key),
            })
            .collect())
    }

    /// Marks a checked key active and schedules it, if the row still holds that key.
    pub async fn activate(
        &self,
        id: i64,
        key: &KeyText,
        a: &Activation<'_>,
        event: &Event,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE store_keys SET state = 'active', reason = NULL, key_fp = ?, client_id = ?,
                 issued_at = ?, expires_at = ?, next_attempt_at = ?, lease_until = NULL,
                 attempts = 0, updated_at = ?
             WHERE id = ? AND key = ?",
        )
        .bind(a.key_fp.to_string())
        .bind(&a.claims.client_id)
        .bind(a.claims.issued_at)
        .bind(a.claims.expires_at)
        .bind(a.next_attempt_at)
        .bind(event.at)
        .bind(id)
        .bind(key.expose())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        finish(tx, done, event).await
    }

    /// Puts a key in a non-active state with a reason, if the row still holds that key.
    pub async fn flag(
        &self,
        id: i64,
        key: &KeyText,
        state: State,
        reason: &str,
        event: &Event,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE store_keys SET state = ?, reason = ?, key_fp = ?, next_attempt_at = NULL,
                 lease_until = NULL, updated_at = ?
             WHERE id = ? AND key = ?",
        )
        .bind(state.as_str())
        .bind(reason)
        .bind(key.fingerprint().to_string())
        .bind(event.at)
        .bind(id)
        .bind(key.expose())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        finish(tx, done, event).await
    }

    /// Replaces a renewed key with its successor, if the row still holds the old key.
    pub async fn write_renewed(
        &self,
        id: i64,
        old: &KeyText,
        new: &KeyText,
        a: &Activation<'_>,
        event: &Event,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE store_keys SET key = ?, state = 'active', reason = NULL, key_fp = ?,
                 client_id = ?, issued_at = ?, expires_at = ?, next_attempt_at = ?,
                 lease_until = NULL, attempts = 0, renewals = renewals + 1,
                 last_renewed_at = ?, updated_at = ?
             WHERE id = ? AND key = ?",
        )
        .bind(new.expose())
        .bind(a.key_fp.to_string())
        .bind(&a.claims.client_id)
        .bind(a.claims.issued_at)
        .bind(a.claims.expires_at)
        .bind(a.next_attempt_at)
        .bind(event.at)
        .bind(event.at)
        .bind(id)
        .bind(old.expose())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        finish(tx, done, event).await
    }

    /// Schedules another attempt after a failure that may pass, if the row still holds the key.
    pub async fn write_retry(
        &self,
        id: i64,
        key: &KeyText,
        next_attempt_at: i64,
        reason: &str,
        event: &Event,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE store_keys SET next_attempt_at = ?, lease_until = NULL,
                 attempts = attempts + 1, reason = ?, updated_at = ?
             WHERE id = ? AND key = ? AND state = 'active'",
        )
        .bind(next_attempt_at)
        .bind(reason)
        .bind(event.at)
        .bind(id)
        .bind(key.expose())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        finish(tx, done, event).await
    }

    /// Reserves up to `limit` due keys, most overdue first, until `lease_until`. One statement, so
    /// two claimers never get the same row.
    pub async fn claim_due(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> Result<Vec<ClaimedRow>, DbError> {
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(
            "UPDATE store_keys SET next_attempt_at = ?1, lease_until = ?1
             WHERE id IN (SELECT id FROM store_keys
                          WHERE state = 'active' AND next_attempt_at <= ?2
                          ORDER BY next_attempt_at LIMIT ?3)
             RETURNING id, key, attempts",
        )
        .bind(lease_until)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut claimed: Vec<ClaimedRow> = rows
            .into_iter()
            .map(|(id, key, attempts)| ClaimedRow {
                id,
                key: KeyText::new(key),
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            })
            .collect();
        claimed.sort_by_key(|r| r.id);
        Ok(claimed)
    }

    /// Hands back keys whose attempt did not run (shutdown), so they are due again at `now`.
    pub async fn release(&self, ids: &[i64], now: i64) -> Result<(), DbError> {
        for id in ids {
            sqlx::query(
                "UPDATE store_keys SET next_attempt_at = ?, lease_until = NULL
                 WHERE id = ? AND state = 'active' AND lease_until IS NOT NULL",
            )
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// When the earliest active key is next due (an index lookup, not a scan).
    pub async fn next_due(&self) -> Result<Option<i64>, DbError> {
        let (next,): (Option<i64>,) =
            sqlx::query_as("SELECT MIN(next_attempt_at) FROM store_keys WHERE state = 'active'")
                .fetch_one(&self.pool)
                .await?;
        Ok(next)
    }

    /// Gives keys flagged for configuration reasons another check, e.g. after a config change.
    pub async fn recheck_misconfigured(&self, now: i64) -> Result<u64, DbError> {
        Ok(sqlx::query(
            "UPDATE store_keys SET state = 'pending', updated_at = ? WHERE state = 'misconfigured'",
        )
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    pub async fn record_event(&self, event: &Event) -> Result<(), DbError> {
        insert_event(&self.pool, event).await?;
        Ok(())
    }

    /// Deletes events older than `before`, a bounded batch at a time so the write lock is short.
    pub async fn prune_events(&self, before: i64) -> Result<u64, DbError> {
        let mut total = 0;
        loop {
            let n = sqlx::query(
                "DELETE FROM store_key_events WHERE id IN
                   (SELECT id FROM store_key_events WHERE at < ? ORDER BY at LIMIT 1000)",
            )
            .bind(before)
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += n;
            if n < 1000 {
                return Ok(total);
            }
        }
    }
}

async fn finish(
    mut tx: Transaction<'static, sqlx::Sqlite>,
    applied: bool,
    event: &Event,
) -> Result<bool, DbError> {
    if applied {
        insert_event(&mut *tx, event).await?;
    } else {
        // The backend replaced the key meanwhile: keep its write, note that ours was dropped.
        let dropped = Event {
            outcome: "superseded",
            ..event.clone()
        };
        insert_event(&mut *tx, &dropped).await?;
    }
    tx.commit().await?;
    Ok(applied)
}

async fn insert_event<'e, E>(executor: E, e: &Event) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    sqlx::query(
        "INSERT INTO store_key_events (key_id, at, outcome, key_fp, http_status, error_code,
             detail, correlation_id, request_id, cv, duration_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(e.key_id)
    .bind(e.at)
    .bind(e.outcome)
    .bind(&e.key_fp)
    .bind(e.http_status.map(i64::from))
    .bind(&e.error_code)
    .bind(&e.detail)
    .bind(&e.correlation_id)
    .bind(&e.request_id)
    .bind(&e.cv)
    .bind(e.duration_ms)
    .execute(executor)
    .await?;
    Ok(())
}

/// The schema, embedded in the binary from `migrations/sqlite`.
pub fn migrator() -> Migrator {
    let migrations: [(i64, &'static str, &'static str); 1] = [(
        1,
        "init",
        include_str!("../migrations/sqlite/0001_init.sql"),
    )];
    Migrator::with_migrations(
        migrations
            .into_iter()
            .map(|(version, name, sql)| {
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

/// SQLite creates the database with the umask's mode; a file of bearer credentials must be
/// private, and SQLite gives the -wal and -shm files the main file's mode.
fn create_private(path: &Path) -> Result<(), DbError> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.as_os_str().is_empty() || path.to_str() == Some(":memory:") || path.exists() {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|source| DbError::Create {
            path: path.display().to_string(),
            source,
        })
}
