//! Writes: a batch of compare-and-swap row changes with their event rows in one transaction, the
//! contract's upsert for the CLI, and alarms.

use sqlx::{Sqlite, SqlitePool, Transaction};

use crate::policy::claims::KeyText;
use crate::storage::contract::UPSERT_KEY;
use crate::storage::{Change, Event, EventKind, NewKey, Result, Write};

/// One transaction for the whole batch: one fsync, however many rows.
pub(super) async fn apply(pool: &SqlitePool, writes: &[Write]) -> Result<Vec<bool>> {
    // IMMEDIATE takes the write lock up front, so a busy database fails (or waits) here rather
    // than halfway through the batch.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut applied = Vec::with_capacity(writes.len());
    for write in writes {
        match write {
            Write::Event(event) => {
                insert_event(&mut tx, event, event.kind).await?;
                applied.push(true);
            }
            Write::Row {
                id,
                expected,
                at,
                change,
                event,
            } => {
                let done = change_row(&mut tx, *id, expected, *at, change).await?;
                if let Some(event) = event {
                    // The backend replaced the key meanwhile: keep its write, note that ours
                    // was dropped.
                    let kind = if done {
                        event.kind
                    } else {
                        EventKind::Superseded
                    };
                    insert_event(&mut tx, event, kind).await?;
                }
                applied.push(done);
            }
        }
    }
    tx.commit().await?;
    Ok(applied)
}

async fn change_row(
    tx: &mut Transaction<'static, Sqlite>,
    id: i64,
    expected: &KeyText,
    at: i64,
    change: &Change,
) -> Result<bool> {
    let query = match change {
        Change::Activate { facts, next_at } => sqlx::query(
            "UPDATE store_keys SET state = 'active', reason = NULL, key_fp = ?, client_id = ?,
                 user_id = ?, issued_at = ?, expires_at = ?, next_attempt_at = ?,
                 lease_until = NULL, attempts = 0, refusals = 0, updated_at = ?
             WHERE id = ? AND CAST(key AS BLOB) = ? AND state = 'pending'",
        )
        .bind(expected.fingerprint().to_string())
        .bind(&facts.client_id)
        .bind(&facts.user_id)
        .bind(facts.issued_at)
        .bind(facts.expires_at)
        .bind(next_at)
        .bind(at),
        Change::Renew {
            key,
            facts,
            next_at,
        } => sqlx::query(
            "UPDATE store_keys SET key = ?, state = 'active', reason = NULL, key_fp = ?,
                 client_id = ?, user_id = ?, issued_at = ?, expires_at = ?, next_attempt_at = ?,
                 lease_until = NULL, attempts = 0, refusals = 0, renewals = renewals + 1,
                 last_renewed_at = ?, updated_at = ?
             WHERE id = ? AND CAST(key AS BLOB) = ?",
        )
        .bind(key.expose())
        .bind(key.fingerprint().to_string())
        .bind(&facts.client_id)
        .bind(&facts.user_id)
        .bind(facts.issued_at)
        .bind(facts.expires_at)
        .bind(next_at)
        .bind(at)
        .bind(at),
        Change::Retry {
            at: retry_at,
            reason,
            refused,
        } => sqlx::query(
            "UPDATE store_keys SET next_attempt_at = ?, lease_until = NULL,
                 attempts = attempts + 1, refusals = refusals + ?, reason = ?, updated_at = ?
             WHERE id = ? AND CAST(key AS BLOB) = ? AND state = 'active'",
        )
        .bind(retry_at)
        .bind(i64::from(*refused))
        .bind(reason)
        .bind(at),
        Change::Flag { state, reason } => sqlx::query(
            "UPDATE store_keys SET state = ?, reason = ?, key_fp = ?, next_attempt_at = NULL,
                 lease_until = NULL, updated_at = ?
             WHERE id = ? AND CAST(key AS BLOB) = ?",
        )
        .bind(state.as_str())
        .bind(reason)
        .bind(expected.fingerprint().to_string())
        .bind(at),
        Change::Defer { at: defer_at } => sqlx::query(
            "UPDATE store_keys SET next_attempt_at = ?, lease_until = NULL
             WHERE id = ? AND CAST(key AS BLOB) = ? AND state = 'active'",
        )
        .bind(defer_at),
    };
    let done = query
        .bind(id)
        .bind(expected.cas_bytes())
        .execute(&mut **tx)
        .await?
        .rows_affected()
        == 1;
    Ok(done)
}

async fn insert_event(
    tx: &mut Transaction<'static, Sqlite>,
    e: &Event,
    kind: EventKind,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO store_key_events (key_id, at, outcome, key_fp, http_status, error_code,
             detail, correlation_id, request_id, cv, duration_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(e.key_id)
    .bind(e.at)
    .bind(kind.as_str())
    .bind(&e.key_fp)
    .bind(e.http_status.map(i64::from))
    .bind(&e.error_code)
    .bind(&e.detail)
    .bind(&e.correlation_id)
    .bind(&e.request_id)
    .bind(&e.cv)
    .bind(e.duration_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
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
) -> Result<()> {
    sqlx::query(
        "INSERT INTO storekeyd_alarms (name, detail, since) VALUES (?, ?, ?)
         ON CONFLICT (name) DO UPDATE SET detail = excluded.detail",
    )
    .bind(name)
    .bind(detail)
    .bind(since)
    .execute(pool)
    .await?;
    Ok(())
}
