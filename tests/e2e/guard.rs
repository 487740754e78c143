//! The false-revocation guard end to end: a flag is raised only on evidence, whatever the
//! credential does, and the alarm tells the two apart. Each test asserts the exact number of keys
//! flagged.

use std::time::{Duration, Instant};
use storekeyd::policy::state::State;

use storekeyd::emulator::Faults;
use storekeyd::policy::claims::Kind;

use crate::harness::{APP, Db, Row, TestEnv, full};

fn tickets_refused() -> Faults {
    Faults {
        reject_tickets_for: vec![APP.to_owned()],
        ..Faults::default()
    }
}

fn named<'a>(rows: &'a [Row], env_rows: &'a [(String, i64)], prefix: &str) -> Vec<&'a Row> {
    let ids: Vec<i64> = env_rows
        .iter()
        .filter(|(user, _)| user.starts_with(prefix))
        .map(|(_, id)| *id)
        .collect();
    rows.iter().filter(|r| ids.contains(&r.id)).collect()
}

async fn users(env: &TestEnv) -> Vec<(String, i64)> {
    crate::harness::on_backend!(
        env.db,
        "SELECT user_ref, id FROM store_keys",
        |pool, sql| sqlx::query_as(sql).fetch_all(pool).await.unwrap()
    )
}

/// An application of `1 + early + late` keys (`revoked`: the first is genuinely revoked and comes
/// due with the early ones): the early keys renew, then the application's tickets are refused
/// (an Entra app removed from the Store product, say) and the late keys come due. Exactly the
/// revoked key is flagged, the alarm rises, and once the credential works again every late key
/// renews. Returns how long the genuine revocation took to flag.
async fn broken_credential_after(early: usize, late: usize, revoked: bool) -> Duration {
    let mut env = TestEnv::new().await;
    if revoked {
        let key = env.add_due_user("revoked").await;
        env.emu.revoke_key(&key);
    }
    for i in 0..early {
        env.add_due_user(&format!("early-{i}")).await;
    }
    let started = Instant::now();
    env.spawn_daemon().await;
    let flagged = usize::from(revoked);
    env.wait_until("the revoked key flagged and the others renewed", || async {
        let rows = env.rows().await;
        rows.iter().filter(|r| r.state == State::Revoked).count() == flagged
            && rows.iter().filter(|r| r.renewals >= 1).count() == early
    })
    .await;
    let took = started.elapsed();

    env.set_faults(tickets_refused());
    for i in 0..late {
        env.add_due_user(&format!("late-{i}")).await;
    }
    env.wait_until(
        "every late key refused twice and the alarm raised",
        || async {
            let (rows, names) = (env.rows().await, users(&env).await);
            let late_rows = named(&rows, &names, "late-");
            late_rows.len() == late
                && late_rows
                    .iter()
                    .all(|r| r.state == State::Active && r.attempts >= 2)
                && env.credential_alarm(APP).await == Some(1.0)
        },
    )
    .await;
    let not_active = env
        .rows()
        .await
        .iter()
        .filter(|r| r.state != State::Active)
        .count();
    assert_eq!(not_active, flagged, "a healthy key was flagged");

    // The credential works again: the alarm clears and every late key renews.
    env.set_faults(Faults::default());
    env.wait_until("the late keys renewed and the alarm cleared", || async {
        let (rows, names) = (env.rows().await, users(&env).await);
        named(&rows, &names, "late-")
            .iter()
            .all(|r| r.renewals >= 1)
            && env.credential_alarm(APP).await == Some(0.0)
    })
    .await;
    env.stop_daemon().await;
    assert_eq!(env.count(State::Revoked).await, flagged);
    assert_eq!(env.count(State::Active).await, early + late);
    eprintln!(
        "guard: {} keys, broken credential{}: {} flagged",
        flagged + early + late,
        if revoked {
            format!(
                " after a genuine revocation (flagged in {:.1} s)",
                took.as_secs_f64()
            )
        } else {
            String::new()
        },
        flagged
    );
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_genuine_revocation_a_broken_credential_flags_no_healthy_key() {
    // The case: 19 of 20 healthy keys were flagged. 200 keys in the long version.
    let n = if full() { 99 } else { 20 };
    broken_credential_after(n + 1, n, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_application_with_a_broken_credential_flags_only_its_revoked_key() {
    broken_credential_after(1, 2, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_application_with_a_broken_credential_flags_nothing() {
    // Renewals before the break, which must vouch for nothing after it.
    broken_credential_after(100, 100, false).await;
}

async fn a_small_application_with_a_broken_credential_loses_no_key_across_a_restart(db: Db) {
    let mut env = TestEnv::on(db).await;
    for i in 0..4 {
        env.add_due_user(&format!("user-{i}")).await;
    }
    env.set_faults(tickets_refused());
    env.spawn_daemon().await;
    env.wait_until("every key refused twice and the alarm raised", || async {
        let rows = env.rows().await;
        rows.iter().all(|r| r.attempts >= 2) && env.credential_alarm(APP).await == Some(1.0)
    })
    .await;
    // Hours of refusals, past guard.lone_key_after: still nothing flagged.
    let start = env.clock.now();
    env.run_until(
        Duration::from_secs(600),
        "eight hours of refusals",
        || async { env.clock.now() >= start + 8 * 3600 },
    )
    .await;
    env.stop_daemon().await;
    let flagged = env
        .rows()
        .await
        .iter()
        .filter(|r| r.state != State::Active)
        .count();
    assert_eq!(flagged, 0, "a key was flagged under a broken credential");

    // The alarm outlives the process: `status` shows it while no daemon runs, and the next
    // start takes it up.
    let out = env.cli(&["status"], "").await;
    assert!(
        out.stdout.contains(&format!("credential:{APP}")),
        "{}",
        out.stdout
    );
    env.spawn_daemon().await;
    env.wait_until("the alarm taken up at start", || async {
        env.credential_alarm(APP).await == Some(1.0)
    })
    .await;
    env.set_faults(Faults::default());
    env.wait_until("every key renewed and the alarm cleared", || async {
        env.rows().await.iter().all(|r| r.renewals >= 1)
            && env.credential_alarm(APP).await == Some(0.0)
    })
    .await;
    env.stop_daemon().await;
    assert_eq!(env.count(State::Active).await, 4);
}

async fn a_wave_of_genuine_revocations_is_told_apart_by_a_canary(db: Db) {
    let mut env = TestEnv::on(db).await;
    // Healthy keys, none due for weeks: only a canary can show the credential works.
    env.add_healthy_users("healthy", 30).await;
    // Five genuine revocations come due at once: as many as guard.threshold, so they look like a
    // broken credential at first.
    for i in 0..5 {
        let key = env.add_due_user(&format!("revoked-{i}")).await;
        env.emu.revoke_key(&key);
    }
    let started = Instant::now();
    env.spawn_daemon().await;
    env.wait_until("the five revoked keys flagged", || async {
        env.count(State::Revoked).await == 5
    })
    .await;
    let took = started.elapsed();
    let rows = env.rows().await;
    let (rows, names) = (rows, users(&env).await);
    let healthy = named(&rows, &names, "healthy-");
    assert!(healthy.iter().all(|r| r.state == State::Active));
    let canaries = healthy.iter().filter(|r| r.renewals > 0).count();
    assert!(canaries >= 1, "no canary renewed");
    assert_eq!(env.credential_alarm(APP).await, Some(0.0));
    eprintln!(
        "guard: 5 genuine revocations among 30 healthy keys not due: all 5 flagged in {:.1} s, {canaries} canaries renewed early, 0 healthy keys flagged",
        took.as_secs_f64()
    );
    env.stop_daemon().await;
}

async fn a_key_with_no_other_to_ask_is_flagged_only_after_hours_of_refusals(db: Db) {
    let mut env = TestEnv::on(db).await;
    env.config.guard.lone_key_after = Duration::from_secs(3600);
    env.config.renew.backoff_cap = Duration::from_secs(600);
    let key = env.add_due_user("alone").await;
    env.emu.revoke_key(&key);
    let start = env.clock.now();
    env.spawn_daemon().await;
    env.run_until(Duration::from_secs(300), "the lone key flagged", || async {
        let state = env.row("alone", Kind::Collections).await.state;
        state != State::Active && state != State::Pending
    })
    .await;
    let flagged_at = env.clock.now();
    env.stop_daemon().await;
    let row = env.row("alone", Kind::Collections).await;
    assert_eq!(row.state, State::Revoked);
    assert!(
        row.reason
            .as_deref()
            .unwrap_or("")
            .contains("lone_key_after"),
        "{:?}",
        row.reason
    );
    assert!(
        flagged_at - start >= 3600,
        "flagged after {} s of refusals",
        flagged_at - start
    );
}

/// "No other key to ask" lets the guard conclude that every key of an application is refused
/// (the alarm; a lone key flagged after hours). A search that finds healthy keys only renewed
/// moments ago, or held by an attempt, must not say so: right after a burst of renewals, a few
/// genuine revocations raised the credential alarm that way. A young key is a canary when no
/// older one is free (it proves as much); keys all held are "held", asked again later.
async fn a_canary_search_finding_only_young_or_held_keys_is_not_no_other_key(db: Db) {
    let env = TestEnv::on(db).await;
    env.add_due_users(3).await;
    let store = storekeyd::storage::connect(&env.config.database_url(), &env.config.db_options())
        .await
        .unwrap();
    let now = env.clock.now();
    // All checked, renewed just now; user-1 refused; user-2 older, and due later than user-0.
    set(&env, "state = 'active', client_id = 'app', user_id = 'u', issued_at = ?, expires_at = ? + 86400, next_attempt_at = ? + 3600", now).await;
    set(
        &env,
        "refusals = CASE WHEN user_ref = 'user-1' THEN 1 ELSE 0 END",
        now,
    )
    .await;
    set(&env, "issued_at = issued_at - CASE WHEN user_ref = 'user-2' THEN 7200 ELSE 0 END, next_attempt_at = next_attempt_at + CASE WHEN user_ref = 'user-2' THEN 60 ELSE 0 END", now).await;
    let rows = env.rows().await;
    let search = || store.claim_canary("app", now - 3600, now, now + 600);
    let older = search().await.unwrap().expect("a canary");
    assert_eq!(older.id, rows[2].id, "an older key goes first");
    let young = search()
        .await
        .unwrap()
        .expect("the young key, none older being free");
    assert_eq!((young.id, young.canary), (rows[0].id, true));
    assert!(
        matches!(search().await, Err(storekeyd::storage::DbError::Held)),
        "every healthy key held by an attempt"
    );
    set(&env, "refusals = 1, lease_until = NULL", now).await;
    assert!(search().await.unwrap().is_none(), "every key refused");
    store.close().await;
}

/// `UPDATE store_keys SET {assignments}`, with `at` bound to each `?` in them.
async fn set(env: &TestEnv, assignments: &str, at: i64) {
    let sql = format!("UPDATE store_keys SET {assignments}");
    let binds = sql.matches('?').count();
    crate::backend::on_backend!(env.db, sql, |pool, sql| {
        let mut q = sqlx::query(sql);
        for _ in 0..binds {
            q = q.bind(at);
        }
        q.execute(pool).await.unwrap().rows_affected()
    });
}

crate::backend::on_both_databases!(
    a_canary_search_finding_only_young_or_held_keys_is_not_no_other_key,
    a_small_application_with_a_broken_credential_loses_no_key_across_a_restart,
    a_wave_of_genuine_revocations_is_told_apart_by_a_canary,
    a_key_with_no_other_to_ask_is_flagged_only_after_hours_of_refusals,
);
