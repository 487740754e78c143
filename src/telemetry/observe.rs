//! The loopback HTTP listener: `/metrics` (Prometheus), `/healthz` (the process and its loop are
//! alive) and `/readyz` (database and credentials work).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::policy::claims::Kind;
use crate::storage::{DbError, KeyStats, Storage};
use crate::telemetry::health::Health;
use crate::telemetry::metrics::{Gauges, Metrics};

/// Database-derived gauges are recomputed at most this often, however often Prometheus scrapes:
/// counting by state and kind reads an index of the whole table (about 50 ms at a million keys).
const KEY_STATS_TTL: Duration = Duration::from_secs(30);
/// Readiness asks the database at most this often (the rest of it is in memory): a client
/// hammering `/readyz` or `/metrics` costs the database nothing more.
const SCHEMA_CHECK_TTL: Duration = Duration::from_secs(1);

/// One readiness check's result: why it fails, if it does.
type Check = Result<(), String>;
/// Every readiness check with its result.
type Checks = Vec<(String, Check)>;

/// The live state the listener reports, as the running service sees it: a narrow view, so
/// the listener depends on no part of the service but this.
pub trait Live: Send + Sync {
    /// Now on the Store's clock: what the loop judges due keys by.
    fn store_now(&self) -> i64;
    /// Server time minus host time, once an answer told it.
    fn clock_offset(&self) -> Option<i64>;
    /// The clock alarm's text, while it is raised.
    fn clock_alarm(&self) -> Option<String>;
    /// Kinds whose renew endpoint's outage breaker is open.
    fn open_breakers(&self) -> Vec<Kind>;
    /// Client IDs under a credential alarm.
    fn credential_alarms(&self) -> Vec<String>;
    /// Each configured application's credential, and how its last token request went.
    fn credentials(&self) -> Vec<Credential>;
    /// The counters and histograms the service records.
    fn metrics(&self) -> &Metrics;
}

/// One application's credential as the listener reports it.
#[derive(Debug, Clone)]
pub struct Credential {
    pub client_id: String,
    /// The application's label in metrics and logs.
    pub label: String,
    /// `secret`, `certificate`, …
    pub kind: &'static str,
    /// A certificate's end of validity, Unix seconds.
    pub not_after: Option<i64>,
    /// The last token request: none yet, or how it went.
    pub last: Option<Result<(), String>>,
}

/// What the listener reads: the service's live state and the database.
#[derive(Clone)]
pub struct Observer {
    live: Arc<dyn Live>,
    storage: Arc<dyn Storage>,
    health: Arc<Health>,
    cache: Arc<Mutex<Option<(Instant, KeyStats)>>>,
    schema: Arc<Mutex<Option<(Instant, Check)>>>,
}

impl Observer {
    pub fn new(live: Arc<dyn Live>, storage: Arc<dyn Storage>, health: Arc<Health>) -> Self {
        Observer {
            live,
            storage,
            health,
            cache: Arc::default(),
            schema: Arc::default(),
        }
    }

    /// Whether the database answers with the expected schema, at most [`SCHEMA_CHECK_TTL`] old;
    /// callers meanwhile wait for the one check under way.
    async fn schema_check(&self) -> Check {
        let mut cache = self.schema.lock().await;
        if let Some((at, result)) = cache.as_ref()
            && at.elapsed() < SCHEMA_CHECK_TTL
        {
            return result.clone();
        }
        let result = self.storage.check_schema().await.map_err(|e| e.to_string());
        *cache = Some((Instant::now(), result.clone()));
        result
    }

    /// Key statistics, from a cache no older than [`KEY_STATS_TTL`]: what is due judged on the
    /// Store's time, as the loop judges it (on the host's, a host clock a month ahead would
    /// count every key as backlog).
    pub async fn key_stats(&self) -> Result<KeyStats, DbError> {
        let mut cache = self.cache.lock().await;
        if let Some((at, stats)) = cache.as_ref()
            && at.elapsed() < KEY_STATS_TTL
        {
            return Ok(stats.clone());
        }
        let stats = self.storage.key_stats(self.live.store_now()).await?;
        *cache = Some((Instant::now(), stats.clone()));
        Ok(stats)
    }

    /// Every readiness check with its result; ready when all pass.
    pub async fn readiness(&self) -> Checks {
        let mut checks = Vec::new();
        let db = self.schema_check().await;
        let db = db.and_then(|()| match self.health.db_error() {
            Some(e) => Err(format!("the last write failed: {e}")),
            None => Ok(()),
        });
        checks.push(("database".to_owned(), db));
        let clock = self.live.clock_alarm().map_or(Ok(()), Err);
        checks.push(("clock".to_owned(), clock));
        let alarms = self.live.credential_alarms();
        for credential in self.live.credentials() {
            let mut result = credential
                .last
                .unwrap_or_else(|| Err("no access token requested yet".to_owned()));
            if alarms.contains(&credential.client_id) {
                result =
                    Err("credential alarm: the Store refuses many of its keys at once".to_owned());
            }
            checks.push((format!("application {}", credential.label), result));
        }
        checks
    }
}

pub fn router(observer: Observer) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(observer)
}

pub async fn serve(
    listener: TcpListener,
    observer: Observer,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    crate::telemetry::listener::serve(listener, router(observer), shutdown).await
}

async fn metrics(State(o): State<Observer>) -> Response {
    let keys = match o.key_stats().await {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot read key statistics");
            KeyStats::default()
        }
    };
    let ready = o.readiness().await.iter().all(|(_, r)| r.is_ok());
    let open = o.live.open_breakers();
    let alarms = o.live.credential_alarms();
    let credentials = o.live.credentials();
    let gauges = Gauges {
        ready,
        breakers: Kind::ALL
            .iter()
            .map(|k| (k.to_string(), open.contains(k)))
            .collect(),
        credential_alarms: credentials
            .iter()
            .map(|c| (c.label.clone(), alarms.contains(&c.client_id)))
            .collect(),
        credentials: credentials
            .into_iter()
            .map(|c| (c.label, c.kind, c.not_after))
            .collect(),
        clock_offset: o.live.clock_offset(),
        clock_alarm: o.live.clock_alarm().is_some(),
    };
    let body = o.live.metrics().render(&keys, &gauges);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn healthz(State(o): State<Observer>) -> Response {
    if o.health.alive() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the run loop has not completed a pass recently\n",
        )
            .into_response()
    }
}

async fn readyz(State(o): State<Observer>) -> Response {
    let checks = o.readiness().await;
    let ready = checks.iter().all(|(_, r)| r.is_ok());
    let mut body = String::new();
    for (name, result) in &checks {
        match result {
            Ok(()) => body.push_str(&format!("ok    {name}\n")),
            Err(e) => body.push_str(&format!("fail  {name}: {e}\n")),
        }
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body).into_response()
}
