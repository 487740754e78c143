//! Reads for people: rows for `status` and `inspect`, counts for metrics, alarms.

use sqlx::sqlite::SqliteRow;
use sqlx::{Row as _, SqlitePool};

use super::decode_error;
use crate::policy::claims::{KeyText, Kind};
use crate::storage::{Alarm, EventKind, EventRecord, KeyStats, KeySummary, Result, State};

const FLAGGED_STATES: &str = "('revoked', 'expired', 'invalid', 'misconfigured')";
const SUMMARY_COLUMNS: &str = "id, user_ref, kind, state, reason, key_fp, client_id, expires_at, next_attempt_at, updated_at, renewals";

fn summary(row: &SqliteRow) -> std::result::Result<KeySummary, sqlx::Error> {
    let kind: String = row.try_get("kind")?;
    let state: String = row.try_get("state")?;
    Ok(KeySummary {
        id: row.try_get("id")?,
        user_ref: row.try_get("user_ref")?,
        kind: Kind::parse(&kind).ok_or_else(|| decode_error("kind", &kind))?,
        state: State::parse(&state).ok_or_else(|| decode_error("state", &state))?,
        reason: row.try_get("reason")?,
        key_fp: row.try_get("key_fp")?,
        client_id: row.try_get("client_id")?,
        expires_at: row.try_get("expires_at")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        updated_at: row.try_get("updated_at")?,
        renewals: row.try_get("renewals")?,
    })
}

fn summaries(rows: &[SqliteRow]) -> Result<Vec<KeySummary>> {
    Ok(rows
        .iter()
        .map(summary)
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
    Ok(Some((summary(&row)?, KeyText::from_bytes(key))))
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
    let mut by_state_kind = Vec::new();
    for state in State::ALL {
        for kind in Kind::ALL {
            let n = counts
                .iter()
                .find(|(s, k, _)| s == state.as_str() && k == kind.as_str())
                .map_or(0, |(_, _, n)| *n);
            by_state_kind.push((state, kind, n));
        }
    }
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
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT name, detail, since FROM storekeyd_alarms ORDER BY since, name")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(name, detail, since)| Alarm {
            name,
            detail,
            since,
        })
        .collect())
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

type RawEvent = (
    i64,
    i64,
    Option<String>,
    Option<String>,
    String,
    Option<i64>,
    Option<String>,
);

pub(super) async fn events(
    pool: &SqlitePool,
    after_id: i64,
    limit: u32,
) -> Result<Vec<EventRecord>> {
    let rows: Vec<RawEvent> = sqlx::query_as(
        "SELECT e.id, e.key_id, k.user_ref, k.kind, e.outcome, e.http_status, e.detail
         FROM store_key_events e LEFT JOIN store_keys k ON k.id = e.key_id
         WHERE e.id > ? ORDER BY e.id LIMIT ?",
    )
    .bind(after_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(
            |(id, key_id, user_ref, kind, outcome, http_status, detail)| {
                Ok(EventRecord {
                    id,
                    key_id,
                    user_ref,
                    kind: kind.as_deref().and_then(Kind::parse),
                    event: EventKind::parse(&outcome)
                        .ok_or_else(|| decode_error("outcome", &outcome))?,
                    http_status: http_status.and_then(|s| u16::try_from(s).ok()),
                    detail,
                })
            },
        )
        .collect()
}
