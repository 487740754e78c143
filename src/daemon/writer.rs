//! The one writer per database (group commit). Attempts and ingest hand it their writes; it
//! applies whatever has arrived as one transaction (bounded by [`MAX_BATCH`] rows; while writes
//! stream in, a batch waits a few milliseconds for more), so a backlog costs one fsync per
//! batch instead of one per key. A renewed key is held until it is durable:
//! the writer retries a failing batch, keeps the leases of the rows it holds, and past
//! `spool_after` appends the renewals to the spool file, which the next start applies.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::daemon::spool::Spool;
use crate::remote::server_time::ServerTime;
use crate::storage::{Change, Storage, Write};
use crate::telemetry::health::Health;

/// At most this many writes go into one transaction.
pub const MAX_BATCH: usize = 1024;
/// While the daemon stops, renewals that can be neither written nor spooled are given up after
/// this long (with an error naming how many), so a stop still ends before systemd kills it.
const STOPPING_GIVE_UP: Duration = Duration::from_secs(10);
const RETRY_FIRST: Duration = Duration::from_millis(50);
/// How long a batch waits for more writes before it is committed.
const GATHER: Duration = Duration::from_millis(5);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What became of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Applied,
    /// The row no longer held the key that was read: the backend's write won.
    Superseded,
    /// The database stayed unwritable: the renewal is in the spool file, applied later.
    Spooled,
    /// The database stayed unwritable and this was no renewal: the row is retried after its
    /// lease, as if the attempt had not happened.
    Dropped,
}

#[derive(Debug, thiserror::Error)]
#[error("the database writer has stopped")]
pub struct WriterGone;

struct Job {
    write: Write,
    done: Option<oneshot::Sender<Written>>,
}

/// Hands writes to the writer task; cloned by whoever writes.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Job>,
    held: Arc<Mutex<HashSet<i64>>>,
}

impl WriterHandle {
    /// Writes and waits until the write is durable (or dropped, for anything but a renewal).
    pub async fn write(&self, write: Write) -> Result<Written, WriterGone> {
        let (done, answer) = oneshot::channel();
        self.send_job(write, Some(done)).await?;
        answer.await.map_err(|_| WriterGone)
    }

    /// Writes a batch (ingest) and waits for all of it.
    pub async fn write_all(&self, writes: Vec<Write>) -> Result<Vec<Written>, WriterGone> {
        let mut answers = Vec::with_capacity(writes.len());
        for write in writes {
            let (done, answer) = oneshot::channel();
            self.send_job(write, Some(done)).await?;
            answers.push(answer);
        }
        let mut written = Vec::with_capacity(answers.len());
        for answer in answers {
            written.push(answer.await.map_err(|_| WriterGone)?);
        }
        Ok(written)
    }

    /// Queues a write without waiting for it (an event that changes no row).
    pub async fn send(&self, write: Write) -> Result<(), WriterGone> {
        self.send_job(write, None).await
    }

    /// Whether a renewal of this row waits in the spool: the row must not be claimed again
    /// before it is applied.
    pub fn holds(&self, id: i64) -> bool {
        lock(&self.held).contains(&id)
    }

    async fn send_job(
        &self,
        write: Write,
        done: Option<oneshot::Sender<Written>>,
    ) -> Result<(), WriterGone> {
        self.tx
            .send(Job { write, done })
            .await
            .map_err(|_| WriterGone)
    }
}

/// How the writer behaves.
#[derive(Debug, Clone)]
pub struct WriterSettings {
    /// How long a batch is retried before its renewals go to the spool.
    pub spool_after: Duration,
    /// The lease the writer keeps on rows whose results wait.
    pub lease: Duration,
}

/// Starts the writer task. Once `stopping` (shutdown began), a write the database refuses is
/// spooled at once; `close` (nothing more will be sent) ends the task once the queue is written.
pub fn spawn(
    storage: Arc<dyn Storage>,
    spool: Spool,
    settings: WriterSettings,
    health: Arc<Health>,
    time: Arc<ServerTime>,
    (stopping, close): (CancellationToken, CancellationToken),
) -> (WriterHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
    let held = Arc::new(Mutex::new(HashSet::new()));
    let writer = Writer {
        storage,
        spool,
        settings,
        health,
        time,
        stopping,
        close,
        stopping_since: None,
        held: held.clone(),
        spooled: Vec::new(),
        last_batch: 0,
    };
    let task = tokio::spawn(writer.run(rx));
    (WriterHandle { tx, held }, task)
}

struct Writer {
    storage: Arc<dyn Storage>,
    spool: Spool,
    settings: WriterSettings,
    health: Arc<Health>,
    /// Leases are judged on the Store's time, like the claims that took them.
    time: Arc<ServerTime>,
    stopping: CancellationToken,
    close: CancellationToken,
    /// When this writer first saw the stop while holding keys it could not save.
    stopping_since: Option<Instant>,
    held: Arc<Mutex<HashSet<i64>>>,
    /// Renewals in the spool file, still to be applied to the database.
    spooled: Vec<Write>,
    /// How many writes the last batch held.
    last_batch: usize,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let retry_spooled = !self.spooled.is_empty();
            let received = tokio::select! {
                biased;
                n = rx.recv_many(&mut batch, MAX_BATCH) => n,
                // Nothing more will be sent: what is queued is written, then the task ends.
                () = self.close.cancelled(), if !rx.is_closed() => {
                    rx.close();
                    continue;
                }
                () = tokio::time::sleep(RETRY_MAX), if retry_spooled => {
                    self.apply_spooled().await;
                    continue;
                }
            };
            if received == 0 {
                break; // closed, and everything sent was handled
            }
            self.gather(&mut rx, &mut batch).await;
            self.commit(std::mem::take(&mut batch)).await;
            // A stop spools rather than waits; the next start writes the spool.
            if !self.spooled.is_empty() && !self.stopping.is_cancelled() {
                self.apply_spooled().await;
            }
        }
        if !self.spooled.is_empty() {
            tracing::warn!(
                keys = self.spooled.len(),
                spool = %self.spool.path().display(),
                "stopping with renewed keys in the spool; the next start writes them"
            );
        }
    }

    /// Waits up to [`GATHER`] for more writes to join a batch that is not full, while writes
    /// come in streams (this batch or the last held more than one: a drain): a commit costs the
    /// database about the same for one row as for fifty, and an attempt's call slot is free once
    /// its answer is in, so the wait costs no renewal any time. A lone write (the CLI's `renew`,
    /// one key at a time; a quiet daemon) goes at once, and so does everything while stopping.
    async fn gather(&mut self, rx: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>) {
        let streaming = batch.len() > 1 || self.last_batch > 1;
        if streaming && !self.stopping.is_cancelled() {
            let until = tokio::time::Instant::now() + GATHER;
            while batch.len() < MAX_BATCH {
                let room = MAX_BATCH - batch.len();
                match tokio::time::timeout_at(until, rx.recv_many(batch, room)).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        self.last_batch = batch.len();
    }

    /// Applies one batch. If the database refuses it, only the renewals are kept (anything else
    /// is redone after its lease) and retried until they are written or, past the bound, spooled.
    async fn commit(&mut self, mut jobs: Vec<Job>) {
        let started = Instant::now();
        let mut delay = RETRY_FIRST;
        loop {
            // Moved out and back rather than cloned: every renewed key passes through here.
            let (writes, dones): (Vec<Write>, Vec<_>) =
                jobs.into_iter().map(|j| (j.write, j.done)).unzip();
            let result = self.storage.apply(&writes).await;
            jobs = writes
                .into_iter()
                .zip(dones)
                .map(|(write, done)| Job { write, done })
                .collect();
            let e = match result {
                Ok(applied) => {
                    self.health.db_ok();
                    for (job, ok) in jobs.into_iter().zip(applied) {
                        let written = if ok {
                            Written::Applied
                        } else {
                            Written::Superseded
                        };
                        answer(job, written);
                    }
                    return;
                }
                Err(e) => e,
            };
            self.health.db_failed(&e);
            let (renewals, others): (Vec<Job>, Vec<Job>) =
                jobs.into_iter().partition(|j| is_renewal(&j.write));
            for job in others {
                answer(job, Written::Dropped);
            }
            jobs = renewals;
            if jobs.is_empty() {
                tracing::warn!(error = %e, "database write failed; the keys are tried again later");
                return;
            }
            let stopping = self.stopping.is_cancelled();
            if stopping || started.elapsed() >= self.settings.spool_after {
                tracing::error!(error = %e, keys = jobs.len(), "the database stays unwritable; renewed keys go to the spool");
                jobs = self.spool_jobs(jobs);
                if jobs.is_empty() {
                    return;
                }
                let since = stopping.then(|| *self.stopping_since.get_or_insert_with(Instant::now));
                if since.is_some_and(|t| t.elapsed() >= STOPPING_GIVE_UP) {
                    tracing::error!(
                        keys = jobs.len(),
                        "stopping: renewed keys could be written neither to the database nor to the spool; they are lost"
                    );
                    return;
                }
            } else {
                tracing::warn!(error = %e, keys = jobs.len(), "database write failed; holding the renewed keys and retrying");
            }
            if !stopping {
                let ids: Vec<i64> = jobs.iter().map(|j| j.write.key_id()).collect();
                self.keep_leases(&ids).await;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    /// Renewals go to the spool file; returns those that could not be written there either
    /// (they stay unanswered, and the database is tried again).
    fn spool_jobs(&mut self, jobs: Vec<Job>) -> Vec<Job> {
        let mut unsaved = Vec::new();
        for job in jobs {
            if let Err(e) = self.spool.append(&job.write) {
                tracing::error!(error = %e, spool = %self.spool.path().display(), "cannot write the spool file");
                unsaved.push(job);
                continue;
            }
            lock(&self.held).insert(job.write.key_id());
            self.spooled.push(job.write.clone());
            answer(job, Written::Spooled);
        }
        unsaved
    }

    /// Once the database takes writes again, the spooled renewals are applied (by
    /// compare-and-swap, like any write) and the spool file is emptied.
    async fn apply_spooled(&mut self) {
        let writes = std::mem::take(&mut self.spooled);
        match self.storage.apply(&writes).await {
            Ok(applied) => {
                let superseded = applied.iter().filter(|ok| !**ok).count();
                tracing::info!(
                    keys = writes.len(),
                    superseded,
                    "spooled renewals written to the database"
                );
                if let Err(e) = self.spool.clear() {
                    tracing::warn!(error = %e, "cannot empty the spool file; its entries are applied again (harmlessly) at the next start");
                }
                let mut held = lock(&self.held);
                for w in &writes {
                    held.remove(&w.key_id());
                }
            }
            Err(_) => {
                let ids: Vec<i64> = writes.iter().map(Write::key_id).collect();
                self.keep_leases(&ids).await;
                self.spooled = writes;
            }
        }
    }

    /// A lease that ran out would let another process claim a row whose result waits here.
    async fn keep_leases(&self, ids: &[i64]) {
        let now = self.time.now();
        let until = now + secs(self.settings.lease);
        if let Err(e) = self.storage.extend_leases(ids, now, until).await {
            tracing::debug!(error = %e, "could not extend the leases either");
        }
    }
}

fn is_renewal(write: &Write) -> bool {
    matches!(
        write,
        Write::Row {
            change: Change::Renew { .. },
            ..
        }
    )
}

fn answer(job: Job, written: Written) {
    if let Some(done) = job.done {
        // The attempt may have been aborted at shutdown; the write stands all the same.
        let _ = done.send(written);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2)
}
