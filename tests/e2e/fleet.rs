//! PostgreSQL as studios run it: several replicas on one database, and a server that restarts
//! or cuts connections under them. (New keys announced by the database: `wakeups`.)

use std::collections::HashMap;
use std::time::{Duration, Instant};
use storekeyd::policy::state::State;

use storekeyd::emulator::Faults;
use storekeyd::policy::claims::Kind;
use tokio::process::Child;

use crate::harness::{Db, TestEnv, full, on_backend, sigterm, spawn_process};
use crate::pgserver::PgServer;

/// What the emulator's renewal log and the rows say of a drain: users renewed more than once,
/// never, and rows that do not hold the newest key the Store issued for their user.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub twice: usize,
    pub missed: usize,
    pub lost: usize,
}

pub(crate) async fn tally(env: &TestEnv, users: &[String]) -> Tally {
    let rows: Vec<(String, Vec<u8>)> = on_backend!(
        env.db,
        "SELECT user_ref, CAST(key AS BLOB) FROM store_keys",
        |pool, sql| sqlx::query_as(sql).fetch_all(pool).await.unwrap()
    );
    let keys: HashMap<String, String> = rows
        .into_iter()
        .map(|(u, k)| (u, String::from_utf8_lossy(&k).into_owned()))
        .collect();
    let mut t = Tally::default();
    for user in users {
        match env.emu.renewals_of(Kind::Collections, user) {
            0 => t.missed += 1,
            1 => {}
            _ => t.twice += 1,
        }
        if env.emu.latest_key(Kind::Collections, user) != keys.get(user).cloned() {
            t.lost += 1;
        }
    }
    t
}

/// Starts `n` replicas of the daemon on this env's config, each its own process.
fn replicas(env: &TestEnv, n: usize) -> Vec<Child> {
    let config = env.write_config();
    (0..n).map(|_| spawn_process(&config)).collect()
}

async fn stop_all(replicas: Vec<Child>) {
    for r in &replicas {
        if r.id().is_some() {
            sigterm(r);
        }
    }
    for mut r in replicas {
        tokio::time::timeout(Duration::from_secs(60), r.wait())
            .await
            .expect("a replica did not stop")
            .unwrap();
    }
}

/// A backlog drain configuration: calls that take `latency_ms`, a rate limit that never binds
/// (split three ways), leases of `lease` (over four request timeouts, or no attempt starts).
fn drain_config(env: &mut TestEnv, latency_ms: u64, lease: Duration) {
    env.config.renew.concurrency = 16;
    env.config.renew.rate_limit = 3000.0;
    env.config.renew.lease = lease;
    env.config.http.request_timeout = Duration::from_secs(1);
    env.patience = Duration::from_secs(if full() { 900 } else { 300 });
    env.set_faults(Faults {
        latency_ms,
        ..Faults::default()
    });
}

/// Three replicas drain one backlog: every key renewed exactly once (the emulator's log counts
/// renewals per user: a key two replicas both claimed would count twice), none missed, every
/// row holding the newest key. The Store keeps renewed keys valid here, so a double claim
/// would show as a second renewal rather than as a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_drain_a_backlog_renewing_each_key_exactly_once() {
    let n = if full() { 10_000 } else { 2_000 };
    let mut env = TestEnv::on(Db::Postgres).await;
    drain_config(&mut env, 10, Duration::from_secs(30));
    let users = env.add_due_users(n).await;
    let start = Instant::now();
    let fleet = replicas(&env, 3);
    env.wait_until("every key renewed", || async { env.unrenewed().await == 0 })
        .await;
    let took = start.elapsed();
    stop_all(fleet).await;
    let t = tally(&env, &users).await;
    eprintln!(
        "fleet drain: {n} keys, 3 replicas, {} renewed twice, {} missed, {} lost, {:.0} renewals/s",
        t.twice,
        t.missed,
        t.lost,
        n as f64 / took.as_secs_f64()
    );
    assert_eq!(t, Tally::default());
}

/// One of three replicas is killed (SIGKILL) mid-drain: the keys it had claimed stay leased
/// until their leases end on the database's clock, then the others claim and renew them.
/// Nothing is missed or lost; only answers the killed replica had received and not yet
/// committed are renewed a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_keys_are_renewed_by_the_others_once_its_leases_end() {
    let n = if full() { 5_000 } else { 1_000 };
    let lease = Duration::from_secs(5);
    let mut env = TestEnv::on(Db::Postgres).await;
    drain_config(&mut env, 200, lease);
    let users = env.add_due_users(n).await;
    let mut fleet = replicas(&env, 3);
    env.wait_until("a third renewed", || async {
        env.unrenewed().await <= (n as i64) * 2 / 3
    })
    .await;
    let mut victim = fleet.remove(0);
    victim.start_kill().unwrap();
    victim.wait().await.unwrap();
    let killed = Instant::now();
    // The claims held at the moment of the kill: the victim's, and the live replicas' (those
    // finish at once).
    let held: Vec<(i64,)> = on_backend!(
        env.db,
        "SELECT id FROM store_keys WHERE renewals = 0 AND lease_until IS NOT NULL",
        |pool, sql| sqlx::query_as(sql).fetch_all(pool).await.unwrap()
    );
    assert!(!held.is_empty(), "nothing was claimed at the kill");
    let ids: Vec<String> = held.iter().map(|(id,)| id.to_string()).collect();
    let pending_held = format!(
        "SELECT COUNT(*) FROM store_keys WHERE renewals = 0 AND id IN ({})",
        ids.join(",")
    );
    env.wait_until("every claim held at the kill renewed", || async {
        let (left,): (i64,) = on_backend!(env.db, pending_held.clone(), |pool, sql| {
            sqlx::query_as(sql).fetch_one(pool).await.unwrap()
        });
        left == 0
    })
    .await;
    let recovered = killed.elapsed();
    env.wait_until("every key renewed", || async { env.unrenewed().await == 0 })
        .await;
    stop_all(fleet).await;
    let t = tally(&env, &users).await;
    eprintln!(
        "fleet kill: {n} keys, 3 replicas, one SIGKILLed with {} claims held fleet-wide; its claims renewed by the others {:.1} s after the kill (lease {} s); {} renewed twice (answers it had not committed), {} missed, {} lost",
        held.len(),
        recovered.as_secs_f64(),
        lease.as_secs(),
        t.twice,
        t.missed,
        t.lost
    );
    assert_eq!((t.missed, t.lost), (0, 0));
    // At most what the victim had in flight and in its writer's batch.
    let concurrency = env.config.renew.concurrency;
    assert!(t.twice <= 2 * concurrency, "{t:?}");
}

/// Whether the in-process daemon reports itself ready.
async fn ready(env: &TestEnv) -> bool {
    reqwest::get(format!("http://{}/readyz", env.metrics_addr.unwrap()))
        .await
        .is_ok_and(|r| r.status() == 200)
}

/// The server stops mid-drain (as `systemctl stop postgresql` does) and stays down (10 s; a
/// minute with STOREKEYD_FULL=1): every replica keeps running and reports not-ready, then
/// reconnects and finishes the drain. Leases outlive the outage, so no key is renewed twice;
/// none is missed or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_down_mid_drain_loses_nothing_and_the_fleet_catches_up() {
    let outage = Duration::from_secs(if full() { 60 } else { 10 });
    let n = if full() { 3_000 } else { 600 };
    let server = PgServer::start_new();
    let mut env = TestEnv::on_server(&server.admin_url()).await;
    drain_config(&mut env, 50, outage * 3);
    env.config.renew.concurrency = 8;
    let users = env.add_due_users(n).await;
    env.spawn_daemon().await;
    let mut others = replicas(&env, 2);
    env.wait_until("a quarter renewed", || async {
        env.unrenewed().await <= (n as i64) * 3 / 4
    })
    .await;
    server.stop();
    env.wait_until("not ready while the server is down", || async {
        !ready(&env).await
    })
    .await;
    tokio::time::sleep(outage).await;
    for r in &mut others {
        assert!(r.try_wait().unwrap().is_none(), "a replica exited");
    }
    // The test's own pool checks its connections before use, like the daemon's.
    server.start();
    env.wait_until("every key renewed", || async { env.unrenewed().await == 0 })
        .await;
    env.wait_until("ready again", || async { ready(&env).await })
        .await;
    env.stop_daemon().await;
    stop_all(others).await;
    let t = tally(&env, &users).await;
    eprintln!(
        "fleet server down: {n} keys, 3 replicas, server down {} s mid-drain: {} renewed twice, {} missed, {} lost",
        outage.as_secs(),
        t.twice,
        t.missed,
        t.lost
    );
    assert_eq!(t, Tally::default());
}

/// Every connection to the database is cut twice mid-drain (`pg_terminate_backend`, as a
/// failover or an operator does): the replicas reconnect, nothing is missed, lost or renewed
/// twice, and the listener is back (a key written afterwards is checked long before the
/// hour-long poll).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_drain_are_reopened_and_lose_nothing() {
    let n = 600;
    let mut env = TestEnv::on(Db::Postgres).await;
    drain_config(&mut env, 50, Duration::from_secs(60));
    env.config.renew.concurrency = 8;
    env.config.renew.poll_interval = Duration::from_secs(3600);
    let users = env.add_due_users(n).await;
    let fleet = replicas(&env, 3);
    for left in [n as i64 * 2 / 3, n as i64 / 3] {
        env.wait_until("the drain moved on", || async {
            env.unrenewed().await <= left
        })
        .await;
        let cut = env.db.database().unwrap().terminate_connections().await;
        assert!(cut > 0);
    }
    env.wait_until("every key renewed", || async { env.unrenewed().await == 0 })
        .await;
    env.add_user("late").await;
    env.wait_until("a key written after the cuts checked", || async {
        env.row("late", Kind::Collections).await.state == State::Active
    })
    .await;
    stop_all(fleet).await;
    let t = tally(&env, &users).await;
    assert_eq!(t, Tally::default());
}

/// A backend on another host with the role the README prescribes (`SELECT, INSERT, UPDATE` on
/// `store_keys`, nothing else) runs both contract statements, including an upsert of a key the
/// row was renewed past, which the lineage trigger (run as the schema's owner) refuses and logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_role_with_the_documented_grants_runs_the_contract() {
    use sqlx::Connection as _;
    use storekeyd::storage::contract::{BackendPool, PG_UPSERT_KEY};
    let env = TestEnv::on(Db::Postgres).await;
    let role = format!("storekeyd_test_backend_{}", fastrand::u32(..));
    let BackendPool::Postgres(admin) = env.db.any() else {
        unreachable!("a PostgreSQL env")
    };
    for sql in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT SELECT, INSERT, UPDATE ON store_keys TO {role}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(admin)
            .await
            .unwrap();
    }
    let url = env
        .config
        .database_url()
        .replacen("postgres@", &format!("{role}@"), 1);
    let mut backend = sqlx::PgConnection::connect(&url).await.unwrap();
    let old = env.mint(Kind::Collections, crate::harness::APP, "alice");
    let upsert = |key: String| {
        sqlx::query(PG_UPSERT_KEY)
            .bind("alice")
            .bind("collections")
            .bind(key)
    };
    upsert(old.clone()).execute(&mut backend).await.unwrap();
    // As if storekeyd had renewed `old`: the row holds its successor, the lineage knows it.
    let new = env.mint(Kind::Collections, crate::harness::APP, "alice");
    sqlx::query("UPDATE store_keys SET key = $1, state = 'active'")
        .bind(&new)
        .execute(admin)
        .await
        .unwrap();
    sqlx::query("INSERT INTO store_key_lineage (key_id, tail, retired_at) SELECT id, right($1, 22), 0 FROM store_keys")
        .bind(&old)
        .execute(admin)
        .await
        .unwrap();
    let replayed = upsert(old).execute(&mut backend).await;
    backend.close().await.unwrap();
    let cleanup = format!("DROP OWNED BY {role}");
    sqlx::query(sqlx::AssertSqlSafe(cleanup))
        .execute(admin)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {role}")))
        .execute(admin)
        .await
        .unwrap();
    replayed.expect("the backend's upsert of a retired key");
    let row = env.row("alice", Kind::Collections).await;
    assert_eq!(
        (row.key.as_str(), row.state.as_str()),
        (new.as_str(), "active")
    );
    let kept = env.outcomes(row.id).await;
    assert!(
        kept.iter().any(|(o, _, _)| o == "stale_key_kept"),
        "{kept:?}"
    );
}
