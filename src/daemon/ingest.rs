//! Ingest: the keys backends wrote since the last look are checked ([`crate::policy::checks`])
//! and scheduled or flagged, a batch at a time, through the writer (one transaction per batch).
//! In the daemon a look runs beside the renewals ([`Checker`]): a bulk load of new keys never
//! holds back the call slots, and a drain never holds back the new keys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::clock::utc;
use crate::config::Config;
use crate::daemon::DaemonError;
use crate::daemon::writer::{WriterHandle, Written};
use crate::policy::checks;
use crate::policy::schedule;
use crate::policy::state::EventKind;
use crate::storage::{Change, DbError, Event, Oversized, PendingRow, Storage, Write};

/// A look at new keys that takes longer than this is abandoned and reported.
const LOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// When to look for keys backends wrote. Where the database cannot signal them (SQLite), at
/// every pass (while no look runs): the look is an index probe on a local file. Where it can
/// (PostgreSQL's `NOTIFY`), when signalled, while the last look found a full batch, and at
/// least once a poll interval, since a signal is lost while the listener reconnects. During a
/// drain the loop passes hundreds of times a second, and on PostgreSQL each look walks the
/// pending index past the entries of rows checked since the last vacuum. After a failed look,
/// on either database, the next waits out a backoff (1 s, doubling, at most the poll): it is
/// due then even unsignalled, and not before, so a failing database is not asked at every pass.
#[derive(Debug, Default)]
pub struct IngestGate {
    signalled: bool,
    more: bool,
    last: Option<Instant>,
    /// Looks that failed in a row.
    failures: u32,
    /// After a failure: when the next look is due.
    retry_at: Option<Instant>,
}

/// The first wait after a failed look; it doubles with each failure in a row.
const FIRST_RETRY: Duration = Duration::from_secs(1);

impl IngestGate {
    pub fn signalled(&mut self) {
        self.signalled = true;
    }

    pub fn due(&self, can_signal: bool, poll: Duration, now: Instant) -> bool {
        if let Some(at) = self.retry_at {
            return now >= at;
        }
        !can_signal
            || self.signalled
            || self.more
            || self
                .last
                .is_none_or(|t| now.saturating_duration_since(t) >= poll)
    }

    /// A look begins: it sees every key announced so far. A signal that comes while it runs
    /// may be for a key it missed, and stands.
    pub fn started(&mut self) {
        self.signalled = false;
    }

    /// The look that began at `started` found `found` rows of at most `limit`. Returns whether
    /// the next look is due at once: a full batch may leave more, and a key announced while it
    /// ran may be one it missed. (A look that found nothing makes no pass of its own, so
    /// without this such a key would wait for the poll.)
    pub fn looked(&mut self, found: usize, limit: usize, started: Instant) -> bool {
        self.more = found >= limit;
        self.last = Some(started);
        self.failures = 0;
        self.retry_at = None;
        self.more || self.signalled
    }

    /// After a failed look: how long from `now` until the next is due.
    pub fn retry_in(&self, now: Instant) -> Option<Duration> {
        self.retry_at.map(|at| at.saturating_duration_since(now))
    }

    /// The look failed at `now`; returns how long until the next is due.
    pub fn failed(&mut self, now: Instant, poll: Duration) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(16);
        let wait = FIRST_RETRY.saturating_mul(1 << doublings).min(poll);
        self.retry_at = Some(now + wait);
        wait
    }
}

/// The run loop's looks for new keys: when one is due ([`IngestGate`]), it runs as a task of its
/// own, one at a time, while the loop goes on claiming and renewing.
#[derive(Debug, Default)]
pub struct Checker {
    gate: IngestGate,
    /// The look under way.
    running: Option<Look>,
    /// Whether a look has ended since the start.
    ended: bool,
}

/// How a look ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Looked {
    /// How many keys it checked.
    pub found: usize,
    /// Whether the next look is due at once ([`IngestGate::looked`]).
    pub again: bool,
}

/// How a look failed.
#[derive(Debug)]
pub struct LookFailed {
    /// Why; `None` where the look's task panicked (reported where it was caught).
    pub error: Option<DaemonError>,
    /// When the next look is due ([`IngestGate::failed`]).
    pub retry_in: Duration,
}

#[derive(Debug)]
struct Look {
    task: JoinHandle<Result<usize, DaemonError>>,
    started: Instant,
    /// How many rows it may take.
    limit: usize,
    /// The poll interval: the longest wait after a failure.
    poll: Duration,
}

/// What a look needs, shared with the loop.
pub struct CheckerParts {
    pub storage: Arc<dyn Storage>,
    pub writer: WriterHandle,
    pub config: Arc<Config>,
}

impl Checker {
    /// The database announced a new key.
    pub fn signalled(&mut self) {
        self.gate.signalled();
    }

    pub fn running(&self) -> bool {
        self.running.is_some()
    }

    /// After a failed look, while none runs: how long until the next is due. The loop sleeps
    /// no longer, whatever woke it meanwhile.
    pub fn retry_in(&self) -> Option<Duration> {
        if self.running.is_some() {
            return None;
        }
        self.gate.retry_in(Instant::now())
    }

    /// Whether a look has ended (found keys, none, or failed) since the start: counts of keys
    /// taken before that would show as pending the keys stored while the daemon was down.
    pub fn ended_once(&self) -> bool {
        self.ended
    }

    /// Starts a look at up to `renew.batch_size` pending rows if one is due and none runs.
    /// `can_signal`: whether the database announces new keys.
    pub fn start(&mut self, parts: &CheckerParts, now: i64, can_signal: bool) {
        let (started, poll) = (Instant::now(), parts.config.renew.poll_interval);
        if self.running.is_some() || !self.gate.due(can_signal, poll, started) {
            return;
        }
        let (storage, writer, config) = (
            parts.storage.clone(),
            parts.writer.clone(),
            parts.config.clone(),
        );
        let batch = config.renew.batch_size;
        let task = tokio::spawn(async move {
            let look = ingest_pending(&*storage, &writer, &config, now, batch);
            // Every query and write has a timeout of its own; this bounds the sum, so a look
            // that hangs anyway is reported and the next one starts.
            tokio::time::timeout(LOOK_TIMEOUT, look)
                .await
                .unwrap_or(Err(DaemonError::Db(DbError::Timeout(LOOK_TIMEOUT))))
        });
        self.gate.started();
        self.running = Some(Look {
            task,
            started,
            limit: batch as usize,
            poll,
        });
    }

    /// Resolves when the running look ends (never, if none runs) with how many keys it checked
    /// and whether the next look is due at once, or why it failed and when the next is due.
    /// Cancel-safe.
    pub async fn finished(&mut self) -> Result<Looked, LookFailed> {
        let Some(look) = &mut self.running else {
            return std::future::pending().await;
        };
        let joined = (&mut look.task).await;
        let (started, limit, poll) = (look.started, look.limit, look.poll);
        self.running = None;
        self.ended = true;
        let error = match joined {
            Ok(Ok(found)) => {
                let again = self.gate.looked(found, limit, started);
                return Ok(Looked { found, again });
            }
            Ok(Err(e)) => Some(e),
            Err(e) => {
                tracing::error!(error = %e, "checking new keys failed; they are checked at a later look");
                None
            }
        };
        let retry_in = self.gate.failed(Instant::now(), poll);
        Err(LookFailed { error, retry_in })
    }

    /// At a stop the look under way is abandoned: its checks that reached the writer are
    /// written, and the rest are looked at again (at once after a start on SQLite; on
    /// PostgreSQL by the first look after the look's 60 s hold on them ends: a signal's or the
    /// poll's).
    pub fn stop(&mut self) {
        if let Some(look) = self.running.take() {
            look.task.abort();
        }
    }
}

/// Checks up to `limit` pending rows; returns how many it looked at.
pub async fn ingest_pending(
    storage: &dyn Storage,
    writer: &WriterHandle,
    config: &Config,
    now: i64,
    limit: u32,
) -> Result<usize, DaemonError> {
    let look = storage.pending(limit, now).await?;
    for Oversized { id, bytes } in &look.oversized {
        tracing::warn!(
            row = id,
            bytes,
            state = "invalid",
            "key flagged: longer than a Store key can be, not read"
        );
    }
    let taken = look.len();
    let rows = look.rows;
    if rows.is_empty() {
        return Ok(taken);
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
    Ok(taken)
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::IngestGate;

    #[test]
    fn where_keys_are_signalled_a_look_waits_for_a_signal_a_full_batch_or_the_poll() {
        let (poll, t0) = (Duration::from_secs(10), Instant::now());
        let mut gate = IngestGate::default();
        assert!(gate.due(true, poll, t0), "the first pass looks");
        assert!(!gate.looked(0, 100, t0));
        assert!(!gate.due(true, poll, t0 + Duration::from_secs(1)));
        assert!(
            gate.due(false, poll, t0 + Duration::from_secs(1)),
            "no signals: every pass"
        );
        assert!(
            gate.due(true, poll, t0 + poll),
            "a lost signal waits a poll at most"
        );
        gate.signalled();
        assert!(gate.due(true, poll, t0 + Duration::from_secs(1)));
        gate.started();
        gate.signalled();
        assert!(
            gate.looked(0, 100, t0),
            "a key announced while a look that found nothing ran: look again at once"
        );
        assert!(
            gate.due(true, poll, t0),
            "a key announced while the look ran may have been missed"
        );
        gate.started();
        assert!(!gate.looked(0, 100, t0));
        assert!(!gate.due(true, poll, t0));
        gate.started();
        assert!(gate.looked(100, 100, t0), "a full batch: more may wait");
        assert!(gate.due(true, poll, t0));
        assert!(!gate.looked(3, 100, t0));
        assert!(!gate.due(true, poll, t0));
    }

    #[test]
    fn a_failed_look_is_tried_again_after_a_backoff_signalled_or_not() {
        let (poll, t0) = (Duration::from_secs(10), Instant::now());
        let secs = Duration::from_secs;
        for can_signal in [true, false] {
            let mut gate = IngestGate::default();
            gate.started();
            assert_eq!(gate.failed(t0, poll), secs(1));
            assert!(!gate.due(can_signal, poll, t0), "not at every pass");
            gate.signalled();
            assert!(
                !gate.due(can_signal, poll, t0 + Duration::from_millis(999)),
                "a signal waits out the backoff"
            );
            assert!(gate.due(can_signal, poll, t0 + secs(1)));
            gate.started();
            assert_eq!(gate.failed(t0, poll), secs(2));
            assert_eq!(gate.failed(t0, poll), secs(4));
            assert_eq!(gate.failed(t0, poll), secs(8));
            assert_eq!(gate.failed(t0, poll), poll, "never longer than the poll");
            for _ in 0..100 {
                gate.failed(t0, poll);
            }
            assert_eq!(gate.failed(t0, poll), poll);
            gate.started();
            assert!(!gate.looked(0, 100, t0 + poll));
            assert_eq!(
                gate.due(can_signal, poll, t0 + poll),
                !can_signal,
                "a look that worked ends the backoff"
            );
            gate.started();
            assert_eq!(gate.failed(t0, poll), secs(1), "and starts it afresh");
        }
    }
}
