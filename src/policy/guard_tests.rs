use std::time::Duration;

use super::*;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;

fn guard() -> RevocationGuard {
    RevocationGuard::new(GuardPolicy {
        threshold: 3,
        window: Duration::from_secs(900),
        canary_interval: Duration::from_secs(60),
        lone_key_after: Duration::from_secs(6 * 3600),
    })
}

fn once(at: i64) -> Refusals {
    Refusals {
        count: 1,
        first_ms: Some(at),
        last_ms: Some(at),
    }
}

#[test]
fn a_refusal_counts_once_a_renewal_begun_after_it_succeeds() {
    let t = 1_000 * HOUR;
    let mut g = guard();
    assert_eq!(
        g.refused("a", 2, Refusals::default(), false, true, t),
        (Verdict::Defer(AWAITING), None)
    );
    assert_eq!(g.canaries_due(t), ["a"]);
    g.canary_found("a", true, t);
    // The canary began after the refusal and renewed.
    g.success("a", t + 1);
    g.canary_done("a", t + 2);
    assert_eq!(
        g.refused("a", 2, once(t), false, true, t + MIN),
        (Verdict::Revoked(REVOKED), None)
    );
}

#[test]
fn renewals_from_before_a_refusal_prove_nothing() {
    let t = 1_000 * HOUR;
    let mut g = guard();
    for i in 0..200 {
        g.success("a", t + i);
    }
    // A key refused before, and the credential broke since: no renewal began after its refusal.
    assert_eq!(
        g.refused("a", 7, once(t + 300), false, true, t + MIN).0,
        Verdict::Defer(AWAITING)
    );
    // Nor is a key refused for the first time ever flagged, whatever renewed before.
    assert_eq!(
        g.refused("a", 8, Refusals::default(), false, true, t + MIN)
            .0,
        Verdict::Defer(AWAITING)
    );
}

#[test]
fn a_refused_canary_raises_the_alarm_and_a_later_success_clears_it() {
    let t = 1_000 * HOUR;
    let mut g = guard();
    g.refused("a", 1, Refusals::default(), false, true, t);
    assert_eq!(g.canaries_due(t), ["a"]);
    g.canary_found("a", true, t);
    assert_eq!(
        g.refused("a", 2, Refusals::default(), true, true, t + 10),
        (Verdict::Defer(ALARM), Some(AlarmChange::Raised))
    );
    g.canary_done("a", t + 10);
    // While it stands nothing is flagged, however often a key was refused.
    assert_eq!(
        g.refused("a", 1, once(t), false, true, t + 20).0,
        Verdict::Defer(ALARM)
    );
    // No second canary within the interval; one after it.
    assert!(g.canaries_due(t + 30).is_empty());
    assert_eq!(g.canaries_due(t + MIN), ["a"]);
    g.canary_found("a", true, t);
    // A renewal that was in flight when the alarm rose does not clear it; the canary does.
    assert_eq!(g.success("a", t + 5), None);
    assert_eq!(g.success("a", t + MIN + 1), Some(AlarmChange::Cleared));
    g.canary_done("a", t + MIN + 2);
    assert!(g.alarms().is_empty());
}

#[test]
fn a_revoked_canary_while_others_renew_is_no_alarm() {
    let t = 1_000 * HOUR;
    let mut g = guard();
    g.refused("a", 1, Refusals::default(), false, true, t);
    assert_eq!(g.canaries_due(t), ["a"]);
    g.canary_found("a", true, t);
    // Another key renewed after the canary was asked for: the credential works.
    g.success("a", t + 5);
    assert_eq!(
        g.refused("a", 2, Refusals::default(), true, true, t + 10),
        (Verdict::Defer(AWAITING), None)
    );
}

#[test]
fn a_wave_of_refusals_raises_the_alarm_per_application() {
    let t = 1_000 * HOUR;
    let mut g = guard();
    assert_eq!(
        g.refused("a", 1, Refusals::default(), false, true, t).1,
        None
    );
    assert_eq!(
        g.refused("a", 2, Refusals::default(), false, true, t).1,
        None
    );
    assert_eq!(
        g.refused("a", 3, Refusals::default(), false, true, t),
        (Verdict::Defer(ALARM), Some(AlarmChange::Raised))
    );
    // Another application is judged on its own.
    assert_eq!(
        g.refused("b", 10, Refusals::default(), false, true, t).0,
        Verdict::Defer(AWAITING)
    );
    g.success("b", t + 1);
    assert_eq!(
        g.refused("b", 10, once(t), false, true, t + 2).0,
        Verdict::Revoked(REVOKED)
    );
    assert_eq!(g.alarms(), [("a".to_owned(), t)]);
}

#[test]
fn a_key_with_no_other_to_ask_is_flagged_only_after_refusals_span_hours() {
    let t = 1_000 * HOUR;
    let mut g = guard();
    g.refused("a", 1, Refusals::default(), false, true, t);
    assert_eq!(g.canaries_due(t), ["a"]);
    assert_eq!(g.canary_found("a", false, t), None);
    let since = |first: i64, last: i64| Refusals {
        count: 5,
        first_ms: Some(first),
        last_ms: Some(last),
    };
    assert_eq!(
        g.refused("a", 1, since(t, t + HOUR), false, true, t + 2 * HOUR)
            .0,
        Verdict::Defer(AWAITING)
    );
    assert_eq!(
        g.refused("a", 1, since(t, t + 5 * HOUR), false, true, t + 6 * HOUR)
            .0,
        Verdict::Revoked(REVOKED_LONE)
    );
    // Once another key renews, there is someone to ask again.
    g.success("a", t + 6 * HOUR + 1);
    g.refused("a", 1, Refusals::default(), false, true, t + 7 * HOUR);
    assert_eq!(
        g.refused("a", 5, since(t, t + 7 * HOUR), false, true, t + 7 * HOUR)
            .0,
        Verdict::Defer(AWAITING)
    );
}

#[test]
fn canaries_are_one_at_a_time_and_stop_once_evidence_is_in() {
    let t = 1_000 * HOUR;
    let mut g = guard();
    assert!(g.canaries_due(t).is_empty(), "nothing asked for one");
    g.refused("a", 1, Refusals::default(), false, true, t);
    assert_eq!(g.canaries_due(t), ["a"]);
    g.canary_found("a", true, t);
    assert!(g.canaries_due(t + 2 * MIN).is_empty(), "one in flight");
    g.success("a", t + 1);
    g.canary_done("a", t + 2);
    assert!(g.canaries_due(t + 3 * MIN).is_empty(), "evidence is in");
}

#[test]
fn a_renewal_begun_after_the_refusals_ends_the_call_for_a_canary() {
    let t = 1_000 * HOUR;
    let mut g = guard();
    g.refused("a", 1, Refusals::default(), false, true, t);
    assert_eq!(g.canaries_due(t), ["a"]);
    g.canary_found("a", true, t);
    // The canary's attempt ended without an answer (a timeout): still wanted.
    g.canary_done("a", t + 1);
    // Begun before the refusal: proves nothing.
    g.success("a", t - 1);
    assert_eq!(g.canaries_due(t + 2 * MIN), ["a"]);
    g.canary_found("a", true, t + 2 * MIN);
    g.canary_done("a", t + 2 * MIN + 1);
    // An ordinary renewal begun after the refusal: the evidence is in, and no canary is spent
    // on a key renewed moments ago.
    g.success("a", t + 20);
    assert!(g.canaries_due(t + 4 * MIN).is_empty());
    // The next refusal asks again.
    g.refused("a", 2, Refusals::default(), false, true, t + 5 * MIN);
    assert_eq!(g.canaries_due(t + 5 * MIN), ["a"]);
}

#[test]
fn an_alarm_from_an_earlier_run_defers_everything_and_asks_for_a_canary() {
    let t = 1_000 * HOUR;
    let mut g = guard();
    g.raise("a", t);
    assert_eq!(
        g.refused("a", 1, once(t - HOUR), false, true, t + 1).0,
        Verdict::Defer(ALARM)
    );
    assert_eq!(g.canaries_due(t + 2), ["a"]);
}

#[test]
fn every_key_of_a_small_application_refused_is_our_credential() {
    let t = 1_000 * HOUR;
    let mut g = guard();
    g.refused("a", 1, Refusals::default(), false, true, t);
    g.refused("a", 2, Refusals::default(), false, true, t + 1);
    assert_eq!(g.canaries_due(t + 2), ["a"]);
    // Both its keys are refused and there is no third to ask.
    assert_eq!(g.canary_found("a", false, t + 2), Some(AlarmChange::Raised));
    assert_eq!(
        g.refused("a", 1, since_long_ago(t), false, true, t + 7 * HOUR)
            .0,
        Verdict::Defer(ALARM),
        "never flagged on time alone while the alarm stands"
    );
}

fn since_long_ago(t: i64) -> Refusals {
    Refusals {
        count: 9,
        first_ms: Some(t - 10 * HOUR),
        last_ms: Some(t),
    }
}

/// A player can store keys the Store never issued, with the game's `clientId`: refused, they
/// must not look like our credential failing. A key that never renewed raises no alarm as a
/// canary, nor counts towards a wave once the application is seen renewing; the same refusals
/// of keys the Store renewed before still do.
#[test]
fn keys_that_never_renewed_cannot_raise_the_credential_alarm() {
    let t = 1_000 * HOUR;
    let mut g = guard();
    g.success("a", t);
    // A forged canary (never renewed) refused right after it was asked for.
    g.refused("a", 1, Refusals::default(), false, false, t + 1);
    assert_eq!(g.canaries_due(t + 2), ["a"]);
    g.canary_found("a", true, t + 2);
    assert_eq!(
        g.refused("a", 2, Refusals::default(), true, false, t + 3),
        (Verdict::Defer(AWAITING), None),
        "a canary that never renewed proves nothing"
    );
    g.canary_done("a", t + 4);
    // A burst of forged keys, more than the threshold.
    for key in 10..20 {
        let (_, change) = g.refused("a", key, Refusals::default(), false, false, t + 5);
        assert_eq!(change, None, "forged key {key} raised the alarm");
    }
    assert!(g.alarms().is_empty());
    // The same number of keys that renewed before: our credential.
    let raised = (30..33)
        .filter_map(|key| {
            g.refused("a", key, Refusals::default(), false, true, t + 6)
                .1
        })
        .collect::<Vec<_>>();
    assert_eq!(raised, [AlarmChange::Raised]);
}

#[test]
fn a_refused_canary_that_renewed_before_is_our_credential() {
    let t = 1_000 * HOUR;
    let mut g = guard();
    g.success("a", t);
    g.refused("a", 1, Refusals::default(), false, true, t + 1);
    assert_eq!(g.canaries_due(t + 2), ["a"]);
    g.canary_found("a", true, t + 2);
    assert_eq!(
        g.refused("a", 2, Refusals::default(), true, true, t + 3),
        (Verdict::Defer(ALARM), Some(AlarmChange::Raised))
    );
}

/// Where no renewed key is free, the canary is one that never renewed: refused beside a refused
/// key that did renew, that is our credential too.
#[test]
fn an_unproven_canary_refused_beside_a_proven_refusal_raises_the_alarm() {
    let t = 1_000 * HOUR;
    let mut g = guard();
    g.success("a", t);
    g.refused("a", 1, Refusals::default(), false, true, t + 1);
    assert_eq!(g.canaries_due(t + 2), ["a"]);
    g.canary_found("a", true, t + 2);
    assert_eq!(
        g.refused("a", 2, Refusals::default(), true, false, t + 3),
        (Verdict::Defer(ALARM), Some(AlarmChange::Raised))
    );
}
