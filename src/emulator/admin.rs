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
    pub client_secret: String,
}

pub(super) async fn register(
    State(st): State<AppState>,
    Json(req): Json<RegisterRequest>,
) -> StatusCode {
    st.emu
        .register_app(&req.tenant_id, &req.client_id, &req.client_secret);
    StatusCode::NO_CONTENT
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
