use super::*;

pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, "test.toml", Vec::new())
}

pub(super) fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn defaults_match_the_documented_values() {
    let c = parse("").unwrap();
    assert_eq!(c.renew.max_age, Duration::from_secs(14 * DAY));
    assert_eq!(c.renew.margin, Duration::from_secs(7 * DAY));
    assert_eq!(
        c.endpoint(Kind::Purchase),
        "https://purchase.mp.microsoft.com/v6.0/b2b/keys/renew"
    );
    assert_eq!(c.entra.authority, "https://login.microsoftonline.com");
}

#[test]
fn the_example_config_parses() {
    let text = include_str!("../../config/storekeyd.example.toml");
    let c = parse(text).unwrap();
    assert_eq!(c.applications.len(), 2);
}

#[test]
fn bad_duration_names_the_field() {
    assert!(err("[renew]\nmargin = \"a week\"").starts_with(
        "config: `renew.margin`: expected a duration like `7d`, `90s` or `1h 30m`, got `a week`"
    ));
    assert!(err("[renew]\nmargin = 7").contains("`renew.margin`: expected a duration"));
}

#[test]
fn settings_that_would_switch_a_protection_off_are_refused() {
    for (toml, field) in [
        (
            "[guard]\nwindow = \"0s\"",
            "`guard.window`: must be at least 1s",
        ),
        (
            "[breaker]\nwindow = \"0s\"",
            "`breaker.window`: must be at least 1s",
        ),
        (
            "[guard]\ncanary_interval = \"0s\"",
            "`guard.canary_interval`",
        ),
        (
            "[guard]\nlone_key_after = \"10m\"",
            "`guard.lone_key_after`: must be at least 1h",
        ),
    ] {
        assert!(err(toml).contains(field), "{toml}: {}", err(toml));
    }
}

#[test]
fn wrong_types_and_unknown_fields_name_the_field() {
    assert!(
        err("[renew]\nconcurrency = \"many\"")
            .starts_with("config: `renew.concurrency`: invalid type")
    );
    assert!(err("[renew]\nmarginn = \"7d\"").contains("unknown field `marginn`"));
    assert!(err("[renew]\nconcurrency = 0").contains("`renew.concurrency`: must be at least 1"));
    assert!(err("this is not toml").starts_with("config: test.toml is not valid TOML"));
}

#[test]
fn plain_http_only_for_loopback() {
    assert!(parse("[endpoints]\ncollections = \"http://127.0.0.1:9/renew\"").is_ok());
    assert!(parse("[endpoints]\ncollections = \"http://[::1]:9/renew\"").is_ok());
    assert!(parse("[entra]\nauthority = \"http://localhost:9\"").is_ok());
    assert!(
        err("[endpoints]\ncollections = \"http://example.com/renew\"")
            .contains("`endpoints.collections`: plain http is allowed only for loopback")
    );
    assert!(err("[entra]\nauthority = \"ftp://x\"").contains("`entra.authority`"));
}

#[test]
fn the_exchange_audience_follows_the_cloud() {
    let audience = |toml: &str| parse(toml).unwrap().entra.token_exchange_audience();
    assert_eq!(audience(""), "api://AzureADTokenExchange");
    assert_eq!(
        audience("[entra]\nauthority = \"https://login.microsoftonline.us\""),
        "api://AzureADTokenExchangeUSGov"
    );
    assert_eq!(
        audience("[entra]\nauthority = \"https://login.partner.microsoftonline.cn\""),
        "api://AzureADTokenExchangeChina"
    );
    assert_eq!(
        audience("[entra]\ntoken_exchange_audience = \"api://Custom\""),
        "api://Custom"
    );
}

#[test]
fn every_setting_can_be_overridden() {
    let text = toml::to_string(&Config::default()).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    for key in table.keys() {
        assert!(
            SETTINGS.contains(&key.as_str()),
            "`{key}` missing from SETTINGS"
        );
    }
}

#[test]
fn environment_overrides_file() {
    let env = vec![
        ("STOREKEYD_RENEW__MARGIN".to_owned(), "3d".to_owned()),
        ("STOREKEYD_RENEW__CONCURRENCY".to_owned(), "3".to_owned()),
        (
            "STOREKEYD_DATABASE_URL".to_owned(),
            "sqlite:///tmp/x.db".to_owned(),
        ),
        ("STOREKEYD_CONFIG".to_owned(), "/ignored".to_owned()),
        (
            "STOREKEYD_SECRET_MAIN".to_owned(),
            "a secret, not a setting".to_owned(),
        ),
        ("OTHER".to_owned(), "x".to_owned()),
    ];
    let c = Config::from_toml("[renew]\nmargin = \"5d\"", "t", env).unwrap();
    assert_eq!(c.renew.margin, Duration::from_secs(3 * DAY));
    assert_eq!(c.renew.concurrency, 3);
    assert_eq!(c.database_url(), "sqlite:///tmp/x.db");
    let typo = vec![("STOREKEYD_RENEW__JITTR".to_owned(), "1h".to_owned())];
    let e = Config::from_toml("", "t", typo).unwrap_err().to_string();
    assert!(e.contains("unknown field `jittr`"), "{e}");
    let bad = vec![("STOREKEYD_RENEW__JITTER".to_owned(), "soon".to_owned())];
    let e = Config::from_toml("", "t", bad).unwrap_err().to_string();
    assert!(
        e.starts_with("config: `renew.jitter`: expected a duration"),
        "{e}"
    );
}
