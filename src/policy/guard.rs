//! The false-revocation guard. Pure: every method takes `now` (Unix milliseconds).
//!
//! `AuthenticationTokenInvalid` means "the access token or the key is invalid", and the Store
//! does not say which. A refusal counts against a key only once a renewal of the same
//! application that *began after it* succeeded: then the credential demonstrably works, and the
//! key's next refusal flags it. Without such evidence the guard asks for it: one healthy key of
//! the application is renewed early (a canary). A canary refused too, or many keys refused while
//! none renews, is our credential: an alarm is raised and nothing is flagged until a renewal
//! begun after the alarm succeeds. A key whose application has no other key to ask is flagged
//! only once its refusals span `lone_key_after`.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardPolicy {
    /// Different keys of one application refused since its last renewal, within `window`, that
    /// raise the credential alarm.
    pub threshold: usize,
    pub window: Duration,
    /// At most one canary per application this often.
    pub canary_interval: Duration,
    /// With no other key of the application to ask, refusals must span this long before a key
    /// is flagged.
    pub lone_key_after: Duration,
}

/// What the database remembers of a key's refusals since it last renewed (across restarts and
/// processes), in Unix milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refusals {
    pub count: u32,
    pub first_ms: Option<i64>,
    pub last_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The key is revoked: flag it, for this reason.
    Revoked(&'static str),
    /// Not enough evidence that it is the key: retry it later, say why.
    Defer(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmChange {
    Raised,
    Cleared,
}

pub const REVOKED: &str = "the Store refused the key (AuthenticationTokenInvalid), also with a freshly minted access token, after another key of the same application renewed: it is revoked or no longer renewable; the client must mint a new key";
pub const REVOKED_LONE: &str = "the Store has refused the key (AuthenticationTokenInvalid, also with a freshly minted access token) for longer than guard.lone_key_after, and its application has no other key to show whether our credential works: treated as revoked; the client must mint a new key";
pub const AWAITING: &str = "the Store refused the key (AuthenticationTokenInvalid), but no renewal of this application has succeeded since to show that our credential works; another key is renewed early to find out, and this one is tried again";
pub const ALARM: &str = "the Store is refusing keys of this application while none renews (AuthenticationTokenInvalid): that is our credential or configuration, not revocations; nothing is flagged until a renewal succeeds again";

#[derive(Debug, Default)]
struct App {
    /// (when, key, whether the Store renewed that key before) of refusals since the last
    /// renewal began, within the window.
    refusals: VecDeque<(i64, i64, bool)>,
    /// When the latest successful renewal began.
    last_success_ms: Option<i64>,
    alarm_since: Option<i64>,
    canary: Canary,
}

#[derive(Debug, Default)]
struct Canary {
    wanted: bool,
    in_flight: bool,
    last_ms: Option<i64>,
    /// The last search found no key to ask (and nothing has renewed since).
    none_to_ask: bool,
}

impl App {
    fn prune(&mut self, now: i64, window: Duration) {
        let window = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let since = self.last_success_ms.unwrap_or(i64::MIN);
        self.refusals
            .retain(|(t, _, _)| *t > since && now.saturating_sub(*t) <= window);
    }

    fn distinct_refused(&self) -> usize {
        self.distinct(|_| true)
    }

    /// Distinct refused keys that count towards a wave: those the Store renewed before, for
    /// anyone can store a key that was never genuine. Until a renewal of the application has
    /// been seen, every key counts (with no evidence either way, the alarm is the safe side).
    fn wave(&self) -> usize {
        let seen_success = self.last_success_ms.is_some();
        self.distinct(|proven| proven || !seen_success)
    }

    fn distinct(&self, counts: impl Fn(bool) -> bool) -> usize {
        let mut keys: Vec<i64> = self
            .refusals
            .iter()
            .filter(|(_, _, proven)| counts(*proven))
            .map(|(_, k, _)| *k)
            .collect();
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

    /// A key of `app` renewed, by an attempt that began at `started_ms`: the credential worked
    /// then. Only an attempt begun after the alarm was raised clears it (one already in flight
    /// when the credential broke proves nothing).
    pub fn success(&mut self, app: &str, started_ms: i64) -> Option<AlarmChange> {
        let a = self.apps.entry(app.to_owned()).or_default();
        a.last_success_ms = Some(a.last_success_ms.map_or(started_ms, |t| t.max(started_ms)));
        a.canary.none_to_ask = false;
        // Refusals from before it are answered: the credential worked after them.
        a.refusals.retain(|(t, _, _)| *t > started_ms);
        let change = match a.alarm_since {
            Some(since) if started_ms > since => {
                a.alarm_since = None;
                Some(AlarmChange::Cleared)
            }
            _ => None,
        };
        // The evidence a canary would bring is in: none is asked for until the next refusal.
        if a.alarm_since.is_none() && a.refusals.is_empty() {
            a.canary.wanted = false;
        }
        change
    }

    /// Raises the alarm for `app` without a refusal: one recorded by an earlier run, or by the
    /// daemon for a CLI process.
    pub fn raise(&mut self, app: &str, since_ms: i64) {
        let a = self.apps.entry(app.to_owned()).or_default();
        a.alarm_since = Some(since_ms);
        a.canary.wanted = true;
    }

    /// Another process saw a renewal of `app` succeed after the alarm and cleared it. That is
    /// its evidence, not ours: no success is recorded here, so no refusal counts for it.
    pub fn clear(&mut self, app: &str) -> bool {
        self.apps
            .get_mut(app)
            .is_some_and(|a| a.alarm_since.take().is_some())
    }

    /// A key of `app` was refused twice (the second time with a fresh access token). `prior` is
    /// what the database remembers of its earlier refusals; `canary`: the key was renewed early
    /// to test the credential; `proven`: the Store renewed this key before, so it was genuine.
    pub fn refused(
        &mut self,
        app: &str,
        key_id: i64,
        prior: Refusals,
        canary: bool,
        proven: bool,
        now: i64,
    ) -> (Verdict, Option<AlarmChange>) {
        let policy = self.policy;
        let a = self.apps.entry(app.to_owned()).or_default();
        a.prune(now, policy.window);
        a.refusals.push_back((now, key_id, proven));
        a.canary.wanted = true;
        if a.alarm_since.is_some() {
            return (Verdict::Defer(ALARM), None);
        }
        // A canary the Store renewed before, refused right after another key was, with nothing
        // renewed since it was asked for, points at us. So do many such keys at once, and every
        // key of a small application. A key that never renewed may be forged: refused as a
        // canary it points at us only beside a refused key that did renew (the canary search
        // falls back to such keys where no renewed one is free).
        let renewed_since_asked = a
            .last_success_ms
            .zip(a.canary.last_ms)
            .is_some_and(|(success, asked)| success > asked);
        let corroborated = proven
            || a.refusals
                .iter()
                .any(|(_, key, proven)| *proven && *key != key_id);
        let refused = a.distinct_refused();
        if (canary && corroborated && !renewed_since_asked)
            || a.wave() >= policy.threshold
            || (a.canary.none_to_ask && refused >= 2)
        {
            a.alarm_since = Some(now);
            return (Verdict::Defer(ALARM), Some(AlarmChange::Raised));
        }
        // The credential worked after this key's previous refusal, and the key is refused again.
        if let (Some(last), Some(success)) = (prior.last_ms, a.last_success_ms)
            && success > last
        {
            return (Verdict::Revoked(REVOKED), None);
        }
        let lone_after = i64::try_from(policy.lone_key_after.as_millis()).unwrap_or(i64::MAX);
        if a.canary.none_to_ask
            && prior
                .first_ms
                .is_some_and(|first| now.saturating_sub(first) >= lone_after)
        {
            return (Verdict::Revoked(REVOKED_LONE), None);
        }
        (Verdict::Defer(AWAITING), None)
    }

    /// The applications that want a canary now: evidence is missing (a refusal, an alarm), none
    /// is in flight, and the last was at least `canary_interval` ago. Each is marked in flight;
    /// report back with [`Self::canary_found`].
    pub fn canaries_due(&mut self, now: i64) -> Vec<String> {
        let interval = i64::try_from(self.policy.canary_interval.as_millis()).unwrap_or(i64::MAX);
        let mut due: Vec<String> = Vec::new();
        for (name, a) in &mut self.apps {
            let c = &mut a.canary;
            if c.wanted
                && !c.in_flight
                && c.last_ms.is_none_or(|t| now.saturating_sub(t) >= interval)
            {
                c.in_flight = true;
                c.last_ms = Some(now);
                due.push(name.clone());
            }
        }
        due.sort();
        due
    }

    /// Whether a key to ask was found for `app`'s canary. None, while several of its keys are
    /// refused: every key it has is refused, which is our credential.
    pub fn canary_found(&mut self, app: &str, found: bool, now: i64) -> Option<AlarmChange> {
        let window = self.policy.window;
        let a = self.apps.entry(app.to_owned()).or_default();
        a.canary.none_to_ask = !found;
        if found {
            return None;
        }
        a.canary.in_flight = false;
        a.prune(now, window);
        if a.alarm_since.is_none() && a.distinct_refused() >= 2 {
            a.alarm_since = Some(now);
            return Some(AlarmChange::Raised);
        }
        None
    }

    /// `app`'s canary attempt is over, whatever it answered. Once the credential is shown to
    /// work, no more canaries are needed until the next refusal.
    pub fn canary_done(&mut self, app: &str, now: i64) {
        let window = self.policy.window;
        let a = self.apps.entry(app.to_owned()).or_default();
        a.canary.in_flight = false;
        a.prune(now, window);
        if a.alarm_since.is_none() && a.refusals.is_empty() {
            a.canary.wanted = false;
        }
    }

    /// Applications whose alarm is raised, with when it was (Unix milliseconds).
    pub fn alarms(&self) -> Vec<(String, i64)> {
        let mut v: Vec<_> = self
            .apps
            .iter()
            .filter_map(|(name, a)| a.alarm_since.map(|t| (name.clone(), t)))
            .collect();
        v.sort();
        v
    }
}

/// Which healthy keys a canary search tries, in order: (renewed by the Store, issued at or
/// before). A key the Store renewed first: a refusal of one that never renewed proves nothing
/// (a player may have forged it), so it is asked only where no renewed key is free. A key
/// issued moments ago proves as much as an older one; it is taken only when no older key is
/// free, and then it is this or no evidence at all.
pub(crate) fn canary_preference(issued_before: i64) -> [(bool, i64); 4] {
    [
        (true, issued_before),
        (true, i64::MAX),
        (false, issued_before),
        (false, i64::MAX),
    ]
}

#[cfg(test)]
#[path = "guard_tests.rs"]
mod tests;
