//! What storekeyd remembers: the keys table, its events and the alarms. Everything the loop, the
//! CLI, the listener and the demo ask of a database goes through [`Storage`]; each database has
//! one implementation that owns all of its SQL (parameter syntax, time functions, index hints).

mod backend;
mod batch;
pub mod contract;
mod error;
pub mod postgres;
mod rows;
pub mod sqlite;
mod types;

use async_trait::async_trait;

pub use crate::policy::state::{EventKind, State};
pub use backend::*;
use backend::{embedded, expect_version, in_batches};
pub use error::DbError;
pub use types::*;

use std::sync::Arc;

pub use crate::policy::alarm::AlarmName;
use crate::policy::claims::{KeyText, Kind};
pub use crate::policy::guard::Refusals;

pub type Result<T, E = DbError> = std::result::Result<T, E>;

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
        for (proven, issued) in crate::policy::guard::canary_preference(issued_before) {
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
    async fn set_alarm(
        &self,
        name: &AlarmName,
        detail: &str,
        since: i64,
        owner: &str,
    ) -> Result<()>;
    /// Clears a named alarm, unless `scope` says it is not this caller's to clear.
    async fn clear_alarm(&self, name: &AlarmName, scope: ClearScope<'_>) -> Result<()>;
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
