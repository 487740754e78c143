//! What the other layers take from the configuration: endpoints, paths, database options and
//! the policies, each as the values it decides on.

use std::path::PathBuf;

use super::{Application, Config};
use crate::policy::claims::Kind;
use crate::policy::schedule::Policy;

impl Config {
    pub fn endpoint(&self, kind: Kind) -> &str {
        match kind {
            Kind::Collections => &self.endpoints.collections,
            Kind::Purchase => &self.endpoints.purchase,
        }
    }

    pub fn state_directory(&self) -> PathBuf {
        self.state_directory
            .clone()
            .or_else(|| std::env::var_os("STATE_DIRECTORY").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/lib/storekeyd"))
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                self.state_directory().join("storekeyd.db").display()
            )
        })
    }

    pub fn db_options(&self) -> crate::storage::DbOptions {
        crate::storage::DbOptions {
            busy_timeout: self.database_busy_timeout,
            pool_size: self.database_pool_size,
            connect_timeout: self.database_connect_timeout,
            listen_url: self.database_listen_url.clone(),
            password_file: self.database_password_file.clone(),
        }
    }

    pub fn policy(&self) -> Policy {
        Policy {
            max_age: self.renew.max_age,
            margin: self.renew.margin,
            jitter: self.renew.jitter,
            backoff_base: self.renew.backoff_base,
            backoff_cap: self.renew.backoff_cap,
        }
    }

    pub fn breaker_policy(&self) -> crate::policy::breaker::BreakerPolicy {
        crate::policy::breaker::BreakerPolicy {
            threshold: self.breaker.threshold,
            window: self.breaker.window,
            probe_initial: self.breaker.probe_initial,
            probe_max: self.breaker.probe_max,
        }
    }

    pub fn guard_policy(&self) -> crate::policy::guard::GuardPolicy {
        crate::policy::guard::GuardPolicy {
            threshold: self.guard.threshold,
            window: self.guard.window,
            canary_interval: self.guard.canary_interval,
            lone_key_after: self.guard.lone_key_after,
        }
    }

    pub fn application(&self, client_id: &str) -> Option<&Application> {
        self.applications.iter().find(|a| a.client_id == client_id)
    }
}

impl crate::policy::checks::Configured for Config {
    fn endpoint(&self, kind: Kind) -> &str {
        Config::endpoint(self, kind)
    }

    fn knows(&self, client_id: &str) -> bool {
        self.application(client_id).is_some()
    }
}
