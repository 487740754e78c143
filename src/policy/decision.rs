//! The one decision on an attempt: given what is known about it (the claimed row's stored claims,
//! what the Store or Entra answered, the guard's and breaker's verdicts, the time, the policy and a
//! random draw), what becomes of the key. Pure; the daemon applies what it returns.

use std::time::Duration;

use crate::clock::utc;
use crate::policy::claims::{Claims, KeyFacts, KeyText};
use crate::policy::guard::{self, Verdict};
use crate::policy::outcome::{self, Outcome};
use crate::policy::schedule::{self, Policy, Retry};
use crate::policy::state::{EventKind, State};

/// What one attempt learned. Every variant but the last means nothing reached the Store.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The endpoint's outage breaker holds calls back until this Unix time.
    Paused { until: i64 },
    /// The key expired before its turn came.
    ExpiredUnsent,
    /// No application is configured for the key's clientId.
    NoApplication,
    /// No access token could be had from Entra ID.
    TokenFailed { detail: String },
    /// The Store refused the key (AuthenticationTokenInvalid), also with a fresh access token,
    /// and the guard judged the refusal.
    Refused { detail: String, verdict: Verdict },
    /// Any other answer from the Store, classified.
    Answered {
        outcome: Outcome,
        error_code: Option<String>,
    },
}

/// Everything the decision depends on.
#[derive(Debug, Clone)]
pub struct Attempt<'a> {
    pub facts: &'a KeyFacts,
    /// Consecutive failed attempts before this one.
    pub attempts: u32,
    pub answer: Answer,
    pub now: i64,
    pub policy: &'a Policy,
    /// Uniform in `[0, 1)`: the jitter of whatever is scheduled.
    pub draw: f64,
    /// An earlier attempt on the key may have renewed it without its answer being written.
    pub unanswered: Option<Unanswered>,
}

/// Since when an attempt's answer may be on its way (Unix seconds), and until when its process
/// is given to write it: a refusal meanwhile may only mean the Store renewed the key and
/// retired this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unanswered {
    pub since: i64,
    pub until: i64,
}

/// What to write for the key.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Replace the key with its successor and schedule the next renewal.
    Renew {
        key: KeyText,
        claims: Box<Claims>,
        next_at: i64,
    },
    /// Keep the key and try again at `at`. `refused`: a refusal the guard could not yet believe,
    /// counted toward flagging the key.
    Retry {
        at: i64,
        reason: String,
        refused: bool,
        /// Sent, with no answer: the Store may have renewed the key.
        unanswered: bool,
    },
    /// Stop renewing the key; the backend must get a new one (or the configuration must change).
    Flag { state: State, reason: String },
    /// Not attempted: put the key back until `at`, with no event.
    Defer { at: i64 },
}

/// The decision, with what the event row records.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    pub event: EventKind,
    pub detail: String,
}

/// Decides the fate of one attempt.
pub fn decide(a: &Attempt<'_>) -> Decision {
    match &a.answer {
        Answer::Paused { until } => Decision {
            // Spread over a few seconds, so the backlog does not return as one burst.
            action: Action::Defer {
                at: (*until).max(a.now) + 1 + (a.draw.clamp(0.0, 0.999) * 3.0) as i64,
            },
            event: EventKind::Deferred,
            detail: String::new(),
        },
        Answer::ExpiredUnsent => expired(a, EventKind::Expired, String::new()),
        Answer::NoApplication => {
            let reason = format!(
                "no [[applications]] entry for clientId {}; add one to renew this key",
                a.facts.client_id
            );
            flag(State::Misconfigured, EventKind::Misconfigured, reason, None)
        }
        Answer::TokenFailed { detail } => retry(a, EventKind::TokenError, detail, None, false),
        Answer::Refused { detail, verdict } => match (verdict, a.unanswered) {
            (Verdict::Revoked(_), Some(u)) => refused_after_unanswered(a, u, detail),
            (Verdict::Revoked(why), None) => flag(
                State::Revoked,
                EventKind::Revoked,
                (*why).to_owned(),
                Some(detail.clone()),
            ),
            (Verdict::Defer(why), _) => {
                retry(a, EventKind::AuthInvalid, why, None, *why != guard::ALARM)
            }
        },
        Answer::Answered {
            outcome,
            error_code,
        } => answered(a, outcome, error_code.as_deref()),
    }
}

fn answered(a: &Attempt<'_>, outcome: &Outcome, code: Option<&str>) -> Decision {
    match outcome {
        Outcome::Renewed(new_key) => match outcome::check_renewed(a.facts, new_key) {
            Ok(claims) => renewed(a, new_key, claims),
            // The Store may have renewed the key and retired this one all the same.
            Err(rejected) => unanswered(retry(
                a,
                EventKind::Unexpected,
                &rejected.to_string(),
                None,
                false,
            )),
        },
        // A refusal the attempt did not put to the guard (it always should): not evidence.
        Outcome::AuthInvalid { .. } => {
            retry(a, EventKind::AuthInvalid, guard::AWAITING, None, true)
        }
        Outcome::ClientIdMismatch { detail } => {
            let reason = format!(
                "the Store answered InconsistentClientId: the access token's appid is not the key's clientId {}; check that application's tenant_id, client_id and secret",
                a.facts.client_id
            );
            flag(
                State::Misconfigured,
                EventKind::ClientIdMismatch,
                reason,
                Some(detail.clone()),
            )
        }
        Outcome::Throttled { retry_after } => {
            let what = match retry_after {
                Some(d) => format!("throttled (Retry-After {}s)", d.as_secs()),
                None => "throttled".to_owned(),
            };
            retry(
                a,
                EventKind::Throttled,
                &with_code(what, code),
                *retry_after,
                false,
            )
        }
        Outcome::Transient { detail } => retry(
            a,
            EventKind::Transient,
            &with_code(detail.clone(), code),
            None,
            false,
        ),
        Outcome::Unanswered { detail } => unanswered(retry(
            a,
            EventKind::Unanswered,
            &format!("sent, no usable answer ({detail}): the Store may have renewed the key"),
            None,
            false,
        )),
        Outcome::Unexpected { detail } => retry(
            a,
            EventKind::Unexpected,
            &with_code(detail.clone(), code),
            None,
            false,
        ),
    }
}

fn renewed(a: &Attempt<'_>, new_key: &KeyText, claims: Claims) -> Decision {
    let next_at = schedule::renewal_time(&claims.facts(), a.policy, a.now, a.draw);
    let detail = format!(
        "new key {}, expires {}, next renewal {}",
        new_key.fingerprint(),
        utc(claims.expires_at),
        utc(next_at)
    );
    Decision {
        action: Action::Renew {
            key: new_key.clone(),
            claims: Box::new(claims),
            next_at,
        },
        event: EventKind::Renewed,
        detail,
    }
}

fn retry(
    a: &Attempt<'_>,
    event: EventKind,
    detail: &str,
    retry_after: Option<Duration>,
    refused: bool,
) -> Decision {
    let attempts = a.attempts.saturating_add(1);
    let at = schedule::retry_time(
        a.now,
        a.facts.expires_at,
        attempts,
        retry_after,
        a.policy,
        a.draw,
    );
    match at {
        Retry::Expired => expired(a, event, detail.to_owned()),
        Retry::At(at) => Decision {
            action: Action::Retry {
                at,
                reason: format!("retrying: {detail}"),
                refused,
                unanswered: false,
            },
            event,
            detail: format!("{detail}; attempt {attempts}, next at {}", utc(at)),
        },
    }
}

/// The Store refused a key after an attempt whose answer never came: it may have renewed the
/// key then and retired this one. Until the process that may hold the answer has had time to
/// write it, that is no evidence of a revocation; after, the key is flagged, saying why.
fn refused_after_unanswered(a: &Attempt<'_>, u: Unanswered, detail: &str) -> Decision {
    if a.now < u.until {
        let at = u
            .until
            .min(a.facts.expires_at.saturating_sub(1))
            .max(a.now + 1);
        if at >= a.facts.expires_at {
            return expired(a, EventKind::AuthInvalid, detail.to_owned());
        }
        return Decision {
            action: Action::Retry {
                at,
                reason: format!(
                    "retrying: refused, but an attempt at {} got no answer and may have renewed the key; its answer may yet be written",
                    utc(u.since)
                ),
                refused: false,
                unanswered: false,
            },
            event: EventKind::AuthInvalid,
            detail: format!(
                "refused after an unanswered attempt at {}; next at {}",
                utc(u.since),
                utc(at)
            ),
        };
    }
    let reason = format!(
        "the Store refused the key after an attempt at {} got no answer (a timeout, a broken connection or a stopped process): the Store may have renewed the key then and retired this one, and the new key may have been lost; the client must mint a new one",
        utc(u.since)
    );
    flag(
        State::Revoked,
        EventKind::AnswerLost,
        reason,
        Some(detail.to_owned()),
    )
}

fn expired(a: &Attempt<'_>, event: EventKind, detail: String) -> Decision {
    let reason = format!(
        "key expired at {} before it could be renewed; the client must mint a new one",
        utc(a.facts.expires_at)
    );
    let event = match event {
        EventKind::Expired | EventKind::Deferred => EventKind::Expired,
        other => other,
    };
    flag(State::Expired, event, reason, Some(detail))
}

fn flag(state: State, event: EventKind, reason: String, detail: Option<String>) -> Decision {
    let detail = detail
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| reason.clone());
    Decision {
        action: Action::Flag { state, reason },
        event,
        detail,
    }
}

/// Marks a retry's key as one the Store may have renewed.
fn unanswered(mut d: Decision) -> Decision {
    if let Action::Retry { unanswered, .. } = &mut d.action {
        *unanswered = true;
    }
    d
}

fn with_code(what: String, code: Option<&str>) -> String {
    match code {
        Some(code) => format!("{what} ({code})"),
        None => what,
    }
}

#[cfg(test)]
#[path = "decision_tests.rs"]
mod tests;
