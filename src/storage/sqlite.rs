//! The keys table and the events table on SQLite. Every write that storekeyd makes to a key is a
//! compare-and-swap on the key text it read, in one transaction with its event row.

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{SqlSafeStr as _, SqlitePool, Transaction};

use crate::ops::metrics::KeyStats;
use crate::policy::claims::{Claims, KeyText, Kind};
use crate::policy::fingerprint::Fingerprint;

/// A backend's long transaction holds the write lock; wait this long before calling it a failure.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: cannot open `{url}`: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error(
        "database: `{path}` is not writable ({cause}); storekeyd writes the file and creates `-wal` and `-shm` files beside it"
    )]
    NotWritable { path: String, cause: std::io::Error },
    #[error("database: cannot create `{path}` with mode 0600: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("database: migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: {0}")]
    Query(#[from] sqlx::Error),
    #[error("database: schema version is {}, this storekeyd expects {}; run `storekeyd migrate`", version(*.found), version(*.expected))]
    Schema {
        found: Option<i64>,
        expected: Option<i64>,
    },
}

impl DbError {
    /// Another connection holds the lock (a backend's long transaction): worth waiting for.
    pub fn is_busy(&self) -> bool {
        match self {
            DbError::Query(sqlx::Error::Database(e)) => e
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .is_some_and(|c| matches!(c & 0xff, 5 | 6)),
            DbError::Query(sqlx::Error::PoolTimedOut) => true,
            _ => false,
        }
    }
}

fn version(v: Option<i64>) -> String {
    v.map_or_else(|| "none (empty database)".to_owned(), |v| v.to_string())
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

const FLAGGED_STATES: &str = "('revoked', 'expired', 'invalid', 'misconfigured')";
const SUMMARY_COLUMNS: &str =
    "id, user_ref, kind, state, reason, key_fp, client_id, expires_at, next_attempt_at, updated_at";

/// A key row without its key: what `status` and `inspect` show.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeySummary {
    pub id: i64,
    pub user_ref: String,
    pub kind: String,
    pub state: String,
    pub reason: Option<String>,
    pub key_fp: Option<String>,
    pub client_id: Option<String>,
    pub expires_at: Option<i64>,
    pub next_attempt_at: Option<i64>,
    pub updated_at: i64,
}

impl KeySummary {
    /// From a row selected with [`SUMMARY_COLUMNS`].
    fn from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row as _;
        Ok(KeySummary {
            id: row.try_get("id")?,
            user_ref: row.try_get("user_ref")?,
            kind: row.try_get("kind")?,
            state: row.try_get("state")?,
            reason: row.try_get("reason")?,
            key_fp: row.try_get("key_fp")?,
            client_id: row.try_get("client_id")?,
            expires_at: row.try_get("expires_at")?,
            next_attempt_at: row.try_get("next_attempt_at")?,
            updated_at: row.try_get("updated_at")?,
        })
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
    /// Consecutive failed attempts before this one.
    pub attempts: u32,
    /// Consecutive refusals (AuthenticationTokenInvalid) the guard deferred before this one.
    pub refusals: u32,
    /// When this process claimed it: the lease runs from here.
    pub claimed: std::time::Instant,
}

type RawClaim = (i64, Vec<u8>, i64, i64);

impl From<RawClaim> for ClaimedRow {
    fn from((id, key, attempts, refusals): RawClaim) -> Self {
        ClaimedRow {
            id,
            key: KeyText::from_bytes(key),
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            refusals: u32::try_from(refusals).unwrap_or(u32::MAX),
            claimed: std::time::Instant::now(),
        }
    }
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
    /// Opens (creating if needed, mode 0600) and migrates the database: what the daemon does.
    pub async fn open(url: &str) -> Result<Db, DbError> {
        Db::open_with(url, BUSY_TIMEOUT).await
    }

    /// [`Db::open`] with another busy timeout (`database_busy_timeout`).
    pub async fn open_with(url: &str, busy_timeout: Duration) -> Result<Db, DbError> {
        let db = Db::connect_with(url, busy_timeout).await?;
        db.migrate().await?;
        Ok(db)
    }

    /// Opens (creating if needed, mode 0600) without touching the schema: what the CLI does, so
    /// an upgrade only migrates when asked to.
    pub async fn connect(url: &str) -> Result<Db, DbError> {
        Db::connect_with(url, BUSY_TIMEOUT).await
    }

    async fn connect_with(url: &str, busy_timeout: Duration) -> Result<Db, DbError> {
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
            .busy_timeout(busy_timeout);
        let path = options.get_filename().to_owned();
        create_private(&path)?;
        let pool = match SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
        {
            Ok(pool) => pool,
            // SQLite only says "unable to open database file"; say why when we can tell.
            Err(e) => return Err(not_writable(&path).unwrap_or_else(|| open_err(e))),
        };
        Ok(Db { pool })
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
        let rows: Vec<(i64, String, Vec<u8>)> = sqlx::query_as(
            "SELECT id, kind, CAST(key AS BLOB) FROM store_keys WHERE state = 'pending' ORDER BY id LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, kind, key)| PendingRow {
                id,
                kind,
                key: KeyText::from_bytes(key),
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
                 attempts = 0, refusals = 0, updated_at = ?
             WHERE id = ? AND CAST(key AS BLOB) = ? AND state = 'pending'",
        )
        .bind(a.key_fp.to_string())
        .bind(&a.claims.client_id)
        .bind(a.claims.issued_at)
        .bind(a.claims.expires_at)
        .bind(a.next_attempt_at)
        .bind(event.at)
        .bind(id)
        .bind(key.cas_bytes())
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
             WHERE id = ? AND CAST(key AS BLOB) = ?",
        )
        .bind(state.as_str())
        .bind(reason)
        .bind(key.fingerprint().to_string())
        .bind(event.at)
        .bind(id)
        .bind(key.cas_bytes())
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
                 lease_until = NULL, attempts = 0, refusals = 0, renewals = renewals + 1,
                 last_renewed_at = ?, updated_at = ?
             WHERE id = ? AND CAST(key AS BLOB) = ?",
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
        .bind(old.cas_bytes())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        finish(tx, done, event).await
    }

    /// Schedules another attempt after a failure that may pass, if the row still holds the key.
    /// `refused`: the Store refused the key and the guard could not yet believe it.
    #[allow(clippy::too_many_arguments)]
    pub async fn write_retry(
        &self,
        id: i64,
        key: &KeyText,
        next_attempt_at: i64,
        reason: &str,
        refused: bool,
        event: &Event,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE store_keys SET next_attempt_at = ?, lease_until = NULL,
                 attempts = attempts + 1, refusals = refusals + ?, reason = ?, updated_at = ?
             WHERE id = ? AND CAST(key AS BLOB) = ? AND state = 'active'",
        )
        .bind(next_attempt_at)
        .bind(i64::from(refused))
        .bind(reason)
        .bind(event.at)
        .bind(id)
        .bind(key.cas_bytes())
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
        kinds: &[Kind],
    ) -> Result<Vec<ClaimedRow>, DbError> {
        // Each kind's due keys come off its own index; the most overdue of both are taken, so a
        // backlog of one kind never starves the other. (One kind given: both halves name it.)
        let (Some(first), Some(second)) = (kinds.first(), kinds.last()) else {
            return Ok(Vec::new());
        };
        let rows: Vec<RawClaim> = sqlx::query_as(
            "UPDATE store_keys SET next_attempt_at = ?1, lease_until = ?1
             WHERE id IN (
                 SELECT id FROM (
                     SELECT * FROM (SELECT id, next_attempt_at FROM store_keys INDEXED BY store_keys_due_kind
                                    WHERE state = 'active' AND kind = ?2 AND next_attempt_at <= ?4
                                    ORDER BY next_attempt_at LIMIT ?5)
                     UNION ALL
                     SELECT * FROM (SELECT id, next_attempt_at FROM store_keys INDEXED BY store_keys_due_kind
                                    WHERE state = 'active' AND kind = ?3 AND next_attempt_at <= ?4
                                    ORDER BY next_attempt_at LIMIT ?5))
                 ORDER BY next_attempt_at LIMIT ?5)
             RETURNING id, CAST(key AS BLOB), attempts, refusals",
        )
        .bind(lease_until)
        .bind(first.as_str())
        .bind(second.as_str())
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut claimed: Vec<ClaimedRow> = rows.into_iter().map(ClaimedRow::from).collect();
        claimed.sort_by_key(|r| r.id);
        Ok(claimed)
    }

    /// Reserves one active key whatever its due time (`storekeyd renew --row`), unless another
    /// attempt holds it.
    pub async fn claim_row(
        &self,
        id: i64,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<ClaimedRow>, DbError> {
        let row: Option<RawClaim> = sqlx::query_as(
            "UPDATE store_keys SET next_attempt_at = ?1, lease_until = ?1
             WHERE id = ?2 AND state = 'active' AND (lease_until IS NULL OR lease_until <= ?3)
             RETURNING id, CAST(key AS BLOB), attempts, refusals",
        )
        .bind(lease_until)
        .bind(id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(ClaimedRow::from))
    }

    /// Active keys due now, without reserving them (`renew --due --dry-run`).
    pub async fn due_rows(&self, now: i64, limit: u32) -> Result<Vec<ClaimedRow>, DbError> {
        let rows: Vec<RawClaim> = sqlx::query_as(
            "SELECT id, CAST(key AS BLOB), attempts, refusals FROM store_keys INDEXED BY store_keys_due
             WHERE state = 'active' AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(ClaimedRow::from).collect())
    }

    /// One row's summary and its key (`inspect --row`, `renew --row`).
    pub async fn key_row(&self, id: i64) -> Result<Option<(KeySummary, KeyText)>, DbError> {
        use sqlx::Row as _;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SUMMARY_COLUMNS}, CAST(key AS BLOB) AS key_bytes FROM store_keys WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let key: Vec<u8> = row.try_get("key_bytes")?;
        Ok(Some((
            KeySummary::from_row(&row)?,
            KeyText::from_bytes(key),
        )))
    }

    /// Flagged keys, most recently flagged first, and how many there are in all.
    pub async fn flagged(&self, limit: u32) -> Result<(Vec<KeySummary>, i64), DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SUMMARY_COLUMNS} FROM store_keys WHERE state IN {FLAGGED_STATES}
             ORDER BY updated_at DESC, id DESC LIMIT ?"
        )))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let (total,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM store_keys WHERE state IN {FLAGGED_STATES}"
        )))
        .fetch_one(&self.pool)
        .await?;
        let summaries = rows
            .iter()
            .map(KeySummary::from_row)
            .collect::<Result<_, _>>()?;
        Ok((summaries, total))
    }

    /// Active keys expiring before `before`, soonest first.
    pub async fn expiring(&self, before: i64, limit: u32) -> Result<Vec<KeySummary>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SUMMARY_COLUMNS} FROM store_keys INDEXED BY store_keys_active_exp
             WHERE state = 'active' AND expires_at < ?
             ORDER BY expires_at LIMIT ?"
        )))
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(KeySummary::from_row)
            .collect::<Result<_, _>>()?)
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
    pub async fn next_due(&self, kinds: &[Kind]) -> Result<Option<i64>, DbError> {
        let mut next: Option<i64> = None;
        for kind in kinds {
            let (due,): (Option<i64>,) = sqlx::query_as(
                "SELECT MIN(next_attempt_at) FROM store_keys INDEXED BY store_keys_due_kind
                 WHERE state = 'active' AND kind = ?",
            )
            .bind(kind.as_str())
            .fetch_one(&self.pool)
            .await?;
            next = match (next, due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(next)
    }

    /// Counts by state and kind, the earliest expiry and the backlog, for metrics and `status`.
    /// The counts read the (state, kind) index; the rest are index lookups.
    pub async fn key_stats(&self, now: i64) -> Result<KeyStats, DbError> {
        let counts: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT state, kind, COUNT(*) FROM store_keys GROUP BY state, kind")
                .fetch_all(&self.pool)
                .await?;
        let mut by_state_kind = Vec::new();
        for state in State::ALL {
            for kind in Kind::ALL {
                let n = counts
                    .iter()
                    .find(|(s, k, _)| s == state.as_str() && k == kind.as_str())
                    .map_or(0, |(_, _, n)| *n);
                by_state_kind.push((state.as_str().to_owned(), kind.as_str().to_owned(), n));
            }
        }
        let (earliest_expiry,): (Option<i64>,) =
            sqlx::query_as("SELECT MIN(expires_at) FROM store_keys INDEXED BY store_keys_active_exp WHERE state = 'active'")
                .fetch_one(&self.pool)
                .await?;
        let (due,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM store_keys INDEXED BY store_keys_due WHERE state = 'active' AND next_attempt_at <= ?",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(KeyStats {
            by_state_kind,
            earliest_expiry,
            due,
            next_due: self.next_due(&Kind::ALL).await?,
        })
    }

    /// The database answers and its schema is the one this binary expects.
    pub async fn check_schema(&self) -> Result<(), DbError> {
        let (tables,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_one(&self.pool)
        .await?;
        let version = if tables == 0 {
            None
        } else {
            let (v,): (Option<i64>,) =
                sqlx::query_as("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(&self.pool)
                    .await?;
            v
        };
        let expected = migrator().iter().map(|m| m.version).max();
        if version != expected {
            return Err(DbError::Schema {
                found: version,
                expected,
            });
        }
        Ok(())
    }

    /// Raises (or updates) a named alarm for `status`.
    pub async fn set_alarm(&self, name: &str, detail: &str, since: i64) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO storekeyd_alarms (name, detail, since) VALUES (?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET detail = excluded.detail",
        )
        .bind(name)
        .bind(detail)
        .bind(since)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn clear_alarm(&self, name: &str) -> Result<(), DbError> {
        sqlx::query("DELETE FROM storekeyd_alarms WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// At start: the conditions behind alarms live in the daemon's memory, which is new.
    pub async fn clear_alarms(&self) -> Result<(), DbError> {
        sqlx::query("DELETE FROM storekeyd_alarms")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// (name, detail, since), oldest first.
    pub async fn alarms(&self) -> Result<Vec<(String, String, i64)>, DbError> {
        Ok(
            sqlx::query_as("SELECT name, detail, since FROM storekeyd_alarms ORDER BY since, name")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Reschedules a claimed key without an attempt (its endpoint's breaker is open).
    pub async fn defer(
        &self,
        id: i64,
        key: &KeyText,
        next_attempt_at: i64,
    ) -> Result<bool, DbError> {
        Ok(sqlx::query(
            "UPDATE store_keys SET next_attempt_at = ?, lease_until = NULL
             WHERE id = ? AND CAST(key AS BLOB) = ? AND state = 'active'",
        )
        .bind(next_attempt_at)
        .bind(id)
        .bind(key.cas_bytes())
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
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

    /// Deletes events older than `before`, at most `max_batches` bounded batches (so the write
    /// lock is short and one pass of the loop stays short); returns how many it deleted and
    /// whether there are more.
    pub async fn prune_events(
        &self,
        before: i64,
        max_batches: u32,
    ) -> Result<(u64, bool), DbError> {
        let mut total = 0;
        for _ in 0..max_batches {
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
                return Ok((total, false));
            }
        }
        Ok((total, true))
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
    let migrations: [(i64, &'static str, &'static str); 3] = [
        (
            1,
            "init",
            include_str!("../../migrations/sqlite/0001_init.sql"),
        ),
        (
            2,
            "alarms",
            include_str!("../../migrations/sqlite/0002_alarms.sql"),
        ),
        (
            3,
            "per kind claims",
            include_str!("../../migrations/sqlite/0003_per_kind_claims.sql"),
        ),
    ];
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
