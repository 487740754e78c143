//! Writes on PostgreSQL. A batch of compare-and-swap row changes and their events is one
//! transaction of a few statements whatever its size: each kind of change is one
//! `UPDATE … FROM jsonb_to_recordset($1)` that returns the rows it applied, the events one
//! `INSERT … SELECT` (see [`crate::storage::batch`]).

use std::collections::HashSet;

use sqlx::{PgPool, Postgres, Transaction};

use crate::policy::alarm::CREDENTIAL_PREFIX as CREDENTIAL_ALARM_PREFIX;
use crate::storage::batch::{self, Applied, ChangeKind};
use crate::storage::contract::PG_UPSERT_KEY;
use crate::storage::{MAX_KEY_BYTES, NewKey, Oversized, Result, Write, oversized_reason};

use super::DB_NOW;

/// Every field a row change may carry; the ones a change leaves out are NULL.
macro_rules! changes {
    () => {
        " FROM jsonb_to_recordset($1::jsonb) AS v(id bigint, expected text, at bigint,
               new_key text, key_fp text, client_id text, user_id text, issued_at bigint,
               expires_at bigint, next_at bigint, refused_ms bigint, unanswered_at bigint,
               reason text, state text)
          WHERE k.id = v.id AND k.key = v.expected "
    };
}

/// The columns an accepted or renewed key sets.
macro_rules! scheduled {
    () => {
        "state = 'active', reason = NULL, key_fp = v.key_fp, client_id = v.client_id,
         user_id = v.user_id, issued_at = v.issued_at, expires_at = v.expires_at,
         next_attempt_at = v.next_at, lease_until = NULL, attempts = 0, refusals = 0,
         refused_first_ms = NULL, refused_last_ms = NULL, unanswered_at = NULL,
         updated_at = v.at"
    };
}

/// Each statement compares every row on the key that was read (`expected`) and returns the ids
/// it changed. Keys on PostgreSQL are text: a key that is not UTF-8 cannot be stored there.
pub(super) fn statement(kind: ChangeKind) -> &'static str {
    match kind {
        // A key the backend wrote has not been renewed, whatever the row's did before it.
        ChangeKind::Activate => concat!(
            "UPDATE store_keys AS k SET last_renewed_at = NULL, ",
            scheduled!(),
            changes!(),
            "AND k.state = 'pending' RETURNING k.id"
        ),
        // Only padded keys touch `key`: an update of it runs the lineage trigger.
        ChangeKind::ActivateTrimmed => concat!(
            "UPDATE store_keys AS k SET key = v.new_key, last_renewed_at = NULL, ",
            scheduled!(),
            changes!(),
            "AND k.state = 'pending' RETURNING k.id"
        ),
        ChangeKind::Renew => concat!(
            "UPDATE store_keys AS k SET key = v.new_key, renewals = k.renewals + 1,
                 last_renewed_at = v.at, ",
            scheduled!(),
            changes!(),
            "RETURNING k.id"
        ),
        ChangeKind::Retry => concat!(
            "UPDATE store_keys AS k SET next_attempt_at = v.next_at, lease_until = NULL,
                 attempts = k.attempts + 1,
                 refusals = k.refusals + (v.refused_ms IS NOT NULL)::int,
                 refused_first_ms = COALESCE(k.refused_first_ms, v.refused_ms),
                 refused_last_ms = COALESCE(v.refused_ms, k.refused_last_ms),
                 unanswered_at = COALESCE(v.unanswered_at, k.unanswered_at),
                 reason = v.reason, updated_at = v.at",
            changes!(),
            "AND k.state = 'active' RETURNING k.id"
        ),
        ChangeKind::Flag => concat!(
            "UPDATE store_keys AS k SET state = v.state, reason = v.reason, key_fp = v.key_fp,
                 next_attempt_at = NULL, lease_until = NULL, updated_at = v.at",
            changes!(),
            "RETURNING k.id"
        ),
        ChangeKind::Defer => concat!(
            "UPDATE store_keys AS k SET next_attempt_at = v.next_at, lease_until = NULL",
            changes!(),
            "AND k.state = 'active' RETURNING k.id"
        ),
    }
}

const INSERT_EVENTS: &str = "INSERT INTO store_key_events (key_id, at, outcome, key_fp,
         http_status, error_code, detail, correlation_id, request_id, cv, duration_ms)
     SELECT e.key_id, e.at, e.kind, e.key_fp, e.http_status, e.error_code, e.detail,
            e.correlation_id, e.request_id, e.cv, e.duration_ms
     FROM ROWS FROM (jsonb_to_recordset($1::jsonb) AS (key_id bigint, at bigint, kind text,
            key_fp text, http_status bigint, error_code text, detail text,
            correlation_id text, request_id text, cv text, duration_ms bigint))
          WITH ORDINALITY AS e
     ORDER BY e.ordinality";

const INSERT_LINEAGE: &str = "INSERT INTO store_key_lineage (key_id, tail, retired_at)
     SELECT (r ->> 0)::bigint, right(r ->> 1, 22), (r ->> 2)::bigint
     FROM jsonb_array_elements($1::jsonb) AS r
     ON CONFLICT DO NOTHING";

/// One transaction for the whole batch: one commit, however many rows.
pub(super) async fn apply(pool: &PgPool, writes: &[Write]) -> Result<Vec<bool>> {
    let mut tx = pool.begin().await?;
    let applied = apply_in(&mut tx, writes).await?;
    tx.commit().await?;
    Ok(applied)
}

async fn apply_in(tx: &mut Transaction<'_, Postgres>, writes: &[Write]) -> Result<Vec<bool>> {
    let mut applied = Applied::new(writes);
    for group in batch::groups(writes) {
        let done: Vec<(i64,)> = sqlx::query_as(statement(group.kind))
            .bind(without_nul(group.json()))
            .fetch_all(&mut **tx)
            .await?;
        let done: HashSet<i64> = done.into_iter().map(|(id,)| id).collect();
        applied.record(writes, &group, &done);
    }
    if let Some(json) = applied.events_json(writes) {
        sqlx::query(INSERT_EVENTS)
            .bind(without_nul(&json))
            .execute(&mut **tx)
            .await?;
    }
    if let Some(json) = applied.lineage_json(writes) {
        sqlx::query(INSERT_LINEAGE)
            .bind(json)
            .execute(&mut **tx)
            .await?;
    }
    Ok(applied.into_vec())
}

/// PostgreSQL's text (and so jsonb) cannot hold U+0000: one in a claim or a Store's error
/// message would fail the whole batch, every time. It becomes U+FFFD. (Keys themselves cannot
/// hold one: the backend stored them as text.)
fn without_nul(json: &str) -> std::borrow::Cow<'_, str> {
    if !json.contains("\\u0000") {
        return std::borrow::Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len());
    let mut rest = json;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let escape = &rest[i..];
        if let Some(after) = escape.strip_prefix("\\u0000") {
            out.push_str("\\ufffd");
            rest = after;
        } else {
            // Any other escape, `\\\\` included, is copied whole.
            let len = escape[1..].chars().next().map_or(1, |c| 1 + c.len_utf8());
            out.push_str(&escape[..len]);
            rest = &escape[len..];
        }
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

pub(super) async fn store_keys(pool: &PgPool, keys: &[NewKey]) -> Result<()> {
    let mut tx = pool.begin().await?;
    for k in keys {
        sqlx::query(PG_UPSERT_KEY)
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
    pool: &PgPool,
    name: &str,
    detail: &str,
    since: i64,
    owner: &str,
) -> Result<()> {
    // `since` keeps the latest raise: a clear on evidence older than that must not delete it.
    sqlx::query(
        "INSERT INTO storekeyd_alarms (name, detail, since, owner) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE SET detail = excluded.detail, owner = excluded.owner,
             since = GREATEST(storekeyd_alarms.since, excluded.since)",
    )
    .bind(name)
    .bind(detail)
    .bind(since)
    .bind(owner)
    .execute(pool)
    .await?;
    Ok(())
}

/// One statement: the row refreshed, the lapsed ones and their alarms gone, the live counted.
/// Every replica beats; the lapsed rows and orphaned alarms each go to whichever takes their
/// lock first (`SKIP LOCKED`), so two replicas deleting the same rows never wait on or deadlock
/// with each other.
pub(super) async fn heartbeat(pool: &PgPool, replica: &str, ttl: i64) -> Result<u32> {
    let sql = format!(
        "WITH beat AS (
             INSERT INTO storekeyd_replicas (id, seen_at) VALUES ($1, {DB_NOW})
             ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at RETURNING id),
         lapsed AS (
             DELETE FROM storekeyd_replicas WHERE id IN (
                 SELECT id FROM storekeyd_replicas WHERE seen_at < {DB_NOW} - $2 AND id <> $1
                 FOR UPDATE SKIP LOCKED)
             RETURNING id),
         orphaned AS (
             DELETE FROM storekeyd_alarms WHERE name IN (
                 SELECT a.name FROM storekeyd_alarms AS a WHERE NOT starts_with(a.name, $3)
                   AND (a.owner IS NULL OR a.owner IN (SELECT id FROM lapsed)
                        OR (a.owner <> $1 AND NOT EXISTS (SELECT 1 FROM storekeyd_replicas AS r
                                                          WHERE r.id = a.owner)))
                 FOR UPDATE SKIP LOCKED)
             RETURNING 1)
         SELECT (SELECT COUNT(*) FROM storekeyd_replicas
                 WHERE seen_at >= {DB_NOW} - $2 AND id <> $1) + 1"
    );
    let (live,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(replica)
        .bind(ttl)
        .bind(CREDENTIAL_ALARM_PREFIX)
        .fetch_one(pool)
        .await?;
    Ok(u32::try_from(live).unwrap_or(u32::MAX))
}

pub(super) async fn leave(pool: &PgPool, replica: &str) -> Result<()> {
    sqlx::query(
        "WITH gone AS (DELETE FROM storekeyd_replicas WHERE id = $1 RETURNING id)
         DELETE FROM storekeyd_alarms WHERE owner = $1 AND NOT starts_with(name, $2)",
    )
    .bind(replica)
    .bind(CREDENTIAL_ALARM_PREFIX)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes in batches of a thousand, so no statement holds many row locks for long.
pub(super) async fn prune_events(
    pool: &PgPool,
    before: i64,
    max_batches: u32,
) -> Result<(u64, bool)> {
    crate::storage::in_batches(max_batches, || async {
        Ok(sqlx::query(
            "DELETE FROM store_key_events WHERE id IN
               (SELECT id FROM store_key_events WHERE at < $1 ORDER BY at LIMIT 1000)",
        )
        .bind(before)
        .execute(pool)
        .await?
        .rows_affected())
    })
    .await
}

/// Flags `invalid` those of `ids` still pending with a key over the limit, each with its event,
/// in one statement, judging the key by its length alone (never read or detoasted). The
/// condition is the compare-and-swap: whatever the row holds by now, if it is that long it is
/// no Store key. The value is not kept, as on SQLite.
pub(super) async fn flag_oversized(pool: &PgPool, ids: &[i64], now: i64) -> Result<Vec<Oversized>> {
    let (before, after) = oversized_reason();
    let flagged: Vec<(i64, i64)> = sqlx::query_as(
        "WITH old AS (
             SELECT id, octet_length(key)::bigint AS bytes FROM store_keys
             WHERE id = ANY($1) AND state = 'pending' AND octet_length(key) > $5
             FOR UPDATE),
         flagged AS (
             UPDATE store_keys AS k SET key = '', state = 'invalid',
                 reason = $2 || old.bytes || $3, key_fp = NULL,
                 next_attempt_at = NULL, lease_until = NULL, updated_at = $4
             FROM old WHERE k.id = old.id
             RETURNING k.id, old.bytes, k.reason),
         events AS (
             INSERT INTO store_key_events (key_id, at, outcome, detail)
             SELECT id, $4, 'invalid', reason FROM flagged)
         SELECT id, bytes FROM flagged ORDER BY id",
    )
    .bind(ids)
    .bind(before)
    .bind(after)
    .bind(now)
    .bind(MAX_KEY_BYTES)
    .fetch_all(pool)
    .await?;
    Ok(flagged
        .into_iter()
        .map(|(id, bytes)| Oversized { id, bytes })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::without_nul;

    #[test]
    fn nul_escapes_become_replacement_characters_and_nothing_else_changes() {
        let json = serde_json::to_string(&["a\0b", "\\u0000", "\\\0"]).unwrap_or_default();
        let cleaned: Vec<String> = serde_json::from_str(&without_nul(&json)).unwrap_or_default();
        assert_eq!(cleaned, ["a\u{fffd}b", "\\u0000", "\\\u{fffd}"]);
        assert!(matches!(without_nul("[1]"), std::borrow::Cow::Borrowed(_)));
    }
}
