//! Secrets hygiene: a whole scenario at trace level, then every log line, metric, CLI output and
//! error message searched for keys, access tokens and secrets. None may appear.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::time::Duration;
use storekeyd::policy::state::State;

use storekeyd::config::Application;
use storekeyd::emulator::Faults;
use storekeyd::policy::claims::Kind;
use tokio::process::Command;

use crate::harness::{TENANT, TestEnv, sigterm, write_private};

/// The parts of a JWT that identify it: its payload and the start of its signature.
fn fragments(jwt: &str) -> Vec<String> {
    jwt.split('.')
        .skip(1)
        .filter(|p| p.len() >= 16)
        .map(|p| p[..p.len().min(40)].to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_token_or_secret_appears_in_any_output() {
    let mut env = TestEnv::new().await;
    // Mallory's key is believed revoked on its third refusal, each after a backoff.
    env.patience = env.patience.max(Duration::from_secs(90));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.config.metrics.listen = format!("127.0.0.1:{port}").parse().unwrap();
    // An application whose secret Entra refuses: its errors travel through logs and `check`.
    env.emu
        .register_app(TENANT, "app-stale", "current-secret-value");
    let stale = env.dir.path().join("stale.secret");
    write_private(&stale, "stale-secret-value-123");
    env.config.applications.push(Application {
        name: None,
        tenant_id: TENANT.into(),
        client_id: "app-stale".into(),
        client_secret_file: Some(stale),
        ..Application::default()
    });
    // Credentials without secrets: their keys, assertions and tokens must not leak either, nor
    // through the errors of a federated token Entra refuses.
    let year = env.clock.now() + 365 * 86_400;
    let private_key = env.add_certificate_app("app-cert", year);
    let audience = storekeyd::remote::entra::TOKEN_EXCHANGE_AUDIENCE;
    let federated = env.add_federated_app("app-fed", audience, 3600);
    let refused = env.add_federated_app("app-fed-wrong", "api://Other", 3600);
    env.add_managed_identity_app("app-mi");
    let config = env.write_config();
    for app in ["app-cert", "app-fed", "app-fed-wrong", "app-mi"] {
        env.add_due_key(&format!("user-of-{app}"), app).await;
    }
    env.add_due_user("alice").await;
    env.add_due_user("bob").await;
    let revoked = env.add_due_user("mallory").await;
    env.emu.revoke_key(&revoked);
    env.add_due_key("stale-user", "app-stale").await;
    env.store(
        "garbage",
        Kind::Collections,
        "eyJhbGciOiJub25lIn0.eyJzZWNyZXQiOiJ0b3Atc2VjcmV0LXBheWxvYWQifQ.c2ln",
    )
    .await;
    env.set_faults(Faults {
        error_503_rate: 0.2,
        ..Faults::default()
    });

    let log = env.dir.path().join("trace.log");
    let child = Command::new(env!("CARGO_BIN_EXE_storekeyd"))
        .args(["run", "--config"])
        .arg(&config)
        .env("STOREKEYD_LOG", "trace")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    env.wait_until("five renewed, mallory flagged", || async {
        let rows = env.rows().await;
        rows.iter().filter(|r| r.renewals >= 1).count() == 5
            && rows.iter().any(|r| r.state == State::Revoked)
    })
    .await;
    let mut outputs = Vec::new();
    for path in ["/metrics", "/readyz", "/healthz"] {
        let resp = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
            .await
            .unwrap();
        outputs.push((path.to_owned(), resp.text().await.unwrap()));
    }
    sigterm(&child);
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.status.success());
    outputs.push((
        "trace log".to_owned(),
        std::fs::read_to_string(&log).unwrap(),
    ));

    let commands: [&[&str]; 9] = [
        &["status"],
        &["status", "--json"],
        &["inspect", "--row", "1"],
        &["inspect", "--json", "--row", "5"],
        &["check"],
        &["renew", "--due", "--dry-run"],
        &["renew", "--row", "4"],
        &["add", "eve", "-"],
        &["import", "-"],
    ];
    for args in commands {
        let stdin = match args[0] {
            "add" => "eyJhbGciOiJSUzI1NiJ9.bm90LWpzb24tc2VjcmV0LWJ5dGVz.c2lnbmF0dXJlLXNpZ25hdHVyZQ",
            "import" => {
                "u1,eyJhbGciOiJSUzI1NiJ9.bm90LWpzb24tc2VjcmV0LWJ5dGVz.c2lnbmF0dXJlLXNpZ25hdHVyZQ\nu2,x.y.z\n"
            }
            _ => "",
        };
        let out = env.cli(args, stdin).await;
        outputs.push((args.join(" "), format!("{}{}", out.stdout, out.stderr)));
    }
    let trace_lines = outputs
        .iter()
        .find(|(n, _)| n == "trace log")
        .map_or(0, |(_, t)| t.lines().count());
    assert!(
        trace_lines > 100,
        "the trace log is suspiciously short ({trace_lines} lines)"
    );

    let mut needles: Vec<(String, String)> = Vec::new();
    for key in env.emu.issued_keys() {
        needles.extend(fragments(&key).into_iter().map(|f| ("a key".to_owned(), f)));
    }
    for token in env.emu.issued_tokens() {
        needles.extend(
            fragments(&token)
                .into_iter()
                .map(|f| ("an access token".to_owned(), f)),
        );
    }
    for assertion in env
        .emu
        .seen_assertions()
        .iter()
        .chain([&federated, &refused])
    {
        needles.extend(
            fragments(assertion)
                .into_iter()
                .map(|f| ("a client assertion or federated token".to_owned(), f)),
        );
    }
    for line in private_key.lines().filter(|l| !l.starts_with("-----")) {
        needles.push((
            "a private key".to_owned(),
            line[..line.len().min(40)].to_owned(),
        ));
    }
    assert!(
        env.emu.seen_assertions().len() >= 4,
        "the new credentials were not used"
    );
    for secret in [
        "secret-of-app-main",
        "secret-of-app-other",
        "stale-secret-value-123",
        "current-secret-value",
    ] {
        needles.push(("a client secret".to_owned(), secret.to_owned()));
    }
    for f in [
        "eyJzZWNyZXQiOiJ0b3Atc2VjcmV0LXBheWxvYWQifQ",
        "bm90LWpzb24tc2VjcmV0LWJ5dGVz",
        "c2lnbmF0dXJlLXNpZ25hdHVyZQ",
    ] {
        needles.push(("an invalid key's material".to_owned(), f.to_owned()));
    }
    assert!(env.emu.issued_tokens().len() >= 2 && env.emu.issued_keys().len() >= 6);
    for (source, text) in &outputs {
        for (what, needle) in &needles {
            assert!(
                !text.contains(needle.as_str()),
                "{what} appears in the output of `{source}`"
            );
        }
    }
    eprintln!(
        "hygiene: {} outputs ({trace_lines} trace log lines) searched for {} fragments of {} keys, {} tokens, {} assertions, a private key and 4 secrets: none found",
        outputs.len(),
        needles.len(),
        env.emu.issued_keys().len(),
        env.emu.issued_tokens().len(),
        env.emu.seen_assertions().len()
    );

    let db = env.dir.path().join("keys.db");
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", db.display());
        if let Ok(meta) = std::fs::metadata(&path) {
            assert_eq!(
                meta.permissions().mode() & 0o007,
                0,
                "{path} is open to others"
            );
        }
    }
    // Group access follows the umask (the unit's 0007 makes it 0660, for the backend's user).
    let umask = current_umask();
    assert_eq!(
        std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
        0o660 & !umask
    );
}

/// The process's umask (read from /proc, so nothing is changed to learn it).
fn current_umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    u32::from_str_radix(line.trim_start_matches("Umask:").trim(), 8).unwrap()
}
