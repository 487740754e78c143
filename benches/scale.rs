//! Work per cycle against the number of stored keys: the queries the run loop makes every pass
//! must cost the same at 10 thousand keys and at a million, and an idle daemon must sleep.
//!
//! `cargo bench --bench scale` (10k and 100k keys); `STOREKEYD_BENCH_MAX=1000000 cargo bench
//! --bench scale` adds a million. Prints figures; asserts nothing.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark: failing loudly is the point

use std::sync::Arc;
use std::time::{Duration, Instant};

use storekeyd::clock::Clock;
use storekeyd::config::Config;
use storekeyd::policy::claims::Kind;
use storekeyd::storage;
use tokio_util::sync::CancellationToken;

const DAY: i64 = 86_400;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let max: u64 = std::env::var("STOREKEYD_BENCH_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    println!(
        "{:>9}  {:>10}  {:>10}  {:>10}  {:>10}  {:>12}  {:>14}",
        "keys", "seed s", "pending", "next_due", "claim_due", "key_stats", "idle cpu (5s)"
    );
    for n in [10_000u64, 100_000, 1_000_000]
        .into_iter()
        .filter(|n| *n <= max)
    {
        run(n).await;
    }
}

async fn run(n: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let db = storage::open(&url, &storage::DbOptions::default())
        .await
        .expect("open");
    let now = Clock::system().now();
    let started = Instant::now();
    seed(&url, n, now).await;
    let seed_secs = started.elapsed().as_secs_f64();

    let pending = time(20, || async {
        db.pending(64, now).await.expect("pending").len()
    })
    .await;
    let next_due = time(20, || async {
        db.next_due(&Kind::ALL).await.expect("next_due").is_some()
    })
    .await;
    let claim = time(20, || async {
        db.claim_due(now, now + 120, 64, &Kind::ALL)
            .await
            .expect("claim")
            .len()
    })
    .await;
    let stats = time(3, || async { db.key_stats(now).await.expect("stats").due }).await;
    let idle = idle_cpu(&url).await;
    println!(
        "{n:>9}  {seed_secs:>10.1}  {:>8.0}µs  {:>8.0}µs  {:>8.0}µs  {:>10.1}ms  {:>12.0}ms",
        pending.as_secs_f64() * 1e6,
        next_due.as_secs_f64() * 1e6,
        claim.as_secs_f64() * 1e6,
        stats.as_secs_f64() * 1e3,
        idle.as_secs_f64() * 1e3,
    );
    db.close().await;
}

/// Active keys, none due: renewals spread over the next 14 days, as after a steady state.
/// Written straight into the table (as storekeyd would have left it), through a connection of
/// the benchmark's own.
async fn seed(url: &str, n: u64, now: i64) {
    let pool = sqlx::SqlitePool::connect(url).await.expect("connect");
    sqlx::query(
        "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < ?1)
         INSERT INTO store_keys (user_ref, kind, key, state, key_fp, client_id, issued_at, expires_at, next_attempt_at)
         SELECT 'user-' || i, CASE i % 2 WHEN 0 THEN 'collections' ELSE 'purchase' END,
                'key-' || i, 'active', 'fp', 'app', ?2, ?2 + 30 * 86400, ?3 + 3600 + (i % (14 * 86400))
         FROM seq",
    )
    .bind(n as i64)
    .bind(now - DAY)
    .bind(now)
    .execute(&pool)
    .await
    .expect("seed");
    pool.close().await;
}

/// The median of `runs` runs.
async fn time<F, Fut, T>(runs: usize, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(f().await);
        samples.push(t.elapsed());
    }
    samples.sort();
    samples[runs / 2]
}

/// CPU time the real daemon uses in 5 s against this database when nothing is due.
async fn idle_cpu(url: &str) -> Duration {
    let config = Arc::new(Config {
        database_url: Some(url.to_owned()),
        state_directory: std::path::Path::new(url.trim_start_matches("sqlite://"))
            .parent()
            .map(std::path::Path::to_path_buf),
        ..Config::default()
    });
    let db = storage::open(url, &storage::DbOptions::default())
        .await
        .expect("open");
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(storekeyd::daemon::run(
        config,
        db,
        Clock::system(),
        None,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_time();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let used = cpu_time().saturating_sub(before);
    stop.cancel();
    let _ = daemon.await;
    used
}

/// This process's user + system CPU time, from /proc/self/stat (clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_comm = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the command name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}
