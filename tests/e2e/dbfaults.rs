//! The database misbehaves: a backend holds the write lock, or writes start failing. The daemon
//! waits, says so, loses no result and recovers.

use std::time::{Duration, Instant};

use sqlx::Connection as _;
use storekeyd::emulator::Faults;

use crate::harness::{TestEnv, full};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_write_lock_delays_but_loses_no_renewal() {
    // The long version holds the lock for 30 s against the default 15 s busy timeout.
    let (hold, busy) = if full() { (30, 15) } else { (4, 1) };
    let mut env = TestEnv::new().await;
    env.config.database_busy_timeout = Duration::from_secs(busy);
    // Results are kept and retried for up to a lease (2 minutes by default).
    env.config.renew.lease = Duration::from_secs(120);
    let keys = 6;
    for i in 0..keys {
        env.add_due_user(&format!("user-{i}")).await;
    }
    env.set_faults(Faults {
        latency_ms: 700,
        ..Faults::default()
    });
    env.spawn_daemon().await;
    env.wait_until("renewals in flight", || async {
        env.emu.stats().renew_requests >= keys
    })
    .await;

    // A backend's long transaction: holds the write lock while the Store answers.
    let mut backend = sqlx::SqliteConnection::connect(&env.config.database_url())
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut backend)
        .await
        .unwrap();
    let locked = Instant::now();
    env.wait_until("the Store renewed every key", || async {
        env.emu.stats().renewed >= keys
    })
    .await;
    tokio::time::sleep(Duration::from_secs(hold).saturating_sub(locked.elapsed())).await;
    sqlx::query("COMMIT").execute(&mut backend).await.unwrap();

    env.wait_until("the results written after the lock", || async {
        env.rows().await.iter().all(|r| r.renewals == 1)
    })
    .await;
    eprintln!(
        "db lock: held {hold} s (busy timeout {busy} s); {keys} renewals written {:.1} s after the lock was taken, none lost",
        locked.elapsed().as_secs_f64()
    );
    assert_eq!(
        env.emu.stats().renewed,
        keys,
        "the Store renewed a key twice: a result was lost"
    );
    env.stop_daemon().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_writes_make_it_unready_without_corruption_and_it_recovers() {
    let mut env = TestEnv::new().await;
    env.add_due_user("alice").await;
    // Writes to the keys table fail the way a full or read-only database fails them. (Tests run
    // as root, who ignores file modes, and cannot mount a small file system here.)
    sqlx::query(
        "CREATE TRIGGER fail_writes BEFORE UPDATE ON store_keys
         BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
    )
    .execute(env.db.pool())
    .await
    .unwrap();
    env.spawn_daemon().await;
    env.wait_until("not ready", || async { env.get("/readyz").await.0 == 503 })
        .await;
    let (_, body) = env.get("/readyz").await;
    assert!(body.contains("fail  database"), "{body}");
    assert_eq!(
        env.get("/healthz").await.0,
        200,
        "the loop must keep running"
    );
    assert_eq!(
        env.row("alice", storekeyd::claims::Kind::Collections)
            .await
            .state,
        "pending"
    );

    sqlx::query("DROP TRIGGER fail_writes")
        .execute(env.db.pool())
        .await
        .unwrap();
    env.wait_until("recovered and renewed", || async {
        env.row("alice", storekeyd::claims::Kind::Collections)
            .await
            .renewals
            == 1
    })
    .await;
    env.wait_until("ready again", || async {
        env.get("/readyz").await.0 == 200
    })
    .await;
    env.stop_daemon().await;
    let (check,): (String,) = sqlx::query_as("PRAGMA integrity_check")
        .fetch_one(env.db.pool())
        .await
        .unwrap();
    assert_eq!(check, "ok");
}
