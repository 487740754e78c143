//! storekeyd keeps Microsoft Store ID keys fresh. See ARCHITECTURE.md for the codemap.

pub mod claims;
pub mod clock;
pub mod config;
pub mod contract;
pub mod daemon;
pub mod db;
pub mod demo;
pub mod emulator;
pub mod entra;
pub mod fingerprint;
pub mod http;
pub mod import;
pub mod ingest;
pub mod keymint;
pub mod metrics;
pub mod notify;
pub mod observe;
pub mod outcome;
pub mod ratelimit;
pub mod renewer;
pub mod report;
pub mod schedule;
pub mod store_api;
pub mod telemetry;
