//! Token answers, from Entra ID and from the managed identity endpoint: the token and its
//! lifetime, or the error they gave. Lenient in what they accept (numbers as strings).

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::policy::fingerprint::Fingerprint;
use crate::remote::http::BodyError;

/// Who answered a token request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issuer {
    Entra,
    ManagedIdentity,
}

impl fmt::Display for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Issuer::Entra => "Entra ID",
            Issuer::ManagedIdentity => "the managed identity endpoint",
        })
    }
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
    #[error(transparent)]
    Credential(#[from] super::credential::CredentialError),
    #[error("application `{app}`: cannot sign a client assertion: {detail}")]
    Assertion { app: String, detail: String },
    #[error("token request for `{app}` to {issuer} {detail}")]
    Transport {
        app: String,
        issuer: Issuer,
        detail: String,
    },
    #[error("token request for `{app}` to {issuer}: {source}")]
    Body {
        app: String,
        issuer: Issuer,
        source: BodyError,
    },
    #[error(
        "{issuer} refused the token request for `{app}` (HTTP {status}): {error}: {description}"
    )]
    Refused {
        app: String,
        issuer: Issuer,
        status: u16,
        error: String,
        description: String,
    },
    #[error("token request for `{app}` failed moments ago, not retried yet: {detail}")]
    Recent { app: String, detail: String },
    #[error("token response from {issuer} for `{app}` (HTTP {status}) is not a token: {detail}")]
    Malformed {
        app: String,
        issuer: Issuer,
        status: u16,
        detail: String,
    },
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    /// A Unix time: what App Service's identity endpoint gives instead of `expires_in`.
    expires_on: Option<serde_json::Value>,
    error: Option<String>,
    error_description: Option<String>,
}

/// Parses a token answer. `expires_in` is a number on Entra's v2 endpoint and a string on v1 and
/// the metadata service: both are accepted.
pub fn parse_token_response(
    app: &str,
    issuer: Issuer,
    status: u16,
    body: &[u8],
    now: i64,
) -> Result<AccessToken, TokenError> {
    let malformed = |detail: &str| TokenError::Malformed {
        app: app.to_owned(),
        issuer,
        status,
        detail: detail.to_owned(),
    };
    let parsed: TokenBody =
        serde_json::from_slice(body).map_err(|_| malformed("body is not JSON"))?;
    if let Some(error) = parsed.error {
        return Err(TokenError::Refused {
            app: app.to_owned(),
            issuer,
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
    let expires_in = seconds(parsed.expires_in.as_ref())
        .or_else(|| seconds(parsed.expires_on.as_ref()).map(|on| on.saturating_sub(now)))
        .filter(|s| *s > 0)
        .ok_or_else(|| malformed("no positive `expires_in`"))?;
    Ok(AccessToken {
        fingerprint: Fingerprint::of(&token),
        value: SecretString::from(token),
        expires_at: now.saturating_add(expires_in),
    })
}

/// A number of seconds, as a JSON number or a string.
fn seconds(value: Option<&serde_json::Value>) -> Option<i64> {
    match value? {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(status: u16, body: &[u8], now: i64) -> Result<AccessToken, TokenError> {
        parse_token_response("a", Issuer::Entra, status, body, now)
    }

    #[test]
    fn expires_in_as_number_or_string() {
        let v2 = parse(
            200,
            br#"{"token_type":"Bearer","expires_in":3599,"access_token":"t1"}"#,
            100,
        )
        .unwrap();
        assert_eq!((v2.expose(), v2.expires_at), ("t1", 3699));
        let v1 = parse(200, br#"{"expires_in":"3599","access_token":"t2"}"#, 100).unwrap();
        assert_eq!(v1.expires_at, 3699);
        let on = parse(200, br#"{"expires_on":"5000","access_token":"t3"}"#, 100).unwrap();
        assert_eq!(on.expires_at, 5000);
        assert!(parse(200, br#"{"expires_on":"50","access_token":"t3"}"#, 100).is_err());
    }

    #[test]
    fn errors_are_surfaced_with_who_gave_them() {
        let body = br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#;
        let e = parse_token_response("main", Issuer::Entra, 401, body, 0)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "Entra ID refused the token request for `main` (HTTP 401): invalid_client: AADSTS7000215: Invalid client secret provided."
        );
        let body = br#"{"error":"invalid_request","error_description":"Identity not found"}"#;
        let e = parse_token_response("vm", Issuer::ManagedIdentity, 400, body, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("the managed identity endpoint refused the token request for `vm`"),
            "{e}"
        );
        assert!(matches!(
            parse(200, b"<html>", 0),
            Err(TokenError::Malformed { .. })
        ));
        assert!(matches!(
            parse(200, br#"{"access_token":"x"}"#, 0),
            Err(TokenError::Malformed { .. })
        ));
    }

    #[test]
    fn token_debug_hides_the_token() {
        let t = parse(
            200,
            br#"{"expires_in":1,"access_token":"very-secret-token"}"#,
            0,
        )
        .unwrap();
        assert!(!format!("{t:?}").contains("very-secret"));
    }

    proptest::proptest! {
        #[test]
        fn token_response_parsing_never_panics(status in 100u16..600, body in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse(status, &body, 0);
        }

        #[test]
        fn token_json_shapes_never_panic(token in proptest::option::of(".{0,20}"), expires in proptest::option::of(proptest::num::i64::ANY), error in proptest::option::of(".{0,20}")) {
            let body = serde_json::json!({"access_token": token, "expires_in": expires, "error": error}).to_string();
            let _ = parse(200, body.as_bytes(), i64::MAX);
        }
    }
}
