//! Writes on SQLite. A batch of compare-and-swap row changes and their event rows is one
//! transaction of a few statements, whatever its size: each kind of change is one
//! `UPDATE … FROM json_each(?)` that returns the rows it applied, and the events are one
//! `INSERT … SELECT FROM json_each(?)` (see [`crate::storage::batch`]).

use std::collections::HashSet;

use sqlx::{SqliteConnection, SqlitePool};

use crate::policy::alarm::CREDENTIAL_PREFIX as CREDENTIAL_ALARM_PREFIX;
use crate::storage::batch::{self, Applied, ChangeKind};
use crate::storage::contract::UPSERT_KEY;
use crate::storage::{MAX_KEY_BYTES, NewKey, Oversized, Result, Write, oversized_reason};

/// One transaction for the whole batch: one fsync, however many rows.
pub(super) async fn apply(pool: &SqlitePool, writes: &[Write]) -> Result<Vec<bool>> {
    let mut conn = pool.acquire().await?;
    // IMMEDIATE takes the write lock up front, so a busy database fails (or waits) here rather
    // than halfway through the batch.
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    match apply_in(&mut conn, writes).await {
        Ok(applied) => Ok(applied),
        Err(e) => {
            // A failed COMMIT (a full disk) leaves the transaction open on this connection: end
            // it, or give up the connection so the next batch starts clean.
            if sqlx::query("ROLLBACK").execute(&mut *conn).await.is_err() {
                drop(conn.detach());
            }
            Err(e)
        }
    }
}

async fn apply_in(conn: &mut SqliteConnection, writes: &[Write]) -> Result<Vec<bool>> {
    let mut applied = Applied::new(writes);
    for group in batch::groups(writes) {
        let done: Vec<(i64,)> = sqlx::query_as(statement(group.kind))
            .bind(group.json())
            .fetch_all(&mut *conn)
            .await?;
        let done: HashSet<i64> = done.into_iter().map(|(id,)| id).collect();
        applied.record(writes, &group, &done);
    }
    if let Some(json) = applied.events_json(writes) {
        sqlx::query(
            "INSERT INTO store_key_events (key_id, at, outcome, key_fp, http_status, error_code,
                 detail, correlation_id, request_id, cv, duration_ms)
             SELECT value ->> 'key_id', value ->> 'at', value ->> 'kind', value ->> 'key_fp',
                    value ->> 'http_status', value ->> 'error_code', value ->> 'detail',
                    value ->> 'correlation_id', value ->> 'request_id', value ->> 'cv',
                    value ->> 'duration_ms'
             FROM json_each(?) ORDER BY key",
        )
        .bind(json)
        .execute(&mut *conn)
        .await?;
    }
    if let Some(json) = applied.lineage_json(writes) {
        sqlx::query(
            "INSERT OR IGNORE INTO store_key_lineage (key_id, tail, retired_at)
             SELECT value ->> 0, substr(value ->> 1, -22), value ->> 2 FROM json_each(?)",
        )
        .bind(json)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query("COMMIT").execute(&mut *conn).await?;
    Ok(applied.into_vec())
}

/// The activation statement; `$set` and `$column` add the trimmed key for padded ones.
macro_rules! activate {
    ($set:literal, $column:literal) => {
        concat!(
            "UPDATE store_keys SET ",
            $set,
            "state = 'active', reason = NULL, key_fp = v.key_fp, last_renewed_at = NULL,
                 client_id = v.client_id, user_id = v.user_id, issued_at = v.issued_at,
                 expires_at = v.expires_at, next_attempt_at = v.next_at, lease_until = NULL,
                 attempts = 0, refusals = 0, refused_first_ms = NULL, refused_last_ms = NULL,
                 unanswered_at = NULL, updated_at = v.at
             FROM (SELECT value ->> 'id' AS id, COALESCE(unhex(value ->> 'expected_hex'), CAST(value ->> 'expected' AS BLOB)) AS expected, ",
            $column,
            "value ->> 'key_fp' AS key_fp, value ->> 'client_id' AS client_id,
                          value ->> 'user_id' AS user_id, value ->> 'issued_at' AS issued_at,
                          value ->> 'expires_at' AS expires_at, value ->> 'next_at' AS next_at,
                          value ->> 'at' AS at
                   FROM json_each(?1)) AS v
             WHERE store_keys.id = v.id AND CAST(store_keys.key AS BLOB) = v.expected
               AND +store_keys.state = 'pending'
             RETURNING store_keys.id"
        )
    };
}

/// Each statement compares every row on the bytes of the key that was read (`expected`,
/// hex), and returns the ids it changed. The unary `+` keeps the planner off the state
/// indexes: walking every pending row for each row of the batch took 35 s for 1,024 rows.
pub(super) fn statement(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Activate => activate!("", ""),
        // Only padded keys touch `key`: an update of it runs the lineage triggers, which
        // made ingest a third slower when every activation set it.
        ChangeKind::ActivateTrimmed => activate!(
            "key = v.new_key, ",
            "value ->> 'new_key' AS new_key, "
        ),
        ChangeKind::Renew => {
            "UPDATE store_keys SET key = v.new_key, state = 'active', reason = NULL,
                 key_fp = v.key_fp, client_id = v.client_id, user_id = v.user_id,
                 issued_at = v.issued_at, expires_at = v.expires_at,
                 next_attempt_at = v.next_at, lease_until = NULL, attempts = 0, refusals = 0,
                 refused_first_ms = NULL, refused_last_ms = NULL, unanswered_at = NULL,
                 renewals = renewals + 1, last_renewed_at = v.at, updated_at = v.at
             FROM (SELECT value ->> 'id' AS id, COALESCE(unhex(value ->> 'expected_hex'), CAST(value ->> 'expected' AS BLOB)) AS expected,
                          value ->> 'new_key' AS new_key, value ->> 'key_fp' AS key_fp,
                          value ->> 'client_id' AS client_id, value ->> 'user_id' AS user_id,
                          value ->> 'issued_at' AS issued_at,
                          value ->> 'expires_at' AS expires_at, value ->> 'next_at' AS next_at,
                          value ->> 'at' AS at
                   FROM json_each(?1)) AS v
             WHERE store_keys.id = v.id AND CAST(store_keys.key AS BLOB) = v.expected
             RETURNING store_keys.id"
        }
        ChangeKind::Retry => {
            "UPDATE store_keys SET next_attempt_at = v.next_at, lease_until = NULL,
                 attempts = attempts + 1, refusals = refusals + (v.refused_ms IS NOT NULL),
                 refused_first_ms = COALESCE(refused_first_ms, v.refused_ms),
                 refused_last_ms = COALESCE(v.refused_ms, refused_last_ms),
                 unanswered_at = COALESCE(v.unanswered_at, store_keys.unanswered_at),
                 reason = v.reason, updated_at = v.at
             FROM (SELECT value ->> 'id' AS id, COALESCE(unhex(value ->> 'expected_hex'), CAST(value ->> 'expected' AS BLOB)) AS expected,
                          value ->> 'next_at' AS next_at, value ->> 'refused_ms' AS refused_ms,
                          value ->> 'unanswered_at' AS unanswered_at,
                          value ->> 'reason' AS reason, value ->> 'at' AS at
                   FROM json_each(?1)) AS v
             WHERE store_keys.id = v.id AND CAST(store_keys.key AS BLOB) = v.expected
               AND +store_keys.state = 'active'
             RETURNING store_keys.id"
        }
        ChangeKind::Flag => {
            "UPDATE store_keys SET state = v.state, reason = v.reason, key_fp = v.key_fp,
                 next_attempt_at = NULL, lease_until = NULL, updated_at = v.at
             FROM (SELECT value ->> 'id' AS id, COALESCE(unhex(value ->> 'expected_hex'), CAST(value ->> 'expected' AS BLOB)) AS expected,
                          value ->> 'state' AS state, value ->> 'reason' AS reason,
                          value ->> 'key_fp' AS key_fp, value ->> 'at' AS at
                   FROM json_each(?1)) AS v
             WHERE store_keys.id = v.id AND CAST(store_keys.key AS BLOB) = v.expected
             RETURNING store_keys.id"
        }
        ChangeKind::Defer => {
            "UPDATE store_keys SET next_attempt_at = v.next_at, lease_until = NULL
             FROM (SELECT value ->> 'id' AS id, COALESCE(unhex(value ->> 'expected_hex'), CAST(value ->> 'expected' AS BLOB)) AS expected,
                          value ->> 'next_at' AS next_at
                   FROM json_each(?1)) AS v
             WHERE store_keys.id = v.id AND CAST(store_keys.key AS BLOB) = v.expected
               AND +store_keys.state = 'active'
             RETURNING store_keys.id"
        }
    }
}

pub(super) async fn store_keys(pool: &SqlitePool, keys: &[NewKey]) -> Result<()> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    for k in keys {
        sqlx::query(UPSERT_KEY)
            .bind(&k.user_ref)
            .bind(k.kind.as_str())
            .bind(k.key.expose())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn set_alarm(
    pool: &SqlitePool,
    name: &str,
    detail: &str,
    since: i64,
    owner: &str,
) -> Result<()> {
    // `since` keeps the latest raise: a clear on evidence older than that must not delete it.
    sqlx::query(
        "INSERT INTO storekeyd_alarms (name, detail, since, owner) VALUES (?, ?, ?, ?)
         ON CONFLICT (name) DO UPDATE SET detail = excluded.detail, owner = excluded.owner,
             since = max(storekeyd_alarms.since, excluded.since)",
    )
    .bind(name)
    .bind(detail)
    .bind(since)
    .bind(owner)
    .execute(pool)
    .await?;
    Ok(())
}

const SQLITE_NOW: &str = "CAST(strftime('%s', 'now') AS INTEGER)";

/// One transaction: the row refreshed, the lapsed ones and their alarms gone, the live counted.
pub(super) async fn heartbeat(pool: &SqlitePool, replica: &str, ttl: i64) -> Result<u32> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO storekeyd_replicas (id, seen_at) VALUES (?1, {SQLITE_NOW})
         ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at"
    )))
    .bind(replica)
    .execute(&mut *tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM storekeyd_replicas WHERE seen_at < {SQLITE_NOW} - ?1"
    )))
    .bind(ttl)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "DELETE FROM storekeyd_alarms WHERE substr(name, 1, length(?1)) <> ?1
           AND (owner IS NULL OR owner NOT IN (SELECT id FROM storekeyd_replicas))",
    )
    .bind(CREDENTIAL_ALARM_PREFIX)
    .execute(&mut *tx)
    .await?;
    let (live,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM storekeyd_replicas")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(u32::try_from(live).unwrap_or(u32::MAX))
}

pub(super) async fn leave(pool: &SqlitePool, replica: &str) -> Result<()> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query("DELETE FROM storekeyd_replicas WHERE id = ?1")
        .bind(replica)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "DELETE FROM storekeyd_alarms WHERE owner = ?1 AND substr(name, 1, length(?2)) <> ?2",
    )
    .bind(replica)
    .bind(CREDENTIAL_ALARM_PREFIX)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Flags `invalid` those of `ids` still pending with a key over the limit, each with its event,
/// judging the key by its length alone. The condition is the compare-and-swap: whatever the row
/// holds by now, if it is that long it is no Store key. The value is not kept: SQLite rewrites
/// a whole row on any update (and the key triggers read the old key), so the row is deleted and
/// written again without it, which only walks the value's pages.
pub(super) async fn flag_oversized(
    pool: &SqlitePool,
    ids: &[i64],
    now: i64,
) -> Result<Vec<Oversized>> {
    let (before, after) = oversized_reason();
    let ids = serde_json::to_string(ids).unwrap_or_else(|_| "[]".to_owned());
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let rows: Vec<(i64, String, String, i64, i64)> = sqlx::query_as(
        "SELECT id, user_ref, kind, octet_length(key), created_at FROM store_keys
         WHERE id IN (SELECT value FROM json_each(?1)) AND state = 'pending'
           AND octet_length(key) > ?2",
    )
    .bind(ids)
    .bind(MAX_KEY_BYTES)
    .fetch_all(&mut *tx)
    .await?;
    let mut flagged = Vec::with_capacity(rows.len());
    for (id, user_ref, kind, bytes, created_at) in rows {
        let reason = format!("{before}{bytes}{after}");
        sqlx::query("DELETE FROM store_keys WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO store_keys (id, user_ref, kind, key, state, reason, created_at, updated_at)
             VALUES (?1, ?2, ?3, '', 'invalid', ?4, ?5, ?6)",
        )
        .bind(id)
        .bind(user_ref)
        .bind(kind)
        .bind(&reason)
        .bind(created_at)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO store_key_events (key_id, at, outcome, detail) VALUES (?, ?, 'invalid', ?)",
        )
        .bind(id)
        .bind(now)
        .bind(&reason)
        .execute(&mut *tx)
        .await?;
        flagged.push(Oversized { id, bytes });
    }
    tx.commit().await?;
    Ok(flagged)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every batched write walks the batch and finds each row by its id, never the other way.
    #[tokio::test]
    async fn batched_writes_look_rows_up_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("plan.db").display());
        let store =
            crate::storage::sqlite::SqliteStore::open(&url, std::time::Duration::from_secs(1))
                .await
                .unwrap();
        for kind in ChangeKind::ALL {
            let plan = store.explain(statement(kind)).await;
            assert!(
                plan.contains("SEARCH store_keys USING INTEGER PRIMARY KEY")
                    && !plan.contains("SCAN store_keys")
                    && !plan.contains("store_keys_state"),
                "{kind:?}: {plan}"
            );
        }
    }
}
