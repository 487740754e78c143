//! Builds keys shaped like the Store's (RS256 header, the real claim names). The emulator mints
//! with it, and tests use it to make keys and near-keys.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::policy::claims::{
    CLAIM_CLIENT_ID, CLAIM_PAYLOAD, CLAIM_REFRESH_URI, CLAIM_USER_ID, Kind,
};

#[derive(Debug, Clone)]
pub struct KeySpec {
    pub kind: Kind,
    pub client_id: String,
    pub user_id: String,
    pub issued_at: i64,
    pub lifetime_secs: i64,
    pub refresh_uri: String,
}

impl KeySpec {
    /// A collections key with the production refresh URI, for tests.
    pub fn collections(client_id: &str, issued_at: i64, lifetime_secs: i64) -> Self {
        KeySpec {
            kind: Kind::Collections,
            client_id: client_id.to_owned(),
            user_id: "user-1".to_owned(),
            issued_at,
            lifetime_secs,
            refresh_uri: "https://collections.mp.microsoft.com/v6.0/b2b/keys/renew".to_owned(),
        }
    }
}

/// Mints a key. The signature is 256 random bytes, the size of a real RS256 signature: nobody
/// but the Store (here, the emulator's registry of issued keys) can vouch for a key anyway.
pub fn mint(spec: &KeySpec) -> String {
    let payload = json!({
        "iat": spec.issued_at,
        "nbf": spec.issued_at - 3600,
        "exp": spec.issued_at + spec.lifetime_secs,
        "aud": spec.kind.audience(),
        "iss": spec.kind.audience(),
        CLAIM_CLIENT_ID: spec.client_id,
        CLAIM_USER_ID: spec.user_id,
        CLAIM_PAYLOAD: random_b64(96),
        CLAIM_REFRESH_URI: spec.refresh_uri,
    });
    encode_claims(&payload)
}

/// Encodes any JSON as the payload of an RS256-headed JWT with a random signature.
pub fn encode_claims(payload: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(payload.to_string());
    format!("{header}.{body}.{}", random_b64(256))
}

fn random_b64(len: usize) -> String {
    let bytes: Vec<u8> = std::iter::repeat_with(|| fastrand::u8(..))
        .take(len)
        .collect();
    URL_SAFE_NO_PAD.encode(bytes)
}
