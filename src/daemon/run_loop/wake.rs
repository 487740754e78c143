//! What wakes the run loop: one enum, waited for in one `select!`.

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Loop;
use super::slots::Joined;
use crate::daemon::ingest;

/// What woke the run loop; [`Loop::run_until`] decides in one `match` whether it makes a pass.
pub(super) enum Wake {
    Stop,
    /// An attempt finished (its result is durable).
    Finished(Joined),
    /// An attempt got its answer: slots may be free.
    Answered,
    /// The next key is due, or a failed look's backoff ended.
    Deadline,
    /// The database announced a new key (`NOTIFY`), or its listener connected again (and may
    /// have missed one).
    Signalled,
    /// The look for new keys ended.
    Looked(Result<ingest::Looked, ingest::LookFailed>),
    /// The first answer told the Store's time.
    TimeLearned,
}

/// Until the database signals a new key; never, where it cannot.
async fn woken(wake: Option<&Notify>) {
    match wake {
        Some(wake) => wake.notified().await,
        None => std::future::pending().await,
    }
}

impl Loop {
    /// Waits for whatever wakes the loop first.
    pub(super) async fn next_wake(
        &mut self,
        shutdown: &CancellationToken,
        wake_at: tokio::time::Instant,
    ) -> Wake {
        let attempts = self.slots.attempts() > 0;
        tokio::select! {
            () = shutdown.cancelled() => Wake::Stop,
            joined = self.slots.next_finished(), if attempts => Wake::Finished(joined),
            () = self.engine.call_answered(), if attempts => Wake::Answered,
            () = tokio::time::sleep_until(wake_at) => Wake::Deadline,
            () = woken(self.wake.as_deref()) => Wake::Signalled,
            looked = self.checker.finished(), if self.checker.running() => Wake::Looked(looked),
            () = self.engine.server_time().learned(), if self.awaiting_time => Wake::TimeLearned,
        }
    }
}
