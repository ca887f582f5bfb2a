//! Text from outside, made safe to print.
//!
//! Log lines, config values, MQTT payloads, control-socket replies and
//! ticket files can carry control characters. Copied to a terminal, an
//! `ESC ]0;…BEL` sets its title and other sequences do worse; bidirectional
//! overrides make a line read differently from what it holds. Everything
//! bmsgw prints that came from outside goes through [`printable`] first.

use std::borrow::Cow;

/// Whether `c` must not reach a terminal as is: C0 and C1 controls, DEL,
/// and the Unicode bidirectional formatting characters.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// `s` with every character a terminal would act on written as an escape
/// (`\u{1b}`, `\n`, `\u{202e}`); borrowed when there is none.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`printable`] for several lines: each line escaped, the line breaks
/// kept.
pub fn printable_lines(s: &str) -> String {
    s.split('\n')
        .map(|line| printable(line).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn terminal_sequences_are_escaped_and_plain_text_is_kept() {
        assert!(matches!(printable("vcan0 18EC56F4#11"), Cow::Borrowed(_)));
        assert_eq!(
            printable("a\u{1b}]0;owned\u{7}b"),
            "a\\u{1b}]0;owned\\u{7}b"
        );
        assert_eq!(printable("x\ny\r"), "x\\ny\\r");
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(printable("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(printable("Grüße 充电桩"), "Grüße 充电桩");
        assert_eq!(
            printable_lines("ok a\nFAIL \u{1b}[2J\n"),
            "ok a\nFAIL \\u{1b}[2J\n"
        );
    }

    proptest! {
        #[test]
        fn nothing_a_terminal_acts_on_survives(s in any::<String>()) {
            let out = printable(&s);
            prop_assert!(!out.chars().any(unsafe_char));
        }
    }
}
