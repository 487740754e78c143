//! What the process tells the world about itself, apart from its work: metrics, liveness, the
//! service manager's notifications, logs, and the loopback listener that serves them. A leaf:
//! the layers that do the work record here, and nothing here reaches back into them.

pub mod health;
pub mod listener;
pub mod logs;
pub mod metrics;
pub mod notify;
pub mod observe;
