//! End-to-end tests: the real daemon on a fresh database against the emulator on port 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backend;
mod harness;

mod cli;
mod clock;
mod consistency;
mod contract;
mod crash;
mod credentials;
mod dbfaults;
mod demo;
mod docs;
mod emulator_identity;
mod flags;
mod fleet;
mod forged;
mod guard;
mod hostile;
mod hygiene;
mod layers;
mod observe;
mod outage;
mod pause;
mod pgserver;
mod privilege;
mod renewal;
mod sharing;
mod soak;
mod spool;
mod systemd;
mod tls;
mod wakeups;
