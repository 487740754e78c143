//! `storekeyd demo`: the real daemon against the emulator on a temporary SQLite database, with
//! keys that live a minute so renewals happen while you watch.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{Application, Config};
use crate::daemon::{self, DaemonError};
use crate::emulator::{self, Emulator, Faults};
use crate::policy::claims::{KeyText, Kind};
use crate::storage::{self, DbError, NewKey, Storage};

const TENANT: &str = "demo-tenant";
const APPS: [&str; 2] = ["demo-app-1", "demo-app-2"];
/// The demo's faults follow this seed: the same script of 503s and 429s on every run.
const DEMO_SEED: u64 = 43;
/// Demo keys live a minute, so the first renewals come within about 15 seconds.
const KEY_LIFETIME_SECS: i64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("demo: the daemon task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The demo's configuration for an emulator at `emu`, with secrets in files under `dir`.
pub fn config(emu: &Emulator, dir: &Path) -> Result<Config, std::io::Error> {
    let mut config = Config {
        database_url: Some(format!("sqlite://{}", dir.join("storekeyd.db").display())),
        state_directory: Some(dir.to_path_buf()),
        ..Config::default()
    };
    point_at_emulator(&mut config, emu);
    for client_id in APPS {
        let secret = format!("secret-{:016x}", fastrand::u64(..));
        add_emulated_application(&mut config, emu, dir, TENANT, client_id, &secret)?;
    }
    let r = &mut config.renew;
    r.margin = Duration::from_secs(42);
    r.jitter = Duration::from_secs(3);
    r.poll_interval = Duration::from_secs(1);
    r.backoff_base = Duration::from_secs(1);
    r.backoff_cap = Duration::from_secs(4);
    r.lease = Duration::from_secs(25);
    r.shutdown_grace = Duration::from_secs(5);
    config.http.request_timeout = Duration::from_secs(5);
    // One-minute keys: a canary may be seconds old, and is asked for every few seconds.
    config.guard.canary_interval = Duration::from_secs(5);
    config.guard.canary_min_age = Duration::from_secs(5);
    Ok(config)
}

/// Points `config` at the emulator: both renew endpoints and the Entra authority.
pub fn point_at_emulator(config: &mut Config, emu: &Emulator) {
    config.endpoints.collections = emu.renew_url(Kind::Collections);
    config.endpoints.purchase = emu.renew_url(Kind::Purchase);
    config.entra.authority = emu.authority();
}

/// Registers an application with the emulator and configures it, its secret in a new 0600 file
/// in `dir`.
pub fn add_emulated_application(
    config: &mut Config,
    emu: &Emulator,
    dir: &Path,
    tenant: &str,
    client_id: &str,
    secret: &str,
) -> std::io::Result<()> {
    emu.register_app(tenant, client_id, secret);
    let path = dir.join(format!("{client_id}.secret"));
    write_private(&path, secret)?;
    config.applications.push(Application {
        name: Some(client_id.to_owned()),
        tenant_id: tenant.to_owned(),
        client_id: client_id.to_owned(),
        client_secret_file: Some(path),
        ..Application::default()
    });
    Ok(())
}

/// Writes a new file readable by its owner only (secrets).
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

/// Runs the demo for `duration` or until `stop` is cancelled (Ctrl-C).
pub async fn run(duration: Duration, stop: CancellationToken) -> Result<(), DemoError> {
    let dir = tempfile::tempdir()?;
    let clock = Clock::system();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let emu = emulator::for_listener(&listener, clock.clone())?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(emulator::serve(listener, emu.clone(), shutdown.clone()));

    let config = Arc::new(config(&emu, dir.path())?);
    let db = storage::open(&config.database_url(), &config.db_options()).await?;
    println!(
        "storekeyd demo: emulator at {}, database {}",
        emu.authority(),
        config.database_url()
    );
    seed(&emu, &*db).await?;
    // Some turbulence, so retries show up too.
    emu.set_faults(Faults {
        error_503_rate: 0.15,
        throttle_rate: 0.05,
        retry_after_secs: 1,
        seed: Some(DEMO_SEED),
        ..Faults::default()
    });
    println!(
        "emulator answers 15% of renewals with 503 and 5% with 429; running for {}s (Ctrl-C stops)\n",
        duration.as_secs()
    );

    let daemon_stop = CancellationToken::new();
    let daemon = tokio::spawn(daemon::run(
        config.clone(),
        db.clone(),
        clock,
        None,
        daemon_stop.clone(),
    ));
    let started = Instant::now();
    let mut last_event = 0;
    let deadline = tokio::time::sleep(duration);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => break,
            () = stop.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(250)) => {
                last_event = print_events(&*db, last_event, started).await?;
            }
        }
        if daemon.is_finished() {
            break;
        }
    }
    daemon_stop.cancel();
    daemon.await??;
    // The daemon closed its pool on the way out; read the final state through a new one.
    let db = storage::open(&config.database_url(), &config.db_options()).await?;
    print_events(&*db, last_event, started).await?;
    summary(&*db, &emu).await?;
    db.close().await;
    shutdown.cancel();
    let _ = server.await;
    Ok(())
}

/// Four healthy players, one whose key the Store revokes, one whose key expired before it was
/// stored, one minted for an application this daemon has no credential for, and one row that is
/// not a key at all: every state a row can end in, on every run.
async fn seed(emu: &Emulator, db: &dyn Storage) -> Result<(), DbError> {
    let mut rows = Vec::new();
    for (i, kind) in [
        Kind::Collections,
        Kind::Purchase,
        Kind::Collections,
        Kind::Collections,
    ]
    .into_iter()
    .enumerate()
    {
        let user = format!("player-{}", i + 1);
        let app = APPS[i % 2];
        rows.push((
            user.clone(),
            kind,
            emu.mint(kind, app, &user, KEY_LIFETIME_SECS),
        ));
    }
    // Issued a little earlier than the others, so it comes up first: storekeyd believes the
    // Store's refusal once a renewal of another key of the application, begun after it,
    // succeeds (a canary, renewed early, if none is due).
    let revoked = emu.mint_at(
        Kind::Collections,
        APPS[0],
        "player-revoked",
        KEY_LIFETIME_SECS,
        emu.clock.now() - 5,
    );
    emu.revoke_key(&revoked);
    rows.push(("player-revoked".into(), Kind::Collections, revoked));
    let expired = emu.mint_at(
        Kind::Collections,
        APPS[1],
        "player-expired",
        KEY_LIFETIME_SECS,
        emu.clock.now() - 2 * KEY_LIFETIME_SECS,
    );
    rows.push(("player-expired".into(), Kind::Collections, expired));
    rows.push((
        "player-other-app".into(),
        Kind::Purchase,
        emu.mint(Kind::Purchase, "unconfigured-app", "p", KEY_LIFETIME_SECS),
    ));
    rows.push((
        "player-garbage".into(),
        Kind::Collections,
        "this-is-not-a-key".into(),
    ));
    let keys: Vec<NewKey> = rows
        .iter()
        .map(|(user, kind, key)| NewKey {
            user_ref: user.clone(),
            kind: *kind,
            key: KeyText::new(key.as_str()),
        })
        .collect();
    db.store_keys(&keys).await?;
    println!(
        "seeded {} rows with the backend's upsert statement (keys live {KEY_LIFETIME_SECS}s)",
        rows.len()
    );
    Ok(())
}

async fn print_events(db: &dyn Storage, after: i64, started: Instant) -> Result<i64, DbError> {
    let mut last = after;
    for e in db.events(after, 1000).await? {
        last = e.id;
        let status = e
            .http_status
            .map(|s| format!("HTTP {s}"))
            .unwrap_or_default();
        let kind = e.kind.map_or_else(|| "?".to_owned(), |k| k.to_string());
        println!(
            "{:>6.1}s  {:<17} {kind:<12} {:<19} {status:<9} {}",
            started.elapsed().as_secs_f64(),
            e.user_ref.as_deref().unwrap_or("?"),
            e.event.as_str(),
            e.detail.unwrap_or_default()
        );
    }
    Ok(last)
}

async fn summary(db: &dyn Storage, emu: &Emulator) -> Result<(), DbError> {
    println!("\nfinal state of every row:");
    for row in db.keys(0, 1000).await? {
        println!(
            "  {:<17} {:<14} renewed {} times  {}",
            row.user_ref,
            row.state,
            row.renewals,
            row.reason.unwrap_or_default()
        );
    }
    let s = emu.stats();
    println!(
        "\nemulator: {} token requests, {} renew requests ({} renewed), answers by status {:?}",
        s.token_requests, s.renew_requests, s.renewed, s.renew_by_status
    );
    Ok(())
}
