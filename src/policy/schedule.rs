//! When to act on a key next. Pure: every function takes `now` and its randomness as arguments.

use std::time::Duration;

use crate::policy::claims::KeyFacts;

/// The renewal policy from `[renew]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Renew once a key is this old (Microsoft's cadence: 14 days).
    pub max_age: Duration,
    /// Renew at least this long before `exp`.
    pub margin: Duration,
    /// Spread renewals over up to this much earlier, so a burst of keys does not renew as one.
    pub jitter: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

/// The scheduled renewal time of a healthy key.
///
/// The earlier of `iat + max_age` and `exp - margin`, minus up to `jitter` (`jitter_draw` in
/// `[0, 1)` picks how much), but never sooner than a quarter of the key's lifetime (at most
/// `max_age`) after `iat`:
/// a key that lives shorter than the margin (demo and test keys) would otherwise be due again the
/// moment it was renewed. An `iat` in the future (clock skew) counts as `now`, so a skewed key is
/// never scheduled later than its age allows by our clock.
pub fn renewal_time(claims: &KeyFacts, policy: &Policy, now: i64, jitter_draw: f64) -> i64 {
    let iat = claims.issued_at.min(now);
    let exp = claims.expires_at;
    let target =
        (iat.saturating_add(secs(policy.max_age))).min(exp.saturating_sub(secs(policy.margin)));
    let jitter = (secs_f(policy.jitter) * jitter_draw.clamp(0.0, 1.0)) as i64;
    // A quarter of the lifetime, but never more than max_age (a key valid for decades still
    // renews on Microsoft's cadence).
    let floor = iat + ((exp - iat).max(0) / 4).min(secs(policy.max_age));
    // Never before now: a key that looks long overdue (its `iat` is unsigned text) waits its
    // turn behind the keys already due.
    target.saturating_sub(jitter).max(floor).max(now)
}

/// What to do after an attempt that may succeed later (throttled, transient, unexpected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Try again at this Unix time (always before `exp`).
    At(i64),
    /// No attempt can happen before the key expires.
    Expired,
}

/// How many more attempts a `Retry-After` must leave room for before the key expires: it is
/// honoured for at most `1 / (RETRY_AFTER_ROOM + 1)` of the time the key has left, so that one
/// answer (the Store's, or a proxy's with a date in 2099) cannot spend the key's last chances.
pub(crate) const RETRY_AFTER_ROOM: i64 = 3;

/// Exponential backoff with jitter after `attempts` consecutive failures (1 for the first), at
/// least `retry_after` when the server asked for it (bounded: see `bounded_retry_after`),
/// and never at or after `exp`.
pub fn retry_time(
    now: i64,
    expires_at: i64,
    attempts: u32,
    retry_after: Option<Duration>,
    policy: &Policy,
    jitter_draw: f64,
) -> Retry {
    if now >= expires_at {
        return Retry::Expired;
    }
    let asked = retry_after.map_or(Duration::ZERO, |ra| {
        bounded_retry_after(ra, now, expires_at, policy)
    });
    let delay = backoff(attempts, policy, jitter_draw).max(asked);
    let at = now.saturating_add(ceil_secs(delay).max(1));
    // The last useful moment is the second before expiry; an attempt then still has a chance.
    // With no second left, there is nothing to schedule (retrying now again would spin).
    let at = at.min(expires_at - 1);
    if at <= now {
        Retry::Expired
    } else {
        Retry::At(at)
    }
}

/// A `Retry-After` as far as it is honoured: at most `renew.backoff_cap`, and at most the time
/// left before the key's last useful second over `RETRY_AFTER_ROOM + 1`, so after that retry
/// at least `RETRY_AFTER_ROOM` more, as far apart, still fit before it expires.
fn bounded_retry_after(asked: Duration, now: i64, expires_at: i64, policy: &Policy) -> Duration {
    let left = expires_at.saturating_sub(1).saturating_sub(now).max(0);
    let room = Duration::from_secs(u64::try_from(left / (RETRY_AFTER_ROOM + 1)).unwrap_or(0));
    asked.min(policy.backoff_cap).min(room)
}

/// "Equal jitter": half the exponential delay is fixed, half random, so retries spread out but
/// never collapse to zero.
pub fn backoff(attempts: u32, policy: &Policy, jitter_draw: f64) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let full = policy
        .backoff_base
        .saturating_mul(1u32 << exp)
        .min(policy.backoff_cap);
    let half = full / 2;
    half + half.mul_f64(jitter_draw.clamp(0.0, 1.0))
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn secs_f(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn ceil_secs(d: Duration) -> i64 {
    let whole = secs(d);
    if d.subsec_nanos() > 0 {
        whole.saturating_add(1)
    } else {
        whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::claims::Claims;
    use crate::policy::claims::Kind;

    const DAY: i64 = 86_400;

    fn policy() -> Policy {
        Policy {
            max_age: Duration::from_secs(14 * DAY as u64),
            margin: Duration::from_secs(7 * DAY as u64),
            jitter: Duration::from_secs(3600),
            backoff_base: Duration::from_secs(30),
            backoff_cap: Duration::from_secs(3600),
        }
    }

    fn claims(iat: i64, lifetime: i64) -> Claims {
        Claims {
            kind: Kind::Collections,
            issued_at: iat,
            not_before: None,
            expires_at: iat + lifetime,
            issuer: None,
            client_id: "a".into(),
            user_id: None,
            refresh_uri: None,
            has_payload: true,
            algorithm: None,
        }
    }

    #[test]
    fn thirty_day_key_renews_at_fourteen_days() {
        let c = claims(1_000_000, 30 * DAY);
        assert_eq!(
            renewal_time(&c.facts(), &policy(), c.issued_at, 0.0),
            1_000_000 + 14 * DAY
        );
    }

    #[test]
    fn a_future_iat_counts_as_now() {
        let c = claims(1_000_000 + 7200, 30 * DAY);
        assert_eq!(
            renewal_time(&c.facts(), &policy(), 1_000_000, 0.0),
            1_000_000 + 14 * DAY
        );
    }

    #[test]
    fn keys_valid_for_decades_still_renew_at_max_age() {
        let c = claims(1_000_000, 50 * 365 * DAY);
        assert_eq!(
            renewal_time(&c.facts(), &policy(), 1_000_000, 0.0),
            1_000_000 + 14 * DAY
        );
    }

    #[test]
    fn margin_wins_when_it_comes_first() {
        let mut p = policy();
        p.margin = Duration::from_secs(20 * DAY as u64);
        let c = claims(0, 30 * DAY);
        assert_eq!(renewal_time(&c.facts(), &p, c.issued_at, 0.0), 10 * DAY);
    }

    #[test]
    fn jitter_only_moves_earlier_and_within_bound() {
        let c = claims(0, 30 * DAY);
        let base = renewal_time(&c.facts(), &policy(), c.issued_at, 0.0);
        for draw in [0.1, 0.5, 0.999] {
            let t = renewal_time(&c.facts(), &policy(), c.issued_at, draw);
            assert!(t <= base && t >= base - 3600, "{t} vs {base}");
        }
    }

    #[test]
    fn short_lived_keys_wait_a_quarter_of_their_life() {
        // A 60 s key with a 7 d margin would be due before it was issued.
        let c = claims(1000, 60);
        assert_eq!(renewal_time(&c.facts(), &policy(), c.issued_at, 0.9), 1015);
    }

    #[test]
    fn retry_never_lands_at_or_after_expiry() {
        let p = policy();
        assert_eq!(retry_time(100, 110, 5, None, &p, 0.5), Retry::At(109));
        assert_eq!(retry_time(110, 110, 1, None, &p, 0.5), Retry::Expired);
        assert_eq!(retry_time(108, 110, 1, None, &p, 0.5), Retry::At(109));
        assert_eq!(retry_time(109, 110, 1, None, &p, 0.5), Retry::Expired);
    }

    #[test]
    fn retry_after_is_honoured_when_longer_than_backoff() {
        let at = retry_time(
            0,
            1_000_000,
            1,
            Some(Duration::from_secs(120)),
            &policy(),
            0.0,
        );
        assert_eq!(at, Retry::At(120));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = policy();
        let d = |n| backoff(n, &p, 1.0);
        assert_eq!(d(1), Duration::from_secs(30));
        assert_eq!(d(2), Duration::from_secs(60));
        assert_eq!(d(3), Duration::from_secs(120));
        assert_eq!(d(40), Duration::from_secs(3600));
        assert_eq!(backoff(1, &p, 0.0), Duration::from_secs(15));
    }

    /// What a `Retry-After` may do to a key's next attempt: no later than `backoff_cap`, and
    /// leaving room for `RETRY_AFTER_ROOM` more attempts as far apart before expiry.
    fn assert_bounded(now: i64, exp: i64, at: Retry, p: &Policy, what: &str) {
        let Retry::At(at) = at else {
            panic!("{what}: no retry for a key with {}s left", exp - now)
        };
        let cap = secs(p.backoff_cap);
        assert!(
            at > now && at <= now + cap,
            "{what}: retry {}s later",
            at - now
        );
        assert!(
            exp - at >= RETRY_AFTER_ROOM * (at - now),
            "{what}: retry {}s later leaves {}s before expiry",
            at - now,
            exp - at
        );
    }

    #[test]
    fn an_absurd_retry_after_moves_no_retry_past_the_cap_or_the_room() {
        let p = policy();
        let now = 1_800_000_000;
        let now_t = std::time::UNIX_EPOCH + Duration::from_secs(now as u64);
        let headers = [
            (10 * 365 * DAY).to_string(),
            "Thu, 01 Jan 2099 00:00:00 GMT".to_owned(),
            u64::MAX.to_string(),
            "99999999999999999999999".to_owned(),
            "garbage".to_owned(),
        ];
        for header in &headers {
            let ra = crate::policy::outcome::parse_retry_after(header, now_t);
            // Ten days left, inside the margin; five hours; ten minutes.
            for left in [10 * DAY, 5 * 3600, 600] {
                for draw in [0.0, 0.5, 0.999] {
                    let at = retry_time(now, now + left, 1, ra, &p, draw);
                    assert_bounded(now, now + left, at, &p, &format!("{header}, {left}s left"));
                }
            }
        }
        // Far from expiry it is the cap, not the key's last second.
        assert_eq!(
            retry_time(100, 10_000, 1, Some(Duration::from_secs(86_400)), &p, 0.0),
            Retry::At(100 + (10_000 - 1 - 100) / 4)
        );
        assert_eq!(
            retry_time(0, 30 * DAY, 1, Some(Duration::MAX), &p, 0.0),
            Retry::At(3600)
        );
    }

    proptest::proptest! {
        #[test]
        fn a_retry_after_never_passes_the_cap_or_the_room(
            now in 0i64..4_000_000_000,
            // Within a few caps of expiry, where the room binds, and anywhere.
            left in proptest::prop_oneof![600i64..6 * 3600, 600i64..100 * DAY],
            ra in proptest::num::u64::ANY, draw in 0.0f64..1.0
        ) {
            let p = policy();
            let at = retry_time(now, now + left, 1, Some(Duration::from_secs(ra)), &p, draw);
            assert_bounded(now, now + left, at, &p, &format!("Retry-After {ra}"));
        }

        #[test]
        fn renewal_is_always_before_expiry_for_live_keys(
            iat in 0i64..4_000_000_000, lifetime in 4i64..100 * DAY, draw in 0.0f64..1.0
        ) {
            let c = claims(iat, lifetime);
            let t = renewal_time(&c.facts(), &policy(), c.issued_at, draw);
            proptest::prop_assert!(t < c.expires_at && t >= iat);
        }

        #[test]
        fn retries_are_always_before_expiry(
            now in 0i64..1_000_000, left in 1i64..1_000_000, attempts in 0u32..100,
            ra in proptest::option::of(0u64..10_000_000), draw in 0.0f64..1.0
        ) {
            let exp = now + left;
            match retry_time(now, exp, attempts, ra.map(Duration::from_secs), &policy(), draw) {
                Retry::At(t) => proptest::prop_assert!(t > now && t < exp),
                Retry::Expired => proptest::prop_assert!(left <= 1, "a key with {left}s left reported expired"),
            }
        }
    }
}
