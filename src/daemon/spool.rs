//! The spool: renewed keys the database would not take, in an append-only file of JSON lines
//! (mode 0600, fsync'd after every entry) in the state directory. The next start applies it, by
//! compare-and-swap like any write, before it claims anything.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::policy::claims::{KeyFacts, KeyText};
use crate::storage::{Change, DbError, Event, Storage, Write};

/// The spool file's name in the state directory.
pub const FILE_NAME: &str = "storekeyd.spool";

#[derive(Debug, Clone)]
pub struct Spool {
    path: PathBuf,
}

/// One spooled renewal.
#[derive(Serialize, Deserialize)]
struct Entry {
    id: i64,
    /// The bytes of the key that was renewed (base64: a backend may have bound a blob).
    expected: String,
    at: i64,
    key: String,
    facts: KeyFacts,
    next_at: i64,
    event: Option<Event>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool `{path}`: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("spool `{path}` line {line}: {message}")]
    Corrupt {
        path: String,
        line: usize,
        message: String,
    },
}

impl Spool {
    pub fn in_directory(dir: &Path) -> Self {
        Spool {
            path: dir.join(FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one renewal; durable once this returns.
    pub fn append(&self, write: &Write) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let Some(entry) = entry(write) else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let created = !self.path.exists();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)?;
        file.write_all(&line)?;
        file.sync_data()?;
        if created {
            sync_dir(&self.path)?;
        }
        Ok(())
    }

    /// Removes the file once everything in it is in the database.
    pub fn clear(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => sync_dir(&self.path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every entry, in order. A last line cut short by a crash is skipped: its append never
    /// returned, so its attempt was never taken as written.
    pub fn read(&self) -> Result<Vec<Write>, SpoolError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(SpoolError::Io {
                    path: self.path.display().to_string(),
                    source,
                });
            }
        };
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        let mut writes = Vec::new();
        for (n, line) in complete.lines().enumerate() {
            let corrupt = |message: String| SpoolError::Corrupt {
                path: self.path.display().to_string(),
                line: n + 1,
                message,
            };
            let entry: Entry = serde_json::from_str(line).map_err(|e| corrupt(e.to_string()))?;
            writes.push(write(entry).map_err(corrupt)?);
        }
        Ok(writes)
    }
}

fn entry(write: &Write) -> Option<Entry> {
    let Write::Row {
        id,
        expected,
        at,
        change: Change::Renew {
            key,
            facts,
            next_at,
        },
        event,
    } = write
    else {
        return None;
    };
    Some(Entry {
        id: *id,
        expected: STANDARD.encode(expected.cas_bytes()),
        at: *at,
        key: key.expose().to_owned(),
        facts: facts.clone(),
        next_at: *next_at,
        event: event.clone(),
    })
}

fn write(e: Entry) -> Result<Write, String> {
    let expected = STANDARD
        .decode(e.expected)
        .map_err(|_| "`expected` is not base64".to_owned())?;
    Ok(Write::Row {
        id: e.id,
        expected: KeyText::from_bytes(expected),
        at: e.at,
        change: Change::Renew {
            key: KeyText::new(e.key),
            facts: e.facts,
            next_at: e.next_at,
        },
        event: e.event,
    })
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("cannot write the spooled renewals to the database: {0}")]
    Db(#[from] DbError),
    #[error("cannot remove the applied spool `{path}`: {source}")]
    Clear {
        path: String,
        source: std::io::Error,
    },
}

/// Applies what a previous run spooled, retrying while the database is busy, until `stop`.
/// Returns how many renewals it wrote.
pub async fn recover(
    storage: &dyn Storage,
    spool: &Spool,
    stop: &CancellationToken,
) -> Result<usize, RecoverError> {
    let writes = spool.read()?;
    if writes.is_empty() {
        return Ok(0);
    }
    let applied = loop {
        match storage.apply(&writes).await {
            Ok(applied) => break applied,
            Err(e) if e.is_busy() && !stop.is_cancelled() => {
                tracing::warn!(error = %e, "database busy; retrying the spooled renewals");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    spool.clear().map_err(|source| RecoverError::Clear {
        path: spool.path().display().to_string(),
        source,
    })?;
    let written = applied.iter().filter(|ok| **ok).count();
    tracing::info!(
        keys = writes.len(),
        written,
        superseded = writes.len() - written,
        "applied the renewals a previous run spooled"
    );
    Ok(writes.len())
}
