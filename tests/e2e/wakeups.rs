//! New keys announced by PostgreSQL (`NOTIFY`): checked at once, not at the poll, whatever
//! the look for new keys under way finds or however it fails.

use std::time::Duration;
use storekeyd::policy::state::State;

use storekeyd::policy::claims::Kind;

use crate::harness::{Db, TestEnv};

/// A key a backend writes is checked at once: the trigger's `NOTIFY` wakes the loop, which
/// would otherwise look only at its next poll, an hour away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_is_checked_long_before_the_next_poll() {
    let (mut env, _) = idle_with_an_hourly_poll().await;
    env.add_user("bob").await;
    checked(&env, "bob", "bob checked, woken by the database").await;
    env.stop_daemon().await;
}

/// A daemon on PostgreSQL, idle once it has checked alice: nothing is due for days and the
/// next poll is an hour away. Returns it and a pool on its database.
async fn idle_with_an_hourly_poll() -> (TestEnv, sqlx::PgPool) {
    use storekeyd::storage::contract::BackendPool;

    let mut env = TestEnv::on(Db::Postgres).await;
    env.config.renew.poll_interval = Duration::from_secs(3600);
    env.add_user("alice").await;
    env.spawn_daemon().await;
    checked(&env, "alice", "alice checked").await;
    let BackendPool::Postgres(admin) = env.db.any() else {
        unreachable!("a PostgreSQL env")
    };
    let admin = admin.clone();
    (env, admin)
}

/// Waits until `user`'s key is active.
async fn checked(env: &TestEnv, user: &str, what: &str) {
    env.wait_until(what, || async {
        env.row(user, Kind::Collections).await.state == State::Active
    })
    .await;
}

/// Installs a trigger, `name`, that runs `body` (PL/pgSQL) in the statement of each look for
/// new keys (the one that takes pending rows; other statements pass). A statement-level
/// trigger fires even when the statement finds no row, and after its snapshot is taken.
async fn in_every_look(admin: &sqlx::PgPool, name: &str, body: &str) {
    for sql in [
        format!(
            "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF current_query() LIKE '%state = ''pending'' AND (lease_until IS NULL%' THEN
                     {body}
                 END IF;
                 RETURN NULL;
             END $$"
        ),
        format!(
            "CREATE TRIGGER {name} BEFORE UPDATE ON store_keys
             FOR EACH STATEMENT EXECUTE FUNCTION {name}()"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(admin)
            .await
            .unwrap();
    }
}

/// A key announced while a look for new keys runs, a look that then finds nothing (the key
/// came after its snapshot), is checked at once: that look's end makes the pass that looks
/// again. (It once made none, and the key waited for the poll, an hour here.) A trigger the test
/// installs holds the look's statement, after its snapshot, on an advisory lock the test owns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_announced_during_a_look_that_finds_nothing_is_checked_at_once() {
    use sqlx::Connection as _;

    let (mut env, admin) = idle_with_an_hourly_poll().await;
    in_every_look(
        &admin,
        "test_hold_looks",
        "PERFORM pg_advisory_xact_lock(4242);",
    )
    .await;
    let mut holder = sqlx::PgConnection::connect(&env.config.database_url())
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_lock(4242)")
        .execute(&mut holder)
        .await
        .unwrap();
    // A signal with no new key: the daemon looks, and its look waits on the lock.
    sqlx::query("SELECT pg_notify('storekeyd_keys', '')")
        .execute(&admin)
        .await
        .unwrap();
    env.wait_until("a look held on the lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        waiting > 0
    })
    .await;
    env.add_user("bob").await;
    // The listener hands the signal to the loop within microseconds; this pause only makes
    // sure it has before the look ends. Too short a pause could let the test miss the bug,
    // never fail with the fix.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query("SELECT pg_advisory_unlock(4242)")
        .execute(&mut holder)
        .await
        .unwrap();
    checked(&env, "bob", "bob checked, not left for the poll").await;
    env.stop_daemon().await;
}

/// A look for new keys that fails is tried again after a short backoff, not at the next poll
/// (an hour here), even when a signal comes during the backoff: a trigger the test installs
/// makes the look's statement fail while a flag row exists, and counts the looks in a sequence
/// (which a failure does not roll back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_look_for_new_keys_is_tried_again_soon() {
    let (mut env, admin) = idle_with_an_hourly_poll().await;
    for sql in [
        "CREATE SEQUENCE test_looks",
        "CREATE TABLE test_fail_looks (x int)",
        "INSERT INTO test_fail_looks VALUES (1)",
    ] {
        sqlx::query(sql).execute(&admin).await.unwrap();
    }
    in_every_look(
        &admin,
        "test_fail_looks",
        "PERFORM nextval('test_looks');
         IF EXISTS (SELECT 1 FROM test_fail_looks) THEN
             RAISE EXCEPTION 'a look made to fail by the test';
         END IF;",
    )
    .await;
    env.add_user("bob").await;
    env.wait_until("a look for bob failed", || async {
        let (looks, called): (i64, bool) =
            sqlx::query_as("SELECT last_value, is_called FROM test_looks")
                .fetch_one(&admin)
                .await
                .unwrap();
        called && looks >= 1
    })
    .await;
    env.wait_until("the loop told of the failure", || async {
        env.get("/readyz").await.1.contains("fail  database")
    })
    .await;
    // A signal within the backoff makes a pass, which must not cancel the retry.
    sqlx::query("SELECT pg_notify('storekeyd_keys', '')")
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("DELETE FROM test_fail_looks")
        .execute(&admin)
        .await
        .unwrap();
    checked(
        &env,
        "bob",
        "bob checked after the failure, not at the poll",
    )
    .await;
    env.stop_daemon().await;
}
