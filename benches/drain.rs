//! Throughput and footprint of the real daemon binary against the emulator: how fast it drains a
//! backlog of due keys (the Store answering at once, and after 50 ms), how fast it ingests a bulk
//! load of new keys, and what it costs idling over them.
//!
//! Each scenario gets a fresh emulator, temporary directory and database: SQLite, or a PostgreSQL
//! database of its own on the local server (`STOREKEYD_BENCH_POSTGRES`, an admin URL; default
//! `postgres://postgres@127.0.0.1:5432/postgres`), drained by one replica or three. The bench
//! plays the game backend (its own connection, plain INSERTs in one transaction) and runs
//! `storekeyd --config FILE run` as child processes, reading their CPU time and memory from
//! /proc. The emulator runs in this process, so on a small machine it competes with the daemons
//! for CPU (and PostgreSQL does too).
//!
//! `cargo bench --bench drain` (10k due keys at 0 ms, 5k at 50 ms, each on SQLite, PostgreSQL
//! and three PostgreSQL replicas sharing the concurrency; a million to ingest);
//! `STOREKEYD_BENCH_KEYS=20000 STOREKEYD_BENCH_INGEST=100000 cargo bench --bench drain`;
//! `STOREKEYD_BENCH_ONLY=sqlite,pg1,0ms cargo bench --bench drain` runs only those ([`Only`]).
//! Each drain's rate is given over the whole drain (from the first renewal to the last) and over
//! its middle 60%, with how many calls the Store held meanwhile: start-up and the tail are not
//! what the concurrency bound is about. Prints figures; asserts nothing. Linux only (/proc).
#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark: failing loudly is the point

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr as _;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use storekeyd::clock::Clock;
use storekeyd::config::Config;
use storekeyd::demo;
use storekeyd::emulator::keymint::{self, KeySpec};
use storekeyd::emulator::{self, Emulator, Faults};
use storekeyd::policy::claims::Kind;
use storekeyd::storage::contract::BackendPool;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const TENANT: &str = "bench-tenant";
const APP: &str = "bench-app";
const DAY: i64 = 86_400;
const KEY_LIFETIME: i64 = 30 * DAY;
const CONCURRENCY: usize = 128;
/// The fleet's concurrency whose bound at 50 ms (960/s) fits in two cores' CPU.
const SERVABLE_CONCURRENCY: usize = 48;
/// A drain or an ingest that takes longer than this is broken, not slow.
const GIVE_UP: Duration = Duration::from_secs(600);
const IDLE: Duration = Duration::from_secs(10);

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    println!("{}", machine());
    let keys = env_count("STOREKEYD_BENCH_KEYS");
    let only = Only::from_env();
    let postgres = postgres_reachable().await;
    if !postgres {
        println!(
            "\n(no PostgreSQL at {}: its scenarios are left out)",
            pg_admin()
        );
    }
    for (latency_ms, n) in [(0, keys.unwrap_or(10_000)), (50, keys.unwrap_or(5_000))] {
        if !only.latency(latency_ms) {
            continue;
        }
        if only.scenario("sqlite") {
            drain(latency_ms, n, Db::Sqlite, 1, CONCURRENCY).await;
        }
        if !postgres {
            continue;
        }
        if only.scenario("pg1") {
            drain(latency_ms, n, Db::Postgres, 1, CONCURRENCY).await;
        }
        if only.scenario("pg3") {
            drain(latency_ms, n, Db::Postgres, 3, CONCURRENCY).await;
        }
        if latency_ms > 0 && only.scenario("pg3-servable") {
            // A bound two cores can serve (the one above needs more CPU than the machine
            // has): what is lost here is lost to the replicas' coordination.
            drain(latency_ms, n, Db::Postgres, 3, SERVABLE_CONCURRENCY).await;
        }
    }
    if only.scenario("ingest") {
        ingest_then_idle(env_count("STOREKEYD_BENCH_INGEST").unwrap_or(1_000_000)).await;
    }
}

/// `STOREKEYD_BENCH_ONLY`: a comma-separated choice of scenarios (`sqlite`, `pg1`, `pg3`,
/// `pg3-servable`, `ingest`) and Store latencies (`0ms`, `50ms`); a kind left unnamed runs all
/// of its scenarios. `STOREKEYD_BENCH_ONLY=pg1,0ms` drains one PostgreSQL replica at 0 ms only.
struct Only(Vec<String>);

impl Only {
    fn from_env() -> Only {
        let raw = std::env::var("STOREKEYD_BENCH_ONLY").unwrap_or_default();
        Only(
            raw.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        )
    }

    fn latency(&self, ms: u64) -> bool {
        let named: Vec<&String> = self.0.iter().filter(|s| s.ends_with("ms")).collect();
        named.is_empty() || named.iter().any(|s| **s == format!("{ms}ms"))
    }

    fn scenario(&self, name: &str) -> bool {
        let named: Vec<&String> = self.0.iter().filter(|s| !s.ends_with("ms")).collect();
        named.is_empty() || named.iter().any(|s| *s == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Db {
    Sqlite,
    Postgres,
}

fn pg_admin() -> String {
    std::env::var("STOREKEYD_BENCH_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

async fn postgres_reachable() -> bool {
    use sqlx::Connection as _;
    sqlx::PgConnection::connect(&pg_admin()).await.is_ok()
}

async fn pg_admin_run(sql: String) {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&pg_admin())
        .await
        .expect("PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .expect("admin statement");
}

/// One scenario's world: an emulator, a directory holding the config (and the SQLite database),
/// and the backend's own connection to the database.
struct Bench {
    emu: Arc<Emulator>,
    emu_stop: CancellationToken,
    config_path: PathBuf,
    backend: BackendPool,
    /// The PostgreSQL database to drop at the end.
    pg_database: Option<String>,
    _dir: TempDir,
}

impl Bench {
    async fn new() -> Bench {
        Bench::on(Db::Sqlite, CONCURRENCY).await
    }

    /// `concurrency`: each daemon's.
    async fn on(db: Db, concurrency: usize) -> Bench {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let emu = emulator::for_listener(&listener, Clock::system()).expect("emulator");
        let emu_stop = CancellationToken::new();
        tokio::spawn(emulator::serve(listener, emu.clone(), emu_stop.clone()));
        let dir = tempfile::tempdir().expect("tempdir");
        let pg_database =
            (db == Db::Postgres).then(|| format!("storekeyd_bench_{}", std::process::id()));
        let url = match &pg_database {
            Some(name) => {
                pg_admin_run(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                pg_admin_run(format!("CREATE DATABASE {name}")).await;
                let admin = pg_admin();
                let base = admin
                    .rsplit_once('/')
                    .map_or(admin.as_str(), |(b, _)| b)
                    .to_owned();
                format!("{base}/{name}")
            }
            None => format!("sqlite://{}", dir.path().join("bench.db").display()),
        };
        let config = config(&emu, &dir, url, concurrency);
        // As the e2e harness's `write_config_to`: the binary reads what the bench configured.
        let config_path = dir.path().join("storekeyd.toml");
        std::fs::write(&config_path, toml::to_string(&config).expect("toml")).expect("config");
        // The schema comes from the binary, as in production; the backend only writes rows.
        let status = storekeyd(&config_path, "migrate")
            .status()
            .await
            .expect("run storekeyd migrate");
        assert!(status.success(), "storekeyd migrate failed: {status}");
        let backend = backend(&config.database_url()).await;
        Bench {
            emu,
            emu_stop,
            config_path,
            backend,
            pg_database,
            _dir: dir,
        }
    }

    async fn finish(self) {
        match &self.backend {
            BackendPool::Sqlite(pool) => pool.close().await,
            BackendPool::Postgres(pool) => pool.close().await,
        }
        if let Some(name) = &self.pg_database {
            pg_admin_run(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
        }
        self.emu_stop.cancel();
    }

    fn sqlite(&self) -> &SqlitePool {
        match &self.backend {
            BackendPool::Sqlite(pool) => pool,
            BackendPool::Postgres(_) => panic!("a SQLite scenario"),
        }
    }
}

/// As `tests/e2e/harness.rs::test_config` builds it, with the brakes off: the bound on
/// throughput is `renew.concurrency`, never the rate limit or the poll interval.
fn config(emu: &Emulator, dir: &TempDir, url: String, concurrency: usize) -> Config {
    let mut config = Config {
        database_url: Some(url),
        state_directory: Some(dir.path().to_path_buf()),
        ..Config::default()
    };
    demo::point_at_emulator(&mut config, emu);
    demo::add_emulated_application(&mut config, emu, dir.path(), TENANT, APP, "bench-secret")
        .expect("application");
    let r = &mut config.renew;
    r.concurrency = concurrency;
    r.rate_limit = 1_000_000.0;
    r.batch_size = 1024;
    r.poll_interval = Duration::from_secs(1);
    config.metrics.enabled = false;
    config.validate().expect("a valid config");
    config
}

/// The game backend's connection: on SQLite WAL like the daemon's, and patient with its locks.
async fn backend(url: &str) -> BackendPool {
    if url.starts_with("postgres") {
        return BackendPool::Postgres(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(url)
                .await
                .expect("connect to PostgreSQL"),
        );
    }
    let options = SqliteConnectOptions::from_str(url)
        .expect("database URL")
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30));
    BackendPool::Sqlite(
        SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .expect("open the database"),
    )
}

/// Inserts `n` rows as a backend does, in one transaction; returns the time spent in the
/// database. Keys are minted in chunks outside the clock: minting is the Store's work, not the
/// backend's, and a million keys at once would hold a gigabyte here.
async fn seed(pool: &BackendPool, n: usize, key_for: impl FnMut(&str) -> String) -> Duration {
    match pool {
        BackendPool::Sqlite(pool) => seed_sqlite(pool, n, key_for).await,
        BackendPool::Postgres(pool) => seed_postgres(pool, n, key_for).await,
    }
}

/// The rows of one chunk of [`seed`].
fn chunk(
    start: usize,
    n: usize,
    key_for: &mut impl FnMut(&str) -> String,
) -> Vec<(String, String)> {
    (start..(start + SEED_CHUNK).min(n))
        .map(|i| {
            let user = format!("user-{i}");
            let key = key_for(&user);
            (user, key)
        })
        .collect()
}

const SEED_CHUNK: usize = 10_000;

async fn seed_postgres(
    pool: &sqlx::PgPool,
    n: usize,
    mut key_for: impl FnMut(&str) -> String,
) -> Duration {
    let mut spent = Duration::ZERO;
    let mut tx = pool.begin().await.expect("begin");
    for start in (0..n).step_by(SEED_CHUNK) {
        let rows = chunk(start, n, &mut key_for);
        let t = Instant::now();
        for (user, key) in &rows {
            sqlx::query("INSERT INTO store_keys (user_ref, kind, key) VALUES ($1, $2, $3)")
                .bind(user.as_str())
                .bind(Kind::Collections.as_str())
                .bind(key.as_str())
                .execute(&mut *tx)
                .await
                .expect("insert");
        }
        spent += t.elapsed();
    }
    let t = Instant::now();
    tx.commit().await.expect("commit");
    spent + t.elapsed()
}

async fn seed_sqlite(
    pool: &SqlitePool,
    n: usize,
    mut key_for: impl FnMut(&str) -> String,
) -> Duration {
    let mut spent = Duration::ZERO;
    let mut tx = pool.begin().await.expect("begin");
    for start in (0..n).step_by(SEED_CHUNK) {
        let rows = chunk(start, n, &mut key_for);
        let t = Instant::now();
        for (user, key) in &rows {
            sqlx::query("INSERT INTO store_keys (user_ref, kind, key) VALUES (?, ?, ?)")
                .bind(user.as_str())
                .bind(Kind::Collections.as_str())
                .bind(key.as_str())
                .execute(&mut *tx)
                .await
                .expect("insert");
        }
        spent += t.elapsed();
    }
    let t = Instant::now();
    tx.commit().await.expect("commit");
    spent + t.elapsed()
}

/// The daemon's counters at one instant.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    cpu: f64,
    /// The PostgreSQL server's processes (0 on SQLite): on a small machine its CPU is what the
    /// daemons and the emulator cannot have.
    server_cpu: f64,
    /// This process: the emulator and the sampling.
    emulator_cpu: f64,
    renewed: u64,
}

fn sample(emu: &Emulator, pids: &[u32], db: Db) -> Sample {
    Sample {
        at: Instant::now(),
        cpu: pids.iter().map(|p| cpu_secs(*p)).sum(),
        server_cpu: if db == Db::Postgres {
            postgres_cpu()
        } else {
            0.0
        },
        emulator_cpu: cpu_secs(std::process::id()),
        renewed: emu.stats().renewed,
    }
}

/// CPU seconds of every process named `postgres` (the server and its backends).
fn postgres_cpu() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(cpu_secs)
        .sum()
}

/// `n` due keys stored before the daemons start: `replicas` of them, sharing
/// `fleet_concurrency`. The rate runs from the first renewal the emulator answers to the last, so
/// process start-up and the first access token stay out of it.
async fn drain(latency_ms: u64, n: usize, db: Db, replicas: usize, fleet_concurrency: usize) {
    let concurrency = fleet_concurrency.div_ceil(replicas);
    let bench = Bench::on(db, concurrency).await;
    let emu = &bench.emu;
    emu.set_faults(Faults {
        latency_ms,
        ..Faults::default()
    });
    // Issued 20 days ago: past max_age (14 days), so every key is due the moment the daemon reads it.
    let issued_at = emu.clock.now() - 20 * DAY;
    seed(&bench.backend, n, |user| {
        emu.mint_at(Kind::Collections, APP, user, KEY_LIFETIME, issued_at)
    })
    .await;
    let started = Instant::now();
    let mut daemons: Vec<Child> = (0..replicas).map(|_| spawn(&bench)).collect();
    let pids: Vec<u32> = daemons
        .iter()
        .map(|d| d.id().expect("the daemon's pid"))
        .collect();
    let mut first = None;
    let mut steady = Steady::default();
    let last = loop {
        // Only the counts each turn: reading /proc for every process costs CPU the daemons
        // would miss.
        let stats = emu.stats();
        let renewed = stats.renewed;
        steady.observe(n, renewed, stats.renew_requests);
        if first.is_none() && renewed > 0 {
            first = Some(sample(emu, &pids, db));
        }
        if renewed >= n as u64 {
            break sample(emu, &pids, db);
        }
        for daemon in &mut daemons {
            watch(daemon, started, "draining");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Before SIGTERM: a process that has exited has no memory figures left.
    let peak_mb = pids
        .iter()
        .map(|p| status_mb(*p, "VmHWM"))
        .fold(0.0, f64::max);
    for daemon in daemons {
        stop(daemon).await;
    }
    bench.finish().await;
    let first = first.unwrap_or(last);
    let what = match (db, replicas) {
        (Db::Sqlite, _) => "SQLite".to_owned(),
        (Db::Postgres, 1) => "PostgreSQL".to_owned(),
        (Db::Postgres, r) => format!("PostgreSQL, {r} replicas of concurrency {concurrency}"),
    };
    report_drain(
        latency_ms,
        n,
        &what,
        concurrency * replicas,
        started,
        (first, last, &steady),
        peak_mb,
    );
}

/// The drain's middle, from a fifth of the keys renewed to four fifths: its rate, and how many
/// calls the Store held on average (what the concurrency bound assumes is always full). Start-up
/// (processes, tokens, the first checks of new keys) and the last keys' tail stay out of it.
#[derive(Default)]
struct Steady {
    from: Option<(Instant, u64)>,
    to: Option<(Instant, u64)>,
    calls_sum: f64,
    samples: u32,
}

impl Steady {
    fn observe(&mut self, n: usize, renewed: u64, requests: u64) {
        let n = n as u64;
        if renewed < n / 5 || renewed > n * 4 / 5 {
            return;
        }
        let now = (Instant::now(), renewed);
        self.from.get_or_insert(now);
        self.to = Some(now);
        // Requests the emulator took and has not answered yet (no faults: every one renews).
        self.calls_sum += requests.saturating_sub(renewed) as f64;
        self.samples += 1;
    }

    fn rate(&self) -> Option<f64> {
        let ((t0, r0), (t1, r1)) = (self.from?, self.to?);
        let secs = t1.duration_since(t0).as_secs_f64();
        (secs > 0.0).then(|| (r1 - r0) as f64 / secs)
    }

    fn calls(&self) -> Option<f64> {
        (self.samples > 0).then(|| self.calls_sum / f64::from(self.samples))
    }
}

fn report_drain(
    latency_ms: u64,
    n: usize,
    what: &str,
    concurrency: usize,
    started: Instant,
    (first, last, steady): (Sample, Sample, &Steady),
    mb: f64,
) {
    // Renewals answered before the first sample are not in the window either.
    let renewed = (last.renewed - first.renewed).max(1) as f64;
    let rate = renewed / last.at.duration_since(first.at).as_secs_f64().max(1e-3);
    let to_first = first.at.duration_since(started).as_secs_f64();
    println!(
        "\ndrain on {what}, Store latency {latency_ms} ms: {n} due keys, concurrency {concurrency}"
    );
    line("first renewal after", format!("{:.0} ms", to_first * 1e3));
    line("renewals/s", format!("{rate:.0}"));
    let middle = steady.rate().unwrap_or(rate);
    line("renewals/s, middle 60%", format!("{middle:.0}"));
    if latency_ms == 0 {
        line("bound (concurrency / latency)", "n/a");
    } else {
        let bound = concurrency as f64 * 1000.0 / latency_ms as f64;
        line("bound (concurrency / latency)", format!("{bound:.0}/s"));
        line(
            "share of bound",
            format!(
                "{:.0} % (middle 60%: {:.0} %)",
                rate / bound * 100.0,
                middle / bound * 100.0
            ),
        );
        if let Some(calls) = steady.calls() {
            line(
                "calls at the Store, middle 60%",
                format!("{calls:.1} of {concurrency} on average"),
            );
        }
    }
    let per_renewal = |secs: f64| secs / renewed * 1e6;
    line(
        "daemon CPU per renewal",
        format!("{:.0} µs (all replicas)", per_renewal(last.cpu - first.cpu)),
    );
    if last.server_cpu > 0.0 {
        line(
            "PostgreSQL CPU per renewal",
            format!(
                "{:.0} µs (every server process)",
                per_renewal(last.server_cpu - first.server_cpu)
            ),
        );
    }
    line(
        "emulator CPU per renewal",
        format!(
            "{:.0} µs (the bench process)",
            per_renewal(last.emulator_cpu - first.emulator_cpu)
        ),
    );
    line(
        "daemon peak RSS",
        format!("{mb:.1} MB (the largest replica)"),
    );
}

/// A bulk load of keys that are not due: the backend's insert rate, then the daemon's ingest
/// rate (decode, check, schedule) until no row is pending, then the same daemon idling.
async fn ingest_then_idle(n: usize) {
    let bench = Bench::new().await;
    let spec = KeySpec {
        kind: Kind::Collections,
        client_id: APP.to_owned(),
        user_id: String::new(),
        issued_at: bench.emu.clock.now(),
        lifetime_secs: KEY_LIFETIME,
        refresh_uri: bench.emu.renew_url(Kind::Collections),
    };
    // Not in the emulator's registry: these keys are never renewed, and a million of them there
    // would only cost this process memory.
    let insert = seed(&bench.backend, n, |user| {
        keymint::mint(&KeySpec {
            user_id: user.to_owned(),
            ..spec.clone()
        })
    })
    .await
    .as_secs_f64();
    println!("\ningest: {n} new keys, none due");
    let rate = n as f64 / insert;
    line(
        "backend insert",
        format!("{rate:.0} rows/s ({insert:.1} s)"),
    );
    let started = Instant::now();
    let mut daemon = spawn(&bench);
    let pid = daemon.id().expect("the daemon's pid");
    while any_pending(bench.sqlite()).await {
        watch(&mut daemon, started, "ingesting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed().as_secs_f64();
    // All of it since exec: start-up is part of what a restart over a backlog costs.
    let cpu_us = cpu_secs(pid) / n as f64 * 1e6;
    let rate = n as f64 / took;
    line("daemon ingest", format!("{rate:.0} rows/s ({took:.1} s)"));
    line("daemon CPU per row", format!("{cpu_us:.1} µs"));
    idle(&mut daemon, pid, "the daemon that ingested them").await;
    stop(daemon).await;
    // What a daemon (re)started over a million stored keys holds.
    let mut daemon = spawn(&bench);
    let pid = daemon.id().expect("the daemon's pid");
    idle(&mut daemon, pid, "a daemon started over them").await;
    stop(daemon).await;
    bench.finish().await;
}

/// Whether a row is still pending. EXISTS stops at the first entry of the partial index, where
/// COUNT(*) would walk up to a million entries every poll, taking CPU from the daemon measured.
async fn any_pending(pool: &SqlitePool) -> bool {
    let exists: i64 =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM store_keys WHERE state = 'pending')")
            .fetch_one(pool)
            .await
            .expect("look for pending rows");
    exists != 0
}

/// A daemon over the ingested keys with none due: it should sleep, and hold little memory.
async fn idle(daemon: &mut Child, pid: u32, which: &str) {
    // Let the pass that ingested the last rows (or the first pass) finish first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = cpu_secs(pid);
    tokio::time::sleep(IDLE).await;
    watch(daemon, Instant::now(), "idling");
    let used_ms = (cpu_secs(pid) - before) * 1e3;
    println!("\nidle: {which}, keys stored, none due");
    let label = format!("daemon CPU in {} s", IDLE.as_secs());
    line(&label, format!("{used_ms:.0} ms"));
    line("daemon RSS", format!("{:.1} MB", status_mb(pid, "VmRSS")));
}

/// `storekeyd --config FILE COMMAND`, the real binary; its warnings go to this stderr.
fn storekeyd(config: &Path, command: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_storekeyd"));
    cmd.arg("--config")
        .arg(config)
        .arg(command)
        .env("STOREKEYD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd
}

fn spawn(bench: &Bench) -> Child {
    storekeyd(&bench.config_path, "run")
        .spawn()
        .expect("start storekeyd run")
}

/// Panics if the daemon died, or if `started` is more than [`GIVE_UP`] ago.
fn watch(daemon: &mut Child, started: Instant, what: &str) {
    if let Some(status) = daemon.try_wait().expect("the daemon's status") {
        panic!("the daemon exited ({status}) while {what}; its log is above");
    }
    let limit = GIVE_UP.as_secs();
    assert!(
        started.elapsed() < GIVE_UP,
        "gave up: {what} took over {limit} s"
    );
}

/// SIGTERM, as systemd stops it (and as the e2e harness's `sigterm`), then up to 30 s for a
/// clean exit before SIGKILL.
async fn stop(mut daemon: Child) {
    let pid = daemon.id().expect("the daemon is running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed");
    let exited = tokio::time::timeout(Duration::from_secs(30), daemon.wait()).await;
    if exited.is_err() {
        eprintln!("the daemon ignored SIGTERM for 30 s; killing it");
        daemon.kill().await.expect("kill the daemon");
    }
}

/// User + system CPU time of a process in seconds: fields 14 and 15 of /proc/PID/stat.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count from after its closing parenthesis.
    let after_comm = stat.rsplit(')').next().unwrap_or_default();
    let ticks: u64 = after_comm
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    ticks as f64 / ticks_per_sec()
}

/// A `Vm*` figure of /proc/PID/status (given in kB), in MB.
fn status_mb(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn ticks_per_sec() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        output_of("getconf", &["CLK_TCK"])
            .and_then(|t| t.parse().ok())
            .unwrap_or(100.0)
    })
}

fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    out.status.success().then_some(text)
}

/// The header line; reads CLK_TCK up front so no `getconf` runs while the daemon is measured.
fn machine() -> String {
    let cpus = output_of("nproc", &[]).unwrap_or_else(|| "?".to_owned());
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim());
    let hz = ticks_per_sec();
    format!("storekeyd drain bench: {cpus} CPUs (nproc), {model}, CLK_TCK {hz}")
}

/// A count from the environment; `100_000` works as well as `100000`.
fn env_count(name: &str) -> Option<usize> {
    let raw = std::env::var(name).ok()?;
    let n = raw.replace('_', "").parse();
    Some(n.unwrap_or_else(|_| panic!("{name}={raw}: expected a number of keys")))
}

/// One `name: value` line, values aligned, ready to paste into docs/performance.md.
fn line(name: &str, value: impl Display) {
    let label = format!("{name}:");
    println!("  {label:<32}{value}");
}
