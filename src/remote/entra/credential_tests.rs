use super::*;
use secrecy::ExposeSecret;
use std::os::unix::fs::PermissionsExt;

#[test]
fn a_certificate_file_without_its_key_or_not_pem_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = super::super::certificate::generated();
    let path = dir.path().join("c.pem");
    write(&path, &cert, 0o644);
    let app = app(|a| a.certificate_file = Some(path.clone()));
    let e = load(&app).unwrap_err().to_string();
    assert!(
        e.contains("no private key block") && e.contains("set `private_key_file`"),
        "{e}"
    );
    std::fs::write(&path, [0x30, 0x82, 0xff, 0xfe]).unwrap();
    let e = load(&app).unwrap_err().to_string();
    assert!(e.contains("is not text; PEM is expected"), "{e}");
}

fn app(edit: impl FnOnce(&mut Application)) -> Application {
    let mut app = Application {
        name: Some("main".into()),
        tenant_id: "t".into(),
        client_id: "c".into(),
        ..Application::default()
    };
    edit(&mut app);
    app
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn group_readable_secret_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    write(&path, "s3cret\n", 0o644);
    let app = app(|a| a.client_secret_file = Some(path.clone()));
    let e = load(&app).unwrap_err().to_string();
    assert!(
        e.starts_with("application `main`: client secret file")
            && e.contains("readable by group or others (mode 644)")
            && e.contains("chmod 600"),
        "{e}"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let Ok(Credential::Secret(s)) = load(&app) else {
        panic!("not a secret")
    };
    assert_eq!(s.expose_secret(), "s3cret");
}

#[test]
fn a_world_readable_private_key_is_refused_but_a_public_certificate_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = super::super::certificate::generated();
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    write(&cert_path, &cert, 0o644);
    write(&key_path, &key, 0o644);
    let app = app(|a| {
        a.certificate_file = Some(cert_path.clone());
        a.private_key_file = Some(key_path.clone());
    });
    let e = load(&app).unwrap_err().to_string();
    assert!(
        e.contains("private key file") && e.contains("mode 644"),
        "{e}"
    );
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(load(&app).unwrap().kind(), CredentialKind::Certificate);
    let missing = app.clone();
    std::fs::remove_file(&cert_path).unwrap();
    let e = load(&missing).unwrap_err().to_string();
    assert!(
        e.starts_with("application `main`: cannot read certificate file"),
        "{e}"
    );
}

#[test]
fn a_federated_token_file_is_read_trimmed_and_must_hold_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    let app = app(|a| a.federated_token_file = Some(path.clone()));
    let e = load(&app).unwrap_err().to_string();
    assert!(
        e.starts_with("application `main`: cannot read federated token file"),
        "{e}"
    );
    write(&path, "\n", 0o644);
    assert!(
        load(&app)
            .unwrap_err()
            .to_string()
            .contains("federated token file is empty")
    );
    write(&path, "eyJ.token.sig\n", 0o644);
    let Ok(Credential::Federated(t)) = load(&app) else {
        panic!("not federated")
    };
    assert_eq!(t.expose_secret(), "eyJ.token.sig");
}

#[test]
fn debug_never_shows_the_secret() {
    let c = Credential::Secret(SecretString::from("hunter2".to_owned()));
    assert!(!format!("{c:?}").contains("hunter2"));
    let c = Credential::Federated(SecretString::from("eyJhunter".to_owned()));
    assert!(!format!("{c:?}").contains("hunter"));
}
