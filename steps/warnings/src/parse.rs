//! Recognises compiler warnings (gcc/clang, rustc/cargo, MSVC) in runs of log lines. Pure: no
//! SDK, so it is tested on the host.
//!
//! A [`Scanner`] looks only at the lines that contain "warning", found with one substring
//! search over the whole run, so output without warnings costs one `memmem` pass and no line
//! splitting.

use memchr::memmem;

/// What a line is to the warning counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// A warning complete on its line (gcc/clang, MSVC).
    Warning,
    /// A rustc/cargo warning: its location (` --> file:line:col`) follows on the next line.
    RustcWarning,
    /// Anything else, including cargo's and rustc's "generated N warnings" summaries.
    Other,
}

/// Counts the warnings of one channel and collects their lines.
///
/// Feed it the channel's runs of complete lines in order: a rustc warning's location line may be
/// the first line of the next run.
#[derive(Debug)]
pub struct Scanner {
    finder: memmem::Finder<'static>,
    count: u64,
    /// The last line seen was a rustc warning, so a location line may come next.
    after_rustc: bool,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            finder: memmem::Finder::new("warning").into_owned(),
            count: 0,
            after_rustc: false,
        }
    }
}

impl Scanner {
    /// The warnings seen so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Scans a run of complete lines (each ending in "\n"), appending each warning line, and
    /// the location line after a rustc warning, to `log` (cleaned as [`clean`] does, each with
    /// a "\n").
    pub fn scan(&mut self, text: &str, log: &mut String) {
        let bytes = text.as_bytes();
        let mut pos = 0;
        if std::mem::take(&mut self.after_rustc) {
            pos = take_location(text, pos, log);
        }
        while let Some(found) = self.finder.find(&bytes[pos..]) {
            let hit = pos + found;
            let start = memchr::memrchr(b'\n', &bytes[pos..hit]).map_or(pos, |i| pos + i + 1);
            let end = memchr::memchr(b'\n', &bytes[hit..]).map_or(bytes.len(), |i| hit + i);
            pos = (end + 1).min(bytes.len());
            let line = guest_sdk::strip_ansi(&text[start..end]);
            let kind = classify(&line);
            if kind == LineKind::Other {
                continue;
            }
            self.count += 1;
            log.push_str(&line);
            log.push('\n');
            if kind == LineKind::RustcWarning {
                if pos == bytes.len() {
                    self.after_rustc = true;
                } else {
                    pos = take_location(text, pos, log);
                }
            }
        }
    }
}

/// If the line starting at `start` is a rustc location line, appends it to `log` and returns
/// where the next line starts; otherwise returns `start`.
fn take_location(text: &str, start: usize, log: &mut String) -> usize {
    let rest = &text.as_bytes()[start..];
    let end = memchr::memchr(b'\n', rest).map_or(text.len(), |i| start + i);
    let line = guest_sdk::strip_ansi(&text[start..end]);
    if !is_location(&line) {
        return start;
    }
    log.push_str(&line);
    log.push('\n');
    (end + 1).min(text.len())
}

/// Whether this is the location line rustc prints under a diagnostic: ` --> src/lib.rs:4:9`
/// (indented to the width of the line numbers).
pub fn is_location(line: &str) -> bool {
    line.trim_start().starts_with("--> ")
}

/// What kind of line this is (already [`clean`]ed).
pub fn classify(line: &str) -> LineKind {
    if let Some(kind) = rustc(line) {
        return kind;
    }
    if gcc(line) || msvc(line) {
        LineKind::Warning
    } else {
        LineKind::Other
    }
}

/// rustc/cargo: `warning: message` or `warning[E0000]: message` at the start of the line. `None`
/// if the line does not start so (it may still be a gcc line, from a file named `warning*.c`).
fn rustc(line: &str) -> Option<LineKind> {
    let rest = line.strip_prefix("warning")?;
    let message = match rest.as_bytes().first()? {
        b':' => &rest[1..],
        b'[' => {
            let close = rest.find("]:")?;
            let code = &rest[1..close];
            if code.is_empty() || !code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return None;
            }
            &rest[close + 2..]
        }
        _ => return None,
    };
    Some(if is_summary(message.trim_start()) {
        LineKind::Other
    } else {
        LineKind::RustcWarning
    })
}

/// cargo's and rustc's own lines after `warning: `, which are not warnings of their own:
/// "`crate` (lib) generated 2 warnings (run `cargo fix ...`)", "2 warnings emitted" and
/// "build failed, waiting for other jobs to finish...".
fn is_summary(message: &str) -> bool {
    if message.starts_with('`')
        && let Some(i) = message.find(") generated ")
    {
        return counted_warnings(&message[i + ") generated ".len()..]).is_some();
    }
    if let Some(rest) = counted_warnings(message) {
        return rest.starts_with(" emitted");
    }
    message.starts_with("build failed, waiting for other jobs to finish")
}

/// Strips "N warning" or "N warnings" from the start of `text`, returning the rest.
fn counted_warnings(text: &str) -> Option<&str> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let rest = text[digits..].strip_prefix(" warning")?;
    Some(rest.strip_prefix('s').unwrap_or(rest))
}

/// gcc/clang: `path:line:col: warning: message` or `path:line: warning: message`.
fn gcc(line: &str) -> bool {
    let Some(at) = memmem::find(line.as_bytes(), b": warning:") else {
        return false;
    };
    // Strip ":line" and, if there is one, ":col" from the right; a path must remain.
    let Some(rest) = strip_number(&line[..at]).and_then(|p| p.strip_suffix(':')) else {
        return false;
    };
    let path = strip_number(rest)
        .and_then(|p| p.strip_suffix(':'))
        .unwrap_or(rest);
    !path.is_empty()
}

/// `text` without its trailing ASCII digits, or `None` if it does not end in one.
fn strip_number(text: &str) -> Option<&str> {
    let kept = text.trim_end_matches(|c: char| c.is_ascii_digit());
    (kept.len() < text.len()).then_some(kept)
}

/// MSVC (and other Microsoft compilers): `path(line): warning C4996: message`,
/// `path(line,col): warning C4996: message`, also with a space before the colon (older
/// versions) and without a code (clang-cl).
fn msvc(line: &str) -> bool {
    let bytes = line.as_bytes();
    let (close, after) = if let Some(i) = memmem::find(bytes, b"): warning") {
        (i, &line[i + "): warning".len()..])
    } else if let Some(i) = memmem::find(bytes, b") : warning") {
        (i, &line[i + ") : warning".len()..])
    } else {
        return false;
    };
    let Some(open) = line[..close].rfind('(') else {
        return false;
    };
    let position = &line[open + 1..close];
    let position_ok = position.starts_with(|c: char| c.is_ascii_digit())
        && position
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b',' || b == b'-');
    if open == 0 || !position_ok {
        return false;
    }
    if after.starts_with(':') {
        return true;
    }
    // " C4996:": letters, then digits, then a colon.
    let Some(code) = after.strip_prefix(' ') else {
        return false;
    };
    let letters = code.bytes().take_while(u8::is_ascii_alphabetic).count();
    let digits = code[letters..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    letters > 0 && digits > 0 && code[letters + digits..].starts_with(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `text` in one run, returning the count and the log.
    fn scan(text: &str) -> (u64, String) {
        let mut scanner = Scanner::default();
        let mut log = String::new();
        scanner.scan(text, &mut log);
        (scanner.count(), log)
    }

    /// Scans `text` one line per run, as if every line came in its own batch.
    fn scan_by_line(text: &str) -> (u64, String) {
        let mut scanner = Scanner::default();
        let mut log = String::new();
        for line in text.split_inclusive('\n') {
            scanner.scan(line, &mut log);
        }
        (scanner.count(), log)
    }

    const CARGO: &str = include_str!("../tests/samples/cargo.txt");
    const CARGO_COLOR: &str = include_str!("../tests/samples/cargo-color.txt");
    const RUSTC: &str = include_str!("../tests/samples/rustc.txt");
    const GCC: &str = include_str!("../tests/samples/gcc.txt");
    const MSVC: &str = include_str!("../tests/samples/msvc.txt");

    const CARGO_LOG: &str = "\
warning: unused import: `std::collections::HashMap`
 --> src/lib.rs:1:5
warning: unused variable: `unused`
 --> src/lib.rs:4:9
warning: unused variable: `x`
 --> src/main.rs:2:9
";

    #[test]
    fn cargo_build() {
        assert_eq!(scan(CARGO), (3, CARGO_LOG.to_owned()));
        assert_eq!(scan_by_line(CARGO), (3, CARGO_LOG.to_owned()));
    }

    #[test]
    fn cargo_build_in_colour() {
        assert_eq!(scan(CARGO_COLOR), (3, CARGO_LOG.to_owned()));
        assert_eq!(scan_by_line(CARGO_COLOR), (3, CARGO_LOG.to_owned()));
    }

    #[test]
    fn rustc_alone() {
        let log = "\
warning: unused import: `std::collections::HashMap`
 --> src/lib.rs:1:5
warning: unused variable: `unused`
 --> src/lib.rs:4:9
";
        assert_eq!(scan(RUSTC), (2, log.to_owned()));
    }

    #[test]
    fn gcc() {
        let log = "\
w.c:5:9: warning: unused variable ‘scratch’ [-Wunused-variable]
w.c:11:9: warning: unused variable ‘unused’ [-Wunused-variable]
w2.c:3: warning: unused variable ‘spare’ [-Wunused-variable]
";
        assert_eq!(scan(GCC), (3, log.to_owned()));
    }

    #[test]
    fn msvc() {
        let log = "\
C:\\src\\app\\main.cpp(12): warning C4996: 'strcpy': This function or variable may be unsafe. \
Consider using strcpy_s instead. To disable deprecation, use _CRT_SECURE_NO_WARNINGS. \
See online help for details.
C:\\src\\app\\main.cpp(20,9): warning C4101: 'unused': unreferenced local variable
C:\\src\\app\\util.cpp(7) : warning C4100: 'argc': unreferenced formal parameter
C:\\src\\app\\util.cpp(31,5): warning C4244: '=': conversion from 'double' to 'int', possible loss of data
";
        assert_eq!(scan(MSVC), (4, log.to_owned()));
        // The same with Windows line endings: the "\r" is not copied.
        assert_eq!(scan(&MSVC.replace('\n', "\r\n")), (4, log.to_owned()));
    }

    #[test]
    fn all_samples_in_one_run() {
        let all = [CARGO, RUSTC, GCC, MSVC].concat();
        assert_eq!(scan(&all).0, 3 + 2 + 3 + 4);
    }

    #[test]
    fn classifies_lines() {
        use LineKind::*;
        for (line, kind) in [
            ("warning: unused variable: `x`", RustcWarning),
            (
                "warning[E0170]: pattern binding named like a variant",
                RustcWarning,
            ),
            ("warning: mycrate@0.1.0: from a build script", RustcWarning),
            ("warning: `mycrate` (lib) generated 1 warning", Other),
            (
                "warning: `mycrate` (bin \"x\") generated 2 warnings (run `cargo fix --bin \"x\"` to apply 1 suggestion)",
                Other,
            ),
            (
                "warning: `mycrate` (lib test) generated 12 warnings (1 duplicate)",
                Other,
            ),
            ("warning: 1 warning emitted", Other),
            (
                "warning: build failed, waiting for other jobs to finish...",
                Other,
            ),
            (
                "warnings.c:3:5: warning: unused variable 'x' [-Wunused-variable]",
                Warning,
            ),
            ("src/a.c:3: warning: implicit declaration", Warning),
            ("C:\\a\\b.c:3:5: warning: on Windows", Warning),
            ("a.cpp(3): warning C4996: 'strcpy': unsafe", Warning),
            ("a.cpp(3,7): warning C4101: 'x': unreferenced", Warning),
            (
                "a.cs(3,7,3,9): warning CS0168: declared but never used [a.csproj]",
                Warning,
            ),
            (
                "a.cpp(3,7): warning: unused variable 'x' [-Wunused-variable]",
                Warning,
            ),
            // Not warnings.
            ("  warning: indented", Other),
            ("warnings are bad", Other),
            ("warning", Other),
            ("w.c:5:9: error: expected ';'", Other),
            ("cc1: warning: command-line option ignored", Other),
            (": warning: no path", Other),
            ("w.c:x: warning: no line number", Other),
            ("a.cpp(x): warning C4996: no line number", Other),
            ("(3): warning C4996: no path", Other),
            ("a.cpp(3): warning 4996: no letters in the code", Other),
            ("a.cpp(3): error C2065: undeclared", Other),
            ("note: 2 warnings generated.", Other),
        ] {
            assert_eq!(classify(line), kind, "{line}");
        }
    }

    #[test]
    fn rustc_location_in_the_next_run() {
        let mut scanner = Scanner::default();
        let mut log = String::new();
        scanner.scan("warning: unused variable: `x`\n", &mut log);
        // No "warning" in this run, but its first line is the location.
        scanner.scan(" --> src/main.rs:2:9\n  |\n", &mut log);
        // A location line that does not follow a warning is not copied.
        scanner.scan(" --> src/main.rs:3:9\n", &mut log);
        assert_eq!(scanner.count(), 1);
        assert_eq!(log, "warning: unused variable: `x`\n --> src/main.rs:2:9\n");
    }

    #[test]
    fn consecutive_rustc_warnings_and_paths_named_warning() {
        let text = "warning: a\nwarning: b\n  --> src/warnings.rs:10:1\nwarning: c\n";
        let log = "warning: a\nwarning: b\n  --> src/warnings.rs:10:1\nwarning: c\n";
        assert_eq!(scan(text), (3, log.to_owned()));
    }

    #[test]
    fn several_hits_on_one_line_count_once() {
        let text = "a.c:1:1: warning: warning about warnings\nno warning here\n";
        assert_eq!(scan(text).0, 1);
    }

    #[test]
    fn without_warning_nothing_happens() {
        assert_eq!(scan("compiling\nall fine\n"), (0, String::new()));
        assert_eq!(scan(""), (0, String::new()));
    }
}
