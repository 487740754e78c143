//! Entra ID access tokens (service tickets) by the client-credentials grant, one cache per
//! application with at most one token request in flight for it.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::clock::Clock;
use crate::config::{Application, Config};
use crate::ops::metrics::Metrics;
use crate::policy::fingerprint::Fingerprint;
use crate::remote::http::{self, BodyError};
use crate::remote::server_time::ServerTime;

/// A cached token is replaced when it has less than this left (the official library's figure),
/// so a renewal never starts with a token that expires on the way.
const REFRESH_AHEAD_SECS: i64 = 300;

/// How an application proves itself to Entra ID. Secrets only for now; certificate and federated
/// credentials add variants here.
pub enum Credential {
    Secret(SecretString),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Secret(_) => f.write_str("Credential::Secret(<redacted>)"),
        }
    }
}

impl Credential {
    fn form_fields(&self) -> [(&'static str, &str); 1] {
        match self {
            Credential::Secret(s) => [("client_secret", s.expose_secret())],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("application `{app}`: cannot read client secret file {path}: {source}")]
    Read {
        app: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "application `{app}`: client secret file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions {
        app: String,
        path: PathBuf,
        mode: u32,
    },
    #[error("application `{app}`: environment variable `{var}` is not set")]
    MissingEnv { app: String, var: String },
    #[error("application `{app}`: the client secret is empty")]
    Empty { app: String },
}

/// Reads every application's secret. Done at start-up so a missing secret is a start-up error.
pub fn load_credential(app: &Application) -> Result<Credential, CredentialError> {
    let label = app.label().to_owned();
    let secret = match (&app.client_secret_file, &app.client_secret_env) {
        (Some(file), _) => read_secret_file(&label, &resolve_credential_path(file))?,
        (None, Some(var)) => std::env::var(var).map_err(|_| CredentialError::MissingEnv {
            app: label.clone(),
            var: var.clone(),
        })?,
        (None, None) => return Err(CredentialError::Empty { app: label }),
    };
    let secret = secret.trim_end_matches(['\n', '\r']).to_owned();
    if secret.is_empty() {
        return Err(CredentialError::Empty { app: label });
    }
    Ok(Credential::Secret(SecretString::from(secret)))
}

fn resolve_credential_path(file: &Path) -> PathBuf {
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) if file.is_relative() => Path::new(&dir).join(file),
        _ => file.to_owned(),
    }
}

fn read_secret_file(app: &str, path: &Path) -> Result<String, CredentialError> {
    use std::os::unix::fs::PermissionsExt;
    let read_err = |source| CredentialError::Read {
        app: app.to_owned(),
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path)
        .map_err(read_err)?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(CredentialError::Permissions {
            app: app.to_owned(),
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    std::fs::read_to_string(path).map_err(read_err)
}

/// An access token. `Debug` shows a fingerprint only.
pub struct AccessToken {
    value: SecretString,
    pub expires_at: i64,
    pub fingerprint: Fingerprint,
}

impl AccessToken {
    pub fn expose(&self) -> &str {
        self.value.expose_secret()
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AccessToken({}, expires_at {})",
            self.fingerprint, self.expires_at
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no application is configured for clientId {0}")]
    UnknownApplication(String),
    #[error("token request for `{app}` {detail}")]
    Transport { app: String, detail: String },
    #[error("token request for `{app}`: {source}")]
    Body { app: String, source: BodyError },
    #[error(
        "Entra ID refused the token request for `{app}` (HTTP {status}): {error}: {description}"
    )]
    Refused {
        app: String,
        status: u16,
        error: String,
        description: String,
    },
    #[error("token request for `{app}` failed moments ago, not retried yet: {detail}")]
    Recent { app: String, detail: String },
    #[error("token response for `{app}` (HTTP {status}) is not a token: {detail}")]
    Malformed {
        app: String,
        status: u16,
        detail: String,
    },
}

/// How long a failed token request answers for its application.
const FAILURE_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Default)]
struct Cached {
    token: Option<Arc<AccessToken>>,
    failed: Option<(Instant, String)>,
}

struct AppTokens {
    app: Application,
    credential: Credential,
    // Held across the token request: one request in flight per application, however many
    // renewals are waiting for it.
    cached: Mutex<Cached>,
    /// The result of the last token request, for readiness and `check`.
    last: std::sync::Mutex<Option<Result<(), String>>>,
}

/// How an application's last token request went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStatus {
    pub label: String,
    pub client_id: String,
    /// `None`: not tried yet.
    pub last: Option<Result<(), String>>,
}

pub struct TokenClient {
    http: reqwest::Client,
    authority: String,
    scope: String,
    max_body: usize,
    clock: Clock,
    apps: HashMap<String, AppTokens>,
    metrics: Arc<Metrics>,
    server_time: Arc<ServerTime>,
}

impl fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenClient")
            .field("applications", &self.apps.len())
            .finish()
    }
}

impl TokenClient {
    pub fn new(
        config: &Config,
        credentials: Vec<(Application, Credential)>,
        http: reqwest::Client,
        clock: Clock,
        metrics: Arc<Metrics>,
        server_time: Arc<ServerTime>,
    ) -> Self {
        let apps = credentials
            .into_iter()
            .map(|(app, credential)| {
                (
                    app.client_id.clone(),
                    AppTokens {
                        app,
                        credential,
                        cached: Mutex::new(Cached::default()),
                        last: std::sync::Mutex::new(None),
                    },
                )
            })
            .collect();
        TokenClient {
            http,
            authority: config.entra.authority.trim_end_matches('/').to_owned(),
            scope: config.entra.scope.clone(),
            max_body: config.http.max_body_bytes,
            clock,
            apps,
            metrics,
            server_time,
        }
    }

    /// Each application's last token request, by label.
    pub fn status(&self) -> Vec<TokenStatus> {
        let mut all: Vec<_> = self
            .apps
            .values()
            .map(|e| TokenStatus {
                label: e.app.label().to_owned(),
                client_id: e.app.client_id.clone(),
                last: e
                    .last
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone(),
            })
            .collect();
        all.sort_by(|a, b| a.label.cmp(&b.label));
        all
    }

    /// Every configured application's client ID.
    pub fn client_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.apps.keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn has_application(&self, client_id: &str) -> bool {
        self.apps.contains_key(client_id)
    }

    /// A token for `client_id`: the cached one while it has time left, else a new one.
    pub async fn token(&self, client_id: &str) -> Result<Arc<AccessToken>, TokenError> {
        self.token_replacing(client_id, None).await
    }

    /// A token other than `stale` (one the Store just refused). Waiters that saw the same
    /// refusal share the one new token instead of each minting their own.
    pub async fn fresh_token(
        &self,
        client_id: &str,
        stale: &AccessToken,
    ) -> Result<Arc<AccessToken>, TokenError> {
        self.token_replacing(client_id, Some(stale.fingerprint))
            .await
    }

    async fn token_replacing(
        &self,
        client_id: &str,
        stale: Option<Fingerprint>,
    ) -> Result<Arc<AccessToken>, TokenError> {
        let entry = self
            .apps
            .get(client_id)
            .ok_or_else(|| TokenError::UnknownApplication(client_id.to_owned()))?;
        let mut cached = entry.cached.lock().await;
        if let Some(token) = cached.token.as_ref()
            && token.expires_at - self.clock.now() > REFRESH_AHEAD_SECS
            && Some(token.fingerprint) != stale
        {
            return Ok(token.clone());
        }
        // Those who queued behind a failed request share its failure for a moment instead of
        // each waiting out a request of their own (and keeping other applications waiting).
        if let Some((at, error)) = &cached.failed
            && at.elapsed() < FAILURE_COOLDOWN
        {
            return Err(TokenError::Recent {
                app: entry.app.label().to_owned(),
                detail: error.clone(),
            });
        }
        let started = Instant::now();
        let result = self.request(entry).await;
        self.metrics.token_latency.observe(started.elapsed());
        self.metrics
            .token_requests
            .inc(if result.is_ok() { "ok" } else { "error" });
        let summary = result.as_ref().map(|_| ()).map_err(ToString::to_string);
        if let Err(e) = &summary {
            tracing::warn!(app = entry.app.label(), error = %e, "token request failed");
        }
        *entry
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(summary);
        let token = match result {
            Ok(t) => Arc::new(t),
            Err(e) => {
                cached.failed = Some((Instant::now(), e.to_string()));
                return Err(e);
            }
        };
        cached.failed = None;
        cached.token = Some(token.clone());
        Ok(token)
    }

    async fn request(&self, entry: &AppTokens) -> Result<AccessToken, TokenError> {
        let app = entry.app.label().to_owned();
        let url = format!(
            "{}/{}/oauth2/v2.0/token",
            self.authority, entry.app.tenant_id
        );
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", entry.app.client_id.as_str()),
            ("scope", self.scope.as_str()),
        ];
        form.extend(entry.credential.form_fields());
        let resp =
            self.http
                .post(&url)
                .form(&form)
                .send()
                .await
                .map_err(|e| TokenError::Transport {
                    app: app.clone(),
                    detail: http::describe(&e),
                })?;
        let status = resp.status().as_u16();
        self.server_time.observe(status, resp.headers());
        let body = http::read_body(resp, self.max_body)
            .await
            .map_err(|source| TokenError::Body {
                app: app.clone(),
                source,
            })?;
        parse_token_response(&app, status, &body, self.clock.now())
    }
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    error: Option<String>,
    error_description: Option<String>,
}

/// Parses Entra's answer. `expires_in` is a number on v2 and a string on v1: both are accepted.
pub fn parse_token_response(
    app: &str,
    status: u16,
    body: &[u8],
    now: i64,
) -> Result<AccessToken, TokenError> {
    let malformed = |detail: &str| TokenError::Malformed {
        app: app.to_owned(),
        status,
        detail: detail.to_owned(),
    };
    let parsed: TokenBody =
        serde_json::from_slice(body).map_err(|_| malformed("body is not JSON"))?;
    if let Some(error) = parsed.error {
        return Err(TokenError::Refused {
            app: app.to_owned(),
            status,
            error: error.chars().take(100).collect(),
            description: parsed
                .error_description
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect(),
        });
    }
    if status != 200 {
        return Err(malformed("non-200 status without an `error`"));
    }
    let token = parsed
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| malformed("no `access_token`"))?;
    let expires_in = match parsed.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_i64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|s| *s > 0)
    .ok_or_else(|| malformed("no positive `expires_in`"))?;
    Ok(AccessToken {
        fingerprint: Fingerprint::of(&token),
        value: SecretString::from(token),
        expires_at: now.saturating_add(expires_in),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_in_as_number_or_string() {
        let v2 = parse_token_response(
            "a",
            200,
            br#"{"token_type":"Bearer","expires_in":3599,"access_token":"t1"}"#,
            100,
        )
        .unwrap();
        assert_eq!((v2.expose(), v2.expires_at), ("t1", 3699));
        let v1 = parse_token_response(
            "a",
            200,
            br#"{"expires_in":"3599","access_token":"t2"}"#,
            100,
        )
        .unwrap();
        assert_eq!(v1.expires_at, 3699);
    }

    #[test]
    fn entra_errors_are_surfaced() {
        let body = br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#;
        let e = parse_token_response("main", 401, body, 0)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "Entra ID refused the token request for `main` (HTTP 401): invalid_client: AADSTS7000215: Invalid client secret provided."
        );
        assert!(matches!(
            parse_token_response("a", 200, b"<html>", 0),
            Err(TokenError::Malformed { .. })
        ));
        assert!(matches!(
            parse_token_response("a", 200, br#"{"access_token":"x"}"#, 0),
            Err(TokenError::Malformed { .. })
        ));
    }

    #[test]
    fn token_debug_hides_the_token() {
        let t = parse_token_response(
            "a",
            200,
            br#"{"expires_in":1,"access_token":"very-secret-token"}"#,
            0,
        )
        .unwrap();
        assert!(!format!("{t:?}").contains("very-secret"));
        let c = Credential::Secret(SecretString::from("hunter2".to_owned()));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn group_readable_secret_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let app = Application {
            name: Some("main".into()),
            tenant_id: "t".into(),
            client_id: "c".into(),
            client_secret_file: Some(path.clone()),
            client_secret_env: None,
        };
        let e = load_credential(&app).unwrap_err().to_string();
        assert!(
            e.contains("readable by group or others (mode 644)") && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let Credential::Secret(s) = load_credential(&app).unwrap();
        assert_eq!(s.expose_secret(), "s3cret");
    }

    proptest::proptest! {
        #[test]
        fn token_response_parsing_never_panics(status in 100u16..600, body in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse_token_response("a", status, &body, 0);
        }

        #[test]
        fn token_json_shapes_never_panic(token in proptest::option::of(".{0,20}"), expires in proptest::option::of(proptest::num::i64::ANY), error in proptest::option::of(".{0,20}")) {
            let body = serde_json::json!({"access_token": token, "expires_in": expires, "error": error}).to_string();
            let _ = parse_token_response("a", 200, body.as_bytes(), i64::MAX);
        }
    }
}
