//! The operator CLI: outputs and exit codes (0 ok, 1 internal, 2 usage, 3 unhealthy).

use storekeyd::policy::claims::Kind;
use storekeyd::policy::state::State;

use crate::harness::{APP, DAY, KEY_LIFETIME, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_inspect_and_status() {
    let env = TestEnv::new().await;
    let key = env.mint(Kind::Purchase, APP, "alice");
    let payload = key.split('.').nth(1).unwrap()[..24].to_owned();

    let out = env.cli(&["add", "alice"], &key).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("stored purchase key") && !out.stdout.contains(&payload),
        "{out:?}"
    );
    assert_eq!(env.row("alice", Kind::Purchase).await.state, State::Pending);

    let out = env.cli(&["add", "bob"], "not-a-key").await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .contains("refusing to store the key: not a Store ID key"),
        "{out:?}"
    );
    let out = env
        .cli(&["add", "alice", "-", "--kind", "collections"], &key)
        .await;
    assert_eq!(out.code, 2, "kind mismatch: {out:?}");

    let out = env.cli(&["inspect", "-"], &key).await;
    assert_eq!(out.code, 0, "{out:?}");
    for field in [
        "fingerprint",
        "kind          purchase",
        "client id     app-main",
        "expires",
        "renews at",
        "payload       present (not shown)",
    ] {
        assert!(
            out.stdout.contains(field),
            "missing {field}: {}",
            out.stdout
        );
    }
    assert!(
        !out.stdout.contains(&payload),
        "inspect printed key material"
    );
    let out = env.cli(&["inspect", "--json", "--row", "1"], "").await;
    assert_eq!(out.code, 0, "{out:?}");
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["row"]["state"], "pending");
    assert_eq!(env.cli(&["inspect", "garbage"], "").await.code, 2);

    // Pending only: healthy.
    let out = env.cli(&["status"], "").await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("pending") && out.stdout.contains("flagged: none"),
        "{}",
        out.stdout
    );

    // A flagged key makes status unhealthy, and it is listed with its reason.
    env.store("carol", Kind::Collections, "garbage").await;
    let mut env = env;
    env.spawn_daemon().await;
    env.wait_until("carol flagged", || async {
        env.row("carol", Kind::Collections).await.state == State::Invalid
    })
    .await;
    env.stop_daemon().await;
    let out = env.cli(&["status"], "").await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stdout.contains("flagged: 1")
            && out.stdout.contains("carol")
            && out.stdout.contains("not a Store ID key"),
        "{}",
        out.stdout
    );
    let out = env.cli(&["status", "--json"], "").await;
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["flagged_total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_keeps_every_valid_line_and_reports_the_rest() {
    let env = TestEnv::new().await;
    let k = |u: &str| env.mint(Kind::Collections, APP, u);
    let csv = format!(
        "user_ref,key,kind\np1,{}\np2,not-a-key\n\"p,3\",{},collections\np4,{},purchase\n\np5,{}\n",
        k("p1"),
        k("p3"),
        k("p4"),
        k("p5")
    );
    let input = env.dir.path().join("keys.csv");
    std::fs::write(&input, &csv).unwrap();
    let out = env.cli(&["import", input.to_str().unwrap()], "").await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stdout.contains("imported 3 keys, rejected 2 lines"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("line 3: not a Store ID key"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("line 5: kind `purchase` given, but the key is a collections key"),
        "{}",
        out.stderr
    );
    assert_eq!(env.rows().await.len(), 3);
    assert_eq!(
        env.row("p,3", Kind::Collections).await.state,
        State::Pending
    );

    let jsonl = format!(
        "{}\n{{\"user_ref\": \"q2\"}}\n",
        serde_json::json!({"user_ref": "q1", "key": k("q1")})
    );
    let out = env.cli(&["import", "-"], &jsonl).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr.contains("line 2: ") && out.stderr.contains("missing field `key`"),
        "{}",
        out.stderr
    );
    assert_eq!(env.rows().await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_one_row_now_or_rehearse_it() {
    let env = TestEnv::new().await;
    let key = env.emu.mint_at(
        Kind::Collections,
        APP,
        "alice",
        KEY_LIFETIME,
        env.clock.now() - DAY as i64,
    );
    env.store("alice", Kind::Collections, &key).await;
    let revoked = env.add_user("mallory").await;
    env.emu.revoke_key(&revoked);

    let out = env.cli(&["renew", "--row", "1", "--dry-run"], "").await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("would POST key")
            && out.stdout.contains(&env.emu.renew_url(Kind::Collections)),
        "{out:?}"
    );
    assert_eq!(env.emu.stats().renew_requests, 0, "a dry run sent the key");

    let out = env.cli(&["renew", "--row", "1"], "").await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("#1 alice collections: renewed"),
        "{out:?}"
    );
    assert_eq!(env.row("alice", Kind::Collections).await.renewals, 1);

    let out = env.cli(&["renew", "--due"], "").await;
    assert_eq!(
        (out.code, out.stdout.trim()),
        (0, "no key is due"),
        "{out:?}"
    );

    // A one-shot process never flags a refusal: it cannot renew another key early to learn
    // whether the credential works (the daemon does), so the key stays active, its refusals
    // counted for the daemon's guard.
    for _ in 0..3 {
        let out = env.cli(&["renew", "--row", "2"], "").await;
        assert_eq!(out.code, 3, "{out:?}");
        assert!(
            out.stdout.contains("not renewed, will be retried")
                && out.stdout.contains("AuthenticationTokenInvalid"),
            "{out:?}"
        );
    }
    let row = env.row("mallory", Kind::Collections).await;
    assert_eq!((row.state.as_str(), row.renewals), ("active", 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_migrate_and_bad_config() {
    let mut env = TestEnv::new().await;
    let out = env.cli(&["check"], "").await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains("ok    application app-main (app-main), secret credential: access token"),
        "{}",
        out.stdout
    );

    env.config.database_url = Some(format!(
        "sqlite://{}",
        env.dir.path().join("fresh.db").display()
    ));
    let out = env.cli(&["status"], "").await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("run `storekeyd migrate`"), "{out:?}");
    let out = env.cli(&["migrate"], "").await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("schema at version 10"));
    assert_eq!(env.cli(&["status"], "").await.code, 0);

    env.emu.register_app("test-tenant", "app-main", "rotated");
    let out = env.cli(&["check"], "").await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stdout
            .contains("FAIL  application app-main (app-main), secret credential: Entra ID refused the token request for `app-main`"),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("secret-of-app-main"),
        "the secret was printed"
    );

    let bad = env.dir.path().join("bad.toml");
    std::fs::write(&bad, "[renew]\nmargin = \"soon\"\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_storekeyd"))
        .args(["--config", bad.to_str().unwrap(), "check"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("config: `renew.margin`: expected a duration")
    );
}

/// A player controls a key's claims and a backend its user reference: an escape sequence or a
/// newline there is printed escaped by `status`, `inspect` and their JSON, never raw (it could
/// rewrite the operator's terminal, or forge a line of the report).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_text_reaches_the_terminal_escaped() {
    use storekeyd::emulator::keymint;
    use storekeyd::policy::claims::{
        AUD_COLLECTIONS, CLAIM_CLIENT_ID, CLAIM_REFRESH_URI, CLAIM_USER_ID,
    };
    let mut env = TestEnv::new().await;
    let now = env.clock.now();
    let hostile = "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31m\u{202e}";
    let key = keymint::encode_claims(&serde_json::json!({
        "aud": AUD_COLLECTIONS, "iat": now, "exp": now + 30 * 86_400,
        CLAIM_CLIENT_ID: format!("app-{hostile}"),
        CLAIM_USER_ID: format!("user-{hostile}"),
        CLAIM_REFRESH_URI: format!("https://evil/{hostile}"),
    }));
    let user_ref = format!("mallory{hostile}\nforged line");
    env.store(&user_ref, Kind::Collections, &key).await;
    env.spawn_daemon().await;
    env.wait_until("the key flagged misconfigured", || async {
        env.count(State::Misconfigured).await == 1
    })
    .await;
    env.stop_daemon().await;
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["inspect", "--row", "1"],
        &["inspect", "--json", "--row", "1"],
    ] {
        let out = env.cli(args, "").await;
        let raw: Vec<char> = out
            .stdout
            .chars()
            .filter(|&c| (c.is_control() && c != '\n') || c == '\u{202e}')
            .collect();
        assert!(raw.is_empty(), "{args:?} printed {raw:?}: {}", out.stdout);
        assert!(
            out.stdout.contains("mallory") && !out.stdout.contains("\nforged line"),
            "{args:?}: {}",
            out.stdout
        );
    }
    let out = env.cli(&["inspect", "-"], &key).await;
    assert!(
        out.stdout.contains("user-\\u{1b}]0;pwned\\u{7}"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains('\u{1b}'), "{}", out.stdout);
}
