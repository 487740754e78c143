//! One attempt on one claimed key: ask (breaker permit, rate limit, token, renew call, the
//! fresh-token retry, the guard), decide ([`crate::policy::decision`]), and hand the write to the
//! writer. The loop, the CLI's `renew` and the demo all renew through [`Engine::attempt`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument as _;

use crate::clock::utc;
use crate::config::Config;
use crate::daemon::safety::Safety;
use crate::daemon::writer::{WriterGone, WriterHandle, Written};
use crate::policy::breaker::Permit;
use crate::policy::claims::{KeyText, Kind};
use crate::policy::decision::{self, Action, Answer, Attempt, Decision, Unanswered};
use crate::policy::outcome::Outcome;
use crate::policy::state::{EventKind, State};
use crate::remote::entra::{AccessToken, TokenClient, TokenStatus};
use crate::remote::ratelimit::RateLimiter;
use crate::remote::renew_api::{RenewClient, RenewResponse};
use crate::remote::server_time::ServerTime;
use crate::storage::{Change, ClaimedRow, Event, Write};
use crate::telemetry::metrics::Metrics;

/// What became of one claimed key; the loop, the CLI and the demo report these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Renewed,
    Retry,
    Flagged(State),
    /// Not attempted: the endpoint's outage breaker is open.
    Deferred,
    /// The backend replaced the key while we worked on it; our result was dropped.
    Superseded,
    /// The database stayed unwritable; a renewal waits in the spool, anything else is retried.
    Unwritten,
    /// Not sent: the claim's lease would have run out before the answer was written (the
    /// rate limit's queue was long). Nothing written; the loop hands the key back.
    LeaseShort,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("config: `endpoints.{kind}`: {message}")]
    Endpoint { kind: Kind, message: String },
}

/// Everything an attempt needs, built once.
pub struct Engine {
    config: Arc<Config>,
    tokens: TokenClient,
    api: RenewClient,
    limiter: RateLimiter,
    metrics: Arc<Metrics>,
    safety: Safety,
    writer: WriterHandle,
    endpoints: HashMap<Kind, reqwest::Url>,
    calls: Arc<Calls>,
    server_time: Arc<ServerTime>,
    /// Keys whose renew call went out in an attempt that has not finished: if the attempt is
    /// abandoned, the Store may have renewed the key.
    sent: std::sync::Mutex<std::collections::HashSet<i64>>,
}

/// Attempts waiting for Entra ID or the Store. An attempt leaves this count once it has its
/// answer, while its write may still wait for the writer: the concurrency limit is on calls, so
/// a slow commit never idles the connections to the Store.
#[derive(Debug)]
struct Calls {
    n: std::sync::atomic::AtomicUsize,
    answered: tokio::sync::Notify,
    /// The loop is woken once this few calls remain: a few slots are free to refill.
    wake_at: usize,
}

/// One attempt counted as calling, from before its task starts until its answer is in: taken
/// where the attempt is started, so attempts spawned and not yet running count too.
#[derive(Debug)]
pub struct CallPermit(Arc<Calls>);

impl Drop for CallPermit {
    fn drop(&mut self) {
        let before = self.0.n.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if before <= self.0.wake_at + 1 {
            self.0.answered.notify_one();
        }
    }
}

/// The parts of an engine built before the writer starts.
pub struct Parts {
    pub config: Arc<Config>,
    pub tokens: TokenClient,
    pub api: RenewClient,
    pub metrics: Arc<Metrics>,
    pub safety: Safety,
    pub server_time: Arc<ServerTime>,
}

/// What asking came to: an answer to decide on, or nothing to decide.
#[expect(
    clippy::large_enum_variant,
    reason = "one per attempt, returned once; boxing would allocate for every answer"
)]
enum Asked {
    Answered(Answer, Option<Call>),
    LeaseShort,
}

/// Why a renew call was not sent.
enum Unsent {
    Expired,
    LeaseShort,
}

impl From<Unsent> for Asked {
    fn from(unsent: Unsent) -> Asked {
        match unsent {
            Unsent::Expired => Asked::Answered(Answer::ExpiredUnsent, None),
            Unsent::LeaseShort => Asked::LeaseShort,
        }
    }
}

/// What a renew call answered, for the event row, and when it began (Unix milliseconds: the
/// guard orders renewals and refusals by it).
struct Call {
    response: RenewResponse,
    started_ms: i64,
}

impl Engine {
    pub fn new(parts: Parts, writer: WriterHandle) -> Result<Self, BuildError> {
        let mut endpoints = HashMap::new();
        for kind in Kind::ALL {
            let url = reqwest::Url::parse(parts.config.endpoint(kind)).map_err(|e| {
                BuildError::Endpoint {
                    kind,
                    message: e.to_string(),
                }
            })?;
            endpoints.insert(kind, url);
        }
        let concurrency = parts.config.renew.concurrency;
        Ok(Engine {
            limiter: RateLimiter::per_second(parts.config.renew.rate_limit),
            config: parts.config,
            tokens: parts.tokens,
            api: parts.api,
            metrics: parts.metrics,
            safety: parts.safety,
            writer,
            endpoints,
            server_time: parts.server_time,
            sent: std::sync::Mutex::new(std::collections::HashSet::new()),
            calls: Arc::new(Calls {
                n: std::sync::atomic::AtomicUsize::new(0),
                answered: tokio::sync::Notify::new(),
                wake_at: concurrency.saturating_sub((concurrency / 16).max(1)),
            }),
        })
    }

    /// Counts an attempt about to start as calling; hand it to [`Engine::attempt`].
    pub fn call_permit(&self) -> CallPermit {
        self.calls
            .n
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        CallPermit(self.calls.clone())
    }

    /// Whether an unfinished attempt on key `id` sent its renew call: abandoned, its key may
    /// have been renewed.
    pub fn sent(&self, id: i64) -> bool {
        crate::daemon::lock(&self.sent).contains(&id)
    }

    /// Attempts still waiting for an answer.
    pub fn calls_in_flight(&self) -> usize {
        self.calls.n.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Resolves when an attempt got its answer (or at once if one did since the last call).
    pub async fn call_answered(&self) {
        self.calls.answered.notified().await;
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn safety(&self) -> &Safety {
        &self.safety
    }

    /// From now on this process takes `1 / replicas` of the configured rate limit.
    pub fn share_rate(&self, replicas: u32) {
        self.limiter.share_with(replicas);
    }

    /// How many attempts may wait for the rate limit at once: more would still wait when
    /// their claim's lease leaves no time to send (see [`Self::send_by`]). Never fewer than one.
    pub fn calls_within_lease(&self) -> usize {
        let attempt = self.config.http.request_timeout.saturating_mul(4);
        let window = self.config.renew.lease.saturating_sub(attempt);
        self.limiter.calls_within(window).max(1)
    }

    /// The last moment a renew call for `row` may go out: the call and the write of its answer
    /// must land within the claim's lease, or another process may claim the key and renew it
    /// too.
    fn send_by(&self, row: &ClaimedRow) -> tokio::time::Instant {
        let left = u64::try_from(self.lease_left_to_send(row)).unwrap_or(0);
        tokio::time::Instant::now() + Duration::from_secs(left)
    }

    /// Seconds left of `row`'s lease for sending its call; zero or less: too late.
    fn lease_left_to_send(&self, row: &ClaimedRow) -> i64 {
        let needed = i64::try_from(self.needed_after_send().as_secs()).unwrap_or(i64::MAX);
        row.lease_until
            .saturating_sub(self.store_now())
            .saturating_sub(needed)
    }

    /// How long the process that may hold an unanswered attempt's answer is given to write it:
    /// two leases, so that one frozen past its lease has one more to wake in.
    fn answer_wait(&self) -> i64 {
        i64::try_from(self.config.renew.lease.as_secs())
            .unwrap_or(i64::MAX / 4)
            .saturating_mul(2)
    }

    /// The call itself, and as long again for its write.
    fn needed_after_send(&self) -> Duration {
        self.config.http.request_timeout.saturating_mul(2)
    }

    pub fn writer(&self) -> &WriterHandle {
        &self.writer
    }

    /// The host clock against the Store's and Entra's.
    pub fn server_time(&self) -> &ServerTime {
        &self.server_time
    }

    /// Now as the Store sees it (see [`ServerTime`]): what expiry is judged on.
    pub fn store_now(&self) -> i64 {
        self.server_time.now()
    }

    /// Each application's last token request: the label and how it went.
    pub fn credential_status(&self) -> Vec<TokenStatus> {
        self.tokens.status()
    }

    /// Requests a token for every application whose last request failed (or that has none),
    /// and re-reads every certificate.
    pub async fn warm_tokens(&self) {
        self.tokens.refresh_certificates();
        for status in self.tokens.status() {
            if !matches!(status.last, Some(Ok(()))) {
                let _ = self.tokens.token(&status.client_id).await;
            }
        }
    }

    /// Everything an attempt does up to the renew call, changing nothing: what would be sent
    /// where, or why the key would not be sent.
    pub async fn dry_run(&self, row: &ClaimedRow) -> Result<String, String> {
        let facts = &row.facts;
        if self.store_now() >= facts.expires_at {
            return Err(format!("the key expired at {}", utc(facts.expires_at)));
        }
        if !self.tokens.has_application(&facts.client_id) {
            return Err(format!(
                "no [[applications]] entry for clientId {}",
                facts.client_id
            ));
        }
        let token = self
            .tokens
            .token(&facts.client_id)
            .await
            .map_err(|e| e.to_string())?;
        Ok(format!(
            "POST key {} ({} key of clientId {}, expires {}) to {} with access token {}",
            row.key.fingerprint(),
            facts.kind,
            facts.client_id,
            utc(facts.expires_at),
            self.endpoint(facts.kind),
            token.fingerprint
        ))
    }

    /// Runs one attempt and waits until its result is durable. `permit` (from
    /// [`Engine::call_permit`]) is given back once the answer is in.
    pub async fn attempt(
        &self,
        row: ClaimedRow,
        permit: CallPermit,
    ) -> Result<Settled, WriterGone> {
        let span = tracing::info_span!("renew", row = row.id, key = %row.key.fingerprint(), kind = %row.facts.kind);
        // However the attempt ends (a panic included), its application may ask again.
        let _canary = row.canary.then(|| CanaryDone {
            safety: &self.safety,
            app: row.facts.client_id.clone(),
        });
        let id = row.id;
        let settled = self.run(row, permit).instrument(span).await;
        // Not reached if the attempt is aborted: then `sent` still says so.
        crate::daemon::lock(&self.sent).remove(&id);
        settled
    }

    async fn run(&self, row: ClaimedRow, permit: CallPermit) -> Result<Settled, WriterGone> {
        let (answer, call) = match self.ask(&row).await? {
            Asked::Answered(answer, call) => (answer, call),
            Asked::LeaseShort => {
                tracing::warn!(
                    "the claim's lease would run out before an answer could be written; the renew call is not sent, and the key is due again when the lease ends"
                );
                return Ok(Settled::LeaseShort);
            }
        };
        drop(permit);
        let decision = decision::decide(&Attempt {
            facts: &row.facts,
            attempts: row.attempts,
            answer,
            now: self.store_now(),
            policy: &self.config.policy(),
            draw: fastrand::f64(),
            unanswered: row.unanswered_at.map(|since| Unanswered {
                since,
                until: since.saturating_add(self.answer_wait()),
            }),
        });
        self.apply(&row, decision, call).await
    }

    /// Everything up to the decision: what the breaker, Entra ID, the Store and the guard said.
    async fn ask(&self, row: &ClaimedRow) -> Result<Asked, WriterGone> {
        let facts = &row.facts;
        // Judged on the Store's time; before any answer told it, only after the token request.
        let expired = || self.store_now() >= facts.expires_at;
        if self.server_time.known() && expired() {
            return Ok(Asked::Answered(Answer::ExpiredUnsent, None));
        }
        if !self.tokens.has_application(&facts.client_id) {
            return Ok(Asked::Answered(Answer::NoApplication, None));
        }
        let permit = self.safety.permit(facts.kind);
        if let Permit::Wait(until) = permit {
            let wait = until.saturating_duration_since(std::time::Instant::now());
            let until = self.store_now() + i64::try_from(wait.as_secs()).unwrap_or(i64::MAX / 2);
            return Ok(Asked::Answered(Answer::Paused { until }, None));
        }
        // A granted probe that is never sent must be handed back, whatever the exit.
        let mut probe = ProbeTicket {
            safety: &self.safety,
            kind: facts.kind,
            armed: permit == Permit::Probe,
        };
        if !self.limiter.acquire_by(self.send_by(row)).await {
            return Ok(Asked::LeaseShort);
        }
        let token = match self.tokens.token(&facts.client_id).await {
            Ok(t) => t,
            Err(e) => return Ok(Asked::Answered(token_failed(&e), None)),
        };
        if expired() {
            return Ok(Asked::Answered(Answer::ExpiredUnsent, None));
        }
        let first = match self.call(row, &token).await {
            Ok(call) => call,
            Err(unsent) => return Ok(unsent.into()),
        };
        let was_probe = std::mem::take(&mut probe.armed);
        self.safety
            .observe(facts.kind, row.id, &first.response.outcome, was_probe)
            .await;
        if !matches!(first.response.outcome, Outcome::AuthInvalid { .. }) {
            return Ok(answered(first));
        }
        // First suspect ourselves: the Store cannot tell a bad ticket from a revoked key.
        let mut event = self.event(row, EventKind::AuthInvalid, &first.response);
        event.detail = Some("retrying with a fresh access token".to_owned());
        self.writer.send(Write::Event(event)).await?;
        self.metrics.renewals.inc(EventKind::AuthInvalid.as_str());
        let fresh = match self.tokens.fresh_token(&facts.client_id, &token).await {
            Ok(t) => t,
            Err(e) => return Ok(Asked::Answered(token_failed(&e), None)),
        };
        // The second call is a call like any other: it waits for its turn. (If the lease runs
        // short meanwhile, the refusal is asked again at the next claim.)
        if !self.limiter.acquire_by(self.send_by(row)).await {
            return Ok(Asked::LeaseShort);
        }
        let second = match self.call(row, &fresh).await {
            Ok(call) => call,
            Err(unsent) => return Ok(unsent.into()),
        };
        self.safety
            .observe(facts.kind, row.id, &second.response.outcome, false)
            .await;
        let Outcome::AuthInvalid { detail } = &second.response.outcome else {
            return Ok(answered(second));
        };
        let verdict = self
            .safety
            .refused(
                &facts.client_id,
                row.id,
                row.refusals,
                row.canary,
                // A key another attempt may have renewed is refused for that alone: no
                // evidence against our credential.
                row.proven && row.unanswered_at.is_none(),
            )
            .await;
        let answer = Answer::Refused {
            detail: detail.clone(),
            verdict,
        };
        Ok(Asked::Answered(answer, Some(second)))
    }

    /// The renew call, unless the key has expired by now (waiting for the rate limiter or a
    /// token takes time): an expired key is never sent. Nor is one whose lease would run out
    /// before the answer is written: another process may claim it then, and renew it too.
    async fn call(&self, row: &ClaimedRow, token: &AccessToken) -> Result<Call, Unsent> {
        let now = self.store_now();
        if now >= row.facts.expires_at {
            return Err(Unsent::Expired);
        }
        if self.lease_left_to_send(row) <= 0 {
            return Err(Unsent::LeaseShort);
        }
        // Every time the daemon writes is on the Store's timeline, like the schedule.
        let started_ms = self.server_time.now_ms();
        crate::daemon::lock(&self.sent).insert(row.id);
        let sent_at = std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(u64::try_from(started_ms).unwrap_or(0));
        let resp = self
            .api
            .renew(self.endpoint(row.facts.kind), token, &row.key, sent_at)
            .await;
        let millis = u64::try_from(resp.duration_ms).unwrap_or(0);
        self.metrics
            .renew_latency
            .observe(std::time::Duration::from_millis(millis));
        Ok(Call {
            response: resp,
            started_ms,
        })
    }

    fn endpoint(&self, kind: Kind) -> &reqwest::Url {
        // Both kinds were parsed from the config in `new`.
        &self.endpoints[&kind]
    }

    /// Turns the decision into a write, waits for it, and reports.
    async fn apply(
        &self,
        row: &ClaimedRow,
        decision: Decision,
        call: Option<Call>,
    ) -> Result<Settled, WriterGone> {
        let now = self.store_now();
        let mut event = match &call {
            Some(c) => self.event(row, decision.event, &c.response),
            None => Event::new(row.id, now, decision.event),
        };
        event.key_fp = Some(row.key.fingerprint().to_string());
        event.detail = (!decision.detail.is_empty()).then(|| decision.detail.clone());
        let now_ms = self.server_time.now_ms();
        let started_ms = call.as_ref().map_or(now_ms, |c| c.started_ms);
        let (change, settled) = change(&decision.action, now_ms, started_ms);
        let event = (decision.event != EventKind::Deferred).then_some(event);
        let written = self
            .writer
            .write(Write::Row {
                id: row.id,
                expected: row.key.clone(),
                at: now,
                change,
                event,
            })
            .await?;
        Ok(self
            .report(&decision, settled, written, call.as_ref())
            .await)
    }

    async fn report(
        &self,
        decision: &Decision,
        settled: Settled,
        written: Written,
        call: Option<&Call>,
    ) -> Settled {
        match written {
            Written::Applied => {}
            Written::Superseded => {
                self.metrics.renewals.inc(EventKind::Superseded.as_str());
                tracing::info!("key was replaced by the backend during renewal; result dropped");
                return Settled::Superseded;
            }
            Written::Spooled | Written::Dropped => return Settled::Unwritten,
        }
        if settled != Settled::Deferred {
            self.metrics.renewals.inc(decision.event.as_str());
        }
        match &decision.action {
            Action::Renew { key, claims, .. } => {
                if let Some(call) = call {
                    self.safety
                        .renewed(&claims.client_id, call.started_ms)
                        .await;
                }
                // On the Store's time, like the expiry gauge: `time() -` it must not be masked
                // by a host clock that runs ahead.
                self.metrics
                    .last_success
                    .store(self.server_time.now(), std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(new_key = %key.fingerprint(), "renewed");
            }
            Action::Retry { .. } => {
                tracing::info!(
                    outcome = decision.event.as_str(),
                    "{}; will retry",
                    decision.detail
                );
            }
            Action::Flag { state, reason } => {
                tracing::warn!(state = state.as_str(), reason, "key flagged");
            }
            Action::Defer { .. } => {}
        }
        settled
    }

    fn event(&self, row: &ClaimedRow, kind: EventKind, resp: &RenewResponse) -> Event {
        Event {
            key_id: row.id,
            // When the call was made, not when it came back.
            at: resp.started_at,
            kind,
            key_fp: Some(row.key.fingerprint().to_string()),
            http_status: resp.status,
            error_code: resp.error_code.clone(),
            detail: None,
            correlation_id: resp.ms.correlation_id.clone(),
            request_id: resp.ms.request_id.clone(),
            cv: resp.ms.cv.clone(),
            duration_ms: Some(resp.duration_ms),
        }
    }
}

/// `started_ms`: when the call went out, which an unanswered attempt's mark records.
fn change(action: &Action, now_ms: i64, started_ms: i64) -> (Change, Settled) {
    match action {
        Action::Renew {
            key,
            claims,
            next_at,
        } => (
            Change::Renew {
                key: KeyText::clone(key),
                facts: claims.facts(),
                next_at: *next_at,
            },
            Settled::Renewed,
        ),
        Action::Retry {
            at,
            reason,
            refused,
            unanswered,
        } => (
            Change::Retry {
                at: *at,
                reason: reason.clone(),
                refused_ms: refused.then_some(now_ms),
                unanswered_at: unanswered.then_some(started_ms.div_euclid(1000)),
            },
            Settled::Retry,
        ),
        Action::Flag { state, reason } => (
            Change::Flag {
                state: *state,
                reason: reason.clone(),
            },
            Settled::Flagged(*state),
        ),
        Action::Defer { at } => (Change::Defer { at: *at }, Settled::Deferred),
    }
}

fn answered(call: Call) -> Asked {
    let answer = Answer::Answered {
        outcome: call.response.outcome.clone(),
        error_code: call.response.error_code.clone(),
    };
    Asked::Answered(answer, Some(call))
}

fn token_failed(e: &impl std::fmt::Display) -> Answer {
    Answer::TokenFailed {
        detail: e.to_string(),
    }
}

/// A canary's attempt: reported over when dropped.
struct CanaryDone<'a> {
    safety: &'a Safety,
    app: String,
}

impl Drop for CanaryDone<'_> {
    fn drop(&mut self) {
        self.safety.canary_done(&self.app);
    }
}

/// A probe granted by the breaker; handed back on drop unless its answer was observed.
struct ProbeTicket<'a> {
    safety: &'a Safety,
    kind: Kind,
    armed: bool,
}

impl Drop for ProbeTicket<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.safety.abandon_probe(self.kind);
        }
    }
}
