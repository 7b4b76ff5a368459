//! What `ctl` reads from an API is treated as untrusted: the address may be
//! wrong, or the server not ours. Answers are read to a bound, and every string
//! in them is made printable before it reaches the terminal, where an escape
//! sequence could set the window title, write the clipboard (OSC 52), clear the
//! screen, or a carriage return could draw a fake line over a real one.

use std::io::Read;

use serde_json::Value;

use crate::core::text::display_hazard;

/// The largest answer `ctl` reads; a real one (thousands of mappings) is a few MiB.
pub(super) const MAX_ANSWER_BYTES: u64 = 16 << 20;
/// The part of a refusal's body read for its message.
pub(super) const MAX_ERROR_BYTES: u64 = 64 << 10;
/// A refusal's message is cut to this many characters.
const MAX_MESSAGE_CHARS: usize = 500;

/// All of `body`, or `None` when it is longer than `limit` bytes.
pub(super) fn read_bounded(body: impl Read, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let bytes = read_prefix(body, limit + 1)?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

/// The first `limit` bytes of `body` (fewer if it ends first).
pub(super) fn read_prefix(body: impl Read, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    body.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Every string in `value`, keys included, made [`printable`].
pub(super) fn make_printable(value: &mut Value) {
    match value {
        Value::String(s) => {
            if needs_escaping(s) {
                *s = printable(s);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(make_printable),
        Value::Object(map) => {
            let entries = std::mem::take(map);
            for (key, mut item) in entries {
                make_printable(&mut item);
                map.insert(printable(&key), item);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// `text` with control characters (C0, DEL, C1), bidi overrides and isolates,
/// and line/paragraph separators written as visible `\u{..}` escapes.
pub(super) fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if is_unsafe(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// A refusal's body as one printable line of bounded length.
pub(super) fn printable_message(text: &str) -> String {
    let text = printable(text.trim());
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

fn needs_escaping(text: &str) -> bool {
    text.chars().any(is_unsafe)
}

/// The characters the API refuses in descriptions: the same hazards on a terminal.
fn is_unsafe(c: char) -> bool {
    display_hazard(c).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_become_visible_text() {
        assert_eq!(printable("ssh\u{1b}]0;pwned\u{7}"), "ssh\\u{1b}]0;pwned\\u{7}");
        assert_eq!(printable("ok\rFAKE"), "ok\\u{d}FAKE");
        assert_eq!(printable("a\u{202E}b\u{2028}c\u{9b}"), "a\\u{202e}b\\u{2028}c\\u{9b}");
        assert_eq!(printable("plain — text é"), "plain — text é");
        let mut v = serde_json::json!({"k\u{1b}": ["x\ny", 1, {"z": "\u{7}"}]});
        make_printable(&mut v);
        assert_eq!(v, serde_json::json!({"k\\u{1b}": ["x\\u{a}y", 1, {"z": "\\u{7}"}]}));
    }

    #[test]
    fn reads_stop_at_the_bound() {
        assert_eq!(read_bounded(&b"abcd"[..], 4).unwrap(), Some(b"abcd".to_vec()));
        assert_eq!(read_bounded(&b"abcde"[..], 4).unwrap(), None);
        assert_eq!(printable_message(&"x".repeat(600)).chars().count(), MAX_MESSAGE_CHARS + 1);
    }
}
