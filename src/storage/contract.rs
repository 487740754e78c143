//! The backend contract: the SQL a backend issues, verbatim as README.md documents it (a test
//! keeps the two in step), for each database.

/// Adds or replaces a user's key. Parameters: user reference, kind (`collections` or
/// `purchase`), key. A new key over a flagged one makes it pending, then active once checked;
/// the same key again changes nothing (backends re-store keys on every login, and a renewal in
/// flight must not be disturbed by that). SQLite 3.24 or later (any SQLite since 2018).
pub const UPSERT_KEY: &str = "INSERT INTO store_keys (user_ref, kind, key) VALUES (?1, ?2, ?3)
ON CONFLICT (user_ref, kind) DO UPDATE
SET key = excluded.key, state = 'pending', reason = NULL,
    updated_at = CAST(strftime('%s', 'now') AS INTEGER)
WHERE store_keys.key IS NOT excluded.key;";

/// Reads a user's usable key, if there is one. Parameters: user reference, kind.
pub const READ_KEY: &str = "SELECT key FROM store_keys
WHERE user_ref = ?1 AND kind = ?2 AND state IN ('pending', 'active');";

/// [`UPSERT_KEY`] on PostgreSQL (9.5 or later).
pub const PG_UPSERT_KEY: &str = "INSERT INTO store_keys (user_ref, kind, key) VALUES ($1, $2, $3)
ON CONFLICT (user_ref, kind) DO UPDATE
SET key = excluded.key, state = 'pending', reason = NULL,
    updated_at = floor(extract(epoch FROM now()))::bigint
WHERE store_keys.key IS DISTINCT FROM excluded.key;";

/// [`READ_KEY`] on PostgreSQL.
pub const PG_READ_KEY: &str = "SELECT key FROM store_keys
WHERE user_ref = $1 AND kind = $2 AND state IN ('pending', 'active');";

/// What a backend's PostgreSQL role needs for [`PG_UPSERT_KEY`] and [`PG_READ_KEY`], and no
/// more: run by the schema's owner, with `game_backend` the backend's role. Every other column
/// (claims, schedule, lease) and every other table stays storekeyd's; a trigger refuses a
/// `state` other than `pending` from a role that may not write the lease.
pub const PG_BACKEND_GRANTS: &str = "GRANT SELECT (user_ref, kind, key, state),
      INSERT (user_ref, kind, key),
      UPDATE (key, state, reason, updated_at)
   ON store_keys TO game_backend;";

/// A connection to either database, as a backend holds one.
#[derive(Debug, Clone)]
pub enum BackendPool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// Stores a key the way a backend does: with the upsert, unchanged.
pub async fn upsert_key(
    pool: &BackendPool,
    user_ref: &str,
    kind: &str,
    key: &str,
) -> Result<(), sqlx::Error> {
    match pool {
        BackendPool::Sqlite(pool) => {
            sqlx::query(UPSERT_KEY)
                .bind(user_ref)
                .bind(kind)
                .bind(key)
                .execute(pool)
                .await?;
        }
        BackendPool::Postgres(pool) => {
            sqlx::query(PG_UPSERT_KEY)
                .bind(user_ref)
                .bind(kind)
                .bind(key)
                .execute(pool)
                .await?;
        }
    }
    Ok(())
}

/// Reads a key the way a backend does: with the read statement, unchanged.
pub async fn read_key(
    pool: &BackendPool,
    user_ref: &str,
    kind: &str,
) -> Result<Option<String>, sqlx::Error> {
    let row: Option<(String,)> = match pool {
        BackendPool::Sqlite(pool) => {
            sqlx::query_as(READ_KEY)
                .bind(user_ref)
                .bind(kind)
                .fetch_optional(pool)
                .await?
        }
        BackendPool::Postgres(pool) => {
            sqlx::query_as(PG_READ_KEY)
                .bind(user_ref)
                .bind(kind)
                .fetch_optional(pool)
                .await?
        }
    };
    Ok(row.map(|(k,)| k))
}
