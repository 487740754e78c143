//! The run loop: ingest new keys, claim due ones, renew them with bounded concurrency, sleep
//! until the next is due, and on shutdown drain in-flight attempts and unwritten results.

mod slots;
mod upkeep;
mod wake;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::slots::Slots;
use self::upkeep::{Upkeep, observe_task, warm_tokens};
use self::wake::Wake;
use super::attempt::Engine;
use super::{DaemonError, Service, fleet, ingest, secs, status_line};
use crate::clock::Clock;
use crate::config::Config;
use crate::policy::claims::Kind;
use crate::storage::Storage;
use crate::telemetry::health::Health;
use crate::telemetry::notify::Notifier;
use crate::telemetry::observe::Observer;

/// How often the systemd STATUS line is recomputed.
const STATUS_EVERY: Duration = Duration::from_secs(60);
/// The loop wakes at least this often, whatever the poll interval says.
const LONGEST_SLEEP: Duration = Duration::from_secs(86_400);
/// The shortest sleep a failed look's backoff asks of the loop.
const MIN_RETRY_SLEEP: Duration = Duration::from_millis(100);

/// Runs until `shutdown` is cancelled, then lets in-flight renewals finish within
/// `renew.shutdown_grace`, writes (or spools) every result the Store gave, and hands back the
/// keys whose attempt did not finish. `listener`, if given, serves `/metrics`, `/healthz` and
/// `/readyz`.
pub async fn run(
    config: Arc<Config>,
    storage: Arc<dyn Storage>,
    clock: Clock,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    super::recover(&config, &*storage, &clock, &shutdown).await?;
    let stale_after = config.renew.poll_interval.saturating_mul(2) + Duration::from_secs(30);
    let health = Arc::new(Health::new(stale_after));
    health.beat();
    let service = Service::start(
        config.clone(),
        storage.clone(),
        clock.clone(),
        health.clone(),
        shutdown.clone(),
    )?;
    let engine = service.engine.clone();
    // Before any claim: this replica's share of the rate limit, and the alarms the others (or
    // the last run) raised.
    if let Err(e) = fleet::beat(&engine, &*storage).await {
        tracing::warn!(error = %e, "could not register with the other replicas or read their alarms");
    }
    let background = CancellationToken::new();
    let mut helpers = JoinSet::new();
    if let Some(listener) = listener {
        let addr = listener.local_addr().ok();
        let observer = Observer::new(engine.clone(), storage.clone(), health.clone());
        helpers.spawn(observe_task(listener, observer, background.clone()));
        tracing::info!(?addr, "serving /metrics, /healthz and /readyz");
    }
    helpers.spawn(fleet::heartbeats(
        engine.clone(),
        storage.clone(),
        background.clone(),
    ));
    helpers.spawn(warm_tokens(
        engine.clone(),
        config.entra.certificate_expiry_warning,
        background.clone(),
    ));
    let notifier = Notifier::from_env();
    notifier.ready();
    tracing::info!(
        applications = config.applications.len(),
        "storekeyd running"
    );
    let checker_parts = ingest::CheckerParts {
        storage: storage.clone(),
        writer: engine.writer().clone(),
        config: config.clone(),
    };
    let mut lp = Loop {
        slots: Slots::new(engine.clone(), config.clone()),
        engine,
        config,
        storage: storage.clone(),
        health,
        notifier,
        clock_alarm: None,
        wake: storage.wakeups(),
        awaiting_time: false,
        checker: ingest::Checker::default(),
        checker_parts,
        last_status: None,
        upkeep: Upkeep::new(),
    };
    lp.run_until(&shutdown).await;
    lp.notifier.stopping();
    service.stopping();
    lp.drain().await;
    drop(lp);
    background.cancel();
    while helpers.join_next().await.is_some() {}
    let replica = service.engine.safety().replica().to_owned();
    service.close().await;
    // The conditions behind this process's other alarms lived in it; `status` must not show
    // them as current once it is gone. A credential alarm stands until a renewal proves it
    // wrong; the other replicas' alarms are theirs.
    if let Err(e) = storage.leave(&replica).await {
        tracing::warn!(error = %e, "could not clear this process's alarms");
    }
    storage.close().await;
    tracing::info!("stopped");
    Ok(())
}

struct Loop {
    engine: Arc<Engine>,
    config: Arc<Config>,
    storage: Arc<dyn Storage>,
    health: Arc<Health>,
    notifier: Notifier,
    last_status: Option<Instant>,
    /// Claimed keys waiting for a call slot, and the attempts under way.
    slots: Slots,
    /// Pruning and orphaned spools, at the end of a full pass.
    upkeep: Upkeep,
    /// The offset the recorded clock alarm states, while one is recorded.
    clock_alarm: Option<i64>,
    /// Signalled when a backend wrote a key, where the database says so (PostgreSQL).
    wake: Option<Arc<Notify>>,
    /// The last pass found no answer had told the Store's time yet: the first one wakes the loop.
    awaiting_time: bool,
    /// The looks for new keys, beside the renewals.
    checker: ingest::Checker,
    checker_parts: ingest::CheckerParts,
}

impl Loop {
    async fn run_until(&mut self, shutdown: &CancellationToken) {
        let mut full_pass = true;
        // A pass sets when the next one is due; what wakes the loop in between leaves it.
        let mut deadline = tokio::time::Instant::now();
        while !shutdown.is_cancelled() {
            if full_pass {
                // Not cut short by a stop: a claim's rows must reach the queue to be handed back.
                // (A pass waits on a locked database for at most the busy timeout.)
                let wait = match self.pass().await {
                    Ok(wait) => wait,
                    Err(e) => {
                        // A locked, read-only or full database: say so, and try again after a
                        // poll.
                        tracing::error!(error = %e, "cycle failed; retrying after the poll interval");
                        if let DaemonError::Db(e) = &e {
                            self.health.db_failed(e);
                        }
                        self.config.renew.poll_interval
                    }
                };
                self.health.beat();
                self.notifier.pet();
                self.update_status().await;
                let wait = self.notifier.max_sleep().map_or(wait, |max| wait.min(max));
                // Bounded: an Instant overflows where a sleep would not (a poll of centuries).
                deadline = tokio::time::Instant::now() + wait.min(LONGEST_SLEEP);
            } else {
                // Slots freed up: refill them from the keys already claimed, no query needed.
                self.slots.start_ready();
            }
            // The first STATUS waits for the first look for new keys, which then makes a pass.
            let status_waits =
                self.notifier.enabled() && self.last_status.is_none() && !self.checker.ended_once();
            // A look that failed is tried again after its backoff, whatever woke the loop in
            // between. Not at once: a pass does not always start a look.
            let wake_at = self.checker.retry_in().map_or(deadline, |retry| {
                deadline.min(tokio::time::Instant::now() + retry.max(MIN_RETRY_SLEEP))
            });
            full_pass = match self.next_wake(shutdown, wake_at).await {
                Wake::Stop => break,
                Wake::Finished(joined) => {
                    self.slots.finished(joined);
                    self.slots.reap();
                    true
                }
                Wake::Answered => {
                    self.slots.reap();
                    self.slots.low()
                }
                Wake::Deadline | Wake::TimeLearned => true,
                Wake::Signalled => {
                    self.checker.signalled();
                    // A look under way cannot start another; its end makes the pass (after a
                    // backoff, if it failed).
                    !self.checker.running()
                }
                // Keys it accepted may be due, and a full batch or a key announced meanwhile
                // means another look; a look that found nothing needs no pass (on SQLite every
                // pass looks), unless the STATUS line waits for it. After a failure the pass
                // that looks again comes after a backoff.
                Wake::Looked(Ok(looked)) => looked.found > 0 || looked.again || status_waits,
                Wake::Looked(Err(failed)) => {
                    self.look_failed(failed.error, failed.retry_in);
                    status_waits
                }
            };
        }
    }

    /// Reports a look for new keys that failed.
    fn look_failed(&self, error: Option<DaemonError>, retry_in: Duration) {
        let Some(e) = error else { return };
        tracing::error!(error = %e, ?retry_in, "could not check new keys; will try again");
        if let DaemonError::Db(e) = &e {
            self.health.db_failed(e);
        }
    }

    /// One pass; returns how long to sleep before the next.
    async fn pass(&mut self) -> Result<Duration, DaemonError> {
        self.awaiting_time =
            !self.engine.server_time().known() && !self.config.applications.is_empty();
        if self.awaiting_time {
            // No answer from Entra or the Store yet (the start asks Entra for tokens): the
            // host's clock alone must neither expire nor schedule anything. The first answer
            // wakes the loop (`ServerTime::learned`); the poll is the fallback.
            return Ok(self.config.renew.poll_interval);
        }
        // Due times, leases and expiry are judged on the Store's time: a jump of the host clock
        // neither makes every key due nor expires any.
        let now = self.engine.store_now();
        let config = self.config.clone();
        let renew = &config.renew;
        let (batch, poll, concurrency) = (
            renew.batch_size,
            renew.poll_interval,
            self.slots.concurrency(),
        );
        self.sync_clock_alarm().await;
        self.checker
            .start(&self.checker_parts, now, self.wake.is_some());
        // An endpoint whose breaker holds calls back gets no claims: its keys stay put until
        // the probe time instead of being claimed and deferred over and over.
        let paused = self.engine.safety().paused_kinds();
        let kinds: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| !paused.contains(k))
            .collect();
        let lease_until = now + secs(renew.lease);
        self.claim_canaries(now, lease_until).await;
        self.slots.start_ready();
        let mut full_claim = false;
        // Claimed keys wait in the queue for a free slot, so a slot is refilled the moment an
        // answer comes, not after a claim's commit. The queue is topped up when it runs low.
        if self.slots.low() {
            let want = concurrency + self.slots.free();
            let limit = u32::try_from(want.saturating_sub(self.slots.waiting()).max(1))
                .unwrap_or(u32::MAX)
                .min(batch);
            let rows = self
                .storage
                .claim_due(now, lease_until, limit, &kinds)
                .await?;
            full_claim = rows.len() == limit as usize;
            for row in rows {
                self.slots.queue(row);
            }
            self.slots.start_ready();
        }
        self.slots.hand_back(&*self.storage).await;
        self.upkeep.prune(&*self.storage, &config, now).await?;
        self.upkeep
            .adopt_orphan_spools(&*self.storage, &config)
            .await;
        self.engine
            .metrics()
            .in_flight
            .store(self.slots.attempts() as i64, Ordering::Relaxed);
        // A full claim may have left due keys behind. (A look that found a full batch wakes
        // the loop itself when it ends.)
        if full_claim && self.slots.low() {
            return Ok(Duration::ZERO);
        }
        if self.slots.waiting() > 0 || self.slots.free() == 0 {
            // An answer wakes the loop.
            return Ok(poll);
        }
        let until_due = match self.storage.next_due(&kinds).await? {
            Some(due) if due <= now => Duration::ZERO,
            Some(due) => Duration::from_secs(u64::try_from(due - now).unwrap_or(0)).min(poll),
            None => poll,
        };
        // Wake for the next probe of a paused endpoint too.
        let until_probe = self.engine.safety().next_probe_in().unwrap_or(poll);
        Ok(until_due.min(until_probe.max(Duration::from_millis(100))))
    }

    /// Claims a canary for each application whose guard wants evidence that its credential
    /// works; they go first.
    async fn claim_canaries(&mut self, now: i64, lease_until: i64) {
        let safety = self.engine.safety();
        let issued_before = now - secs(self.config.guard.canary_min_age);
        for app in safety.canaries_due() {
            match self
                .storage
                .claim_canary(&app, issued_before, now, lease_until)
                .await
            {
                Ok(Some(row)) => {
                    tracing::info!(app, row = row.id, key = %row.key.fingerprint(), "renewing a key early as a canary: is the credential working?");
                    safety.canary_found(&app, true).await;
                    self.slots.queue_first(row);
                }
                Ok(None) => safety.canary_found(&app, false).await,
                Err(crate::storage::DbError::Held) => {
                    // Healthy keys exist, but attempts hold each (renewing them, perhaps): ask
                    // again at the next canary interval.
                    safety.canary_found(&app, true).await;
                    safety.canary_done(&app);
                }
                Err(e) => {
                    tracing::warn!(app, error = %e, "could not claim a canary; will try again");
                    // Not a sign that there is no other key: only a search says that.
                    safety.canary_found(&app, true).await;
                    safety.canary_done(&app);
                }
            }
        }
    }

    /// Records the clock alarm for `status` when it is raised or cleared, and again once the
    /// offset moved by more than the bound: `status`, in another process, judges time by the
    /// offset the alarm states, as closely as it judges it on the host clock with no alarm.
    async fn sync_clock_alarm(&mut self) {
        let time = self.engine.server_time();
        let offset = time.alarm_offset();
        let bound = self.config.http.max_clock_offset.as_secs();
        let restate = match (offset, self.clock_alarm) {
            (Some(now), Some(stated)) => now.abs_diff(stated) > bound,
            (now, stated) => now.is_some() != stated.is_some(),
        };
        if restate {
            self.clock_alarm = offset;
            let detail = offset.map(|o| time.describe(o));
            self.engine.safety().clock_alarm(detail.as_deref()).await;
        }
    }

    /// A one-line STATUS for `systemctl status`, refreshed at most once a minute (it counts keys).
    async fn update_status(&mut self) {
        if !self.notifier.enabled()
            || !self.engine.server_time().known()
            || !self.checker.ended_once()
            || self.last_status.is_some_and(|t| t.elapsed() < STATUS_EVERY)
        {
            return;
        }
        self.last_status = Some(Instant::now());
        match self.storage.key_stats(self.engine.store_now()).await {
            Ok(stats) => self.notifier.status(&status_line(&stats)),
            Err(e) => self.notifier.status(&format!("database error: {e}")),
        }
    }

    /// Stop claiming: abandon the look under way, let in-flight attempts finish within the
    /// grace period, and give the other keys back.
    async fn drain(&mut self) {
        self.checker.stop();
        self.slots.drain(&*self.storage).await;
    }
}
