//! The typed vocabulary of a key's life: its state, and what each event on it was. Text appears
//! only at the SQL and metrics edges, through `as_str` and `parse`.

/// The states a key row can be in; the strings are the backend contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Active,
    Revoked,
    Expired,
    Invalid,
    Misconfigured,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Pending,
        State::Active,
        State::Revoked,
        State::Expired,
        State::Invalid,
        State::Misconfigured,
    ];

    /// The states that tell a backend to ask its client for a new key (or an operator to act).
    pub const FLAGGED: [State; 4] = [
        State::Revoked,
        State::Expired,
        State::Invalid,
        State::Misconfigured,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Active => "active",
            State::Revoked => "revoked",
            State::Expired => "expired",
            State::Invalid => "invalid",
            State::Misconfigured => "misconfigured",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_flagged(self) -> bool {
        State::FLAGGED.contains(&self)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// What one event row records: an attempt's answer or a decision storekeyd took on a key.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Ingest checked the key and scheduled it.
    Accepted,
    Renewed,
    /// The Store refused the key (AuthenticationTokenInvalid) and it is not yet believed revoked.
    AuthInvalid,
    Revoked,
    ClientIdMismatch,
    Throttled,
    Transient,
    /// Sent, and no complete answer came back: the Store may have renewed the key.
    Unanswered,
    /// Flagged: the Store refused the key after an attempt that got no answer, so it may have
    /// renewed the key then and retired this one.
    AnswerLost,
    Unexpected,
    TokenError,
    /// The backend replaced the key while storekeyd worked on it; storekeyd's result was dropped.
    Superseded,
    Expired,
    Invalid,
    Misconfigured,
    /// Not attempted: the endpoint's outage breaker holds calls back.
    Deferred,
    /// The backend stored a key the row was already renewed past; the newer key was kept
    /// (recorded by the database's trigger).
    StaleKeyKept,
}

impl EventKind {
    pub const ALL: [EventKind; 17] = [
        EventKind::Accepted,
        EventKind::Renewed,
        EventKind::AuthInvalid,
        EventKind::Revoked,
        EventKind::ClientIdMismatch,
        EventKind::Throttled,
        EventKind::Transient,
        EventKind::Unanswered,
        EventKind::AnswerLost,
        EventKind::Unexpected,
        EventKind::TokenError,
        EventKind::Superseded,
        EventKind::Expired,
        EventKind::Invalid,
        EventKind::Misconfigured,
        EventKind::Deferred,
        EventKind::StaleKeyKept,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Accepted => "accepted",
            EventKind::Renewed => "renewed",
            EventKind::AuthInvalid => "auth_invalid",
            EventKind::Revoked => "revoked",
            EventKind::ClientIdMismatch => "client_id_mismatch",
            EventKind::Throttled => "throttled",
            EventKind::Transient => "transient",
            EventKind::Unanswered => "unanswered",
            EventKind::AnswerLost => "answer_lost",
            EventKind::Unexpected => "unexpected",
            EventKind::TokenError => "token_error",
            EventKind::Superseded => "superseded",
            EventKind::Expired => "expired",
            EventKind::Invalid => "invalid",
            EventKind::Misconfigured => "misconfigured",
            EventKind::Deferred => "deferred",
            EventKind::StaleKeyKept => "stale_key_kept",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The event that flagging a key in `state` records.
    pub fn of_flag(state: State) -> EventKind {
        match state {
            State::Revoked => EventKind::Revoked,
            State::Expired => EventKind::Expired,
            State::Misconfigured => EventKind::Misconfigured,
            State::Pending | State::Active | State::Invalid => EventKind::Invalid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(State::parse("Active"), None);
    }
}
