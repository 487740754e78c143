//! Decoding a Store ID key into its claims. Pure: no clock, no network.
//!
//! Keys are decoded without verifying the signature: only the Store holds the keys to check it
//! (reference/store-api.md). Everything we decide from the claims is therefore advisory, which is
//! why the renew call never goes to a URL taken from the key.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::Value;

use crate::policy::fingerprint::Fingerprint;

pub const CLAIM_CLIENT_ID: &str =
    "http://schemas.microsoft.com/marketplace/2015/08/claims/key/clientId";
pub const CLAIM_USER_ID: &str =
    "http://schemas.microsoft.com/marketplace/2015/08/claims/key/userId";
pub const CLAIM_PAYLOAD: &str =
    "http://schemas.microsoft.com/marketplace/2015/08/claims/key/payload";
pub const CLAIM_REFRESH_URI: &str =
    "http://schemas.microsoft.com/marketplace/2015/08/claims/key/refreshUri";

pub const AUD_COLLECTIONS: &str = "https://collections.mp.microsoft.com/v6.0/keys";
pub const AUD_PURCHASE: &str = "https://purchase.mp.microsoft.com/v6.0/keys";

/// Real keys are a few kilobytes; anything far larger is hostile or broken, and decoding it would
/// only cost memory.
pub const MAX_KEY_LEN: usize = 16 * 1024;

/// Which Store service a key is for; decided by its `aud` claim.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Collections,
    Purchase,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Collections, Kind::Purchase];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Collections => "collections",
            Kind::Purchase => "purchase",
        }
    }

    pub fn audience(self) -> &'static str {
        match self {
            Kind::Collections => AUD_COLLECTIONS,
            Kind::Purchase => AUD_PURCHASE,
        }
    }

    /// The renew URL Microsoft documents for this kind of key (what genuine keys advertise as
    /// `refreshUri`).
    pub fn documented_renew_url(self) -> &'static str {
        match self {
            Kind::Collections => "https://collections.mp.microsoft.com/v6.0/b2b/keys/renew",
            Kind::Purchase => "https://purchase.mp.microsoft.com/v6.0/b2b/keys/renew",
        }
    }

    pub fn from_audience(aud: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.audience() == aud)
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The claims of one key. The opaque `payload` claim is deliberately not kept: it is for the
/// Store only and there is no reason to hold more of the credential than the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub kind: Kind,
    pub issued_at: i64,
    pub not_before: Option<i64>,
    pub expires_at: i64,
    pub issuer: Option<String>,
    pub client_id: String,
    pub user_id: Option<String>,
    pub refresh_uri: Option<String>,
    pub has_payload: bool,
    pub algorithm: Option<String>,
}

impl Claims {
    pub fn lifetime_secs(&self) -> i64 {
        self.expires_at - self.issued_at
    }

    /// What a row keeps of these claims.
    pub fn facts(&self) -> KeyFacts {
        KeyFacts {
            kind: self.kind,
            client_id: self.client_id.clone(),
            user_id: self.user_id.clone(),
            issued_at: self.issued_at,
            expires_at: self.expires_at,
        }
    }
}

/// The claims a key row stores beside the key once ingest has decoded it: everything an attempt
/// needs, so that no attempt decodes a key again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct KeyFacts {
    pub kind: Kind,
    pub client_id: String,
    /// Absent on rows activated before the column existed; then the successor's user is not
    /// compared.
    pub user_id: Option<String>,
    pub issued_at: i64,
    pub expires_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is empty")]
    Empty,
    #[error("key is {0} bytes, more than the {MAX_KEY_LEN} a Store key can be")]
    TooLong(usize),
    #[error("key is not a JWT: expected 3 dot-separated parts, found {0}")]
    NotThreeParts(usize),
    #[error("key {part} is not base64url")]
    BadBase64 { part: &'static str },
    #[error("key {part} is not a JSON object")]
    BadJson { part: &'static str },
    #[error("key header has alg `{0}`, expected RS256")]
    UnexpectedAlgorithm(String),
    #[error("key has no `{0}` claim")]
    MissingClaim(&'static str),
    #[error("key claim `{0}` is not a whole number of seconds")]
    NotANumber(&'static str),
    #[error("key claim `{0}` is not a string")]
    NotAString(&'static str),
    #[error("key `aud` is `{0}`, which is neither the collections nor the purchase audience")]
    UnknownAudience(String),
}

/// Decodes a key. Every way a string can fail to be a Store key has its own error.
/// What a backend may have put around a key (a form, a file): the characters trimmed before a
/// key is checked, stored or sent, and the ones the schema's triggers trim too.
pub const PADDING: &[char] = &[' ', '\t', '\n', '\r'];

pub fn decode(key: &str) -> Result<Claims, KeyError> {
    let key = key.trim_matches(PADDING);
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong(key.len()));
    }
    let parts: Vec<&str> = key.split('.').collect();
    let [header, payload, _signature] = parts[..] else {
        return Err(KeyError::NotThreeParts(parts.len()));
    };
    let header = decode_part(header, "header")?;
    let payload = decode_part(payload, "payload")?;
    let algorithm = header.get("alg").and_then(Value::as_str).map(str::to_owned);
    // Be lenient about a missing alg, strict about a wrong one: anything but RS256 was not minted
    // by the Store.
    if let Some(alg) = &algorithm
        && alg != "RS256"
    {
        return Err(KeyError::UnexpectedAlgorithm(truncate(alg)));
    }
    claims_from(&payload, algorithm)
}

fn decode_part(part: &str, name: &'static str) -> Result<serde_json::Map<String, Value>, KeyError> {
    // Some encoders pad base64url; the JWT spec says not to, but padding changes nothing.
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| KeyError::BadBase64 { part: name })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(KeyError::BadJson { part: name }),
    }
}

fn claims_from(
    map: &serde_json::Map<String, Value>,
    algorithm: Option<String>,
) -> Result<Claims, KeyError> {
    let aud = required_str(map, "aud")?;
    let kind = Kind::from_audience(aud).ok_or_else(|| KeyError::UnknownAudience(truncate(aud)))?;
    Ok(Claims {
        kind,
        issued_at: required_time(map, "iat")?,
        not_before: optional_time(map, "nbf")?,
        expires_at: required_time(map, "exp")?,
        issuer: optional_str(map, "iss")?.map(str::to_owned),
        client_id: required_str(map, CLAIM_CLIENT_ID)
            .map_err(|e| rename(e, "clientId"))?
            .to_owned(),
        user_id: optional_str(map, CLAIM_USER_ID)
            .map_err(|e| rename(e, "userId"))?
            .map(str::to_owned),
        refresh_uri: optional_str(map, CLAIM_REFRESH_URI)
            .map_err(|e| rename(e, "refreshUri"))?
            .map(str::to_owned),
        has_payload: map.contains_key(CLAIM_PAYLOAD),
        algorithm,
    })
}

/// The schema-URL claim names are long; errors name them by their last segment.
fn rename(e: KeyError, short: &'static str) -> KeyError {
    match e {
        KeyError::MissingClaim(_) => KeyError::MissingClaim(short),
        KeyError::NotAString(_) => KeyError::NotAString(short),
        other => other,
    }
}

fn required_str<'a>(
    map: &'a serde_json::Map<String, Value>,
    name: &'static str,
) -> Result<&'a str, KeyError> {
    optional_str(map, name)?.ok_or(KeyError::MissingClaim(name))
}

fn optional_str<'a>(
    map: &'a serde_json::Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, KeyError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(KeyError::NotAString(name)),
    }
}

fn required_time(
    map: &serde_json::Map<String, Value>,
    name: &'static str,
) -> Result<i64, KeyError> {
    optional_time(map, name)?.ok_or(KeyError::MissingClaim(name))
}

/// NumericDate per RFC 7519; accepts a numeric string too (lenient in what we accept), and a
/// fractional number rounded down.
fn optional_time(
    map: &serde_json::Map<String, Value>,
    name: &'static str,
) -> Result<Option<i64>, KeyError> {
    let value = match map.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    let secs = match value {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite())
                .map(|f| f.floor() as i64)
        }),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    secs.filter(|s| (0..=MAX_TIME).contains(s))
        .map(Some)
        .ok_or(KeyError::NotANumber(name))
}

/// Year 9999: a bound that keeps arithmetic on times far from overflow.
const MAX_TIME: i64 = 253_402_300_799;

fn truncate(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A key as it is held in memory: the text plus a fingerprint, with `Debug` that shows only the
/// fingerprint so that no log line or error can carry the credential.
#[derive(Clone)]
pub struct KeyText {
    text: String,
    /// The stored bytes when they are not UTF-8 (a backend bound a blob): kept so that writes can
    /// still compare-and-swap on exactly what was read. The text is then a lossy rendering that
    /// never decodes.
    raw: Option<Box<[u8]>>,
    /// Computed once: an attempt names its key in its span, its event and its write.
    fingerprint: std::sync::OnceLock<Fingerprint>,
}

impl PartialEq for KeyText {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text && self.raw == other.raw
    }
}

impl Eq for KeyText {}

impl KeyText {
    pub fn new(key: impl Into<String>) -> Self {
        KeyText {
            text: key.into(),
            raw: None,
            fingerprint: std::sync::OnceLock::new(),
        }
    }

    /// From a column's bytes, whatever they are.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        match String::from_utf8(bytes) {
            Ok(text) => KeyText::new(text),
            Err(e) => {
                let raw = e.into_bytes();
                KeyText {
                    text: String::from_utf8_lossy(&raw).into_owned(),
                    raw: Some(raw.into()),
                    fingerprint: std::sync::OnceLock::new(),
                }
            }
        }
    }

    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The key as it is sent and stored once checked: without the whitespace a form or a file
    /// may have added around it.
    pub fn trimmed(&self) -> &str {
        self.text.trim_matches(PADDING)
    }

    /// Whether the backend wrote whitespace around the key.
    pub fn has_padding(&self) -> bool {
        self.is_utf8() && self.trimmed().len() != self.text.len()
    }

    /// The exact bytes the database holds, for compare-and-swap.
    pub fn cas_bytes(&self) -> &[u8] {
        self.raw.as_deref().unwrap_or(self.text.as_bytes())
    }

    pub fn is_utf8(&self) -> bool {
        self.raw.is_none()
    }

    pub fn fingerprint(&self) -> Fingerprint {
        *self
            .fingerprint
            .get_or_init(|| Fingerprint::of(self.trimmed()))
    }
}

impl fmt::Debug for KeyText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyText({})", self.fingerprint())
    }
}

#[cfg(test)]
#[path = "claims_tests.rs"]
mod tests;
