//! PostgreSQL over the network: a server must prove its name unless the URL says otherwise.

use storekeyd::storage::{self, DbOptions};

use crate::pgserver::PgServer;

/// A CA, and a server certificate it issued for `name`: (CA, certificate, key), PEM.
fn issued_for(name: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "storekeyd test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// A server whose certificate names `db.example`, reached at 127.0.0.1 under other names
/// (`hostaddr`), as a machine in the middle would be: its CA is trusted, but a name that is
/// not the certificate's is refused with no `sslmode` in the URL (sqlx's own default,
/// `prefer`, took any certificate, or none). The URL's own `sslmode` still decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_over_the_network_must_prove_its_name() {
    let (ca, cert, key) = issued_for("db.example");
    let server = PgServer::start_new_with_tls(&cert, &key);
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca).unwrap();
    let url = |host: &str, extra: &str| {
        format!(
            "postgres://postgres@{host}:{}/postgres?hostaddr=127.0.0.1&sslrootcert={}{extra}",
            server.port(),
            ca_path.display()
        )
    };
    let options = DbOptions {
        connect_timeout: std::time::Duration::from_secs(2),
        ..DbOptions::default()
    };

    let store = storage::open(&url("db.example", ""), &options)
        .await
        .expect("the certificate's own name is accepted");
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&server.admin_url())
        .await
        .unwrap();
    let (tls,): (Option<bool>,) = sqlx::query_as(
        "SELECT bool_and(s.ssl) FROM pg_stat_ssl AS s JOIN pg_stat_activity AS a USING (pid)
         WHERE a.application_name = 'storekeyd'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(tls, Some(true), "storekeyd's connections must use TLS");
    store.close().await;

    let refused = storage::open(&url("db.other", ""), &options).await;
    assert!(
        refused.is_err(),
        "a certificate for another name was accepted"
    );
    storage::open(&url("db.other", "&sslmode=verify-ca"), &options)
        .await
        .expect("sslmode=verify-ca in the URL checks the CA only")
        .close()
        .await;
}

/// The database's password from a file (a systemd credential), not the URL: the server takes it,
/// a file others may read is refused by name, and the password is in no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_password_comes_from_a_private_file() {
    use std::os::unix::fs::PermissionsExt as _;
    const PASSWORD: &str = "correct-horse-battery-staple";
    let server = PgServer::start_new_with_password(PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pg.password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", server.port());
    let options = |password_file: Option<std::path::PathBuf>| DbOptions {
        connect_timeout: std::time::Duration::from_secs(2),
        password_file,
        ..DbOptions::default()
    };

    storage::open(&url, &options(Some(file.clone())))
        .await
        .expect("the password file's password is taken")
        .close()
        .await;
    assert!(
        storage::open(&url, &options(None)).await.is_err(),
        "the server must ask for a password"
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = match storage::open(&url, &options(Some(file.clone()))).await {
        Ok(_) => panic!("a password file others may read was taken"),
        Err(e) => e.to_string(),
    };
    assert!(
        refused.contains("pg.password") && refused.contains("mode 644"),
        "{refused}"
    );
    assert!(!refused.contains(PASSWORD), "{refused}");
}
