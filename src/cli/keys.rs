//! `status`, `inspect`, `add`, `import`: the commands that read and write keys.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use storekeyd::clock::Clock;
use storekeyd::config::Config;
use storekeyd::ops::import::{self, Format, Line, Record};
use storekeyd::ops::printable::{printable, printable_json};
use storekeyd::ops::report::{self, Inspection, StatusReport};
use storekeyd::policy::claims::{self, KeyText};
use storekeyd::storage::{NewKey, Storage};

use super::{Exit, read_key_arg, usage};

pub(super) async fn status(
    config: &Config,
    db: &dyn Storage,
    within: Option<Duration>,
    limit: u32,
    json: bool,
) -> anyhow::Result<Exit> {
    let window = within.unwrap_or(config.renew.margin);
    let report = StatusReport::build(db, Clock::system().now(), window, limit).await?;
    if json {
        println!(
            "{}",
            printable_json(&serde_json::to_string_pretty(&report)?)
        );
    } else {
        print!("{}", report.render());
    }
    Ok(if report.healthy() {
        Exit::Ok
    } else {
        Exit::Unhealthy
    })
}

pub(super) fn inspect_key(config: &Config, arg: &str, json: bool) -> anyhow::Result<Exit> {
    let key = KeyText::new(read_key_arg(arg)?);
    let claims =
        claims::decode(key.expose()).map_err(|e| usage(format!("not a Store ID key: {e}")))?;
    // No database, so no clock alarm to correct the host clock by.
    let now = Clock::system().now();
    print_inspection(
        &Inspection::new(&key, &claims, config, now, None),
        now,
        json,
    )
}

pub(super) async fn inspect_row(
    config: &Config,
    db: &dyn Storage,
    row: i64,
    json: bool,
) -> anyhow::Result<Exit> {
    let (summary, key) = db
        .key_row(row)
        .await?
        .ok_or_else(|| usage(format!("no row #{row}")))?;
    let (now, _) = report::store_now(db, Clock::system().now()).await?;
    match claims::decode(key.expose()) {
        Ok(claims) => print_inspection(
            &Inspection::new(&key, &claims, config, now, Some(summary)),
            now,
            json,
        ),
        Err(e) => {
            // The row is worth showing even when its key is garbage.
            let row = format!(
                "row #{} {} ({}): state {}, key {}",
                summary.id,
                summary.user_ref,
                summary.kind,
                summary.state,
                key.fingerprint()
            );
            println!("{}", printable(&row));
            println!(
                "{}",
                printable(&format!("the stored key is not a Store ID key: {e}"))
            );
            Ok(Exit::Unhealthy)
        }
    }
}

fn print_inspection(inspection: &Inspection, now: i64, json: bool) -> anyhow::Result<Exit> {
    if json {
        println!(
            "{}",
            printable_json(&serde_json::to_string_pretty(inspection)?)
        );
    } else {
        print!("{}", inspection.render(now));
    }
    Ok(if inspection.expired {
        Exit::Unhealthy
    } else {
        Exit::Ok
    })
}

pub(super) async fn add(
    db: &dyn Storage,
    user_ref: String,
    key_arg: &str,
    kind: Option<&str>,
) -> anyhow::Result<Exit> {
    let key = KeyText::new(read_key_arg(key_arg)?);
    let record = match import::record(user_ref, key, kind) {
        Line::Record(r) => r,
        Line::Reject(why) => return Err(usage(format!("refusing to store the key: {why}"))),
        Line::Skip => return Err(usage("nothing to add")),
    };
    db.store_keys(&[new_key(&record)]).await?;
    let stored = format!(
        "stored {} key {} for {}; it is pending until the daemon checks it",
        record.kind,
        record.key.fingerprint(),
        record.user_ref
    );
    println!("{}", printable(&stored));
    Ok(Exit::Ok)
}

/// Rows per transaction: large enough to be fast, small enough to hold the write lock briefly.
const IMPORT_BATCH: usize = 500;

pub(super) async fn import(
    db: &dyn Storage,
    file: &Path,
    format: Option<Format>,
) -> anyhow::Result<Exit> {
    let reader: Box<dyn std::io::BufRead> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut progress = Progress::new();
    let (mut stored, mut rejected) = (0usize, 0usize);
    let mut batch: Vec<Record> = Vec::with_capacity(IMPORT_BATCH);
    let mut format = format;
    for (n, line) in reader.lines().enumerate() {
        let number = n + 1;
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                rejected += 1;
                eprintln!("line {number}: cannot be read ({e})");
                continue;
            }
        };
        let fmt = *format.get_or_insert_with(|| Format::detect(&line));
        match import::parse_line(fmt, &line) {
            Line::Record(r) => batch.push(r),
            Line::Skip => {}
            Line::Reject(why) => {
                rejected += 1;
                progress.clear();
                eprintln!("line {number}: {}", printable(&why));
            }
        }
        if batch.len() >= IMPORT_BATCH {
            stored += store(db, &mut batch).await?;
            progress.show(stored);
        }
    }
    stored += store(db, &mut batch).await?;
    progress.clear();
    println!("imported {stored} keys, rejected {rejected} lines");
    Ok(if rejected == 0 {
        Exit::Ok
    } else {
        Exit::Unhealthy
    })
}

/// Stores a batch in one transaction, each row with the backend contract's statement.
async fn store(db: &dyn Storage, batch: &mut Vec<Record>) -> anyhow::Result<usize> {
    let keys: Vec<NewKey> = batch.iter().map(new_key).collect();
    db.store_keys(&keys).await?;
    let n = batch.len();
    batch.clear();
    Ok(n)
}

fn new_key(r: &Record) -> NewKey {
    NewKey {
        user_ref: r.user_ref.clone(),
        kind: r.kind,
        key: r.key.clone(),
    }
}

/// A one-line counter on a terminal's stderr; nothing when piped.
struct Progress {
    tty: bool,
    last: Instant,
    shown: bool,
}

impl Progress {
    fn new() -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
            shown: false,
        }
    }

    fn show(&mut self, stored: usize) {
        if self.tty && self.last.elapsed() > Duration::from_millis(100) {
            eprint!("\rimporting… {stored} keys stored");
            let _ = std::io::stderr().flush();
            self.last = Instant::now();
            self.shown = true;
        }
    }

    fn clear(&mut self) {
        if self.shown {
            eprint!("\r\x1b[2K");
            self.shown = false;
        }
    }
}
