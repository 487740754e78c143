//! The admin API: what a test or a backend's CI uses to drive the emulator.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::state::{Faults, Stats, lock};
use crate::policy::claims::Kind;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MintRequest {
    pub kind: Kind,
    pub client_id: String,
    pub user_id: String,
    /// Seconds; default 30 days, as the real Store.
    pub lifetime_secs: Option<i64>,
    /// Mint the key as if issued this many seconds ago (a key already due for renewal).
    pub issued_secs_ago: Option<i64>,
}

pub(super) async fn mint(State(st): State<AppState>, Json(req): Json<MintRequest>) -> Response {
    let lifetime = req.lifetime_secs.unwrap_or(30 * 86_400);
    if lifetime <= 0 {
        return (StatusCode::BAD_REQUEST, "lifetime_secs must be positive").into_response();
    }
    let issued_at = st.emu.now() - req.issued_secs_ago.unwrap_or(0).max(0);
    let key = st
        .emu
        .mint_at(req.kind, &req.client_id, &req.user_id, lifetime, issued_at);
    Json(json!({ "key": key })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RevokeRequest {
    pub key: Option<String>,
    pub user_id: Option<String>,
}

pub(super) async fn revoke(State(st): State<AppState>, Json(req): Json<RevokeRequest>) -> Response {
    let revoked = match (req.key, req.user_id) {
        (Some(key), None) => usize::from(st.emu.revoke_key(&key)),
        (None, Some(user)) => st.emu.revoke_user(&user),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                "give exactly one of `key` and `user_id`",
            )
                .into_response();
        }
    };
    Json(json!({ "revoked": revoked })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RegisterRequest {
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    /// A PEM certificate whose key may sign the application's client assertions.
    pub certificate_pem: Option<String>,
    /// Federated identity credentials: tokens of `issuer` for `subject`.
    #[serde(default)]
    pub federated_credentials: Vec<FederatedCredential>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FederatedCredential {
    pub issuer: String,
    pub subject: String,
}

pub(super) async fn register(
    State(st): State<AppState>,
    Json(req): Json<RegisterRequest>,
) -> Response {
    let (tenant, client) = (req.tenant_id.as_str(), req.client_id.as_str());
    if let Some(pem) = &req.certificate_pem
        && let Err(e) = st.emu.register_certificate(tenant, client, pem)
    {
        return (StatusCode::BAD_REQUEST, e).into_response();
    }
    if let Some(secret) = &req.client_secret {
        st.emu.register_app(tenant, client, secret);
    }
    for f in &req.federated_credentials {
        st.emu
            .register_federated(tenant, client, &f.issuer, &f.subject);
    }
    st.emu.update_app(tenant, client, |_| {});
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ManagedIdentityRequest {
    pub tenant_id: String,
    pub client_id: String,
    pub principal_id: String,
}

/// Registers a managed identity; answers the issuer its tokens carry, for the application's
/// federated credential.
pub(super) async fn register_managed_identity(
    State(st): State<AppState>,
    Json(req): Json<ManagedIdentityRequest>,
) -> Json<serde_json::Value> {
    st.emu
        .register_managed_identity(&req.tenant_id, &req.client_id, &req.principal_id);
    Json(json!({ "issuer": st.emu.tenant_issuer(&req.tenant_id) }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FederatedTokenRequest {
    pub issuer: String,
    pub subject: String,
    /// Default `api://AzureADTokenExchange`.
    pub audience: Option<String>,
    /// Seconds; default one hour, as Kubernetes projects them.
    pub lifetime_secs: Option<i64>,
}

/// A token of a federated issuer, as a platform writes to its token file.
pub(super) async fn federated_token(
    State(st): State<AppState>,
    Json(req): Json<FederatedTokenRequest>,
) -> Json<serde_json::Value> {
    let audience = req
        .audience
        .unwrap_or_else(|| crate::remote::entra::TOKEN_EXCHANGE_AUDIENCE.to_owned());
    let token = st.emu.federated_token(
        &req.issuer,
        &req.subject,
        &audience,
        req.lifetime_secs.unwrap_or(3600),
    );
    Json(json!({ "token": token }))
}

pub(super) async fn get_faults(State(st): State<AppState>) -> Json<Faults> {
    Json(st.emu.faults())
}

pub(super) async fn put_faults(
    State(st): State<AppState>,
    Json(faults): Json<Faults>,
) -> StatusCode {
    st.emu.set_faults(faults);
    StatusCode::NO_CONTENT
}

pub(super) async fn get_stats(State(st): State<AppState>) -> Json<Stats> {
    Json(st.emu.stats())
}

pub(super) async fn reset_stats(State(st): State<AppState>) -> StatusCode {
    *lock(&st.emu.stats) = Stats::default();
    StatusCode::NO_CONTENT
}
