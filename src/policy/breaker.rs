//! The outage breaker, one per renew endpoint. Pure: every method takes `now`.
//!
//! Closed: calls go out; transient failures (5xx, timeouts, connection errors, 429) are
//! remembered with the key they hit. When `threshold` different keys fail within `window`, the
//! endpoint is down, not the keys: the breaker opens. Open: no calls, except one probe when the
//! probe time comes; a successful probe closes it, a failed one doubles the wait (up to
//! `probe_max`). During an outage the request rate is one probe per interval, whatever the backlog.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long callers wait while the probe is in flight.
const PROBE_PENDING_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    pub threshold: usize,
    pub window: Duration,
    pub probe_initial: Duration,
    pub probe_max: Duration,
}

/// What the breaker lets a caller do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Call,
    /// The one probe of this interval; report its result.
    Probe,
    /// Wait: the endpoint is considered down until at least this instant.
    Wait(Instant),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Closed,
    Open {
        next_probe: Instant,
        interval: Duration,
        probing: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Breaker {
    policy: BreakerPolicy,
    state: State,
    /// Recent transient failures, oldest first: (when, which key).
    failures: VecDeque<(Instant, i64)>,
    opened_at: Option<Instant>,
}

/// A change the caller should make visible (log, metric, status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Self {
        Breaker {
            policy,
            state: State::Closed,
            failures: VecDeque::new(),
            opened_at: None,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    pub fn opened_at(&self) -> Option<Instant> {
        self.opened_at
    }

    /// When the next probe may go out, while open.
    pub fn next_probe(&self) -> Option<Instant> {
        match self.state {
            State::Open { next_probe, .. } => Some(next_probe),
            State::Closed => None,
        }
    }

    pub fn permit(&mut self, now: Instant) -> Permit {
        match &mut self.state {
            State::Closed => Permit::Call,
            State::Open {
                next_probe,
                probing,
                interval,
            } => {
                if !*probing && now >= *next_probe {
                    *probing = true;
                    Permit::Probe
                } else if *probing {
                    // The probe's answer decides; until then the others wait an interval.
                    Permit::Wait(now + (*interval).max(PROBE_PENDING_WAIT))
                } else {
                    Permit::Wait(*next_probe)
                }
            }
        }
    }

    /// The probe was granted but never sent (no token, the key expired, the task died): another
    /// caller may probe.
    pub fn abandon_probe(&mut self) {
        if let State::Open { probing, .. } = &mut self.state {
            *probing = false;
        }
    }

    /// When the next probe may go out, if one is waiting for its time (not one already out).
    pub fn upcoming_probe(&self, now: Instant) -> Option<Instant> {
        match self.state {
            State::Open {
                next_probe,
                probing: false,
                ..
            } if next_probe > now => Some(next_probe),
            _ => None,
        }
    }

    /// Whether calls are held back now: open, and either a probe is out or its time has not come.
    pub fn paused(&self, now: Instant) -> bool {
        match self.state {
            State::Open {
                next_probe,
                probing,
                ..
            } => probing || now < next_probe,
            State::Closed => false,
        }
    }

    /// A call (or probe) succeeded: the endpoint answers.
    /// While open, only the probe's answer counts: a call sent before the breaker opened
    /// proves nothing about now.
    pub fn success(&mut self, probe: bool) -> Option<Transition> {
        self.failures.clear();
        if self.is_open() && probe {
            self.state = State::Closed;
            self.opened_at = None;
            return Some(Transition::Closed);
        }
        None
    }

    /// A call (or probe) failed transiently on `key_id`.
    pub fn failure(&mut self, now: Instant, key_id: i64, probe: bool) -> Option<Transition> {
        match &mut self.state {
            State::Open {
                next_probe,
                interval,
                probing,
            } => {
                if *probing && probe {
                    *probing = false;
                    *interval = (*interval * 2).min(self.policy.probe_max);
                    *next_probe = now + *interval;
                }
                None
            }
            State::Closed => {
                self.failures.push_back((now, key_id));
                while self
                    .failures
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > self.policy.window)
                {
                    self.failures.pop_front();
                }
                let mut keys: Vec<i64> = self.failures.iter().map(|(_, k)| *k).collect();
                keys.sort_unstable();
                keys.dedup();
                if keys.len() >= self.policy.threshold {
                    self.state = State::Open {
                        next_probe: now + self.policy.probe_initial,
                        interval: self.policy.probe_initial,
                        probing: false,
                    };
                    self.opened_at = Some(now);
                    self.failures.clear();
                    return Some(Transition::Opened);
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            threshold: 3,
            window: Duration::from_secs(60),
            probe_initial: Duration::from_secs(10),
            probe_max: Duration::from_secs(40),
        }
    }

    #[test]
    fn one_key_failing_repeatedly_does_not_open_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        for i in 0..10 {
            assert_eq!(b.failure(t0 + Duration::from_secs(i), 7, false), None);
        }
        assert_eq!(b.permit(t0), Permit::Call);
    }

    #[test]
    fn failures_spread_beyond_the_window_do_not_open_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        b.failure(t0, 1, false);
        b.failure(t0 + Duration::from_secs(50), 2, false);
        assert_eq!(b.failure(t0 + Duration::from_secs(120), 3, false), None);
    }

    #[test]
    fn opens_probes_backs_off_and_closes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        b.failure(t0, 1, false);
        b.failure(t0, 2, false);
        assert_eq!(b.failure(t0, 3, false), Some(Transition::Opened));
        assert_eq!(b.permit(t0), Permit::Wait(t0 + Duration::from_secs(10)));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.permit(t1), Permit::Probe);
        // Only one probe at a time; the others wait an interval for its answer.
        assert!(b.paused(t1));
        assert_eq!(b.permit(t1), Permit::Wait(t1 + Duration::from_secs(10)));
        // A late answer to a call sent before the breaker opened changes nothing.
        assert_eq!(b.failure(t1, 9, false), None);
        assert_eq!(b.success(false), None);
        assert!(b.is_open());
        assert_eq!(b.failure(t1, 4, true), None);
        assert_eq!(
            b.permit(t1 + Duration::from_secs(19)),
            Permit::Wait(t1 + Duration::from_secs(20))
        );
        let t2 = t1 + Duration::from_secs(20);
        assert_eq!(b.permit(t2), Permit::Probe);
        b.failure(t2, 5, true);
        let t3 = t2 + Duration::from_secs(40);
        assert_eq!(b.permit(t3), Permit::Probe);
        b.failure(t3, 5, true);
        // Capped at probe_max.
        assert_eq!(b.next_probe(), Some(t3 + Duration::from_secs(40)));
        let t4 = t3 + Duration::from_secs(40);
        assert_eq!(b.permit(t4), Permit::Probe);
        assert_eq!(b.success(true), Some(Transition::Closed));
        assert_eq!(b.permit(t4), Permit::Call);
        assert!(!b.paused(t4));
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_caller_probe() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        for k in 0..3 {
            b.failure(t0, k, false);
        }
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.permit(t1), Permit::Probe);
        b.abandon_probe();
        assert!(!b.paused(t1));
        assert_eq!(b.permit(t1), Permit::Probe);
    }

    proptest::proptest! {
        /// However failures arrive, an open breaker lets at most one probe out per interval.
        #[test]
        fn at_most_one_probe_per_interval(events in proptest::collection::vec((0u64..5, 0i64..20, proptest::bool::ANY), 1..200)) {
            let t0 = Instant::now();
            let mut b = Breaker::new(policy());
            let mut now = t0;
            let mut last_probe: Option<Instant> = None;
            for (step, key, ok) in events {
                now += Duration::from_secs(step);
                match b.permit(now) {
                    Permit::Probe => {
                        if let Some(prev) = last_probe {
                            proptest::prop_assert!(now.duration_since(prev) >= Duration::from_secs(10));
                        }
                        last_probe = Some(now);
                        if ok { b.success(true); last_probe = None; } else { b.failure(now, key, true); }
                    }
                    Permit::Call => { if ok { b.success(false); } else { b.failure(now, key, false); } }
                    Permit::Wait(until) => proptest::prop_assert!(until >= now),
                }
            }
        }
    }
}
