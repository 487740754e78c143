//! What a renew response means. Pure: status, headers and body in; a decision out.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::policy::claims::{self, Claims, KeyFacts, KeyText};

/// The inner error codes the renew call documents (reference/renew-a-store-id-key.txt).
pub const AUTH_TOKEN_INVALID: &str = "AuthenticationTokenInvalid";
pub const INCONSISTENT_CLIENT_ID: &str = "InconsistentClientId";

/// The classification of one renew response (or transport failure).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 200 with a `key`; not yet checked against the key it replaces (see [`check_renewed`]).
    Renewed(KeyText),
    /// 401 `AuthenticationTokenInvalid`: our access token or the key is invalid.
    AuthInvalid { detail: String },
    /// 401 `InconsistentClientId`: the key's clientId and the token's appid differ.
    ClientIdMismatch { detail: String },
    /// 429; retry no sooner than `retry_after` when given.
    Throttled { retry_after: Option<Duration> },
    /// 5xx, or a connection that failed before the request went out: the Store may answer
    /// later, and has not renewed the key.
    Transient { detail: String },
    /// Sent, and no complete answer came back (a timeout, a connection broken after sending,
    /// a 200 whose body was cut off): the Store may have renewed the key, and may since refuse
    /// the old one.
    Unanswered { detail: String },
    /// Anything else; recorded in full and retried with backoff.
    Unexpected { detail: String },
}

impl Outcome {
    /// The label used in the events table, metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Renewed(_) => "renewed",
            Outcome::AuthInvalid { .. } => "auth_invalid",
            Outcome::ClientIdMismatch { .. } => "client_id_mismatch",
            Outcome::Throttled { .. } => "throttled",
            Outcome::Transient { .. } => "transient",
            Outcome::Unanswered { .. } => "unanswered",
            Outcome::Unexpected { .. } => "unexpected",
        }
    }
}

/// An HTTP response reduced to what classification needs.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    pub status: u16,
    pub retry_after: Option<&'a str>,
    pub body: &'a [u8],
}

/// Classifies a response and returns the inner error code when the body had one.
pub fn classify(resp: Response<'_>, now: SystemTime) -> (Outcome, Option<String>) {
    let json: Option<Value> = serde_json::from_slice(resp.body).ok();
    let code = json.as_ref().and_then(error_code);
    let outcome = match resp.status {
        // A 200 we cannot use may still mean the Store renewed the key.
        200 => renewed_key(json.as_ref())
            .map(Outcome::Renewed)
            .unwrap_or_else(|| Outcome::Unanswered {
                detail: format!(
                    "200 without a `key` string in a {}-byte body",
                    resp.body.len()
                ),
            }),
        401 => match code.as_deref() {
            Some(AUTH_TOKEN_INVALID) => Outcome::AuthInvalid {
                detail: message(json.as_ref()),
            },
            Some(INCONSISTENT_CLIENT_ID) => Outcome::ClientIdMismatch {
                detail: message(json.as_ref()),
            },
            _ => Outcome::Unexpected {
                detail: format!("401 with code {}", code.as_deref().unwrap_or("none")),
            },
        },
        429 => Outcome::Throttled {
            retry_after: resp.retry_after.and_then(|v| parse_retry_after(v, now)),
        },
        408 | 500..=599 => Outcome::Transient {
            detail: format!("HTTP {}", resp.status),
        },
        s => Outcome::Unexpected {
            detail: format!("HTTP {s}"),
        },
    };
    (outcome, code)
}

/// The reason a 200 response's key is refused; the old key is then kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("renewed key does not decode: {0}")]
    Malformed(#[from] claims::KeyError),
    #[error("renewed key is a {got} key, the old one a {want} key")]
    OtherKind {
        got: claims::Kind,
        want: claims::Kind,
    },
    #[error("renewed key is for another clientId")]
    OtherClient,
    #[error("renewed key is for another userId")]
    OtherUser,
    #[error("renewed key expires at {got}, not later than the old key's {old}")]
    NotLater { got: i64, old: i64 },
}

/// Accepts a renewed key only if it is the same credential, later: same kind, client and user,
/// and a later `exp`. Anything else would silently replace a user's key with someone else's.
pub fn check_renewed(old: &KeyFacts, new_key: &KeyText) -> Result<Claims, Rejected> {
    let new = claims::decode(new_key.expose())?;
    if new.kind != old.kind {
        return Err(Rejected::OtherKind {
            got: new.kind,
            want: old.kind,
        });
    }
    if new.client_id != old.client_id {
        return Err(Rejected::OtherClient);
    }
    if old.user_id.is_some() && new.user_id != old.user_id {
        return Err(Rejected::OtherUser);
    }
    if new.expires_at <= old.expires_at {
        return Err(Rejected::NotLater {
            got: new.expires_at,
            old: old.expires_at,
        });
    }
    Ok(new)
}

fn renewed_key(json: Option<&Value>) -> Option<KeyText> {
    let obj = json?.as_object()?;
    let key = get_ci(obj, "key")?.as_str()?.trim();
    (!key.is_empty()).then(|| KeyText::new(key))
}

/// The inner code wins over the outer one: the documented body puts `Unauthorized` outside and
/// the specific reason inside. Field names are matched without case, since no real example exists.
fn error_code(json: &Value) -> Option<String> {
    let obj = json.as_object()?;
    let inner = get_ci(obj, "innererror")
        .and_then(Value::as_object)
        .and_then(|i| get_ci(i, "code"))
        .and_then(Value::as_str);
    let outer = get_ci(obj, "code").and_then(Value::as_str);
    let known = [AUTH_TOKEN_INVALID, INCONSISTENT_CLIENT_ID];
    [inner, outer]
        .into_iter()
        .flatten()
        .find(|c| known.contains(c))
        .or(inner)
        .or(outer)
        .map(|c| c.chars().take(100).collect())
}

fn message(json: Option<&Value>) -> String {
    let Some(obj) = json.and_then(Value::as_object) else {
        return String::new();
    };
    let inner = get_ci(obj, "innererror")
        .and_then(Value::as_object)
        .and_then(|i| get_ci(i, "message"))
        .and_then(Value::as_str);
    inner
        .or_else(|| get_ci(obj, "message").and_then(Value::as_str))
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect()
}

fn get_ci<'a>(obj: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// `Retry-After` is either delta-seconds or an HTTP date (RFC 9110 §10.2.3). Only what it asks
/// for: [`schedule::retry_time`](crate::policy::schedule::retry_time) bounds it.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More seconds than a u64 holds still asks for a very long wait, not for none.
        return Some(
            value
                .parse::<u64>()
                .map_or(Duration::MAX, Duration::from_secs),
        );
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::keymint::{KeySpec, mint};

    fn classify_body(status: u16, body: &str) -> Outcome {
        let resp = Response {
            status,
            retry_after: None,
            body: body.as_bytes(),
        };
        classify(resp, SystemTime::UNIX_EPOCH).0
    }

    #[test]
    fn ok_with_key_is_renewed() {
        assert_eq!(
            classify_body(200, r#"{"key":"a.b.c"}"#),
            Outcome::Renewed(KeyText::new("a.b.c"))
        );
        assert_eq!(
            classify_body(200, r#"{"Key":"a.b.c"}"#),
            Outcome::Renewed(KeyText::new("a.b.c"))
        );
    }

    #[test]
    fn ok_with_garbage_may_have_renewed() {
        for body in ["<html>", "{}", r#"{"key":7}"#, r#"{"key":""}"#, "[]"] {
            assert_eq!(classify_body(200, body).label(), "unanswered", "{body}");
        }
    }

    #[test]
    fn documented_401s_are_told_apart() {
        let body = |c: &str| {
            format!(
                r#"{{"code":"Unauthorized","message":"m","innererror":{{"code":"{c}","message":"inner"}}}}"#
            )
        };
        assert_eq!(
            classify_body(401, &body(AUTH_TOKEN_INVALID)),
            Outcome::AuthInvalid {
                detail: "inner".into()
            }
        );
        assert_eq!(
            classify_body(401, &body(INCONSISTENT_CLIENT_ID)).label(),
            "client_id_mismatch"
        );
        // The code at the top level only, with other casing of the field names.
        assert_eq!(
            classify_body(401, r#"{"Code":"InconsistentClientId"}"#).label(),
            "client_id_mismatch"
        );
        // A 401 we cannot read is not evidence of revocation.
        assert_eq!(classify_body(401, "nope").label(), "unexpected");
        assert_eq!(
            classify_body(401, r#"{"code":"Unauthorized"}"#).label(),
            "unexpected"
        );
    }

    #[test]
    fn inner_code_is_reported() {
        let resp = Response {
            status: 403,
            retry_after: None,
            body: br#"{"code":"Forbidden","innererror":{"code":"X"}}"#,
        };
        let (outcome, code) = classify(resp, SystemTime::UNIX_EPOCH);
        assert_eq!(outcome.label(), "unexpected");
        assert_eq!(code.as_deref(), Some("X"));
    }

    #[test]
    fn throttling_and_server_errors_are_retryable() {
        let resp = Response {
            status: 429,
            retry_after: Some("7"),
            body: b"slow down",
        };
        assert_eq!(
            classify(resp, SystemTime::UNIX_EPOCH).0,
            Outcome::Throttled {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        for s in [500, 502, 503, 504, 408] {
            assert_eq!(classify_body(s, "").label(), "transient");
        }
        assert_eq!(classify_body(404, "").label(), "unexpected");
    }

    #[test]
    fn retry_after_accepts_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777 - 30);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn retry_after_that_overflows_asks_for_the_longest_wait() {
        let now = SystemTime::UNIX_EPOCH;
        assert_eq!(
            parse_retry_after("18446744073709551615", now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_retry_after(" 99999999999999999999999 ", now),
            Some(Duration::MAX)
        );
        for garbage in ["", "-5", "1.5", "+7", "7s", "Thu, 99 Jan 2099 00:00:00 GMT"] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage:?}");
        }
    }

    #[test]
    fn renewed_key_must_be_the_same_credential_later() {
        let old_key = mint(&KeySpec::collections("app", 1_000_000, 100));
        let old = claims::decode(&old_key).unwrap().facts();
        let later = KeyText::new(mint(&KeySpec::collections("app", 1_000_050, 100)));
        assert_eq!(check_renewed(&old, &later).unwrap().expires_at, 1_000_150);

        let mut spec = KeySpec::collections("other", 1_000_050, 100);
        assert_eq!(
            check_renewed(&old, &KeyText::new(mint(&spec))),
            Err(Rejected::OtherClient)
        );
        spec.client_id = "app".into();
        spec.user_id = "someone-else".into();
        assert_eq!(
            check_renewed(&old, &KeyText::new(mint(&spec))),
            Err(Rejected::OtherUser)
        );
        spec.user_id = "user-1".into();
        spec.kind = claims::Kind::Purchase;
        assert!(matches!(
            check_renewed(&old, &KeyText::new(mint(&spec))),
            Err(Rejected::OtherKind { .. })
        ));
        let same = KeyText::new(mint(&KeySpec::collections("app", 1_000_000, 100)));
        assert!(matches!(
            check_renewed(&old, &same),
            Err(Rejected::NotLater { .. })
        ));
        assert!(matches!(
            check_renewed(&old, &KeyText::new("garbage")),
            Err(Rejected::Malformed(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn classification_never_panics(status in 100u16..600, body in proptest::collection::vec(proptest::num::u8::ANY, 0..300), ra in ".{0,40}") {
            let _ = classify(Response { status, retry_after: Some(&ra), body: &body }, SystemTime::now());
        }
    }
}
