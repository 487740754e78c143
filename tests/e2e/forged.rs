//! Keys a player forged. Their claims are unsigned: any player can store a key with the game's
//! real `clientId` and claims that look old and due. The Store refuses such a key; that must not
//! look like our credential failing (the alarm would stop every flag), nor cost more than its
//! share of renew calls and access tokens.

use std::cell::Cell;
use std::time::Duration;
use storekeyd::policy::state::State;

use storekeyd::emulator::keymint::{self, KeySpec};
use storekeyd::policy::claims::Kind;

use crate::harness::{APP, DAY, Db, TestEnv};

/// Claims as old and as close to expiry as the Store could have issued: due at once, and the
/// oldest key of the application (the canary search's first pick, before).
fn forged(now: i64, n: u32) -> String {
    let mut spec = KeySpec::collections(APP, now - 29 * DAY as i64, 30 * DAY as i64);
    spec.user_id = format!("mallory-{n}");
    keymint::mint(&spec)
}

/// Ten keys the Store renewed (proven), ten healthy ones not yet due, one genuine revocation;
/// then half an hour in which a player stores a forged key every minute. The revocation is
/// flagged, no alarm is ever raised, the healthy keys renew on time, and the forged keys cost at
/// most one access token a minute.
async fn a_player_forging_keys_every_minute_silences_nothing(db: Db) {
    let mut env = TestEnv::on(db).await;
    env.add_due_users(10).await;
    env.add_healthy_users("fresh", 10).await;
    env.spawn_daemon().await;
    env.wait_until("the due keys renewed", || async {
        env.rows().await.iter().filter(|r| r.renewals == 1).count() == 10
    })
    .await;
    let victim = env.add_due_user("victim").await;
    env.emu.revoke_key(&victim);

    let start = env.clock.now();
    let tokens_before = env.emu.stats().tokens_issued;
    let (last_forged, forged_keys, alarm_seen) =
        (Cell::new(0i64), Cell::new(0u32), Cell::new(false));
    env.run_until(
        Duration::from_secs(10),
        "half an hour of forged keys",
        || async {
            let now = env.clock.now();
            if now - last_forged.get() >= 60 && now - start < 1800 {
                forged_keys.set(forged_keys.get() + 1);
                let n = forged_keys.get();
                env.store(&format!("mallory-{n}"), Kind::Collections, &forged(now, n))
                    .await;
                last_forged.set(now);
            }
            if env.credential_alarm(APP).await != Some(0.0) {
                alarm_seen.set(true);
            }
            now - start >= 1800
                && env.row("victim", Kind::Collections).await.state == State::Revoked
        },
    )
    .await;
    let minutes = (env.clock.now() - start) / 60;
    let tokens = env.emu.stats().tokens_issued - tokens_before;
    let now = env.clock.now();
    env.stop_daemon().await;

    assert!(!alarm_seen.get(), "the credential alarm was raised");
    let (alarm_deferrals,): (i64,) = crate::harness::on_backend!(
        env.db,
        "SELECT COUNT(*) FROM store_key_events WHERE detail LIKE '%while none renews%'",
        |pool, sql| sqlx::query_as(sql).fetch_one(pool).await.unwrap()
    );
    assert_eq!(alarm_deferrals, 0, "refusals were deferred for an alarm");
    let rows = env.rows().await;
    let victim = env.row("victim", Kind::Collections).await;
    assert_eq!(victim.state, State::Revoked, "{:?}", victim.reason);
    let users: Vec<(String, i64)> = crate::harness::on_backend!(
        env.db,
        "SELECT user_ref, id FROM store_keys",
        |pool, sql| sqlx::query_as(sql).fetch_all(pool).await.unwrap()
    );
    let healthy: Vec<_> = rows
        .iter()
        .filter(|r| {
            users
                .iter()
                .any(|(u, id)| *id == r.id && (u.starts_with("user-") || u.starts_with("fresh-")))
        })
        .collect();
    assert_eq!(healthy.len(), 20);
    for row in &healthy {
        assert_eq!(row.state, State::Active, "{:?}", row.reason);
        assert!(
            row.next_attempt_at.is_some_and(|t| t > now - 60),
            "a healthy key waits, overdue: {row:?}"
        );
    }
    assert!(
        tokens <= minutes as u64 + 2,
        "{tokens} access tokens in {minutes} minutes for {} forged keys",
        forged_keys.get()
    );
    eprintln!(
        "forged: {} forged keys in {minutes} min, {tokens} access tokens, the revocation flagged, no alarm",
        forged_keys.get()
    );
}

/// A forged key, checked and due (its claims make it look the most overdue of all), is never
/// the canary while a key the Store renewed is free: refused, a canary raises the credential
/// alarm. Keys that never renewed are asked only where no renewed key is.
async fn a_canary_is_a_key_the_store_renewed_if_there_is_one(db: Db) {
    let mut env = TestEnv::on(db).await;
    env.add_due_users(2).await;
    env.spawn_daemon().await;
    env.wait_until("both renewed", || async {
        env.rows().await.iter().all(|r| r.renewals == 1)
    })
    .await;
    env.stop_daemon().await;
    let now = env.clock.now();
    env.store("mallory", Kind::Collections, &forged(now, 0))
        .await;
    // As ingest leaves it: active, its (forged) claims stored, due long ago.
    let activate = format!(
        "UPDATE store_keys SET state = 'active', client_id = '{APP}', issued_at = ? - {}, expires_at = ? + {DAY},
             next_attempt_at = ? - {} WHERE user_ref = 'mallory'",
        29 * DAY,
        15 * DAY
    );
    crate::backend::on_backend!(env.db, activate, |pool, sql| {
        sqlx::query(sql)
            .bind(now)
            .bind(now)
            .bind(now)
            .execute(pool)
            .await
            .unwrap();
    });
    let store = storekeyd::storage::connect(&env.config.database_url(), &env.config.db_options())
        .await
        .unwrap();
    let mallory = env.row("mallory", Kind::Collections).await.id;
    let search = || store.claim_canary(APP, now - 3600, now, now + 600);
    for _ in 0..2 {
        let canary = search().await.unwrap().expect("a canary");
        assert_ne!(canary.id, mallory, "the forged key was the canary");
        assert!(canary.proven);
    }
    // With every renewed key held, the forged one is all there is to ask.
    let last = search().await.unwrap().expect("the key that never renewed");
    assert_eq!((last.id, last.proven), (mallory, false));
    store.close().await;
}

/// A flood of keys that never renewed (forged ones look due at once) must not hold back the
/// keys the Store renewed: a claim takes proven keys first, of either kind, however much longer
/// ago the others fell due. Twelve due keys: eight never renewed and due since 0, four renewed
/// (two of each kind) and due only since 500.
async fn keys_that_never_renewed_cannot_crowd_out_keys_that_did(db: Db) {
    let env = TestEnv::on(db).await;
    env.add_due_users(12).await;
    let now = env.clock.now();
    let activate = format!(
        "UPDATE store_keys SET state = 'active', client_id = '{APP}', user_id = 'u', issued_at = 0,
             expires_at = ? + {DAY}, next_attempt_at = 0, last_renewed_at = NULL"
    );
    crate::backend::on_backend!(env.db, activate, |pool, sql| {
        sqlx::query(sql).bind(now).execute(pool).await.unwrap();
    });
    crate::backend::on_backend!(
        env.db,
        "UPDATE store_keys SET last_renewed_at = 1, next_attempt_at = 500,
             kind = CASE WHEN user_ref IN ('user-3', 'user-7') THEN 'purchase' ELSE kind END
         WHERE user_ref IN ('user-1', 'user-3', 'user-5', 'user-7')",
        |pool, sql| {
            sqlx::query(sql).execute(pool).await.unwrap();
        }
    );
    let store = storekeyd::storage::connect(&env.config.database_url(), &env.config.db_options())
        .await
        .unwrap();
    let names: Vec<(i64, String)> = crate::harness::on_backend!(
        env.db,
        "SELECT id, user_ref FROM store_keys",
        |pool, sql| sqlx::query_as(sql).fetch_all(pool).await.unwrap()
    );
    let users = |claimed: &[storekeyd::storage::ClaimedRow]| {
        let mut users: Vec<&str> = claimed
            .iter()
            .filter_map(|c| names.iter().find(|(id, _)| *id == c.id))
            .map(|(_, user)| user.as_str())
            .collect();
        users.sort();
        users
    };

    let first = store
        .claim_due(now, now + 600, 4, &Kind::ALL)
        .await
        .unwrap();
    assert!(first.iter().all(|c| c.proven));
    assert_eq!(users(&first), ["user-1", "user-3", "user-5", "user-7"]);
    // Then the others (the renewed keys are held).
    let next = store
        .claim_due(now, now + 600, 3, &[Kind::Collections])
        .await
        .unwrap();
    assert_eq!(users(&next).len(), 3);
    assert!(next.iter().all(|c| !c.proven));
    store.close().await;
}

crate::backend::on_both_databases!(
    a_player_forging_keys_every_minute_silences_nothing,
    a_canary_is_a_key_the_store_renewed_if_there_is_one,
    keys_that_never_renewed_cannot_crowd_out_keys_that_did,
);
