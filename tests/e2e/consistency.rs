//! storekeyd never overwrites a backend's newer write, and a stop at any moment leaves every row
//! whole.

use std::process::Stdio;
use std::time::Duration;
use storekeyd::policy::state::State;

use storekeyd::emulator::Faults;
use storekeyd::policy::claims::{self, KeyFacts, KeyText, Kind};
use storekeyd::policy::fingerprint::Fingerprint;
use storekeyd::policy::state::EventKind;
use storekeyd::storage::{self, Change, Event, Write};
use tokio::process::{Child, Command};

use crate::backend::on_backend;
use crate::harness::{APP, DAY, Db, KEY_LIFETIME, TestEnv, sigterm};

fn due_key(env: &TestEnv, user: &str) -> String {
    env.emu.mint_at(
        Kind::Collections,
        APP,
        user,
        KEY_LIFETIME,
        env.clock.now() - 20 * DAY as i64,
    )
}

async fn a_backend_write_during_a_renewal_wins(db: Db) {
    let mut env = TestEnv::on(db).await;
    let old = due_key(&env, "alice");
    env.store("alice", Kind::Collections, &old).await;
    env.set_faults(Faults {
        latency_ms: 1500,
        ..Faults::default()
    });
    env.spawn_daemon().await;

    env.wait_until("the renewal is in flight", || async {
        env.emu.stats().renew_requests == 1
    })
    .await;
    let newer = env.mint(Kind::Collections, APP, "alice");
    env.store("alice", Kind::Collections, &newer).await;
    env.wait_until("the daemon's result arrives", || async {
        env.emu.stats().renewed == 1
    })
    .await;
    env.wait_until("the backend's key is active", || async {
        let row = env.row("alice", Kind::Collections).await;
        row.state == State::Active && row.key == newer
    })
    .await;
    env.stop_daemon().await;

    let row = env.row("alice", Kind::Collections).await;
    assert_eq!(row.key, newer, "the backend's newer key was overwritten");
    assert_eq!(row.renewals, 0);
    let outcomes: Vec<String> = env
        .outcomes(row.id)
        .await
        .into_iter()
        .map(|(o, _, _)| o)
        .collect();
    assert!(outcomes.contains(&"superseded".to_owned()), "{outcomes:?}");
}

/// The binary under test, with the env's config written to a file.
fn spawn_binary(config_path: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_storekeyd"))
        .args(["run", "--config"])
        .arg(config_path)
        .env(
            "STOREKEYD_LOG",
            std::env::var("TEST_LOG").unwrap_or_else(|_| "off".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn sigterm_and_wait(mut child: Child) {
    sigterm(&child);
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("no exit within 20 s after SIGTERM")
        .unwrap();
    assert!(exit.success(), "exit status after SIGTERM: {exit}");
}

async fn sigterm_mid_renewal_leaves_a_consistent_database_and_a_restart_carries_on(db: Db) {
    let mut env = TestEnv::on(db).await;
    env.config.renew.concurrency = 2;
    env.config.renew.poll_interval = Duration::from_millis(100);
    let config_path = env.dir.path().join("storekeyd.toml");
    std::fs::write(&config_path, toml::to_string(&env.config).unwrap()).unwrap();
    let users: Vec<String> = (0..12).map(|i| format!("user-{i}")).collect();
    for user in &users {
        let key = due_key(&env, user);
        env.store(user, Kind::Collections, &key).await;
    }
    // The Store retires a key once it renews it: a renewal lost at shutdown cannot be redone.
    env.set_faults(Faults {
        latency_ms: 400,
        retire_renewed_keys: true,
        ..Faults::default()
    });

    let child = spawn_binary(&config_path);
    env.wait_until("renewals in flight", || async {
        env.emu.stats().renew_requests >= 3
    })
    .await;
    sigterm_and_wait(child).await;

    let rows = env.rows().await;
    let renewed = rows.iter().filter(|r| r.renewals == 1).count();
    assert!(
        renewed >= 2 && renewed < users.len(),
        "stopped mid-drain: {renewed} of {} renewed",
        users.len()
    );
    for row in &rows {
        assert_eq!(row.state, State::Active);
        assert_eq!(
            row.lease_until, None,
            "in-flight work was finished or handed back"
        );
        assert_eq!(
            row.key_fp.as_deref(),
            Some(Fingerprint::of(&row.key).to_string().as_str()),
            "row half-written"
        );
        assert_eq!(
            row.expires_at,
            Some(claims::decode(&row.key).unwrap().expires_at),
            "row half-written"
        );
        assert!(env.emu.issued(&row.key), "a key the Store never issued");
    }
    assert_eq!(
        env.emu.stats().renewed as usize,
        renewed,
        "a renewal the Store made was lost"
    );

    let child = spawn_binary(&config_path);
    env.wait_until("every key renewed after the restart", || async {
        env.rows().await.iter().all(|r| r.renewals == 1)
    })
    .await;
    sigterm_and_wait(child).await;
    assert_eq!(
        env.emu.stats().renewed as usize,
        users.len(),
        "each key renewed exactly once across the restart"
    );
}

/// One batch holding a renewal that applies, one whose row changed meanwhile and an event of its
/// own: the first is renewed and retires its key into the lineage, the second changes nothing
/// and records `superseded`, the event stands as it was; the same with a batch of two kinds of
/// change (a statement each).
async fn a_batch_records_what_it_applied_and_what_it_did_not(db: Db) {
    let env = TestEnv::on(db).await;
    env.add_due_users(2).await;
    let store = storage::connect(&env.config.database_url(), &env.config.db_options())
        .await
        .unwrap();
    let at = env.clock.now();
    let rows = env.rows().await;
    let (a, b) = (&rows[0], &rows[1]);
    let activate = |row: &crate::harness::Row| Write::Row {
        id: row.id,
        expected: KeyText::new(row.key.clone()),
        at,
        change: Change::Activate {
            facts: facts(&row.key),
            next_at: at,
        },
        event: Some(Event::new(row.id, at, EventKind::Accepted)),
    };
    store.apply(&[activate(a), activate(b)]).await.unwrap();
    let renewed = env.mint(Kind::Collections, APP, "user-0");
    let renew = |row: &crate::harness::Row, expected: &str| Write::Row {
        id: row.id,
        expected: KeyText::new(expected.to_owned()),
        at,
        change: Change::Renew {
            key: KeyText::new(renewed.clone()),
            facts: facts(&renewed),
            next_at: at + DAY as i64,
        },
        event: Some(Event::new(row.id, at, EventKind::Renewed)),
    };
    let one_kind = [
        renew(a, &a.key),
        renew(b, "a key the row no longer holds"),
        Write::Event(Event::new(b.id, at, EventKind::TokenError)),
    ];
    assert_eq!(store.apply(&one_kind).await.unwrap(), [true, false, true]);
    let retry = Write::Row {
        id: a.id,
        expected: KeyText::new(renewed.clone()),
        at,
        change: Change::Retry {
            at: at + 60,
            reason: "test".to_owned(),
            refused_ms: None,
            unanswered_at: None,
        },
        event: Some(Event::new(a.id, at, EventKind::TokenError)),
    };
    let two_kinds = [retry, renew(b, "a key the row no longer holds")];
    assert_eq!(store.apply(&two_kinds).await.unwrap(), [true, false]);
    store.close().await;

    assert_eq!(
        outcomes(&env, a.id).await,
        ["accepted", "renewed", "token_error"]
    );
    assert_eq!(
        outcomes(&env, b.id).await,
        ["accepted", "superseded", "token_error", "superseded"]
    );
    let rows = env.rows().await;
    assert_eq!(
        (rows[0].key.as_str(), rows[0].renewals),
        (renewed.as_str(), 1)
    );
    assert_eq!(
        (rows[1].key.as_str(), rows[1].renewals),
        (b.key.as_str(), 0)
    );
    // The renewed key's predecessor, and nothing for the renewal that did not apply.
    let lineage: Vec<(i64,)> = on_backend!(
        env.db,
        "SELECT key_id FROM store_key_lineage",
        |pool, sql| sqlx::query_as(sql).fetch_all(pool).await.unwrap()
    );
    assert_eq!(lineage, [(a.id,)]);
}

async fn outcomes(env: &TestEnv, id: i64) -> Vec<String> {
    let all = env.outcomes(id).await;
    all.into_iter().map(|(o, _, _)| o).collect()
}

fn facts(key: &str) -> KeyFacts {
    claims::decode(key).unwrap().facts()
}

crate::backend::on_both_databases!(
    a_batch_records_what_it_applied_and_what_it_did_not,
    a_backend_write_during_a_renewal_wins,
    sigterm_mid_renewal_leaves_a_consistent_database_and_a_restart_carries_on,
);
