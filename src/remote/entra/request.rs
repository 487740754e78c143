//! One token request: the form each kind of credential sends to Entra ID's v2 token endpoint,
//! and the managed identity's own token from the instance metadata service.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

use super::assertion::{self, AssertionClaims, JWT_BEARER};
use super::response::{AccessToken, Issuer, TokenError, parse_token_response};
use super::{AppTokens, Cached, Credential, REFRESH_AHEAD_SECS, TokenClient};
use crate::remote::http;

/// The metadata service's API version for managed identity tokens.
const IMDS_API_VERSION: &str = "2018-02-01";

impl TokenClient {
    pub(super) fn token_url(&self, app: &crate::config::Application) -> String {
        format!("{}/{}/oauth2/v2.0/token", self.authority, app.tenant_id)
    }

    pub(super) async fn request(
        &self,
        entry: &AppTokens,
        cached: &mut Cached,
    ) -> Result<AccessToken, TokenError> {
        let app = entry.app.label().to_owned();
        let credential = entry.load()?;
        let url = self.token_url(&entry.app);
        let proof = self.proof(entry, cached, &credential, &url).await?;
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", entry.app.client_id.as_str()),
            ("scope", self.scope.as_str()),
        ];
        match &proof {
            Proof::Secret(secret) => form.push(("client_secret", secret.expose_secret())),
            Proof::Assertion(jwt) => {
                form.push(("client_assertion_type", JWT_BEARER));
                form.push(("client_assertion", jwt.expose_secret()));
            }
        }
        let transport = |e: reqwest::Error| TokenError::Transport {
            app: app.clone(),
            issuer: Issuer::Entra,
            detail: http::describe(&e),
        };
        let resp = self
            .http
            .post(&url)
            .form(&form)
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status().as_u16();
        self.server_time.observe(status, resp.headers());
        let body = http::read_body(resp, self.max_body)
            .await
            .map_err(|source| TokenError::Body {
                app: app.clone(),
                issuer: Issuer::Entra,
                source,
            })?;
        let result = parse_token_response(&app, Issuer::Entra, status, &body, self.clock.now());
        if matches!(result, Err(TokenError::Refused { .. })) {
            // The identity's token may be what Entra refused: the next try asks for a new one.
            cached.identity_token = None;
        }
        result
    }

    /// What proves the application in this request.
    async fn proof(
        &self,
        entry: &AppTokens,
        cached: &mut Cached,
        credential: &Credential,
        url: &str,
    ) -> Result<Proof, TokenError> {
        let app = entry.app.label();
        Ok(match credential {
            Credential::Secret(s) => Proof::Secret(s.clone()),
            Credential::Federated(token) => Proof::Assertion(token.clone()),
            Credential::Certificate(cert) => {
                let failed = |detail: String| TokenError::Assertion {
                    app: app.to_owned(),
                    detail,
                };
                let jti = assertion::new_jti().map_err(failed)?;
                // Entra judges `nbf` and `exp` on its own clock.
                let claims =
                    AssertionClaims::new(&entry.app.client_id, url, self.server_time.now(), jti);
                Proof::Assertion(assertion::sign(cert, &claims).map_err(failed)?)
            }
            Credential::ManagedIdentity { client_id } => {
                let token = self.identity_token(app, cached, client_id).await?;
                Proof::Assertion(SecretString::from(token.expose().to_owned()))
            }
        })
    }

    /// The managed identity's token for the exchange audience, cached while it has time left.
    async fn identity_token(
        &self,
        app: &str,
        cached: &mut Cached,
        identity: &str,
    ) -> Result<Arc<AccessToken>, TokenError> {
        if let Some(token) = &cached.identity_token
            && token.expires_at - self.clock.now() > REFRESH_AHEAD_SECS
        {
            return Ok(token.clone());
        }
        let transport = |e: reqwest::Error| TokenError::Transport {
            app: app.to_owned(),
            issuer: Issuer::ManagedIdentity,
            detail: http::describe(&e),
        };
        let url = reqwest::Url::parse_with_params(
            &self.identity_endpoint,
            [
                ("api-version", IMDS_API_VERSION),
                ("resource", self.exchange_audience.as_str()),
                ("client_id", identity),
            ],
        )
        .map_err(|e| TokenError::Transport {
            app: app.to_owned(),
            issuer: Issuer::ManagedIdentity,
            detail: format!("has no valid URL (entra.managed_identity_endpoint): {e}"),
        })?;
        let resp = self
            .metadata_http
            .get(url)
            .header("Metadata", "true")
            .send()
            .await
            .map_err(transport)?;
        // The metadata service's Date is the host's, not Entra's: not a time source.
        let status = resp.status().as_u16();
        let body = http::read_body(resp, self.max_body)
            .await
            .map_err(|source| TokenError::Body {
                app: app.to_owned(),
                issuer: Issuer::ManagedIdentity,
                source,
            })?;
        let token = Arc::new(parse_token_response(
            app,
            Issuer::ManagedIdentity,
            status,
            &body,
            self.clock.now(),
        )?);
        cached.identity_token = Some(token.clone());
        Ok(token)
    }
}

enum Proof {
    Secret(SecretString),
    Assertion(SecretString),
}
