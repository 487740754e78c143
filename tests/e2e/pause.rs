//! A process frozen mid-call (SIGSTOP here; a VM paused or migrated, a suspended host, a
//! stalled container in production) while the Store's answers wait in its sockets. The Store
//! here retires a key once it has renewed it, as it may: an answer thrown away is a key lost,
//! and the old key's refusal afterwards is no revocation.

use std::time::Duration;
use storekeyd::policy::state::State;

use storekeyd::emulator::Faults;
use storekeyd::policy::claims::Kind;

use crate::fleet::{Tally, tally};
use crate::harness::{Db, TestEnv, metric, on_backend, sigterm, spawn_process};

fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("the child has exited").to_string();
    let status = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid} failed");
}

async fn stop(mut child: tokio::process::Child) {
    sigterm(&child);
    tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the daemon did not stop")
        .unwrap();
}

/// Flags and the decisions that would have flagged, from the events table: a flag the rows
/// no longer show (a renewal won over it) still counts.
async fn flags(env: &TestEnv) -> i64 {
    let (n,): (i64,) = on_backend!(
        env.db,
        "SELECT COUNT(*) FROM store_key_events WHERE outcome IN ('revoked', 'answer_lost', 'expired')",
        |pool, sql| sqlx::query_as(sql).fetch_one(pool).await.unwrap()
    );
    n
}

fn slow_store_that_retires_renewed_keys(env: &mut TestEnv, latency_ms: u64) {
    env.set_faults(Faults {
        latency_ms,
        retire_renewed_keys: true,
        ..Faults::default()
    });
}

/// One daemon, frozen once its calls are out, for three request timeouts after the Store
/// answered them all. On waking it reads the answers: every row holds the key the Store
/// issued, renewed once, and nothing is flagged. (Before, each call was recorded as timed out
/// on waking, the retired keys were retried, and the rows were flagged revoked.)
async fn a_daemon_frozen_with_answers_waiting_keeps_them(db: Db) {
    let mut env = TestEnv::on(db).await;
    slow_store_that_retires_renewed_keys(&mut env, 1000);
    let users = env.add_due_users(4).await;
    let daemon = spawn_process(&env.write_config());
    env.wait_until("the calls sent", || async {
        env.emu.stats().renew_requests >= 4
    })
    .await;
    signal(&daemon, "-STOP");
    env.wait_until("the Store answered", || async {
        env.emu.stats().renewed >= 4
    })
    .await;
    // The freeze itself: the deadline of every call passes meanwhile.
    tokio::time::sleep(env.config.http.request_timeout * 3).await;
    signal(&daemon, "-CONT");
    env.wait_until("every row holds the Store's newest key", || async {
        tally(&env, &users).await.lost == 0
    })
    .await;
    stop(daemon).await;
    assert_eq!(tally(&env, &users).await, Tally::default());
    assert_eq!(flags(&env).await, 0, "a key was flagged");
}

/// Replica A is frozen with its calls out, past its lease; replica B claims the same keys,
/// and the Store refuses them (it retired them when it renewed them for A). Meanwhile B
/// renews other keys of the application, so the guard has its evidence. B must not take the
/// refusals for revocations while A may still write its answers; A wakes once B has been
/// refused on every key, its renewals land (compare-and-swap on the key B never changed), and
/// nothing is ever flagged.
async fn a_replica_frozen_past_its_lease_loses_no_key_and_raises_no_flag(db: Db) {
    let mut env = TestEnv::on(db).await;
    let lease = Duration::from_secs(5);
    env.config.renew.lease = lease;
    env.config.http.request_timeout = Duration::from_secs(1);
    slow_store_that_retires_renewed_keys(&mut env, 500);
    let users = env.add_due_users(4).await;
    let config = env.write_config();
    let a = spawn_process(&config);
    env.wait_until("A's calls sent", || async {
        env.emu.stats().renew_requests >= 4
    })
    .await;
    signal(&a, "-STOP");
    env.wait_until("the Store answered A", || async {
        env.emu.stats().renewed >= 4
    })
    .await;
    let b = spawn_process(&config);
    for i in 0..3 {
        env.add_due_user(&format!("other-{i}")).await;
    }
    env.wait_until("B renewed the other keys", || async {
        env.emu.stats().renewed >= 7
    })
    .await;
    // A stays frozen past its lease, until B has claimed each of A's keys and been refused.
    let waiting = "SELECT COUNT(DISTINCT e.key_id) FROM store_key_events e
                   JOIN store_keys k ON k.id = e.key_id
                   WHERE k.user_ref LIKE 'user-%' AND e.detail LIKE 'refused after an unanswered attempt%'";
    env.wait_until("B refused all of A's keys and waits", || async {
        let (n,): (i64,) = on_backend!(env.db, waiting, |pool, sql| {
            sqlx::query_as(sql).fetch_one(pool).await.unwrap()
        });
        n == 4
    })
    .await;
    signal(&a, "-CONT");
    env.wait_until("every row holds the Store's newest key", || async {
        tally(&env, &users).await.lost == 0
    })
    .await;
    stop(a).await;
    stop(b).await;
    let t = tally(&env, &users).await;
    assert_eq!((t.missed, t.lost), (0, 0), "{t:?}");
    assert_eq!(flags(&env).await, 0, "a key was flagged");
    let refused = env.emu.stats().renew_by_status.get(&401).copied();
    eprintln!(
        "pause: A frozen {} s past its answers; B refused {refused:?} times, flagged nothing",
        lease.as_secs() + 4
    );
}

/// The Store renews alice's key, retires the old one, and its answer never arrives (the call
/// times out). The refusals of her old key that follow are no revocation until her answer has
/// had two leases to be written; then she is flagged `revoked`, with a reason that says the
/// answer was lost, counted apart from revocations. The other keys renew meanwhile, so the
/// guard has its evidence from the start.
async fn a_timeout_after_the_store_renewed_is_flagged_as_a_lost_answer(db: Db) {
    let mut env = TestEnv::on(db).await;
    env.config.http.request_timeout = Duration::from_secs(1);
    env.config.renew.lease = Duration::from_secs(5);
    env.add_due_users(3).await;
    env.add_due_user("alice").await;
    env.set_faults(Faults {
        retire_renewed_keys: true,
        lose_answers_for: vec!["alice".to_owned()],
        ..Faults::default()
    });
    env.spawn_daemon().await;
    env.run_until(Duration::from_secs(1), "alice flagged", || async {
        ![State::Pending, State::Active].contains(&env.row("alice", Kind::Collections).await.state)
    })
    .await;
    let alice = env.row("alice", Kind::Collections).await;
    let (_, text) = env.get("/metrics").await;
    env.stop_daemon().await;
    assert_eq!(alice.state, State::Revoked);
    let reason = alice.reason.unwrap_or_default();
    assert!(reason.contains("got no answer"), "{reason}");
    let outcomes = env.outcomes(alice.id).await;
    let at = |what: &str| {
        outcomes
            .iter()
            .find(|(o, _, _)| o == what)
            .map(|(_, at, _)| *at)
    };
    let (Some(unanswered), Some(lost)) = (at("unanswered"), at("answer_lost")) else {
        panic!("{outcomes:?}");
    };
    assert!(
        lost >= unanswered + 10,
        "flagged {}s after the lost answer, not two leases",
        lost - unanswered
    );
    assert_eq!(at("revoked"), None, "{outcomes:?}");
    assert_eq!(
        metric(&text, "storekeyd_renewals_total{outcome=\"answer_lost\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "storekeyd_renewals_total{outcome=\"revoked\"}"),
        Some(0.0)
    );
}

crate::backend::on_both_databases!(
    a_daemon_frozen_with_answers_waiting_keeps_them,
    a_replica_frozen_past_its_lease_loses_no_key_and_raises_no_flag,
    a_timeout_after_the_store_renewed_is_flagged_as_a_lost_answer,
);
