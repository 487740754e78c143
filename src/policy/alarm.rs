//! Alarm names: what each alarm is about, typed. Text only where the alarms table stores it.

use std::fmt;

use crate::policy::claims::Kind;

/// How a credential alarm's name begins in the table: such alarms outlive the process that
/// raised them (the SQL that keeps them past a replica's end matches on it).
pub const CREDENTIAL_PREFIX: &str = "credential:";
const BREAKER_PREFIX: &str = "breaker:";
const CERTIFICATE_PREFIX: &str = "certificate:";
const CLOCK: &str = "clock";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlarmName {
    /// The Store refuses many keys of one application at once: our credential (its client ID).
    Credential(String),
    /// A renew endpoint's outage breaker is open.
    Breaker(Kind),
    /// The host clock disagrees with the Store's and Entra's.
    Clock,
    /// An application's certificate ends soon (the application's label).
    Certificate(String),
    /// A name this version does not know (a newer replica's), kept as the table has it.
    Other(String),
}

impl AlarmName {
    /// The name as the table stores it.
    pub fn parse(text: &str) -> AlarmName {
        if let Some(app) = text.strip_prefix(CREDENTIAL_PREFIX) {
            return AlarmName::Credential(app.to_owned());
        }
        if let Some(kind) = text.strip_prefix(BREAKER_PREFIX).and_then(Kind::parse) {
            return AlarmName::Breaker(kind);
        }
        if let Some(app) = text.strip_prefix(CERTIFICATE_PREFIX) {
            return AlarmName::Certificate(app.to_owned());
        }
        if text == CLOCK {
            return AlarmName::Clock;
        }
        AlarmName::Other(text.to_owned())
    }

    /// The application of a credential alarm.
    pub fn credential(&self) -> Option<&str> {
        match self {
            AlarmName::Credential(app) => Some(app),
            _ => None,
        }
    }
}

/// The name as the table stores it and `status` shows it.
impl fmt::Display for AlarmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AlarmName::Credential(app) => write!(f, "{CREDENTIAL_PREFIX}{app}"),
            AlarmName::Breaker(kind) => write!(f, "{BREAKER_PREFIX}{kind}"),
            AlarmName::Clock => f.write_str(CLOCK),
            AlarmName::Certificate(app) => write!(f, "{CERTIFICATE_PREFIX}{app}"),
            AlarmName::Other(text) => f.write_str(text),
        }
    }
}

/// As text, as the table has it: the JSON of `status` shows names as before.
impl serde::Serialize for AlarmName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_reads_back_as_itself() {
        for name in [
            AlarmName::Credential("app:with:colons".into()),
            AlarmName::Breaker(Kind::Collections),
            AlarmName::Breaker(Kind::Purchase),
            AlarmName::Clock,
            AlarmName::Certificate("main".into()),
            AlarmName::Other("disk:full".into()),
        ] {
            assert_eq!(AlarmName::parse(&name.to_string()), name);
        }
        assert_eq!(AlarmName::Clock.to_string(), "clock");
        assert_eq!(
            AlarmName::parse("breaker:nonsense"),
            AlarmName::Other("breaker:nonsense".into())
        );
    }
}
