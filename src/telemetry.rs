//! Logging through tracing: human-readable on a terminal, JSON for log shippers.

use tracing_subscriber::EnvFilter;

pub use crate::config::LogFormat;

/// `STOREKEYD_LOG` (or `RUST_LOG`) sets the filter, e.g. `storekeyd=debug`; `default` otherwise.
pub fn init(format: LogFormat, default: &str) {
    let filter = std::env::var("STOREKEYD_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}
