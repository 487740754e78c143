//! Rows as both databases return them, decoded into the storage types. Every integer column is
//! 64-bit on both (SQLite's INTEGER, PostgreSQL's BIGINT) and every key is read as bytes, so one
//! decoder serves both backends.

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{ClaimedRow, EventKind, EventRecord, KeySummary, PendingRow, Refusals, State};
use crate::policy::claims::{KeyFacts, KeyText, Kind};

/// An error naming the column and (the start of) the value it could not take.
pub(crate) fn decode_error(column: &str, value: &str) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: format!(
            "unexpected value `{}`",
            value.chars().take(40).collect::<String>()
        )
        .into(),
    }
}

/// A claimed row: `id, key_bytes, attempts, refusals, refused_first_ms, refused_last_ms, kind,
/// client_id, user_id, issued_at, expires_at, last_renewed_at`.
pub(crate) fn claimed<R>(row: &R, lease_until: i64) -> Result<ClaimedRow, sqlx::Error>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    let kind: String = row.try_get("kind")?;
    let count = |name: &str| -> Result<u32, sqlx::Error> {
        Ok(u32::try_from(row.try_get::<i64, _>(name)?).unwrap_or(u32::MAX))
    };
    let key = KeyText::from_bytes(row.try_get("key_bytes")?);
    let user_id: Option<String> = row.try_get("user_id")?;
    // Rows activated before the column existed: read the user from the key, once, so a
    // successor for another user is still refused.
    let user_id = user_id.or_else(|| {
        crate::policy::claims::decode(key.expose())
            .ok()
            .and_then(|c| c.user_id)
    });
    Ok(ClaimedRow {
        id: row.try_get("id")?,
        key,
        facts: KeyFacts {
            kind: Kind::parse(&kind).ok_or_else(|| decode_error("kind", &kind))?,
            client_id: row
                .try_get::<Option<String>, _>("client_id")?
                .unwrap_or_default(),
            user_id,
            issued_at: row.try_get::<Option<i64>, _>("issued_at")?.unwrap_or(0),
            expires_at: row.try_get::<Option<i64>, _>("expires_at")?.unwrap_or(0),
        },
        attempts: count("attempts")?,
        refusals: Refusals {
            count: count("refusals")?,
            first_ms: row.try_get("refused_first_ms")?,
            last_ms: row.try_get("refused_last_ms")?,
        },
        canary: false,
        proven: row.try_get::<Option<i64>, _>("last_renewed_at")?.is_some(),
        unanswered_at: row.try_get("unanswered_at")?,
        lease_until,
    })
}

/// The columns [`summary`] reads.
pub(crate) const SUMMARY_COLUMNS: &str = "id, user_ref, kind, state, reason, key_fp, client_id, expires_at, next_attempt_at, updated_at, renewals";

pub(crate) fn summary<R>(row: &R) -> Result<KeySummary, sqlx::Error>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
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

/// An event row with its key row's user and kind: `e.id, e.key_id, k.user_ref, k.kind,
/// e.outcome, e.http_status, e.detail`.
pub(crate) type RawEvent = (
    i64,
    i64,
    Option<String>,
    Option<String>,
    String,
    Option<i64>,
    Option<String>,
);

pub(crate) fn event(raw: RawEvent) -> Result<EventRecord, sqlx::Error> {
    let (id, key_id, user_ref, kind, outcome, http_status, detail) = raw;
    Ok(EventRecord {
        id,
        key_id,
        user_ref,
        kind: kind.as_deref().and_then(Kind::parse),
        event: EventKind::parse(&outcome).ok_or_else(|| decode_error("outcome", &outcome))?,
        http_status: http_status.and_then(|s| u16::try_from(s).ok()),
        detail,
    })
}

/// Counts by (state, kind) as the database grouped them, with every state and kind present.
pub(crate) fn by_state_kind(counts: &[(String, String, i64)]) -> Vec<(State, Kind, i64)> {
    let mut out = Vec::new();
    for state in State::ALL {
        for kind in Kind::ALL {
            let n = counts
                .iter()
                .find(|(s, k, _)| s == state.as_str() && k == kind.as_str())
                .map_or(0, |(_, _, n)| *n);
            out.push((state, kind, n));
        }
    }
    out
}

/// Alarm rows `(name, detail, since, owner)`.
pub(crate) fn alarms(rows: Vec<(String, String, i64, Option<String>)>) -> Vec<super::Alarm> {
    rows.into_iter()
        .map(|(name, detail, since, owner)| super::Alarm {
            name: super::AlarmName::parse(&name),
            detail,
            since,
            owner,
        })
        .collect()
}

/// A pending row as a look reads it: `id, kind, the key's bytes (NULL past the limit)`. Rows
/// whose key was not read come back as ids, to be flagged.
pub(crate) fn pending(rows: Vec<(i64, String, Option<Vec<u8>>)>) -> (Vec<PendingRow>, Vec<i64>) {
    let mut read = Vec::with_capacity(rows.len());
    let mut oversized = Vec::new();
    for (id, kind, key) in rows {
        match key {
            Some(key) => read.push(PendingRow {
                id,
                kind,
                key: KeyText::from_bytes(key),
            }),
            None => oversized.push(id),
        }
    }
    (read, oversized)
}
