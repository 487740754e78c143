//! `/metrics`, `/healthz` and `/readyz` on the daemon's loopback listener.

use storekeyd::config::Application;

use crate::harness::{Db, TENANT, TestEnv, write_private};

/// Runs `promtool check metrics` on the text; required where CI installed it.
fn promtool(text: &str) {
    use std::io::Write as _;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(_) if std::env::var_os("STOREKEYD_REQUIRE_PROMTOOL").is_none() => {
            eprintln!("promtool not installed; skipping its check (CI installs it)");
            return;
        }
        Err(e) => panic!("promtool is required here: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn metrics_describe_renewals_and_keys_without_key_material(db: Db) {
    let mut env = TestEnv::on(db).await;
    let keys = [
        env.add_due_user("alice").await,
        env.add_due_user("mallory").await,
    ];
    env.emu.revoke_key(&keys[1]);
    env.spawn_daemon().await;
    env.wait_until("alice renewed, mallory flagged", || async {
        let rows = env.rows().await;
        rows.iter().any(|r| r.state == "revoked") && rows.iter().any(|r| r.renewals >= 1)
    })
    .await;

    let (status, text) = env.get("/metrics").await;
    assert_eq!(status, 200);
    promtool(&text);
    for expected in [
        "storekeyd_renewals_total{outcome=\"renewed\"} ",
        "storekeyd_renewals_total{outcome=\"revoked\"} 1\n",
        "storekeyd_keys{state=\"revoked\",kind=\"collections\"} 1\n",
        "storekeyd_keys{state=\"active\",kind=\"collections\"} 1\n",
        "storekeyd_earliest_expiry_timestamp_seconds ",
        "storekeyd_keys_due ",
        "storekeyd_renew_request_duration_seconds_count ",
        "storekeyd_token_request_duration_seconds_bucket{le=\"+Inf\"} ",
        "storekeyd_token_requests_total{outcome=\"ok\"} ",
        "storekeyd_renewals_in_flight ",
        "storekeyd_last_renewal_success_timestamp_seconds ",
        "# HELP storekeyd_renewals_total ",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    for row in env.rows().await {
        let payload = row.key.split('.').nth(1).unwrap();
        assert!(!text.contains(&payload[..24]), "key material in /metrics");
    }
    env.stop_daemon().await;
}

async fn health_and_readiness_report_each_check(db: Db) {
    let mut env = TestEnv::on(db).await;
    env.spawn_daemon().await;
    env.wait_until("ready", || async { env.get("/readyz").await.0 == 200 })
        .await;
    let (status, body) = env.get("/readyz").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("ok    database") && body.contains("ok    application app-main"),
        "{body}"
    );
    assert_eq!(env.get("/healthz").await, (200, "ok\n".to_owned()));
    env.stop_daemon().await;

    // An application whose secret Entra refuses makes the daemon not ready, and says why.
    env.emu
        .register_app(TENANT, "app-broken", "the-real-secret");
    let path = env.dir.path().join("broken.secret");
    write_private(&path, "a-stale-secret");
    env.config.applications.push(Application {
        name: Some("broken".into()),
        tenant_id: TENANT.into(),
        client_id: "app-broken".into(),
        client_secret_file: Some(path),
        ..Application::default()
    });
    env.spawn_daemon().await;
    // Not "no access token requested yet", which it says until Entra answered.
    env.wait_until("not ready for Entra's refusal", || async {
        let body = env.get("/readyz").await.1;
        body.contains("fail  application broken") && body.contains("invalid_client")
    })
    .await;
    let (status, body) = env.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("invalid_client"), "{body}");
    assert!(
        !body.contains("a-stale-secret"),
        "the secret leaked into /readyz"
    );
    assert!(env.get("/metrics").await.1.contains("storekeyd_ready 0\n"));
    env.stop_daemon().await;
}

crate::backend::on_both_databases!(
    metrics_describe_renewals_and_keys_without_key_material,
    health_and_readiness_report_each_check,
);
