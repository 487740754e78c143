use super::*;
use crate::emulator::keymint::{KeySpec, encode_claims, mint};

#[test]
fn decodes_every_documented_claim() {
    let key = mint(&KeySpec::collections("app-1", 1_000_000, 30 * 86_400));
    let c = decode(&key).unwrap();
    assert_eq!(c.kind, Kind::Collections);
    assert_eq!(c.issued_at, 1_000_000);
    assert_eq!(c.expires_at, 1_000_000 + 30 * 86_400);
    assert_eq!(c.not_before, Some(1_000_000 - 3600));
    assert_eq!(c.client_id, "app-1");
    assert_eq!(c.user_id.as_deref(), Some("user-1"));
    assert_eq!(c.issuer.as_deref(), Some(AUD_COLLECTIONS));
    assert!(c.has_payload);
    assert_eq!(
        c.refresh_uri.as_deref(),
        Some("https://collections.mp.microsoft.com/v6.0/b2b/keys/renew")
    );
}

#[test]
fn kind_follows_audience() {
    let mut spec = KeySpec::collections("a", 1_000_000, 100);
    spec.kind = Kind::Purchase;
    assert_eq!(decode(&mint(&spec)).unwrap().kind, Kind::Purchase);
}

#[test]
fn numeric_strings_are_accepted_as_times() {
    let key = encode_claims(&serde_json::json!({
        "aud": AUD_PURCHASE, "iat": "100", "exp": 200.7, CLAIM_CLIENT_ID: "a"
    }));
    let c = decode(&key).unwrap();
    assert_eq!((c.issued_at, c.expires_at), (100, 200));
}

#[test]
fn each_malformation_has_its_own_error() {
    let claims = |v: serde_json::Value| decode(&encode_claims(&v)).unwrap_err();
    assert_eq!(decode("").unwrap_err(), KeyError::Empty);
    assert_eq!(decode("a.b").unwrap_err(), KeyError::NotThreeParts(2));
    assert_eq!(decode("a.b.c.d").unwrap_err(), KeyError::NotThreeParts(4));
    assert_eq!(
        decode("!!.e30.x").unwrap_err(),
        KeyError::BadBase64 { part: "header" }
    );
    assert_eq!(
        decode("e30.!!.x").unwrap_err(),
        KeyError::BadBase64 { part: "payload" }
    );
    // "bnVsbA" is base64url for `null`.
    assert_eq!(
        decode("e30.bnVsbA.x").unwrap_err(),
        KeyError::BadJson { part: "payload" }
    );
    assert_eq!(
        decode(&"x".repeat(MAX_KEY_LEN + 1)).unwrap_err(),
        KeyError::TooLong(MAX_KEY_LEN + 1)
    );
    assert_eq!(
        claims(serde_json::json!({"iat": 1, "exp": 2, CLAIM_CLIENT_ID: "a"})),
        KeyError::MissingClaim("aud")
    );
    assert_eq!(
        claims(serde_json::json!({"aud": "https://evil.example/keys", "iat": 1, "exp": 2})),
        KeyError::UnknownAudience("https://evil.example/keys".into())
    );
    assert_eq!(
        claims(serde_json::json!({"aud": AUD_PURCHASE, "iat": 1, CLAIM_CLIENT_ID: "a"})),
        KeyError::MissingClaim("exp")
    );
    assert_eq!(
        claims(
            serde_json::json!({"aud": AUD_PURCHASE, "iat": "soon", "exp": 2, CLAIM_CLIENT_ID: "a"})
        ),
        KeyError::NotANumber("iat")
    );
    assert_eq!(
        claims(serde_json::json!({"aud": AUD_PURCHASE, "iat": 1, "exp": -5, CLAIM_CLIENT_ID: "a"})),
        KeyError::NotANumber("exp")
    );
    assert_eq!(
        claims(serde_json::json!({"aud": AUD_PURCHASE, "iat": 1, "exp": 2})),
        KeyError::MissingClaim("clientId")
    );
    assert_eq!(
        claims(serde_json::json!({"aud": AUD_PURCHASE, "iat": 1, "exp": 2, CLAIM_CLIENT_ID: 7})),
        KeyError::NotAString("clientId")
    );
}

#[test]
fn rejects_non_rs256_headers() {
    let key = mint(&KeySpec::collections("a", 1, 2)).replacen(
        &URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        &URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
        1,
    );
    assert_eq!(
        decode(&key).unwrap_err(),
        KeyError::UnexpectedAlgorithm("none".into())
    );
}

#[test]
fn key_text_debug_shows_only_a_fingerprint() {
    let key = KeyText::new("eyJhbGciOiJSUzI1NiJ9.secret-material.sig");
    let shown = format!("{key:?}");
    assert!(!shown.contains("secret-material"), "{shown}");
    assert!(shown.contains(&key.fingerprint().to_string()));
}

proptest::proptest! {
    #[test]
    fn decoding_never_panics(s in ".{0,400}") {
        let _ = decode(&s);
    }

    #[test]
    fn decoding_jwt_shaped_input_never_panics(
        h in "[A-Za-z0-9_=-]{0,60}", p in "[A-Za-z0-9_=-]{0,200}", sig in "[A-Za-z0-9_-]{0,20}"
    ) {
        let _ = decode(&format!("{h}.{p}.{sig}"));
    }

    #[test]
    fn decoding_arbitrary_json_payloads_never_panics(payload in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
        let key = format!("e30.{}.x", URL_SAFE_NO_PAD.encode(&payload));
        let _ = decode(&key);
    }
}
