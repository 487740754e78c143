//! Writes. A batch of compare-and-swap row changes and their event rows is one transaction of a
//! few statements, whatever its size: each kind of change is one `UPDATE … FROM json_each(?)`
//! that returns the rows it applied, and the events are one `INSERT … SELECT FROM json_each(?)`.
//! (A statement per row would cost a round trip to SQLite's thread each, which dominated the
//! profile.)

use serde::Serialize;
use sqlx::{SqliteConnection, SqlitePool};

use crate::policy::claims::KeyFacts;
use crate::storage::contract::UPSERT_KEY;
use crate::storage::{Change, EventKind, NewKey, Result, Write};

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
    let mut applied: Vec<bool> = writes
        .iter()
        .map(|w| matches!(w, Write::Event(_)))
        .collect();
    // Each write's JSON, grouped by the statement that applies it. A statement reports the ids
    // it changed, so a row appears at most once per statement: a second write to the same row
    // (a spool applied twice, say) goes into a later statement of its own.
    let mut groups: Vec<Group> = Vec::new();
    for (i, write) in writes.iter().enumerate() {
        let Some((kind, json)) = row_json(write) else {
            continue;
        };
        let id = write.key_id();
        match groups
            .iter_mut()
            .find(|g| g.kind == kind && !g.ids.contains(&id))
        {
            Some(g) => {
                g.indexes.push(i);
                g.ids.insert(id);
                g.array.push(',');
                g.array.push_str(&json);
            }
            None => groups.push(Group {
                kind,
                indexes: vec![i],
                ids: std::collections::HashSet::from([id]),
                array: format!("[{json}"),
            }),
        }
    }
    for Group {
        kind,
        indexes,
        mut array,
        ..
    } in groups
    {
        array.push(']');
        let done: Vec<(i64,)> = sqlx::query_as(kind.sql())
            .bind(array)
            .fetch_all(&mut *conn)
            .await?;
        let done: std::collections::HashSet<i64> = done.into_iter().map(|(id,)| id).collect();
        for i in indexes {
            applied[i] = done.contains(&writes[i].key_id());
        }
    }
    insert_events(conn, writes, &applied).await?;
    insert_lineage(conn, writes, &applied).await?;
    sqlx::query("COMMIT").execute(&mut *conn).await?;
    Ok(applied)
}

/// The writes one statement applies.
struct Group {
    kind: ChangeKind,
    indexes: Vec<usize>,
    ids: std::collections::HashSet<i64>,
    array: String,
}

/// The activation statement; `$set` and `$column` add the trimmed key for padded ones.
macro_rules! activate {
    ($set:literal, $column:literal) => {
        concat!(
            "UPDATE store_keys SET ",
            $set,
            "state = 'active', reason = NULL, key_fp = v.key_fp,
                 client_id = v.client_id, user_id = v.user_id, issued_at = v.issued_at,
                 expires_at = v.expires_at, next_attempt_at = v.next_at, lease_until = NULL,
                 attempts = 0, refusals = 0, refused_first_ms = NULL, refused_last_ms = NULL,
                 updated_at = v.at
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChangeKind {
    Activate,
    ActivateTrimmed,
    Renew,
    Retry,
    Flag,
    Defer,
}

impl ChangeKind {
    #[cfg(test)]
    pub(super) const ALL: [ChangeKind; 6] = [
        ChangeKind::Activate,
        ChangeKind::ActivateTrimmed,
        ChangeKind::Renew,
        ChangeKind::Retry,
        ChangeKind::Flag,
        ChangeKind::Defer,
    ];

    /// Each statement compares every row on the bytes of the key that was read (`expected`,
    /// hex), and returns the ids it changed. The unary `+` keeps the planner off the state
    /// indexes: walking every pending row for each row of the batch took 35 s for 1,024 rows.
    pub(super) fn sql(self) -> &'static str {
        match self {
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
                     refused_first_ms = NULL, refused_last_ms = NULL,
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
                     reason = v.reason, updated_at = v.at
                 FROM (SELECT value ->> 'id' AS id, COALESCE(unhex(value ->> 'expected_hex'), CAST(value ->> 'expected' AS BLOB)) AS expected,
                              value ->> 'next_at' AS next_at, value ->> 'refused_ms' AS refused_ms,
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
}

/// The fields of one row change, as the statement of its kind reads them.
#[derive(Serialize, Default)]
struct RowJson<'a> {
    id: i64,
    /// The key that was read, as text; its bytes in hex when they are not UTF-8 (a blob).
    #[serde(skip_serializing_if = "Option::is_none")]
    expected: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expected_hex: Option<String>,
    at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_fp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    issued_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refused_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'static str>,
}

impl<'a> RowJson<'a> {
    fn facts(mut self, facts: &'a KeyFacts) -> Self {
        self.client_id = Some(&facts.client_id);
        self.user_id = facts.user_id.as_deref();
        self.issued_at = Some(facts.issued_at);
        self.expires_at = Some(facts.expires_at);
        self
    }
}

/// The statement that applies `write` and the JSON object it reads, for a row change.
fn row_json(write: &Write) -> Option<(ChangeKind, String)> {
    let Write::Row {
        id,
        expected,
        at,
        change,
        ..
    } = write
    else {
        return None;
    };
    let base = RowJson {
        id: *id,
        expected: expected.is_utf8().then(|| expected.expose()),
        expected_hex: (!expected.is_utf8()).then(|| hex(expected.cas_bytes())),
        at: *at,
        ..RowJson::default()
    };
    let (kind, row) = match change {
        // Compared on what the backend wrote, stored as it is sent.
        Change::Activate { facts, next_at } => (
            if expected.has_padding() {
                ChangeKind::ActivateTrimmed
            } else {
                ChangeKind::Activate
            },
            RowJson {
                new_key: expected.has_padding().then(|| expected.trimmed()),
                key_fp: Some(expected.fingerprint().to_string()),
                next_at: Some(*next_at),
                ..base
            }
            .facts(facts),
        ),
        Change::Renew {
            key,
            facts,
            next_at,
        } => (
            ChangeKind::Renew,
            RowJson {
                new_key: Some(key.expose()),
                key_fp: Some(key.fingerprint().to_string()),
                next_at: Some(*next_at),
                ..base
            }
            .facts(facts),
        ),
        Change::Retry {
            at,
            reason,
            refused_ms,
        } => (
            ChangeKind::Retry,
            RowJson {
                next_at: Some(*at),
                refused_ms: *refused_ms,
                reason: Some(reason),
                ..base
            },
        ),
        Change::Flag { state, reason } => (
            ChangeKind::Flag,
            RowJson {
                state: Some(state.as_str()),
                reason: Some(reason),
                key_fp: Some(expected.fingerprint().to_string()),
                ..base
            },
        ),
        Change::Defer { at } => (
            ChangeKind::Defer,
            RowJson {
                next_at: Some(*at),
                ..base
            },
        ),
    };
    serde_json::to_string(&row).ok().map(|json| (kind, json))
}

/// Every event of the batch, in order; a row change that did not apply records `superseded`
/// (the backend replaced the key meanwhile: its write stands, ours was dropped).
/// The keys the applied renewals retired, by the tail the lineage trigger compares.
async fn insert_lineage(
    conn: &mut SqliteConnection,
    writes: &[Write],
    applied: &[bool],
) -> Result<()> {
    let retired: Vec<(i64, &str, i64)> = writes
        .iter()
        .zip(applied)
        .filter_map(|(write, done)| match write {
            Write::Row {
                id,
                expected,
                at,
                change: Change::Renew { .. },
                ..
            } if *done && expected.is_utf8() => Some((*id, expected.trimmed(), *at)),
            _ => None,
        })
        .collect();
    if retired.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_string(&retired).unwrap_or_else(|_| "[]".to_owned());
    sqlx::query(
        "INSERT OR IGNORE INTO store_key_lineage (key_id, tail, retired_at)
         SELECT value ->> 0, substr(value ->> 1, -22), value ->> 2 FROM json_each(?)",
    )
    .bind(json)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn insert_events(
    conn: &mut SqliteConnection,
    writes: &[Write],
    applied: &[bool],
) -> Result<()> {
    let mut events = Vec::new();
    for (write, done) in writes.iter().zip(applied) {
        let (event, kind) = match write {
            Write::Event(e) => (e, e.kind),
            Write::Row { event: Some(e), .. } if *done => (e, e.kind),
            Write::Row { event: Some(e), .. } => (e, EventKind::Superseded),
            Write::Row { event: None, .. } => continue,
        };
        events.push(EventJson {
            key_id: event.key_id,
            at: event.at,
            kind: kind.as_str(),
            key_fp: event.key_fp.as_deref(),
            http_status: event.http_status,
            error_code: event.error_code.as_deref(),
            detail: event.detail.as_deref(),
            correlation_id: event.correlation_id.as_deref(),
            request_id: event.request_id.as_deref(),
            cv: event.cv.as_deref(),
            duration_ms: event.duration_ms,
        });
    }
    if events.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_string(&events).unwrap_or_else(|_| "[]".to_owned());
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
    .execute(conn)
    .await?;
    Ok(())
}

/// An event row as the insert reads it; `kind` may differ from the event's (`superseded`).
#[derive(Serialize)]
struct EventJson<'a> {
    key_id: i64,
    at: i64,
    kind: &'static str,
    key_fp: Option<&'a str>,
    http_status: Option<u16>,
    error_code: Option<&'a str>,
    detail: Option<&'a str>,
    correlation_id: Option<&'a str>,
    request_id: Option<&'a str>,
    cv: Option<&'a str>,
    duration_ms: Option<i64>,
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]])
        .map(char::from)
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_pairs() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }

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
            let plan = store.explain(kind.sql()).await;
            assert!(
                plan.contains("SEARCH store_keys USING INTEGER PRIMARY KEY")
                    && !plan.contains("SCAN store_keys")
                    && !plan.contains("store_keys_state"),
                "{kind:?}: {plan}"
            );
        }
    }
}
