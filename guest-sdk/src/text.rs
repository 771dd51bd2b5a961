//! Text helpers for observers and steps that read tool output.

/// A log line without a trailing "\r" and without ANSI escape sequences (colours, hyperlinks),
/// which compilers and test runners emit when told to colour their output. Borrowed when there
/// is nothing to remove, so it costs one `memchr` on plain lines.
pub fn strip_ansi(line: &str) -> std::borrow::Cow<'_, str> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    if memchr::memchr(0x1b, line.as_bytes()).is_none() {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        match chars.next() {
            // CSI: parameters and intermediates, then one final byte in '@'..='~'.
            Some('[') => {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            // OSC (such as a hyperlink): up to BEL or ESC '\'.
            Some(']') => {
                while let Some(c) = chars.next() {
                    if c == '\x07' {
                        break;
                    }
                    if c == '\x1b' {
                        chars.next();
                        break;
                    }
                }
            }
            // Any other escape is two characters long.
            _ => {}
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_removed() {
        assert_eq!(strip_ansi("plain\r"), "plain");
        assert_eq!(strip_ansi("\x1b[1m\x1b[33mwarning\x1b[0m: x"), "warning: x");
        assert_eq!(
            strip_ansi("[\x1b]8;;https://gcc.gnu.org/\x07-Wunused\x1b]8;;\x1b\\]"),
            "[-Wunused]"
        );
        assert!(matches!(
            strip_ansi("no escapes"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
