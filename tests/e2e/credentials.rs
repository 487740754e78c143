//! Credentials without long-lived secrets: a certificate, a federated token file and a managed
//! identity renew keys side by side with secrets; each broken credential is a clear error naming
//! its application while the others keep renewing and nothing is flagged.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use secrecy::ExposeSecret as _;
use storekeyd::config::{Application, AssertionAlgorithm};
use storekeyd::policy::claims::Kind;
use storekeyd::remote::entra::TOKEN_EXCHANGE_AUDIENCE;
use storekeyd::remote::entra::assertion::{self, AssertionClaims, JWT_BEARER, new_jti};
use storekeyd::remote::entra::certificate::SigningCertificate;

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
    env.add_federated_app("app-fed", TOKEN_EXCHANGE_AUDIENCE, 3600);
    env.add_managed_identity_app("app-mi");
    let apps = [APP, "app-cert", "app-fed", "app-mi"];
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
    assert!(stats.tokens_issued >= 4, "{stats:?}");
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
        assert_eq!(row.state, "active", "{row:?}");
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
                .contains("FAIL  the certificate of application app-cert (x5t#S256 "),
        "{}",
        out.stdout
    );
}

async fn post_assertion(url: &str, client_id: &str, assertion: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("scope", "https://onestore.microsoft.com/.default"),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion),
        ])
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The emulator checks what Entra ID checks, so the tests above could fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_refuses_bad_assertions_as_entra_does() {
    let env = TestEnv::new().await;
    let year = env.clock.now() + 365 * DAY as i64;
    let (cert, key) = certificate(year);
    env.emu
        .register_certificate(TENANT, "app-c", &cert)
        .unwrap();
    let signing = |cert: &str, key: &str| {
        SigningCertificate::from_pem(cert, "c", key, "k", AssertionAlgorithm::PS256).unwrap()
    };
    let ours = signing(&cert, &key);
    let url = format!("{}/{TENANT}/oauth2/v2.0/token", env.emu.authority());
    let now = env.emu.now();
    let assertion = |cert: &SigningCertificate, iss: &str, aud: &str, at: i64| {
        let claims = AssertionClaims::new(iss, aud, at, new_jti().unwrap());
        assertion::sign(cert, &claims)
            .unwrap()
            .expose_secret()
            .to_owned()
    };
    let good = assertion(&ours, "app-c", &url, now);
    assert_eq!(post_assertion(&url, "app-c", &good).await.0, 200);
    let refused = |(status, body): (u16, String), code: &str| {
        assert_eq!(status, 401, "{body}");
        assert!(body.contains(code), "expected {code}: {body}");
    };
    refused(
        post_assertion(&url, "app-c", &good).await,
        "jti has been used before",
    );
    let elsewhere = "https://login.microsoftonline.com/t/oauth2/v2.0/token";
    refused(
        post_assertion(&url, "app-c", &assertion(&ours, "app-c", elsewhere, now)).await,
        "AADSTS700212",
    );
    refused(
        post_assertion(&url, "app-c", &assertion(&ours, "app-c", &url, now - 600)).await,
        "AADSTS700024",
    );
    refused(
        post_assertion(&url, "app-c", &assertion(&ours, "app-x", &url, now)).await,
        "AADSTS700023",
    );
    let (other_cert, other_key) = certificate(year);
    let theirs = signing(&other_cert, &other_key);
    refused(
        post_assertion(&url, "app-c", &assertion(&theirs, "app-c", &url, now)).await,
        "AADSTS700027",
    );
    // A registered thumbprint with another key's signature.
    let mut forged: Vec<String> = good.split('.').map(str::to_owned).collect();
    let fresh = assertion(&theirs, "app-c", &url, now);
    forged[1] = fresh.split('.').nth(1).unwrap().to_owned();
    refused(
        post_assertion(&url, "app-c", &forged.join(".")).await,
        "AADSTS7000274",
    );
}
