//! Recovery: the spools of processes that are gone, applied by compare-and-swap, a batch at a
//! time, then removed.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use super::{BATCH, Spool, SpoolError};
use crate::storage::{DbError, Storage, Write};

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

/// Applies what earlier processes spooled in `dir`, retrying while the database is busy, until
/// `stop`. Returns how many renewals it wrote.
pub async fn recover(
    storage: &dyn Storage,
    dir: &Path,
    stop: &CancellationToken,
) -> Result<usize, RecoverError> {
    let mut total = 0;
    for spool in Spool::orphans(dir)? {
        total += recover_one(storage, &spool, stop).await?;
    }
    Ok(total)
}

async fn recover_one(
    storage: &dyn Storage,
    spool: &Spool,
    stop: &CancellationToken,
) -> Result<usize, RecoverError> {
    let mut reader = match spool.reader() {
        Ok(reader) => reader,
        Err(e) => {
            tracing::error!(error = %e, "cannot read a spool file; its renewed keys are not written until it can be read");
            return Ok(0);
        }
    };
    let (mut keys, mut written, mut skipped) = (0, 0, 0);
    loop {
        let (writes, s) = match reader.next_batch(BATCH) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(error = %e, "cannot read a spool file; its renewed keys are not written until it can be read");
                return Ok(written);
            }
        };
        skipped += s;
        if writes.is_empty() {
            break;
        }
        // Applied again after a crash, a batch's writes lose their compare-and-swap: harmless.
        let applied = apply_retrying(storage, &writes, stop).await?;
        keys += writes.len();
        written += applied.iter().filter(|ok| **ok).count();
    }
    if skipped > 0 {
        tracing::warn!(spool = %spool.path().display(), lines = skipped, "skipped spool lines that do not parse (an append cut short)");
    }
    spool.clear().map_err(|source| RecoverError::Clear {
        path: spool.path().display().to_string(),
        source,
    })?;
    tracing::info!(
        spool = %spool.path().display(),
        keys,
        written,
        superseded = keys - written,
        "applied the renewals an earlier run spooled"
    );
    Ok(written)
}

async fn apply_retrying(
    storage: &dyn Storage,
    writes: &[Write],
    stop: &CancellationToken,
) -> Result<Vec<bool>, RecoverError> {
    loop {
        match storage.apply(writes).await {
            Ok(applied) => return Ok(applied),
            Err(e) if e.is_busy() && !stop.is_cancelled() => {
                tracing::warn!(error = %e, "database busy; retrying the spooled renewals");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
