//! Reads for people on PostgreSQL: rows for `status` and `inspect`, counts for metrics, alarms.

use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row as _};

use crate::policy::claims::KeyText;
use crate::storage::rows::{self, SUMMARY_COLUMNS};
use crate::storage::{Alarm, EventRecord, KeyStats, KeySummary, Result};

const FLAGGED_STATES: &str = "('revoked', 'expired', 'invalid', 'misconfigured')";

fn summaries(rows: &[PgRow]) -> Result<Vec<KeySummary>> {
    Ok(rows
        .iter()
        .map(rows::summary)
        .collect::<std::result::Result<_, _>>()?)
}

pub(super) async fn key_row(pool: &PgPool, id: i64) -> Result<Option<(KeySummary, KeyText)>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {SUMMARY_COLUMNS}, convert_to(key, 'UTF8') AS key_bytes FROM store_keys WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let key: Vec<u8> = row.try_get("key_bytes")?;
    Ok(Some((rows::summary(&row)?, KeyText::from_bytes(key))))
}

pub(super) async fn flagged(pool: &PgPool, limit: u32) -> Result<(Vec<KeySummary>, i64)> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {SUMMARY_COLUMNS} FROM store_keys WHERE state IN {FLAGGED_STATES}
         ORDER BY updated_at DESC, id DESC LIMIT $1"
    )))
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    let (total,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM store_keys WHERE state IN {FLAGGED_STATES}"
    )))
    .fetch_one(pool)
    .await?;
    Ok((summaries(&rows)?, total))
}

pub(super) async fn expiring(pool: &PgPool, before: i64, limit: u32) -> Result<Vec<KeySummary>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {SUMMARY_COLUMNS} FROM store_keys
         WHERE state = 'active' AND expires_at < $1
         ORDER BY expires_at LIMIT $2"
    )))
    .bind(before)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    summaries(&rows)
}

/// The counts read the index of inactive rows and, for the active ones, the two due indexes
/// (proven and new) of each kind; the rest are index lookups.
pub(super) async fn key_stats(pool: &PgPool, now: i64, next_due: Option<i64>) -> Result<KeyStats> {
    let counts: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT state, kind, COUNT(*) FROM store_keys WHERE state <> 'active'
             GROUP BY state, kind
             UNION ALL
             SELECT 'active', kind, COUNT(*) FROM (
                 SELECT kind FROM store_keys WHERE state = 'active' AND last_renewed_at IS NOT NULL
                 UNION ALL
                 SELECT kind FROM store_keys WHERE state = 'active' AND last_renewed_at IS NULL
             ) AS active GROUP BY kind",
    )
    .fetch_all(pool)
    .await?;
    let by_state_kind = rows::by_state_kind(&counts);
    let (earliest_expiry,): (Option<i64>,) =
        sqlx::query_as("SELECT MIN(expires_at) FROM store_keys WHERE state = 'active'")
            .fetch_one(pool)
            .await?;
    let (due,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM store_keys WHERE state = 'active' AND next_attempt_at <= $1",
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

pub(super) async fn alarms(pool: &PgPool) -> Result<Vec<Alarm>> {
    let rows: Vec<(String, String, i64, Option<String>)> = sqlx::query_as(
        "SELECT name, detail, since, owner FROM storekeyd_alarms ORDER BY since, name",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows::alarms(rows))
}

pub(super) async fn keys(pool: &PgPool, after_id: i64, limit: u32) -> Result<Vec<KeySummary>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {SUMMARY_COLUMNS} FROM store_keys WHERE id > $1 ORDER BY id LIMIT $2"
    )))
    .bind(after_id)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    summaries(&rows)
}

pub(super) async fn events(pool: &PgPool, after_id: i64, limit: u32) -> Result<Vec<EventRecord>> {
    let raw: Vec<rows::RawEvent> = sqlx::query_as(
        "SELECT e.id, e.key_id, k.user_ref, k.kind, e.outcome, e.http_status, e.detail
         FROM store_key_events e LEFT JOIN store_keys k ON k.id = e.key_id
         WHERE e.id > $1 ORDER BY e.id LIMIT $2",
    )
    .bind(after_id)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    Ok(raw
        .into_iter()
        .map(rows::event)
        .collect::<std::result::Result<_, _>>()?)
}
