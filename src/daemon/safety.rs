//! The daemon's two circuit-level protections, wired to their side effects: the outage breaker
//! per endpoint ([`crate::policy::breaker`]) and the false-revocation guard ([`crate::policy::guard`]). Each
//! state change is logged, recorded in `storekeyd_alarms` for `status`, and exposed as a metric.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Instant;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::policy::alarm::AlarmName;
use crate::policy::breaker::{Breaker, Permit, Transition};
use crate::policy::claims::Kind;
use crate::policy::fleet::{FleetAlarms, Shared};
use crate::policy::guard::{AlarmChange, Refusals, RevocationGuard, Verdict};
use crate::policy::outcome::Outcome;
use crate::remote::server_time::ServerTime;
use crate::storage::{ClearScope, Storage};

pub struct Safety {
    breakers: Mutex<HashMap<Kind, Breaker>>,
    guard: Mutex<RevocationGuard>,
    storage: Arc<dyn Storage>,
    alarm_tx: mpsc::UnboundedSender<AlarmRecord>,
    /// The guard orders refusals and renewals on the Store's time, which a step of the host clock
    /// does not move.
    time: Arc<ServerTime>,
    /// Whether state changes are written to `storekeyd_alarms`: the daemon's are; a one-shot CLI
    /// process's are not (they would outlive it, or clear the daemon's).
    record: AtomicBool,
    /// The certificate warnings raised, by application label.
    certificates: Mutex<HashMap<String, String>>,
    /// This process's alarms against the table every replica shares.
    fleet: Mutex<FleetAlarms>,
    /// This process's name in the table of replicas and as the owner of its alarms.
    replica: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn breaker_alarm(kind: Kind) -> AlarmName {
    AlarmName::Breaker(kind)
}

/// Credential alarms outlive the process (the guard takes them up again at start); the others
/// describe the process's own state.
fn credential_alarm(app: &str) -> AlarmName {
    AlarmName::Credential(app.to_owned())
}

impl Safety {
    /// Also starts the task that records alarm changes; it ends once the `Safety` is dropped
    /// and everything it was sent is written.
    pub fn new(
        config: &Config,
        storage: Arc<dyn Storage>,
        time: Arc<ServerTime>,
        replica: String,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let breakers = Kind::ALL
            .into_iter()
            .map(|k| (k, Breaker::new(config.breaker_policy())))
            .collect();
        let (alarm_tx, alarm_rx) = mpsc::unbounded_channel();
        let recorder = tokio::spawn(record_alarms(storage.clone(), alarm_rx, replica.clone()));
        let safety = Safety {
            breakers: Mutex::new(breakers),
            guard: Mutex::new(RevocationGuard::new(config.guard_policy())),
            storage,
            alarm_tx,
            time,
            record: AtomicBool::new(true),
            certificates: Mutex::default(),
            fleet: Mutex::default(),
            replica,
        };
        (safety, recorder)
    }

    /// For a CLI process: write no alarms, and honour the credential alarms the daemon raised.
    pub async fn adopt_daemon_alarms(&self) {
        self.record.store(false, Ordering::Relaxed);
        if let Err(e) = self.sync_fleet().await {
            tracing::warn!(error = %e, "could not read the daemon's alarms");
        }
    }

    /// This process's name among the replicas.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Looks at the alarms every process on the database shares: takes up the credential
    /// alarms others raised (they stand until a renewal begun after them succeeds), drops the
    /// ones another cleared on that evidence, and writes again what this process holds raised
    /// and the table lacks.
    pub async fn sync_fleet(&self) -> Result<(), crate::storage::DbError> {
        let table: Vec<Shared> = self
            .storage
            .alarms()
            .await?
            .into_iter()
            .map(|a| Shared {
                name: a.name,
                detail: a.detail,
                since: a.since,
            })
            .collect();
        let reconciled = lock(&self.fleet).reconcile(&table);
        {
            let mut guard = lock(&self.guard);
            for (app, since_ms) in &reconciled.adopted {
                tracing::warn!(
                    app,
                    "credential alarm raised earlier or by another replica: it stands until a renewal succeeds"
                );
                guard.raise(app, *since_ms);
            }
            for app in &reconciled.cleared {
                if guard.clear(app) {
                    tracing::warn!(
                        app,
                        "credential alarm cleared: another replica saw a renewal succeed"
                    );
                }
            }
        }
        for alarm in reconciled.rewrite {
            self.send(AlarmRecord {
                name: alarm.name,
                change: Recorded::Raised(alarm.detail),
                at: alarm.since,
            });
        }
        Ok(())
    }

    /// The probe `permit` granted was not sent after all: let another caller probe.
    pub fn abandon_probe(&self, kind: Kind) {
        if let Some(b) = lock(&self.breakers).get_mut(&kind) {
            b.abandon_probe();
        }
    }

    /// The kinds whose calls are held back now: the run loop claims none of their keys.
    pub fn paused_kinds(&self) -> Vec<Kind> {
        let now = Instant::now();
        let breakers = lock(&self.breakers);
        Kind::ALL
            .into_iter()
            .filter(|k| breakers.get(k).is_some_and(|b| b.paused(now)))
            .collect()
    }

    /// How long until the next probe may go out, if a breaker waits for one.
    pub fn next_probe_in(&self) -> Option<std::time::Duration> {
        let now = Instant::now();
        lock(&self.breakers)
            .values()
            .filter_map(|b| b.upcoming_probe(now))
            .map(|t| t.saturating_duration_since(now))
            .min()
    }

    /// Whether a renew call to `kind`'s endpoint may go out now.
    pub fn permit(&self, kind: Kind) -> Permit {
        lock(&self.breakers)
            .get_mut(&kind)
            .map_or(Permit::Call, |b| b.permit(Instant::now()))
    }

    /// Feeds one renew call's outcome to the endpoint's breaker.
    pub async fn observe(&self, kind: Kind, key_id: i64, outcome: &Outcome, probe: bool) {
        let transition = {
            let mut breakers = lock(&self.breakers);
            let Some(b) = breakers.get_mut(&kind) else {
                return;
            };
            match outcome {
                Outcome::Throttled { .. }
                | Outcome::Transient { .. }
                | Outcome::Unanswered { .. } => b.failure(Instant::now(), key_id, probe),
                // A probe that got nonsense has not shown the endpoint works.
                Outcome::Unexpected { .. } if probe => b.failure(Instant::now(), key_id, true),
                Outcome::Unexpected { .. } => None,
                Outcome::Renewed(_)
                | Outcome::AuthInvalid { .. }
                | Outcome::ClientIdMismatch { .. } => b.success(probe),
            }
        };
        match transition {
            Some(Transition::Opened) => {
                let detail = format!(
                    "the {kind} renew endpoint is failing for many different keys: renewals to it are paused and it is probed with one request at growing intervals"
                );
                tracing::error!(%kind, "outage breaker opened: {detail}");
                self.raise(&breaker_alarm(kind), &detail);
            }
            Some(Transition::Closed) => {
                tracing::warn!(%kind, "outage breaker closed: the endpoint answers again; renewals resume");
                self.clear(&breaker_alarm(kind), Clear::Anyone);
            }
            // Another replica's breaker alarm, and this one renews: the endpoint is back.
            None if matches!(outcome, Outcome::Renewed(_))
                && !self.open_here(kind)
                && lock(&self.fleet).shown(&breaker_alarm(kind)) =>
            {
                tracing::info!(%kind, "another replica's outage breaker alarm cleared: renewals to the endpoint succeed");
                self.clear(&breaker_alarm(kind), Clear::Anyone);
            }
            None => {}
        }
    }

    fn open_here(&self, kind: Kind) -> bool {
        lock(&self.breakers)
            .get(&kind)
            .is_some_and(Breaker::is_open)
    }

    /// A key of application `app` renewed by an attempt begun at `started_ms`.
    pub async fn renewed(&self, app: &str, started_ms: i64) {
        let change = lock(&self.guard).success(app, started_ms);
        if change == Some(AlarmChange::Cleared) {
            tracing::warn!(app, "credential alarm cleared: a renewal succeeded again");
            // Another replica may have raised it again since this renewal began.
            self.clear(&credential_alarm(app), Clear::RaisedBefore(started_ms));
        }
    }

    /// The applications to renew a canary key of now; each must be answered with
    /// [`Self::canary_found`].
    pub fn canaries_due(&self) -> Vec<String> {
        lock(&self.guard).canaries_due(self.time.now_ms())
    }

    pub async fn canary_found(&self, app: &str, found: bool) {
        if !found {
            tracing::info!(
                app,
                "no other healthy key of this application to renew as a canary"
            );
        }
        let change = lock(&self.guard).canary_found(app, found, self.time.now_ms());
        if change == Some(AlarmChange::Raised) {
            self.credential_alarm_raised(app).await;
        }
    }

    /// A canary's attempt is over, whatever it answered.
    pub fn canary_done(&self, app: &str) {
        lock(&self.guard).canary_done(app, self.time.now_ms());
    }

    /// A key of `app` refused twice with AuthenticationTokenInvalid: revoked, or is it us?
    /// `prior`: its earlier refusals; `canary`: it was renewed early to test the credential.
    pub async fn refused(
        &self,
        app: &str,
        key_id: i64,
        prior: Refusals,
        canary: bool,
        proven: bool,
    ) -> Verdict {
        let (verdict, change) =
            lock(&self.guard).refused(app, key_id, prior, canary, proven, self.time.now_ms());
        if change == Some(AlarmChange::Raised) {
            self.credential_alarm_raised(app).await;
        }
        verdict
    }

    async fn credential_alarm_raised(&self, app: &str) {
        let detail = format!(
            "the Store refuses keys of application {app} (AuthenticationTokenInvalid) while none renews (several at once, a canary, or every key it has): that is the credential or configuration, not revocations; no key is flagged revoked until a renewal succeeds again"
        );
        tracing::error!(app, "credential alarm: {detail}");
        self.raise(&credential_alarm(app), &detail);
    }

    /// An application's certificate expires soon (`warning`) or no longer does: logged once
    /// per change and shown by `status`.
    pub async fn certificate_expiry(&self, app: &str, warning: Option<&str>) {
        let changed = {
            let mut raised = lock(&self.certificates);
            match warning {
                Some(w) => raised.insert(app.to_owned(), w.to_owned()).as_deref() != Some(w),
                None => raised.remove(app).is_some(),
            }
        };
        if !changed {
            return;
        }
        match warning {
            Some(w) => tracing::warn!(app, "{w}"),
            None => tracing::info!(app, "the certificate no longer expires soon"),
        }
        self.own_alarm(&AlarmName::Certificate(app.to_owned()), warning);
    }

    /// The clock alarm raised (with what it says) or cleared, for `status`.
    pub async fn clock_alarm(&self, detail: Option<&str>) {
        self.own_alarm(&AlarmName::Clock, detail);
    }

    /// The kinds whose breaker is open, here or (at the last look) at another replica.
    pub fn open_breakers(&self) -> Vec<Kind> {
        let fleet = lock(&self.fleet);
        Kind::ALL
            .into_iter()
            .filter(|k| self.open_here(*k) || fleet.shown(&breaker_alarm(*k)))
            .collect()
    }

    /// The applications whose credential alarm is raised.
    pub fn credential_alarms(&self) -> Vec<String> {
        lock(&self.guard)
            .alarms()
            .into_iter()
            .map(|(app, _)| app)
            .collect()
    }

    /// Writes the alarm row, in the background and in order: an attempt that raised an alarm
    /// must not hold its renewed key back while the database is busy. A failure is logged,
    /// never fatal (the metric and the log line carry the same news).
    fn raise(&self, name: &AlarmName, detail: &str) {
        if !self.record.load(Ordering::Relaxed) {
            return;
        }
        let at = self.time.now();
        lock(&self.fleet).raised(Shared {
            name: name.clone(),
            detail: detail.to_owned(),
            since: at,
        });
        self.send(AlarmRecord {
            name: name.clone(),
            change: Recorded::Raised(detail.to_owned()),
            at,
        });
    }

    /// Clears the alarm row as [`Self::raise`] writes it, where `scope` allows.
    fn clear(&self, name: &AlarmName, scope: Clear) {
        if !self.record.load(Ordering::Relaxed) {
            return;
        }
        lock(&self.fleet).cleared(name);
        self.send(AlarmRecord {
            name: name.clone(),
            change: Recorded::Cleared(scope),
            at: self.time.now(),
        });
    }

    /// An alarm about this process alone: raised, or cleared if this process raised it last.
    fn own_alarm(&self, name: &AlarmName, detail: Option<&str>) {
        match detail {
            Some(detail) => self.raise(name, detail),
            None => self.clear(name, Clear::Own),
        }
    }

    fn send(&self, change: AlarmRecord) {
        if !self.record.load(Ordering::Relaxed) {
            return;
        }
        let name = change.name.clone();
        if self.alarm_tx.send(change).is_err() {
            tracing::warn!(
                alarm = ?name.to_string(),
                "could not record the alarm for `status`: the recorder stopped"
            );
        }
    }
}

/// One alarm raised (with its detail) or cleared.
struct AlarmRecord {
    name: AlarmName,
    change: Recorded,
    at: i64,
}

enum Recorded {
    Raised(String),
    Cleared(Clear),
}

/// Whose alarm row a clear deletes ([`ClearScope`], with this process as the owner).
#[derive(Debug, Clone, Copy)]
enum Clear {
    Anyone,
    Own,
    RaisedBefore(i64),
}

/// Writes alarm changes one after the other, as they came, as raised by `replica`.
async fn record_alarms(
    storage: Arc<dyn Storage>,
    mut rx: mpsc::UnboundedReceiver<AlarmRecord>,
    replica: String,
) {
    while let Some(c) = rx.recv().await {
        let result = match &c.change {
            Recorded::Raised(detail) => storage.set_alarm(&c.name, detail, c.at, &replica).await,
            Recorded::Cleared(clear) => {
                let scope = match *clear {
                    Clear::Anyone => ClearScope::Anyone,
                    Clear::Own => ClearScope::OwnedBy(&replica),
                    Clear::RaisedBefore(ms) => ClearScope::RaisedBefore(ms),
                };
                storage.clear_alarm(&c.name, scope).await
            }
        };
        if let Err(e) = result {
            tracing::warn!(alarm = ?c.name.to_string(), error = %e, "could not record the alarm for `status`");
        }
    }
}
