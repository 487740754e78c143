//! Outages and credential failures: the breaker bounds the request rate, the guard flags no key
//! that our own credential got refused.

use std::time::{Duration, Instant};
use storekeyd::policy::state::State;

use storekeyd::emulator::Faults;

use crate::harness::{Db, OTHER_APP, TestEnv, metric};

const OPEN: &str = "storekeyd_breaker_open{kind=\"collections\"}";

async fn an_outage_opens_the_breaker_bounds_requests_flags_nothing_and_recovers(db: Db) {
    let mut env = TestEnv::on(db).await;
    env.config.breaker.threshold = 5;
    env.config.breaker.probe_initial = Duration::from_secs(1);
    env.config.breaker.probe_max = Duration::from_secs(2);
    let keys = 40;
    for i in 0..keys {
        env.add_due_user(&format!("user-{i}")).await;
    }
    env.set_faults(Faults {
        error_503_rate: 1.0,
        ..Faults::default()
    });
    env.spawn_daemon().await;

    // Open, and the calls sent before it opened answered: the window measures the breaker, not
    // the burst that opened it (on a loaded machine some of it lands after the gauge shows open).
    env.wait_until("the breaker opens", || async {
        let text = env.get("/metrics").await.1;
        metric(&text, OPEN) == Some(1.0)
            && metric(&text, "storekeyd_renewals_in_flight").is_some_and(|n| n <= 1.0)
    })
    .await;
    let before = env.emu.stats().renew_requests;
    let window = Duration::from_secs(6);
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let during = env.emu.stats().renew_requests - before;
    let rate = during as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "outage: {keys} keys due, {during} renew requests in {window:?} with the breaker open ({rate:.2}/s)"
    );
    // Probes at 1 s, then every 2 s: about 3 in 6 s, whatever the backlog.
    assert!(
        during <= 6,
        "{during} requests in {window:?} during the outage"
    );
    assert_eq!(
        env.count(State::Active).await,
        keys,
        "a key was flagged because of the outage"
    );
    let status = env.cli(&["status"], "").await;
    assert_eq!(status.code, 3, "{status:?}");
    assert!(
        status.stdout.contains("breaker:collections"),
        "{}",
        status.stdout
    );

    env.set_faults(Faults::default());
    env.wait_until("every key renewed after the outage", || async {
        env.rows().await.iter().all(|r| r.renewals == 1)
    })
    .await;
    let text = env.get("/metrics").await.1;
    assert_eq!(metric(&text, OPEN), Some(0.0));
    let status = env.cli(&["status"], "").await;
    assert!(status.stdout.contains("alarms: none"), "{}", status.stdout);
    let total = env.emu.stats().renew_requests;
    eprintln!(
        "outage: {total} renew requests in all for {keys} keys (amplification {:.2})",
        total as f64 / keys as f64
    );
    env.stop_daemon().await;
}

async fn a_rejected_credential_flags_no_key_and_raises_the_alarm(db: Db) {
    let mut env = TestEnv::on(db).await;
    for i in 0..10 {
        env.add_due_key(&format!("other-{i}"), OTHER_APP).await;
        env.add_due_user(&format!("main-{i}")).await;
    }
    env.set_faults(Faults {
        reject_tickets_for: vec![OTHER_APP.into()],
        ..Faults::default()
    });
    env.spawn_daemon().await;

    let alarm = format!("storekeyd_credential_alarm{{application=\"{OTHER_APP}\"}}");
    env.wait_until("the alarm and the other application's renewals", || async {
        let text = env.get("/metrics").await.1;
        let main_renewed = env.rows().await.iter().filter(|r| r.renewals == 1).count();
        metric(&text, &alarm) == Some(1.0) && main_renewed == 10
    })
    .await;
    // Let the refused keys come round a few more times: still nothing flagged.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.count(State::Revoked).await,
        0,
        "a key was flagged revoked because of our credential"
    );
    let (status, body) = env.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("credential alarm"), "{body}");
    let out = env.cli(&["status"], "").await;
    assert!(
        out.stdout.contains(&format!("credential:{OTHER_APP}")),
        "{}",
        out.stdout
    );

    // The credential is fixed: the alarm clears and the keys renew.
    env.set_faults(Faults::default());
    env.wait_until("the refused keys renewed", || async {
        env.rows().await.iter().all(|r| r.renewals == 1)
    })
    .await;
    assert_eq!(metric(&env.get("/metrics").await.1, &alarm), Some(0.0));
    assert_eq!(env.get("/readyz").await.0, 200);
    env.stop_daemon().await;
}

async fn a_few_real_revocations_among_many_healthy_keys_are_flagged(db: Db) {
    let mut env = TestEnv::on(db).await;
    let mut revoked = Vec::new();
    for i in 0..20 {
        let key = env.add_due_user(&format!("user-{i}")).await;
        if i % 7 == 3 {
            env.emu.revoke_key(&key);
            revoked.push(format!("user-{i}"));
        }
    }
    env.spawn_daemon().await;
    env.wait_until("the revoked keys flagged, the rest renewed", || async {
        let rows = env.rows().await;
        rows.iter().filter(|r| r.state == State::Revoked).count() == revoked.len()
            && rows.iter().filter(|r| r.renewals >= 1).count() == 20 - revoked.len()
    })
    .await;
    let text = env.get("/metrics").await.1;
    assert_eq!(
        metric(
            &text,
            "storekeyd_credential_alarm{application=\"app-main\"}"
        ),
        Some(0.0)
    );
    env.stop_daemon().await;
}

crate::backend::on_both_databases!(
    an_outage_opens_the_breaker_bounds_requests_flags_nothing_and_recovers,
    a_rejected_credential_flags_no_key_and_raises_the_alarm,
    a_few_real_revocations_among_many_healthy_keys_are_flagged,
);
