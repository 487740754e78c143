//! Wake-ups: the migration's trigger sends `NOTIFY storekeyd_keys` when a backend writes a key;
//! a task here listens on a connection of its own and wakes the run loop. Notifications sent
//! while the listener reconnects are lost, so the loop keeps polling as well; after a reconnect
//! the loop is woken once to catch up.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub(super) const CHANNEL: &str = "storekeyd_keys";
/// The wait between attempts to reconnect the listener.
const RECONNECT: Duration = Duration::from_secs(1);

/// Where the listener connects: the pool's server, or a direct URL (behind PgBouncer in
/// transaction mode, which cannot hold a `LISTEN`).
#[derive(Debug, Clone)]
pub(super) enum Source {
    Pool(PgPool),
    Url(Box<PgConnectOptions>),
}

/// Starts the listener; it ends when `stop` is cancelled.
pub(super) fn spawn(source: Source, stop: CancellationToken) -> Arc<Notify> {
    let wake = Arc::new(Notify::new());
    tokio::spawn(
        stop.clone()
            .run_until_cancelled_owned(listen(source, wake.clone())),
    );
    wake
}

async fn listen(source: Source, wake: Arc<Notify>) {
    let mut reported = false;
    loop {
        match subscribe(&source).await {
            Ok(mut listener) => {
                if reported {
                    tracing::info!("listening for new keys again");
                    reported = false;
                }
                // Anything written while nobody listened is found by this pass.
                wake.notify_one();
                while let Ok(Some(_)) = listener.try_recv().await {
                    wake.notify_one();
                }
                wake.notify_one();
            }
            Err(e) if !reported => {
                tracing::warn!(error = %e, "cannot listen for new keys; polling until it can");
                reported = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

async fn subscribe(source: &Source) -> Result<PgListener, sqlx::Error> {
    let mut listener = match source {
        Source::Pool(pool) => PgListener::connect_with(pool).await?,
        Source::Url(options) => {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect_lazy_with((**options).clone());
            PgListener::connect_with(&pool).await?
        }
    };
    listener.listen(CHANNEL).await?;
    Ok(listener)
}
