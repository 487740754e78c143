//! Text a player or a backend wrote (a claim, a user reference, a reason that quotes either),
//! made safe to print. A key's claims are unsigned: an escape sequence in `userId` would
//! otherwise reach the operator's terminal, and a newline could forge a line of `status`.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` must not reach a terminal as it is: control characters (C0, DEL, C1: escape
/// sequences, newlines), the bidirectional overrides and isolates that reorder what a line
/// shows, and the backslash that introduces our own escapes.
fn hostile(c: char) -> bool {
    c.is_control()
        || c == '\\'
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every such character written as `\u{…}` (and `\` as `\\`); borrowed when there
/// is none, which is nearly always.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(hostile) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if hostile(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// JSON for a terminal: serde_json escapes C0 controls in strings, but not DEL, C1 or the
/// bidirectional controls; those can only occur inside strings, where `\uXXXX` means the same.
pub fn printable_json(json: &str) -> Cow<'_, str> {
    // serde_json has written C0 controls and backslashes as escapes already.
    let escape = |c: char| hostile(c) && !matches!(c, '\0'..='\u{1f}' | '\\');
    if !json.chars().any(escape) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    for c in json.chars() {
        if escape(c) {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_newlines_and_overrides_are_shown_not_obeyed() {
        assert!(matches!(printable("player-42"), Cow::Borrowed("player-42")));
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("x\nalarms: none"), "x\\u{a}alarms: none");
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(printable("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(printable("\u{7f}"), "\\u{7f}");
        // A backslash is escaped, so a stored `\u{1b}` cannot pass for an escaped control.
        assert_eq!(printable("a\\u{1b}"), "a\\\\u{1b}");
        assert_eq!(printable("é 日本"), "é 日本");
    }

    #[test]
    fn json_keeps_its_meaning_and_loses_its_controls() {
        let value = serde_json::json!({ "user_id": "a\u{1b}b\u{9b}c\u{202e}d\\" });
        let text = serde_json::to_string(&value).unwrap();
        let shown = printable_json(&text);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown}");
        assert!(!shown.contains('\u{202e}'));
        let back: serde_json::Value = serde_json::from_str(&shown).unwrap();
        assert_eq!(back, value);
    }
}
