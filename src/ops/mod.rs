//! What operators see and touch: metrics, health, systemd notify, logs, status reports, import.

pub mod import;
pub mod printable;
pub mod report;
