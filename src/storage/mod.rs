//! What storekeyd remembers: the keys table, its events and alarms.

pub mod contract;
pub mod sqlite;
