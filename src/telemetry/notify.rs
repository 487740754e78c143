//! The systemd notify protocol (`Type=notify`): READY once serving, STATUS lines, the watchdog
//! fed from the run loop itself, STOPPING on shutdown. Without `NOTIFY_SOCKET` every call is a
//! no-op, so the daemon runs the same outside systemd.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
    last_pet: Option<Instant>,
    last_status: String,
}

impl Notifier {
    pub fn from_env() -> Self {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
            last_pet: None,
            last_status: String::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The longest the run loop may sleep and still feed the watchdog in time: half its period.
    pub fn max_sleep(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    pub fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// Sends a STATUS line when it changed.
    pub fn status(&mut self, line: &str) {
        if self.enabled && line != self.last_status {
            self.send(&[NotifyState::Status(line)]);
            line.clone_into(&mut self.last_status);
        }
    }

    /// Called from the run loop on every pass; sends WATCHDOG=1 at most every half period. A
    /// loop that is stuck stops calling this, and systemd restarts the service.
    pub fn pet(&mut self) {
        let Some(period) = self.watchdog else { return };
        if self.last_pet.is_none_or(|t| t.elapsed() >= period / 4) {
            self.send(&[NotifyState::Watchdog]);
            self.last_pet = Some(Instant::now());
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "could not notify systemd");
        }
    }
}
