//! Serving the loopback listener so that no client can hold it, or the process, hostage: at most
//! [`MAX_CONNECTIONS`] at once (the others wait in the kernel's backlog, costing the process no
//! descriptor), request headers within [`HEADER_TIMEOUT`], one request a connection, and a
//! whole connection within [`CONNECTION_LIFETIME`]. axum's own `serve` has neither bound: a local user holding ~1,000
//! idle connections took every descriptor, and renewals stalled.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Prometheus, a probe or two and an operator's curl: far more than they need, far below the
/// service's `LimitNOFILE=`.
pub const MAX_CONNECTIONS: usize = 64;
/// A scraper sends its request at once; an idle connection is dropped after this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// However slowly a client reads, its connection ends after this.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown`; open connections are then cut, not awaited (a
/// scrape is not worth holding a stop for).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.map_err(std::io::Error::other)?,
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors (or a connection reset before it was taken): wait
                    // rather than spin.
                    tracing::debug!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let service = TowerToHyperService::new(app.clone());
        connections.spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                // One request a connection: a client cannot keep a slot with a stream of them.
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
    Ok(())
}
