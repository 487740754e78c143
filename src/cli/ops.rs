//! `run`, `renew`, `check`, `migrate`, `emulator`: the commands that operate the service.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use storekeyd::clock::Clock;
use storekeyd::config::Config;
use storekeyd::daemon::attempt::{Renewer, Settled};
use storekeyd::daemon::ingest;
use storekeyd::ops::metrics::Metrics;
use storekeyd::policy::claims::Kind;
use storekeyd::remote::entra::{self, TokenClient};
use storekeyd::storage::sqlite::{ClaimedRow, Db};
use storekeyd::{daemon, emulator};

use super::{Exit, shutdown_signal, usage};

pub async fn run(config: Arc<Config>) -> anyhow::Result<Exit> {
    let db = Db::open_with(&config.database_url(), config.database_busy_timeout).await?;
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

pub async fn emulator(listen: SocketAddr, apps: &[String]) -> anyhow::Result<Exit> {
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

pub async fn migrate(config: &Config) -> anyhow::Result<Exit> {
    let db = Db::connect(&config.database_url()).await?;
    db.migrate().await?;
    db.check_schema().await?;
    let version = storekeyd::storage::sqlite::migrator()
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    println!("{}: schema at version {version}", config.database_url());
    Ok(Exit::Ok)
}

pub async fn check(config: &Config) -> anyhow::Result<Exit> {
    let mut healthy = true;
    let mut report = |ok: bool, what: String| {
        healthy &= ok;
        println!("{}  {what}", if ok { "ok  " } else { "FAIL" });
    };
    report(
        true,
        format!("configuration ({} applications)", config.applications.len()),
    );
    let url = config.database_url();
    match Db::connect(&url).await {
        Ok(db) => match db.check_schema().await {
            Ok(()) => report(true, format!("database {url}")),
            Err(e) => report(false, format!("database {url}: {e}")),
        },
        Err(e) => report(false, e.to_string()),
    }
    if config.applications.is_empty() {
        report(
            false,
            "no [[applications]] configured: no key can be renewed".to_owned(),
        );
    }
    let http = storekeyd::remote::http::client(&config.http)?;
    for app in &config.applications {
        let credential = match entra::load_credential(app) {
            Ok(c) => c,
            Err(e) => {
                report(false, e.to_string());
                continue;
            }
        };
        let tokens = TokenClient::new(
            config,
            vec![(app.clone(), credential)],
            http.clone(),
            Clock::system(),
            Arc::new(Metrics::default()),
        );
        match tokens.token(&app.client_id).await {
            Ok(t) => report(
                true,
                format!(
                    "application {} ({}): access token {} from {}",
                    app.label(),
                    app.client_id,
                    t.fingerprint,
                    config.entra.authority
                ),
            ),
            Err(e) => report(false, e.to_string()),
        }
    }
    Ok(if healthy { Exit::Ok } else { Exit::Unhealthy })
}

pub async fn renew(
    config: Arc<Config>,
    db: Db,
    row: Option<i64>,
    due: bool,
    dry_run: bool,
) -> anyhow::Result<Exit> {
    let clock = Clock::system();
    let renewer = daemon::build_renewer(config.clone(), db.clone(), clock.clone())?;
    // The daemon owns the alarms: this process honours its credential alarms and writes none.
    renewer.safety.adopt_daemon_alarms().await;
    if !dry_run {
        // Keys written since the daemon last looked are checked first, so they can be renewed.
        while ingest::ingest_pending(&db, &config, clock.now(), config.renew.batch_size).await?
            >= config.renew.batch_size as usize
        {}
    }
    let mut all_ok = true;
    let mut seen = 0;
    loop {
        let rows = next_rows(&renewer, row, due, dry_run).await?;
        if rows.is_empty() {
            break;
        }
        for claimed in rows {
            seen += 1;
            all_ok &= if dry_run {
                dry_run_one(&renewer, &claimed).await?
            } else {
                renew_one(&renewer, claimed).await?
            };
        }
        // One row, or a dry run over what is due: a single pass.
        if row.is_some() || dry_run {
            break;
        }
    }
    if seen == 0 {
        match row {
            Some(id) => return Err(usage(not_claimable(&db, id).await?)),
            None => println!("no key is due"),
        }
    }
    Ok(if all_ok { Exit::Ok } else { Exit::Unhealthy })
}

async fn next_rows(
    renewer: &Renewer,
    row: Option<i64>,
    due: bool,
    dry_run: bool,
) -> anyhow::Result<Vec<ClaimedRow>> {
    let now = renewer.clock.now();
    let lease_until = now + i64::try_from(renewer.config.renew.lease.as_secs()).unwrap_or(600);
    let db = &renewer.db;
    Ok(match (row, due, dry_run) {
        (Some(id), _, true) => db
            .key_row(id)
            .await?
            .map(|(_, key)| ClaimedRow {
                refusals: 0,
                claimed: std::time::Instant::now(),
                id,
                key,
                attempts: 0,
            })
            .into_iter()
            .collect(),
        (Some(id), _, false) => db
            .claim_row(id, now, lease_until)
            .await?
            .into_iter()
            .collect(),
        (None, _, true) => db.due_rows(now, 10_000).await?,
        (None, _, false) => {
            db.claim_due(
                now,
                lease_until,
                renewer.config.renew.batch_size,
                &Kind::ALL,
            )
            .await?
        }
    })
}

async fn not_claimable(db: &Db, id: i64) -> anyhow::Result<String> {
    Ok(match db.key_row(id).await? {
        None => format!("no row #{id}"),
        Some((s, _)) if s.state != "active" => format!(
            "row #{id} is {}, not active{}",
            s.state,
            s.reason.map(|r| format!(": {r}")).unwrap_or_default()
        ),
        Some(_) => format!("row #{id} is being renewed by another process right now"),
    })
}

async fn renew_one(renewer: &Renewer, claimed: ClaimedRow) -> anyhow::Result<bool> {
    let id = claimed.id;
    let settled = renewer.renew(claimed).await?;
    let summary = renewer.db.key_row(id).await?.map(|(s, _)| s);
    let (user, kind, reason, fp) = summary.map_or_else(Default::default, |s| {
        (
            s.user_ref,
            s.kind,
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
    };
    println!("#{id} {user} {kind}: {what}");
    Ok(settled == Settled::Renewed)
}

async fn dry_run_one(renewer: &Renewer, claimed: &ClaimedRow) -> anyhow::Result<bool> {
    let result = renewer.dry_run(claimed).await;
    match &result {
        Ok(plan) => println!("#{}: would {plan}", claimed.id),
        Err(why) => println!("#{}: would not renew: {why}", claimed.id),
    }
    Ok(result.is_ok())
}
