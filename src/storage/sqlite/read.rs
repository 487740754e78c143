//! Reads for people: rows for `status` and `inspect`, counts for metrics, alarms.

use sqlx::sqlite::SqliteRow;
use sqlx::{Row as _, SqlitePool};

use crate::policy::claims::KeyText;
use crate::storage::rows::{self, SUMMARY_COLUMNS};
use crate::storage::{Alarm, EventRecord, KeyStats, KeySummary, Result};

const FLAGGED_STATES: &str = "('revoked', 'expired', 'invalid', 'misconfigured')";

fn summaries(rows: &[SqliteRow]) -> Result<Vec<KeySummary>> {
    Ok(rows
        .iter()
        .map(rows::summary)
        .collect::<std::result::Result<_, _>>()?)
}

pub(super) async fn key_row(pool: &SqlitePool, id: i64) -> Result<Option<(KeySummary, KeyText)>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {SUMMARY_COLUMNS}, CAST(key AS BLOB) AS key_bytes FROM store_keys WHERE id = ?"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let key: Vec<u8> = row.try_get("key_bytes")?;
    Ok(Some((rows::summary(&row)?, KeyText::from_bytes(key))))
}

pub(super) async fn flagged(pool: &SqlitePool, limit: u32) -> Result<(Vec<KeySummary>, i64)> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {SUMMARY_COLUMNS} FROM store_keys WHERE state IN {FLAGGED_STATES}
         ORDER BY updated_at DESC, id DESC LIMIT ?"
    )))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let (total,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM store_keys WHERE state IN {FLAGGED_STATES}"
    )))
    .fetch_one(pool)
    .await?;
    Ok((summaries(&rows)?, total))
}

pub(super) async fn expiring(
    pool: &SqlitePool,
    before: i64,
    limit: u32,
) -> Result<Vec<KeySummary>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {SUMMARY_COLUMNS} FROM store_keys INDEXED BY store_keys_active_exp
         WHERE state = 'active' AND expires_at < ?
         ORDER BY expires_at LIMIT ?"
    )))
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    summaries(&rows)
}

/// The counts read the (state, kind) index; the rest are index lookups.
pub(super) async fn key_stats(
    pool: &SqlitePool,
    now: i64,
    next_due: Option<i64>,
) -> Result<KeyStats> {
    let counts: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT state, kind, COUNT(*) FROM store_keys GROUP BY state, kind")
            .fetch_all(pool)
            .await?;
    let by_state_kind = rows::by_state_kind(&counts);
    let (earliest_expiry,): (Option<i64>,) = sqlx::query_as(
        "SELECT MIN(expires_at) FROM store_keys INDEXED BY store_keys_active_exp WHERE state = 'active'",
    )
    .fetch_one(pool)
    .await?;
    let (due,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM store_keys INDEXED BY store_keys_due WHERE state = 'active' AND next_attempt_at <= ?",
    )
    .bind(now)
    .fetch_one(pool)
    .await?;
    Ok(KeyStats {
        by_state_kind,
        earliest_expiry,
        due,
        next_due,
    })
}

pub(super) async fn alarms(pool: &SqlitePool) -> Result<Vec<Alarm>> {
    let rows: Vec<(String, String, i64, Option<String>)> = sqlx::query_as(
        "SELECT name, detail, since, owner FROM storekeyd_alarms ORDER BY since, name",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows::alarms(rows))
}

pub(super) async fn keys(pool: &SqlitePool, after_id: i64, limit: u32) -> Result<Vec<KeySummary>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {SUMMARY_COLUMNS} FROM store_keys WHERE id > ? ORDER BY id LIMIT ?"
    )))
    .bind(after_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    summaries(&rows)
}

pub(super) async fn events(
    pool: &SqlitePool,
    after_id: i64,
    limit: u32,
) -> Result<Vec<EventRecord>> {
    let raw: Vec<rows::RawEvent> = sqlx::query_as(
        "SELECT e.id, e.key_id, k.user_ref, k.kind, e.outcome, e.http_status, e.detail
         FROM store_key_events e LEFT JOIN store_keys k ON k.id = e.key_id
         WHERE e.id > ? ORDER BY e.id LIMIT ?",
    )
    .bind(after_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(raw
        .into_iter()
        .map(rows::event)
        .collect::<std::result::Result<_, _>>()?)
}

/// Whether a healthy key of the application exists at all, held or not (see
/// `Storage::claim_canary`).
pub(super) async fn healthy_key_exists(
    pool: &SqlitePool,
    client_id: &str,
    valid_past: i64,
) -> Result<bool> {
    let (exists,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM store_keys INDEXED BY store_keys_due_client
                        WHERE state = 'active' AND client_id = ? AND refusals = 0
                          AND attempts = 0 AND expires_at > ?
                          AND unanswered_at IS NULL)",
    )
    .bind(client_id)
    .bind(valid_past)
    .fetch_one(pool)
    .await?;
    Ok(exists)
}
