//! Pure decisions: no clock, no network, no database. Everything here is a function of its
//! inputs and is tested with plain values and proptest.

pub mod alarm;
pub mod breaker;
pub mod checks;
pub mod claims;
pub mod decision;
pub mod fingerprint;
pub mod fleet;
pub mod guard;
pub mod outcome;
pub mod schedule;
pub mod state;
