use super::*;

#[test]
fn renders_counters_histograms_and_key_gauges() {
    let m = Metrics::default();
    m.renewals.inc(EventKind::Renewed);
    m.renewals.inc(EventKind::Renewed);
    m.renew_latency.observe(Duration::from_millis(30));
    let keys = KeyStats {
        by_state_kind: vec![(
            crate::policy::state::State::Active,
            crate::policy::claims::Kind::Collections,
            3,
        )],
        earliest_expiry: Some(1_700_000_000),
        due: 1,
        next_due: None,
    };
    let gauges = Gauges {
        ready: true,
        breakers: vec![("purchase".into(), true)],
        credential_alarms: vec![("a\"b".into(), false)],
        credentials: vec![
            ("cert".into(), "certificate", Some(1_900_000_000)),
            ("main".into(), "secret", None),
        ],
        clock_offset: Some(-86_400),
        clock_alarm: true,
    };
    let text = m.render(&keys, &gauges);
    assert!(text.contains("storekeyd_clock_offset_seconds -86400\n"));
    assert!(text.contains("storekeyd_clock_alarm 1\n"));
    assert!(text.contains(
        "storekeyd_credential_expiry_timestamp_seconds{application=\"cert\"} 1900000000\n"
    ));
    assert!(!text.contains("storekeyd_credential_expiry_timestamp_seconds{application=\"main\"}"));
    assert!(text.contains("storekeyd_credential_info{application=\"main\",kind=\"secret\"} 1\n"));
    assert!(text.contains("storekeyd_renewals_total{outcome=\"renewed\"} 2\n"));
    assert!(text.contains("storekeyd_renewals_total{outcome=\"revoked\"} 0\n"));
    assert!(text.contains("storekeyd_renew_request_duration_seconds_bucket{le=\"0.025\"} 0\n"));
    assert!(text.contains("storekeyd_renew_request_duration_seconds_bucket{le=\"0.05\"} 1\n"));
    assert!(text.contains("storekeyd_renew_request_duration_seconds_count 1\n"));
    assert!(text.contains("storekeyd_keys{state=\"active\",kind=\"collections\"} 3\n"));
    assert!(text.contains("storekeyd_earliest_expiry_timestamp_seconds 1700000000\n"));
    assert!(text.contains("storekeyd_ready 1\n"));
    assert!(text.contains("storekeyd_breaker_open{kind=\"purchase\"} 1\n"));
    assert!(
        text.contains("storekeyd_credential_alarm{application=\"a\\\"b\"} 0\n"),
        "{text}"
    );
}
