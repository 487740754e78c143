//! The values the storage trait takes and gives: claimed rows, writes, events, reports.

use super::{AlarmName, EventKind, Refusals, State};
use crate::policy::claims::{KeyFacts, KeyText, Kind, MAX_KEY_LEN};

/// A row written by a backend and not yet checked.
#[derive(Debug, Clone)]
pub struct PendingRow {
    pub id: i64,
    /// As the backend wrote it; ingest compares it with the key's `aud`.
    pub kind: String,
    pub key: KeyText,
}

/// What a look for new keys found: the rows to check, and those flagged for their length alone.
#[derive(Debug, Default)]
pub struct PendingLook {
    pub rows: Vec<PendingRow>,
    pub oversized: Vec<Oversized>,
}

impl PendingLook {
    /// Every row the look took, checked or flagged.
    pub fn len(&self) -> usize {
        self.rows.len() + self.oversized.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A pending row flagged `invalid` because its key is longer than [`MAX_KEY_LEN`] bytes; the
/// value was never read, and is not kept (the row's `key` is emptied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oversized {
    pub id: i64,
    pub bytes: i64,
}

/// [`MAX_KEY_LEN`] as the databases compare it.
pub(crate) const MAX_KEY_BYTES: i64 = MAX_KEY_LEN as i64;

/// The reason an oversized key's row is flagged with, around its length in bytes: the words of
/// [`crate::policy::claims::KeyError::TooLong`], which the database fills in.
pub(crate) fn oversized_reason() -> (&'static str, String) {
    (
        "not a Store ID key: key is ",
        format!(" bytes, more than the {MAX_KEY_LEN} a Store key can be (the value is not kept)"),
    )
}

/// A due row reserved for one attempt, with the claims ingest stored for it.
#[derive(Debug, Clone)]
pub struct ClaimedRow {
    pub id: i64,
    pub key: KeyText,
    pub facts: KeyFacts,
    /// Consecutive failed attempts before this one.
    pub attempts: u32,
    /// The refusals the guard deferred since the key last renewed.
    pub refusals: Refusals,
    /// Claimed to test the application's credential, ahead of its time.
    pub canary: bool,
    /// The Store has renewed the key the row holds (it issued a successor): proof the key is
    /// genuine, which its unsigned claims are not.
    pub proven: bool,
    /// Since when (Unix seconds) an attempt on this key may have renewed it without its answer
    /// being written: one got no answer, or a claim's lease ran out with no result. Cleared
    /// when the key renews or the backend replaces it.
    pub unanswered_at: Option<i64>,
    /// Unix time the claim's lease ends: past it another process may claim the key.
    pub lease_until: i64,
}

impl ClaimedRow {
    pub fn claim(&self) -> Claim {
        Claim {
            id: self.id,
            lease_until: self.lease_until,
        }
    }
}

/// One claim on a row: a claim stamps the row's due time with its `lease_until` (on the
/// claimer's clock), which no other claim of the row repeats, so it tells this claim from a
/// later one of the same row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub id: i64,
    pub lease_until: i64,
}

/// Whose alarm a clear may delete: the alarms table is shared by every process on the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearScope<'a> {
    /// Whoever raised it: the condition is shared (an endpoint answers again).
    Anyone,
    /// Only if process `owner` raised it last: the condition is the process's own (its clock,
    /// its certificate files).
    OwnedBy(&'a str),
    /// Only if it was surely raised before this Unix time in milliseconds: the evidence (a
    /// renewal begun then) says nothing of an alarm raised after.
    RaisedBefore(i64),
}

impl ClearScope<'_> {
    /// The owner and the time bound (milliseconds) the statement compares, where they apply.
    pub(super) fn bounds(&self) -> (Option<&str>, Option<i64>) {
        match *self {
            ClearScope::Anyone => (None, None),
            ClearScope::OwnedBy(owner) => (Some(owner), None),
            ClearScope::RaisedBefore(ms) => (None, Some(ms)),
        }
    }
}

/// A key to store as a backend would.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub user_ref: String,
    pub kind: Kind,
    pub key: KeyText,
}

/// One write the writer applies.
#[derive(Debug, Clone)]
#[expect(
    clippy::large_enum_variant,
    reason = "row changes are nearly every write; boxing them would allocate for each"
)]
pub enum Write {
    /// A change to one key row at time `at`, only if the row still holds `expected`, with its
    /// event.
    Row {
        id: i64,
        expected: KeyText,
        at: i64,
        change: Change,
        event: Option<Event>,
    },
    /// An event alone: a step of an attempt that changes no row.
    Event(Event),
}

impl Write {
    /// The row this write is about.
    pub fn key_id(&self) -> i64 {
        match self {
            Write::Row { id, .. } => *id,
            Write::Event(e) => e.key_id,
        }
    }
}

/// What a write does to its row.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A pending key passed the checks: active, scheduled, and stored without surrounding
    /// whitespace.
    Activate {
        facts: KeyFacts,
        next_at: i64,
    },
    /// The Store renewed the key: its successor replaces it.
    Renew {
        key: KeyText,
        facts: KeyFacts,
        next_at: i64,
    },
    /// Another attempt at `at`. `refused_ms`: the Store refused the key then (Unix
    /// milliseconds), and the guard could not yet believe it; counted toward flagging it.
    /// `unanswered_at`: the attempt was sent and got no answer then (Unix seconds), so the
    /// Store may have renewed the key; kept until the key renews.
    Retry {
        at: i64,
        reason: String,
        refused_ms: Option<i64>,
        unanswered_at: Option<i64>,
    },
    Flag {
        state: State,
        reason: String,
    },
    /// Put back unattempted until `at`.
    Defer {
        at: i64,
    },
}

/// One row of attempt history.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub key_id: i64,
    pub at: i64,
    pub kind: EventKind,
    pub key_fp: Option<String>,
    pub http_status: Option<u16>,
    pub error_code: Option<String>,
    pub detail: Option<String>,
    pub correlation_id: Option<String>,
    pub request_id: Option<String>,
    pub cv: Option<String>,
    pub duration_ms: Option<i64>,
}

impl Event {
    pub fn new(key_id: i64, at: i64, kind: EventKind) -> Self {
        Event {
            key_id,
            at,
            kind,
            key_fp: None,
            http_status: None,
            error_code: None,
            detail: None,
            correlation_id: None,
            request_id: None,
            cv: None,
            duration_ms: None,
        }
    }
}

/// A key row without its key: what `status` and `inspect` show.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeySummary {
    pub id: i64,
    pub user_ref: String,
    pub kind: Kind,
    pub state: State,
    pub reason: Option<String>,
    pub key_fp: Option<String>,
    pub client_id: Option<String>,
    pub expires_at: Option<i64>,
    pub next_attempt_at: Option<i64>,
    pub updated_at: i64,
    pub renewals: i64,
}

/// One event as history shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventRecord {
    pub id: i64,
    pub key_id: i64,
    /// The row's user and kind, unless the row is gone.
    pub user_ref: Option<String>,
    pub kind: Option<Kind>,
    pub event: EventKind,
    pub http_status: Option<u16>,
    pub detail: Option<String>,
}

/// Counts and times for metrics, `status` and the systemd STATUS line.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KeyStats {
    /// (state, kind, count), every state and kind present even at zero.
    pub by_state_kind: Vec<(State, Kind, i64)>,
    pub earliest_expiry: Option<i64>,
    pub due: i64,
    pub next_due: Option<i64>,
}

impl KeyStats {
    pub fn count(&self, state: State) -> i64 {
        self.by_state_kind
            .iter()
            .filter(|(s, _, _)| *s == state)
            .map(|(_, _, n)| n)
            .sum()
    }

    pub fn flagged(&self) -> i64 {
        State::FLAGGED.into_iter().map(|s| self.count(s)).sum()
    }
}

/// A condition the daemon raised and has not cleared (an open breaker, a credential alarm).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Alarm {
    pub name: AlarmName,
    pub detail: String,
    pub since: i64,
    /// The process that raised it last.
    pub owner: Option<String>,
}
