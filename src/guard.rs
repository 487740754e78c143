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

const AWAITING: &str = "the Store refused the key (AuthenticationTokenInvalid), but no renewal of this application succeeded recently to show that our credential works; it is tried again before being flagged revoked";
const ALARM: &str = "the Store is refusing many keys of this application at once (AuthenticationTokenInvalid): that is our credential or configuration, not revocations";
/// Keys remembered with their refusal count, per application; beyond it the oldest are forgotten
/// (which only delays flagging them).
const MAX_TRACKED_KEYS: usize = 100_000;

#[derive(Debug, Default)]
struct App {
    refusals: VecDeque<(Instant, i64)>,
    successes: VecDeque<Instant>,
    strikes: HashMap<i64, u32>,
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

    /// A key of `app` renewed: the credential works.
    pub fn success(&mut self, app: &str, key_id: i64, now: Instant) -> Option<AlarmChange> {
        let window = self.policy.window;
        let a = self.apps.entry(app.to_owned()).or_default();
        a.prune(now, window);
        a.successes.push_back(now);
        // Bounded: only the count within the window matters.
        if a.successes.len() > 10_000 {
            a.successes.pop_front();
        }
        a.strikes.remove(&key_id);
        a.refusals.clear();
        a.alarm_since.take().map(|_| AlarmChange::Cleared)
    }

    /// A key of `app` was refused twice (the second time with a fresh access token).
    /// `prior_failures` is how many attempts on it failed in a row before this one, as the
    /// database remembers it (across restarts and processes).
    pub fn refused(
        &mut self,
        app: &str,
        key_id: i64,
        prior_failures: u32,
        now: Instant,
    ) -> (Verdict, Option<AlarmChange>) {
        let policy = self.policy;
        let a = self.apps.entry(app.to_owned()).or_default();
        a.prune(now, policy.window);
        a.refusals.push_back((now, key_id));
        if a.strikes.len() >= MAX_TRACKED_KEYS {
            a.strikes.clear();
        }
        let strikes = {
            let s = a.strikes.entry(key_id).or_insert(0);
            *s = (*s + 1).max(prior_failures.saturating_add(1));
            *s
        };
        if a.alarm_since.is_some() {
            return (Verdict::Defer(ALARM), None);
        }
        let refused = a.distinct_refused();
        if refused >= policy.threshold && a.successes.len() < refused {
            a.alarm_since = Some(now);
            return (Verdict::Defer(ALARM), Some(AlarmChange::Raised));
        }
        if !a.successes.is_empty() || strikes >= policy.confirm_attempts {
            a.strikes.remove(&key_id);
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
    use super::*;

    fn guard() -> RevocationGuard {
        RevocationGuard::new(GuardPolicy {
            threshold: 3,
            window: Duration::from_secs(600),
            confirm_attempts: 3,
        })
    }

    #[test]
    fn a_refusal_among_successes_is_a_revocation() {
        let t = Instant::now();
        let mut g = guard();
        g.success("a", 1, t);
        assert_eq!(g.refused("a", 2, 0, t), (Verdict::Revoked, None));
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
        for _ in 0..5 {
            assert_eq!(g.refused("a", 1, 0, t).0, Verdict::Defer(ALARM));
        }
        assert_eq!(g.alarms().len(), 1);
        // Another application is judged on its own.
        g.success("b", 9, t);
        assert_eq!(g.refused("b", 10, 0, t).0, Verdict::Revoked);
        // The credential works again: the alarm clears.
        assert_eq!(g.success("a", 4, t), Some(AlarmChange::Cleared));
        assert!(g.alarms().is_empty());
    }

    #[test]
    fn a_lone_revoked_key_is_flagged_after_repeated_refusals() {
        let t = Instant::now();
        let mut g = guard();
        assert!(matches!(g.refused("a", 1, 0, t).0, Verdict::Defer(_)));
        assert!(matches!(
            g.refused("a", 1, 0, t + Duration::from_secs(60)).0,
            Verdict::Defer(_)
        ));
        assert_eq!(
            g.refused("a", 1, 0, t + Duration::from_secs(120)).0,
            Verdict::Revoked
        );
    }

    #[test]
    fn failures_remembered_by_the_database_count_as_strikes() {
        let t = Instant::now();
        let mut g = guard();
        assert_eq!(g.refused("a", 1, 2, t).0, Verdict::Revoked);
    }

    #[test]
    fn many_revocations_among_more_successes_are_flagged() {
        let t = Instant::now();
        let mut g = guard();
        for k in 0..20 {
            g.success("a", k, t);
        }
        for k in 100..105 {
            assert_eq!(g.refused("a", k, 0, t).0, Verdict::Revoked);
        }
    }
}
