//! Entra ID's v2 token endpoint, client-credentials grant with a client secret or a client
//! assertion (checked in [`super::identity`]).

use std::collections::HashMap;

use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AppState;
use super::state::{Emulator, lock};
use crate::remote::entra::assertion::JWT_BEARER;

pub(super) const AUDIENCE: &str = "https://onestore.microsoft.com";
const SCOPE: &str = "https://onestore.microsoft.com/.default";

/// The claims of the access tokens (service tickets) the emulator issues.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Ticket {
    pub aud: String,
    pub iss: String,
    pub appid: String,
    pub tid: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
}

pub(super) async fn token(
    State(st): State<AppState>,
    Path(tenant): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    lock(&st.emu.stats).token_requests += 1;
    match issue(&st.emu, &tenant, &form) {
        Ok(body) => {
            lock(&st.emu.stats).tokens_issued += 1;
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Err((status, error, description)) => {
            let body = json!({
                "error": error,
                "error_description": description,
                "error_codes": [7000215],
                "timestamp": "2026-01-01 00:00:00Z",
                "trace_id": "00000000-0000-0000-0000-000000000000",
                "correlation_id": "00000000-0000-0000-0000-000000000000",
            });
            (status, axum::Json(body)).into_response()
        }
    }
}

pub(super) type Refusal = (StatusCode, &'static str, String);

fn issue(
    emu: &Emulator,
    tenant: &str,
    form: &HashMap<String, String>,
) -> Result<serde_json::Value, Refusal> {
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    if field("grant_type") != "client_credentials" {
        return Err((
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "AADSTS70003: only client_credentials is emulated".into(),
        ));
    }
    if field("scope") != SCOPE {
        return Err((
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!("AADSTS70011: the scope must be {SCOPE}"),
        ));
    }
    let client_id = field("client_id");
    let app = lock(&emu.apps).get(client_id).cloned().ok_or_else(|| {
        (
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            format!("AADSTS700016: Application with identifier '{client_id}' was not found"),
        )
    })?;
    if app.tenant_id != tenant {
        return Err((
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("AADSTS90002: Tenant '{tenant}' not found for this application"),
        ));
    }
    match (
        form.get("client_secret"),
        form.get("client_assertion_type").map(String::as_str),
        form.get("client_assertion"),
    ) {
        (Some(secret), None, None) => {
            if app.secret.as_ref() != Some(secret) {
                return Err((
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "AADSTS7000215: Invalid client secret provided.".into(),
                ));
            }
        }
        (None, Some(JWT_BEARER), Some(assertion)) => {
            emu.verify_assertion(&app, client_id, tenant, assertion)?;
        }
        _ => {
            return Err((
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!(
                    "AADSTS7000218: the request must contain exactly one of client_secret and a client_assertion of type {JWT_BEARER}"
                ),
            ));
        }
    }
    let now = emu.now();
    let expires_in = 3599;
    let ticket = Ticket {
        aud: AUDIENCE.into(),
        iss: format!("https://sts.windows.net/{tenant}/"),
        appid: client_id.to_owned(),
        tid: tenant.to_owned(),
        iat: now,
        nbf: now,
        exp: now + expires_in,
    };
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &ticket,
        &EncodingKey::from_secret(&emu.ticket_secret),
    )
    .map_err(|e| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            e.to_string(),
        )
    })?;
    {
        let mut tokens = lock(&emu.tokens);
        if tokens.len() < 100_000 {
            tokens.push(token.clone());
        }
    }
    let expires_in = if emu.faults().expires_in_as_string {
        json!(expires_in.to_string())
    } else {
        json!(expires_in)
    };
    Ok(
        json!({"token_type": "Bearer", "expires_in": expires_in, "ext_expires_in": 3599, "access_token": token}),
    )
}

/// Checks a ticket the emulator issued: signature, audience, and expiry on the emulator's clock.
pub(super) fn verify(emu: &Emulator, ticket: &str) -> Result<Ticket, &'static str> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&[AUDIENCE]);
    // Expiry is checked against the emulator's clock, which tests move forward.
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<Ticket>(
        ticket,
        &DecodingKey::from_secret(&emu.ticket_secret),
        &validation,
    )
    .map_err(|_| "the access token is not one this service issued, or its audience is wrong")?;
    if data.claims.exp <= emu.now() {
        return Err("the access token has expired");
    }
    Ok(data.claims)
}
