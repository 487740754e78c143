//! A global pace for renew calls: at most `rate` starts per second, evenly spaced, so a backlog
//! drains as a steady stream instead of a burst the Store would throttle. Several replicas on
//! one database split the rate: each takes its share, `rate / replicas`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    /// The interval of the whole rate; a replica's is this times the replicas.
    interval: Duration,
    replicas: AtomicU32,
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    pub fn per_second(rate: f64) -> Self {
        let interval = Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::from_secs(1));
        RateLimiter {
            interval,
            replicas: AtomicU32::new(1),
            next: Mutex::new(None),
        }
    }

    /// From now on this process takes `1 / replicas` of the rate.
    pub fn share_with(&self, replicas: u32) {
        self.replicas.store(replicas.max(1), Ordering::Relaxed);
    }

    /// Waits for this caller's slot. Slots are handed out in order; an idle limiter lets the
    /// next caller through at once (no burst credit builds up while idle).
    pub async fn acquire(&self) {
        // A year: no caller's slot is that far off.
        let never = Instant::now() + Duration::from_secs(365 * 86_400);
        self.acquire_by(never).await;
    }

    /// Like [`Self::acquire`], unless this caller's slot would come after `latest`: then it
    /// takes no slot (the callers behind it lose no time) and returns false.
    pub async fn acquire_by(&self, latest: Instant) -> bool {
        let (slot, now) = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let slot = next.map_or(now, |n| n.max(now));
            if slot > latest {
                return false;
            }
            *next = Some(slot + self.spacing());
            (slot, now)
        };
        // A slot that is already here needs no timer.
        if slot > now {
            tokio::time::sleep_until(slot).await;
        }
        true
    }

    /// How many calls this process may send within `window`.
    pub fn calls_within(&self, window: Duration) -> usize {
        let calls = window.as_secs_f64() / self.spacing().as_secs_f64().max(1e-9);
        // Saturating: a lifted limit allows any number.
        calls as usize
    }

    fn spacing(&self) -> Duration {
        self.interval * self.replicas.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_slot_past_the_deadline_is_not_taken() {
        let limiter = RateLimiter::per_second(1.0);
        let start = Instant::now();
        assert!(limiter.acquire_by(start).await);
        // The next slot is a second off.
        assert!(!limiter.acquire_by(start + Duration::from_millis(500)).await);
        assert!(limiter.acquire_by(start + Duration::from_secs(1)).await);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        // The refused caller took nothing: the slot after is a second later, not two.
        limiter.acquire().await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(limiter.calls_within(Duration::from_secs(10)), 10);
        limiter.share_with(2);
        assert_eq!(limiter.calls_within(Duration::from_secs(10)), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn spaces_calls_evenly() {
        let limiter = RateLimiter::per_second(10.0);
        let start = Instant::now();
        for _ in 0..11 {
            limiter.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn two_replicas_take_half_each() {
        let limiter = RateLimiter::per_second(10.0);
        limiter.share_with(2);
        let start = Instant::now();
        for _ in 0..6 {
            limiter.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        limiter.share_with(1);
        let start = Instant::now();
        for _ in 0..10 {
            limiter.acquire().await;
        }
        // The first of these still waited out the slot spaced for two (200 ms); the other
        // nine came 100 ms apart.
        assert_eq!(start.elapsed(), Duration::from_millis(1100));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_does_not_build_a_burst() {
        let limiter = RateLimiter::per_second(2.0);
        limiter.acquire().await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        for _ in 0..3 {
            limiter.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}
