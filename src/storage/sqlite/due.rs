//! The due queue on SQLite: which keys a claim takes, and when the next one is due.
//!
//! Keys the Store has renewed at least once (proven) come first. A key's claims are unsigned:
//! a player can store any number of keys that look due, and they must not crowd out the keys
//! the Store has shown to be genuine. Each class has its own index per kind (migration 0009).

use sqlx::SqlitePool;

use super::{CLAIMED, mark_unanswered};
use crate::policy::claims::Kind;
use crate::storage::Result;

/// Each class of due keys: its rank in a claim, its index, and what puts a row in it.
const CLASSES: [(u8, &str, &str); 2] = [
    (0, "store_keys_due_proven", "last_renewed_at IS NOT NULL"),
    (1, "store_keys_due_new", "last_renewed_at IS NULL"),
];

/// Claims the most overdue keys of `kinds`, proven ones first. Binds: `?1` the lease, `?2`
/// now, `?3` the limit, `?4` on the kinds. Each kind's keys come off its own index, so a
/// backlog of one kind never starves the other.
pub(super) fn claim_sql(kinds: &[Kind]) -> String {
    let mut parts = Vec::with_capacity(CLASSES.len() * kinds.len());
    for (rank, index, class) in CLASSES {
        for param in 4..4 + kinds.len() {
            parts.push(format!(
                "SELECT * FROM (SELECT id, {rank} AS rank, next_attempt_at
                                FROM store_keys INDEXED BY {index}
                                WHERE state = 'active' AND {class} AND kind = ?{param}
                                  AND next_attempt_at <= ?2
                                ORDER BY next_attempt_at LIMIT ?3)"
            ));
        }
    }
    format!(
        "UPDATE store_keys SET next_attempt_at = ?1, lease_until = ?1, {}
         WHERE id IN (SELECT id FROM ({}) ORDER BY rank, next_attempt_at LIMIT ?3)
         RETURNING {CLAIMED}",
        mark_unanswered!("?2"),
        parts.join(" UNION ALL ")
    )
}

/// When the earliest active key of `kinds` is next due: one index lookup per kind and class.
pub(super) async fn next_due(pool: &SqlitePool, kinds: &[Kind]) -> Result<Option<i64>> {
    let sql = CLASSES
        .iter()
        .map(|(_, index, class)| {
            format!(
                "SELECT MIN(next_attempt_at) AS due FROM store_keys INDEXED BY {index}
                 WHERE state = 'active' AND {class} AND kind = ?1"
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let sql = format!("SELECT MIN(due) FROM ({sql})");
    let mut next: Option<i64> = None;
    for kind in kinds {
        let (due,): (Option<i64>,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(kind.as_str())
            .fetch_one(pool)
            .await?;
        next = match (next, due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    Ok(next)
}
