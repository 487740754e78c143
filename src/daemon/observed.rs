//! The engine as the listener sees it ([`Live`]): the narrow view `/metrics` and `/readyz`
//! read, so the listener depends on none of the daemon.

use crate::daemon::attempt::Engine;
use crate::policy::claims::Kind;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::observe::{Credential, Live};

impl Live for Engine {
    fn store_now(&self) -> i64 {
        Engine::store_now(self)
    }

    fn clock_offset(&self) -> Option<i64> {
        self.server_time().offset()
    }

    fn clock_alarm(&self) -> Option<String> {
        self.server_time().alarm()
    }

    fn open_breakers(&self) -> Vec<Kind> {
        self.safety().open_breakers()
    }

    fn credential_alarms(&self) -> Vec<String> {
        self.safety().credential_alarms()
    }

    fn credentials(&self) -> Vec<Credential> {
        self.credential_status()
            .into_iter()
            .map(|s| Credential {
                not_after: s.certificate.as_ref().map(|c| c.not_after),
                kind: s.kind.as_str(),
                client_id: s.client_id,
                label: s.label,
                last: s.last,
            })
            .collect()
    }

    fn metrics(&self) -> &Metrics {
        Engine::metrics(self)
    }
}
