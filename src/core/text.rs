//! Free text that people read (a mapping's description): which characters it
//! may not carry, because they change how the text around them displays.

/// What `c` would do to displayed text, or `None` when it is plain text:
/// control characters move the cursor or start terminal escapes; bidi controls
/// (U+061C, U+200E–U+200F, U+202A–U+202E, U+2066–U+2069) reorder what follows,
/// so text reads as something it is not; line and paragraph separators
/// (U+2028, U+2029) start a new line where no newline is seen. Host names
/// refuse all of these by being ASCII; text that may be in any script refuses
/// exactly these.
pub(crate) fn display_hazard(c: char) -> Option<&'static str> {
    match c {
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' => Some("a bidi control"),
        '\u{2028}' | '\u{2029}' => Some("a line separator"),
        c if c.is_control() => Some("a control character"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_bidi_and_separators_are_hazards_other_scripts_are_not() {
        for hazard in
            ['\n', '\u{1b}', '\u{7f}', '\u{85}', '\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}', '\u{200F}', '\u{2028}', '\u{2029}']
        {
            assert!(display_hazard(hazard).is_some(), "U+{:04X}", hazard as u32);
        }
        for plain in "office ssh é 東京 مرحبا 👩‍💻".chars() {
            assert_eq!(display_hazard(plain), None, "U+{:04X}", plain as u32);
        }
    }
}
