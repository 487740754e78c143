use super::super::tests::{err, parse};
use super::super::{Config, IMDS_TOKEN_URL};
use super::*;

fn app(extra: &str) -> String {
    format!("[[applications]]\ntenant_id = \"t\"\nclient_id = \"c\"\n{extra}")
}

#[test]
fn applications_need_exactly_one_credential() {
    assert!(parse(&app("client_secret_env = \"S\"")).is_ok());
    assert!(err(&app("")).contains("`applications[0].credential`: set one of"));
    assert!(
        err(&app(
            "client_secret_env = \"S\"\nclient_secret_file = \"f\""
        ))
        .contains("set only one credential per application")
    );
    assert!(
        err(&app(
            "client_secret_env = \"S\"\ncertificate_file = \"c.pem\""
        ))
        .contains("`applications[0].certificate_file`: set only one credential")
    );
    assert!(err(&app("client_secret = \"inline\"")).contains("unknown field `client_secret`"));
    assert!(
        err(&app("client_secret_env = \"S\"\nprivate_key_file = \"k\""))
            .contains("`applications[0].private_key_file`: only with `certificate_file`")
    );
    assert!(
        err(&app(
            "credential = \"certificate\"\nclient_secret_env = \"S\""
        ))
        .contains("does not go with `credential = \"certificate\"`")
    );
    assert!(err(&app("managed_identity_client_id = \" \"")).contains("must not be empty"));
}

#[test]
fn labels_and_paths_must_name_something() {
    let two = "[[applications]]\nname = \"a\"\ntenant_id = \"t\"\nclient_id = \"c1\"\nclient_secret_env = \"S\"\n[[applications]]\nname = \"a\"\ntenant_id = \"t\"\nclient_id = \"c2\"\nclient_secret_env = \"S\"";
    assert!(err(two).contains("`applications[1].name`: `a` names another application too"));
    assert!(
        err(&app("certificate_file = \"\""))
            .contains("`applications[0].certificate_file`: must not be empty")
    );
    assert!(
        err(&app("federated_token_file = \" \""))
            .contains("`applications[0].federated_token_file`: must not be empty")
    );
}

#[test]
fn each_credential_kind_resolves_to_its_source() {
    let source = |extra: &str| {
        parse(&app(extra)).unwrap().applications[0]
            .source()
            .unwrap()
    };
    assert_eq!(
        source("certificate_file = \"c.pem\""),
        CredentialSource::Certificate {
            certificate: "c.pem".into(),
            private_key: "c.pem".into(),
            algorithm: AssertionAlgorithm::PS256,
        }
    );
    assert_eq!(
        source(
            "certificate_file = \"c.pem\"\nprivate_key_file = \"k.pem\"\ncertificate_algorithm = \"RS256\""
        ),
        CredentialSource::Certificate {
            certificate: "c.pem".into(),
            private_key: "k.pem".into(),
            algorithm: AssertionAlgorithm::RS256,
        }
    );
    assert_eq!(
        source("federated_token_file = \"/t\"").kind(),
        CredentialKind::Federated
    );
    assert_eq!(
        source("managed_identity_client_id = \"mi\""),
        CredentialSource::ManagedIdentity {
            client_id: "mi".into()
        }
    );
    assert!(
        err(&app(
            "certificate_algorithm = \"HS256\"\ncertificate_file = \"c\""
        ))
        .contains("certificate_algorithm")
    );
}

#[test]
fn a_federated_credential_takes_the_azure_variables() {
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    };
    let all = env(&[
        ("AZURE_CLIENT_ID", "from-env"),
        ("AZURE_TENANT_ID", "tenant-env"),
        ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token"),
    ]);
    let c = Config::from_toml(
        "[[applications]]\ncredential = \"federated\"",
        "t",
        all.clone(),
    )
    .unwrap();
    let a = &c.applications[0];
    assert_eq!(
        (a.client_id.as_str(), a.tenant_id.as_str()),
        ("from-env", "tenant-env")
    );
    assert_eq!(
        a.source().unwrap(),
        CredentialSource::FederatedFile("/var/run/token".into())
    );
    // The file's own values win; other kinds never read the variables.
    let c = Config::from_toml(&app("federated_token_file = \"/mine\""), "t", all.clone()).unwrap();
    assert_eq!(c.applications[0].client_id, "c");
    assert_eq!(
        c.applications[0].source().unwrap(),
        CredentialSource::FederatedFile("/mine".into())
    );
    let e = Config::from_toml("[[applications]]\nclient_secret_env = \"S\"", "t", all)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`applications[0].client_id`: must not be empty"),
        "{e}"
    );
    let e = Config::from_toml(
        "[[applications]]\ncredential = \"federated\"\nclient_id = \"c\"\ntenant_id = \"t\"",
        "t",
        Vec::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`applications[0].federated_token_file`: a federated credential needs"),
        "{e}"
    );
}

#[test]
fn the_metadata_endpoint_is_plain_http_only_at_its_azure_address() {
    assert_eq!(
        parse("").unwrap().entra.managed_identity_endpoint,
        IMDS_TOKEN_URL
    );
    assert!(parse("[entra]\nmanaged_identity_endpoint = \"http://127.0.0.1:9/m\"").is_ok());
    assert!(
        err("[entra]\nmanaged_identity_endpoint = \"http://169.254.169.253/m\"")
            .contains("`entra.managed_identity_endpoint`: plain http is allowed only")
    );
}
