//! Keys that cannot be renewed are flagged with a reason, and never hold up the others.

use std::time::Duration;
use storekeyd::policy::state::State;

use storekeyd::emulator::Faults;
use storekeyd::emulator::keymint::{self, KeySpec};
use storekeyd::policy::claims::{AUD_COLLECTIONS, CLAIM_CLIENT_ID, Kind};
use tokio::net::TcpListener;

use crate::harness::{APP, DAY, Db, TestEnv};

async fn a_revoked_key_is_flagged_after_a_fresh_token_retry_and_others_renew(db: Db) {
    let mut env = TestEnv::on(db).await;
    env.add_due_user("alice").await;
    let revoked = env.add_due_user("mallory").await;
    // Not due, but old enough to be renewed early as the canary that shows the credential works
    // (alice's renewal may have begun before mallory's refusal: no evidence). Once alice has
    // renewed, she is the canary instead (a key the Store renewed goes first): either brings
    // the evidence.
    let issued = env.clock.now() - 2 * DAY as i64;
    let carol = env
        .emu
        .mint_at(Kind::Collections, APP, "carol", 30 * DAY as i64, issued);
    env.store("carol", Kind::Collections, &carol).await;
    assert!(env.emu.revoke_key(&revoked));
    env.spawn_daemon().await;

    env.wait_until("mallory flagged and alice renewed", || async {
        let rows = env.rows().await;
        rows.iter().any(|r| r.state == State::Revoked)
            && env.row("alice", Kind::Collections).await.renewals >= 1
    })
    .await;
    env.stop_daemon().await;

    let row = env.row("mallory", Kind::Collections).await;
    assert_eq!(row.state, State::Revoked);
    assert!(row.reason.unwrap().contains("AuthenticationTokenInvalid"));
    let outcomes: Vec<String> = env
        .outcomes(row.id)
        .await
        .into_iter()
        .map(|(o, _, _)| o)
        .collect();
    // Each attempt retries once with a fresh token (`auth_invalid`); until a renewal begun after
    // the first refusal vouches for the credential, the guard defers (another `auth_invalid`),
    // and believes the Store on the next refusal after that renewal.
    assert_eq!(outcomes.first().map(String::as_str), Some("accepted"));
    assert_eq!(
        outcomes.last().map(String::as_str),
        Some("revoked"),
        "{outcomes:?}"
    );
    let middle = &outcomes[1..outcomes.len() - 1];
    assert!(
        !middle.is_empty() && middle.iter().all(|o| o == "auth_invalid"),
        "{outcomes:?}"
    );
    assert!(middle.len() <= 5, "{outcomes:?}");
    for user in ["alice", "carol"] {
        assert_eq!(env.row(user, Kind::Collections).await.state, State::Active);
    }
}

async fn client_id_mismatch_is_misconfigured_not_revoked(db: Db) {
    let mut env = TestEnv::on(db).await;
    env.add_user("alice").await;
    env.set_faults(Faults {
        inconsistent_client_ids: vec![APP.into()],
        ..Faults::default()
    });
    env.spawn_daemon().await;

    env.run_until(Duration::from_secs(DAY), "alice flagged", || async {
        env.row("alice", Kind::Collections).await.state == State::Misconfigured
    })
    .await;
    env.stop_daemon().await;
    let row = env.row("alice", Kind::Collections).await;
    assert_eq!(row.state, State::Misconfigured);
    assert!(row.reason.unwrap().contains("InconsistentClientId"));
}

async fn garbage_rows_are_flagged_invalid_while_the_others_renew(db: Db) {
    let mut env = TestEnv::on(db).await;
    env.add_user("alice").await;
    env.store("not-a-jwt", Kind::Collections, "hello world")
        .await;
    let wrong_aud = keymint::encode_claims(&serde_json::json!({
        "aud": "https://example.com/keys", "iat": 1, "exp": 4_000_000_000i64, CLAIM_CLIENT_ID: APP
    }));
    env.store("wrong-aud", Kind::Collections, &wrong_aud).await;
    env.store("huge", Kind::Collections, &"A".repeat(1 << 20))
        .await;
    let mislabeled = env.mint(Kind::Purchase, APP, "mislabeled");
    env.store("mislabeled", Kind::Collections, &mislabeled)
        .await;
    let no_app = env.mint(Kind::Collections, "app-unknown", "stranger");
    env.store("stranger", Kind::Collections, &no_app).await;
    env.add_user("bob").await;
    env.spawn_daemon().await;

    env.run_until(
        Duration::from_secs(DAY),
        "alice and bob renewed",
        || async { env.rows().await.iter().filter(|r| r.renewals >= 1).count() == 2 },
    )
    .await;
    env.stop_daemon().await;

    for (user, reason) in [
        ("not-a-jwt", "not a JWT"),
        (
            "wrong-aud",
            "neither the collections nor the purchase audience",
        ),
        ("huge", "more than the"),
        ("mislabeled", "row kind is `collections`"),
    ] {
        let row = env.row(user, Kind::Collections).await;
        assert_eq!(row.state, State::Invalid, "{user}");
        let got = row.reason.unwrap();
        assert!(got.contains(reason), "{user}: {got}");
        assert!(
            got.len() < 300,
            "{user}: the reason must not echo the input"
        );
    }
    assert_eq!(
        env.row("stranger", Kind::Collections).await.state,
        State::Misconfigured
    );
    assert_eq!(AUD_COLLECTIONS, Kind::Collections.audience());
}

async fn a_key_whose_refresh_uri_points_elsewhere_never_reaches_that_host(db: Db) {
    let mut env = TestEnv::on(db).await;
    // The host the key advertises: it must never see a connection.
    let elsewhere = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = elsewhere.local_addr().unwrap();
    let contacted = tokio::spawn(async move { elsewhere.accept().await.is_ok() });

    let mut spec = KeySpec::collections(APP, env.clock.now() - 20 * DAY as i64, 30 * DAY as i64);
    spec.refresh_uri = format!("http://{addr}/v6.0/b2b/keys/renew");
    env.store("alice", Kind::Collections, &keymint::mint(&spec))
        .await;
    env.add_user("bob").await;
    env.spawn_daemon().await;

    env.run_until(Duration::from_secs(DAY), "bob renewed", || async {
        env.row("bob", Kind::Collections).await.renewals >= 1
    })
    .await;
    env.stop_daemon().await;

    // Fixable in the configuration (an egress proxy, another spelling): misconfigured, and
    // checked again at the next start.
    let row = env.row("alice", Kind::Collections).await;
    assert_eq!(row.state, State::Misconfigured);
    assert!(row.reason.unwrap().contains(&addr.to_string()));
    assert!(
        !contacted.is_finished(),
        "the key's refreshUri host was contacted"
    );
    contacted.abort();
    assert_eq!(
        env.emu.stats().renewed,
        1,
        "only bob's key reached the configured endpoint"
    );
}

async fn a_key_stored_with_whitespace_around_it_is_stored_and_sent_trimmed(db: Db) {
    let mut env = TestEnv::on(db).await;
    // Not due: checked and stored, nothing renewed yet.
    let fresh = env.mint(Kind::Collections, APP, "fresh");
    env.store("fresh", Kind::Collections, &format!("{fresh}\r\n"))
        .await;
    let issued = env.clock.now() - 20 * DAY as i64;
    let key = env
        .emu
        .mint_at(Kind::Collections, APP, "padded", 30 * DAY as i64, issued);
    env.store("padded", Kind::Collections, &format!("  {key}\n"))
        .await;
    env.spawn_daemon().await;
    env.wait_until("the fresh key checked", || async {
        env.row("fresh", Kind::Collections).await.state == State::Active
    })
    .await;
    let row = env.row("fresh", Kind::Collections).await;
    assert!(row.key == fresh, "stored with its padding");
    // The backend stores it again, padded, on the next login: the same key, nothing changes.
    env.store("fresh", Kind::Collections, &format!("{fresh}\n"))
        .await;
    let row = env.row("fresh", Kind::Collections).await;
    assert!(
        row.key == fresh && row.state == State::Active,
        "{}",
        row.state
    );
    // The emulator refuses a padded key outright: only a trimmed one renews.
    env.wait_until("the padded key renewed", || async {
        env.row("padded", Kind::Collections).await.renewals >= 1
    })
    .await;
    env.stop_daemon().await;
    assert_eq!(env.count(State::Active).await, 2);
}

async fn a_refresh_uri_spelled_differently_is_misconfigured_until_the_config_is_fixed(db: Db) {
    let mut env = TestEnv::on(db).await;
    // The key advertises the emulator at 127.0.0.1; the configuration spells it `localhost`.
    let right = env.config.endpoints.collections.clone();
    env.config.endpoints.collections = right.replace("127.0.0.1", "localhost");
    env.add_due_user("alice").await;
    env.spawn_daemon().await;
    env.wait_until("alice checked", || async {
        env.row("alice", Kind::Collections).await.state != State::Pending
    })
    .await;
    env.stop_daemon().await;
    let row = env.row("alice", Kind::Collections).await;
    assert_eq!(row.state, State::Misconfigured, "{:?}", row.reason);
    assert_eq!(env.emu.stats().renew_requests, 0);

    // Fixed and restarted: checked again, and renewed.
    env.config.endpoints.collections = right;
    env.spawn_daemon().await;
    env.wait_until("alice renewed", || async {
        env.row("alice", Kind::Collections).await.renewals >= 1
    })
    .await;
    env.stop_daemon().await;
    assert_eq!(env.count(State::Active).await, 1);
}

crate::backend::on_both_databases!(
    a_revoked_key_is_flagged_after_a_fresh_token_retry_and_others_renew,
    client_id_mismatch_is_misconfigured_not_revoked,
    garbage_rows_are_flagged_invalid_while_the_others_renew,
    a_key_whose_refresh_uri_points_elsewhere_never_reaches_that_host,
    a_key_stored_with_whitespace_around_it_is_stored_and_sent_trimmed,
    a_refresh_uri_spelled_differently_is_misconfigured_until_the_config_is_fixed,
);
