//! The spool: renewed keys the database would not take, in an append-only file of JSON lines
//! (mode 0600, fsync'd after every entry) in `spool/` under the state directory (mode 0700: the
//! state directory itself is shared with the backend's group), one file per process
//! (`storekeyd-<pid>-<random>.spool`), held under an exclusive lock while its process lives, so
//! that a `storekeyd renew` and the daemon never remove each other's entries. The daemon applies
//! every file whose lock it can take (its process is gone), by compare-and-swap like any write:
//! at start before it claims anything, and every minute while it runs.
//!
//! A spool is applied only if it is what storekeyd writes: a regular file (opened without
//! following a link and without blocking, so a FIFO or a link to `/dev/zero` is refused, not
//! waited on or read forever) of the service's own user, mode 0600, of a bounded size, read a
//! batch at a time with bounded lines.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

mod files;
mod recover;

use files::{MAX_FILE, Reader, open_checked, private_dir, sync_dir};
pub use recover::{RecoverError, recover};

use crate::policy::claims::{KeyFacts, KeyText};
use crate::storage::{Change, Event, Write};

/// Spool files are `storekeyd-<pid>-<random>.spool` in [`DIR`] under the state directory.
const PREFIX: &str = "storekeyd-";
const SUFFIX: &str = ".spool";
/// The spools' own directory, which only the service's user may enter.
const DIR: &str = "spool";
/// Entries applied per transaction, so recovery holds a batch in memory, not a file.
const BATCH: usize = 1024;

#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    /// Open and locked from the first append until the file is removed.
    file: std::sync::Mutex<Option<std::fs::File>>,
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
    /// A spool of this process's own under the state directory `dir` (created, with its
    /// private directory, at its first entry).
    pub fn for_process(dir: &Path) -> Self {
        let name = format!(
            "{PREFIX}{}-{:08x}{SUFFIX}",
            std::process::id(),
            fastrand::u32(..)
        );
        Spool::at(dir.join(DIR).join(name))
    }

    fn at(path: PathBuf) -> Self {
        Spool {
            path,
            file: std::sync::Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one renewal; durable once this returns. A failed append is cut off again.
    pub fn append(&self, write: &Write) -> std::io::Result<()> {
        self.append_with(write, |file, line| {
            file.write_all(line).and_then(|()| file.sync_data())
        })
    }

    /// [`Spool::append`], with `put` writing and syncing the line (tests make it fail).
    fn append_with(
        &self,
        write: &Write,
        put: impl FnOnce(&mut std::fs::File, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let Some(entry) = entry(write) else {
            return Ok(());
        };
        // Each entry starts a line of its own: whatever a crash (or a failed rollback) left at
        // the end of the file stays on its own line and is skipped, never joined to this one.
        let mut line = vec![b'\n'];
        serde_json::to_writer(&mut line, &entry).map_err(std::io::Error::other)?;
        let mut held = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.is_none() {
            *held = Some(self.create()?);
        }
        let Some(file) = held.as_mut() else {
            return Err(std::io::Error::other("spool file not open"));
        };
        let len = file.metadata()?.len();
        if let Err(e) = put(file, &line) {
            let _ = file.set_len(len);
            // A file with no entry goes (still locked, so no recovery has it): the writer
            // removes its spool only once it applied what it spooled, and on a full disk, where
            // the first append is the one that fails, an empty file would stay while the
            // process lives.
            if len == 0 && std::fs::remove_file(&self.path).is_ok() {
                *held = None;
                let _ = sync_dir(&self.path);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Creates the file (it must not exist: the name is this process's) and locks it for as long
    /// as this process holds it. It is locked under a name no recovery looks at, then renamed:
    /// created under its own name, a recovery could take it (unlocked, empty) and remove it
    /// before the lock, and the entries would go to a file no longer in the directory.
    fn create(&self) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt as _;
        if let Some(dir) = self.path.parent() {
            private_dir(dir)?;
        }
        let mut staging = self.path.clone().into_os_string();
        staging.push(".new");
        let staging = PathBuf::from(staging);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&staging)?;
        if let Err(e) = file.lock() {
            // Recovery never looks at the staging name: nobody else would remove it.
            let _ = std::fs::remove_file(&staging);
            return Err(e);
        }
        // Never over an existing spool: its entries would be gone.
        let renamed = rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staging,
            rustix::fs::CWD,
            &self.path,
            rustix::fs::RenameFlags::NOREPLACE,
        );
        if let Err(e) = renamed {
            let _ = std::fs::remove_file(&staging);
            return Err(e.into());
        }
        if let Err(e) = sync_dir(&self.path) {
            // Removed while locked: left, it would be an empty spool under this spool's name,
            // which no later create may rename over.
            let _ = std::fs::remove_file(&self.path);
            return Err(e);
        }
        Ok(file)
    }

    /// Removes the file once everything in it is in the database.
    pub fn clear(&self) -> std::io::Result<()> {
        // Removed while still locked, so no other process takes it for an orphan meanwhile.
        let mut held = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let removed = std::fs::remove_file(&self.path);
        *held = None;
        match removed {
            Ok(()) => sync_dir(&self.path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every entry, in order (tests; recovery reads a batch at a time).
    #[cfg(test)]
    fn read(&self) -> Result<(Vec<Write>, usize), SpoolError> {
        let mut reader = self.reader()?;
        let (mut writes, mut skipped) = (Vec::new(), 0);
        loop {
            let (batch, s) = reader.next_batch(BATCH)?;
            skipped += s;
            if batch.is_empty() {
                return Ok((writes, skipped));
            }
            writes.extend(batch);
        }
    }

    /// Reads the entries from the start of the file this spool holds.
    fn reader(&self) -> Result<Reader, SpoolError> {
        let failed = |source| SpoolError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let held = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The file this process holds (and locks), read from its start: appends go to its end
        // whatever the offset.
        let mut file = match held.as_ref() {
            Some(file) => file.try_clone().map_err(failed)?,
            None => open_checked(&self.path, false).map_err(failed)?,
        };
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0)).map_err(failed)?;
        Ok(Reader {
            path: self.path.display().to_string(),
            lines: std::io::BufReader::new(std::io::Read::take(file, MAX_FILE)),
        })
    }

    /// The spools under the state directory `dir` whose process is gone: the ones whose lock
    /// can be taken. Each comes back locked (by this process) until it is applied and removed.
    /// The state directory itself is looked in too, for what a version before `spool/` left.
    fn orphans(dir: &Path) -> Result<Vec<Spool>, SpoolError> {
        let mut orphans = Vec::new();
        for dir in [dir.join(DIR), dir.to_owned()] {
            orphans.extend(Spool::orphans_in(&dir)?);
        }
        orphans.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(orphans)
    }

    fn orphans_in(dir: &Path) -> Result<Vec<Spool>, SpoolError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(SpoolError::Io {
                    path: dir.display().to_string(),
                    source,
                });
            }
        };
        let mut orphans = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let ours = name
                .to_str()
                .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX));
            if !ours {
                continue;
            }
            let path = entry.path();
            let file = match open_checked(&path, true) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(spool = %path.display(), error = %e, "refusing a spool file; its renewed keys, if any, are not written until it is storekeyd's own");
                    continue;
                }
            };
            // Held by a live process (another daemon, a `renew` still running): not ours to take.
            if file.try_lock().is_err() {
                continue;
            }
            orphans.push(Spool {
                path,
                file: std::sync::Mutex::new(Some(file)),
            });
        }
        Ok(orphans)
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

#[cfg(test)]
mod tests;
