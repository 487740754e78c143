//! The run loop's call slots: keys claimed and waiting for a slot, and the attempts under way
//! until their results are durable. At a stop, the drain: attempts finish within the grace
//! period, and the keys of the others go back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use tokio::task::{Id, JoinError, JoinSet};

use crate::config::Config;
use crate::daemon::attempt::{Engine, Settled};
use crate::daemon::writer::{MAX_BATCH, WriterGone};
use crate::daemon::{refill_at, secs};
use crate::storage::{Claim, ClaimedRow, Storage};

pub(super) type Joined = Result<(Id, Result<Settled, WriterGone>), JoinError>;

pub(super) struct Slots {
    engine: Arc<Engine>,
    config: Arc<Config>,
    tasks: JoinSet<Result<Settled, WriterGone>>,
    /// The row each task works on, until its result is durable.
    in_flight: HashMap<Id, Claim>,
    /// The same rows, to look up.
    held: HashSet<i64>,
    /// Keys claimed and waiting for a call slot.
    ready: VecDeque<ClaimedRow>,
    /// Claims whose call was never sent, to hand back (see [`Slots::hand_back`]): left to
    /// lapse, the next claim would take each for a key whose answer may have been lost.
    unsent: Vec<Claim>,
}

impl Slots {
    pub(super) fn new(engine: Arc<Engine>, config: Arc<Config>) -> Slots {
        Slots {
            engine,
            config,
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            held: HashSet::new(),
            ready: VecDeque::new(),
            unsent: Vec::new(),
        }
    }

    /// `renew.concurrency`, or fewer where the rate limit could not serve that many attempts
    /// within a claim's lease: the rest would only wait out their lease in the queue.
    pub(super) fn concurrency(&self) -> usize {
        self.config
            .renew
            .concurrency
            .min(self.engine.calls_within_lease())
    }

    /// Whether the queue of claimed keys runs low: fewer than this many wait.
    pub(super) fn low(&self) -> bool {
        self.ready.len() < refill_at(self.concurrency())
    }

    /// How many claimed keys wait for a slot.
    pub(super) fn waiting(&self) -> usize {
        self.ready.len()
    }

    /// How many attempts run or wait for their write.
    pub(super) fn attempts(&self) -> usize {
        self.tasks.len()
    }

    /// Free call slots, as long as the results waiting for the writer stay bounded too.
    pub(super) fn free(&self) -> usize {
        let concurrency = self.concurrency();
        let calls = concurrency.saturating_sub(self.engine.calls_in_flight());
        let tasks = (concurrency + MAX_BATCH).saturating_sub(self.tasks.len());
        calls.min(tasks)
    }

    /// A claimed key joins the queue. Claimed again after its lease ran out in the queue: the
    /// fresh claim counts (and is still the canary it was).
    pub(super) fn queue(&mut self, mut row: ClaimedRow) {
        if let Some(i) = self.ready.iter().position(|r| r.id == row.id) {
            row.canary |= self.ready.remove(i).is_some_and(|r| r.canary);
        }
        self.ready.push_back(row);
    }

    /// A canary goes first.
    pub(super) fn queue_first(&mut self, row: ClaimedRow) {
        self.ready.push_front(row);
    }

    /// Starts claimed keys while call slots are free. A key whose lease runs out before an
    /// attempt could finish (four requests) is not started, and is handed back due when its
    /// lease ends.
    pub(super) fn start_ready(&mut self) {
        let needed = secs(self.config.http.request_timeout.saturating_mul(4));
        while self.free() > 0 {
            let Some(row) = self.ready.pop_front() else {
                return;
            };
            if self.engine.store_now().saturating_add(needed) < row.lease_until {
                self.spawn(row);
            } else {
                self.not_attempted(&row);
                self.unsent.push(row.claim());
            }
        }
    }

    /// The next attempt to finish; never, while none runs. Cancel-safe.
    pub(super) async fn next_finished(&mut self) -> Joined {
        match self.tasks.join_next_with_id().await {
            Some(joined) => joined,
            None => std::future::pending().await,
        }
    }

    /// Every attempt that finished meanwhile, before the next pass refills.
    pub(super) fn reap(&mut self) {
        while let Some(joined) = self.tasks.try_join_next_with_id() {
            self.finished(joined);
        }
    }

    /// A claimed key that will not be attempted here; a canary's application may ask again.
    fn not_attempted(&self, row: &ClaimedRow) {
        if row.canary {
            self.engine.safety().canary_done(&row.facts.client_id);
        }
    }

    fn spawn(&mut self, row: ClaimedRow) {
        let (id, claim) = (row.id, row.claim());
        // Its lease ran out while the attempt or its write still runs (a wall-clock jump, a
        // locked database), or its renewal waits in the spool: one attempt per key.
        if self.held.contains(&id) || self.engine.writer().holds(id) {
            self.not_attempted(&row);
            return;
        }
        let engine = self.engine.clone();
        let permit = engine.call_permit();
        let handle = self
            .tasks
            .spawn(async move { engine.attempt(row, permit).await });
        self.in_flight.insert(handle.id(), claim);
        self.held.insert(id);
    }

    /// Records an attempt that ended.
    pub(super) fn finished(&mut self, joined: Joined) {
        let (task, result) = match joined {
            Ok((task, result)) => (task, Ok(result)),
            Err(e) => (e.id(), Err(e)),
        };
        let claim = self.in_flight.remove(&task);
        let row = claim.map(|c| c.id);
        if let Some(id) = row {
            self.held.remove(&id);
        }
        if let (Ok(Ok(Settled::LeaseShort)), Some(claim)) = (&result, claim) {
            self.unsent.push(claim);
        }
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(row, error = %e, "could not record a renewal result; will retry after the lease")
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                tracing::error!(row, error = %e, "renewal task failed; will retry after the lease")
            }
        }
    }

    /// Lets in-flight attempts finish within the grace period (their results are written or
    /// spooled by the writer); aborts the rest, and gives back the keys never started.
    pub(super) async fn drain(&mut self, storage: &dyn Storage) {
        // Claimed but never started: due again at once, not after their lease.
        let unstarted: Vec<Claim> = self.ready.drain(..).map(|r| r.claim()).collect();
        if let Err(e) = storage.release(&unstarted, self.engine.store_now()).await {
            tracing::warn!(error = %e, "could not release claimed keys; they are retried after their lease");
        }
        let in_flight = self.tasks.len();
        if in_flight > 0 {
            tracing::info!(in_flight, "shutting down; waiting for in-flight renewals");
        }
        let grace = self.config.renew.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                self.finished(joined);
            }
        })
        .await;
        if drained.is_ok() {
            return;
        }
        tracing::warn!(
            left = self.tasks.len(),
            "grace period over; abandoning the attempts still waiting for an answer"
        );
        self.tasks.abort_all();
        while let Some(joined) = self.tasks.join_next_with_id().await {
            if let Ok((task, _)) = &joined {
                // It finished after all; its result is recorded.
                if let Some(claim) = self.in_flight.remove(task) {
                    self.held.remove(&claim.id);
                }
            }
        }
        // An abandoned call that was sent may have renewed its key: its lease stays, so
        // whoever claims the key next knows an answer may have been lost (and does not take
        // the old key's refusal for a revocation). The others go back.
        let (sent, unsent): (Vec<Claim>, Vec<Claim>) = self
            .in_flight
            .values()
            .copied()
            .partition(|c| self.engine.sent(c.id));
        self.unsent.extend(unsent);
        self.hand_back(storage).await;
        if !sent.is_empty() {
            tracing::warn!(
                abandoned = sent.len(),
                "their calls were sent; the keys are retried once their leases end"
            );
        }
    }

    /// Hands back the claims whose call was never sent, each due when its lease ends (as it
    /// would have been), unless claimed anew since.
    pub(super) async fn hand_back(&mut self, storage: &dyn Storage) {
        let mut unsent = std::mem::take(&mut self.unsent);
        unsent.sort_by_key(|c| c.lease_until);
        for group in unsent.chunk_by(|a, b| a.lease_until == b.lease_until) {
            if let Err(e) = storage.release(group, group[0].lease_until).await {
                tracing::warn!(error = %e, "could not hand back unsent keys; they are retried after their lease");
            }
        }
    }
}
