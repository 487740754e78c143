use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::emulator::keymint::{KeySpec, mint};
use crate::policy::claims;

const NOW: i64 = 1_800_000_000;
const DAY: i64 = 86_400;

/// The shipped defaults: 14-day cadence, 7-day margin, 1 h jitter, backoff from 30 s to 1 h.
fn policy() -> Policy {
    crate::config::Config::default().policy()
}

/// A key issued 20 days before NOW, expiring 10 days after.
fn facts() -> KeyFacts {
    claims::decode(&mint(&KeySpec::collections(
        "app",
        NOW - 20 * DAY,
        30 * DAY,
    )))
    .unwrap()
    .facts()
}

fn successor(spec: &KeySpec) -> Outcome {
    Outcome::Renewed(KeyText::new(mint(spec)))
}

fn decide_with(facts: &KeyFacts, answer: Answer, now: i64) -> Decision {
    let p = policy();
    decide(&Attempt {
        facts,
        attempts: 0,
        answer,
        now,
        policy: &p,
        draw: 0.5,
        unanswered: None,
    })
}

fn answered(outcome: Outcome) -> Answer {
    Answer::Answered {
        outcome,
        error_code: None,
    }
}

#[test]
fn a_later_successor_of_the_same_credential_is_written_and_scheduled() {
    let f = facts();
    let d = decide_with(
        &f,
        answered(successor(&KeySpec::collections("app", NOW, 30 * DAY))),
        NOW,
    );
    assert_eq!(d.event, EventKind::Renewed);
    let Action::Renew {
        next_at, claims, ..
    } = d.action
    else {
        panic!("{d:?}")
    };
    assert_eq!(claims.expires_at, NOW + 30 * DAY);
    assert!(next_at > NOW && next_at < claims.expires_at, "{next_at}");
}

#[test]
fn a_successor_for_someone_else_is_never_written() {
    let f = facts();
    let mut spec = KeySpec::collections("app", NOW, 30 * DAY);
    spec.user_id = "someone-else".into();
    for outcome in [
        successor(&spec),
        successor(&KeySpec::collections("other-app", NOW, 30 * DAY)),
        successor(&KeySpec::collections("app", NOW - 25 * DAY, 30 * DAY)),
        Outcome::Renewed(KeyText::new("garbage")),
    ] {
        let d = decide_with(&f, answered(outcome), NOW);
        assert_eq!(d.event, EventKind::Unexpected, "{d:?}");
        // Retried, and marked: the Store may have renewed the key all the same.
        assert!(
            matches!(
                d.action,
                Action::Retry {
                    refused: false,
                    unanswered: true,
                    ..
                }
            ),
            "{d:?}"
        );
    }
}

#[test]
fn a_refusal_is_flagged_only_on_the_guards_word() {
    let f = facts();
    let refused = |verdict| Answer::Refused {
        detail: "inner".into(),
        verdict,
    };
    let d = decide_with(&f, refused(Verdict::Revoked(guard::REVOKED)), NOW);
    assert_eq!(d.event, EventKind::Revoked);
    assert!(matches!(
        d.action,
        Action::Flag {
            state: State::Revoked,
            ..
        }
    ));
    assert_eq!(d.detail, "inner");

    let d = decide_with(&f, refused(Verdict::Defer(guard::AWAITING)), NOW);
    assert!(
        matches!(d.action, Action::Retry { refused: true, .. }),
        "{d:?}"
    );
    // Under the credential alarm a refusal is not a strike against the key.
    let d = decide_with(&f, refused(Verdict::Defer(guard::ALARM)), NOW);
    assert!(
        matches!(d.action, Action::Retry { refused: false, .. }),
        "{d:?}"
    );
    // A refusal never put to the guard is no evidence either.
    let d = decide_with(
        &f,
        answered(Outcome::AuthInvalid { detail: "x".into() }),
        NOW,
    );
    assert!(matches!(d.action, Action::Retry { .. }), "{d:?}");
}

#[test]
fn configuration_problems_flag_misconfigured_not_revoked() {
    let f = facts();
    let d = decide_with(
        &f,
        answered(Outcome::ClientIdMismatch { detail: "d".into() }),
        NOW,
    );
    assert_eq!(d.event, EventKind::ClientIdMismatch);
    assert!(matches!(
        d.action,
        Action::Flag {
            state: State::Misconfigured,
            ..
        }
    ));
    let d = decide_with(&f, Answer::NoApplication, NOW);
    assert!(
        matches!(d.action, Action::Flag { state: State::Misconfigured, ref reason } if reason.contains("clientId"))
    );
    let d = decide_with(
        &f,
        Answer::TokenFailed {
            detail: "entra says no".into(),
        },
        NOW,
    );
    assert_eq!(d.event, EventKind::TokenError);
    assert!(
        matches!(d.action, Action::Retry { refused: false, ref reason, .. } if reason.contains("entra says no"))
    );
}

#[test]
fn retry_after_is_honoured_and_codes_are_named() {
    let f = facts();
    let d = decide(&Attempt {
        facts: &f,
        attempts: 0,
        answer: Answer::Answered {
            outcome: Outcome::Throttled {
                retry_after: Some(Duration::from_secs(120)),
            },
            error_code: Some("TooMany".into()),
        },
        now: NOW,
        policy: &policy(),
        draw: 0.0,
        unanswered: None,
    });
    let Action::Retry { at, reason, .. } = d.action else {
        panic!("{d:?}")
    };
    assert!(at >= NOW + 120, "{at}");
    assert!(
        reason.contains("Retry-After 120s") && reason.contains("TooMany"),
        "{reason}"
    );
}

#[test]
fn a_key_out_of_time_is_flagged_expired_never_retried_late() {
    let f = facts();
    let last_second = f.expires_at - 1;
    let d = decide_with(
        &f,
        answered(Outcome::Transient {
            detail: "503".into(),
        }),
        last_second,
    );
    assert!(
        matches!(
            d.action,
            Action::Flag {
                state: State::Expired,
                ..
            }
        ),
        "{d:?}"
    );
    assert_eq!(d.event, EventKind::Transient);
    let d = decide_with(&f, Answer::ExpiredUnsent, f.expires_at);
    assert!(matches!(
        d.action,
        Action::Flag {
            state: State::Expired,
            ..
        }
    ));
    assert_eq!(d.event, EventKind::Expired);
}

#[test]
fn a_paused_endpoint_defers_past_its_probe() {
    let f = facts();
    let d = decide_with(&f, Answer::Paused { until: NOW + 30 }, NOW);
    let Action::Defer { at } = d.action else {
        panic!("{d:?}")
    };
    assert!((NOW + 31..=NOW + 33).contains(&at), "{at}");
}

fn any_outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        (0i64..40 * DAY, 1i64..40 * DAY, "[a-c]{1,3}").prop_map(|(iat, life, client)| {
            successor(&KeySpec::collections(
                &client,
                NOW - 20 * DAY + iat - 20 * DAY,
                life,
            ))
        }),
        ".{0,20}".prop_map(|d| Outcome::ClientIdMismatch { detail: d }),
        proptest::option::of(0u64..100_000).prop_map(|s| Outcome::Throttled {
            retry_after: s.map(Duration::from_secs)
        }),
        ".{0,20}".prop_map(|d| Outcome::Transient { detail: d }),
        ".{0,20}".prop_map(|d| Outcome::Unexpected { detail: d }),
    ]
}

fn any_answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        (0i64..100_000).prop_map(|s| Answer::Paused { until: NOW + s }),
        Just(Answer::ExpiredUnsent),
        Just(Answer::NoApplication),
        ".{0,20}".prop_map(|d| Answer::TokenFailed { detail: d }),
        prop_oneof![
            Just(Verdict::Revoked(guard::REVOKED)),
            Just(Verdict::Revoked(guard::REVOKED_LONE)),
            Just(Verdict::Defer(guard::AWAITING)),
            Just(Verdict::Defer(guard::ALARM))
        ]
        .prop_map(|verdict| Answer::Refused {
            detail: "d".into(),
            verdict
        }),
        (any_outcome(), proptest::option::of("[A-Za-z]{1,10}")).prop_map(
            |(outcome, error_code)| Answer::Answered {
                outcome,
                error_code
            }
        ),
    ]
}

proptest! {
    /// The decision's invariants over every kind of answer, time and draw: nothing is scheduled
    /// at or after expiry, only the guard's word flags a key revoked, only a valid successor of
    /// the same credential is written, and only a renewal or a plain retry follows a success.
    #[test]
    fn decisions_keep_their_invariants(
        answer in any_answer(),
        ahead in 0i64..12 * DAY,
        attempts in 0u32..40,
        draw in 0.0f64..1.0,
        unanswered in proptest::option::of((0i64..3 * DAY, 0i64..6 * DAY)),
    ) {
        let f = facts();
        let now = f.expires_at - ahead;
        let unanswered = unanswered.map(|(ago, wait)| Unanswered { since: now - ago, until: now - ago + wait });
        let d = decide(&Attempt { facts: &f, attempts, answer: answer.clone(), now, policy: &policy(), draw, unanswered });
        match &d.action {
            Action::Retry { at, .. } => prop_assert!(*at > now && *at < f.expires_at),
            Action::Renew { claims, next_at, key } => {
                let sent = matches!(&answer, Answer::Answered { outcome: Outcome::Renewed(k), .. } if k == key);
                prop_assert!(sent, "renewed without a successor: {:?}", answer);
                prop_assert_eq!(&claims.client_id, &f.client_id);
                prop_assert!(claims.expires_at > f.expires_at);
                prop_assert!(*next_at < claims.expires_at);
            }
            Action::Flag { state: State::Revoked, .. } => {
                let believed = matches!(answer, Answer::Refused { verdict: Verdict::Revoked(_), .. });
                prop_assert!(believed, "revoked without the guard: {:?}", answer);
                // Not while an answer may still be written; and then saying so.
                if let Some(u) = unanswered {
                    prop_assert!(now >= u.until, "flagged while an answer may come: {:?}", d);
                    prop_assert_eq!(d.event, EventKind::AnswerLost);
                }
            }
            Action::Flag { .. } => {}
            Action::Defer { at } => {
                let paused = matches!(answer, Answer::Paused { until } if *at > until);
                prop_assert!(paused, "deferred without a pause: {:?}", answer);
            }
        }
        let usable = matches!(d.action, Action::Flag { state: State::Active | State::Pending, .. });
        prop_assert!(!usable, "flagged into a usable state: {:?}", d);
    }
}

/// An attempt sent with no answer may have renewed the key: it is retried, and the row is
/// marked, so that a refusal of the key is not taken for a revocation at once.
#[test]
fn a_call_without_an_answer_is_retried_and_marks_the_key() {
    let f = facts();
    let d = decide_with(
        &f,
        answered(Outcome::Unanswered {
            detail: "timed out".into(),
        }),
        NOW,
    );
    assert!(
        matches!(
            d.action,
            Action::Retry {
                unanswered: true,
                refused: false,
                ..
            }
        ),
        "{d:?}"
    );
    assert_eq!(d.event, EventKind::Unanswered);
}

/// The Store may have renewed the key and retired this one: a refusal the guard believes
/// waits until the process that may hold the answer has had time to write it, then flags the
/// key saying the answer was lost.
#[test]
fn a_refusal_after_an_unanswered_attempt_waits_then_says_the_answer_was_lost() {
    let f = facts();
    let refused = Answer::Refused {
        detail: "d".into(),
        verdict: Verdict::Revoked(guard::REVOKED),
    };
    let u = Unanswered {
        since: NOW - 30,
        until: NOW + 210,
    };
    let p = policy();
    let at = |now, unanswered| {
        decide(&Attempt {
            facts: &f,
            attempts: 1,
            answer: refused.clone(),
            now,
            policy: &p,
            draw: 0.5,
            unanswered,
        })
    };
    let d = at(NOW, Some(u));
    assert!(
        matches!(d.action, Action::Retry { at, refused: false, .. } if at == u.until),
        "{d:?}"
    );
    let d = at(u.until, Some(u));
    let Action::Flag { state, reason } = &d.action else {
        panic!("{d:?}");
    };
    assert_eq!((*state, d.event), (State::Revoked, EventKind::AnswerLost));
    assert!(reason.contains("got no answer"), "{reason}");
    // With no unanswered attempt, the guard's word flags it at once, as before.
    let d = at(NOW, None);
    assert_eq!(d.event, EventKind::Revoked);
}
