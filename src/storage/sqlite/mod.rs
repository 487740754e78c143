//! The keys table, its events and alarms on SQLite (WAL, `synchronous=FULL`). This module owns
//! every SQL statement storekeyd sends to SQLite: the queue (here), the writes (`write`) and the
//! reports (`read`).

mod due;
mod open;
mod read;
mod write;

use std::time::Duration;

use async_trait::async_trait;
use sqlx::SqlitePool;
use sqlx::sqlite::SqliteRow;

use super::{
    Alarm, AlarmName, Claim, ClaimedRow, ClearScope, EventRecord, KeyStats, KeySummary,
    MAX_KEY_BYTES, NewKey, PendingLook, Result, Storage, Write, rows,
};
use crate::policy::claims::{KeyText, Kind};

pub use open::migrator;

/// A SQLite database. Cloning shares the pools.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The writer's own connection: batches of row changes and their events.
    writer: SqlitePool,
    /// Everything else: claims, the loop's reads, reports.
    pool: SqlitePool,
}

/// Lease updates by id. The unary `+` keeps the planner on the ids: with the state index it
/// walked every active row (8 s at a million keys).
const EXTEND_LEASES: &str = "UPDATE store_keys SET next_attempt_at = ?1, lease_until = ?1
     WHERE id IN (SELECT value FROM json_each(?2)) AND +state = 'active'
       AND lease_until IS NOT NULL";
/// `?2` holds `[id, lease_until]` pairs: a row whose due time is no longer its claim's lease
/// was claimed anew and is not ours to hand back.
const RELEASE: &str = "UPDATE store_keys SET next_attempt_at = ?1, lease_until = NULL
     FROM (SELECT value ->> 0 AS id, value ->> 1 AS lease FROM json_each(?2)) AS c
     WHERE store_keys.id = c.id AND +store_keys.next_attempt_at = c.lease
       AND +state = 'active' AND lease_until IS NOT NULL";

/// The columns a claim returns: the key and the claims ingest stored for it.
const CLAIMED: &str = "id, CAST(key AS BLOB) AS key_bytes, attempts, refusals, refused_first_ms, refused_last_ms, kind, client_id, user_id, issued_at, expires_at, last_renewed_at, unanswered_at";
/// A claim of a row whose lease ran out with no result: the attempt that held it may have
/// renewed the key (its process paused or died with the answer), so the row says since when.
/// The latest mark wins: the wait is for the attempt that may hold the answer now. `?N` is the
/// claimer's now.
macro_rules! mark_unanswered {
    ($now:literal) => {
        concat!(
            "unanswered_at = CASE WHEN lease_until IS NOT NULL THEN ",
            $now,
            " ELSE unanswered_at END"
        )
    };
}
pub(super) use mark_unanswered;

impl SqliteStore {
    /// Opens (creating if needed, mode 0600) and migrates the database.
    pub async fn open(url: &str, busy_timeout: Duration) -> Result<SqliteStore> {
        let store = SqliteStore::connect(url, busy_timeout).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Opens (creating if needed, mode 0600) without touching the schema.
    pub async fn connect(url: &str, busy_timeout: Duration) -> Result<SqliteStore> {
        let (writer, pool) = open::pools(url, busy_timeout).await?;
        Ok(SqliteStore { writer, pool })
    }
}

#[cfg(test)]
impl SqliteStore {
    /// The query plan of a statement, one detail per line.
    pub(super) async fn explain(&self, sql: &'static str) -> String {
        let rows: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                .bind("[]")
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default();
        rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("\n")
    }
}

fn claimed_rows(rows: &[SqliteRow], lease_until: i64) -> Result<Vec<ClaimedRow>> {
    Ok(rows
        .iter()
        .map(|r| rows::claimed(r, lease_until))
        .collect::<std::result::Result<_, _>>()?)
}

/// Runs one of the lease statements (`?1` a time, `?2` a JSON array of what it is about).
async fn update_leases<T: serde::Serialize>(
    pool: &SqlitePool,
    sql: &'static str,
    rows: &[T],
    at: i64,
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_string(rows).unwrap_or_else(|_| "[]".to_owned());
    sqlx::query(sql).bind(at).bind(json).execute(pool).await?;
    Ok(())
}

#[async_trait]
impl Storage for SqliteStore {
    async fn migrate(&self) -> Result<()> {
        migrator().run(&self.pool).await?;
        Ok(())
    }

    async fn check_schema(&self) -> Result<()> {
        open::check_schema(&self.pool).await
    }

    fn schema_version(&self) -> i64 {
        migrator().iter().map(|m| m.version).max().unwrap_or(0)
    }

    async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }

    async fn pending(&self, limit: u32, now: i64) -> Result<PendingLook> {
        // The partial index holds the pending rows in id order: no sort of every pending row.
        // `octet_length` reads a value's size, not the value.
        let rows: Vec<(i64, String, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT id, kind, CASE WHEN octet_length(key) <= ?2 THEN CAST(key AS BLOB) END
             FROM store_keys INDEXED BY store_keys_pending
             WHERE state = 'pending' ORDER BY id LIMIT ?1",
        )
        .bind(limit)
        .bind(MAX_KEY_BYTES)
        .fetch_all(&self.pool)
        .await?;
        let (rows, oversized) = rows::pending(rows);
        let oversized = if oversized.is_empty() {
            Vec::new()
        } else {
            write::flag_oversized(&self.pool, &oversized, now).await?
        };
        Ok(PendingLook { rows, oversized })
    }

    async fn claim_due(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
        kinds: &[Kind],
    ) -> Result<Vec<ClaimedRow>> {
        if kinds.is_empty() {
            return Ok(Vec::new());
        }
        let sql = due::claim_sql(kinds);
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(lease_until)
            .bind(now)
            .bind(limit);
        for kind in kinds {
            query = query.bind(kind.as_str());
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut claimed = claimed_rows(&rows, lease_until)?;
        claimed.sort_by_key(|r| r.id);
        Ok(claimed)
    }

    async fn claim_row(&self, id: i64, now: i64, lease_until: i64) -> Result<Option<ClaimedRow>> {
        let sql = format!(
            "UPDATE store_keys SET next_attempt_at = ?1, lease_until = ?1, {}
             WHERE id = ?2 AND state = 'active' AND (lease_until IS NULL OR lease_until <= ?3)
             RETURNING {CLAIMED}",
            mark_unanswered!("?3")
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(lease_until)
            .bind(id)
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .as_ref()
            .map(|r| rows::claimed(r, lease_until))
            .transpose()?)
    }

    async fn claim_healthy_key(
        &self,
        client_id: &str,
        issued_before: i64,
        proven: bool,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<ClaimedRow>> {
        // Soonest due: renewing it early costs the least. Valid past the claim's lease: never the
        // key that expires meanwhile (an hour of validity would leave short-lived keys, like
        // the demo's, without canaries).
        let sql = format!(
            "UPDATE store_keys SET next_attempt_at = ?1, lease_until = ?1
             WHERE id = (SELECT id FROM store_keys INDEXED BY store_keys_due_client
                         WHERE state = 'active' AND client_id = ?2 AND refusals = 0
                           AND attempts = 0 AND expires_at > ?1
                           AND issued_at <= ?4
                           AND (last_renewed_at IS NOT NULL OR NOT ?5)
                           AND unanswered_at IS NULL AND lease_until IS NULL
                         ORDER BY next_attempt_at LIMIT 1)
             RETURNING {CLAIMED}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(lease_until)
            .bind(client_id)
            .bind(now)
            .bind(issued_before)
            .bind(proven)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .as_ref()
            .map(|r| rows::claimed(r, lease_until))
            .transpose()?)
    }

    async fn healthy_key_exists(&self, client_id: &str, valid_past: i64) -> Result<bool> {
        read::healthy_key_exists(&self.pool, client_id, valid_past).await
    }

    async fn due_rows(&self, now: i64, limit: u32) -> Result<Vec<ClaimedRow>> {
        let sql = format!(
            "SELECT {CLAIMED} FROM store_keys INDEXED BY store_keys_due
             WHERE state = 'active' AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        // Not claimed: a dry run holds no lease.
        claimed_rows(&rows, i64::MAX)
    }

    async fn next_due(&self, kinds: &[Kind]) -> Result<Option<i64>> {
        due::next_due(&self.pool, kinds).await
    }

    async fn apply(&self, writes: &[Write]) -> Result<Vec<bool>> {
        write::apply(&self.writer, writes).await
    }

    async fn extend_leases(&self, ids: &[i64], _now: i64, until: i64) -> Result<()> {
        // On the writer's connection: only the writer extends leases, and its busy timeout is
        // short.
        update_leases(&self.writer, EXTEND_LEASES, ids, until).await
    }

    async fn release(&self, claims: &[Claim], now: i64) -> Result<()> {
        let pairs: Vec<[i64; 2]> = claims.iter().map(|c| [c.id, c.lease_until]).collect();
        update_leases(&self.pool, RELEASE, &pairs, now).await
    }

    async fn recheck_misconfigured(&self, now: i64) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE store_keys SET state = 'pending', updated_at = ? WHERE state = 'misconfigured'",
        )
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn prune_lineage(&self, before: i64) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM store_key_lineage WHERE retired_at < ?")
                .bind(before)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    async fn prune_events(&self, before: i64, max_batches: u32) -> Result<(u64, bool)> {
        super::in_batches(max_batches, || async {
            Ok(sqlx::query(
                "DELETE FROM store_key_events WHERE id IN
                   (SELECT id FROM store_key_events WHERE at < ? ORDER BY at LIMIT 1000)",
            )
            .bind(before)
            .execute(&self.pool)
            .await?
            .rows_affected())
        })
        .await
    }

    async fn store_keys(&self, keys: &[NewKey]) -> Result<()> {
        write::store_keys(&self.pool, keys).await
    }

    async fn key_row(&self, id: i64) -> Result<Option<(KeySummary, KeyText)>> {
        read::key_row(&self.pool, id).await
    }

    async fn flagged(&self, limit: u32) -> Result<(Vec<KeySummary>, i64)> {
        read::flagged(&self.pool, limit).await
    }

    async fn expiring(&self, before: i64, limit: u32) -> Result<Vec<KeySummary>> {
        read::expiring(&self.pool, before, limit).await
    }

    async fn key_stats(&self, now: i64) -> Result<KeyStats> {
        let next_due = due::next_due(&self.pool, &Kind::ALL).await?;
        read::key_stats(&self.pool, now, next_due).await
    }

    async fn keys(&self, after_id: i64, limit: u32) -> Result<Vec<KeySummary>> {
        read::keys(&self.pool, after_id, limit).await
    }

    async fn events(&self, after_id: i64, limit: u32) -> Result<Vec<EventRecord>> {
        read::events(&self.pool, after_id, limit).await
    }

    async fn alarms(&self) -> Result<Vec<Alarm>> {
        read::alarms(&self.pool).await
    }

    async fn set_alarm(
        &self,
        name: &AlarmName,
        detail: &str,
        since: i64,
        owner: &str,
    ) -> Result<()> {
        write::set_alarm(&self.pool, &name.to_string(), detail, since, owner).await
    }

    async fn clear_alarm(&self, name: &AlarmName, scope: ClearScope<'_>) -> Result<()> {
        let (owner, before_ms) = scope.bounds();
        sqlx::query(
            "DELETE FROM storekeyd_alarms WHERE name = ?1 AND (?2 IS NULL OR owner = ?2)
               AND (?3 IS NULL OR (since + 1) * 1000 <= ?3)",
        )
        .bind(name.to_string())
        .bind(owner)
        .bind(before_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn heartbeat(&self, replica: &str, ttl: i64) -> Result<u32> {
        write::heartbeat(&self.pool, replica, ttl).await
    }

    async fn leave(&self, replica: &str) -> Result<()> {
        write::leave(&self.pool, replica).await
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn lease_updates_look_rows_up_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("plan.db").display());
        let store = super::SqliteStore::open(&url, std::time::Duration::from_secs(1))
            .await
            .unwrap();
        for sql in [super::EXTEND_LEASES, super::RELEASE] {
            let plan = store.explain(sql).await;
            assert!(
                plan.contains("USING INTEGER PRIMARY KEY") && !plan.contains("store_keys_state"),
                "{plan}"
            );
        }
    }
}
