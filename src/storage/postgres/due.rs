//! The due queue on PostgreSQL: which keys a claim takes, and when the next one is due.
//!
//! Keys the Store has renewed at least once (proven) come first. A key's claims are unsigned:
//! a player can store any number of keys that look due, and they must not crowd out the keys
//! the Store has shown to be genuine. Each class has its own index per kind (migration 0004).

use sqlx::PgPool;

use super::{CLAIMED, DB_NOW, mark_unanswered};
use crate::policy::claims::Kind;
use crate::storage::Result;

/// Each class of due keys: its rank in a claim, and what puts a row in it (and in its index).
const CLASSES: [(u8, &str); 2] = [
    (0, "last_renewed_at IS NOT NULL"),
    (1, "last_renewed_at IS NULL"),
];

/// Claims the most overdue keys of `kinds`, proven ones first. Binds: `$1` now, `$2` the
/// limit, `$3` the lease's end as the caller reckons it, `$4` its length, `$5` on the kinds.
/// Each kind's keys come off its own index, so a backlog of one kind never starves the other;
/// a row another replica holds is skipped, not waited for.
pub(super) fn claim_sql(kinds: &[Kind]) -> String {
    let mut ctes = Vec::with_capacity(CLASSES.len() * kinds.len());
    for (rank, class) in CLASSES {
        for param in 5..5 + kinds.len() {
            ctes.push(format!(
                "c{rank}_{param} AS (SELECT id, {rank} AS rank, next_attempt_at FROM store_keys
                     WHERE state = 'active' AND {class} AND kind = ${param}
                       AND next_attempt_at <= $1
                       AND (lease_until IS NULL OR lease_until <= {DB_NOW})
                     ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            ));
        }
    }
    let all = (0..ctes.len())
        .map(|i| {
            let (rank, _) = CLASSES[i / kinds.len()];
            format!("SELECT * FROM c{rank}_{}", 5 + i % kinds.len())
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    format!(
        "WITH {},
              picked AS (SELECT id FROM ({all}) AS due ORDER BY rank, next_attempt_at LIMIT $2)
         UPDATE store_keys AS k SET next_attempt_at = $3, lease_until = {DB_NOW} + $4, {}
         FROM picked WHERE k.id = picked.id
         RETURNING {CLAIMED}",
        ctes.join(", "),
        mark_unanswered!("$1")
    )
}

/// When the earliest active key of `kinds` is next due: one index lookup per kind and class.
pub(super) async fn next_due(pool: &PgPool, kinds: &[Kind]) -> Result<Option<i64>> {
    let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
    let per_class = CLASSES
        .iter()
        .map(|(_, class)| {
            format!(
                "SELECT MIN(next_attempt_at) AS d FROM store_keys
                 WHERE state = 'active' AND {class} AND kind = want.kind"
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let sql =
        format!("SELECT MIN(d) FROM unnest($1::text[]) AS want(kind), LATERAL ({per_class}) AS m");
    let (due,): (Option<i64>,) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(kinds)
        .fetch_one(pool)
        .await?;
    Ok(due)
}
