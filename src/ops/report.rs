//! What `status` and `inspect` print. Building a report reads the database; rendering is pure.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::clock::utc;
use crate::config::Config;
use crate::daemon::fleet;
use crate::ops::printable::printable;
use crate::policy::claims::{Claims, KeyText, Kind};
use crate::policy::schedule;
use crate::remote::server_time;
use crate::storage::{Alarm, AlarmName, DbError, KeyStats, KeySummary, State, Storage};

/// `storekeyd status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// Now as the daemon judges it: the host clock corrected by `clock_offset_secs`.
    pub generated_at: i64,
    /// The Store's time minus this host's, as the clock alarm of a daemon on this host states
    /// it; `None`: judged on the host clock (which a daemon here finds within
    /// `http.max_clock_offset` of the Store's, if one runs).
    pub clock_offset_secs: Option<i64>,
    pub keys: KeyStats,
    /// Active keys that expire within `expiring_window_secs`.
    pub expiring_window_secs: i64,
    pub expiring: Vec<KeySummary>,
    pub flagged: Vec<KeySummary>,
    pub flagged_total: i64,
    /// Conditions the running daemon has raised.
    pub alarms: Vec<Alarm>,
}

impl StatusReport {
    /// `host_now` is this host's clock; what is due and expiring is judged on the Store's.
    pub async fn build(
        db: &dyn Storage,
        host_now: i64,
        window: Duration,
        limit: u32,
    ) -> Result<Self, DbError> {
        let window_secs = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
        let alarms = db.alarms().await?;
        let offset = stated_offset(&alarms, &fleet::host_name());
        let now = host_now.saturating_add(offset.unwrap_or(0));
        let (flagged, flagged_total) = db.flagged(limit).await?;
        Ok(StatusReport {
            generated_at: now,
            clock_offset_secs: offset,
            keys: db.key_stats(now).await?,
            expiring_window_secs: window_secs,
            expiring: db.expiring(now.saturating_add(window_secs), limit).await?,
            flagged,
            flagged_total,
            alarms,
        })
    }

    /// Healthy: nothing flagged, nothing active about to expire.
    pub fn healthy(&self) -> bool {
        self.flagged_total == 0 && self.expiring.is_empty() && self.alarms.is_empty()
    }

    pub fn render(&self) -> String {
        let now = self.generated_at;
        let mut out = String::new();
        let basis = match self.clock_offset_secs {
            Some(offset) if offset < 0 => format!(
                " (the Store's time: this host's clock is {} ahead, says the clock alarm)",
                span(offset.unsigned_abs())
            ),
            Some(offset) => format!(
                " (the Store's time: this host's clock is {} behind, says the clock alarm)",
                span(offset.unsigned_abs())
            ),
            None => String::new(),
        };
        let _ = writeln!(out, "storekeyd status at {}{basis}\n", utc(now));
        if self.alarms.is_empty() {
            let _ = writeln!(out, "alarms: none\n");
        } else {
            let _ = writeln!(out, "alarms: {}", self.alarms.len());
            for a in &self.alarms {
                let name = a.name.to_string();
                let (name, detail) = (printable(&name), printable(&a.detail));
                let _ = writeln!(out, "  {name} since {}\n    {detail}", when(a.since, now));
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "{:<16}{:>13}{:>10}{:>8}",
            "keys", "collections", "purchase", "total"
        );
        for state in State::ALL {
            let count = |kind: Kind| {
                self.keys
                    .by_state_kind
                    .iter()
                    .find(|(s, k, _)| *s == state && *k == kind)
                    .map_or(0, |(_, _, n)| *n)
            };
            let (c, p) = (count(Kind::Collections), count(Kind::Purchase));
            let _ = writeln!(out, "  {:<14}{c:>13}{p:>10}{:>8}", state.as_str(), c + p);
        }
        let next = self
            .keys
            .next_due
            .map_or_else(|| "none".to_owned(), |t| when(t, now));
        let _ = writeln!(out, "\nnext renewal:    {next}; {} due now", self.keys.due);
        let earliest = self
            .keys
            .earliest_expiry
            .map_or_else(|| "none".to_owned(), |t| when(t, now));
        let _ = writeln!(out, "earliest expiry: {earliest}");
        let window = humantime::format_duration(Duration::from_secs(
            u64::try_from(self.expiring_window_secs).unwrap_or(0),
        ));
        self.render_list(
            &mut out,
            &format!("expiring within {window}"),
            &self.expiring,
            self.expiring.len() as i64,
        );
        self.render_list(&mut out, "flagged", &self.flagged, self.flagged_total);
        out
    }

    fn render_list(&self, out: &mut String, title: &str, rows: &[KeySummary], total: i64) {
        if total == 0 {
            let _ = writeln!(out, "\n{title}: none");
            return;
        }
        let _ = writeln!(out, "\n{title}: {total}");
        for r in rows {
            let exp = r
                .expires_at
                .map_or_else(|| "-".to_owned(), |t| when(t, self.generated_at));
            let _ = writeln!(
                out,
                "  #{:<6} {:<20} {:<12} {:<14} key {}  expires {exp}",
                r.id,
                printable(&r.user_ref),
                r.kind,
                r.state,
                printable(r.key_fp.as_deref().unwrap_or("-")),
            );
            if let Some(reason) = &r.reason {
                let _ = writeln!(out, "           {}", printable(reason));
            }
        }
        if (rows.len() as i64) < total {
            let _ = writeln!(out, "  … and {} more (--limit)", total - rows.len() as i64);
        }
    }
}

/// Now as the daemon judges it, for a process with no answers from the Store: this host's clock
/// corrected by the offset a daemon's clock alarm states, if one on this host raised it, and the
/// offset applied.
pub async fn store_now(db: &dyn Storage, host_now: i64) -> Result<(i64, Option<i64>), DbError> {
    let offset = stated_offset(&db.alarms().await?, &fleet::host_name());
    Ok((host_now.saturating_add(offset.unwrap_or(0)), offset))
}

/// The offset the clock alarm raised on `host` states. Below `http.max_clock_offset` there is no
/// alarm, and the host clock is as good; an alarm raised elsewhere speaks of another clock.
fn stated_offset(alarms: &[Alarm], host: &str) -> Option<i64> {
    alarms
        .iter()
        .find(|a| a.name == AlarmName::Clock)
        .filter(|a| a.owner.as_deref().and_then(fleet::replica_host) == Some(host))
        .and_then(|a| server_time::stated_offset(&a.detail))
}

/// `storekeyd inspect`: a key's claims, never its payload or the key itself.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub fingerprint: String,
    pub kind: String,
    pub algorithm: Option<String>,
    pub client_id: String,
    pub user_id: Option<String>,
    pub issued_at: i64,
    pub not_before: Option<i64>,
    pub expires_at: i64,
    pub lifetime_secs: i64,
    pub refresh_uri: Option<String>,
    pub has_payload: bool,
    /// When the daemon would renew it under the configured policy (without jitter).
    pub renewal_at: i64,
    pub expired: bool,
    /// The database row, when inspected by row.
    pub row: Option<KeySummary>,
}

impl Inspection {
    pub fn new(
        key: &KeyText,
        claims: &Claims,
        config: &Config,
        now: i64,
        row: Option<KeySummary>,
    ) -> Self {
        Inspection {
            fingerprint: key.fingerprint().to_string(),
            kind: claims.kind.to_string(),
            algorithm: claims.algorithm.clone(),
            client_id: claims.client_id.clone(),
            user_id: claims.user_id.clone(),
            issued_at: claims.issued_at,
            not_before: claims.not_before,
            expires_at: claims.expires_at,
            lifetime_secs: claims.lifetime_secs(),
            refresh_uri: claims.refresh_uri.clone(),
            has_payload: claims.has_payload,
            renewal_at: schedule::renewal_time(&claims.facts(), &config.policy(), now, 0.0),
            expired: claims.expires_at <= now,
            row,
        }
    }

    pub fn render(&self, now: i64) -> String {
        let mut out = String::new();
        let line = |out: &mut String, name: &str, value: &str| {
            let _ = writeln!(out, "{name:<14}{}", printable(value));
        };
        line(&mut out, "fingerprint", &self.fingerprint);
        line(&mut out, "kind", &self.kind);
        line(
            &mut out,
            "algorithm",
            self.algorithm.as_deref().unwrap_or("-"),
        );
        line(&mut out, "client id", &self.client_id);
        line(&mut out, "user id", self.user_id.as_deref().unwrap_or("-"));
        line(&mut out, "issued", &when(self.issued_at, now));
        line(
            &mut out,
            "not before",
            &self
                .not_before
                .map_or_else(|| "-".to_owned(), |t| when(t, now)),
        );
        line(&mut out, "expires", &when(self.expires_at, now));
        let lifetime = humantime::format_duration(Duration::from_secs(
            u64::try_from(self.lifetime_secs).unwrap_or(0),
        ));
        line(&mut out, "lifetime", &lifetime.to_string());
        line(&mut out, "renews at", &when(self.renewal_at, now));
        line(
            &mut out,
            "refresh uri",
            self.refresh_uri.as_deref().unwrap_or("-"),
        );
        line(
            &mut out,
            "payload",
            if self.has_payload {
                "present (not shown)"
            } else {
                "absent"
            },
        );
        if let Some(row) = &self.row {
            line(
                &mut out,
                "row",
                &format!("#{} {} ({})", row.id, row.user_ref, row.kind),
            );
            line(&mut out, "state", row.state.as_str());
            if let Some(reason) = &row.reason {
                line(&mut out, "reason", reason);
            }
            if let Some(next) = row.next_attempt_at {
                line(&mut out, "next attempt", &when(next, now));
            }
        }
        out
    }
}

/// `2026-11-25T10:00:00Z (in 3d 4h)` or `(2h 5m ago)`.
pub fn when(t: i64, now: i64) -> String {
    format!("{} ({})", utc(t), relative(t - now))
}

/// A signed number of seconds as the two largest units: `in 3d 4h`, `5m 2s ago`, `now`.
pub fn relative(delta: i64) -> String {
    if delta == 0 {
        return "now".to_owned();
    }
    let text = span(delta.unsigned_abs());
    if delta > 0 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// Seconds as the two largest units: `3d 4h`.
fn span(secs: u64) -> String {
    let units = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let mut parts = Vec::new();
    let mut rest = secs;
    for (size, name) in units {
        if rest >= size {
            parts.push(format!("{}{name}", rest / size));
            rest %= size;
        }
        if parts.len() == 2 {
            break;
        }
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_read_naturally() {
        assert_eq!(relative(0), "now");
        assert_eq!(relative(90), "in 1m 30s");
        assert_eq!(relative(-7200), "2h ago");
        assert_eq!(relative(3 * 86_400 + 4 * 3600 + 59), "in 3d 4h");
    }

    #[test]
    fn only_a_clock_alarm_raised_on_this_host_corrects_the_time() {
        let t = crate::remote::server_time::ServerTime::new(
            Duration::from_secs(120),
            crate::clock::Clock::system(),
        );
        let alarm = |name: &str, detail: String, owner: &str| Alarm {
            name: AlarmName::parse(name),
            detail,
            since: 0,
            owner: Some(owner.to_owned()),
        };
        let ahead = t.describe(-29 * 86_400);
        let here = [alarm("clock", ahead.clone(), "web-1-4242-00af")];
        assert_eq!(stated_offset(&here, "web-1"), Some(-29 * 86_400));
        // Another host's clock, another alarm's text, or no owner: the host clock.
        assert_eq!(stated_offset(&here, "web-2"), None);
        assert_eq!(stated_offset(&here, "web"), None);
        let other = [alarm(
            "breaker:collections",
            ahead.clone(),
            "web-1-4242-00af",
        )];
        assert_eq!(stated_offset(&other, "web-1"), None);
        let mut unowned = here.clone();
        unowned[0].owner = None;
        assert_eq!(stated_offset(&unowned, "web-1"), None);
    }
}
