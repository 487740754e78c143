//! Validation: every field a value could make unsafe or meaningless, reported by its dotted
//! name with what was expected.

use std::collections::HashSet;
use std::time::Duration;

use super::{Config, ConfigError, IMDS_TOKEN_URL, field_error};

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_url("endpoints.collections", &self.endpoints.collections)?;
        check_url("endpoints.purchase", &self.endpoints.purchase)?;
        check_url("entra.authority", &self.entra.authority)?;
        if self.entra.managed_identity_endpoint != IMDS_TOKEN_URL {
            check_url(
                "entra.managed_identity_endpoint",
                &self.entra.managed_identity_endpoint,
            )?;
        }
        self.validate_database()?;
        self.validate_applications()?;
        self.validate_numbers()
    }

    fn validate_applications(&self) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        let mut labels = HashSet::new();
        for (i, app) in self.applications.iter().enumerate() {
            let field = |f: &str| format!("applications[{i}].{f}");
            if app.client_id.trim().is_empty() {
                return Err(field_error(
                    field("client_id"),
                    "must not be empty (a federated credential may take it from AZURE_CLIENT_ID)",
                ));
            }
            if app.tenant_id.trim().is_empty() || app.tenant_id.contains(['/', '?', '#']) {
                return Err(field_error(
                    field("tenant_id"),
                    "expected a tenant ID or domain (a federated credential may take it from AZURE_TENANT_ID)",
                ));
            }
            if !seen.insert(app.client_id.as_str()) {
                return Err(field_error(field("client_id"), "is configured twice"));
            }
            // Logs, metrics and alarms name an application by its label.
            if !labels.insert(app.label()) {
                return Err(field_error(
                    field("name"),
                    format!("`{}` names another application too", app.label()),
                ));
            }
            if let Err(p) = app.source() {
                return Err(field_error(field(p.field), p.message));
            }
        }
        Ok(())
    }

    fn validate_database(&self) -> Result<(), ConfigError> {
        use crate::storage::Backend;
        if let Some(url) = &self.database_url
            && Backend::of(url).is_none()
        {
            return Err(field_error(
                "database_url",
                "expected a `sqlite://PATH` or `postgres://USER@HOST/DATABASE` URL",
            ));
        }
        if let Some(url) = &self.database_listen_url
            && Backend::of(url) != Some(Backend::Postgres)
        {
            return Err(field_error(
                "database_listen_url",
                "expected a `postgres://` URL (the listener is for PostgreSQL only)",
            ));
        }
        if self.database_password_file.is_some()
            && Backend::of(&self.database_url()) != Some(Backend::Postgres)
        {
            return Err(field_error(
                "database_password_file",
                "a password file is for a `postgres://` database_url only",
            ));
        }
        if !(2..=1000).contains(&self.database_pool_size) {
            return Err(field_error(
                "database_pool_size",
                "expected 2 to 1000 connections (one is the listener's)",
            ));
        }
        if self.database_connect_timeout.is_zero() {
            return Err(field_error(
                "database_connect_timeout",
                "must be longer than zero",
            ));
        }
        Ok(())
    }

    fn validate_numbers(&self) -> Result<(), ConfigError> {
        let r = &self.renew;
        let positive = [
            ("renew.margin", r.margin),
            ("renew.max_age", r.max_age),
            ("renew.poll_interval", r.poll_interval),
            ("renew.backoff_base", r.backoff_base),
            ("renew.lease", r.lease),
            ("renew.spool_after", r.spool_after),
            ("http.connect_timeout", self.http.connect_timeout),
            ("http.request_timeout", self.http.request_timeout),
        ];
        for (name, d) in positive {
            if d.is_zero() {
                return Err(field_error(name, "must be longer than zero"));
            }
        }
        if r.concurrency == 0 {
            return Err(field_error("renew.concurrency", "must be at least 1"));
        }
        if !(r.rate_limit.is_finite() && r.rate_limit > 0.0) {
            return Err(field_error(
                "renew.rate_limit",
                "expected renewals per second, above 0",
            ));
        }
        if r.batch_size == 0 {
            return Err(field_error("renew.batch_size", "must be at least 1"));
        }
        if r.backoff_cap < r.backoff_base {
            return Err(field_error(
                "renew.backoff_cap",
                "must not be shorter than `renew.backoff_base`",
            ));
        }
        // A lease shorter than one attempt (token, renew, fresh token, renew) would let another
        // process start a second attempt while the first runs.
        if r.lease < self.http.request_timeout.saturating_mul(5) {
            return Err(field_error(
                "renew.lease",
                "must be at least five times `http.request_timeout` (an attempt can make four requests)",
            ));
        }
        if self.breaker.threshold < 2 {
            return Err(field_error(
                "breaker.threshold",
                "must be at least 2 (one failing key is that key's problem)",
            ));
        }
        if self.guard.threshold < 2 {
            return Err(field_error("guard.threshold", "must be at least 2"));
        }
        // A zero window would quietly switch the protection off.
        for (field, window) in [
            ("guard.window", self.guard.window),
            ("breaker.window", self.breaker.window),
        ] {
            if window < Duration::from_secs(1) {
                return Err(field_error(
                    field,
                    "must be at least 1s: a zero window would switch the protection off",
                ));
            }
        }
        if self.guard.canary_interval < Duration::from_secs(1) {
            return Err(field_error("guard.canary_interval", "must be at least 1s"));
        }
        if self.guard.lone_key_after < Duration::from_secs(3600) {
            return Err(field_error(
                "guard.lone_key_after",
                "must be at least 1h: a key is flagged on refusals alone only after hours of them",
            ));
        }
        if self.breaker.probe_initial.is_zero()
            || self.breaker.probe_max < self.breaker.probe_initial
        {
            return Err(field_error(
                "breaker.probe_max",
                "must be at least `breaker.probe_initial`, which must be above zero",
            ));
        }
        if self.http.max_clock_offset < Duration::from_secs(1) {
            return Err(field_error("http.max_clock_offset", "must be at least 1s"));
        }
        if self.http.max_body_bytes < 1024 {
            return Err(field_error("http.max_body_bytes", "must be at least 1024"));
        }
        Ok(())
    }
}

/// `https` everywhere; plain `http` only to a loopback host (the emulator, tests), so a typo can
/// never send a service ticket in the clear.
fn check_url(field: &str, value: &str) -> Result<(), ConfigError> {
    let url = reqwest::Url::parse(value)
        .map_err(|e| field_error(field, format!("expected an absolute URL: {e}")))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(&url) => Ok(()),
        "http" => Err(field_error(
            field,
            "plain http is allowed only for loopback hosts; use https",
        )),
        other => Err(field_error(
            field,
            format!("expected an https URL, got scheme `{other}`"),
        )),
    }
}

pub fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    }
}
