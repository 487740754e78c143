//! A fault soak: 30% 503, 10% 429 with Retry-After, 5% timeouts, 2% garbage 200s, over several
//! renewal cycles. Every key renews before it expires; garbage is never written.

use std::time::{Duration, Instant};
use storekeyd::policy::state::State;

use storekeyd::emulator::Faults;
use storekeyd::policy::claims;

use crate::harness::{DAY, TestEnv, full};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_renews_through_a_storm_of_faults() {
    let (keys, cycles) = if full() { (1000, 3) } else { (150, 2) };
    let mut env = TestEnv::new().await;
    // The tail of unlucky keys (six failures in a row) sets the pace; give each cycle time.
    env.patience = env.patience.max(Duration::from_secs(180));
    env.config.renew.concurrency = 16;
    env.config.http.request_timeout = Duration::from_secs(1);
    env.config.renew.lease = Duration::from_secs(5);
    env.config.renew.backoff_cap = Duration::from_secs(4);
    env.config.breaker.probe_initial = Duration::from_secs(1);
    env.config.breaker.probe_max = Duration::from_secs(2);
    for i in 0..keys {
        env.add_due_user(&format!("user-{i}")).await;
    }
    env.set_faults(Faults {
        error_503_rate: 0.30,
        throttle_rate: 0.10,
        retry_after_secs: 1,
        timeout_rate: 0.05,
        garbage_rate: 0.02,
        ..Faults::default()
    });
    env.spawn_daemon().await;
    let started = Instant::now();
    for cycle in 1..=cycles {
        if cycle > 1 {
            // The next renewal comes 14 days after the last (minus jitter).
            env.clock.advance(Duration::from_secs(15 * DAY));
        }
        env.wait_until(&format!("renewal cycle {cycle}"), || async {
            env.rows().await.iter().all(|r| r.renewals >= cycle)
        })
        .await;
    }
    env.stop_daemon().await;

    let now = env.clock.now();
    for row in env.rows().await {
        assert_eq!(row.state, State::Active, "{:?}", row.reason);
        let c = claims::decode(&row.key).expect("garbage was written");
        assert!(
            env.emu.issued(&row.key),
            "a key the Store never issued was written"
        );
        assert!(c.expires_at > now, "a key expired");
    }
    let s = env.emu.stats();
    let renewals = keys as u64 * cycles as u64;
    eprintln!(
        "soak: {keys} keys x {cycles} cycles in {:.1}s; {} renew requests (amplification {:.2} per renewal), answers {:?}, {} timeouts; {} token requests",
        started.elapsed().as_secs_f64(),
        s.renew_requests,
        s.renew_requests as f64 / renewals as f64,
        s.renew_by_status,
        s.timeouts,
        s.token_requests
    );
}
