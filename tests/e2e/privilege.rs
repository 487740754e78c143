//! What a backend's PostgreSQL role may do: the contract's two statements with the README's
//! grants, and nothing that reaches storekeyd's columns, its tables or its owner's rights.

use std::str::FromStr as _;

use sqlx::{Connection as _, PgConnection};
use storekeyd::storage::contract::{PG_BACKEND_GRANTS, PG_READ_KEY, PG_UPSERT_KEY};
use storekeyd::storage::{self, DbOptions};

use crate::backend::PgDatabase;

/// A login role of one test's own (roles are the whole server's): its grants, then itself, are
/// dropped when the test ends.
struct TestRole {
    name: String,
    admin: String,
}

impl TestRole {
    async fn create(admin: &str) -> TestRole {
        let name = format!(
            "storekeyd_test_backend_{}_{}",
            std::process::id(),
            fastrand::u32(..)
        );
        run(admin, &format!("CREATE ROLE {name} LOGIN")).await;
        TestRole {
            name,
            admin: admin.to_owned(),
        }
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let (url, sql) = (
            self.admin.clone(),
            format!("DROP OWNED BY {0}; DROP ROLE {0}", self.name),
        );
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(run(&url, &sql)))
        })
        .join();
    }
}

async fn run(url: &str, sql: &str) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn connect_as(url: &str, role: &str) -> PgConnection {
    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .unwrap()
        .username(role);
    PgConnection::connect_with(&options).await.unwrap()
}

async fn upsert(conn: &mut PgConnection, user: &str, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query(PG_UPSERT_KEY)
        .bind(user)
        .bind("collections")
        .bind(key)
        .execute(conn)
        .await
        .map(drop)
}

fn denied(result: Result<impl Sized, sqlx::Error>, what: &str) {
    let code = match result {
        Ok(_) => panic!("the backend's role could {what}"),
        Err(e) => e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned()),
    };
    assert_eq!(
        code.as_deref(),
        Some("42501"),
        "{what}: not a permission error"
    );
}

/// A database migrated by its owner (the superuser `postgres`, the worst case), a backend role
/// with the README's grants, and that role's connection. The role goes after the database's
/// grants, when the caller drops it.
async fn migrated_with_a_backend_role() -> (PgDatabase, TestRole, PgConnection) {
    let db = PgDatabase::create().await;
    let role = TestRole::create(&db.url()).await;
    storage::open(&db.url(), &DbOptions::default())
        .await
        .unwrap()
        .close()
        .await;
    run(
        &db.url(),
        &PG_BACKEND_GRANTS.replace("game_backend", &role.name),
    )
    .await;
    let backend = connect_as(&db.url(), &role.name).await;
    (db, role, backend)
}

/// The role that owns storekeyd's schema (here the superuser `postgres`, the worst case) and a
/// backend role with the README's grants. The backend's role puts a `store_key_lineage` and a
/// `store_key_events` of its own in its temporary schema, the second with a trigger that makes
/// it a superuser, and runs the upsert: the owner's trigger function, SECURITY DEFINER, looked
/// in `pg_temp` first and ran that trigger as the owner (the role was a superuser afterwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_role_cannot_run_code_as_the_schema_owner() {
    let (db, role, mut backend) = migrated_with_a_backend_role().await;
    upsert(
        &mut backend,
        "alice",
        "header.payload.first-signature-0123456789",
    )
    .await
    .unwrap();
    let planted = "header.payload.planted-signature-0123456789";
    let exploit = format!(
        "CREATE TEMP TABLE store_key_lineage (key_id BIGINT, tail TEXT, retired_at BIGINT);
         INSERT INTO store_key_lineage SELECT 1, right('{planted}', 22), 0;
         CREATE TEMP TABLE store_key_events (key_id BIGINT, at BIGINT, outcome TEXT,
                                             key_fp TEXT, detail TEXT);
         CREATE FUNCTION pg_temp.escalate() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN EXECUTE 'ALTER ROLE {} SUPERUSER'; RETURN NEW; END $$;
         CREATE TRIGGER escalate BEFORE INSERT ON pg_temp.store_key_events
         FOR EACH ROW EXECUTE FUNCTION pg_temp.escalate();",
        role.name
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(exploit))
        .execute(&mut backend)
        .await
        .unwrap();
    let _ = upsert(&mut backend, "alice", planted).await;

    let mut admin = PgConnection::connect(&db.url()).await.unwrap();
    let (superuser,): (bool,) = sqlx::query_as("SELECT rolsuper FROM pg_roles WHERE rolname = $1")
        .bind(&role.name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(!superuser, "the backend's role made itself a superuser");
    let (key,): (String,) = sqlx::query_as("SELECT key FROM store_keys WHERE user_ref = 'alice'")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(key, planted, "the planted lineage decided the upsert");

    // The owner's lineage still keeps a retired key out, for this role too.
    let retired = "header.payload.retired-signature-0123456789";
    sqlx::query("INSERT INTO store_key_lineage VALUES (1, right($1, 22), 0)")
        .bind(retired)
        .execute(&mut admin)
        .await
        .unwrap();
    upsert(&mut backend, "alice", retired).await.unwrap();
    let (key, kept): (String, i64) = sqlx::query_as(
        "SELECT key, (SELECT COUNT(*) FROM store_key_events WHERE outcome = 'stale_key_kept')
         FROM store_keys WHERE user_ref = 'alice'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!((key.as_str(), kept), (planted, 1));
    backend.close().await.unwrap();
}

/// The README's grants serve the contract's two statements and nothing else: no claim, lease or
/// schedule column, no `state` but `pending`, no other table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_role_has_the_contract_and_no_more() {
    let (db, _role, mut backend) = migrated_with_a_backend_role().await;
    upsert(&mut backend, "alice", "a.b.c").await.unwrap();
    upsert(&mut backend, "alice", "a.b.d").await.unwrap();
    let (key,): (String,) = sqlx::query_as(PG_READ_KEY)
        .bind("alice")
        .bind("collections")
        .fetch_one(&mut backend)
        .await
        .unwrap();
    assert_eq!(key, "a.b.d");
    // Asking for a recheck is the upsert's own write, and allowed.
    sqlx::query("UPDATE store_keys SET state = 'pending' WHERE user_ref = 'alice'")
        .execute(&mut backend)
        .await
        .unwrap();
    // Over an active row, a key goes in only to be checked again, as the upsert's does: never
    // under the old key's claims and standing.
    let mut admin = PgConnection::connect(&db.url()).await.unwrap();
    sqlx::query("UPDATE store_keys SET state = 'active' WHERE user_ref = 'alice'")
        .execute(&mut admin)
        .await
        .unwrap();
    denied(
        sqlx::query("UPDATE store_keys SET key = 'a.b.e' WHERE user_ref = 'alice'")
            .execute(&mut backend)
            .await,
        "write a key over an active row, keeping it active",
    );
    sqlx::query("UPDATE store_keys SET key = 'a.b.e', state = 'pending' WHERE user_ref = 'alice'")
        .execute(&mut backend)
        .await
        .unwrap();
    upsert(&mut backend, "alice", "a.b.f").await.unwrap();
    let (key, state): (String, String) =
        sqlx::query_as("SELECT key, state FROM store_keys WHERE user_ref = 'alice'")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!((key.as_str(), state.as_str()), ("a.b.f", "pending"));

    for (sql, what) in [
        (
            "UPDATE store_keys SET state = 'active'",
            "mark a key active",
        ),
        ("UPDATE store_keys SET state = 'revoked'", "flag a key"),
        ("UPDATE store_keys SET lease_until = 0", "set a lease"),
        (
            "UPDATE store_keys SET next_attempt_at = 0",
            "schedule a key",
        ),
        ("UPDATE store_keys SET client_id = 'x'", "write a claim"),
        ("UPDATE store_keys SET expires_at = 0", "write an expiry"),
        (
            "INSERT INTO store_keys (user_ref, kind, key, state) VALUES ('b', 'purchase', 'k', 'active')",
            "insert an active row",
        ),
        (
            "INSERT INTO store_keys (user_ref, kind, key, issued_at) VALUES ('b', 'purchase', 'k', 1)",
            "insert claims",
        ),
        ("SELECT tail FROM store_key_lineage", "read the lineage"),
        ("SELECT outcome FROM store_key_events", "read the events"),
        (
            "INSERT INTO storekeyd_alarms VALUES ('credential:x', 'x', 0, NULL)",
            "raise an alarm",
        ),
        ("DELETE FROM storekeyd_alarms", "clear the alarms"),
    ] {
        denied(
            sqlx::query(sql).execute(&mut backend).await,
            &format!("{what} ({sql})"),
        );
    }
    backend.close().await.unwrap();
}
