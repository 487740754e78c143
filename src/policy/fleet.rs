//! One process's alarms against the fleet's: the alarms table is shared by every replica on a
//! database. What this process raised and the table lacks is written again (its own write may
//! not have landed, or another replica cleared a condition this one still sees); a credential
//! alarm this process saw in the table and that is gone was cleared by a replica that saw the
//! credential work; a credential alarm another replica raised is taken up here.

use std::collections::{BTreeMap, BTreeSet};

use crate::policy::alarm::AlarmName;

/// An alarm as the table holds it: name, detail, since (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    pub name: AlarmName,
    pub detail: String,
    pub since: i64,
}

/// What a look at the table asks of this process.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// This process's alarms the table lacks: write them again.
    pub rewrite: Vec<Shared>,
    /// Applications whose credential alarm another process cleared: clear it here too.
    pub cleared: Vec<String>,
    /// Credential alarms another process raised, with when (Unix milliseconds): raise them
    /// here too.
    pub adopted: Vec<(String, i64)>,
}

#[derive(Debug, Default)]
pub struct FleetAlarms {
    /// The alarms this process holds raised.
    raised: BTreeMap<AlarmName, Shared>,
    /// Those of them the table held at the last look.
    seen: BTreeSet<AlarmName>,
    /// Every alarm name the table held at the last look.
    table: BTreeSet<AlarmName>,
}

impl FleetAlarms {
    pub fn raised(&mut self, alarm: Shared) {
        // Raised anew: until the table shows it, its absence means it is not written yet.
        self.seen.remove(&alarm.name);
        self.raised.insert(alarm.name.clone(), alarm);
    }

    pub fn cleared(&mut self, name: &AlarmName) {
        self.raised.remove(name);
        self.table.remove(name);
    }

    /// Whether any process holds the alarm raised (this one, or another at the last look).
    pub fn shown(&self, name: &AlarmName) -> bool {
        self.raised.contains_key(name) || self.table.contains(name)
    }

    pub fn reconcile(&mut self, table: &[Shared]) -> Reconciled {
        let names: BTreeSet<AlarmName> = table.iter().map(|a| a.name.clone()).collect();
        let mut out = Reconciled::default();
        let seen = std::mem::take(&mut self.seen);
        self.raised.retain(|name, alarm| {
            if names.contains(name) {
                return true;
            }
            match name.credential() {
                Some(app) if seen.contains(name) => {
                    out.cleared.push(app.to_owned());
                    false
                }
                _ => {
                    out.rewrite.push(alarm.clone());
                    true
                }
            }
        });
        for alarm in table {
            if let Some(app) = alarm.name.credential()
                && !self.raised.contains_key(&alarm.name)
            {
                // The table keeps seconds: the next one, so that only a renewal begun surely
                // after the alarm clears it.
                let since_ms = alarm.since.saturating_add(1).saturating_mul(1000);
                out.adopted.push((app.to_owned(), since_ms));
                self.raised.insert(alarm.name.clone(), alarm.clone());
            }
        }
        self.seen = self
            .raised
            .keys()
            .filter(|n| names.contains(*n))
            .cloned()
            .collect();
        self.table = names;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alarm(name: &str, since: i64) -> Shared {
        Shared {
            name: AlarmName::parse(name),
            detail: format!("{name} detail"),
            since,
        }
    }

    #[test]
    fn an_alarm_not_yet_written_is_written_again_not_taken_as_cleared() {
        let mut f = FleetAlarms::default();
        f.raised(alarm("credential:a", 10));
        let r = f.reconcile(&[]);
        assert_eq!(r.rewrite, [alarm("credential:a", 10)]);
        assert!(r.cleared.is_empty());
        // Written, then seen.
        assert_eq!(
            f.reconcile(&[alarm("credential:a", 10)]),
            Reconciled::default()
        );
    }

    #[test]
    fn a_credential_alarm_seen_then_gone_was_cleared_elsewhere() {
        let mut f = FleetAlarms::default();
        f.raised(alarm("credential:a", 10));
        f.reconcile(&[alarm("credential:a", 10)]);
        let r = f.reconcile(&[]);
        assert_eq!(r.cleared, ["a"]);
        assert!(r.rewrite.is_empty());
        assert!(!f.shown(&AlarmName::parse("credential:a")));
    }

    #[test]
    fn raised_again_after_a_clear_elsewhere_it_is_not_taken_as_cleared_before_it_lands() {
        let mut f = FleetAlarms::default();
        f.raised(alarm("credential:a", 10));
        f.reconcile(&[alarm("credential:a", 10)]);
        f.raised(alarm("credential:a", 20));
        let r = f.reconcile(&[]);
        assert_eq!(r.rewrite, [alarm("credential:a", 20)]);
        assert!(r.cleared.is_empty());
    }

    #[test]
    fn another_processs_credential_alarm_is_taken_up_once() {
        let mut f = FleetAlarms::default();
        let r = f.reconcile(&[alarm("credential:b", 7), alarm("breaker:purchase", 7)]);
        assert_eq!(r.adopted, [("b".to_owned(), 8000)]);
        assert!(
            f.shown(&AlarmName::parse("breaker:purchase"))
                && f.shown(&AlarmName::parse("credential:b"))
        );
        let again = f.reconcile(&[alarm("credential:b", 7), alarm("breaker:purchase", 7)]);
        assert_eq!(again, Reconciled::default());
        // Cleared by whoever saw the credential work.
        assert_eq!(f.reconcile(&[]).cleared, ["b"]);
    }

    #[test]
    fn a_condition_this_process_still_sees_is_written_again_after_another_cleared_it() {
        let mut f = FleetAlarms::default();
        f.raised(alarm("breaker:collections", 5));
        f.reconcile(&[alarm("breaker:collections", 5)]);
        let r = f.reconcile(&[]);
        assert_eq!(r.rewrite, [alarm("breaker:collections", 5)]);
        f.cleared(&AlarmName::parse("breaker:collections"));
        assert_eq!(f.reconcile(&[]), Reconciled::default());
    }
}
