//! A batch of writes as the databases read it: each row change as a JSON object, grouped by the
//! statement that applies it, and the batch's events and retired keys as JSON arrays. A batch is
//! a few statements whatever its size (a statement per row cost a round trip each, which
//! dominated the profile); each backend owns the SQL that reads these.

use std::collections::HashSet;

use serde::Serialize;

use crate::policy::claims::KeyFacts;
use crate::storage::{Change, EventKind, Write};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Activate,
    ActivateTrimmed,
    Renew,
    Retry,
    Flag,
    Defer,
}

impl ChangeKind {
    #[cfg(test)]
    pub(crate) const ALL: [ChangeKind; 6] = [
        ChangeKind::Activate,
        ChangeKind::ActivateTrimmed,
        ChangeKind::Renew,
        ChangeKind::Retry,
        ChangeKind::Flag,
        ChangeKind::Defer,
    ];
}

/// The row changes one statement applies: a JSON array of their objects.
pub(crate) struct Group {
    pub(crate) kind: ChangeKind,
    indexes: Vec<usize>,
    ids: HashSet<i64>,
    array: String,
}

impl Group {
    pub(crate) fn json(&self) -> &str {
        &self.array
    }
}

/// The batch's row changes, grouped by statement. A statement reports the ids it changed, so a
/// row appears at most once per statement: a second write to the same row (a spool applied
/// twice, say) goes into a later statement of its own.
pub(crate) fn groups(writes: &[Write]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for (i, write) in writes.iter().enumerate() {
        let Some((kind, json)) = row_json(write) else {
            continue;
        };
        let id = write.key_id();
        match groups
            .iter_mut()
            .find(|g| g.kind == kind && !g.ids.contains(&id))
        {
            Some(g) => {
                g.indexes.push(i);
                g.ids.insert(id);
                g.array.push(',');
                g.array.push_str(&json);
            }
            None => groups.push(Group {
                kind,
                indexes: vec![i],
                ids: HashSet::from([id]),
                array: format!("[{json}"),
            }),
        }
    }
    for g in &mut groups {
        g.array.push(']');
    }
    groups
}

/// Per write, whether it applied: events always do; row changes once their statement says so.
pub(crate) struct Applied(Vec<bool>);

impl Applied {
    pub(crate) fn new(writes: &[Write]) -> Applied {
        Applied(
            writes
                .iter()
                .map(|w| matches!(w, Write::Event(_)))
                .collect(),
        )
    }

    /// `group`'s statement changed the rows `done`.
    pub(crate) fn record(&mut self, writes: &[Write], group: &Group, done: &HashSet<i64>) {
        for &i in &group.indexes {
            self.0[i] = done.contains(&writes[i].key_id());
        }
    }

    pub(crate) fn into_vec(self) -> Vec<bool> {
        self.0
    }

    /// Every event of the batch, in order, as a JSON array; a row change that did not apply
    /// records `superseded` (the backend replaced the key meanwhile: its write stands, ours was
    /// dropped).
    pub(crate) fn events_json(&self, writes: &[Write]) -> Option<String> {
        let mut events = Vec::new();
        for (write, done) in writes.iter().zip(&self.0) {
            let (event, kind) = match write {
                Write::Event(e) => (e, e.kind),
                Write::Row { event: Some(e), .. } if *done => (e, e.kind),
                Write::Row { event: Some(e), .. } => (e, EventKind::Superseded),
                Write::Row { event: None, .. } => continue,
            };
            events.push(EventJson {
                key_id: event.key_id,
                at: event.at,
                kind: kind.as_str(),
                key_fp: event.key_fp.as_deref(),
                http_status: event.http_status,
                error_code: event.error_code.as_deref(),
                detail: event.detail.as_deref(),
                correlation_id: event.correlation_id.as_deref(),
                request_id: event.request_id.as_deref(),
                cv: event.cv.as_deref(),
                duration_ms: event.duration_ms,
            });
        }
        if events.is_empty() {
            return None;
        }
        serde_json::to_string(&events).ok()
    }

    /// The keys the applied renewals retired, as `[row id, trimmed key, at]` triples: the
    /// lineage the backend's upsert is compared with (by the key's last 22 characters).
    pub(crate) fn lineage_json(&self, writes: &[Write]) -> Option<String> {
        let retired: Vec<(i64, &str, i64)> = writes
            .iter()
            .zip(&self.0)
            .filter_map(|(write, done)| match write {
                Write::Row {
                    id,
                    expected,
                    at,
                    change: Change::Renew { .. },
                    ..
                } if *done && expected.is_utf8() => Some((*id, expected.trimmed(), *at)),
                _ => None,
            })
            .collect();
        if retired.is_empty() {
            return None;
        }
        serde_json::to_string(&retired).ok()
    }
}

/// The fields of one row change, as the statement of its kind reads them.
#[derive(Serialize, Default)]
struct RowJson<'a> {
    id: i64,
    /// The key that was read, as text; its bytes in hex when they are not UTF-8 (a blob).
    #[serde(skip_serializing_if = "Option::is_none")]
    expected: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expected_hex: Option<String>,
    at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_fp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    issued_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refused_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unanswered_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'static str>,
}

impl<'a> RowJson<'a> {
    fn facts(mut self, facts: &'a KeyFacts) -> Self {
        self.client_id = Some(&facts.client_id);
        self.user_id = facts.user_id.as_deref();
        self.issued_at = Some(facts.issued_at);
        self.expires_at = Some(facts.expires_at);
        self
    }
}

/// The statement that applies `write` and the JSON object it reads, for a row change.
fn row_json(write: &Write) -> Option<(ChangeKind, String)> {
    let Write::Row {
        id,
        expected,
        at,
        change,
        ..
    } = write
    else {
        return None;
    };
    let base = RowJson {
        id: *id,
        expected: expected.is_utf8().then(|| expected.expose()),
        expected_hex: (!expected.is_utf8()).then(|| hex(expected.cas_bytes())),
        at: *at,
        ..RowJson::default()
    };
    let (kind, row) = match change {
        // Compared on what the backend wrote, stored as it is sent.
        Change::Activate { facts, next_at } => (
            if expected.has_padding() {
                ChangeKind::ActivateTrimmed
            } else {
                ChangeKind::Activate
            },
            RowJson {
                new_key: expected.has_padding().then(|| expected.trimmed()),
                key_fp: Some(expected.fingerprint().to_string()),
                next_at: Some(*next_at),
                ..base
            }
            .facts(facts),
        ),
        Change::Renew {
            key,
            facts,
            next_at,
        } => (
            ChangeKind::Renew,
            RowJson {
                new_key: Some(key.expose()),
                key_fp: Some(key.fingerprint().to_string()),
                next_at: Some(*next_at),
                ..base
            }
            .facts(facts),
        ),
        Change::Retry {
            at,
            reason,
            refused_ms,
            unanswered_at,
        } => (
            ChangeKind::Retry,
            RowJson {
                next_at: Some(*at),
                refused_ms: *refused_ms,
                unanswered_at: *unanswered_at,
                reason: Some(reason),
                ..base
            },
        ),
        Change::Flag { state, reason } => (
            ChangeKind::Flag,
            RowJson {
                state: Some(state.as_str()),
                reason: Some(reason),
                key_fp: Some(expected.fingerprint().to_string()),
                ..base
            },
        ),
        Change::Defer { at } => (
            ChangeKind::Defer,
            RowJson {
                next_at: Some(*at),
                ..base
            },
        ),
    };
    serde_json::to_string(&row).ok().map(|json| (kind, json))
}

/// An event row as the insert reads it; `kind` may differ from the event's (`superseded`).
#[derive(Serialize)]
struct EventJson<'a> {
    key_id: i64,
    at: i64,
    kind: &'static str,
    key_fp: Option<&'a str>,
    http_status: Option<u16>,
    error_code: Option<&'a str>,
    detail: Option<&'a str>,
    correlation_id: Option<&'a str>,
    request_id: Option<&'a str>,
    cv: Option<&'a str>,
    duration_ms: Option<i64>,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]])
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_pairs() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
