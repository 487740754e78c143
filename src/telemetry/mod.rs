//! What the process tells the world about itself, apart from its work: metrics, liveness, the
//! service manager's notifications, logs, and the loopback listener that serves them. Below the
//! layers that do the work (remote, daemon): they record here, and nothing here reaches back
//! into them; it uses only config, policy and storage.

pub mod health;
pub mod listener;
pub mod logs;
pub mod metrics;
pub mod notify;
pub mod observe;
