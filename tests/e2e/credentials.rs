//! Credentials without long-lived secrets: a certificate, a federated token file and a managed
//! identity renew keys side by side with secrets; each broken credential is a clear error naming
//! its application while the others keep renewing and nothing is flagged.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use storekeyd::policy::state::State;

use jsonwebtoken::Algorithm;
use storekeyd::config::{Application, AssertionAlgorithm};
use storekeyd::policy::claims::Kind;
use storekeyd::remote::entra::TOKEN_EXCHANGE_AUDIENCE;

use crate::harness::{APP, DAY, TENANT, TestEnv, metric, write_private};

/// What a Kubernetes cluster's service account tokens say.
pub(crate) const CLUSTER_ISSUER: &str = "https://oidc.cluster.example/issuer";
pub(crate) const SERVICE_ACCOUNT: &str = "system:serviceaccount:games:storekeyd";

/// A self-signed RSA certificate valid until `not_after` and its key, both PEM.
pub(crate) fn certificate(not_after: i64) -> (String, String) {
    let key = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        .unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["storekeyd".into()]).unwrap();
    params.not_before =
        time::OffsetDateTime::from_unix_timestamp(not_after - 400 * DAY as i64).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(path: &std::path::Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn application(client_id: &str, edit: impl FnOnce(&mut Application)) -> Application {
    let mut app = Application {
        name: Some(client_id.to_owned()),
        tenant_id: TENANT.into(),
        client_id: client_id.to_owned(),
        ..Application::default()
    };
    edit(&mut app);
    app
}

impl TestEnv {
    /// An application whose certificate (registered with Entra) is in `client_id.crt` and its key
    /// in `client_id.key` (0600). Returns the key's PEM.
    pub(crate) fn add_certificate_app(&mut self, client_id: &str, not_after: i64) -> String {
        let (cert, key) = certificate(not_after);
        self.emu
            .register_certificate(TENANT, client_id, &cert)
            .unwrap();
        let (cert_path, key_path) = self.credential_paths(client_id);
        write(&cert_path, &cert, 0o644);
        write_private(&key_path, &key);
        self.config.applications.push(application(client_id, |a| {
            a.certificate_file = Some(cert_path);
            a.private_key_file = Some(key_path);
        }));
        key
    }

    fn credential_paths(&self, client_id: &str) -> (PathBuf, PathBuf) {
        let dir = self.dir.path();
        (
            dir.join(format!("{client_id}.crt")),
            dir.join(format!("{client_id}.key")),
        )
    }

    /// An application that trusts the cluster's service account, its token in a file as the
    /// workload identity webhook projects it. Returns the token.
    pub(crate) fn add_federated_app(
        &mut self,
        client_id: &str,
        audience: &str,
        life: i64,
    ) -> String {
        self.emu
            .register_federated(TENANT, client_id, CLUSTER_ISSUER, SERVICE_ACCOUNT);
        let token = self
            .emu
            .federated_token(CLUSTER_ISSUER, SERVICE_ACCOUNT, audience, life);
        let path = self.dir.path().join(format!("{client_id}.token"));
        write(&path, &token, 0o644);
        self.config.applications.push(application(client_id, |a| {
            a.federated_token_file = Some(path);
        }));
        token
    }

    /// An application that trusts a user-assigned managed identity of this (emulated) VM.
    pub(crate) fn add_managed_identity_app(&mut self, client_id: &str) {
        let (identity, principal) = (
            format!("mi-of-{client_id}"),
            format!("principal-{client_id}"),
        );
        self.emu
            .register_managed_identity(TENANT, &identity, &principal);
        let issuer = self.emu.tenant_issuer(TENANT);
        self.emu
            .register_federated(TENANT, client_id, &issuer, &principal);
        self.config.entra.managed_identity_endpoint = self.emu.managed_identity_endpoint();
        self.config.applications.push(application(client_id, |a| {
            a.managed_identity_client_id = Some(identity);
        }));
    }

    /// Whether the row holds the newest key the Store issued for its user, renewed once.
    async fn renewed_once(&self, user: &str) -> bool {
        let row = self.row(user, Kind::Collections).await;
        row.renewals == 1
            && self.emu.latest_key(Kind::Collections, user).as_deref() == Some(row.key.as_str())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_credential_renews_side_by_side() {
    let mut env = TestEnv::new().await;
    let year = env.clock.now() + 365 * DAY as i64;
    env.add_certificate_app("app-cert", year);
    env.add_certificate_app("app-cert-rs", year);
    env.config
        .applications
        .last_mut()
        .unwrap()
        .certificate_algorithm = Some(AssertionAlgorithm::RS256);
    env.add_federated_app("app-fed", TOKEN_EXCHANGE_AUDIENCE, 3600);
    env.add_managed_identity_app("app-mi");
    let apps = [APP, "app-cert", "app-cert-rs", "app-fed", "app-mi"];
    for app in apps {
        env.add_due_key(&format!("user-of-{app}"), app).await;
    }
    env.spawn_daemon().await;
    for app in apps {
        let user = format!("user-of-{app}");
        env.wait_until(&format!("{app}'s key renewed"), || env.renewed_once(&user))
            .await;
    }
    // The managed identity's token came from the metadata endpoint, and every application got
    // its own access token from Entra (the emulator checks each appid against the key).
    let stats = env.emu.stats();
    assert_eq!(stats.identity_tokens_issued, 1, "{stats:?}");
    assert!(stats.tokens_issued >= 5, "{stats:?}");
    // Each certificate application signs with the algorithm it is configured with.
    for (app, alg) in [
        ("app-cert", Algorithm::PS256),
        ("app-cert-rs", Algorithm::RS256),
    ] {
        let signed: Vec<_> = env
            .emu
            .seen_assertions()
            .iter()
            .filter_map(|a| {
                let claims =
                    jsonwebtoken::dangerous::insecure_decode_claims::<serde_json::Value>(a).ok()?;
                (claims["iss"] == app).then(|| jsonwebtoken::decode_header(a).unwrap().alg)
            })
            .collect();
        assert!(
            !signed.is_empty() && signed.iter().all(|a| *a == alg),
            "{app}: {signed:?}"
        );
    }
    let metrics = env.get("/metrics").await.1;
    assert!(
        metrics.contains(&format!(
            "storekeyd_credential_expiry_timestamp_seconds{{application=\"app-cert\"}} {year}\n"
        )),
        "{metrics}"
    );
    for (app, kind) in [
        (APP, "secret"),
        ("app-cert", "certificate"),
        ("app-fed", "federated"),
        ("app-mi", "managed_identity"),
    ] {
        let sample = format!("storekeyd_credential_info{{application=\"{app}\",kind=\"{kind}\"}}");
        assert_eq!(metric(&metrics, &sample), Some(1.0), "{sample}");
    }
    assert_eq!(env.get("/readyz").await.0, 200);
    env.stop_daemon().await;

    let out = env.cli(&["check"], "").await;
    assert_eq!(out.code, 0, "{out:?}");
    for line in [
        "ok    application app-main (app-main), secret credential: access token",
        "ok    application app-cert (app-cert), certificate credential (x5t#S256 ",
        "ok    application app-fed (app-fed), federated credential: access token",
        "ok    application app-mi (app-mi), managed_identity credential: access token",
    ] {
        assert!(out.stdout.contains(line), "missing {line}:\n{}", out.stdout);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_credential_names_its_application_and_stops_no_other() {
    let mut env = TestEnv::new().await;
    let now = env.clock.now();
    let year = now + 365 * DAY as i64;
    // An expired federated token, and one minted for another audience.
    env.add_federated_app("app-expired", TOKEN_EXCHANGE_AUDIENCE, -60);
    env.add_federated_app("app-audience", "api://SomethingElse", 3600);
    // A token file the platform never wrote.
    env.config.applications.push(application("app-nofile", |a| {
        a.federated_token_file = Some(env.dir.path().join("never-written.token"));
    }));
    // A private key anyone may read; a key that cannot be read at all (a directory, which even
    // root cannot read as a file); a key of another certificate.
    env.add_certificate_app("app-open-key", year);
    let (_, key) = env.credential_paths("app-open-key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.add_certificate_app("app-dir-key", year);
    let (_, key) = env.credential_paths("app-dir-key");
    std::fs::remove_file(&key).unwrap();
    std::fs::create_dir(&key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o700)).unwrap();
    env.add_certificate_app("app-mismatch", year);
    let (_, key) = env.credential_paths("app-mismatch");
    write(&key, &certificate(year).1, 0o600);
    // A certificate past its end: Entra refuses it.
    env.add_certificate_app("app-old-cert", now - 60);
    let broken = [
        (
            "app-expired",
            "AADSTS700024: Client assertion is not within its valid time range",
        ),
        (
            "app-audience",
            "AADSTS700212: No matching federated identity record found for presented assertion audience 'api://SomethingElse'",
        ),
        (
            "app-nofile",
            "application `app-nofile`: cannot read federated token file",
        ),
        (
            "app-open-key",
            "application `app-open-key`: private key file",
        ),
        (
            "app-dir-key",
            "application `app-dir-key`: cannot read private key file",
        ),
        (
            "app-mismatch",
            "application `app-mismatch`: the private key in",
        ),
    ];
    for (app, _) in broken {
        env.add_due_key(&format!("user-of-{app}"), app).await;
    }
    env.add_due_user("healthy").await;
    env.spawn_daemon().await;
    env.wait_until("the healthy key renewed", || env.renewed_once("healthy"))
        .await;
    for (app, _) in broken {
        let user = format!("user-of-{app}");
        env.wait_until(&format!("{app}'s key tried"), || async {
            env.row(&user, Kind::Collections).await.attempts > 0
        })
        .await;
    }
    let (status, ready) = env.get("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    for (app, error) in broken {
        let line = ready
            .lines()
            .find(|l| l.starts_with(&format!("fail  application {app}:")))
            .unwrap_or_else(|| panic!("no failing line for {app}:\n{ready}"));
        assert!(line.contains(error), "{app}: {line}");
    }
    assert!(ready.contains("ok    application app-main"), "{ready}");
    // Nothing is flagged: each broken application's key waits, active, to be tried again.
    for row in env.rows().await {
        assert_eq!(row.state, State::Active, "{row:?}");
    }
    env.stop_daemon().await;

    let out = env.cli(&["check"], "").await;
    assert_eq!(out.code, 3, "{out:?}");
    for (app, error) in broken {
        let prefix = format!("FAIL  application {app} ({app}), ");
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no FAIL line for {app}:\n{}", out.stdout));
        assert!(line.contains(error), "{app}: {line}");
    }
    assert!(
        out.stdout.contains("ok    application app-main"),
        "{}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expires_soon_is_reported_everywhere() {
    let mut env = TestEnv::new().await;
    let soon = env.clock.now() + 12 * DAY as i64 + 3600;
    env.add_certificate_app("app-cert", soon);
    env.add_due_key("user", "app-cert").await;
    env.spawn_daemon().await;
    env.wait_until("renewed", || env.renewed_once("user")).await;
    // The warning is an alarm for `status`, recorded in the background.
    let alarm = || async {
        let out = env.cli(&["status"], "").await;
        out.code == 3 && out.stdout.contains("certificate:app-cert")
    };
    env.wait_until("the certificate alarm in status", alarm)
        .await;
    let out = env.cli(&["status"], "").await;
    assert!(
        out.stdout
            .contains("the certificate of application app-cert")
            && out.stdout.contains("(in 12 days)"),
        "{}",
        out.stdout
    );
    env.stop_daemon().await;
    let out = env.cli(&["check"], "").await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stdout.contains("ok    application app-cert")
            && out
                .stdout
                .contains("warn  the certificate of application app-cert (x5t#S256 "),
        "{}",
        out.stdout
    );
}

/// Credentials are read at each token request: fixing a file is enough, no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_credential_renews_without_a_restart() {
    let mut env = TestEnv::new().await;
    let year = env.clock.now() + 365 * DAY as i64;
    env.add_certificate_app("app-cert", year);
    let (_, key) = env.credential_paths("app-cert");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.add_federated_app("app-fed", TOKEN_EXCHANGE_AUDIENCE, -60);
    env.add_due_key("cert-user", "app-cert").await;
    env.add_due_key("fed-user", "app-fed").await;
    env.spawn_daemon().await;
    env.wait_until("both tried and failing", || async {
        let ready = env.get("/readyz").await.1;
        ready.contains("fail  application app-cert: application `app-cert`: private key file")
            && ready.contains("fail  application app-fed:")
    })
    .await;
    // The operator fixes the mode; the platform writes a fresh token.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let fresh = env.emu.federated_token(
        CLUSTER_ISSUER,
        SERVICE_ACCOUNT,
        TOKEN_EXCHANGE_AUDIENCE,
        3600,
    );
    write(&env.dir.path().join("app-fed.token"), &fresh, 0o644);
    let step = std::time::Duration::from_secs(1);
    env.run_until(step, "both renewed", || async {
        env.renewed_once("cert-user").await && env.renewed_once("fed-user").await
    })
    .await;
    for row in env.rows().await {
        assert_eq!(row.state, State::Active, "{row:?}");
    }
    env.stop_daemon().await;
}

/// Relative paths are systemd credentials: `LoadCredential=` puts them in
/// `$CREDENTIALS_DIRECTORY`, with the same mode checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_come_from_the_credentials_directory() {
    let mut env = TestEnv::new().await;
    let year = env.clock.now() + 365 * DAY as i64;
    let creds = env.dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    env.add_certificate_app("app-cert", year);
    let (cert, key) = env.credential_paths("app-cert");
    std::fs::rename(&cert, creds.join("entra-cert.pem")).unwrap();
    std::fs::rename(&key, creds.join("entra-cert.key")).unwrap();
    let app = env.config.applications.last_mut().unwrap();
    app.certificate_file = Some("entra-cert.pem".into());
    app.private_key_file = Some("entra-cert.key".into());
    let config = env.write_config();
    let check = || async {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_storekeyd"))
            .args(["--config", config.to_str().unwrap(), "check"])
            .env("CREDENTIALS_DIRECTORY", &creds)
            .env("STOREKEYD_LOG", "off")
            .output()
            .await
            .unwrap()
    };
    let out = check().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("ok    application app-cert (app-cert), certificate credential"),
        "{stdout}"
    );
    // systemd's credential files show the ACL mask in their group bits (0440): the directory
    // is the service's alone, and writable by no one, so that is no exposure.
    std::fs::set_permissions(
        creds.join("entra-cert.key"),
        std::fs::Permissions::from_mode(0o440),
    )
    .unwrap();
    let dir_mode = |mode| {
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    dir_mode(0o500);
    assert_eq!(check().await.status.code(), Some(0));
    // A directory someone can write into is not one systemd made: no exemption there.
    dir_mode(0o700);
    let out = check().await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The same mode outside it is refused, also when named through it (`../`).
    let outside = env.dir.path().join("entra-cert.key");
    std::fs::rename(creds.join("entra-cert.key"), &outside).unwrap();
    dir_mode(0o500);
    let app = env.config.applications.last_mut().unwrap();
    app.private_key_file = Some("../entra-cert.key".into());
    env.write_config();
    let out = check().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("(mode 440)"), "{stdout}");
    let app = env.config.applications.last_mut().unwrap();
    app.private_key_file = Some(outside);
    env.write_config();
    let out = check().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains("entra-cert.key is readable by group or others (mode 440)"),
        "{stdout}"
    );
}

/// Workload identity's webhook injects `AZURE_CLIENT_ID`, `AZURE_TENANT_ID` and
/// `AZURE_FEDERATED_TOKEN_FILE`: a block that says only `credential = "federated"` uses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_credential_can_come_from_the_azure_variables() {
    let mut env = TestEnv::new().await;
    let token = env.add_federated_app("app-wi", TOKEN_EXCHANGE_AUDIENCE, 3600);
    let file = env.dir.path().join("app-wi.token");
    let app = env.config.applications.last_mut().unwrap();
    *app = Application {
        name: Some("workload".into()),
        credential: Some(storekeyd::config::CredentialKind::Federated),
        ..Application::default()
    };
    let text = toml::to_string(&env.config).unwrap();
    let config = env.dir.path().join("wi.toml");
    std::fs::write(&config, text).unwrap();
    let check = |vars: &[(&str, &std::ffi::OsStr)]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_storekeyd"));
        cmd.args(["--config", config.to_str().unwrap(), "check"])
            .env("STOREKEYD_LOG", "off");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        cmd.output()
    };
    let vars = [
        ("AZURE_CLIENT_ID", std::ffi::OsStr::new("app-wi")),
        ("AZURE_TENANT_ID", std::ffi::OsStr::new(TENANT)),
        ("AZURE_FEDERATED_TOKEN_FILE", file.as_os_str()),
    ];
    let out = check(&vars).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("ok    application workload (app-wi), federated credential: access token"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(&token[token.len() - 20..]),
        "the token was printed"
    );
    // Without them the block is incomplete, and says what is missing.
    let out = check(&vars[..2]).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`applications[2].federated_token_file`: a federated credential needs `federated_token_file` or AZURE_FEDERATED_TOKEN_FILE"),
        "{stderr}"
    );
}
