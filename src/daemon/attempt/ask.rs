//! Asking: the breaker's permit, the rate limit, a token, the renew call and the fresh-token
//! retry, and the guard's verdict on a refusal. Everything up to the decision.

use super::*;

/// What asking came to: an answer to decide on, or nothing to decide.
#[expect(
    clippy::large_enum_variant,
    reason = "one per attempt, returned once; boxing would allocate for every answer"
)]
pub(super) enum Asked {
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
pub(super) struct Call {
    pub(super) response: RenewResponse,
    pub(super) started_ms: i64,
}

impl Engine {
    /// Everything up to the decision: what the breaker, Entra ID, the Store and the guard said.
    pub(super) async fn ask(&self, row: &ClaimedRow) -> Result<Asked, WriterGone> {
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
        self.metrics.renewals.inc(EventKind::AuthInvalid);
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

    pub(super) fn endpoint(&self, kind: Kind) -> &reqwest::Url {
        // Both kinds were parsed from the config in `new`.
        &self.endpoints[&kind]
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
