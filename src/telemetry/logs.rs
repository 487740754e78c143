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
    // Under systemd, stderr goes to the journal, which stamps every line itself.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let _ = match (format, journald) {
        (LogFormat::Json, _) => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        (LogFormat::Human, true) => builder.without_time().with_ansi(false).try_init(),
        (LogFormat::Human, false) => builder.try_init(),
    };
}
