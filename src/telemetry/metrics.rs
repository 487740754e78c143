//! Prometheus metrics: a small registry of our own, one per daemon (no global recorder, so tests
//! run several daemons in one process), rendered in the text exposition format 0.0.4.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::policy::state::EventKind;
pub use crate::storage::KeyStats;

/// Every outcome a renewal attempt or decision can have; pre-registered at zero so that
/// `rate()` and alerts work from the first scrape.
pub const OUTCOMES: [EventKind; 14] = [
    EventKind::Renewed,
    EventKind::Revoked,
    EventKind::AuthInvalid,
    EventKind::ClientIdMismatch,
    EventKind::Throttled,
    EventKind::Transient,
    EventKind::Unanswered,
    EventKind::AnswerLost,
    EventKind::Unexpected,
    EventKind::TokenError,
    EventKind::Superseded,
    EventKind::Expired,
    EventKind::Invalid,
    EventKind::Misconfigured,
];

/// What a counter is keyed by: an enum, text only when rendered.
pub trait Label: Copy + Ord + 'static {
    fn label(self) -> &'static str;
}

impl Label for EventKind {
    fn label(self) -> &'static str {
        self.as_str()
    }
}

/// Whether a token request got a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TokenOutcome {
    Ok,
    Error,
}

impl Label for TokenOutcome {
    fn label(self) -> &'static str {
        match self {
            TokenOutcome::Ok => "ok",
            TokenOutcome::Error => "error",
        }
    }
}

/// Seconds; renew and token calls are expected well under a second, timeouts at 20 s.
const BUCKETS: [f64; 11] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0];

#[derive(Debug)]
pub struct Counter<L: Label>(Mutex<BTreeMap<L, u64>>);

impl<L: Label> Counter<L> {
    fn with(labels: &[L]) -> Self {
        Counter(Mutex::new(labels.iter().map(|l| (*l, 0)).collect()))
    }

    pub fn inc(&self, label: L) {
        *lock(&self.0).entry(label).or_default() += 1;
    }

    pub fn get(&self, label: L) -> u64 {
        lock(&self.0).get(&label).copied().unwrap_or(0)
    }

    /// Each label's text and count, by text (as the series have always been rendered).
    fn counts(&self) -> Vec<(&'static str, u64)> {
        let mut counts: Vec<_> = lock(&self.0).iter().map(|(l, n)| (l.label(), *n)).collect();
        counts.sort_unstable();
        counts
    }
}

#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bucket, le) in self.buckets.iter().zip(BUCKETS) {
            if secs <= le {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// What the daemon counts as it works.
#[derive(Debug)]
pub struct Metrics {
    pub renewals: Counter<EventKind>,
    pub token_requests: Counter<TokenOutcome>,
    pub renew_latency: Histogram,
    pub token_latency: Histogram,
    pub in_flight: AtomicI64,
    pub last_success: AtomicI64,
    /// The processes sharing the database (and the rate limit), at the last heartbeat.
    pub replicas: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            renewals: Counter::with(&OUTCOMES),
            token_requests: Counter::with(&[TokenOutcome::Ok, TokenOutcome::Error]),
            renew_latency: Histogram::default(),
            token_latency: Histogram::default(),
            in_flight: AtomicI64::new(0),
            last_success: AtomicI64::new(0),
            replicas: AtomicI64::new(1),
        }
    }
}

/// Extra gauges the daemon knows at render time.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub ready: bool,
    /// (kind, open) for every renew endpoint.
    pub breakers: Vec<(String, bool)>,
    /// (application, alarm raised) for every configured application.
    pub credential_alarms: Vec<(String, bool)>,
    /// (application, kind, end of a certificate's validity) for every configured application.
    pub credentials: Vec<(String, &'static str, Option<i64>)>,
    /// Server time minus host time, once an answer told it.
    pub clock_offset: Option<i64>,
    pub clock_alarm: bool,
}

fn render_credentials(out: &mut String, gauges: &Gauges) {
    header(
        out,
        "storekeyd_credential_info",
        "gauge",
        "1 for each application, labelled with the kind of credential it proves itself with.",
    );
    for (app, kind, _) in &gauges.credentials {
        let _ = writeln!(
            out,
            "storekeyd_credential_info{{application=\"{}\",kind=\"{kind}\"}} 1",
            escape(app)
        );
    }
    header(
        out,
        "storekeyd_credential_expiry_timestamp_seconds",
        "gauge",
        "When an application's certificate credential stops being valid (Unix time).",
    );
    for (app, _, expiry) in &gauges.credentials {
        if let Some(t) = expiry {
            let _ = writeln!(
                out,
                "storekeyd_credential_expiry_timestamp_seconds{{application=\"{}\"}} {t}",
                escape(app)
            );
        }
    }
}

fn render_clock(out: &mut String, gauges: &Gauges) {
    if let Some(offset) = gauges.clock_offset {
        header(
            out,
            "storekeyd_clock_offset_seconds",
            "gauge",
            "The Date of the Store's and Entra's last answer minus the host clock.",
        );
        let _ = writeln!(out, "storekeyd_clock_offset_seconds {offset}");
    }
    header(
        out,
        "storekeyd_clock_alarm",
        "gauge",
        "1 while the host clock is further than http.max_clock_offset from the Store's and Entra's.",
    );
    let _ = writeln!(
        out,
        "storekeyd_clock_alarm {}",
        u8::from(gauges.clock_alarm)
    );
}

impl Metrics {
    pub fn render(&self, keys: &KeyStats, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        header(
            &mut out,
            "storekeyd_build_info",
            "gauge",
            "Build information; always 1.",
        );
        let _ = writeln!(
            out,
            "storekeyd_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        self.render_counters(&mut out);
        histogram(
            &mut out,
            "storekeyd_renew_request_duration_seconds",
            "Duration of renew calls to the Store.",
            &self.renew_latency,
        );
        histogram(
            &mut out,
            "storekeyd_token_request_duration_seconds",
            "Duration of access token requests to Entra ID.",
            &self.token_latency,
        );
        header(
            &mut out,
            "storekeyd_renewals_in_flight",
            "gauge",
            "Renewal attempts currently in flight.",
        );
        let _ = writeln!(
            out,
            "storekeyd_renewals_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "storekeyd_replicas",
            "gauge",
            "Processes sharing the database and the rate limit (this one included), at the last heartbeat.",
        );
        let _ = writeln!(
            out,
            "storekeyd_replicas {}",
            self.replicas.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "storekeyd_last_renewal_success_timestamp_seconds",
            "gauge",
            "Unix time of the last successful renewal (0: none since start).",
        );
        let _ = writeln!(
            out,
            "storekeyd_last_renewal_success_timestamp_seconds {}",
            self.last_success.load(Ordering::Relaxed)
        );
        render_keys(&mut out, keys);
        header(
            &mut out,
            "storekeyd_ready",
            "gauge",
            "1 when the database and every application's credential work.",
        );
        let _ = writeln!(out, "storekeyd_ready {}", u8::from(gauges.ready));
        header(
            &mut out,
            "storekeyd_breaker_open",
            "gauge",
            "1 while a renew endpoint's outage breaker is open (renewals paused, probing).",
        );
        for (kind, open) in &gauges.breakers {
            let _ = writeln!(
                out,
                "storekeyd_breaker_open{{kind=\"{kind}\"}} {}",
                u8::from(*open)
            );
        }
        header(
            &mut out,
            "storekeyd_credential_alarm",
            "gauge",
            "1 while many keys of an application are refused at once: its credential, not revocations.",
        );
        for (app, raised) in &gauges.credential_alarms {
            let _ = writeln!(
                out,
                "storekeyd_credential_alarm{{application=\"{}\"}} {}",
                escape(app),
                u8::from(*raised)
            );
        }
        render_credentials(&mut out, gauges);
        render_clock(&mut out, gauges);
        out
    }

    fn render_counters(&self, out: &mut String) {
        header(
            out,
            "storekeyd_renewals_total",
            "counter",
            "Renewal attempts and decisions on keys, by outcome.",
        );
        for (outcome, n) in self.renewals.counts() {
            let _ = writeln!(out, "storekeyd_renewals_total{{outcome=\"{outcome}\"}} {n}");
        }
        header(
            out,
            "storekeyd_token_requests_total",
            "counter",
            "Access token requests to Entra ID, by outcome.",
        );
        for (outcome, n) in self.token_requests.counts() {
            let _ = writeln!(
                out,
                "storekeyd_token_requests_total{{outcome=\"{outcome}\"}} {n}"
            );
        }
    }
}

fn render_keys(out: &mut String, keys: &KeyStats) {
    header(
        out,
        "storekeyd_keys",
        "gauge",
        "Stored keys by state and kind.",
    );
    for (state, kind, n) in &keys.by_state_kind {
        let _ = writeln!(
            out,
            "storekeyd_keys{{state=\"{state}\",kind=\"{kind}\"}} {n}"
        );
    }
    header(
        out,
        "storekeyd_keys_due",
        "gauge",
        "Active keys due for renewal now (the backlog).",
    );
    let _ = writeln!(out, "storekeyd_keys_due {}", keys.due);
    if let Some(exp) = keys.earliest_expiry {
        header(
            out,
            "storekeyd_earliest_expiry_timestamp_seconds",
            "gauge",
            "Unix time at which the first active key expires.",
        );
        let _ = writeln!(out, "storekeyd_earliest_expiry_timestamp_seconds {exp}");
    }
}

/// Label values: backslash, double quote and newline escaped, as the text format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    header(out, name, "histogram", help);
    for (bucket, le) in h.buckets.iter().zip(BUCKETS) {
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{le}\"}} {}",
            bucket.load(Ordering::Relaxed)
        );
    }
    let count = h.count.load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
