//! Errors of any database storekeyd runs on.

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: cannot open `{url}`: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error(
        "database: `{path}` is not writable ({cause}); storekeyd writes the file and creates `-wal` and `-shm` files beside it"
    )]
    NotWritable { path: String, cause: std::io::Error },
    #[error("database: cannot create `{path}` with mode 0600: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("database_password_file `{}`: {why}", .path.display())]
    PasswordFile {
        path: std::path::PathBuf,
        why: String,
    },
    #[error("database: migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: {0}")]
    Query(#[from] sqlx::Error),
    #[error("database: schema version is {}, this storekeyd expects {}; run `storekeyd migrate`", version(*.found), version(*.expected))]
    Schema {
        found: Option<i64>,
        expected: Option<i64>,
    },
    #[error(
        "database: `{url}` is not a database URL storekeyd knows; use sqlite://PATH or postgres://USER@HOST/DATABASE"
    )]
    Scheme { url: String },
    #[error("database: no answer within {}; is the server reachable?", humantime::format_duration(*.0))]
    Timeout(std::time::Duration),
    /// Keys to claim exist, but an attempt (of this process or another) holds each of them now.
    #[error("database: every candidate row is held by an attempt")]
    Held,
}

impl DbError {
    /// Another connection holds the lock (a backend's long transaction): worth waiting for.
    pub fn is_busy(&self) -> bool {
        match self {
            DbError::Query(sqlx::Error::Database(e))
                if e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some() =>
            {
                // lock_not_available (lock_timeout), serialization failure, deadlock.
                matches!(e.code().as_deref(), Some("55P03" | "40001" | "40P01"))
            }
            DbError::Query(sqlx::Error::Database(e)) => e
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .is_some_and(|c| matches!(c & 0xff, 5 | 6)),
            DbError::Query(sqlx::Error::PoolTimedOut) => true,
            _ => false,
        }
    }
}

fn version(v: Option<i64>) -> String {
    v.map_or_else(|| "none (empty database)".to_owned(), |v| v.to_string())
}
