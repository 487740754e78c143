//! storekeyd keeps Microsoft Store ID keys fresh. See ARCHITECTURE.md for the codemap.
//!
//! The folders are the layers, and dependencies point one way (`tests/e2e/layers.rs` fails on a
//! cycle): `policy` decides (pure), `storage` remembers, `telemetry` is what the process reports
//! of itself (metrics, health, the listener), `remote` talks to Entra ID and the Store, `daemon`
//! runs the loop, `ops` is what operators run (status, import), `emulator` stands in for
//! Microsoft in tests and the demo.

pub mod clock;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod emulator;
pub mod ops;
pub mod policy;
pub mod remote;
pub mod secret_file;
pub mod storage;
pub mod telemetry;
