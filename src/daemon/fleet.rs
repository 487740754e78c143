//! This process among the others on its database (replicas on PostgreSQL; on SQLite a daemon
//! and, briefly, its successor): a heartbeat row every few seconds, its share of the rate limit,
//! and the alarms they share.
//!
//! The fleet splits the rate limit rather than drawing tokens from a shared bucket: a bucket in
//! the database costs a round trip on one hot row before every renew call, serialising the fleet
//! on that row and stopping it when the database is slow, while a split costs one small write
//! per replica every few seconds. Its price: when a replica joins, the others keep their larger
//! share until their next beat (the fleet may go over by one share for a few seconds); when one
//! dies, the others keep their smaller share until its row lapses (under the limit, never over).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::attempt::Engine;
use crate::storage::{DbError, Storage};

/// How often a replica refreshes its row and looks at the shared alarms.
pub(super) const HEARTBEAT: Duration = Duration::from_secs(2);
/// A replica not seen for this long (four beats) is gone: its share and its alarms are freed.
const LAPSE_SECS: i64 = 8;

/// `host-pid-random`: unique per process, and says where to look.
pub(super) fn replica_name() -> String {
    format!(
        "{}-{}-{:04x}",
        host_name(),
        std::process::id(),
        fastrand::u16(..)
    )
}

/// The name replica names on this host start with.
pub(crate) fn host_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    if host.is_empty() {
        "host".to_owned()
    } else {
        host
    }
}

/// The host a name from [`replica_name`] runs on (a host name may hold dashes; the pid and the
/// random part do not).
pub(crate) fn replica_host(replica: &str) -> Option<&str> {
    replica.rsplitn(3, '-').nth(2)
}

/// One beat: the row refreshed, the replicas counted, this one's share of the rate limit set,
/// the shared alarms looked at.
pub(super) async fn beat(engine: &Engine, storage: &dyn Storage) -> Result<u32, DbError> {
    let replicas = storage
        .heartbeat(engine.safety().replica(), LAPSE_SECS)
        .await?;
    let before = engine
        .metrics()
        .replicas
        .swap(i64::from(replicas), Ordering::Relaxed);
    if before != i64::from(replicas) {
        tracing::info!(
            replicas,
            "{replicas} storekeyd process(es) share this database: each takes 1/{replicas} of renew.rate_limit"
        );
    }
    engine.share_rate(replicas);
    engine.safety().sync_fleet().await?;
    Ok(replicas)
}

/// Beats every [`HEARTBEAT`] until `stop`.
pub(super) async fn heartbeats(
    engine: Arc<Engine>,
    storage: Arc<dyn Storage>,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(HEARTBEAT) => {}
        }
        match beat(&engine, &*storage).await {
            Ok(_) if failing => {
                tracing::info!("heartbeat written again");
                failing = false;
            }
            Ok(_) => {}
            // The loop reports the database as failing; once is enough here.
            Err(e) if !failing => {
                tracing::warn!(error = %e, "could not write the heartbeat; keeping the last share of the rate limit");
                failing = true;
            }
            Err(_) => {}
        }
    }
}
