//! Command-line definitions and dispatch.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use storekeyd::clock::Clock;
use storekeyd::config::Config;
use storekeyd::db::Db;
use storekeyd::telemetry::{self, LogFormat};
use storekeyd::{daemon, demo, emulator};
use tokio_util::sync::CancellationToken;

/// Keeps Microsoft Store ID keys fresh: reads them from your database, renews each one before it
/// expires, writes the new key back, and flags the keys the Store has revoked.
#[derive(Debug, Parser)]
#[command(name = "storekeyd", version, propagate_version = true)]
pub struct Cli {
    /// The configuration file (TOML). Without one, the defaults and STOREKEYD_* variables apply.
    #[arg(long, short, global = true, env = "STOREKEYD_CONFIG")]
    config: Option<PathBuf>,
    /// Log format: human-readable or one JSON object per line.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "STOREKEYD_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: ingest new keys, renew due ones, until SIGTERM or Ctrl-C.
    Run,
    /// Watch the real daemon renew one-minute keys against a local emulator, on a temporary
    /// database. Nothing to configure.
    Demo {
        /// How long to run before printing the summary.
        #[arg(long, default_value = "45s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Serve a local stand-in for the Store's renew endpoints and Entra ID's token endpoint,
    /// for tests and CI. See the README for its admin API.
    Emulator {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8433")]
        listen: SocketAddr,
        /// Register an application as TENANT:CLIENT_ID:SECRET (repeatable); more can be added
        /// with POST /admin/applications.
        #[arg(long = "app", value_name = "TENANT:CLIENT_ID:SECRET")]
        apps: Vec<String>,
    },
}

pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run => {
            telemetry::init(cli.log_format, "storekeyd=info");
            let config = Arc::new(Config::load(cli.config.as_deref())?);
            let db = Db::open(&config.database_url()).await?;
            let stop = shutdown_signal()?;
            daemon::run(config, db, Clock::system(), stop).await?;
        }
        Command::Demo { duration } => {
            telemetry::init(cli.log_format, "error");
            demo::run(duration, shutdown_signal()?).await?;
        }
        Command::Emulator { listen, apps } => {
            telemetry::init(cli.log_format, "info");
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("emulator: cannot listen on {listen}"))?;
            let emu = emulator::for_listener(&listener, Clock::system())?;
            for app in &apps {
                let [tenant, client, secret] = app.splitn(3, ':').collect::<Vec<_>>()[..] else {
                    anyhow::bail!("emulator: --app `{app}`: expected TENANT:CLIENT_ID:SECRET");
                };
                emu.register_app(tenant, client, secret);
            }
            eprintln!("emulator listening on {}", emu.authority());
            emulator::serve(listener, emu, shutdown_signal()?).await?;
        }
    }
    Ok(())
}

/// Cancelled on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
fn shutdown_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stop requested");
        t.cancel();
    });
    Ok(token)
}
