//! The ingest checks: whether a key a backend wrote can be renewed, or which state and reason
//! flag it. Pure: the row, the time and the config in.

use crate::clock::utc;
use crate::policy::claims::{self, Claims, KeyText, Kind};
use crate::policy::state::State;

/// Why a key is not renewed; `reason` is written for the person reading the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    pub state: State,
    pub reason: String,
}

fn flag(state: State, reason: impl Into<String>) -> Flag {
    Flag {
        state,
        reason: reason.into(),
    }
}

/// The longest a key the Store issues lives: 30 days today, 90 before; a day more for slack.
pub const MAX_LIFETIME_SECS: i64 = 91 * 86_400;
/// How far ahead of the Store's clock (as storekeyd knows it) a key's `iat` may be: clock skew
/// among the Store's own servers (its `nbf` runs an hour before `iat`), with room to spare.
pub const MAX_FUTURE_IAT_SECS: i64 = 6 * 3600;

/// What a key is checked against: the configured renew endpoints and applications.
pub trait Configured {
    fn endpoint(&self, kind: Kind) -> &str;
    /// Whether an `[[applications]]` entry has this client ID.
    fn knows(&self, client_id: &str) -> bool;
}

/// The checks of the ingest step. Pure: the row, the time and what is configured in.
pub fn check(
    declared_kind: &str,
    key: &KeyText,
    now: i64,
    config: &impl Configured,
) -> Result<Claims, Flag> {
    if !key.is_utf8() {
        return Err(flag(
            State::Invalid,
            "not a Store ID key: the stored value is not UTF-8 text",
        ));
    }
    let claims = claims::decode(key.expose())
        .map_err(|e| flag(State::Invalid, format!("not a Store ID key: {e}")))?;
    if Kind::parse(declared_kind) != Some(claims.kind) {
        return Err(flag(
            State::Invalid,
            format!(
                "row kind is `{declared_kind}` but the key's aud makes it a {} key",
                claims.kind
            ),
        ));
    }
    if claims.expires_at <= claims.issued_at {
        return Err(flag(State::Invalid, "key's exp is not after its iat"));
    }
    // Claims are unsigned text: bounded to what the Store issues, a forged `iat` of 1 cannot
    // make a key look issued long ago (due at once, first in line, a canary's age).
    if claims.expires_at - claims.issued_at > MAX_LIFETIME_SECS {
        return Err(flag(
            State::Invalid,
            format!(
                "key's exp is more than {} days after its iat; the Store issues no key that lives so long",
                MAX_LIFETIME_SECS / 86_400
            ),
        ));
    }
    if claims.issued_at > now.saturating_add(MAX_FUTURE_IAT_SECS) {
        return Err(flag(
            State::Invalid,
            format!(
                "key's iat {} is more than {} hours ahead of the Store's clock; the Store issues no such key",
                utc(claims.issued_at),
                MAX_FUTURE_IAT_SECS / 3600
            ),
        ));
    }
    if claims.expires_at <= now {
        return Err(flag(
            State::Expired,
            format!(
                "key expired at {} before it could be renewed; the client must mint a new one",
                utc(claims.expires_at)
            ),
        ));
    }
    let endpoint = config.endpoint(claims.kind);
    // Genuine keys advertise Microsoft's URL even where an egress proxy or the emulator is
    // configured, so either is fine; anything else can only be fixed in the configuration.
    if let Some(uri) = &claims.refresh_uri
        && !same_endpoint(uri, endpoint)
        && !same_endpoint(uri, claims.kind.documented_renew_url())
    {
        return Err(flag(
            State::Misconfigured,
            format!(
                "key's refreshUri `{}` is neither the configured {} endpoint `{endpoint}` nor Microsoft's; the key was not sent anywhere (it is checked again when storekeyd restarts)",
                shorten(uri),
                claims.kind
            ),
        ));
    }
    if !config.knows(&claims.client_id) {
        return Err(flag(
            State::Misconfigured,
            format!(
                "no [[applications]] entry for clientId {}; add one to renew this key",
                claims.client_id
            ),
        ));
    }
    Ok(claims)
}

/// Same scheme, host, port and path; case of the host and a trailing slash do not matter.
pub fn same_endpoint(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        reqwest::Url::parse(s.trim()).ok().map(|u| {
            (
                u.scheme().to_owned(),
                u.host_str().map(str::to_ascii_lowercase),
                u.port_or_known_default(),
                u.path().trim_end_matches('/').to_owned(),
            )
        })
    };
    matches!((norm(a), norm(b)), (Some(x), Some(y)) if x == y)
}

fn shorten(s: &str) -> String {
    s.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::keymint::{KeySpec, mint};

    const T: i64 = 1_000_000;

    /// The documented endpoints (the collections one may be changed) and one application,
    /// `app`.
    struct Setup {
        collections: String,
    }

    impl Configured for Setup {
        fn endpoint(&self, kind: Kind) -> &str {
            match kind {
                Kind::Collections => &self.collections,
                Kind::Purchase => kind.documented_renew_url(),
            }
        }

        fn knows(&self, client_id: &str) -> bool {
            client_id == "app"
        }
    }

    fn config() -> Setup {
        Setup {
            collections: Kind::Collections.documented_renew_url().to_owned(),
        }
    }

    fn key(spec: &KeySpec) -> KeyText {
        KeyText::new(mint(spec))
    }

    #[test]
    fn a_good_key_passes() {
        let k = key(&KeySpec::collections("app", 1_000_000, 30 * 86_400));
        assert_eq!(
            check("collections", &k, 1_000_100, &config())
                .unwrap()
                .client_id,
            "app"
        );
    }

    #[test]
    fn each_failed_check_gets_its_state() {
        let c = config();
        let state = |kind: &str, k: &KeyText, now| check(kind, k, now, &c).unwrap_err().state;
        let good = key(&KeySpec::collections("app", T, 100));
        assert_eq!(
            state("collections", &KeyText::new("garbage"), T),
            State::Invalid
        );
        assert_eq!(state("purchase", &good, T), State::Invalid);
        assert_eq!(state("collections", &good, T + 100), State::Expired);
        let other_app = key(&KeySpec::collections("stranger", T, 100));
        assert_eq!(state("collections", &other_app, T), State::Misconfigured);
        let mut spec = KeySpec::collections("app", T, 100);
        spec.refresh_uri = "https://evil.example/v6.0/b2b/keys/renew".into();
        let f = check("collections", &key(&spec), T, &c).unwrap_err();
        assert_eq!(f.state, State::Misconfigured);
        assert!(
            f.reason.contains("evil.example") && f.reason.contains("not sent"),
            "{}",
            f.reason
        );
        spec.lifetime_secs = -10;
        spec.refresh_uri = KeySpec::collections("app", T, 0).refresh_uri;
        assert_eq!(
            check("collections", &key(&spec), T - 100, &c)
                .unwrap_err()
                .state,
            State::Invalid
        );
    }

    /// A player can write any claims: one "issued" in 1970 (due at once, a canary's age) or far
    /// ahead of the Store's clock is no key the Store issued.
    #[test]
    fn claims_are_bounded_to_what_the_store_issues() {
        const T: i64 = 1_000_000_000;
        let c = config();
        let check_at = |issued, lifetime, now| {
            check(
                "collections",
                &key(&KeySpec::collections("app", issued, lifetime)),
                now,
                &c,
            )
        };
        let ninety = 90 * 86_400;
        assert!(
            check_at(T - 10, ninety, T).is_ok(),
            "the Store issued 90-day keys"
        );
        let forged = check_at(7200, T + 86_400 - 7200, T).unwrap_err();
        assert_eq!(forged.state, State::Invalid);
        assert!(
            forged.reason.contains("more than 91 days after its iat"),
            "{}",
            forged.reason
        );
        assert_eq!(
            check_at(T - 86_400, 50 * 365 * 86_400, T)
                .unwrap_err()
                .state,
            State::Invalid
        );
        assert!(
            check_at(T + 2 * 3600, 30 * 86_400, T).is_ok(),
            "an hour or two of skew"
        );
        let ahead = check_at(T + 7 * 3600, 30 * 86_400, T).unwrap_err();
        assert_eq!(ahead.state, State::Invalid);
        assert!(
            ahead.reason.contains("ahead of the Store's clock"),
            "{}",
            ahead.reason
        );
    }

    #[test]
    fn a_refresh_uri_may_be_microsofts_or_the_configured_endpoint() {
        let mut c = config();
        c.collections = "http://127.0.0.1:9000/v6.0/b2b/keys/renew".into();
        let mut spec = KeySpec::collections("app", T, 100);
        spec.refresh_uri = Kind::Collections.documented_renew_url().into();
        assert!(check("collections", &key(&spec), T, &c).is_ok());
        spec.refresh_uri = "http://localhost:9000/v6.0/b2b/keys/renew".into();
        assert_eq!(
            check("collections", &key(&spec), T, &c).unwrap_err().state,
            State::Misconfigured,
            "a different spelling of the host is a configuration to fix, never a bad key"
        );
        c.collections = "http://localhost:9000/v6.0/b2b/keys/renew/".into();
        assert!(check("collections", &key(&spec), T, &c).is_ok());
    }

    #[test]
    fn a_padded_key_passes_the_checks() {
        let k = KeyText::new(format!(
            "  {}\n",
            mint(&KeySpec::collections("app", T, 100))
        ));
        assert!(k.has_padding());
        assert!(check("collections", &k, T, &config()).is_ok());
        assert!(!KeyText::new(k.trimmed()).has_padding());
    }

    #[test]
    fn endpoints_compare_leniently() {
        assert!(same_endpoint(
            "https://Collections.MP.microsoft.com:443/v6.0/b2b/keys/renew/",
            "https://collections.mp.microsoft.com/v6.0/b2b/keys/renew"
        ));
        assert!(!same_endpoint(
            "http://collections.mp.microsoft.com/v6.0/b2b/keys/renew",
            "https://collections.mp.microsoft.com/v6.0/b2b/keys/renew"
        ));
        assert!(!same_endpoint(
            "https://collections.mp.microsoft.com.evil/v6.0/b2b/keys/renew",
            "https://collections.mp.microsoft.com/v6.0/b2b/keys/renew"
        ));
        assert!(!same_endpoint("not a url", "not a url"));
    }
}
