//! Clock edge cases: skewed keys, and a system clock that jumps.

use std::time::Duration;

use storekeyd::policy::claims::Kind;

use crate::harness::{APP, DAY, KEY_LIFETIME, TestEnv};

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
        env.count("active").await == 1 && env.count("invalid").await == 1
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
    env.wait_until("active", || async { env.count("active").await == 1 })
        .await;
    // The machine wakes from a long suspend, or NTP steps the clock 40 days forward.
    env.clock.advance(Duration::from_secs(40 * DAY));
    env.wait_until("flagged expired", || async {
        env.count("expired").await == 1
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
    assert_eq!(env.row("alice", Kind::Collections).await.state, "active");
}

/// A bad RTC or an NTP step puts the host a month ahead: by the host clock every key expired, by
/// the Store's none did. Nothing is flagged, the keys keep renewing, and the clock alarm says
/// why; stepping the clock back clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_jump_of_the_host_clock_flags_nothing_expired_and_raises_the_alarm() {
    use storekeyd::emulator::Faults;

    let mut env = TestEnv::new().await;
    for i in 0..5 {
        let issued = env.clock.now() - 2 * DAY as i64;
        let key = env.emu.mint_at(
            Kind::Collections,
            APP,
            &format!("user-{i}"),
            KEY_LIFETIME,
            issued,
        );
        env.store(&format!("user-{i}"), Kind::Collections, &key)
            .await;
    }
    env.spawn_daemon().await;
    env.wait_until("the keys active and the Store's time known", || async {
        let text = env.get("/metrics").await.1;
        env.count("active").await == 5
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
        env.count("expired").await,
        0,
        "a key was flagged on the host clock"
    );
    assert_eq!(env.count("active").await, 6);
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
        env.row("stored", Kind::Collections).await.state != "pending"
    })
    .await;
    assert_eq!(env.row("stored", Kind::Collections).await.state, "active");
    assert_eq!(env.count("expired").await, 0);

    // NTP fixes the clock: the alarm clears.
    env.clock.rewind(jump);
    env.set_faults(Faults::default());
    env.wait_until("the clock alarm cleared", || async {
        let text = env.get("/metrics").await.1;
        crate::harness::metric(&text, "storekeyd_clock_alarm") == Some(0.0)
    })
    .await;
    env.stop_daemon().await;
    assert_eq!(env.count("active").await, 7);
}
