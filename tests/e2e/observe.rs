//! `/metrics`, `/healthz` and `/readyz` on the daemon's loopback listener.

use storekeyd::config::Application;
use storekeyd::policy::state::State;

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
        rows.iter().any(|r| r.state == State::Revoked) && rows.iter().any(|r| r.renewals >= 1)
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

/// A local user holding idle connections to the metrics port, more than the daemon has
/// descriptors (256 here), neither stalls renewals nor keeps a scrape from being answered: the
/// listener takes 64 at a time and drops each that sends no request within 5 s. Before, every
/// connection was taken and held, and the process ran out of descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_the_metrics_port_starve_nothing() {
    let mut env = TestEnv::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.config.metrics.listen = format!("127.0.0.1:{port}").parse().unwrap();
    env.config.renew.concurrency = 16;
    // The idle connections go 64 every 5 s: about 25 s for the scrape's turn.
    env.patience = std::time::Duration::from_secs(120);
    let config = env.write_config();
    let mut daemon = tokio::process::Command::new("sh")
        .args(["-c", r#"ulimit -n 256 && exec "$0" run --config "$1""#])
        .arg(env!("CARGO_BIN_EXE_storekeyd"))
        .arg(&config)
        .env("STOREKEYD_LOG", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // A connection per request: a pooled one, taken before the idle ones came, proves nothing.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(std::time::Duration::from_secs(2))
        .build()
        .unwrap();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    env.wait_until("the daemon answers", || async {
        client.get(url("/healthz")).send().await.is_ok()
    })
    .await;

    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    env.add_due_users(20).await;
    env.wait_until(
        "every key renewed while the connections are held",
        || async { env.rows().await.iter().all(|r| r.renewals == 1) },
    )
    .await;
    env.wait_until(
        "a scrape answered while the connections are held",
        || async {
            client
                .get(url("/metrics"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        },
    )
    .await;
    drop(idle);
    crate::harness::sigterm(&daemon);
    daemon.wait().await.unwrap();
}
