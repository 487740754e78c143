//! The backend's side of a test's database: SQLite in the test's temp dir, or a PostgreSQL
//! database of the test's own on the local server, dropped when the test ends.

use std::str::FromStr as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use storekeyd::storage::{self, contract::BackendPool};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Db {
    Sqlite,
    Postgres,
}

/// Runs each behaviour test body, an `async fn(Db)`, on both databases: `name` becomes the
/// tests `name::sqlite` and `name::postgres`.
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::backend::Db::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::backend::Db::Postgres).await
                }
            }
        )*
    };
}
pub(crate) use on_both_databases;

/// Runs one statement on the backend's pool, whichever database it is: `$sql` is bound to the
/// text with `?` placeholders numbered for PostgreSQL (see [`for_postgres`]).
macro_rules! on_backend {
    ($backend:expr, $text:expr, |$pool:ident, $sql:ident| $body:expr) => {
        match $backend.any() {
            storekeyd::storage::contract::BackendPool::Sqlite($pool) => {
                let $sql = sqlx::AssertSqlSafe(String::from($text));
                $body
            }
            storekeyd::storage::contract::BackendPool::Postgres($pool) => {
                let $sql = sqlx::AssertSqlSafe($crate::backend::for_postgres(&$text));
                $body
            }
        }
    };
}
pub(crate) use on_backend;

/// A statement written for SQLite, for PostgreSQL: `?` placeholders numbered `$1`, `$2` …, and
/// the key read as bytes.
pub(crate) fn for_postgres(sql: &str) -> String {
    let sql = sql.replace("CAST(key AS BLOB)", "convert_to(key, 'UTF8')");
    let (mut out, mut n, mut quoted) = (String::new(), 0, false);
    for c in sql.chars() {
        match c {
            '\'' => quoted = !quoted,
            '?' if !quoted => {
                n += 1;
                out.push_str(&format!("${n}"));
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// The server the PostgreSQL tests use (trust auth on every machine here); a test's databases
/// are created on it and dropped afterwards.
fn admin_url() -> String {
    std::env::var("STOREKEYD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of one test's own; dropped (its connections cut) when the test ends, passed or
/// failed.
pub(crate) struct PgDatabase {
    name: String,
    admin: String,
}

impl PgDatabase {
    /// On the local server.
    pub(crate) async fn create() -> PgDatabase {
        PgDatabase::create_on(&admin_url()).await
    }

    /// On the server `admin` (a URL to its `postgres` database) names.
    pub(crate) async fn create_on(admin_url: &str) -> PgDatabase {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "storekeyd_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        admin(admin_url, &format!("CREATE DATABASE {name}")).await;
        PgDatabase {
            name,
            admin: admin_url.to_owned(),
        }
    }

    pub(crate) fn url(&self) -> String {
        let base = self
            .admin
            .rsplit_once('/')
            .map_or(self.admin.as_str(), |(b, _)| b);
        format!("{base}/{}", self.name)
    }
    /// Cuts every connection to the database but the caller's, as `pg_terminate_backend` does
    /// when an operator or a failover ends sessions; returns how many.
    pub(crate) async fn terminate_connections(&self) -> i64 {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&self.admin).await.unwrap();
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        n
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let url = self.admin.clone();
        // Drop runs inside the test's runtime, which cannot block on itself.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(admin(&url, &sql)))
        })
        .join();
        if dropped.is_err() {
            eprintln!("could not drop the test database {}", self.name);
        }
    }
}

async fn admin(url: &str, sql: &str) {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} (start it?): {e}"));
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The backend's own connection to the database, opened as a game backend would open it, after
/// storekeyd created the schema.
pub(crate) struct Backend {
    pool: BackendPool,
    /// Dropped after the pool: the database goes last.
    _database: Option<PgDatabase>,
}

impl Backend {
    /// Creates the schema at `url` and connects to it.
    pub(crate) async fn open(url: &str, database: Option<PgDatabase>) -> Backend {
        storage::open(url, &storage::DbOptions::default())
            .await
            .unwrap()
            .close()
            .await;
        let pool = match storage::Backend::of(url) {
            Some(storage::Backend::Postgres) => BackendPool::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect(url)
                    .await
                    .unwrap(),
            ),
            _ => {
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                    .unwrap()
                    .busy_timeout(Duration::from_secs(15));
                BackendPool::Sqlite(
                    sqlx::sqlite::SqlitePoolOptions::new()
                        .max_connections(2)
                        .connect_with(options)
                        .await
                        .unwrap(),
                )
            }
        };
        Backend {
            pool,
            _database: database,
        }
    }

    /// The test's own PostgreSQL database, if it runs on one.
    pub(crate) fn database(&self) -> Option<&PgDatabase> {
        self._database.as_ref()
    }

    pub(crate) fn any(&self) -> &BackendPool {
        &self.pool
    }

    /// The SQLite pool, for the tests of what only SQLite does (file locks, blobs).
    pub(crate) fn pool(&self) -> &sqlx::SqlitePool {
        match &self.pool {
            BackendPool::Sqlite(pool) => pool,
            BackendPool::Postgres(_) => panic!("this test runs on SQLite only"),
        }
    }

    pub(crate) async fn close(&self) {
        match &self.pool {
            BackendPool::Sqlite(pool) => pool.close().await,
            BackendPool::Postgres(pool) => pool.close().await,
        }
    }
}
