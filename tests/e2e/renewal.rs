//! Keys get renewed: over many cycles, through throttling and outages, or flagged when they run
//! out of time.

use std::time::Duration;
use storekeyd::policy::state::State;

use storekeyd::emulator::Faults;
use storekeyd::policy::claims::{self, Kind};
use storekeyd::storage::contract;

use crate::harness::{APP, DAY, Db, OTHER_APP, TestEnv};

async fn happy_path_renews_every_key_over_several_cycles(db: Db) {
    let mut env = TestEnv::on(db).await;
    let users = ["alice", "bob", "carol"];
    let mut first_exp = Vec::new();
    for user in users {
        let key = env.add_user(user).await;
        first_exp.push(claims::decode(&key).unwrap().expires_at);
    }
    let purchase = env.mint(Kind::Purchase, OTHER_APP, "dave");
    env.store("dave", Kind::Purchase, &purchase).await;
    env.spawn_daemon().await;

    // A day of key time passes every 20 ms; 30-day keys renew every 14 days.
    env.run_until(
        Duration::from_secs(DAY),
        "three renewals of every key",
        || async { env.rows().await.iter().all(|r| r.renewals >= 3) },
    )
    .await;
    env.stop_daemon().await;

    for (user, exp0) in users.iter().zip(first_exp) {
        let row = env.row(user, Kind::Collections).await;
        assert_eq!(row.state, State::Active);
        let c = claims::decode(&row.key).unwrap();
        assert!(
            c.expires_at > exp0 + 3 * 13 * DAY as i64,
            "{user}: exp did not move forward enough"
        );
        assert_eq!(row.expires_at, Some(c.expires_at));
        assert_eq!(
            row.key_fp.as_deref(),
            Some(
                storekeyd::policy::fingerprint::Fingerprint::of(&row.key)
                    .to_string()
                    .as_str()
            )
        );
        // What a backend reads is the key in the row: the newest one.
        let read = contract::read_key(env.db.any(), user, "collections")
            .await
            .unwrap();
        assert_eq!(read.as_deref(), Some(row.key.as_str()));
    }
    let dave = env.row("dave", Kind::Purchase).await;
    assert_eq!(
        (dave.state.as_str(), claims::decode(&dave.key).unwrap().kind),
        ("active", Kind::Purchase)
    );
    let renewed: i64 = env.rows().await.iter().map(|r| r.renewals).sum();
    assert_eq!(
        env.emu.stats().renewed,
        renewed as u64,
        "every renewal the Store made was written"
    );
}

async fn throttling_and_outages_are_retried_then_renewed(db: Db) {
    let mut env = TestEnv::on(db).await;
    env.add_user("alice").await;
    // A Retry-After is honoured up to the backoff cap (the tests' default is 10 s).
    env.config.renew.backoff_cap = Duration::from_secs(600);
    env.set_faults(Faults {
        throttle_rate: 1.0,
        retry_after_secs: 120,
        ..Faults::default()
    });
    env.spawn_daemon().await;
    let row = env.row("alice", Kind::Collections).await;

    env.run_until(Duration::from_secs(DAY), "a throttled attempt", || async {
        env.outcomes(row.id)
            .await
            .iter()
            .any(|(o, _, _)| o == "throttled")
    })
    .await;
    // Retry-After: 120 is honoured: the next attempt is at least two minutes after the 429.
    let (_, at, _) = env
        .outcomes(row.id)
        .await
        .into_iter()
        .find(|(o, _, _)| o == "throttled")
        .unwrap();
    let next = env
        .row("alice", Kind::Collections)
        .await
        .next_attempt_at
        .unwrap();
    assert!(
        next >= at + 120,
        "next attempt {next} is sooner than Retry-After allows after {at}"
    );

    env.set_faults(Faults {
        error_503_rate: 1.0,
        ..Faults::default()
    });
    env.run_until(Duration::from_secs(60), "a 503", || async {
        env.outcomes(row.id)
            .await
            .iter()
            .any(|(o, _, s)| o == "transient" && *s == Some(503))
    })
    .await;
    env.set_faults(Faults::default());
    env.run_until(Duration::from_secs(60), "the renewal", || async {
        env.row("alice", Kind::Collections).await.renewals == 1
    })
    .await;
    env.stop_daemon().await;
    let row = env.row("alice", Kind::Collections).await;
    assert_eq!(
        (row.state.as_str(), row.attempts, row.reason),
        ("active", 0, None)
    );
}

async fn a_key_that_cannot_be_renewed_in_time_is_flagged_expired_and_never_sent_late(db: Db) {
    let mut env = TestEnv::on(db).await;
    env.add_user("alice").await;
    let already = env
        .emu
        .mint_at(Kind::Collections, APP, "bob", 100, env.clock.now() - 200);
    env.store("bob", Kind::Collections, &already).await;
    env.set_faults(Faults {
        error_503_rate: 1.0,
        ..Faults::default()
    });
    env.spawn_daemon().await;

    env.run_until(
        Duration::from_secs(DAY / 2),
        "alice flagged expired",
        || async { env.row("alice", Kind::Collections).await.state == State::Expired },
    )
    .await;
    env.stop_daemon().await;

    let alice = env.row("alice", Kind::Collections).await;
    assert!(alice.reason.unwrap().contains("expired at"));
    let exp = alice.expires_at.unwrap();
    let outcomes = env.outcomes(alice.id).await;
    assert!(outcomes.iter().filter(|(o, _, _)| o == "transient").count() >= 2);
    for (outcome, at, _) in &outcomes {
        if outcome == "transient" {
            assert!(*at < exp, "an attempt was made at {at}, after exp {exp}");
        }
    }
    let bob = env.row("bob", Kind::Collections).await;
    assert_eq!(
        bob.state,
        State::Expired,
        "a key stored after its expiry is flagged at ingest"
    );
}

/// A daemon starts renewing once the first answer tells it the Store's time, not at its next
/// poll: the first pass comes before Entra has answered (and schedules nothing on the host's
/// clock alone), and the poll here is an hour away.
async fn the_first_renewals_follow_the_first_answer_not_the_next_poll(db: Db) {
    let mut env = TestEnv::on(db).await;
    env.config.renew.poll_interval = Duration::from_secs(3600);
    let old = env.add_due_user("alice").await;
    env.spawn_daemon().await;
    env.wait_until("alice renewed", || async {
        env.row("alice", Kind::Collections).await.renewals == 1
    })
    .await;
    env.stop_daemon().await;
    assert_ne!(env.row("alice", Kind::Collections).await.key, old);
}

crate::backend::on_both_databases!(
    the_first_renewals_follow_the_first_answer_not_the_next_poll,
    happy_path_renews_every_key_over_several_cycles,
    throttling_and_outages_are_retried_then_renewed,
    a_key_that_cannot_be_renewed_in_time_is_flagged_expired_and_never_sent_late,
);
