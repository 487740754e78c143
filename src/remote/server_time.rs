//! Time from the Store and Entra ID, not only from the host: the offset between the host clock
//! and the `Date` header of their answers. A host clock that jumps (a bad RTC, an NTP step) must
//! not make keys look expired, so expiry is judged on the host clock corrected by this offset,
//! and an offset beyond `http.max_clock_offset` raises an alarm.

use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use crate::clock::Clock;

/// How far a `Date` may be from the running estimate and still agree with it: its whole seconds,
/// and the round trip.
const RESOLUTION_SECS: i64 = 2;

/// The alarm's words, which [`stated_offset`] reads back.
const ALARM_PREFIX: &str = "the host clock is ";
const AHEAD: &str = "ahead of";
const BEHIND: &str = "behind";

#[derive(Debug)]
pub struct ServerTime {
    clock: Clock,
    /// The `Date` of the latest answer and the elapsed-time reading when it came: the Store's
    /// time now is that plus the time elapsed since, by a clock that never steps.
    latest: Mutex<Option<(i64, Duration)>>,
    bound: i64,
    /// Signalled once, when the first answer tells the time: the run loop waits for it before
    /// it schedules anything, and must not wait out a whole poll interval after it.
    learned: tokio::sync::Notify,
}

impl ServerTime {
    pub fn new(bound: Duration, clock: Clock) -> Self {
        ServerTime {
            clock,
            latest: Mutex::new(None),
            bound: i64::try_from(bound.as_secs()).unwrap_or(i64::MAX),
            learned: tokio::sync::Notify::new(),
        }
    }

    /// Takes the `Date` header of an answer that just arrived with `status`. Answers without one
    /// (or with one that does not parse) change nothing, and so do 5xx and 429 answers: those
    /// may come from a proxy or a gateway with a clock of its own.
    pub fn observe(&self, status: u16, headers: &reqwest::header::HeaderMap) {
        if status >= 500 || status == 429 {
            return;
        }
        let Some(server) = headers
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| httpdate::parse_http_date(s).ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_secs()).ok())
        else {
            return;
        };
        let was = self.alarm_offset();
        let first = {
            let mut latest = self.lock();
            let first = latest.is_none();
            // A Date has whole seconds and comes after a round trip: one that agrees with the
            // running estimate within that leaves it alone, so the Store's time never steps back
            // by a fraction of a second (the guard orders renewals and refusals on it).
            let agrees = latest.is_some_and(|(base, at)| {
                let since = self.clock.elapsed().saturating_sub(at).as_secs();
                let estimate = base.saturating_add(i64::try_from(since).unwrap_or(i64::MAX));
                (server - estimate).abs() <= RESOLUTION_SECS
            });
            if !agrees {
                *latest = Some((server, self.clock.elapsed()));
            }
            first
        };
        if first {
            // A permit is stored if nobody waits yet: the next wait returns at once.
            self.learned.notify_one();
        }
        match (was, self.alarm_offset()) {
            (None, Some(offset)) => tracing::error!(
                offset_secs = offset,
                "clock alarm: {}",
                self.describe(offset)
            ),
            (Some(_), None) => tracing::warn!(
                "clock alarm cleared: the host clock agrees with the Store and Entra ID again"
            ),
            _ => {}
        }
    }

    /// Whether an answer told the Store's time yet.
    pub fn known(&self) -> bool {
        self.lock().is_some()
    }

    /// Resolves once an answer has told the Store's time (at once if one has). For one waiter:
    /// the run loop.
    pub async fn learned(&self) {
        if !self.known() {
            self.learned.notified().await;
        }
    }

    /// [`Self::now`] in milliseconds: what the guard orders refusals and renewals on (a step of
    /// the host clock must not reorder them).
    pub fn now_ms(&self) -> i64 {
        match *self.lock() {
            Some((server, at)) => {
                let since = self.clock.elapsed().saturating_sub(at).as_millis();
                server
                    .saturating_mul(1000)
                    .saturating_add(i64::try_from(since).unwrap_or(i64::MAX))
            }
            None => self.clock.now_ms(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(i64, Duration)>> {
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Now as the Store sees it: the last `Date` it sent plus the time elapsed since (the host
    /// clock until an answer came).
    pub fn now(&self) -> i64 {
        match *self.lock() {
            Some((server, at)) => {
                let since = self.clock.elapsed().saturating_sub(at).as_secs();
                server.saturating_add(i64::try_from(since).unwrap_or(i64::MAX))
            }
            None => self.clock.now(),
        }
    }

    /// The Store's time minus the host's, once an answer told it. A step of the host clock shows
    /// at once, before the next answer.
    pub fn offset(&self) -> Option<i64> {
        self.known()
            .then(|| self.now().saturating_sub(self.clock.now()))
    }

    /// What the alarm says, while the offset exceeds the bound.
    pub fn alarm(&self) -> Option<String> {
        self.alarm_offset().map(|offset| self.describe(offset))
    }

    /// The offset, while it exceeds the bound.
    pub fn alarm_offset(&self) -> Option<i64> {
        self.offset().filter(|o| o.saturating_abs() > self.bound)
    }

    /// What the alarm says for `offset`. It states the offset in whole seconds: a process that
    /// has no answers of its own (`status`) judges time by the alarm's word ([`stated_offset`]).
    pub fn describe(&self, offset: i64) -> String {
        let (dir, by) = if offset < 0 {
            (AHEAD, offset.saturating_neg())
        } else {
            (BEHIND, offset)
        };
        format!(
            "{ALARM_PREFIX}{by} s {dir} the Store's and Entra ID's (their answers' Date; bound {} s): check NTP; meanwhile expiry is judged on their time, so no key is flagged expired on the host clock alone",
            self.bound
        )
    }
}

/// The offset (the Store's time minus the host's) an alarm's text from
/// [`ServerTime::describe`] states; `None` for any other text.
pub fn stated_offset(alarm: &str) -> Option<i64> {
    let rest = alarm.strip_prefix(ALARM_PREFIX)?;
    let (by, rest) = rest.split_once(" s ")?;
    let by: i64 = by.parse().ok()?;
    if rest.starts_with(AHEAD) {
        Some(by.saturating_neg())
    } else if rest.starts_with(BEHIND) {
        Some(by)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(secs: i64) -> reqwest::header::HeaderMap {
        let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap());
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::DATE,
            httpdate::fmt_http_date(t).parse().unwrap(),
        );
        h
    }

    #[test]
    fn dates_that_agree_with_the_estimate_never_move_it_back() {
        let clock = Clock::system();
        let t = ServerTime::new(Duration::from_secs(120), clock.clone());
        let now = clock.now();
        t.observe(200, &headers(now));
        let before = t.now_ms();
        // The same second again (a later answer within it), or one behind: no step back.
        t.observe(200, &headers(now));
        t.observe(200, &headers(now - 1));
        assert!(t.now_ms() >= before);
        // A real correction moves it.
        t.observe(200, &headers(now - 600));
        assert!(t.now() <= now - 590);
    }

    #[test]
    fn a_step_of_the_host_clock_shows_at_once_and_moves_nothing_judged_on_the_stores_time() {
        let clock = Clock::system();
        let t = ServerTime::new(Duration::from_secs(120), clock.clone());
        assert_eq!(t.offset(), None);
        let store = clock.now() - 60;
        // A gateway's 503 says nothing about the Store's time.
        t.observe(503, &headers(store - 86_400));
        assert!(!t.known());
        t.observe(200, &headers(store));
        // Slack for a loaded machine: the Date has whole seconds, and time passes.
        assert!((-70..=-55).contains(&t.offset().unwrap()));
        assert!(t.alarm().is_none());
        // Time passes (tests advance it): both clocks move together.
        clock.advance(Duration::from_secs(86_400));
        assert!((store + 86_400..=store + 86_410).contains(&t.now()));
        assert!(t.alarm().is_none());
        // The host clock jumps a month ahead: the Store's time does not move with it.
        clock.step_forward(Duration::from_secs(30 * 86_400));
        assert!((store + 86_400..=store + 86_410).contains(&t.now()));
        assert!((t.now_ms() / 1000 - t.now()).abs() <= 1);
        assert!(t.alarm().unwrap().contains("ahead of"));
        // A missing or garbled Date changes nothing; a fresh one from a fixed host clears it.
        t.observe(200, &reqwest::header::HeaderMap::new());
        assert!(t.alarm().is_some());
        t.observe(401, &headers(clock.now()));
        assert!(t.alarm().is_none());
    }

    #[test]
    fn the_alarm_states_the_offset_it_was_raised_for() {
        let t = ServerTime::new(Duration::from_secs(120), Clock::system());
        for offset in [-29 * 86_400, -121, 121, 86_400, i64::MAX, i64::MIN + 1] {
            assert_eq!(stated_offset(&t.describe(offset)), Some(offset), "{offset}");
        }
        for other in [
            "",
            "breaker open",
            "the host clock is 5 s sideways",
            "the host clock is x s behind",
        ] {
            assert_eq!(stated_offset(other), None, "{other}");
        }
    }
}
