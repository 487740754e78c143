//! Credentials other than secrets, as Entra ID checks them: client assertions signed with a
//! registered certificate (signature, `x5t#S256`, `aud`, `iss`/`sub`, lifetime, `jti` reuse),
//! federated tokens from a registered issuer and subject, and the instance metadata service's
//! managed identity tokens (which are federated tokens of the tenant's issuer).

use std::collections::HashMap;
use std::sync::Mutex;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AppState;
use super::state::{App, Emulator, lock};
use super::token::Refusal;
use crate::remote::entra::TOKEN_EXCHANGE_AUDIENCE;

/// How far in the future an assertion's `nbf` may be (clock skew).
const SKEW_SECS: i64 = 300;
/// Managed identity tokens live a day, as Azure's do.
const IDENTITY_TOKEN_SECS: i64 = 86_399;

/// The emulator's identity side: what it issues and what it has seen.
pub struct Identities {
    /// Signs the federated and managed identity tokens the emulator issues.
    secret: [u8; 32],
    /// Managed identities by client ID: (principal ID, tenant).
    managed: Mutex<HashMap<String, (String, String)>>,
    /// `jti`s of accepted client assertions, with their expiry.
    seen_jtis: Mutex<HashMap<String, i64>>,
    /// Every client assertion and federated token received or issued, for tests that look for
    /// leaks.
    assertions: Mutex<Vec<String>>,
}

impl Default for Identities {
    fn default() -> Self {
        let mut secret = [0u8; 32];
        secret.iter_mut().for_each(|b| *b = fastrand::u8(..));
        Identities {
            secret,
            managed: Mutex::default(),
            seen_jtis: Mutex::default(),
            assertions: Mutex::default(),
        }
    }
}

/// A certificate registered on an application, read by the emulator itself (not with the
/// daemon's parser, so a mistake there cannot agree with itself).
#[derive(Debug, Clone)]
pub struct RegisteredCertificate {
    /// base64url of the SHA-256 of the DER.
    pub thumbprint: String,
    /// The RSA public key (PKCS#1).
    pub public_key: Vec<u8>,
    pub not_after: i64,
}

impl RegisteredCertificate {
    fn from_pem(pem: &str) -> Result<Self, String> {
        use base64::Engine as _;
        use sha2::Digest as _;
        use x509_cert::der::Encode as _;
        let chain = x509_cert::Certificate::load_pem_chain(pem.as_bytes())
            .map_err(|e| format!("not a PEM certificate: {e}"))?;
        let cert = chain.first().ok_or("no certificate")?;
        let der = cert.to_der().map_err(|e| e.to_string())?;
        let tbs = cert.tbs_certificate();
        let not_after = tbs.validity().not_after.to_unix_duration().as_secs();
        Ok(RegisteredCertificate {
            thumbprint: base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sha2::Sha256::digest(&der)),
            public_key: tbs
                .subject_public_key_info()
                .subject_public_key
                .raw_bytes()
                .to_vec(),
            not_after: i64::try_from(not_after).unwrap_or(i64::MAX),
        })
    }
}

/// The claims of a federated token the emulator issues.
#[derive(Debug, Serialize, Deserialize)]
struct FederatedClaims {
    iss: String,
    sub: String,
    aud: String,
    iat: i64,
    nbf: i64,
    exp: i64,
}

impl Emulator {
    /// Registers a certificate on the application (created if new).
    pub fn register_certificate(
        &self,
        tenant_id: &str,
        client_id: &str,
        certificate_pem: &str,
    ) -> Result<(), String> {
        let info = RegisteredCertificate::from_pem(certificate_pem)?;
        self.update_app(tenant_id, client_id, |app| app.certificates.push(info));
        Ok(())
    }

    /// Lets the application accept federated tokens of `issuer` for `subject`.
    pub fn register_federated(
        &self,
        tenant_id: &str,
        client_id: &str,
        issuer: &str,
        subject: &str,
    ) {
        self.update_app(tenant_id, client_id, |app| {
            app.federated.push((issuer.to_owned(), subject.to_owned()));
        });
    }

    /// A user-assigned managed identity the metadata endpoint serves tokens for.
    pub fn register_managed_identity(&self, tenant_id: &str, client_id: &str, principal_id: &str) {
        lock(&self.identities.managed).insert(
            client_id.to_owned(),
            (principal_id.to_owned(), tenant_id.to_owned()),
        );
    }

    /// The issuer of a tenant's managed identity tokens (Entra's v2 issuer).
    pub fn tenant_issuer(&self, tenant_id: &str) -> String {
        format!("{}/{tenant_id}/v2.0", self.base_url)
    }

    /// The metadata endpoint to configure (`entra.managed_identity_endpoint`).
    pub fn managed_identity_endpoint(&self) -> String {
        format!("{}/metadata/identity/oauth2/token", self.base_url)
    }

    /// A token of `issuer` for `subject`, as a platform (Kubernetes) writes to its token file.
    pub fn federated_token(
        &self,
        issuer: &str,
        subject: &str,
        audience: &str,
        lifetime_secs: i64,
    ) -> String {
        let now = self.now();
        let claims = FederatedClaims {
            iss: issuer.to_owned(),
            sub: subject.to_owned(),
            aud: audience.to_owned(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(lifetime_secs),
        };
        let key = EncodingKey::from_secret(&self.identities.secret);
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap_or_default();
        lock(&self.identities.assertions).push(token.clone());
        token
    }

    /// Every client assertion and federated token the emulator received or issued.
    pub fn seen_assertions(&self) -> Vec<String> {
        lock(&self.identities.assertions).clone()
    }

    /// Checks a `client_assertion` for `client_id`: by certificate when it names one
    /// (`x5t#S256`), else as a federated token.
    pub(super) fn verify_assertion(
        &self,
        app: &App,
        client_id: &str,
        tenant: &str,
        assertion: &str,
    ) -> Result<(), Refusal> {
        {
            let mut seen = lock(&self.identities.assertions);
            if seen.len() < 100_000 {
                seen.push(assertion.to_owned());
            }
        }
        let header = jsonwebtoken::decode_header(assertion)
            .map_err(|_| invalid("AADSTS50027: JWT token is invalid or malformed."))?;
        match header.x5t_s256 {
            Some(thumbprint) => {
                self.verify_signed(app, client_id, tenant, assertion, header.alg, &thumbprint)
            }
            None => self.verify_federated(app, assertion),
        }
    }

    fn verify_signed(
        &self,
        app: &App,
        client_id: &str,
        tenant: &str,
        assertion: &str,
        alg: Algorithm,
        thumbprint: &str,
    ) -> Result<(), Refusal> {
        let cert = app
            .certificates
            .iter()
            .find(|c| c.thumbprint == thumbprint)
            .ok_or_else(|| invalid(format!("AADSTS700027: The certificate with identifier used to sign the client assertion is not registered on application {client_id}.")))?;
        if !matches!(alg, Algorithm::PS256 | Algorithm::RS256) {
            return Err(invalid(
                "AADSTS5002730: the client assertion must be signed with PS256 or RS256.",
            ));
        }
        if cert.not_after <= self.now() {
            return Err(invalid(format!(
                "AADSTS7000222: The provided client certificate keys of application {client_id} are expired."
            )));
        }
        let mut validation = Validation::new(alg);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<serde_json::Value>(
            assertion,
            &DecodingKey::from_rsa_der(&cert.public_key),
            &validation,
        )
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => {
                invalid("AADSTS7000274: Client assertion failed signature validation.")
            }
            _ => invalid(format!(
                "AADSTS50027: JWT token is invalid or malformed: {e}."
            )),
        })?
        .claims;
        // Each claim by its name, as Entra reads them.
        let text = |name: &str| claims.get(name).and_then(serde_json::Value::as_str);
        let time = |name: &str| claims.get(name).and_then(serde_json::Value::as_i64);
        let token_url = format!("{}/{tenant}/oauth2/v2.0/token", self.base_url);
        if text("aud") != Some(token_url.as_str()) {
            return Err(invalid(format!(
                "AADSTS700212: The audience of the client assertion must be the token endpoint, {token_url}."
            )));
        }
        if text("iss") != Some(client_id) || text("sub") != Some(client_id) {
            return Err(invalid(
                "AADSTS700023: The client assertion's issuer and subject must be the client ID.",
            ));
        }
        let (Some(nbf), Some(iat), Some(exp)) = (time("nbf"), time("iat"), time("exp")) else {
            return Err(invalid(
                "AADSTS50027: the client assertion needs numeric nbf, iat and exp claims.",
            ));
        };
        self.check_lifetime(nbf.max(iat), exp)?;
        let jti = text("jti").unwrap_or_default().to_owned();
        let now = self.now();
        let mut seen = lock(&self.identities.seen_jtis);
        seen.retain(|_, until| *until > now);
        if jti.is_empty() || seen.insert(jti, exp).is_some() {
            return Err(invalid(
                "AADSTS7000215: The client assertion's jti has been used before (a replayed assertion).",
            ));
        }
        Ok(())
    }

    fn verify_federated(&self, app: &App, assertion: &str) -> Result<(), Refusal> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<FederatedClaims>(
            assertion,
            &DecodingKey::from_secret(&self.identities.secret),
            &validation,
        )
        .map_err(|_| invalid("AADSTS50013: Assertion failed signature validation."))?
        .claims;
        if claims.aud != TOKEN_EXCHANGE_AUDIENCE {
            return Err(invalid(format!(
                "AADSTS700212: No matching federated identity record found for presented assertion audience '{}'.",
                claims.aud
            )));
        }
        self.check_lifetime(claims.nbf, claims.exp)?;
        if !app
            .federated
            .iter()
            .any(|(iss, sub)| *iss == claims.iss && *sub == claims.sub)
        {
            return Err(invalid(format!(
                "AADSTS70021: No matching federated identity record found for presented assertion. Assertion Issuer: '{}'. Assertion Subject: '{}'.",
                claims.iss, claims.sub
            )));
        }
        Ok(())
    }

    fn check_lifetime(&self, nbf: i64, exp: i64) -> Result<(), Refusal> {
        let now = self.now();
        if exp <= now || nbf > now + SKEW_SECS {
            return Err(invalid(
                "AADSTS700024: Client assertion is not within its valid time range.",
            ));
        }
        Ok(())
    }
}

fn invalid(description: impl Into<String>) -> Refusal {
    (
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        description.into(),
    )
}

#[derive(Deserialize)]
pub(super) struct IdentityQuery {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
    resource: Option<String>,
    client_id: Option<String>,
}

/// `GET /metadata/identity/oauth2/token`: the instance metadata service's managed identity
/// token, for user-assigned identities (chosen by `client_id`).
pub(super) async fn metadata_token(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<IdentityQuery>,
) -> Response {
    let refuse = |status: StatusCode, description: &str| {
        let body = json!({"error": "invalid_request", "error_description": description});
        (status, axum::Json(body)).into_response()
    };
    if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Required metadata header not specified",
        );
    }
    if q.api_version.is_none() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Required query variable 'api-version' is missing",
        );
    }
    let resource = q.resource.unwrap_or_default();
    if resource != TOKEN_EXCHANGE_AUDIENCE {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the emulator serves tokens for api://AzureADTokenExchange only",
        );
    }
    let identity = q.client_id.unwrap_or_default();
    let Some((principal, tenant)) = lock(&st.emu.identities.managed).get(&identity).cloned() else {
        return refuse(StatusCode::BAD_REQUEST, "Identity not found");
    };
    let issuer = st.emu.tenant_issuer(&tenant);
    let token = st
        .emu
        .federated_token(&issuer, &principal, &resource, IDENTITY_TOKEN_SECS);
    lock(&st.emu.stats).identity_tokens_issued += 1;
    let now = st.emu.now();
    let body = json!({
        "access_token": token,
        "client_id": identity,
        "expires_in": IDENTITY_TOKEN_SECS.to_string(),
        "expires_on": (now + IDENTITY_TOKEN_SECS).to_string(),
        "ext_expires_in": IDENTITY_TOKEN_SECS.to_string(),
        "not_before": now.to_string(),
        "resource": resource,
        "token_type": "Bearer",
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}
