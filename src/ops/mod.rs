//! What operators see and touch: metrics, health, systemd notify, logs, status reports, import.

pub mod credentials;
pub mod import;
pub mod listener;
pub mod metrics;
pub mod notify;
pub mod observe;
pub mod printable;
pub mod report;
pub mod telemetry;
