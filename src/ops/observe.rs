//! The loopback HTTP listener: `/metrics` (Prometheus), `/healthz` (the process and its loop are
//! alive) and `/readyz` (database and credentials work).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::attempt::Engine;
use crate::ops::metrics::Gauges;
use crate::storage::{DbError, KeyStats, Storage};

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

/// Liveness: the run loop beats on every pass.
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    last_beat_ms: AtomicU64,
    stale_after: Duration,
    /// The last database write failure (locked, read-only, full), until a write succeeds again.
    db_error: std::sync::Mutex<Option<String>>,
}

impl Health {
    pub fn new(stale_after: Duration) -> Self {
        Health {
            epoch: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            stale_after,
            db_error: std::sync::Mutex::new(None),
        }
    }

    pub fn beat(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_beat_ms.store(ms, Ordering::Relaxed);
    }

    pub fn db_failed(&self, error: &DbError) {
        *self
            .db_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error.to_string());
    }

    /// A write went through: the database is writable again.
    pub fn db_ok(&self) {
        *self
            .db_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    pub fn db_error(&self) -> Option<String> {
        self.db_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn alive(&self) -> bool {
        let last = Duration::from_millis(self.last_beat_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last) < self.stale_after
    }
}

/// What the listener reads: the engine's live state and the database.
#[derive(Clone)]
pub struct Observer {
    engine: Arc<Engine>,
    storage: Arc<dyn Storage>,
    config: Arc<Config>,
    health: Arc<Health>,
    cache: Arc<Mutex<Option<(Instant, KeyStats)>>>,
    schema: Arc<Mutex<Option<(Instant, Check)>>>,
}

impl Observer {
    pub fn new(
        engine: Arc<Engine>,
        storage: Arc<dyn Storage>,
        config: Arc<Config>,
        health: Arc<Health>,
    ) -> Self {
        Observer {
            engine,
            storage,
            config,
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
        let stats = self.storage.key_stats(self.engine.store_now()).await?;
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
        let clock = self.engine.server_time().alarm().map_or(Ok(()), Err);
        checks.push(("clock".to_owned(), clock));
        let alarms = self.engine.safety().credential_alarms();
        for status in self.engine.credential_status() {
            let mut result = status
                .last
                .unwrap_or_else(|| Err("no access token requested yet".to_owned()));
            if alarms.contains(&status.client_id) {
                result =
                    Err("credential alarm: the Store refuses many of its keys at once".to_owned());
            }
            checks.push((format!("application {}", status.label), result));
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
    crate::ops::listener::serve(listener, router(observer), shutdown).await
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
    let open = o.engine.safety().open_breakers();
    let alarms = o.engine.safety().credential_alarms();
    let gauges = Gauges {
        ready,
        breakers: crate::policy::claims::Kind::ALL
            .iter()
            .map(|k| (k.to_string(), open.contains(k)))
            .collect(),
        credential_alarms: o
            .config
            .applications
            .iter()
            .map(|a| (a.label().to_owned(), alarms.contains(&a.client_id)))
            .collect(),
        credentials: o
            .engine
            .credential_status()
            .into_iter()
            .map(|s| {
                let expiry = s.certificate.as_ref().map(|c| c.not_after);
                (s.label, s.kind.as_str(), expiry)
            })
            .collect(),
        clock_offset: o.engine.server_time().offset(),
        clock_alarm: o.engine.server_time().alarm().is_some(),
    };
    let body = o.engine.metrics().render(&keys, &gauges);
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
