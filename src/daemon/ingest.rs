//! Ingest: the keys backends wrote since the last look are checked ([`crate::policy::checks`])
//! and scheduled or flagged, a batch at a time, through the writer (one transaction per batch).

use crate::clock::utc;
use crate::config::Config;
use crate::daemon::DaemonError;
use crate::daemon::writer::{WriterHandle, Written};
use crate::policy::checks;
use crate::policy::schedule;
use crate::policy::state::EventKind;
use crate::storage::{Change, Event, PendingRow, Storage, Write};

/// Checks up to `limit` pending rows; returns how many it looked at.
pub async fn ingest_pending(
    storage: &dyn Storage,
    writer: &WriterHandle,
    config: &Config,
    now: i64,
    limit: u32,
) -> Result<usize, DaemonError> {
    let rows = storage.pending(limit).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let writes: Vec<Write> = rows.iter().map(|row| verdict(row, config, now)).collect();
    // What to log for the flags, taken before the writes go (no copy of the keys).
    let flags: Vec<Option<(i64, &'static str, String)>> = writes.iter().map(flag_of).collect();
    let written = writer.write_all(writes).await?;
    for ((row, flag), written) in rows.iter().zip(flags).zip(written) {
        if let (Some((id, state, reason)), Written::Applied) = (flag, written) {
            let key = row.key.fingerprint();
            tracing::warn!(row = id, key = %key, state, reason, "key flagged");
        }
    }
    Ok(rows.len())
}

fn flag_of(write: &Write) -> Option<(i64, &'static str, String)> {
    match write {
        Write::Row {
            id,
            change: Change::Flag { state, reason },
            ..
        } => Some((*id, state.as_str(), reason.clone())),
        _ => None,
    }
}

/// The write that records one pending row's check.
fn verdict(row: &PendingRow, config: &Config, now: i64) -> Write {
    let fp = row.key.fingerprint();
    let (change, kind, detail) = match checks::check(&row.kind, &row.key, now, config) {
        Ok(claims) => {
            let facts = claims.facts();
            let next_at = schedule::renewal_time(&facts, &config.policy(), now, fastrand::f64());
            tracing::debug!(row = row.id, key = %fp, next = %utc(next_at), "key accepted");
            let detail = format!("next renewal at {}", utc(next_at));
            (
                Change::Activate { facts, next_at },
                EventKind::Accepted,
                detail,
            )
        }
        Err(flag) => (
            Change::Flag {
                state: flag.state,
                reason: flag.reason.clone(),
            },
            EventKind::of_flag(flag.state),
            flag.reason,
        ),
    };
    let mut event = Event::new(row.id, now, kind);
    event.key_fp = Some(fp.to_string());
    event.detail = Some(detail);
    Write::Row {
        id: row.id,
        expected: row.key.clone(),
        at: now,
        change,
        event: Some(event),
    }
}
