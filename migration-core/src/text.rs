//! Untrusted text made safe for a terminal: [`printable`].
//!
//! Strings read from a file or a peer (component and section ids, the producer
//! string, ABORT and refusal reasons) may carry escape sequences that move the cursor,
//! rewrite earlier lines or retitle the window. Everything that prints such a string,
//! or puts it in an error message, passes it through [`printable`] first.
//!
//! ```
//! use migration_core::text::printable;
//!
//! assert_eq!(printable("vm/serial0"), "vm/serial0");
//! assert_eq!(printable("evil\x1b[2Jid"), "evil\\u{1b}[2Jid");
//! ```

use std::borrow::Cow;

/// `s` with every control character (C0, DEL, C1) and every bidirectional override
/// written as a Rust escape (`\n`, `\u{1b}`, `\u{202e}`); other text unchanged.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            if c.escape_debug().any(|e| e == '\\') {
                out.extend(c.escape_debug());
            } else {
                // escape_debug leaves some format characters as they are.
                out.extend(c.escape_unicode());
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_bidi_characters_are_escaped_the_rest_kept() {
        assert_eq!(printable("a\tb\nc\r"), "a\\tb\\nc\\r");
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(printable("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(printable("größe ✓"), "größe ✓");
        assert!(!printable("\x1b]0;title\x07")
            .chars()
            .any(|c| c.is_control()));
    }
}
