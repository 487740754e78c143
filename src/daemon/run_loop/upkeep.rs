//! What runs beside the renewals: old events and retired keys pruned and spools other processes
//! left applied (at the end of a full pass, each at its own interval), tokens warmed and
//! certificates watched, and the metrics listener (tasks of their own).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::attempt::Engine;
use crate::daemon::{DaemonError, secs, spool};
use crate::remote::entra::status as credentials;
use crate::storage::Storage;
use crate::telemetry::observe::{self, Observer};

/// Events older than the retention are pruned this often.
const PRUNE_EVERY_SECS: i64 = 3600;
/// Retired keys are remembered this long (three key lifetimes), so a re-stored one is refused.
const LINEAGE_SECS: i64 = 90 * 86_400;
/// At most this many thousand events are pruned per pass of the loop.
const PRUNE_BATCHES_PER_PASS: u32 = 10;
/// How often a failing application's credential is tried again outside renewals.
const TOKEN_RECHECK: Duration = Duration::from_secs(300);
/// How often spools left by other processes are looked for.
const ORPHANS_EVERY: Duration = Duration::from_secs(60);

/// The loop's chores at the end of a full pass, each at its own interval.
pub(super) struct Upkeep {
    last_prune: i64,
    last_orphans: Instant,
}

impl Upkeep {
    /// Right after the start, which applied the spools already.
    pub(super) fn new() -> Upkeep {
        Upkeep {
            last_prune: 0,
            last_orphans: Instant::now(),
        }
    }

    /// Once an hour, events older than `events.retention` (a large backlog over several
    /// passes), then the lineage of keys retired long ago.
    pub(super) async fn prune(
        &mut self,
        storage: &dyn Storage,
        config: &Config,
        now: i64,
    ) -> Result<(), DaemonError> {
        if now - self.last_prune < PRUNE_EVERY_SECS {
            return Ok(());
        }
        let before = now - secs(config.events.retention);
        let (pruned, more) = storage.prune_events(before, PRUNE_BATCHES_PER_PASS).await?;
        if !more {
            self.last_prune = now;
            storage.prune_lineage(now - LINEAGE_SECS).await?;
        }
        if pruned > 0 {
            tracing::debug!(events = pruned, more, "pruned old events");
        }
        Ok(())
    }

    /// Every minute, the spools that other processes left (a `storekeyd renew` that could not
    /// write) are applied, so their keys are not renewed again from the retired ones.
    pub(super) async fn adopt_orphan_spools(&mut self, storage: &dyn Storage, config: &Config) {
        if self.last_orphans.elapsed() < ORPHANS_EVERY {
            return;
        }
        self.last_orphans = Instant::now();
        // Already cancelled: one try, no waiting on a busy database; the next minute tries again.
        let once = CancellationToken::new();
        once.cancel();
        let dir = config.state_directory();
        if let Err(e) = spool::recover(storage, &dir, &once).await {
            tracing::warn!(error = %e, "could not apply a spool another process left; will try again");
        }
    }
}

pub(super) async fn observe_task(
    listener: TcpListener,
    observer: Observer,
    stop: CancellationToken,
) {
    if let Err(e) = observe::serve(listener, observer, stop).await {
        tracing::error!(error = %e, "the metrics listener failed");
    }
}

/// Fetches a token for every application at start, so that a broken credential shows in the
/// logs and `/readyz` at once rather than at the first renewal; re-tries the failing ones, and
/// warns of certificates that expire within `warn_within`.
pub(super) async fn warm_tokens(
    engine: Arc<Engine>,
    warn_within: Duration,
    stop: CancellationToken,
) {
    loop {
        engine.warm_tokens().await;
        let now = engine.store_now();
        for status in engine.credential_status() {
            let warning = credentials::expiry_warning(&status, now, warn_within);
            engine
                .safety()
                .certificate_expiry(&status.label, warning.as_deref())
                .await;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(TOKEN_RECHECK) => {}
        }
    }
}
