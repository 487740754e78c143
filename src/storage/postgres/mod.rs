//! The keys table, its events and alarms on PostgreSQL, shared by any number of replicas. This
//! module owns every SQL statement storekeyd sends to PostgreSQL: the queue (here), the writes
//! (`write`), the reports (`read`) and the wake-ups (`listen`).
//!
//! The keys table is the queue. A claim takes due rows with `FOR UPDATE SKIP LOCKED`, so two
//! replicas claiming at once take different rows, and stamps a lease on the database's clock:
//! a replica whose clock is off neither steals live claims nor keeps dead ones.

mod canary;
mod due;
mod listen;
mod open;
mod read;
mod write;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::postgres::PgRow;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    Alarm, AlarmName, Claim, ClaimedRow, ClearScope, DbError, DbOptions, EventRecord, KeyStats,
    KeySummary, MAX_KEY_BYTES, NewKey, PendingLook, Result, Storage, Write, rows,
};
use crate::policy::claims::{KeyText, Kind};

pub use open::migrator;

/// Now on the database's clock, in Unix seconds: what leases are judged by.
const DB_NOW: &str = "floor(extract(epoch FROM now()))::bigint";
/// How long a replica holds the pending rows it is checking.
const PENDING_LEASE_SECS: i64 = 60;

/// The columns a claim returns: the key and the claims ingest stored for it.
const CLAIMED: &str = "k.id, convert_to(k.key, 'UTF8') AS key_bytes, k.attempts, k.refusals, k.refused_first_ms, k.refused_last_ms, k.kind, k.client_id, k.user_id, k.issued_at, k.expires_at, k.last_renewed_at, k.unanswered_at";
/// A claim of a row whose lease ran out with no result: the attempt that held it may have
/// renewed the key (its process paused or died with the answer), so the row says since when.
/// The latest mark wins: the wait is for the attempt that may hold the answer now. `$N` is the
/// claimer's now.
macro_rules! mark_unanswered {
    ($now:literal) => {
        concat!(
            "unanswered_at = CASE WHEN k.lease_until IS NOT NULL THEN ",
            $now,
            " ELSE k.unanswered_at END"
        )
    };
}
pub(super) use mark_unanswered;

/// A PostgreSQL database. Cloning shares the pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Every call gives up after this long: a server that vanished without closing the
    /// connection would otherwise hold a pass until TCP gives up (minutes).
    call_timeout: Duration,
    listen: listen::Source,
    wake: Arc<OnceLock<Arc<Notify>>>,
    /// Ends the listener.
    closed: CancellationToken,
}

impl PgStore {
    /// A pool that connects when first used: a server down at the start is an error of the
    /// first query, and the daemon waits for it like for any outage.
    pub fn connect(url: &str, options: &DbOptions) -> Result<PgStore> {
        let pool = open::pool(url, options)?;
        let listen = match &options.listen_url {
            Some(url) => listen::Source::Url(Box::new(open::listen_options(url, options)?)),
            None => listen::Source::Pool(pool.clone()),
        };
        Ok(PgStore {
            pool,
            listen,
            closed: CancellationToken::new(),
            call_timeout: options.connect_timeout
                + options
                    .busy_timeout
                    .saturating_mul(2)
                    .max(Duration::from_secs(30))
                + Duration::from_secs(5),
            wake: Arc::new(OnceLock::new()),
        })
    }

    async fn timed<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.call_timeout, call)
            .await
            .unwrap_or(Err(DbError::Timeout(self.call_timeout)))
    }
}

fn claimed_rows(rows: &[PgRow], lease_until: i64) -> Result<Vec<ClaimedRow>> {
    Ok(rows
        .iter()
        .map(|r| rows::claimed(r, lease_until))
        .collect::<std::result::Result<_, _>>()?)
}

fn claimed_row(row: Option<&PgRow>, lease_until: i64) -> Result<Option<ClaimedRow>> {
    Ok(row.map(|r| rows::claimed(r, lease_until)).transpose()?)
}

/// A lease's length in seconds, from the caller's `now` and `lease_until`.
fn lease_secs(now: i64, lease_until: i64) -> i64 {
    lease_until.saturating_sub(now).max(1)
}

#[async_trait]
impl Storage for PgStore {
    async fn migrate(&self) -> Result<()> {
        self.timed(async { Ok(migrator().run(&self.pool).await?) })
            .await
    }

    async fn check_schema(&self) -> Result<()> {
        self.timed(open::check_schema(&self.pool)).await
    }

    fn schema_version(&self) -> i64 {
        migrator().iter().map(|m| m.version).max().unwrap_or(0)
    }

    async fn close(&self) {
        self.closed.cancel();
        self.pool.close().await;
    }

    async fn pending(&self, limit: u32, now: i64) -> Result<PendingLook> {
        // `octet_length` reads a value's size, not the (toasted) value.
        let sql = format!(
            "UPDATE store_keys AS k SET lease_until = {DB_NOW} + $2
             WHERE k.id IN (SELECT id FROM store_keys
                            WHERE state = 'pending' AND (lease_until IS NULL OR lease_until <= {DB_NOW})
                            ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING k.id, k.kind,
                       CASE WHEN octet_length(k.key) <= $3 THEN convert_to(k.key, 'UTF8') END"
        );
        let mut rows: Vec<(i64, String, Option<Vec<u8>>)> = self
            .timed(async {
                Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(i64::from(limit))
                    .bind(PENDING_LEASE_SECS)
                    .bind(MAX_KEY_BYTES)
                    .fetch_all(&self.pool)
                    .await?)
            })
            .await?;
        rows.sort_by_key(|r| r.0);
        let (rows, oversized) = rows::pending(rows);
        let oversized = if oversized.is_empty() {
            Vec::new()
        } else {
            self.timed(write::flag_oversized(&self.pool, &oversized, now))
                .await?
        };
        Ok(PendingLook { rows, oversized })
    }

    async fn claim_due(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
        kinds: &[Kind],
    ) -> Result<Vec<ClaimedRow>> {
        if kinds.is_empty() {
            return Ok(Vec::new());
        }
        let sql = due::claim_sql(kinds);
        let rows = self
            .timed(async {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(now)
                    .bind(i64::from(limit))
                    .bind(lease_until)
                    .bind(lease_secs(now, lease_until));
                for kind in kinds {
                    query = query.bind(kind.as_str());
                }
                Ok(query.fetch_all(&self.pool).await?)
            })
            .await?;
        let mut claimed = claimed_rows(&rows, lease_until)?;
        claimed.sort_by_key(|r| r.id);
        Ok(claimed)
    }

    async fn claim_row(&self, id: i64, now: i64, lease_until: i64) -> Result<Option<ClaimedRow>> {
        let sql = format!(
            "UPDATE store_keys AS k SET next_attempt_at = $1, lease_until = {DB_NOW} + $3, {}
             WHERE k.id = $2 AND k.state = 'active'
               AND (k.lease_until IS NULL OR k.lease_until <= {DB_NOW})
             RETURNING {CLAIMED}",
            // The caller's now: its lease's end less the lease.
            mark_unanswered!("$1 - $3")
        );
        let row = self
            .timed(async {
                Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(lease_until)
                    .bind(id)
                    .bind(lease_secs(now, lease_until))
                    .fetch_optional(&self.pool)
                    .await?)
            })
            .await?;
        claimed_row(row.as_ref(), lease_until)
    }

    async fn healthy_key_exists(&self, client_id: &str, valid_past: i64) -> Result<bool> {
        self.timed(canary::healthy_key_exists(
            &self.pool, client_id, valid_past,
        ))
        .await
    }

    async fn claim_healthy_key(
        &self,
        client_id: &str,
        issued_before: i64,
        proven: bool,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<ClaimedRow>> {
        let want = canary::Want {
            client_id,
            issued_before,
            proven,
        };
        self.timed(canary::claim(&self.pool, want, now, lease_until))
            .await
    }

    async fn due_rows(&self, now: i64, limit: u32) -> Result<Vec<ClaimedRow>> {
        let sql = format!(
            "SELECT {CLAIMED} FROM store_keys AS k
             WHERE k.state = 'active' AND k.next_attempt_at <= $1
             ORDER BY k.next_attempt_at LIMIT $2"
        );
        let rows = self
            .timed(async {
                Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(now)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?)
            })
            .await?;
        // Not claimed: a dry run holds no lease.
        claimed_rows(&rows, i64::MAX)
    }

    async fn next_due(&self, kinds: &[Kind]) -> Result<Option<i64>> {
        self.timed(due::next_due(&self.pool, kinds)).await
    }

    async fn apply(&self, writes: &[Write]) -> Result<Vec<bool>> {
        self.timed(write::apply(&self.pool, writes)).await
    }

    async fn extend_leases(&self, ids: &[i64], now: i64, until: i64) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "UPDATE store_keys SET next_attempt_at = $1, lease_until = {DB_NOW} + $2
             WHERE id = ANY($3) AND state = 'active' AND lease_until IS NOT NULL"
        );
        self.timed(async {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(until)
                .bind(lease_secs(now, until))
                .bind(ids)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    async fn release(&self, claims: &[Claim], now: i64) -> Result<()> {
        if claims.is_empty() {
            return Ok(());
        }
        let (ids, leases): (Vec<i64>, Vec<i64>) =
            claims.iter().map(|c| (c.id, c.lease_until)).unzip();
        // A row whose due time is no longer its claim's lease was claimed anew by another
        // replica and is not ours to hand back.
        self.timed(async {
            sqlx::query(
                "UPDATE store_keys AS k SET next_attempt_at = $1, lease_until = NULL
                 FROM unnest($2::bigint[], $3::bigint[]) AS c(id, lease)
                 WHERE k.id = c.id AND k.next_attempt_at = c.lease AND k.state = 'active'
                   AND k.lease_until IS NOT NULL",
            )
            .bind(now)
            .bind(ids)
            .bind(leases)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    async fn recheck_misconfigured(&self, now: i64) -> Result<u64> {
        self.timed(async {
            Ok(sqlx::query(
                "UPDATE store_keys SET state = 'pending', updated_at = $1 WHERE state = 'misconfigured'",
            )
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected())
        })
        .await
    }

    async fn prune_events(&self, before: i64, max_batches: u32) -> Result<(u64, bool)> {
        self.timed(write::prune_events(&self.pool, before, max_batches))
            .await
    }

    async fn prune_lineage(&self, before: i64) -> Result<u64> {
        self.timed(async {
            Ok(
                sqlx::query("DELETE FROM store_key_lineage WHERE retired_at < $1")
                    .bind(before)
                    .execute(&self.pool)
                    .await?
                    .rows_affected(),
            )
        })
        .await
    }

    async fn store_keys(&self, keys: &[NewKey]) -> Result<()> {
        self.timed(write::store_keys(&self.pool, keys)).await
    }

    async fn key_row(&self, id: i64) -> Result<Option<(KeySummary, KeyText)>> {
        self.timed(read::key_row(&self.pool, id)).await
    }

    async fn flagged(&self, limit: u32) -> Result<(Vec<KeySummary>, i64)> {
        self.timed(read::flagged(&self.pool, limit)).await
    }

    async fn expiring(&self, before: i64, limit: u32) -> Result<Vec<KeySummary>> {
        self.timed(read::expiring(&self.pool, before, limit)).await
    }

    async fn key_stats(&self, now: i64) -> Result<KeyStats> {
        self.timed(async {
            let next_due = due::next_due(&self.pool, &Kind::ALL).await?;
            read::key_stats(&self.pool, now, next_due).await
        })
        .await
    }

    async fn keys(&self, after_id: i64, limit: u32) -> Result<Vec<KeySummary>> {
        self.timed(read::keys(&self.pool, after_id, limit)).await
    }

    async fn events(&self, after_id: i64, limit: u32) -> Result<Vec<EventRecord>> {
        self.timed(read::events(&self.pool, after_id, limit)).await
    }

    async fn alarms(&self) -> Result<Vec<Alarm>> {
        self.timed(read::alarms(&self.pool)).await
    }

    async fn set_alarm(
        &self,
        name: &AlarmName,
        detail: &str,
        since: i64,
        owner: &str,
    ) -> Result<()> {
        self.timed(write::set_alarm(
            &self.pool,
            &name.to_string(),
            detail,
            since,
            owner,
        ))
        .await
    }

    async fn clear_alarm(&self, name: &AlarmName, scope: ClearScope<'_>) -> Result<()> {
        let (owner, before_ms) = scope.bounds();
        self.timed(async {
            sqlx::query(
                "DELETE FROM storekeyd_alarms WHERE name = $1
                   AND ($2::text IS NULL OR owner = $2)
                   AND ($3::bigint IS NULL OR (since + 1) * 1000 <= $3)",
            )
            .bind(name.to_string())
            .bind(owner)
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    async fn heartbeat(&self, replica: &str, ttl: i64) -> Result<u32> {
        self.timed(write::heartbeat(&self.pool, replica, ttl)).await
    }

    async fn leave(&self, replica: &str) -> Result<()> {
        self.timed(write::leave(&self.pool, replica)).await
    }

    fn wakeups(&self) -> Option<Arc<Notify>> {
        Some(
            self.wake
                .get_or_init(|| listen::spawn(self.listen.clone(), self.closed.clone()))
                .clone(),
        )
    }
}
