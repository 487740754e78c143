//! The renew endpoints, with fault injection.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::state::{Emulator, Faults, WrongSuccessor, key_id, lock};
use super::token;
use crate::policy::claims::Kind;
use crate::policy::outcome::{AUTH_TOKEN_INVALID, INCONSISTENT_CLIENT_ID};

pub(super) async fn collections(State(st): State<AppState>, body: Bytes) -> Response {
    handle(st, Kind::Collections, body).await
}

pub(super) async fn purchase(State(st): State<AppState>, body: Bytes) -> Response {
    handle(st, Kind::Purchase, body).await
}

async fn handle(st: AppState, kind: Kind, body: Bytes) -> Response {
    lock(&st.emu.stats).renew_requests += 1;
    let faults = st.emu.faults();
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    let response = match injected(&faults, st.emu.draw()) {
        Some(Injected::Timeout) => return never_answer(&st).await,
        Some(Injected::Status(StatusCode::TOO_MANY_REQUESTS)) => {
            let mut r = (
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit is exceeded. Try again later.",
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&faults.retry_after_secs.to_string()) {
                r.headers_mut().insert("retry-after", v);
            }
            r
        }
        Some(Injected::Status(status)) => (status, "upstream error").into_response(),
        Some(Injected::Garbage) => (
            StatusCode::OK,
            "<html><body>Service Unavailable</body></html>",
        )
            .into_response(),
        Some(Injected::Huge) => {
            let body = format!("{{\"key\":\"{}\"}}", "A".repeat(2 << 20));
            (StatusCode::OK, body).into_response()
        }
        Some(Injected::Trickle) => trickle(st.shutdown.clone()),
        None => match renew(&st.emu, &faults, kind, &body) {
            Some(response) => response,
            None => return never_answer(&st).await,
        },
    };
    finish(&st.emu, response)
}

enum Injected {
    Timeout,
    Status(StatusCode),
    Garbage,
    Huge,
    Trickle,
}

/// A 200 whose body comes one byte every 200 ms: only a whole-request timeout ends it.
fn trickle(stop: tokio_util::sync::CancellationToken) -> Response {
    let body = br#"{"key":"eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl"}"#.to_vec();
    let stream = futures_util::stream::unfold((body, 0usize, stop), |(body, i, stop)| async move {
        if i >= body.len() {
            return None;
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let byte = Bytes::copy_from_slice(&body[i..=i]);
        Some((Ok::<_, std::io::Error>(byte), (body, i + 1, stop)))
    });
    Response::new(axum::body::Body::from_stream(stream))
}

fn injected(f: &Faults, mut draw: f64) -> Option<Injected> {
    let table = [
        (f.timeout_rate, Injected::Timeout),
        (
            f.throttle_rate,
            Injected::Status(StatusCode::TOO_MANY_REQUESTS),
        ),
        (
            f.error_500_rate,
            Injected::Status(StatusCode::INTERNAL_SERVER_ERROR),
        ),
        (
            f.error_503_rate,
            Injected::Status(StatusCode::SERVICE_UNAVAILABLE),
        ),
        (f.garbage_rate, Injected::Garbage),
        (f.huge_body_rate, Injected::Huge),
        (f.trickle_rate, Injected::Trickle),
    ];
    for (rate, what) in table {
        if draw < rate {
            return Some(what);
        }
        draw -= rate;
    }
    None
}

/// Holds the call open until the client gives up (or the emulator stops).
async fn never_answer(st: &AppState) -> Response {
    lock(&st.emu.stats).timeouts += 1;
    tokio::select! {
        () = st.shutdown.cancelled() => {}
        () = tokio::time::sleep(Duration::from_secs(3600)) => {}
    }
    StatusCode::SERVICE_UNAVAILABLE.into_response()
}

/// The real behaviour: check the ticket, then the key, then the client IDs; mint a successor.
/// `None`: renewed, and the answer is to be lost (`Faults::lose_answers_for`).
fn renew(emu: &Emulator, faults: &Faults, kind: Kind, body: &[u8]) -> Option<Response> {
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return Some(service_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "InvalidRequestBody",
            "the body is not a JSON object",
        ));
    };
    let (Some(ticket), Some(key)) = (
        req.get("serviceTicket").and_then(Value::as_str),
        req.get("key").and_then(Value::as_str),
    ) else {
        return Some(service_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "InvalidRequestBody",
            "serviceTicket and key are required",
        ));
    };
    // Strict, so a client that sends what a backend padded is caught.
    if key.trim().len() != key.len() {
        return Some(service_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "InvalidRequestBody",
            "the key has whitespace around it",
        ));
    }
    let ticket = match token::verify(emu, ticket) {
        Ok(t) => t,
        Err(why) => return Some(unauthorized(AUTH_TOKEN_INVALID, why)),
    };
    if faults.reject_tickets_for.contains(&ticket.appid) {
        return Some(unauthorized(
            AUTH_TOKEN_INVALID,
            "the access token is invalid",
        ));
    }
    let issued = lock(&emu.keys).get(&key_id(key)).cloned();
    let Some(issued) = issued else {
        return Some(unauthorized(
            AUTH_TOKEN_INVALID,
            "the key was not issued by this service",
        ));
    };
    if issued.revoked || issued.expires_at <= emu.now() || issued.kind != kind {
        return Some(unauthorized(
            AUTH_TOKEN_INVALID,
            "the key is expired, revoked, or for another service",
        ));
    }
    if issued.client_id != ticket.appid
        || faults.inconsistent_client_ids.contains(&issued.client_id)
    {
        return Some(unauthorized(
            INCONSISTENT_CLIENT_ID,
            "the key's clientId and the token's appid differ",
        ));
    }
    let (mut new_kind, mut client, mut user) =
        (kind, issued.client_id.clone(), issued.user_id.clone());
    match faults.wrong_successor {
        Some(WrongSuccessor::Kind) => {
            new_kind = Kind::ALL.into_iter().find(|k| *k != kind).unwrap_or(kind);
        }
        Some(WrongSuccessor::Client) => client.push_str("-other"),
        Some(WrongSuccessor::User) => user.push_str("-other"),
        None => {}
    }
    let new_key = emu.mint(new_kind, &client, &user, issued.lifetime_secs);
    if faults.retire_renewed_keys {
        emu.revoke_key(key);
    }
    lock(&emu.stats).renewed += 1;
    *lock(&emu.renewals)
        .entry((kind, issued.user_id.clone()))
        .or_default() += 1;
    lock(&emu.renewed_at).insert((kind, issued.user_id.clone()), emu.clock.now_ms());
    if faults.lose_answers_for.contains(&issued.user_id) {
        return None;
    }
    Some((StatusCode::OK, axum::Json(json!({ "key": new_key }))).into_response())
}

fn unauthorized(inner: &str, message: &str) -> Response {
    service_error(StatusCode::UNAUTHORIZED, "Unauthorized", inner, message)
}

/// The ServiceError shape from reference/store-api.md.
fn service_error(status: StatusCode, code: &str, inner: &str, message: &str) -> Response {
    let body = json!({
        "code": code,
        "message": message,
        "innererror": {"code": inner, "message": message, "data": [], "details": [], "source": "emulator"},
        "data": [],
        "details": [],
        "source": "emulator",
    });
    (status, axum::Json(body)).into_response()
}

/// Counts the answer and adds the MS-* correlation headers every Store response carries.
fn finish(emu: &Emulator, mut response: Response) -> Response {
    let status = response.status().as_u16();
    *lock(&emu.stats).renew_by_status.entry(status).or_default() += 1;
    let headers: &mut HeaderMap = response.headers_mut();
    for (name, value) in [
        ("ms-correlationid", uuid_like()),
        ("ms-requestid", uuid_like()),
        ("ms-cv", format!("{:016x}.0.0", fastrand::u64(..))),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    response
}

fn uuid_like() -> String {
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}
