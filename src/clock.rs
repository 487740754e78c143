//! Wall-clock time as the daemon and the emulator see it. Tests move it forward by days so that
//! renewal cycles of 30-day keys run in milliseconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Unix seconds, shareable. The system clock plus offsets that only tests change: time that
/// passes faster ([`Clock::advance`], seen by the elapsed-time reading too) and steps of the wall
/// clock alone ([`Clock::rewind`], [`Clock::step_forward`]), as a bad RTC or NTP makes them.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_secs: Arc<AtomicI64>,
    advanced_secs: Arc<AtomicI64>,
}

/// Time since boot, suspend included (`CLOCK_BOOTTIME`): unlike `Instant` (`CLOCK_MONOTONIC`),
/// it keeps counting while a VM is suspended, and neither ever steps.
fn since_boot() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

impl Clock {
    pub fn system() -> Self {
        Clock::default()
    }

    /// Now, in Unix seconds.
    pub fn now(&self) -> i64 {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        secs.saturating_add(self.offset_secs.load(Ordering::Relaxed))
    }

    /// Now, in Unix milliseconds: for ordering events within a second (a renewal that began
    /// after a refusal).
    pub fn now_ms(&self) -> i64 {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        ms.saturating_add(
            self.offset_secs
                .load(Ordering::Relaxed)
                .saturating_mul(1000),
        )
    }

    pub fn now_system_time(&self) -> SystemTime {
        let secs = u64::try_from(self.now()).unwrap_or(0);
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// Time elapsed since an arbitrary origin, by a clock that never steps and counts suspend,
    /// plus what tests advanced: what the Store's time is extrapolated with.
    pub fn elapsed(&self) -> Duration {
        let advanced = u64::try_from(self.advanced_secs.load(Ordering::Relaxed)).unwrap_or(0);
        since_boot() + Duration::from_secs(advanced)
    }

    /// Steps the wall clock of this clock (and every clone of it) back, as an NTP step would;
    /// elapsed time is not affected.
    pub fn rewind(&self, by: Duration) {
        let secs = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
        self.offset_secs.fetch_sub(secs, Ordering::Relaxed);
    }

    /// Steps the wall clock forward, as a bad RTC would; elapsed time is not affected.
    pub fn step_forward(&self, by: Duration) {
        let secs = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
        self.offset_secs.fetch_add(secs, Ordering::Relaxed);
    }

    /// Moves this clock (and every clone of it) forward: time passes, for the wall clock and the
    /// elapsed time alike.
    pub fn advance(&self, by: Duration) {
        let secs = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
        self.offset_secs.fetch_add(secs, Ordering::Relaxed);
        self.advanced_secs.fetch_add(secs, Ordering::Relaxed);
    }
}

/// A Unix time as RFC 3339 UTC, for reasons and logs.
pub fn utc(secs: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_moves_every_clone() {
        let a = Clock::system();
        let b = a.clone();
        let before = b.now();
        a.advance(Duration::from_secs(86_400));
        assert!(b.now() >= before + 86_400);
    }
}
