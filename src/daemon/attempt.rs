//! One attempt on one claimed key: token, renew call, the fresh-token retry, and the write-back.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::Instrument as _;

use crate::clock::Clock;
use crate::config::Config;
use crate::daemon::ingest::utc;
use crate::daemon::safety::Safety;
use crate::ops::metrics::Metrics;
use crate::policy::breaker::Permit;
use crate::policy::claims::{self, Claims, KeyText, Kind};
use crate::policy::guard::Verdict;
use crate::policy::outcome::{self, Outcome};
use crate::policy::schedule::{self, Retry};
use crate::remote::entra::{AccessToken, TokenClient};
use crate::remote::ratelimit::RateLimiter;
use crate::remote::renew_api::{RenewClient, RenewResponse};
use crate::storage::sqlite::{Activation, ClaimedRow, Db, DbError, Event, State};

/// What became of one claimed key; the loop and the demo report these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Renewed,
    Retry,
    Flagged(State),
    /// Not attempted: the endpoint's outage breaker is open.
    Deferred,
    /// The backend replaced the key while we worked on it; our result was dropped.
    Superseded,
}

pub struct Renewer {
    pub db: Db,
    pub config: Arc<Config>,
    pub tokens: TokenClient,
    pub api: RenewClient,
    pub limiter: RateLimiter,
    pub clock: Clock,
    pub metrics: Arc<Metrics>,
    pub safety: Safety,
    endpoints: HashMap<Kind, reqwest::Url>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("config: `endpoints.{kind}`: {message}")]
    Endpoint { kind: Kind, message: String },
}

impl Renewer {
    pub fn new(
        db: Db,
        config: Arc<Config>,
        tokens: TokenClient,
        api: RenewClient,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BuildError> {
        let mut endpoints = HashMap::new();
        for kind in Kind::ALL {
            let url =
                reqwest::Url::parse(config.endpoint(kind)).map_err(|e| BuildError::Endpoint {
                    kind,
                    message: e.to_string(),
                })?;
            endpoints.insert(kind, url);
        }
        let limiter = RateLimiter::per_second(config.renew.rate_limit);
        let safety = Safety::new(&config, db.clone(), clock.clone());
        Ok(Renewer {
            safety,
            db,
            config,
            tokens,
            api,
            limiter,
            clock,
            metrics,
            endpoints,
        })
    }

    /// Everything an attempt does up to the renew call, changing nothing: says what would be
    /// sent where, or why the key would not be sent.
    pub async fn dry_run(&self, row: &ClaimedRow) -> Result<String, String> {
        let claims =
            claims::decode(row.key.expose()).map_err(|e| format!("not a Store ID key: {e}"))?;
        if self.clock.now() >= claims.expires_at {
            return Err(format!("the key expired at {}", utc(claims.expires_at)));
        }
        if !self.tokens.has_application(&claims.client_id) {
            return Err(format!(
                "no [[applications]] entry for clientId {}",
                claims.client_id
            ));
        }
        let token = self
            .tokens
            .token(&claims.client_id)
            .await
            .map_err(|e| e.to_string())?;
        Ok(format!(
            "POST key {} ({} key of clientId {}, expires {}) to {} with access token {}",
            row.key.fingerprint(),
            claims.kind,
            claims.client_id,
            utc(claims.expires_at),
            self.endpoints[&claims.kind],
            token.fingerprint
        ))
    }

    /// Runs one attempt and writes its result. Only database errors come back as errors: every
    /// remote failure is an outcome recorded on the row.
    pub async fn renew(&self, row: ClaimedRow) -> Result<Settled, DbError> {
        let span = tracing::info_span!("renew", row = row.id, key = %row.key.fingerprint(), kind = tracing::field::Empty);
        self.renew_inner(row).instrument(span).await
    }

    async fn renew_inner(&self, row: ClaimedRow) -> Result<Settled, DbError> {
        let claims = match claims::decode(row.key.expose()) {
            Ok(c) => c,
            Err(e) => {
                return self
                    .flag(
                        &row,
                        State::Invalid,
                        &format!("not a Store ID key: {e}"),
                        Event::default(),
                    )
                    .await;
            }
        };
        tracing::Span::current().record("kind", claims.kind.as_str());
        if self.clock.now() >= claims.expires_at {
            return self.flag_expired(&row, &claims, Event::default()).await;
        }
        if !self.tokens.has_application(&claims.client_id) {
            let reason = format!(
                "no [[applications]] entry for clientId {}; add one to renew this key",
                claims.client_id
            );
            return self
                .flag(&row, State::Misconfigured, &reason, Event::default())
                .await;
        }
        let permit = self.safety.permit(claims.kind);
        if let Permit::Wait(until) = permit {
            return self.defer(&row, until).await;
        }
        // A granted probe that is never sent must be handed back, whatever the exit.
        let mut probe = ProbeTicket {
            safety: &self.safety,
            kind: claims.kind,
            armed: permit == Permit::Probe,
        };
        self.limiter.acquire().await;
        let token = match self.tokens.token(&claims.client_id).await {
            Ok(t) => t,
            Err(e) => {
                return self
                    .retry(&row, &claims, None, &e.to_string(), token_event())
                    .await;
            }
        };
        let Some(mut resp) = self.call(&claims, &token, &row.key).await else {
            return self.flag_expired(&row, &claims, Event::default()).await;
        };
        let was_probe = probe.armed;
        probe.armed = false;
        self.safety
            .observe(claims.kind, row.id, &resp.outcome, was_probe)
            .await;
        if let Outcome::AuthInvalid { .. } = resp.outcome {
            // First suspect ourselves: the Store cannot tell a bad ticket from a revoked key.
            self.db
                .record_event(&self.event(&row, &resp, "retrying with a fresh access token"))
                .await?;
            self.metrics.renewals.inc("auth_invalid");
            let fresh = match self.tokens.fresh_token(&claims.client_id, &token).await {
                Ok(t) => t,
                Err(e) => {
                    return self
                        .retry(&row, &claims, None, &e.to_string(), token_event())
                        .await;
                }
            };
            // The second call is a call like any other: it waits for its turn.
            self.limiter.acquire().await;
            let Some(second) = self.call(&claims, &fresh, &row.key).await else {
                return self.flag_expired(&row, &claims, Event::default()).await;
            };
            self.safety
                .observe(claims.kind, row.id, &second.outcome, false)
                .await;
            resp = second;
        }
        self.settle(&row, &claims, resp).await
    }

    /// The renew call, unless the key has expired by now (waiting for the rate limiter or a
    /// token takes time): an expired key is never sent.
    async fn call(
        &self,
        claims: &Claims,
        token: &AccessToken,
        key: &KeyText,
    ) -> Option<RenewResponse> {
        let now = self.clock.now();
        if now >= claims.expires_at {
            return None;
        }
        // The endpoints map holds both kinds, built from the config in `new`.
        let endpoint = &self.endpoints[&claims.kind];
        let sent_at =
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(now).unwrap_or(0));
        let resp = self.api.renew(endpoint, token, key, sent_at).await;
        let millis = u64::try_from(resp.duration_ms).unwrap_or(0);
        self.metrics
            .renew_latency
            .observe(std::time::Duration::from_millis(millis));
        Some(resp)
    }

    async fn settle(
        &self,
        row: &ClaimedRow,
        claims: &Claims,
        resp: RenewResponse,
    ) -> Result<Settled, DbError> {
        let retry_after = match &resp.outcome {
            Outcome::Throttled { retry_after } => *retry_after,
            _ => None,
        };
        match resp.outcome.clone() {
            Outcome::Renewed(new_key) => match outcome::check_renewed(claims, &new_key) {
                Ok(new_claims) => self.write_renewed(row, &new_key, &new_claims, &resp).await,
                Err(rejected) => {
                    let mut event = self.event(row, &resp, &rejected.to_string());
                    event.outcome = "unexpected";
                    self.retry(row, claims, None, &rejected.to_string(), event)
                        .await
                }
            },
            Outcome::AuthInvalid { detail } => {
                match self
                    .safety
                    .refused(&claims.client_id, row.id, row.refusals)
                    .await
                {
                    Verdict::Revoked => {
                        let reason = "the Store refused the key (AuthenticationTokenInvalid), also with a freshly minted access token, and nothing points at our credential: it is revoked or no longer renewable; the client must mint a new key";
                        let mut event = self.event(row, &resp, &detail);
                        event.outcome = "revoked";
                        self.flag(row, State::Revoked, reason, event).await
                    }
                    Verdict::Defer(why) => {
                        let event = self.event(row, &resp, why);
                        let refused = why != crate::policy::guard::ALARM;
                        self.retry_with(row, claims, None, why, event, refused)
                            .await
                    }
                }
            }
            Outcome::ClientIdMismatch { detail } => {
                let reason = format!(
                    "the Store answered InconsistentClientId: the access token's appid is not the key's clientId {}; check that application's tenant_id, client_id and secret",
                    claims.client_id
                );
                let event = self.event(row, &resp, &detail);
                self.flag(row, State::Misconfigured, &reason, event).await
            }
            Outcome::Throttled { .. } | Outcome::Transient { .. } | Outcome::Unexpected { .. } => {
                let detail = describe(&resp);
                let event = self.event(row, &resp, &detail);
                self.retry(row, claims, retry_after, &detail, event).await
            }
        }
    }

    async fn write_renewed(
        &self,
        row: &ClaimedRow,
        new_key: &KeyText,
        new_claims: &Claims,
        resp: &RenewResponse,
    ) -> Result<Settled, DbError> {
        let next = schedule::renewal_time(
            new_claims,
            &self.config.policy(),
            self.clock.now(),
            fastrand::f64(),
        );
        let fp = new_key.fingerprint();
        let mut event = self.event(
            row,
            resp,
            &format!(
                "new key {fp}, expires {}, next renewal {}",
                utc(new_claims.expires_at),
                utc(next)
            ),
        );
        event.key_fp = Some(fp.to_string());
        let activation = Activation {
            claims: new_claims,
            key_fp: fp,
            next_attempt_at: next,
        };
        let applied = self
            .persist(row, || {
                self.db
                    .write_renewed(row.id, &row.key, new_key, &activation, &event)
            })
            .await?;
        if self.counted(applied, "renewed") {
            self.safety.renewed(&new_claims.client_id, resp.sent).await;
            self.metrics
                .last_success
                .store(event.at, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(new_key = %fp, next = %utc(next), "renewed");
            Ok(Settled::Renewed)
        } else {
            tracing::info!("key was replaced by the backend during renewal; result dropped");
            Ok(Settled::Superseded)
        }
    }

    async fn retry(
        &self,
        row: &ClaimedRow,
        claims: &Claims,
        retry_after: Option<std::time::Duration>,
        detail: &str,
        event: Event,
    ) -> Result<Settled, DbError> {
        self.retry_with(row, claims, retry_after, detail, event, false)
            .await
    }

    /// `refused`: a refusal the guard could not yet believe; counted toward flagging the key.
    async fn retry_with(
        &self,
        row: &ClaimedRow,
        claims: &Claims,
        retry_after: Option<std::time::Duration>,
        detail: &str,
        mut event: Event,
        refused: bool,
    ) -> Result<Settled, DbError> {
        let now = self.clock.now();
        let attempts = row.attempts.saturating_add(1);
        match schedule::retry_time(
            now,
            claims.expires_at,
            attempts,
            retry_after,
            &self.config.policy(),
            fastrand::f64(),
        ) {
            Retry::Expired => self.flag_expired(row, claims, event).await,
            Retry::At(at) => {
                event.key_id = row.id;
                if event.at == 0 {
                    event.at = now;
                }
                event.key_fp = Some(row.key.fingerprint().to_string());
                event.detail = Some(format!("{detail}; attempt {attempts}, next at {}", utc(at)));
                let reason = format!("retrying: {detail}");
                let applied = self
                    .persist(row, || {
                        self.db
                            .write_retry(row.id, &row.key, at, &reason, refused, &event)
                    })
                    .await?;
                if self.counted(applied, event.outcome) {
                    tracing::info!(outcome = event.outcome, attempts, next = %utc(at), "{detail}; will retry");
                    Ok(Settled::Retry)
                } else {
                    Ok(Settled::Superseded)
                }
            }
        }
    }

    async fn flag_expired(
        &self,
        row: &ClaimedRow,
        claims: &Claims,
        event: Event,
    ) -> Result<Settled, DbError> {
        let reason = format!(
            "key expired at {} before it could be renewed; the client must mint a new one",
            utc(claims.expires_at)
        );
        self.flag(row, State::Expired, &reason, event).await
    }

    async fn flag(
        &self,
        row: &ClaimedRow,
        state: State,
        reason: &str,
        mut event: Event,
    ) -> Result<Settled, DbError> {
        event.key_id = row.id;
        if event.at == 0 {
            event.at = self.clock.now();
        }
        event.key_fp = Some(row.key.fingerprint().to_string());
        if event.outcome.is_empty() {
            event.outcome = state.as_str();
        }
        if event.detail.is_none() {
            event.detail = Some(reason.to_owned());
        }
        let applied = self
            .persist(row, || {
                self.db.flag(row.id, &row.key, state, reason, &event)
            })
            .await?;
        if self.counted(applied, event.outcome) {
            tracing::warn!(state = state.as_str(), reason, "key flagged");
            Ok(Settled::Flagged(state))
        } else {
            Ok(Settled::Superseded)
        }
    }

    /// Retries a write while another connection holds the database lock (a backend's long
    /// transaction), for up to one lease: the Store has already acted, and its result (above all
    /// a new key) must not be lost to a lock.
    async fn persist<F, Fut>(&self, row: &ClaimedRow, mut write: F) -> Result<bool, DbError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool, DbError>>,
    {
        // Until the lease runs out (less a margin): after that another process may claim the key.
        let deadline = row.claimed
            + self
                .config
                .renew
                .lease
                .saturating_sub(std::time::Duration::from_secs(5));
        loop {
            match write().await {
                Err(e) if e.is_busy() && std::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "database is locked; retrying the write");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    }

    /// Puts a key back without an attempt until its endpoint's breaker lets calls through, spread
    /// over a few seconds so the backlog does not return as one burst.
    async fn defer(&self, row: &ClaimedRow, until: std::time::Instant) -> Result<Settled, DbError> {
        let wait = until.saturating_duration_since(std::time::Instant::now());
        let at = self.clock.now()
            + i64::try_from(wait.as_secs()).unwrap_or(i64::MAX / 2)
            + 1
            + fastrand::i64(0..=2);
        self.db.defer(row.id, &row.key, at).await?;
        Ok(Settled::Deferred)
    }

    /// Counts the outcome of a write, or `superseded` if the backend's write won.
    fn counted(&self, applied: bool, outcome: &'static str) -> bool {
        self.metrics
            .renewals
            .inc(if applied { outcome } else { "superseded" });
        applied
    }

    fn event(&self, row: &ClaimedRow, resp: &RenewResponse, detail: &str) -> Event {
        Event {
            key_id: row.id,
            // When the call was made, not when it came back.
            at: resp.started_at,
            outcome: resp.outcome.label(),
            key_fp: Some(row.key.fingerprint().to_string()),
            http_status: resp.status,
            error_code: resp.error_code.clone(),
            detail: (!detail.is_empty()).then(|| detail.to_owned()),
            correlation_id: resp.ms.correlation_id.clone(),
            request_id: resp.ms.request_id.clone(),
            cv: resp.ms.cv.clone(),
            duration_ms: Some(resp.duration_ms),
        }
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

fn token_event() -> Event {
    Event {
        outcome: "token_error",
        ..Event::default()
    }
}

fn describe(resp: &RenewResponse) -> String {
    let what = match &resp.outcome {
        Outcome::Throttled {
            retry_after: Some(d),
        } => format!("throttled (Retry-After {}s)", d.as_secs()),
        Outcome::Throttled { retry_after: None } => "throttled".to_owned(),
        Outcome::Transient { detail } | Outcome::Unexpected { detail } => detail.clone(),
        other => other.label().to_owned(),
    };
    match &resp.error_code {
        Some(code) => format!("{what} ({code})"),
        None => what,
    }
}
