//! What storekeyd remembers: the keys table, its events and the alarms. Everything the loop, the
//! CLI, the listener and the demo ask of a database goes through [`Storage`]; each database has
//! one implementation that owns all of its SQL (parameter syntax, time functions, index hints).

mod batch;
pub mod contract;
mod error;
pub mod postgres;
mod rows;
pub mod sqlite;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::SqlSafeStr as _;
use sqlx::migrate::{Migration, MigrationType, Migrator};

pub use crate::policy::state::{EventKind, State};
pub use error::DbError;

use crate::policy::claims::{KeyFacts, KeyText, Kind, MAX_KEY_LEN};
pub use crate::policy::guard::Refusals;

pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// A backend's long transaction holds the write lock; wait this long before calling it a failure.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(15);

/// How storekeyd connects: the config's `database_*` settings.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// How long a statement waits for a lock another connection holds.
    pub busy_timeout: Duration,
    /// PostgreSQL: connections per replica (SQLite keeps its own four).
    pub pool_size: u32,
    /// PostgreSQL: how long to wait for a connection, new or from the pool.
    pub connect_timeout: Duration,
    /// PostgreSQL: where the listener for new keys connects, if not where the pool does (a
    /// direct connection past PgBouncer in transaction mode).
    pub listen_url: Option<String>,
    /// PostgreSQL: a file holding the password, read when the pool is made (at start), unless
    /// the URL has a password of its own.
    pub password_file: Option<std::path::PathBuf>,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            busy_timeout: BUSY_TIMEOUT,
            pool_size: 10,
            connect_timeout: Duration::from_secs(5),
            listen_url: None,
            password_file: None,
        }
    }
}

/// The database a URL names, by its scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of(url: &str) -> Option<Backend> {
        let scheme = url.split_once(':')?.0.to_ascii_lowercase();
        match scheme.as_str() {
            "sqlite" => Some(Backend::Sqlite),
            "postgres" | "postgresql" => Some(Backend::Postgres),
            _ => None,
        }
    }
}

/// Opens the database a URL names, creating and migrating it: what the daemon does.
pub async fn open(url: &str, options: &DbOptions) -> Result<Arc<dyn Storage>> {
    let store = connect(url, options).await?;
    store.migrate().await?;
    Ok(store)
}

/// Opens the database a URL names without touching its schema: what the CLI does, so an upgrade
/// migrates only when asked to.
pub async fn connect(url: &str, options: &DbOptions) -> Result<Arc<dyn Storage>> {
    match Backend::of(url) {
        Some(Backend::Sqlite) => Ok(Arc::new(
            sqlite::SqliteStore::connect(url, options.busy_timeout).await?,
        )),
        Some(Backend::Postgres) => Ok(Arc::new(postgres::PgStore::connect(url, options)?)),
        None => Err(DbError::Scheme {
            url: redact_url(url),
        }),
    }
}

/// The URL without its password (`postgres://app:***@db/keys`), for errors and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => format!("{user}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// Runs `batch`, a delete of at most 1,000 rows, until one deletes fewer or `max_batches` ran;
/// returns how many rows went and whether more remain.
async fn in_batches<F, Fut>(max_batches: u32, mut batch: F) -> Result<(u64, bool)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64>>,
{
    let mut total = 0;
    for _ in 0..max_batches {
        let n = batch().await?;
        total += n;
        if n < 1000 {
            return Ok((total, false));
        }
    }
    Ok((total, true))
}

/// A schema embedded in the binary: `(version, name, sql)` per migration.
fn embedded(migrations: &[(i64, &'static str, &'static str)]) -> Migrator {
    Migrator::with_migrations(
        migrations
            .iter()
            .map(|&(version, name, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(name),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// The schema is at `migrator`'s last version (`found`: the last applied, none on an empty
/// database).
fn expect_version(found: Option<i64>, migrator: &Migrator) -> Result<()> {
    let expected = migrator.iter().map(|m| m.version).max();
    if found != expected {
        return Err(DbError::Schema { found, expected });
    }
    Ok(())
}

/// The keys table as storekeyd uses it.
#[async_trait]
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Brings the schema to this binary's version.
    async fn migrate(&self) -> Result<()>;
    /// The database answers and its schema is the one this binary expects.
    async fn check_schema(&self) -> Result<()>;
    /// The schema version this binary expects.
    fn schema_version(&self) -> i64;
    async fn close(&self);

    /// Keys written by a backend and not yet checked, oldest first. Where several processes
    /// share the database, each row goes to one of them (a short lease) until it is checked.
    /// A key longer than a Store key can be is never read: its row is flagged `invalid` here,
    /// with its event, at `now`, on its length alone, and the value emptied.
    async fn pending(&self, limit: u32, now: i64) -> Result<PendingLook>;
    /// Reserves up to `limit` due keys of `kinds` until `lease_until`: keys the Store has renewed
    /// before any it never has (a player can forge due-looking keys at will), then the most
    /// overdue first. Two claimers never get the same row.
    async fn claim_due(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
        kinds: &[Kind],
    ) -> Result<Vec<ClaimedRow>>;
    /// Reserves one active key whatever its due time, unless an attempt holds it.
    async fn claim_row(&self, id: i64, now: i64, lease_until: i64) -> Result<Option<ClaimedRow>>;
    /// Reserves the healthy key of application `client_id` that is due soonest (active, never
    /// refused or failed since it last renewed, not held, valid past `lease_until`), to renew
    /// it early as a canary: one issued at `issued_before` or earlier if any is free, else a
    /// younger one. `Ok(None)` only where the application has no other healthy key at all;
    /// [`DbError::Held`] where attempts hold every one: "no other key to ask" lets the guard
    /// conclude that every key it has is refused.
    async fn claim_canary(
        &self,
        client_id: &str,
        issued_before: i64,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<ClaimedRow>> {
        // A key the Store renewed first: a refusal of one that never renewed proves nothing
        // (a player may have forged it), so it is asked only where no renewed key is free. A
        // key renewed moments ago proves as much as an older one; it is taken only when no
        // older key is free, and then it is this or no evidence at all.
        for (proven, issued) in [
            (true, issued_before),
            (true, i64::MAX),
            (false, issued_before),
            (false, i64::MAX),
        ] {
            if let Some(mut row) = self
                .claim_healthy_key(client_id, issued, proven, now, lease_until)
                .await?
            {
                row.canary = true;
                return Ok(Some(row));
            }
        }
        // Attempts (here or in another replica) holding every healthy key is not "no other key
        // to ask": that would let a lone refused key be flagged, or raise the credential
        // alarm, while healthy keys exist.
        if self.healthy_key_exists(client_id, lease_until).await? {
            return Err(DbError::Held);
        }
        Ok(None)
    }
    /// For [`Storage::claim_canary`]: reserves the soonest due healthy key of `client_id`
    /// issued at `issued_before` or earlier (one the Store renewed, if `proven`), valid past
    /// `lease_until`, if one is free.
    async fn claim_healthy_key(
        &self,
        client_id: &str,
        issued_before: i64,
        proven: bool,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<ClaimedRow>>;
    /// For [`Storage::claim_canary`]: whether `client_id` has a healthy key valid past
    /// `valid_past` at all, held or not.
    async fn healthy_key_exists(&self, client_id: &str, valid_past: i64) -> Result<bool>;
    /// Active keys due now, without reserving them (a dry run).
    async fn due_rows(&self, now: i64, limit: u32) -> Result<Vec<ClaimedRow>>;
    /// When the earliest active key of `kinds` is next due (an index lookup, not a scan).
    async fn next_due(&self, kinds: &[Kind]) -> Result<Option<i64>>;
    /// Applies writes in one durable transaction, each row compared-and-swapped on the key that
    /// was read; returns, per write, whether it applied (a lost race records `superseded`).
    async fn apply(&self, writes: &[Write]) -> Result<Vec<bool>>;
    /// Keeps the leases of keys whose results are still to be written: due again at `until`,
    /// held for `until - now` more.
    async fn extend_leases(&self, ids: &[i64], now: i64, until: i64) -> Result<()>;
    /// Hands back claims whose attempt did not run, due again at `now`. A row claimed anew since
    /// (its lease ran out and another process took it) keeps the new claim.
    async fn release(&self, claims: &[Claim], now: i64) -> Result<()>;
    /// Gives keys flagged for configuration reasons another check (a config change may fix them).
    async fn recheck_misconfigured(&self, now: i64) -> Result<u64>;
    /// Deletes events older than `before` in at most `max_batches` bounded batches; returns how
    /// many and whether more remain.
    async fn prune_events(&self, before: i64, max_batches: u32) -> Result<(u64, bool)>;
    /// Forgets the keys retired before `before` (they expired long ago).
    async fn prune_lineage(&self, before: i64) -> Result<u64>;

    /// Adds or replaces keys exactly as the backend contract's upsert does, in one transaction.
    async fn store_keys(&self, keys: &[NewKey]) -> Result<()>;
    /// One row's summary and its key.
    async fn key_row(&self, id: i64) -> Result<Option<(KeySummary, KeyText)>>;
    /// Flagged keys, most recently flagged first, and how many there are in all.
    async fn flagged(&self, limit: u32) -> Result<(Vec<KeySummary>, i64)>;
    /// Active keys expiring before `before`, soonest first.
    async fn expiring(&self, before: i64, limit: u32) -> Result<Vec<KeySummary>>;
    /// Counts by state and kind, the earliest expiry and the backlog.
    async fn key_stats(&self, now: i64) -> Result<KeyStats>;
    /// Rows after `after_id`, in id order.
    async fn keys(&self, after_id: i64, limit: u32) -> Result<Vec<KeySummary>>;
    /// Events after `after_id`, oldest first, with the row they are about.
    async fn events(&self, after_id: i64, limit: u32) -> Result<Vec<EventRecord>>;

    async fn alarms(&self) -> Result<Vec<Alarm>>;
    /// Raises (or updates) a named alarm for `status`, as raised by process `owner`.
    async fn set_alarm(&self, name: &str, detail: &str, since: i64, owner: &str) -> Result<()>;
    /// Clears a named alarm, unless `scope` says it is not this caller's to clear.
    async fn clear_alarm(&self, name: &str, scope: ClearScope<'_>) -> Result<()>;
    /// Records that process `replica` is alive (on the database's clock); forgets the processes
    /// not seen for `ttl` seconds, and the alarms they raised but credential alarms (which stand
    /// until a renewal proves them wrong). Returns how many processes are alive, this one
    /// included.
    async fn heartbeat(&self, replica: &str, ttl: i64) -> Result<u32>;
    /// Process `replica` stops: its row goes, and the alarms it raised but credential alarms.
    async fn leave(&self, replica: &str) -> Result<()>;

    /// Signalled when a backend may have written a key, where the database can say so; the
    /// loop polls as well (a signal can be lost).
    fn wakeups(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
}

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
    fn bounds(&self) -> (Option<&str>, Option<i64>) {
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
    pub name: String,
    pub detail: String,
    pub since: i64,
    /// The process that raised it last.
    pub owner: Option<String>,
}
