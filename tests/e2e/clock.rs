//! Clock edge cases: skewed keys, and a system clock that jumps.

use std::time::Duration;
use storekeyd::policy::state::State;

use storekeyd::policy::claims::Kind;
use storekeyd::storage;

use crate::harness::{APP, DAY, Db, KEY_LIFETIME, TestEnv, metric};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_keys_are_accepted_and_scheduled_by_our_clock_and_forged_lifetimes_are_not() {
    let mut env = TestEnv::new().await;
    env.config.renew.jitter = Duration::ZERO;
    let now = env.clock.now();
    // Issued two hours "in the future" (the Store's clock ahead of ours), and one "valid for 50
    // years", which no Store key is (a forged one: its claims are unsigned).
    let skewed = env
        .emu
        .mint_at(Kind::Collections, APP, "skewed", KEY_LIFETIME, now + 7200);
    env.store("skewed", Kind::Collections, &skewed).await;
    let decades = env.emu.mint_at(
        Kind::Collections,
        APP,
        "decades",
        50 * 365 * DAY as i64,
        now,
    );
    env.store("decades", Kind::Collections, &decades).await;
    env.spawn_daemon().await;
    env.wait_until("one active, one invalid", || async {
        env.count(State::Active).await == 1 && env.count(State::Invalid).await == 1
    })
    .await;
    env.stop_daemon().await;
    let skewed = env.row("skewed", Kind::Collections).await;
    let next = skewed.next_attempt_at.unwrap();
    assert!(
        (now + 14 * DAY as i64..now + 14 * DAY as i64 + 5).contains(&next),
        "skewed key scheduled at {next}, not 14 days from our now {now}"
    );
    let decades = env.row("decades", Kind::Collections).await;
    assert!(
        decades
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("no key that lives so long"),
        "{:?}",
        decades.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_jump_past_expiry_flags_without_sending() {
    let mut env = TestEnv::new().await;
    env.add_user("alice").await;
    env.spawn_daemon().await;
    env.wait_until("active", || async { env.count(State::Active).await == 1 })
        .await;
    // The machine wakes from a long suspend, or NTP steps the clock 40 days forward.
    env.clock.advance(Duration::from_secs(40 * DAY));
    env.wait_until("flagged expired", || async {
        env.count(State::Expired).await == 1
    })
    .await;
    env.stop_daemon().await;
    assert_eq!(
        env.emu.stats().renew_requests,
        0,
        "an expired key was sent to the Store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backward_jump_delays_but_duplicates_nothing() {
    let mut env = TestEnv::new().await;
    env.add_user("alice").await;
    env.spawn_daemon().await;
    env.run_until(Duration::from_secs(DAY), "the first renewal", || async {
        env.row("alice", Kind::Collections).await.renewals == 1
    })
    .await;
    // NTP steps the clock 10 days back: the renewed key now looks issued in the future.
    env.clock.rewind(Duration::from_secs(10 * DAY));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.get("/healthz").await.0, 200);
    assert_eq!(
        env.row("alice", Kind::Collections).await.renewals,
        1,
        "renewed again after a backward jump"
    );
    env.run_until(Duration::from_secs(DAY), "the next renewal", || async {
        env.row("alice", Kind::Collections).await.renewals == 2
    })
    .await;
    env.stop_daemon().await;
    assert_eq!(env.emu.stats().renewed, 2);
    assert_eq!(
        env.row("alice", Kind::Collections).await.state,
        State::Active
    );
}

/// A bad RTC or an NTP step puts the host a month ahead: by the host clock every key expired, by
/// the Store's none did. Nothing is flagged, the keys keep renewing, and the clock alarm says
/// why; stepping the clock back clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_jump_of_the_host_clock_flags_nothing_expired_and_raises_the_alarm() {
    use storekeyd::emulator::Faults;

    let mut env = TestEnv::new().await;
    env.add_healthy_users("user", 5).await;
    env.spawn_daemon().await;
    env.wait_until("the keys active and the Store's time known", || async {
        let text = env.get("/metrics").await.1;
        env.count(State::Active).await == 5
            && crate::harness::metric(&text, "storekeyd_clock_offset_seconds").is_some()
    })
    .await;

    let jump = Duration::from_secs(29 * DAY);
    env.clock.step_forward(jump);
    env.set_faults(Faults {
        clock_offset_secs: -(29 * DAY as i64),
        ..Faults::default()
    });
    env.wait_until("the clock alarm raised", || async {
        let text = env.get("/metrics").await.1;
        crate::harness::metric(&text, "storekeyd_clock_alarm") == Some(1.0)
    })
    .await;
    let (status, body) = env.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("clock"), "{body}");
    // A key due by the Store's time, stored after the jump: once it renewed, the loop has
    // claimed (and would have flagged) everything the host clock makes look due and expired.
    let issued = env.emu.now() - 20 * DAY as i64;
    let due = env
        .emu
        .mint_at(Kind::Collections, APP, "due", KEY_LIFETIME, issued);
    env.store("due", Kind::Collections, &due).await;
    env.wait_until("the key due by the Store's time renewed", || async {
        env.row("due", Kind::Collections).await.renewals >= 1
    })
    .await;
    assert_eq!(
        env.count(State::Expired).await,
        0,
        "a key was flagged on the host clock"
    );
    assert_eq!(env.count(State::Active).await, 6);
    assert_eq!(
        env.emu.stats().renew_requests,
        1,
        "a key not due by the Store's time was sent"
    );
    let out = env.cli(&["status"], "").await;
    assert!(out.stdout.contains("clock"), "{}", out.stdout);

    // Restarted while the host is still ahead: a key stored meanwhile, expired by the host's
    // clock and not by the Store's, is checked on the Store's time (the start waits for it).
    env.stop_daemon().await;
    let issued = env.emu.now() - 2 * DAY as i64;
    let stored = env
        .emu
        .mint_at(Kind::Collections, APP, "stored", KEY_LIFETIME, issued);
    env.store("stored", Kind::Collections, &stored).await;
    env.spawn_daemon().await;
    env.wait_until("the key stored meanwhile checked", || async {
        env.row("stored", Kind::Collections).await.state != State::Pending
    })
    .await;
    assert_eq!(
        env.row("stored", Kind::Collections).await.state,
        State::Active
    );
    assert_eq!(env.count(State::Expired).await, 0);

    // NTP fixes the clock: the alarm clears.
    env.clock.rewind(jump);
    env.set_faults(Faults::default());
    env.wait_until("the clock alarm cleared", || async {
        let text = env.get("/metrics").await.1;
        crate::harness::metric(&text, "storekeyd_clock_alarm") == Some(0.0)
    })
    .await;
    env.stop_daemon().await;
    assert_eq!(env.count(State::Active).await, 7);
}

/// The host clock a month ahead again, now for what an operator watches: the backlog gauge,
/// the last success, `status` and `/readyz` judge time as the loop does, on the Store's. On the
/// host's every key would count as due and expiring, and the last success would lie a month
/// ahead, masking a stall. `status` runs in a process of its own with no answers from the Store:
/// it corrects the host clock by the offset the daemon's clock alarm states (built here in the
/// test's process, whose host clock is the stepped one; a `storekeyd` child would read the real
/// clock).
async fn figures_are_on_the_stores_time_while_the_host_clock_is_ahead(db: Db) {
    use storekeyd::emulator::Faults;
    use storekeyd::ops::report::StatusReport;

    let mut env = TestEnv::on(db).await;
    env.add_healthy_users("user", 5).await;
    env.spawn_daemon().await;
    // Nothing is checked before an answer told the Store's time. No `/metrics` yet: its key
    // statistics are cached for 30 s.
    env.wait_until("the keys active", || async {
        env.count(State::Active).await == 5
    })
    .await;
    let status_db = storage::connect(&env.config.database_url(), &env.config.db_options())
        .await
        .unwrap();
    let status = || async {
        StatusReport::build(&*status_db, env.clock.now(), env.config.renew.margin, 100)
            .await
            .unwrap()
    };

    // The host clock steps ahead; the Store's `Date` stays where it was.
    let ahead = |days: u64, by: u64| {
        env.clock.step_forward(Duration::from_secs(by * DAY));
        env.set_faults(Faults {
            clock_offset_secs: -((days * DAY) as i64),
            ..Faults::default()
        });
    };
    ahead(29, 29);
    env.wait_until("the clock alarm recorded for status", || async {
        status().await.clock_offset_secs.is_some()
    })
    .await;
    let (code, body) = env.get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    let failing: Vec<&str> = body.lines().filter(|l| l.starts_with("fail")).collect();
    assert!(
        failing.len() == 1 && failing[0].starts_with("fail  clock"),
        "{body}"
    );
    let text = env.get("/metrics").await.1;
    assert_eq!(
        metric(&text, "storekeyd_keys_due"),
        Some(0.0),
        "keys due on the host's clock"
    );
    assert_eq!(metric(&text, "storekeyd_clock_alarm"), Some(1.0));
    let report = status().await;
    assert_store_time(&env, &report, 29);
    let text = report.render();
    assert!(
        text.contains("the Store's time: this host's clock is 2"),
        "{text}"
    );
    assert!(text.contains("ahead, says the clock alarm"), "{text}");

    // Stepped a day further: the alarm states the new offset, and `status` follows it.
    ahead(30, 1);
    env.wait_until("the alarm restated", || async {
        status()
            .await
            .clock_offset_secs
            .is_some_and(|o| o < -29 * DAY as i64 - 3600)
    })
    .await;
    assert_store_time(&env, &status().await, 30);

    // A renewal's time is the Store's too: `time() - last success` stays meaningful.
    let issued = env.emu.now() - 20 * DAY as i64;
    let due = env
        .emu
        .mint_at(Kind::Collections, APP, "due", KEY_LIFETIME, issued);
    env.store("due", Kind::Collections, &due).await;
    env.wait_until("the key due by the Store's time renewed", || async {
        env.row("due", Kind::Collections).await.renewals >= 1
    })
    .await;
    let text = env.get("/metrics").await.1;
    let last = metric(&text, "storekeyd_last_renewal_success_timestamp_seconds").unwrap() as i64;
    let store_now = env.emu.now();
    assert!(
        (store_now - 60..=store_now).contains(&last),
        "last success at {last}, the Store's time {store_now}"
    );
    env.stop_daemon().await;
    status_db.close().await;
    assert_eq!(env.count(State::Expired).await, 0);
}

/// `status` judged on the Store's time while the host clock is `days` ahead: nothing due,
/// nothing expiring.
fn assert_store_time(env: &TestEnv, report: &storekeyd::ops::report::StatusReport, days: i64) {
    let store_now = env.emu.now();
    assert!(
        (store_now - 5..=store_now + 5).contains(&report.generated_at),
        "status at {}, the Store's time {store_now}",
        report.generated_at
    );
    let offset = report.clock_offset_secs.unwrap_or(0);
    assert!((offset + days * DAY as i64).abs() <= 5, "offset {offset}");
    assert_eq!(report.keys.due, 0, "keys due on the host's clock");
    assert!(report.expiring.is_empty(), "{:?}", report.expiring);
}

crate::backend::on_both_databases!(figures_are_on_the_stores_time_while_the_host_clock_is_ahead);
