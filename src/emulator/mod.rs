//! A local stand-in for the Store's renew endpoints and Entra ID's v2 token endpoint, faithful to
//! reference/store-api.md, with an admin API to mint and revoke keys and to inject faults.
//!
//! Routes:
//! - `POST /{tenant}/oauth2/v2.0/token`: client-credentials grant (form), with a secret, a
//!   certificate's client assertion or a federated token.
//! - `GET /metadata/identity/oauth2/token`: the instance metadata service's managed identity
//!   tokens.
//! - `POST /collections/v6.0/b2b/keys/renew`, `POST /purchase/v6.0/b2b/keys/renew`.
//! - `POST /admin/keys`, `POST /admin/revoke`, `POST /admin/applications`,
//!   `POST /admin/managed-identities`, `POST /admin/federated-tokens`,
//!   `GET|PUT /admin/faults`, `GET|DELETE /admin/stats`.

mod admin;
mod identity;
pub mod keymint;
mod renew;
mod state;
mod token;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use state::{Emulator, Faults, Stats, WrongSuccessor};

use crate::clock::Clock;

/// Shared with handlers; `shutdown` also ends calls that the timeout fault holds open.
#[derive(Clone)]
struct AppState {
    emu: Arc<Emulator>,
    shutdown: CancellationToken,
}

/// Builds the emulator for a listener that is already bound (port 0 in tests).
pub fn for_listener(listener: &TcpListener, clock: Clock) -> std::io::Result<Arc<Emulator>> {
    let addr = listener.local_addr()?;
    Ok(Arc::new(Emulator::new(clock, format!("http://{addr}"))))
}

pub fn router(emu: Arc<Emulator>, shutdown: CancellationToken) -> Router {
    let state = AppState { emu, shutdown };
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token::token))
        .route("/collections/v6.0/b2b/keys/renew", post(renew::collections))
        .route("/purchase/v6.0/b2b/keys/renew", post(renew::purchase))
        .route("/admin/keys", post(admin::mint))
        .route("/admin/revoke", post(admin::revoke))
        .route(
            "/metadata/identity/oauth2/token",
            get(identity::metadata_token),
        )
        .route("/admin/applications", post(admin::register))
        .route(
            "/admin/managed-identities",
            post(admin::register_managed_identity),
        )
        .route("/admin/federated-tokens", post(admin::federated_token))
        .route(
            "/admin/faults",
            get(admin::get_faults).put(admin::put_faults),
        )
        .route(
            "/admin/stats",
            get(admin::get_stats).delete(admin::reset_stats),
        )
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            date_header,
        ))
        .with_state(state)
}

/// Every answer carries the emulator's own time, as the Store's and Entra's answers carry
/// theirs (hyper would put the host's there).
async fn date_header(
    axum::extract::State(st): axum::extract::State<AppState>,
    mut response: axum::response::Response,
) -> axum::response::Response {
    let secs = u64::try_from(st.emu.now()).unwrap_or(0);
    let date =
        httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs));
    if let Ok(v) = axum::http::HeaderValue::from_str(&date) {
        response.headers_mut().insert(axum::http::header::DATE, v);
    }
    response
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    emu: Arc<Emulator>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(emu, shutdown.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
