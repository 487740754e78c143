//! The false-revocation guard. Pure: every method takes `now`.
//!
//! `AuthenticationTokenInvalid` means "the access token or the key is invalid", and the Store
//! does not say which. One key refused (after a fresh-token retry) while the same application's
//! other keys renew is a revocation. Many different keys refused while none renews is our
//! credential or configuration: then nothing is flagged, the keys are retried, and an alarm is
//! raised until a renewal for that application succeeds again.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardPolicy {
    /// Different keys of one application refused within `window` that raise the alarm (when
    /// they outnumber that application's successes in the window).
    pub threshold: usize,
    pub window: Duration,
    /// With no recent success to vouch for the credential, a key is flagged once it has been
    /// refused this many times in a row (so a lone revoked key still gets flagged).
    pub confirm_attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The key is revoked: flag it.
    Revoked,
    /// Not enough evidence that it is the key: retry it later, say why.
    Defer(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmChange {
    Raised,
    Cleared,
}

pub const AWAITING: &str = "the Store refused the key (AuthenticationTokenInvalid), but no renewal of this application succeeded recently to show that our credential works; it is tried again before being flagged revoked";
pub const ALARM: &str = "the Store is refusing many keys of this application at once (AuthenticationTokenInvalid): that is our credential or configuration, not revocations";

#[derive(Debug, Default)]
struct App {
    refusals: VecDeque<(Instant, i64)>,
    successes: VecDeque<Instant>,
    alarm_since: Option<Instant>,
}

impl App {
    fn prune(&mut self, now: Instant, window: Duration) {
        let old = |t: &Instant| now.duration_since(*t) > window;
        while self.refusals.front().is_some_and(|(t, _)| old(t)) {
            self.refusals.pop_front();
        }
        while self.successes.front().is_some_and(old) {
            self.successes.pop_front();
        }
    }

    fn distinct_refused(&self) -> usize {
        let mut keys: Vec<i64> = self.refusals.iter().map(|(_, k)| *k).collect();
        keys.sort_unstable();
        keys.dedup();
        keys.len()
    }
}

#[derive(Debug)]
pub struct RevocationGuard {
    policy: GuardPolicy,
    apps: HashMap<String, App>,
}

impl RevocationGuard {
    pub fn new(policy: GuardPolicy) -> Self {
        RevocationGuard {
            policy,
            apps: HashMap::new(),
        }
    }

    /// A key of `app` renewed, by an attempt that began at `started`: the credential worked
    /// then. Only an attempt begun after the alarm was raised clears it (one already in flight
    /// when the credential broke proves nothing).
    pub fn success(&mut self, app: &str, started: Instant, now: Instant) -> Option<AlarmChange> {
        let window = self.policy.window;
        let a = self.apps.entry(app.to_owned()).or_default();
        a.prune(now, window);
        a.successes.push_back(started);
        // Bounded: only the ones within the window matter.
        if a.successes.len() > 10_000 {
            a.successes.pop_front();
        }
        match a.alarm_since {
            Some(since) if started > since => {
                a.alarm_since = None;
                Some(AlarmChange::Cleared)
            }
            _ => None,
        }
    }

    /// Raises the alarm for `app` without a refusal (a CLI process learning of the daemon's).
    pub fn raise(&mut self, app: &str, now: Instant) {
        self.apps.entry(app.to_owned()).or_default().alarm_since = Some(now);
    }

    /// A key of `app` was refused twice (the second time with a fresh access token).
    /// `prior_refusals` is how many attempts in a row the database remembers were refused for it
    /// before this one (across restarts and processes).
    pub fn refused(
        &mut self,
        app: &str,
        key_id: i64,
        prior_refusals: u32,
        now: Instant,
    ) -> (Verdict, Option<AlarmChange>) {
        let policy = self.policy;
        let a = self.apps.entry(app.to_owned()).or_default();
        a.prune(now, policy.window);
        a.refusals.push_back((now, key_id));
        // Counted in the database, so a replaced key starts from zero and a restart forgets
        // nothing.
        let strikes = prior_refusals.saturating_add(1);
        if a.alarm_since.is_some() {
            return (Verdict::Defer(ALARM), None);
        }
        // Evidence that the credential works: renewals begun after the refusals began. Ones from
        // before prove nothing about now.
        let oldest = a.refusals.front().map_or(now, |(t, _)| *t);
        let evidence = a.successes.iter().filter(|t| **t > oldest).count();
        let refused = a.distinct_refused();
        if refused >= policy.threshold && evidence < refused {
            a.alarm_since = Some(now);
            return (Verdict::Defer(ALARM), Some(AlarmChange::Raised));
        }
        if evidence > 0 || strikes >= policy.confirm_attempts {
            return (Verdict::Revoked, None);
        }
        (Verdict::Defer(AWAITING), None)
    }

    /// Applications whose alarm is raised, with when it was.
    pub fn alarms(&self) -> Vec<(String, Instant)> {
        let mut v: Vec<_> = self
            .apps
            .iter()
            .filter_map(|(name, a)| a.alarm_since.map(|t| (name.clone(), t)))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn guard() -> RevocationGuard {
        RevocationGuard::new(GuardPolicy {
            threshold: 3,
            window: Duration::from_secs(600),
            confirm_attempts: 3,
        })
    }

    fn at(t: Instant, secs: u64) -> Instant {
        t + Duration::from_secs(secs)
    }

    #[test]
    fn a_refusal_is_believed_once_a_later_renewal_shows_the_credential_works() {
        let t = Instant::now();
        let mut g = guard();
        assert!(matches!(
            g.refused("a", 2, 0, at(t, 1)).0,
            Verdict::Defer(_)
        ));
        g.success("a", at(t, 2), at(t, 3));
        assert_eq!(g.refused("a", 2, 1, at(t, 4)), (Verdict::Revoked, None));
    }

    #[test]
    fn renewals_from_before_the_refusals_prove_nothing() {
        let t = Instant::now();
        let mut g = guard();
        for _ in 0..200 {
            g.success("a", t, t);
        }
        // The credential breaks: refusal after refusal, no renewal since.
        assert!(matches!(
            g.refused("a", 500, 0, at(t, 1)).0,
            Verdict::Defer(_)
        ));
        assert!(matches!(
            g.refused("a", 501, 0, at(t, 1)).0,
            Verdict::Defer(_)
        ));
        assert_eq!(
            g.refused("a", 502, 0, at(t, 1)),
            (Verdict::Defer(ALARM), Some(AlarmChange::Raised))
        );
        // A renewal that was already in flight when the alarm was raised does not clear it.
        assert_eq!(g.success("a", at(t, 1), at(t, 2)), None);
        assert_eq!(g.alarms().len(), 1);
    }

    #[test]
    fn a_wave_of_refusals_without_successes_raises_the_alarm_and_flags_nothing() {
        let t = Instant::now();
        let mut g = guard();
        assert!(matches!(g.refused("a", 1, 0, t).0, Verdict::Defer(_)));
        assert!(matches!(g.refused("a", 2, 0, t).0, Verdict::Defer(_)));
        assert_eq!(
            g.refused("a", 3, 0, t),
            (Verdict::Defer(ALARM), Some(AlarmChange::Raised))
        );
        // Even a key refused many times is not flagged while the alarm stands.
        for n in 0..5 {
            assert_eq!(g.refused("a", 1, n, t).0, Verdict::Defer(ALARM));
        }
        // Another application is judged on its own.
        assert!(matches!(g.refused("b", 10, 0, t).0, Verdict::Defer(_)));
        g.success("b", at(t, 1), at(t, 1));
        assert_eq!(g.refused("b", 10, 1, at(t, 2)).0, Verdict::Revoked);
        // The credential works again (a renewal begun after the alarm): the alarm clears.
        assert_eq!(
            g.success("a", at(t, 5), at(t, 6)),
            Some(AlarmChange::Cleared)
        );
        assert!(g.alarms().is_empty());
    }

    #[test]
    fn a_lone_revoked_key_is_flagged_after_repeated_refusals() {
        let t = Instant::now();
        let mut g = guard();
        assert!(matches!(g.refused("a", 1, 0, t).0, Verdict::Defer(_)));
        assert!(matches!(
            g.refused("a", 1, 1, at(t, 60)).0,
            Verdict::Defer(_)
        ));
        assert_eq!(g.refused("a", 1, 2, at(t, 120)).0, Verdict::Revoked);
    }

    #[test]
    fn refusals_remembered_by_the_database_count_as_strikes() {
        let t = Instant::now();
        let mut g = guard();
        assert_eq!(g.refused("a", 1, 2, t).0, Verdict::Revoked);
    }

    #[test]
    fn many_revocations_among_more_renewals_are_flagged() {
        let t = Instant::now();
        let mut g = guard();
        assert!(matches!(g.refused("a", 100, 0, t).0, Verdict::Defer(_)));
        for _ in 0..20 {
            g.success("a", at(t, 1), at(t, 1));
        }
        for k in 100..105 {
            assert_eq!(g.refused("a", k, 0, at(t, 2)).0, Verdict::Revoked);
        }
    }

    #[test]
    fn a_raised_alarm_defers_everything() {
        let t = Instant::now();
        let mut g = guard();
        g.raise("a", t);
        assert_eq!(g.refused("a", 1, 9, t).0, Verdict::Defer(ALARM));
    }
}
