//! One attempt on one claimed key: ask (breaker permit, rate limit, token, renew call, the
//! fresh-token retry, the guard), decide ([`crate::policy::decision`]), and hand the write to the
//! writer. The loop, the CLI's `renew` and the demo all renew through [`Engine::attempt`].

mod ask;
mod record;

use ask::{Asked, Call};

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
