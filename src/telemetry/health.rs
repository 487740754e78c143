//! Liveness and the last database write failure, which the run loop and the writer record and
//! the listener reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::storage::DbError;

/// Liveness: the run loop beats on every pass.
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    last_beat_ms: AtomicU64,
    stale_after: Duration,
    /// The last database write failure (locked, read-only, full), until a write succeeds again.
    db_error: std::sync::Mutex<Option<String>>,
}

impl Health {
    pub fn new(stale_after: Duration) -> Self {
        Health {
            epoch: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            stale_after,
            db_error: std::sync::Mutex::new(None),
        }
    }

    pub fn beat(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_beat_ms.store(ms, Ordering::Relaxed);
    }

    pub fn db_failed(&self, error: &DbError) {
        *self
            .db_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error.to_string());
    }

    /// A write went through: the database is writable again.
    pub fn db_ok(&self) {
        *self
            .db_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    pub fn db_error(&self) -> Option<String> {
        self.db_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn alive(&self) -> bool {
        let last = Duration::from_millis(self.last_beat_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last) < self.stale_after
    }
}
