//! What operators run: status reports, key inspection, import. (What the process reports of
//! itself, metrics and health, is in `telemetry`.)

pub mod import;
pub mod printable;
pub mod report;
