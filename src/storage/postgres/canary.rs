//! Canaries on PostgreSQL: a healthy key of an application, claimed to be renewed early as
//! evidence that the credential works (see `Storage::claim_canary`).

use sqlx::PgPool;

use super::{CLAIMED, DB_NOW, claimed_row, lease_secs};
use crate::storage::{ClaimedRow, Result};

/// Which healthy key is wanted: of `client_id`, issued at `issued_before` or earlier, and one
/// the Store renewed if `proven`.
pub(super) struct Want<'a> {
    pub(super) client_id: &'a str,
    pub(super) issued_before: i64,
    pub(super) proven: bool,
}

/// Claims the soonest due such key (renewing it early costs the least), valid past the
/// claim's lease, idle (no lease) and never one whose answer may have been lost: its refusal
/// would prove nothing of the credential.
pub(super) async fn claim(
    pool: &PgPool,
    want: Want<'_>,
    now: i64,
    lease_until: i64,
) -> Result<Option<ClaimedRow>> {
    let sql = format!(
        "UPDATE store_keys AS k SET next_attempt_at = $1, lease_until = {DB_NOW} + $4
         WHERE k.id = (SELECT id FROM store_keys
                       WHERE state = 'active' AND client_id = $2 AND refusals = 0
                         AND attempts = 0 AND expires_at > $1 AND issued_at <= $3
                         AND (last_renewed_at IS NOT NULL OR NOT $5)
                         AND unanswered_at IS NULL AND lease_until IS NULL
                       ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING {CLAIMED}"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(lease_until)
        .bind(want.client_id)
        .bind(want.issued_before)
        .bind(lease_secs(now, lease_until))
        .bind(want.proven)
        .fetch_optional(pool)
        .await?;
    claimed_row(row.as_ref(), lease_until)
}

/// Whether a healthy key of the application exists at all, held or not.
pub(super) async fn healthy_key_exists(
    pool: &PgPool,
    client_id: &str,
    valid_past: i64,
) -> Result<bool> {
    let (exists,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM store_keys
                        WHERE state = 'active' AND client_id = $1 AND refusals = 0
                          AND attempts = 0 AND expires_at > $2
                          AND unanswered_at IS NULL)",
    )
    .bind(client_id)
    .bind(valid_past)
    .fetch_one(pool)
    .await?;
    Ok(exists)
}
