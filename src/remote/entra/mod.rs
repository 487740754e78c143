//! Entra ID access tokens (service tickets) by the client-credentials grant, one cache per
//! application with at most one token request in flight for it. Each application proves itself
//! with its own kind of credential ([`credential`]): a secret, a certificate's signed client
//! assertion, a federated token file, or a managed identity's token exchanged as a federated
//! assertion.

pub mod assertion;
pub mod certificate;
pub mod credential;
mod request;
mod response;
pub mod status;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Mutex;

use crate::clock::Clock;
use crate::config::{Application, Config, CredentialKind};
use crate::policy::fingerprint::Fingerprint;
use crate::remote::server_time::ServerTime;
use crate::telemetry::metrics::{Metrics, TokenOutcome};

pub use credential::{Credential, CredentialError};
/// The audience of a token exchanged as a federated assertion, in Azure's global cloud.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
pub use response::{AccessToken, Issuer, TokenError, parse_token_response};

/// A cached token is replaced when it has less than this left (the official library's figure),
/// so a renewal never starts with a token that expires on the way.
const REFRESH_AHEAD_SECS: i64 = 300;

/// How long a failed token request answers for its application.
const FAILURE_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(5);
/// A token minted this recently is as fresh as a new one: a refusal does not mint another. Any
/// player can store keys the Store refuses; without this, each would cost a token request.
const FRESH_FOR_SECS: i64 = 60;

#[derive(Default)]
struct Cached {
    token: Option<Arc<AccessToken>>,
    /// When `token` was minted (Unix seconds).
    minted_at: Option<i64>,
    /// A managed identity's token, exchanged for the application's token; it lives for hours.
    identity_token: Option<Arc<AccessToken>>,
    failed: Option<(Instant, String)>,
}

/// A certificate credential as last read: what `check`, `status` and the metrics show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// `x5t#S256`: how Entra ID and the portal name the certificate.
    pub thumbprint: String,
    pub not_after: i64,
}

struct AppTokens {
    app: Application,
    kind: CredentialKind,
    // Held across the token request: one request in flight per application, however many
    // renewals are waiting for it.
    cached: Mutex<Cached>,
    /// The result of the last token request, for readiness and `check`.
    last: std::sync::Mutex<Option<Result<(), String>>>,
    certificate: std::sync::Mutex<Option<CertificateSummary>>,
}

/// How an application's credential is and how its last token request went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStatus {
    pub label: String,
    pub client_id: String,
    pub kind: CredentialKind,
    /// A certificate credential's, once it was read.
    pub certificate: Option<CertificateSummary>,
    /// `None`: not tried yet.
    pub last: Option<Result<(), String>>,
}

pub struct TokenClient {
    http: reqwest::Client,
    metadata_http: reqwest::Client,
    authority: String,
    scope: String,
    identity_endpoint: String,
    exchange_audience: String,
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

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TokenClient {
    /// Reads every application's credential once, so a broken one is logged at start; it is read
    /// again at each token request (a broken one does not stop the others). Fails only on an
    /// application the configuration gives no credential.
    /// `metadata_http` is for the instance metadata service ([`crate::remote::http::metadata_client`]).
    pub fn new(
        config: &Config,
        (http, metadata_http): (reqwest::Client, reqwest::Client),
        clock: Clock,
        metrics: Arc<Metrics>,
        server_time: Arc<ServerTime>,
    ) -> Result<Self, CredentialError> {
        let mut apps = HashMap::new();
        for app in &config.applications {
            let kind = app
                .source()
                .map_err(|p| CredentialError::Config {
                    app: app.label().to_owned(),
                    message: format!("`{}`: {}", p.field, p.message),
                })?
                .kind();
            let entry = AppTokens {
                app: app.clone(),
                kind,
                cached: Mutex::new(Cached::default()),
                last: std::sync::Mutex::new(None),
                certificate: std::sync::Mutex::new(None),
            };
            if let Err(e) = entry.load() {
                tracing::error!(app = app.label(), error = %e, "credential unusable; its keys wait (never flagged) until it is fixed");
            }
            apps.insert(app.client_id.clone(), entry);
        }
        Ok(TokenClient {
            http,
            metadata_http,
            authority: config.entra.authority.trim_end_matches('/').to_owned(),
            scope: config.entra.scope.clone(),
            identity_endpoint: config.entra.managed_identity_endpoint.clone(),
            exchange_audience: config.entra.token_exchange_audience(),
            max_body: config.http.max_body_bytes,
            clock,
            apps,
            metrics,
            server_time,
        })
    }

    /// Each application's credential and last token request, by label.
    pub fn status(&self) -> Vec<TokenStatus> {
        let mut all: Vec<_> = self
            .apps
            .values()
            .map(|e| TokenStatus {
                label: e.app.label().to_owned(),
                client_id: e.app.client_id.clone(),
                kind: e.kind,
                certificate: lock(&e.certificate).clone(),
                last: lock(&e.last).clone(),
            })
            .collect();
        all.sort_by(|a, b| a.label.cmp(&b.label));
        all
    }

    /// Re-reads every certificate credential's certificate, so a certificate rotated in place
    /// shows at once; its key too, which says which certificate of a chain is the credential's.
    /// One that cannot be read keeps what was last read, and fails at its next token request.
    pub fn refresh_certificates(&self) {
        for entry in self.apps.values() {
            match credential::certificate_info(&entry.app) {
                Some(Ok(info)) => {
                    *lock(&entry.certificate) = Some(CertificateSummary {
                        thumbprint: info.thumbprint,
                        not_after: info.not_after,
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(app = entry.app.label(), error = %e, "cannot re-read the certificate");
                }
                None => {}
            }
        }
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

    /// A token other than `stale` (one the Store just refused), unless `stale` was minted in the
    /// last minute: then it is the fresh one, and no request is made (refusals of keys a player
    /// forged must not each cost one). Waiters that saw the same refusal share the one new token
    /// instead of each minting their own.
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
        let now = self.clock.now();
        // A clock stepped back makes no old token look fresh.
        let fresh = cached
            .minted_at
            .is_some_and(|at| (0..FRESH_FOR_SECS).contains(&now.saturating_sub(at)));
        if let Some(token) = cached.token.as_ref()
            && token.expires_at - now > REFRESH_AHEAD_SECS
            && (Some(token.fingerprint) != stale || fresh)
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
        let result = self.request(entry, &mut cached).await;
        self.metrics.token_latency.observe(started.elapsed());
        self.metrics.token_requests.inc(if result.is_ok() {
            TokenOutcome::Ok
        } else {
            TokenOutcome::Error
        });
        let summary = result.as_ref().map(|_| ()).map_err(ToString::to_string);
        if let Err(e) = &summary {
            tracing::warn!(app = entry.app.label(), error = %e, "token request failed");
        }
        *lock(&entry.last) = Some(summary);
        let token = match result {
            Ok(t) => Arc::new(t),
            Err(e) => {
                cached.failed = Some((Instant::now(), e.to_string()));
                return Err(e);
            }
        };
        cached.failed = None;
        cached.token = Some(token.clone());
        cached.minted_at = Some(self.clock.now());
        Ok(token)
    }
}

impl AppTokens {
    /// Reads the credential afresh (a rotated file is picked up) and notes what a certificate
    /// says about itself.
    fn load(&self) -> Result<Credential, CredentialError> {
        let credential = credential::load(&self.app)?;
        if let Credential::Certificate(c) = &credential {
            *lock(&self.certificate) = Some(CertificateSummary {
                thumbprint: c.info.thumbprint.clone(),
                not_after: c.info.not_after,
            });
        }
        Ok(credential)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A chain that lists its CA first: the expiry shown (`status`, the metric, the alarm) is
    /// the leaf's, at start and after the periodic re-read alike.
    #[test]
    fn the_reread_certificate_is_the_one_the_key_signs_for() {
        let dir = tempfile::tempdir().unwrap();
        let (leaf_until, ca_until) = (1_900_000_000, 2_200_000_000);
        let (leaf, key) = certificate::generated_until(leaf_until);
        let (ca, _) = certificate::generated_until(ca_until);
        let (cert_path, key_path) = (dir.path().join("chain.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert_path, format!("{ca}{leaf}")).unwrap();
        std::fs::write(&key_path, key).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut config = Config::default();
        config.applications.push(Application {
            tenant_id: "t".into(),
            client_id: "c".into(),
            certificate_file: Some(cert_path),
            private_key_file: Some(key_path),
            ..Application::default()
        });
        let clock = Clock::system();
        let tokens = TokenClient::new(
            &config,
            (reqwest::Client::new(), reqwest::Client::new()),
            clock.clone(),
            Arc::new(Metrics::default()),
            Arc::new(ServerTime::new(config.http.max_clock_offset, clock)),
        )
        .unwrap();
        let expiry =
            |tokens: &TokenClient| tokens.status()[0].certificate.clone().map(|c| c.not_after);
        assert_eq!(expiry(&tokens), Some(leaf_until), "at start");
        tokens.refresh_certificates();
        assert_eq!(expiry(&tokens), Some(leaf_until), "after a re-read");
    }
}
