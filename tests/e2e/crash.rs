//! SIGKILL at random moments during a backlog drain, restarting each time: nothing lost, nothing
//! regressed, nothing half-written.

use std::collections::HashMap;
use std::time::Duration;
use storekeyd::policy::state::State;

use storekeyd::emulator::Faults;
use storekeyd::policy::claims::{self, Kind};
use storekeyd::policy::fingerprint::Fingerprint;

use crate::harness::{Row, TestEnv, full, spawn_process};

/// Every row whole and no key's expiry earlier than the last time we looked.
fn check_rows(rows: &[Row], max_exp: &mut HashMap<i64, i64>, env: &TestEnv) {
    for row in rows {
        // Not yet checked when the process died: untouched, and still the backend's key.
        if row.state == State::Pending {
            assert!(
                env.emu.issued(&row.key) && row.renewals == 0,
                "row #{} pending but touched",
                row.id
            );
            continue;
        }
        assert_eq!(
            row.state,
            State::Active,
            "row #{} is {}: {:?}",
            row.id,
            row.state,
            row.reason
        );
        let c = claims::decode(&row.key).expect("a stored key does not decode");
        assert_eq!(
            row.expires_at,
            Some(c.expires_at),
            "row #{} half-written: exp",
            row.id
        );
        let fp = Fingerprint::of(&row.key).to_string();
        assert_eq!(
            row.key_fp.as_deref(),
            Some(fp.as_str()),
            "row #{} half-written: fingerprint",
            row.id
        );
        assert!(
            env.emu.issued(&row.key),
            "row #{} holds a key the Store never issued",
            row.id
        );
        let seen = max_exp.entry(row.id).or_insert(c.expires_at);
        assert!(c.expires_at >= *seen, "row #{}: exp went backwards", row.id);
        *seen = c.expires_at;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_backlog_drain_loses_nothing() {
    let (keys, kills) = if full() { (1000, 200) } else { (200, 50) };
    let mut env = TestEnv::new().await;
    // Each killed process counts as a replica until its heartbeat row lapses, so the last run
    // starts on a fraction of the rate limit.
    env.patience = env.patience.max(Duration::from_secs(120));
    env.config.renew.concurrency = 8;
    env.config.http.request_timeout = Duration::from_secs(1);
    env.config.renew.lease = Duration::from_secs(5);
    env.config.renew.poll_interval = Duration::from_millis(50);
    // Paced so that the drain spans the kills: about 15 renewals a second of uptime.
    env.config.renew.rate_limit = 15.0;
    let config = env.write_config();
    let users: Vec<String> = (0..keys).map(|i| format!("user-{i}")).collect();
    for user in &users {
        env.add_due_user(user).await;
    }
    // Slow enough that kills land mid-call as well as between calls. The Store retires a key once
    // it renews it, so a renewal whose result was lost shows as a row that cannot renew again.
    env.set_faults(Faults {
        latency_ms: 40,
        retire_renewed_keys: true,
        ..Faults::default()
    });

    let mut max_exp = HashMap::new();
    // Kill moments from a fixed seed: the same schedule on every run.
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for _ in 0..kills {
        let mut child = spawn_process(&config);
        tokio::time::sleep(Duration::from_millis(rng.u64(50..400))).await;
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        check_rows(&env.rows().await, &mut max_exp, &env);
    }
    let renewed_during_kills = env.rows().await.iter().filter(|r| r.renewals > 0).count();
    let lost = lost_to_a_kill(&env, &users).await;

    let mut child = spawn_process(&config);
    env.wait_until("every key renewed after the last kill", || async {
        env.rows()
            .await
            .iter()
            .zip(&users)
            .all(|(r, u)| r.renewals >= 1 || lost.contains(u))
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    let rows = env.rows().await;
    assert_eq!(rows.len(), keys, "a row was lost");
    for (row, user) in rows.iter().zip(&users) {
        if lost.contains(user) {
            continue;
        }
        // Every key the Store issued is in the database or superseded by a later one: the row
        // holds the newest key the Store issued for that user.
        assert_eq!(
            env.emu.latest_key(Kind::Collections, user).as_deref(),
            Some(row.key.as_str()),
            "{user}"
        );
        assert_eq!(row.state, State::Active, "{user}: {:?}", row.reason);
    }
    let stats = env.emu.stats();
    eprintln!(
        "crash: {keys} keys, {kills} SIGKILLs ({renewed_during_kills} renewed meanwhile), {} renew requests, {} renewals by the Store, {} in the database, {} lost in flight (answer received, killed before the commit), 0 regressed, 0 half-written",
        stats.renew_requests,
        stats.renewed,
        rows.iter().map(|r| r.renewals).sum::<i64>(),
        lost.len()
    );
}

/// The users whose newest key has not reached the database. A SIGKILL between the Store's answer
/// and the commit loses it whatever the client does: the answer exists only in memory until then,
/// and the emulator may even finish a request after the process that sent it died. Every process
/// so far was killed, so any of them may have lost keys that way; the run after this is never
/// killed mid-drain, and the caller checks that it loses nothing.
async fn lost_to_a_kill(env: &TestEnv, users: &[String]) -> Vec<String> {
    let mut lost = Vec::new();
    for (row, user) in env.rows().await.iter().zip(users) {
        if env.emu.latest_key(Kind::Collections, user).as_deref() != Some(row.key.as_str()) {
            lost.push(user.clone());
        }
    }
    lost
}
