//! What processes sharing one database must not do to each other: hand back a claim another
//! took since, send a renew call past their claim's lease, or clear an alarm that is not theirs
//! to clear.

use std::time::Duration;

use storekeyd::policy::claims::Kind;
use storekeyd::storage::{self, AlarmName, ClearScope, Storage};

use crate::backend::on_backend;
use crate::harness::{Db, TestEnv};

async fn open(env: &TestEnv) -> std::sync::Arc<dyn Storage> {
    storage::connect(&env.config.database_url(), &env.config.db_options())
        .await
        .unwrap()
}

/// Every row checked, as ingest would have: active, due since 0, valid for a day; renewed by
/// the Store before if `proven`.
async fn activate_all(env: &TestEnv, proven: bool) {
    let expires = env.clock.now() + 86_400;
    on_backend!(
        env.db,
        "UPDATE store_keys SET state = 'active', next_attempt_at = 0, client_id = 'app',
             user_id = 'u', issued_at = 0, expires_at = ?,
             last_renewed_at = CASE WHEN ? THEN 1 END",
        |pool, sql| sqlx::query(sql)
            .bind(expires)
            .bind(proven)
            .execute(pool)
            .await
            .unwrap()
            .rows_affected()
    );
}

/// Process A's claim runs out, B claims the row, then A shuts down and hands back what it
/// claimed: B's claim must stand, or a third process would renew the key B is renewing.
async fn a_handed_back_claim_leaves_a_later_claim_of_the_row_alone(db: Db) {
    let env = TestEnv::on(db).await;
    env.add_due_users(1).await;
    activate_all(&env, false).await;
    let store = open(&env).await;
    let now = env.clock.now();
    // A one-second lease, on the database's clock where it has one.
    let a = store.claim_due(now, now + 1, 10, &Kind::ALL).await.unwrap();
    assert_eq!(a.len(), 1);
    let b = claim_when_lapsed(&env, &*store).await;
    assert_eq!(b.id, a[0].id);
    let held = env.rows().await[0].clone();
    assert_eq!(held.next_attempt_at, Some(b.lease_until));

    store
        .release(&[a[0].claim()], env.clock.now())
        .await
        .unwrap();
    let row = env.rows().await[0].clone();
    assert_eq!(
        (row.next_attempt_at, row.lease_until),
        (held.next_attempt_at, held.lease_until),
        "A's hand-back freed the row B holds"
    );

    // B's own hand-back does free it.
    let now = env.clock.now();
    store.release(&[b.claim()], now).await.unwrap();
    let row = env.rows().await[0].clone();
    assert_eq!((row.next_attempt_at, row.lease_until), (Some(now), None));
    store.close().await;
}

/// Claims the row as another process would, once the lease on it runs out.
async fn claim_when_lapsed(env: &TestEnv, store: &dyn Storage) -> storage::ClaimedRow {
    for _ in 0..200 {
        let now = env.clock.now() + 100;
        let claimed = store
            .claim_due(now, now + 600, 10, &Kind::ALL)
            .await
            .unwrap();
        if let Some(row) = claimed.into_iter().next() {
            return row;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the one-second lease never ran out");
}

/// Alarms are shared: one process's clear must not delete what another still sees.
async fn an_alarm_is_cleared_only_by_whom_and_on_what_may_clear_it(db: Db) {
    let env = TestEnv::on(db).await;
    let store = open(&env).await;
    let names = |store: std::sync::Arc<dyn Storage>| async move {
        let mut names: Vec<String> = store
            .alarms()
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.name.to_string())
            .collect();
        names.sort();
        names
    };

    // A credential alarm raised at 1000 and again (by another replica) at 2000.
    store
        .set_alarm(&AlarmName::parse("credential:app"), "refused", 1000, "a")
        .await
        .unwrap();
    store
        .set_alarm(&AlarmName::parse("credential:app"), "refused", 2000, "b")
        .await
        .unwrap();
    // A renewal begun at 1500.5 s says nothing of the raise at 2000.
    store
        .clear_alarm(
            &AlarmName::parse("credential:app"),
            ClearScope::RaisedBefore(1_500_500),
        )
        .await
        .unwrap();
    // Nor does one begun within the second of the raise.
    store
        .clear_alarm(
            &AlarmName::parse("credential:app"),
            ClearScope::RaisedBefore(2_000_999),
        )
        .await
        .unwrap();
    assert_eq!(names(store.clone()).await, ["credential:app"]);
    store
        .clear_alarm(
            &AlarmName::parse("credential:app"),
            ClearScope::RaisedBefore(2_001_000),
        )
        .await
        .unwrap();
    assert!(names(store.clone()).await.is_empty());

    // A clock alarm last raised by b is not a's to clear.
    store
        .set_alarm(&AlarmName::parse("clock"), "off", 10, "b")
        .await
        .unwrap();
    store
        .clear_alarm(&AlarmName::parse("clock"), ClearScope::OwnedBy("a"))
        .await
        .unwrap();
    assert_eq!(names(store.clone()).await, ["clock"]);
    store
        .clear_alarm(&AlarmName::parse("clock"), ClearScope::OwnedBy("b"))
        .await
        .unwrap();
    store
        .set_alarm(&AlarmName::parse("breaker:purchase"), "down", 10, "b")
        .await
        .unwrap();
    store
        .clear_alarm(&AlarmName::parse("breaker:purchase"), ClearScope::Anyone)
        .await
        .unwrap();
    assert!(names(store.clone()).await.is_empty());
    store.close().await;
}

/// Fourteen claimed keys and a rate limit of one call a second, with a ten-second lease. Past
/// the lease another process may claim a key (here the test holds every lapsed claim, as such
/// a process would), so no call may go out after it: the daemon sends the first few and leaves
/// the rest unsent. (Request timeouts of 2 s: a call timing out on a loaded machine would be
/// retried after the lease, outside what this test looks at.)
async fn no_renew_call_goes_out_after_its_claims_lease(db: Db) {
    let mut env = TestEnv::on(db).await;
    env.config.renew.concurrency = 14;
    env.config.renew.rate_limit = 1.0;
    env.config.http.request_timeout = Duration::from_secs(2);
    env.config.renew.lease = Duration::from_secs(10);
    env.config.renew.poll_interval = Duration::from_secs(3600);
    let users = env.add_due_users(14).await;
    env.spawn_daemon().await;

    // The first call goes out as soon as the claim is made; the claim took every key.
    env.wait_until("the first renew call", || async {
        env.emu.stats().renewed > 0
    })
    .await;
    // Another process holds each claim of this first look from the moment it lapses: the
    // daemon cannot claim those keys again, so every call for them comes from this claim.
    let far = env.clock.now() + 3600;
    let held: Vec<(String,)> = on_backend!(
        env.db,
        "UPDATE store_keys SET lease_until = ?, next_attempt_at = ? WHERE lease_until IS NOT NULL
         RETURNING user_ref",
        |pool, sql| sqlx::query_as(sql)
            .bind(far)
            .bind(far)
            .fetch_all(pool)
            .await
            .unwrap()
    );
    let first = (0..users.len())
        .filter_map(|i| env.emu.renewed_at(Kind::Collections, &users[i]))
        .min()
        .expect("a call went out");
    // Without the checks, the queue's calls for the held keys went out up to 14 s after the
    // first: a second past the lease shows it.
    env.wait_until("the lease over and a second more", || async {
        env.clock.now_ms() > first + 11_000
    })
    .await;
    env.stop_daemon().await;

    let sent: Vec<i64> = held
        .iter()
        .filter_map(|(u,)| env.emu.renewed_at(Kind::Collections, u))
        .collect();
    let last = sent.iter().copied().max().unwrap_or(first);
    assert!(
        last < first + 10_000,
        "a call went out {} ms after the first, past the 10 s lease",
        last - first
    );
    assert!(
        sent.len() < held.len() || held.len() < users.len(),
        "every key of the claim was sent though the rate limit could not serve them in the lease"
    );
}

/// A claim that takes over a lease which ran out with no result marks the key: the process
/// that held it may have renewed it (paused or killed with the answer). A hand-back leaves no
/// mark; a marked key is never a canary (its refusal would prove nothing of the credential).
async fn a_lapsed_lease_marks_its_key_and_a_hand_back_does_not(db: Db) {
    let env = TestEnv::on(db).await;
    env.add_due_users(2).await;
    activate_all(&env, true).await;
    let store = open(&env).await;
    let now = env.clock.now();
    let first = store.claim_due(now, now + 1, 10, &Kind::ALL).await.unwrap();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|r| r.unanswered_at.is_none()));
    // One is handed back; the other's lease is left to run out.
    let (back, left) = (first[0].clone(), first[1].clone());
    store.release(&[back.claim()], now).await.unwrap();
    // Both claimed again (the lease on the database's clock, where it has one, ran out).
    let mut seen: Vec<storage::ClaimedRow> = Vec::new();
    for _ in 0..200 {
        let later = env.clock.now() + 100;
        seen.extend(
            store
                .claim_due(later, later + 600, 10, &Kind::ALL)
                .await
                .unwrap(),
        );
        if seen.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mark = |id| seen.iter().find(|r| r.id == id).unwrap().unanswered_at;
    assert_eq!(mark(back.id), None, "a hand-back marked its key");
    assert!(mark(left.id).is_some(), "a lapsed lease left no mark");
    store
        .release(&seen.iter().map(|r| r.claim()).collect::<Vec<_>>(), now)
        .await
        .unwrap();

    // Only the unmarked key is a canary.
    let now = env.clock.now();
    let canary = store
        .claim_canary("app", now, now, now + 600)
        .await
        .unwrap();
    assert_eq!(canary.map(|r| r.id), Some(back.id));
    // The only healthy key is held now; the marked one is not asked.
    let again = store.claim_canary("app", now, now, now + 600).await;
    assert!(
        matches!(again, Ok(None) | Err(storekeyd::storage::DbError::Held)),
        "{:?}",
        again.map(|r| r.map(|r| r.id))
    );
    store.close().await;
}

crate::backend::on_both_databases!(
    a_handed_back_claim_leaves_a_later_claim_of_the_row_alone,
    a_lapsed_lease_marks_its_key_and_a_hand_back_does_not,
    an_alarm_is_cleared_only_by_whom_and_on_what_may_clear_it,
    no_renew_call_goes_out_after_its_claims_lease,
);
