//! `run`, `renew`, `check`, `migrate`, `emulator`: the commands that operate the service.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use storekeyd::clock::Clock;
use storekeyd::config::Config;
use storekeyd::daemon::attempt::{Engine, Settled};
use storekeyd::daemon::{Service, ingest};
use storekeyd::ops::printable::printable;
use storekeyd::policy::checks;
use storekeyd::policy::claims::Kind;
use storekeyd::remote::entra::TokenClient;
use storekeyd::remote::entra::status as credentials;
use storekeyd::remote::server_time::ServerTime;
use storekeyd::storage::{self, ClaimedRow, Storage};
use storekeyd::telemetry::health::Health;
use storekeyd::telemetry::metrics::Metrics;
use storekeyd::{daemon, emulator};

use super::{Exit, shutdown_signal, usage};

pub(super) async fn run(config: Arc<Config>) -> anyhow::Result<Exit> {
    let db = storage::open(&config.database_url(), &config.db_options()).await?;
    let listener = if config.metrics.enabled {
        let addr = config.metrics.listen;
        Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (metrics.listen)"))?,
        )
    } else {
        None
    };
    daemon::run(config, db, Clock::system(), listener, shutdown_signal()?).await?;
    Ok(Exit::Ok)
}

pub(super) async fn emulator(listen: SocketAddr, apps: &[String]) -> anyhow::Result<Exit> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("emulator: cannot listen on {listen}"))?;
    let emu = emulator::for_listener(&listener, Clock::system())?;
    for app in apps {
        let [tenant, client, secret] = app.splitn(3, ':').collect::<Vec<_>>()[..] else {
            return Err(usage(format!(
                "emulator: --app `{app}`: expected TENANT:CLIENT_ID:SECRET"
            )));
        };
        emu.register_app(tenant, client, secret);
    }
    eprintln!("emulator listening on {}", emu.authority());
    emulator::serve(listener, emu, shutdown_signal()?).await?;
    Ok(Exit::Ok)
}

pub(super) async fn migrate(config: &Config) -> anyhow::Result<Exit> {
    let db = storage::connect(&config.database_url(), &config.db_options()).await?;
    db.migrate().await?;
    db.check_schema().await?;
    let version = db.schema_version();
    println!(
        "{}: schema at version {version}",
        storage::redact_url(&config.database_url())
    );
    Ok(Exit::Ok)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    Ok,
    Warn,
    Fail,
}

pub(super) async fn check(config: &Config) -> anyhow::Result<Exit> {
    let mut healthy = true;
    // A warning (a certificate about to end) works today but needs a person: unhealthy too.
    let mut report = |mark: Mark, what: String| {
        healthy &= mark == Mark::Ok;
        let mark = match mark {
            Mark::Ok => "ok  ",
            Mark::Warn => "warn",
            Mark::Fail => "FAIL",
        };
        println!("{mark}  {}", printable(&what));
    };
    report(
        Mark::Ok,
        format!("configuration ({} applications)", config.applications.len()),
    );
    let url = storage::redact_url(&config.database_url());
    match storage::connect(&config.database_url(), &config.db_options()).await {
        Ok(db) => match db.check_schema().await {
            Ok(()) => report(Mark::Ok, format!("database {url}")),
            Err(e) => report(Mark::Fail, format!("database {url}: {e}")),
        },
        Err(e) => report(Mark::Fail, e.to_string()),
    }
    if config.applications.is_empty() {
        report(
            Mark::Fail,
            "no [[applications]] configured: no key can be renewed".to_owned(),
        );
    }
    let http = (
        storekeyd::remote::http::client(&config.http)?,
        storekeyd::remote::http::metadata_client(&config.http)?,
    );
    let tokens = TokenClient::new(
        config,
        http,
        Clock::system(),
        Arc::new(Metrics::default()),
        Arc::new(ServerTime::new(
            config.http.max_clock_offset,
            Clock::system(),
        )),
    )?;
    for app in &config.applications {
        let result = tokens.token(&app.client_id).await;
        let Some(status) = tokens
            .status()
            .into_iter()
            .find(|s| s.client_id == app.client_id)
        else {
            continue;
        };
        let what = format!(
            "application {} ({}), {}",
            app.label(),
            app.client_id,
            credentials::describe(&status)
        );
        match result {
            Ok(t) => report(
                Mark::Ok,
                format!(
                    "{what}: access token {} from {}",
                    t.fingerprint, config.entra.authority
                ),
            ),
            Err(e) => report(Mark::Fail, format!("{what}: {e}")),
        }
        let now = Clock::system().now();
        if let Some(warning) =
            credentials::expiry_warning(&status, now, config.entra.certificate_expiry_warning)
        {
            report(Mark::Warn, warning);
        }
    }
    Ok(if healthy { Exit::Ok } else { Exit::Unhealthy })
}

pub(super) async fn renew(
    config: Arc<Config>,
    db: Arc<dyn Storage>,
    row: Option<i64>,
    due: bool,
    dry_run: bool,
) -> anyhow::Result<Exit> {
    let clock = Clock::system();
    let health = Arc::new(Health::new(std::time::Duration::from_secs(3600)));
    let service = Service::start(
        config.clone(),
        db.clone(),
        clock.clone(),
        health,
        tokio_util::sync::CancellationToken::new(),
    )?;
    let result = renew_with(&service.engine, &config, &*db, row, due, dry_run).await;
    // Every result the Store gave is written (or spooled) before the command returns.
    service.close().await;
    result
}

async fn renew_with(
    engine: &Engine,
    config: &Config,
    db: &dyn Storage,
    row: Option<i64>,
    due: bool,
    dry_run: bool,
) -> anyhow::Result<Exit> {
    // The daemon owns the alarms: this process honours its credential alarms and writes none.
    engine.safety().adopt_daemon_alarms().await;
    // An answer from Entra tells the Store's time, which expiry is judged on (never the host
    // clock alone).
    engine.warm_tokens().await;
    if !dry_run {
        // Keys written since the daemon last looked are checked first, so they can be renewed.
        let batch = config.renew.batch_size;
        while ingest::ingest_pending(db, engine.writer(), config, engine.store_now(), batch).await?
            >= batch as usize
        {}
    }
    if let (Some(id), true) = (row, dry_run) {
        return dry_run_row(engine, db, config, id).await;
    }
    let mut all_ok = true;
    let mut seen = 0;
    loop {
        let rows = next_rows(db, config, engine.store_now(), row, due, dry_run).await?;
        if rows.is_empty() {
            break;
        }
        for claimed in rows {
            seen += 1;
            all_ok &= if dry_run {
                dry_run_one(engine, &claimed).await
            } else {
                renew_one(engine, db, claimed).await?
            };
        }
        // One row, or a dry run over what is due: a single pass.
        if row.is_some() || dry_run {
            break;
        }
    }
    if seen == 0 {
        match row {
            Some(id) => return Err(usage(not_claimable(db, id).await?)),
            None => println!("no key is due"),
        }
    }
    Ok(if all_ok { Exit::Ok } else { Exit::Unhealthy })
}

async fn next_rows(
    db: &dyn Storage,
    config: &Config,
    now: i64,
    row: Option<i64>,
    due: bool,
    dry_run: bool,
) -> anyhow::Result<Vec<ClaimedRow>> {
    let lease_until = now + i64::try_from(config.renew.lease.as_secs()).unwrap_or(600);
    let _ = due;
    Ok(match (row, dry_run) {
        (Some(_), true) => Vec::new(),
        (Some(id), false) => db
            .claim_row(id, now, lease_until)
            .await?
            .into_iter()
            .collect(),
        (None, true) => db.due_rows(now, 10_000).await?,
        (None, false) => {
            db.claim_due(now, lease_until, config.renew.batch_size, &Kind::ALL)
                .await?
        }
    })
}

async fn not_claimable(db: &dyn Storage, id: i64) -> anyhow::Result<String> {
    Ok(match db.key_row(id).await? {
        None => format!("no row #{id}"),
        Some((s, _)) if s.state != storage::State::Active => format!(
            "row #{id} is {}, not active{}",
            s.state,
            s.reason.map(|r| format!(": {r}")).unwrap_or_default()
        ),
        Some(_) => format!("row #{id} is being renewed by another process right now"),
    })
}

async fn renew_one(engine: &Engine, db: &dyn Storage, claimed: ClaimedRow) -> anyhow::Result<bool> {
    let id = claimed.id;
    let settled = engine.attempt(claimed, engine.call_permit()).await?;
    let summary = db.key_row(id).await?.map(|(s, _)| s);
    let (user, kind, reason, fp) = summary.map_or_else(Default::default, |s| {
        (
            s.user_ref,
            s.kind.to_string(),
            s.reason.unwrap_or_default(),
            s.key_fp.unwrap_or_default(),
        )
    });
    let what = match settled {
        Settled::Renewed => format!("renewed: new key {fp}"),
        Settled::Retry => format!("not renewed, will be retried: {reason}"),
        Settled::Flagged(state) => format!("flagged {}: {reason}", state.as_str()),
        Settled::Superseded => "the backend replaced the key meanwhile; result dropped".to_owned(),
        Settled::Deferred => {
            "not attempted: the endpoint is failing for many keys (outage breaker open)".to_owned()
        }
        Settled::LeaseShort => {
            "not sent: the claim's lease ran short while it waited for the rate limit; try again"
                .to_owned()
        }
        Settled::Unwritten => {
            "the database would not take the result; a renewed key waits in the spool file"
                .to_owned()
        }
    };
    println!("{}", printable(&format!("#{id} {user} {kind}: {what}")));
    Ok(settled == Settled::Renewed)
}

/// A rehearsal for one row, active or still pending: its key is checked as ingest would.
async fn dry_run_row(
    engine: &Engine,
    db: &dyn Storage,
    config: &Config,
    id: i64,
) -> anyhow::Result<Exit> {
    let (summary, key) = db
        .key_row(id)
        .await?
        .ok_or_else(|| usage(format!("no row #{id}")))?;
    let claims = match checks::check(summary.kind.as_str(), &key, engine.store_now(), config) {
        Ok(claims) => claims,
        Err(flag) => {
            println!(
                "{}",
                printable(&format!("#{id}: would not renew: {}", flag.reason))
            );
            return Ok(Exit::Unhealthy);
        }
    };
    let row = ClaimedRow {
        id,
        key,
        facts: claims.facts(),
        attempts: 0,
        refusals: storekeyd::storage::Refusals::default(),
        canary: false,
        proven: false,
        unanswered_at: None,
        lease_until: i64::MAX,
    };
    Ok(if dry_run_one(engine, &row).await {
        Exit::Ok
    } else {
        Exit::Unhealthy
    })
}

async fn dry_run_one(engine: &Engine, claimed: &ClaimedRow) -> bool {
    let result = engine.dry_run(claimed).await;
    match &result {
        Ok(plan) => println!("{}", printable(&format!("#{}: would {plan}", claimed.id))),
        Err(why) => println!(
            "{}",
            printable(&format!("#{}: would not renew: {why}", claimed.id))
        ),
    }
    result.is_ok()
}
