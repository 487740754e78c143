//! Command-line definitions, dispatch and exit codes.

mod keys;
mod ops;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory as _, Parser, Subcommand};
use storekeyd::config::{Config, ConfigError, LogFormat};
use storekeyd::ops::import::Format;
use storekeyd::storage::{self, Storage};
use storekeyd::telemetry::logs as telemetry;
use tokio_util::sync::CancellationToken;

/// Exit codes; documented in the README and in `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// Done, and everything is healthy.
    Ok = 0,
    /// Something failed inside storekeyd or its environment (database, I/O, network).
    Internal = 1,
    /// Bad usage: wrong arguments, an invalid configuration, input that is not a key.
    Usage = 2,
    /// It worked, and found something unhealthy: flagged or expiring keys, a failing
    /// credential, a renewal that did not succeed, rejected import lines.
    Unhealthy = 3,
}

/// An error that is the caller's to fix (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub String);

pub(crate) fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

const AFTER_HELP: &str = "\
Exit codes: 0 ok; 1 internal error (database, I/O, network); 2 bad usage, invalid configuration \
or input; 3 done, but something is unhealthy (flagged or expiring keys, a failing credential, a \
renewal that did not succeed, rejected import lines).

Configuration: --config FILE or STOREKEYD_CONFIG; any setting can be overridden with STOREKEYD_* \
variables (STOREKEYD_RENEW__MARGIN=3d). Logs: STOREKEYD_LOG sets the filter (storekeyd=debug).";

/// Keeps Microsoft Store ID keys fresh: reads them from your database, renews each one before it
/// expires, writes the new key back, and flags the keys the Store has revoked.
#[derive(Debug, Parser)]
#[command(name = "storekeyd", version, propagate_version = true, after_help = AFTER_HELP)]
pub(crate) struct Cli {
    /// The configuration file (TOML). Without one, the defaults and STOREKEYD_* variables apply.
    #[arg(long, short, global = true, env = "STOREKEYD_CONFIG")]
    config: Option<PathBuf>,
    /// Log format: human-readable or one JSON object per line [default: from the config, else human]
    #[arg(long, global = true, value_enum, env = "STOREKEYD_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: ingest new keys, renew due ones, until SIGTERM or Ctrl-C. Applies
    /// pending migrations first.
    Run,
    /// The daemon's alarms, counts by state and kind, the next renewal, keys expiring soon, and
    /// the flagged keys with their reasons. Exits 3 if an alarm is raised or a key is flagged or
    /// expiring.
    Status {
        /// Report active keys that expire within this window [default: renew.margin]
        #[arg(long, value_parser = humantime::parse_duration)]
        within: Option<Duration>,
        /// How many flagged and expiring keys to list.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Decode a key and show its claims, times and fingerprint; never its payload or the key.
    Inspect {
        /// The key, or `-` to read it from stdin (keeps it out of your shell history).
        #[arg(conflicts_with = "row", required_unless_present = "row")]
        key: Option<String>,
        /// Inspect the key stored in this row instead.
        #[arg(long)]
        row: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Store one key for a user, exactly as a backend does (the row starts `pending`).
    Add {
        /// Your reference for the player.
        user_ref: String,
        /// The key, or `-` (the default) to read it from stdin.
        #[arg(default_value = "-")]
        key: String,
        /// `collections` or `purchase` [default: from the key's aud claim]
        #[arg(long)]
        kind: Option<String>,
    },
    /// Store many keys from JSON lines ({"user_ref", "key", "kind"?}) or CSV (user_ref,key[,kind]).
    /// Valid lines are stored even when others are rejected; each rejection is reported with its
    /// line number. Exits 3 if any line was rejected.
    Import {
        /// The file to read, or `-` for stdin.
        #[arg(default_value = "-")]
        file: PathBuf,
        /// The input format [default: detected from the first line]
        #[arg(long, value_enum)]
        format: Option<Format>,
    },
    /// Renew one row, or every key due now, and report each outcome. Exits 3 if any attempt
    /// did not renew its key.
    Renew {
        /// The row to renew, due or not.
        #[arg(long, conflicts_with = "due", required_unless_present = "due")]
        row: Option<i64>,
        /// Every key that is due now.
        #[arg(long)]
        due: bool,
        /// Check everything up to the renew call (claims, configuration, an access token) and
        /// say what would be sent where; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate the configuration, open the database, and fetch an access token for every
    /// application; print what works and what does not. Exits 3 if anything fails.
    Check,
    /// Apply pending database migrations and print the schema version.
    Migrate,
    /// Watch the real daemon renew one-minute keys against a local emulator, on a temporary
    /// database. Nothing to configure.
    Demo {
        /// How long to run before printing the summary.
        #[arg(long, default_value = "45s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Serve a local stand-in for the Store's renew endpoints and Entra ID's token endpoint,
    /// for tests and CI. See docs/emulator.md for its admin API.
    Emulator {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8433")]
        listen: SocketAddr,
        /// Register an application as TENANT:CLIENT_ID:SECRET (repeatable); more can be added
        /// with POST /admin/applications.
        #[arg(long = "app", value_name = "TENANT:CLIENT_ID:SECRET")]
        apps: Vec<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

pub(crate) async fn execute(cli: Cli) -> ExitCode {
    let result = dispatch(cli).await;
    let exit = match result {
        Ok(exit) => exit,
        Err(e) => {
            // An error may quote a stored reason or a claim a player wrote.
            let text = chain(&e);
            eprintln!("storekeyd: {}", storekeyd::ops::printable::printable(&text));
            if e.downcast_ref::<UsageError>().is_some() || e.downcast_ref::<ConfigError>().is_some()
            {
                Exit::Usage
            } else {
                Exit::Internal
            }
        }
    };
    ExitCode::from(exit as u8)
}

async fn dispatch(cli: Cli) -> anyhow::Result<Exit> {
    let config_path = cli.config.clone();
    let load = || Config::load(config_path.as_deref());
    let log = |config: Option<&Config>, default: &str| {
        let format = cli
            .log_format
            .or(config.map(|c| c.log.format))
            .unwrap_or_default();
        telemetry::init(format, default);
    };
    match cli.command {
        Command::Run => {
            let config = Arc::new(load()?);
            log(Some(&config), "storekeyd=info");
            ops::run(config).await
        }
        Command::Demo { duration } => {
            log(None, "error");
            storekeyd::demo::run(duration, shutdown_signal()?).await?;
            Ok(Exit::Ok)
        }
        Command::Emulator { listen, apps } => {
            log(None, "info");
            ops::emulator(listen, &apps).await
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "storekeyd",
                &mut std::io::stdout(),
            );
            Ok(Exit::Ok)
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(Exit::Ok)
        }
        command => {
            let config = load()?;
            log(Some(&config), "storekeyd=warn");
            with_config(command, config).await
        }
    }
}

async fn with_config(command: Command, config: Config) -> anyhow::Result<Exit> {
    match command {
        Command::Check => return ops::check(&config).await,
        Command::Migrate => return ops::migrate(&config).await,
        Command::Inspect {
            key: Some(key),
            row: None,
            json,
        } => return keys::inspect_key(&config, &key, json),
        _ => {}
    }
    let db = open_existing(&config).await?;
    match command {
        Command::Status {
            within,
            limit,
            json,
        } => keys::status(&config, &*db, within, limit, json).await,
        Command::Inspect {
            row: Some(row),
            json,
            ..
        } => keys::inspect_row(&config, &*db, row, json).await,
        Command::Add {
            user_ref,
            key,
            kind,
        } => keys::add(&*db, user_ref, &key, kind.as_deref()).await,
        Command::Import { file, format } => keys::import(&*db, &file, format).await,
        Command::Renew { row, due, dry_run } => {
            ops::renew(Arc::new(config), db, row, due, dry_run).await
        }
        _ => Err(usage("this command does not take these arguments")),
    }
}

/// Opens the database without migrating it, and refuses an outdated schema with the fix.
async fn open_existing(config: &Config) -> anyhow::Result<Arc<dyn Storage>> {
    let db = storage::connect(&config.database_url(), &config.db_options()).await?;
    db.check_schema().await?;
    Ok(db)
}

/// Cancelled on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
pub(crate) fn shutdown_signal() -> anyhow::Result<CancellationToken> {
    use anyhow::Context as _;
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

/// The error and its causes, skipping causes whose text the message already includes (our
/// error types spell out their source).
fn chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

/// Reads a key given as an argument, or from stdin for `-`.
pub(crate) fn read_key_arg(arg: &str) -> anyhow::Result<String> {
    if arg != "-" {
        return Ok(arg.trim().to_owned());
    }
    let mut buf = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin().lock().take(1 << 20), &mut buf)?;
    Ok(buf.trim().to_owned())
}

use std::io::Read as _;
