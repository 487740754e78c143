//! Recording: the decision turned into a write, waited for until durable, and reported in
//! metrics and logs.

use super::*;

impl Engine {
    /// Turns the decision into a write, waits for it, and reports.
    pub(super) async fn apply(
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
                self.metrics.renewals.inc(EventKind::Superseded);
                tracing::info!("key was replaced by the backend during renewal; result dropped");
                return Settled::Superseded;
            }
            Written::Spooled | Written::Dropped => return Settled::Unwritten,
        }
        if settled != Settled::Deferred {
            self.metrics.renewals.inc(decision.event);
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

    pub(super) fn event(&self, row: &ClaimedRow, kind: EventKind, resp: &RenewResponse) -> Event {
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
