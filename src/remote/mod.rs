//! Calls to Microsoft: Entra ID access tokens and the Store's renew endpoint.

pub mod deadline;
pub mod entra;
pub mod http;
pub mod ratelimit;
pub mod renew_api;
pub mod server_time;
