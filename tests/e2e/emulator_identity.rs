//! The emulator checks client assertions as Entra ID does, so the credential tests can fail.

use secrecy::ExposeSecret as _;
use storekeyd::config::AssertionAlgorithm;
use storekeyd::remote::entra::assertion::{self, AssertionClaims, JWT_BEARER, new_jti};
use storekeyd::remote::entra::certificate::SigningCertificate;

use crate::credentials::certificate;
use crate::harness::{DAY, TENANT, TestEnv};

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
    // Another key's signature under the registered certificate's thumbprint.
    let mut impostor = signing(&other_cert, &other_key);
    impostor.info.thumbprint = ours.info.thumbprint.clone();
    refused(
        post_assertion(&url, "app-c", &assertion(&impostor, "app-c", &url, now)).await,
        "AADSTS7000274",
    );
    // A payload swapped under a good signature.
    let mut tampered: Vec<String> = good.split('.').map(str::to_owned).collect();
    let other = assertion(&ours, "app-c", &url, now + 1);
    tampered[1] = other.split('.').nth(1).unwrap().to_owned();
    refused(
        post_assertion(&url, "app-c", &tampered.join(".")).await,
        "AADSTS7000274",
    );
    // A registered certificate past its end.
    let (old_cert, old_key) = certificate(now - 60);
    env.emu
        .register_certificate(TENANT, "app-old", &old_cert)
        .unwrap();
    let old = signing(&old_cert, &old_key);
    refused(
        post_assertion(&url, "app-old", &assertion(&old, "app-old", &url, now)).await,
        "AADSTS7000222",
    );
}
