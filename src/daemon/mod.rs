//! The daemon: the run loop, one attempt on a key, ingest, the writer, the spool, and the
//! breaker and guard wired to their side effects.

pub mod attempt;
pub(crate) mod fleet;
pub mod ingest;
mod observed;
mod run_loop;
pub mod safety;
pub mod spool;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Config;
use crate::daemon::attempt::{BuildError, Engine, Parts};
use crate::daemon::safety::Safety;
use crate::daemon::spool::{RecoverError, Spool};
use crate::daemon::writer::{WriterGone, WriterSettings};
use crate::policy::state::State;
use crate::remote::entra::{CredentialError, TokenClient};
use crate::remote::renew_api::RenewClient;
use crate::remote::server_time::ServerTime;
use crate::storage::{DbError, Storage};
use crate::telemetry::health::Health;
use crate::telemetry::metrics::{KeyStats, Metrics};

pub use run_loop::run;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Writer(#[from] WriterGone),
    #[error(transparent)]
    Spool(#[from] RecoverError),
}

/// The engine and its writer: what the run loop and the CLI's `renew` share.
pub struct Service {
    pub engine: Arc<Engine>,
    writer: JoinHandle<()>,
    alarms: JoinHandle<()>,
    stopping: CancellationToken,
    close: CancellationToken,
}

impl Service {
    /// Reads every credential (a broken one is logged and its keys wait, retried, while the
    /// other applications renew) and starts the writer.
    /// `shutdown` is the stop signal: once it fires, renewed keys the database refuses are
    /// spooled at once instead of waited for.
    pub fn start(
        config: Arc<Config>,
        storage: Arc<dyn Storage>,
        clock: Clock,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> Result<Service, DaemonError> {
        let metrics = Arc::new(Metrics::default());
        let http = crate::remote::http::client(&config.http)?;
        let server_time = Arc::new(ServerTime::new(config.http.max_clock_offset, clock.clone()));
        let metadata_http = crate::remote::http::metadata_client(&config.http)?;
        let tokens = TokenClient::new(
            &config,
            (http.clone(), metadata_http),
            clock.clone(),
            metrics.clone(),
            server_time.clone(),
        )?;
        let (stopping, close) = (shutdown.child_token(), CancellationToken::new());
        let settings = WriterSettings {
            spool_after: config.renew.spool_after,
            lease: config.renew.lease,
        };
        let (writer, task) = writer::spawn(
            storage.clone(),
            Spool::for_process(&config.state_directory()),
            settings,
            health,
            server_time.clone(),
            (stopping.clone(), close.clone()),
        );
        let (safety, alarms) =
            Safety::new(&config, storage, server_time.clone(), fleet::replica_name());
        let parts = Parts {
            api: RenewClient::new(
                crate::remote::http::renew_client(&config.http)?,
                config.http.request_timeout,
                config.http.max_body_bytes,
                server_time.clone(),
            ),
            server_time,
            safety,
            config,
            tokens,
            metrics,
        };
        Ok(Service {
            engine: Arc::new(Engine::new(parts, writer)?),
            writer: task,
            alarms,
            stopping,
            close,
        })
    }

    /// Shutdown began: a write that keeps failing is spooled sooner.
    pub fn stopping(&self) {
        self.stopping.cancel();
    }

    /// Writes (or spools) everything queued, then stops the writer and the alarm recorder.
    /// Every other holder of the engine must be gone.
    pub async fn close(self) {
        self.stopping.cancel();
        self.close.cancel();
        if let Err(e) = self.writer.await {
            tracing::error!(error = %e, "the database writer failed");
        }
        drop(self.engine);
        let mut alarms = self.alarms;
        match tokio::time::timeout(Duration::from_secs(5), &mut alarms).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the alarm recorder failed"),
            Err(_) => {
                // Not left running: it would write an alarm after the stop cleared them.
                alarms.abort();
                tracing::warn!("the alarm recorder did not finish in time; stopped it");
            }
        }
    }
}

/// Applies what a previous run spooled (before anything is claimed), then gives keys flagged
/// for configuration reasons another check against the current configuration.
async fn recover(
    config: &Config,
    storage: &dyn Storage,
    clock: &Clock,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError> {
    spool::recover(storage, &config.state_directory(), shutdown).await?;
    let rechecked = storage.recheck_misconfigured(clock.now()).await?;
    if rechecked > 0 {
        tracing::info!(
            keys = rechecked,
            "re-checking keys flagged misconfigured against the current configuration"
        );
    }
    Ok(())
}

/// `12 active, 2 flagged, 0 pending, next due 2026-11-25T10:00:00Z`
pub fn status_line(stats: &KeyStats) -> String {
    let next = stats.next_due.map_or_else(
        || "nothing due".to_owned(),
        |t| format!("next due {}", crate::clock::utc(t)),
    );
    format!(
        "{} active, {} flagged, {} pending, {next}",
        stats.count(State::Active),
        stats.flagged(),
        stats.count(State::Pending)
    )
}

/// The loop tops up its queue of claimed keys once fewer than this many wait: half the
/// concurrency, enough to refill every slot that frees while a claim waits for the write lock
/// (the writer commits back to back during a drain).
fn refill_at(concurrency: usize) -> usize {
    (concurrency / 2).max(1)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// A poisoned lock still holds consistent data here: every critical section is a plain
/// insert, remove or lookup.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
