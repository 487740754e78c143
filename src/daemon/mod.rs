//! The run loop: ingest new keys, claim due ones, renew them with bounded concurrency, sleep
//! until the next is due, and drain in-flight work on shutdown.

pub mod attempt;
pub mod ingest;
pub mod safety;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Config;
use crate::daemon::attempt::{BuildError, Renewer, Settled};
use crate::ops::metrics::{KeyStats, Metrics};
use crate::ops::notify::Notifier;
use crate::ops::observe::{self, Health, Observer};
use crate::policy::claims::Kind;
use crate::remote::entra::{self, CredentialError, TokenClient};
use crate::remote::renew_api::RenewClient;
use crate::storage::sqlite::{ClaimedRow, Db, DbError};

/// Events older than the retention are pruned this often.
const PRUNE_EVERY_SECS: i64 = 3600;
/// At most this many thousand events are pruned per pass of the loop.
const PRUNE_BATCHES_PER_PASS: u32 = 10;
/// How often a failing application's credential is tried again outside renewals.
const TOKEN_RECHECK: Duration = Duration::from_secs(300);
/// How often the systemd STATUS line is recomputed.
const STATUS_EVERY: Duration = Duration::from_secs(60);

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
}

/// Builds the renewer from the configuration: reads every secret, so a missing one stops the
/// start instead of failing renewals one by one later.
pub fn build_renewer(config: Arc<Config>, db: Db, clock: Clock) -> Result<Renewer, DaemonError> {
    let credentials = config
        .applications
        .iter()
        .map(|app| Ok((app.clone(), entra::load_credential(app)?)))
        .collect::<Result<Vec<_>, CredentialError>>()?;
    let metrics = Arc::new(Metrics::default());
    let http = crate::remote::http::client(&config.http)?;
    let tokens = TokenClient::new(
        &config,
        credentials,
        http.clone(),
        clock.clone(),
        metrics.clone(),
    );
    let api = RenewClient::new(http, config.http.max_body_bytes);
    Ok(Renewer::new(db, config, tokens, api, clock, metrics)?)
}

/// Runs until `shutdown` is cancelled, then lets in-flight renewals finish within
/// `renew.shutdown_grace` and hands back the keys whose attempt did not finish. `listener`, if
/// given, serves `/metrics`, `/healthz` and `/readyz`.
pub async fn run(
    config: Arc<Config>,
    db: Db,
    clock: Clock,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let renewer = Arc::new(build_renewer(config.clone(), db.clone(), clock.clone())?);
    db.clear_alarms().await?;
    let rechecked = db.recheck_misconfigured(clock.now()).await?;
    if rechecked > 0 {
        tracing::info!(
            keys = rechecked,
            "re-checking keys flagged misconfigured against the current configuration"
        );
    }
    let stale_after = config.renew.poll_interval.saturating_mul(2) + Duration::from_secs(30);
    let health = Arc::new(Health::new(stale_after));
    health.beat();
    let background = CancellationToken::new();
    let mut helpers = JoinSet::new();
    if let Some(listener) = listener {
        let addr = listener.local_addr().ok();
        let observer = Observer::new(renewer.clone(), health.clone());
        helpers.spawn(observe_task(listener, observer, background.clone()));
        tracing::info!(?addr, "serving /metrics, /healthz and /readyz");
    }
    helpers.spawn(warm_tokens(renewer.clone(), background.clone()));
    let notifier = Notifier::from_env();
    notifier.ready();
    tracing::info!(
        applications = config.applications.len(),
        "storekeyd running"
    );
    let mut lp = Loop {
        renewer,
        config,
        db,
        clock,
        health,
        notifier,
        tasks: JoinSet::new(),
        in_flight: HashMap::new(),
        last_prune: 0,
        last_status: None,
    };
    lp.run_until(&shutdown).await;
    lp.notifier.stopping();
    lp.drain().await;
    background.cancel();
    while helpers.join_next().await.is_some() {}
    Ok(())
}

async fn observe_task(listener: TcpListener, observer: Observer, stop: CancellationToken) {
    if let Err(e) = observe::serve(listener, observer, stop).await {
        tracing::error!(error = %e, "the metrics listener failed");
    }
}

/// Fetches a token for every application at start, so that a broken credential shows in the
/// logs and `/readyz` at once rather than at the first renewal; re-tries the failing ones.
async fn warm_tokens(renewer: Arc<Renewer>, stop: CancellationToken) {
    loop {
        for client_id in renewer.tokens.client_ids() {
            let failing = renewer
                .tokens
                .status()
                .into_iter()
                .any(|(_, last)| !matches!(last, Some(Ok(()))));
            if failing {
                let _ = renewer.tokens.token(&client_id).await;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(TOKEN_RECHECK) => {}
        }
    }
}

struct Loop {
    renewer: Arc<Renewer>,
    config: Arc<Config>,
    db: Db,
    clock: Clock,
    health: Arc<Health>,
    notifier: Notifier,
    last_status: Option<Instant>,
    tasks: JoinSet<Result<Settled, DbError>>,
    in_flight: HashMap<Id, i64>,
    last_prune: i64,
}

impl Loop {
    async fn run_until(&mut self, shutdown: &CancellationToken) {
        while !shutdown.is_cancelled() {
            let wait = match self.cycle().await {
                Ok((wait, wrote)) => {
                    if wrote {
                        self.health.db_ok();
                    }
                    wait
                }
                Err(e) => {
                    // A locked, read-only or full database: say so, and try again after a poll.
                    tracing::error!(error = %e, "cycle failed; retrying after the poll interval");
                    self.health.db_failed(&e);
                    self.config.renew.poll_interval
                }
            };
            self.health.beat();
            self.notifier.pet();
            self.update_status().await;
            self.renewer
                .metrics
                .in_flight
                .store(self.tasks.len() as i64, Ordering::Relaxed);
            let wait = self.notifier.max_sleep().map_or(wait, |max| wait.min(max));
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => self.finished(joined),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass; returns how long to sleep before the next.
    /// One pass; returns how long to sleep, and whether it wrote anything (a successful write
    /// clears a database alarm).
    async fn cycle(&mut self) -> Result<(Duration, bool), DbError> {
        let mut claimed = 0;
        let wait = self.pass(&mut claimed).await?;
        Ok((wait, claimed > 0))
    }

    async fn pass(&mut self, wrote: &mut usize) -> Result<Duration, DbError> {
        let now = self.clock.now();
        let batch = self.config.renew.batch_size;
        let ingested = ingest::ingest_pending(&self.db, &self.config, now, batch).await?;
        *wrote += ingested;
        let free = self
            .config
            .renew
            .concurrency
            .saturating_sub(self.tasks.len());
        // An endpoint whose breaker holds calls back gets no claims: its keys stay put until
        // the probe time instead of being claimed and deferred over and over.
        let paused = self.renewer.safety.paused_kinds();
        let kinds: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| !paused.contains(k))
            .collect();
        if free > 0 {
            let limit = u32::try_from(free).unwrap_or(u32::MAX).min(batch);
            let lease_until = now + secs(self.config.renew.lease);
            for row in self.db.claim_due(now, lease_until, limit, &kinds).await? {
                *wrote += 1;
                self.spawn(row);
            }
        }
        self.prune(now).await?;
        let poll = self.config.renew.poll_interval;
        if ingested >= batch as usize {
            return Ok(Duration::ZERO);
        }
        if self.tasks.len() >= self.config.renew.concurrency {
            // Full: a finishing task wakes the loop.
            return Ok(poll);
        }
        let until_due = match self.db.next_due(&kinds).await? {
            Some(due) if due <= now => Duration::ZERO,
            Some(due) => Duration::from_secs(u64::try_from(due - now).unwrap_or(0)).min(poll),
            None => poll,
        };
        // Wake for the next probe of a paused endpoint too.
        let until_probe = self.renewer.safety.next_probe_in().unwrap_or(poll);
        Ok(until_due.min(until_probe.max(Duration::from_millis(100))))
    }

    /// A one-line STATUS for `systemctl status`, refreshed at most once a minute (it counts keys).
    async fn update_status(&mut self) {
        if !self.notifier.enabled() || self.last_status.is_some_and(|t| t.elapsed() < STATUS_EVERY)
        {
            return;
        }
        self.last_status = Some(Instant::now());
        match self.db.key_stats(self.clock.now()).await {
            Ok(stats) => self.notifier.status(&status_line(&stats)),
            Err(e) => self.notifier.status(&format!("database error: {e}")),
        }
    }

    fn spawn(&mut self, row: ClaimedRow) {
        let id = row.id;
        // Its lease ran out while the attempt still runs (a wall-clock jump): one attempt per key.
        if self.in_flight.values().any(|&r| r == id) {
            return;
        }
        let renewer = self.renewer.clone();
        let handle = self.tasks.spawn(async move { renewer.renew(row).await });
        self.in_flight.insert(handle.id(), id);
    }

    fn finished(&mut self, joined: Result<(Id, Result<Settled, DbError>), tokio::task::JoinError>) {
        let (task, result) = match joined {
            Ok((task, result)) => (task, Ok(result)),
            Err(e) => (e.id(), Err(e)),
        };
        let row = self.in_flight.remove(&task);
        match result {
            Ok(Ok(_)) => self.health.db_ok(),
            // The row keeps its lease and is retried when it runs out.
            Ok(Err(e)) => {
                self.health.db_failed(&e);
                tracing::error!(row, error = %e, "could not record a renewal result; will retry after the lease")
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                tracing::error!(row, error = %e, "renewal task failed; will retry after the lease")
            }
        }
    }

    async fn prune(&mut self, now: i64) -> Result<(), DbError> {
        if now - self.last_prune < PRUNE_EVERY_SECS {
            return Ok(());
        }
        let (pruned, more) = self
            .db
            .prune_events(
                now - secs(self.config.events.retention),
                PRUNE_BATCHES_PER_PASS,
            )
            .await?;
        // A large backlog of old events is worked off over several passes.
        if !more {
            self.last_prune = now;
        }
        if pruned > 0 {
            tracing::debug!(events = pruned, more, "pruned old events");
        }
        Ok(())
    }

    /// Stop claiming; let in-flight renewals finish within the grace period; abort the rest
    /// and give their keys back. An aborted write rolls back whole (one transaction).
    async fn drain(&mut self) {
        let in_flight = self.tasks.len();
        if in_flight > 0 {
            tracing::info!(in_flight, "shutting down; waiting for in-flight renewals");
        }
        let grace = self.config.renew.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                self.finished(joined);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                left = self.tasks.len(),
                "grace period over; abandoning the remaining attempts"
            );
            self.tasks.abort_all();
            while let Some(joined) = self.tasks.join_next_with_id().await {
                if let Ok((task, _)) = &joined {
                    // It finished after all; its result is recorded.
                    self.in_flight.remove(task);
                }
            }
            let ids: Vec<i64> = self.in_flight.values().copied().collect();
            if let Err(e) = self.db.release(&ids, self.clock.now()).await {
                tracing::warn!(error = %e, "could not release abandoned keys; they are retried after their lease");
            }
        }
        // The conditions behind the alarms lived in this process; `status` must not show them as
        // current while no daemon runs.
        if let Err(e) = self.db.clear_alarms().await {
            tracing::warn!(error = %e, "could not clear the alarms");
        }
        self.db.close().await;
        tracing::info!("stopped");
    }
}

/// `12 active, 2 flagged, 0 pending, next due 2026-11-25T10:00:00Z`
pub fn status_line(stats: &KeyStats) -> String {
    let flagged: i64 = ["revoked", "expired", "invalid", "misconfigured"]
        .iter()
        .map(|s| stats.count(s))
        .sum();
    let next = stats.next_due.map_or_else(
        || "nothing due".to_owned(),
        |t| format!("next due {}", ingest::utc(t)),
    );
    format!(
        "{} active, {flagged} flagged, {} pending, {next}",
        stats.count("active"),
        stats.count("pending")
    )
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}
