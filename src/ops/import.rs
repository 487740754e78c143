//! Parsing `storekeyd import` input: JSON lines (`{"user_ref", "key", "kind"?}`) or CSV
//! (`user_ref,key[,kind]`, an optional header). Pure: a line in, a record or a reason out.

use serde::Deserialize;

use crate::policy::claims::{self, KeyText, Kind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Jsonl,
    Csv,
}

impl Format {
    /// JSON lines start with `{`; anything else is CSV.
    pub fn detect(first_line: &str) -> Format {
        if first_line.trim_start().starts_with('{') {
            Format::Jsonl
        } else {
            Format::Csv
        }
    }
}

/// One valid line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub user_ref: String,
    pub kind: Kind,
    pub key: KeyText,
}

/// What to do with one input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Record(Record),
    /// Blank lines and the CSV header.
    Skip,
    /// The reason, never containing the key.
    Reject(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecord {
    user_ref: String,
    key: String,
    kind: Option<String>,
}

pub fn parse_line(format: Format, line: &str) -> Line {
    let line = line.trim();
    if line.is_empty() {
        return Line::Skip;
    }
    let (user_ref, key, kind) = match format {
        Format::Jsonl => match serde_json::from_str::<JsonRecord>(line) {
            Ok(r) => (r.user_ref, r.key, r.kind),
            Err(e) => {
                return Line::Reject(format!(
                    "not a JSON object with `user_ref` and `key`: {}",
                    json_error(&e)
                ));
            }
        },
        Format::Csv => {
            let fields = match split_csv(line) {
                Ok(f) => f,
                Err(e) => return Line::Reject(e),
            };
            if fields
                .first()
                .is_some_and(|f| f.eq_ignore_ascii_case("user_ref"))
            {
                return Line::Skip;
            }
            match fields.as_slice() {
                [u, k] => (u.clone(), k.clone(), None),
                [u, k, kind] if kind.is_empty() => (u.clone(), k.clone(), None),
                [u, k, kind] => (u.clone(), k.clone(), Some(kind.clone())),
                _ => {
                    return Line::Reject(format!(
                        "expected `user_ref,key[,kind]`, found {} fields",
                        fields.len()
                    ));
                }
            }
        }
    };
    record(user_ref, KeyText::new(key), kind.as_deref())
}

/// Checks one entry; the same rules as `storekeyd add`.
pub fn record(user_ref: String, key: KeyText, kind: Option<&str>) -> Line {
    let user_ref = user_ref.trim().to_owned();
    if user_ref.is_empty() || user_ref.len() > 512 {
        return Line::Reject("`user_ref` must be 1 to 512 characters".into());
    }
    let claims = match claims::decode(key.expose()) {
        Ok(c) => c,
        Err(e) => return Line::Reject(format!("not a Store ID key: {e}")),
    };
    let kind = match kind.map(str::trim) {
        None => claims.kind,
        Some(k) => match Kind::parse(k) {
            Some(k) if k == claims.kind => k,
            Some(k) => {
                return Line::Reject(format!(
                    "kind `{k}` given, but the key is a {} key",
                    claims.kind
                ));
            }
            None => {
                return Line::Reject(format!(
                    "kind `{}` is neither `collections` nor `purchase`",
                    short(k)
                ));
            }
        },
    };
    Line::Record(Record {
        user_ref,
        kind,
        key,
    })
}

/// serde_json's message without the echo of a value (which could be a key).
fn json_error(e: &serde_json::Error) -> String {
    match e.classify() {
        serde_json::error::Category::Data => {
            let msg = e.to_string();
            if msg.contains("missing field") || msg.contains("unknown field") {
                msg.split(" at line").next().unwrap_or_default().to_owned()
            } else {
                "a field has the wrong type".to_owned()
            }
        }
        _ => "malformed JSON".to_owned(),
    }
}

/// Minimal RFC 4180 fields: commas, and double quotes with `""` inside quoted fields.
fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', false) if field.is_empty() => quoted = true,
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            (',', false) => fields.push(std::mem::take(&mut field).trim().to_owned()),
            (c, _) => field.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    fields.push(field.trim().to_owned());
    Ok(fields)
}

fn short(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::keymint::{KeySpec, mint};

    fn key() -> String {
        mint(&KeySpec::collections("app", 1_000_000, 100))
    }

    fn reject(format: Format, line: &str) -> String {
        match parse_line(format, line) {
            Line::Reject(r) => r,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn csv_and_jsonl_records() {
        let k = key();
        let Line::Record(r) = parse_line(Format::Csv, &format!("player-1,{k}")) else {
            panic!()
        };
        assert_eq!(
            (r.user_ref.as_str(), r.kind),
            ("player-1", Kind::Collections)
        );
        let Line::Record(r) = parse_line(Format::Csv, &format!("\"a, \"\"b\"\"\",{k},collections"))
        else {
            panic!()
        };
        assert_eq!(r.user_ref, "a, \"b\"");
        let json = serde_json::json!({"user_ref": "p2", "key": k}).to_string();
        assert!(matches!(parse_line(Format::Jsonl, &json), Line::Record(_)));
        assert_eq!(parse_line(Format::Csv, "user_ref,key,kind"), Line::Skip);
        assert_eq!(parse_line(Format::Csv, "   "), Line::Skip);
        assert_eq!(Format::detect(&json), Format::Jsonl);
        assert_eq!(Format::detect("a,b"), Format::Csv);
    }

    #[test]
    fn bad_lines_say_why_without_echoing_the_key() {
        let k = key();
        assert!(reject(Format::Csv, "only-one-field").contains("expected `user_ref,key[,kind]`"));
        assert!(reject(Format::Csv, "p,not-a-key").starts_with("not a Store ID key"));
        assert!(
            reject(Format::Csv, &format!("p,{k},purchase"))
                .contains("the key is a collections key")
        );
        assert!(reject(Format::Csv, &format!(",{k}")).contains("user_ref"));
        assert!(reject(Format::Csv, "\"open,x").contains("unterminated"));
        let r = reject(
            Format::Jsonl,
            &format!("{{\"user_ref\": 5, \"key\": \"{k}\"}}"),
        );
        assert!(!r.contains(&k[..40]), "{r}");
        assert!(reject(Format::Jsonl, "{\"user\": \"x\"}").contains("unknown field"));
        assert!(reject(Format::Jsonl, "{nope").contains("malformed JSON"));
    }

    proptest::proptest! {
        #[test]
        fn import_lines_never_panic(line in ".{0,300}") {
            let _ = parse_line(Format::Csv, &line);
            let _ = parse_line(Format::Jsonl, &line);
        }
    }
}
