//! Recognises test results in log lines: libtest (`cargo test`), pytest, `go test -v` and TAP.
//! Pure: no SDK, so it is tested on the host.
//!
//! Each framework is counted from its per-test lines when it prints them, and otherwise from its
//! summary lines (`cargo test -q` prints dots, plain `pytest` prints letters), so a test is never
//! counted twice.

/// A test's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// It passed (also pytest's XPASS).
    Passed,
    /// It failed (also pytest's ERROR).
    Failed,
    /// It did not run or does not count: ignored, skipped, pytest's XFAIL, TAP's TODO.
    Skipped,
}

/// Numbers of tests by result.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Tests skipped or ignored.
    pub skipped: u64,
}

impl Counts {
    /// All tests.
    pub fn total(&self) -> u64 {
        self.passed + self.failed + self.skipped
    }

    fn add(&mut self, status: Status, n: u64) {
        match status {
            Status::Passed => self.passed += n,
            Status::Failed => self.failed += n,
            Status::Skipped => self.skipped += n,
        }
    }
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.skipped += other.skipped;
    }
}

/// The test frameworks recognised, as indexes into [`Tally`]'s arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framework {
    Libtest = 0,
    Pytest = 1,
    Go = 2,
    Tap = 3,
}

const FRAMEWORKS: usize = 4;

/// Test results counted so far from a log's lines.
#[derive(Debug, Default)]
pub struct Tally {
    /// Counts from per-test lines, by framework.
    tests: [Counts; FRAMEWORKS],
    /// Whether any per-test line of the framework was seen.
    seen: [bool; FRAMEWORKS],
    /// Counts from summary lines, by framework; used only if no per-test line was seen.
    summaries: [Counts; FRAMEWORKS],
    /// Inside libtest's closing "failures:" list of failed test names.
    in_libtest_failures: bool,
}

impl Tally {
    /// The tests counted so far.
    pub fn counts(&self) -> Counts {
        let mut total = Counts::default();
        for f in 0..FRAMEWORKS {
            total += if self.seen[f] {
                self.tests[f]
            } else {
                self.summaries[f]
            };
        }
        total
    }

    /// Takes one line (without its "\n"), appending the name of a failed test, with a "\n", to
    /// `failures`.
    pub fn line(&mut self, line: &str, failures: &mut String) {
        let line = guest_sdk::strip_ansi(line);
        let line = line.as_ref();
        if std::mem::take(&mut self.in_libtest_failures) {
            // "    path::name", one per failed test, until a blank line.
            if let Some(name) = line.strip_prefix("    ")
                && !name.is_empty()
                && !name.contains(char::is_whitespace)
            {
                self.in_libtest_failures = true;
                self.fallback_failure(Framework::Libtest, name, failures);
                return;
            }
        }
        if line == "failures:" {
            self.in_libtest_failures = true;
        } else if let Some((name, status)) = libtest_test(line) {
            self.test(Framework::Libtest, name, status, failures);
        } else if let Some(counts) = libtest_summary(line) {
            self.summaries[Framework::Libtest as usize] += counts;
        } else if let Some((name, status)) = go_test(line) {
            self.test(Framework::Go, name, status, failures);
        } else if let Some((name, status)) = tap_test(line) {
            self.test(Framework::Tap, name, status, failures);
        } else if let Some(counts) = pytest_summary(line) {
            self.summaries[Framework::Pytest as usize] += counts;
        } else if let Some(name) = pytest_short_summary(line) {
            self.fallback_failure(Framework::Pytest, name, failures);
        } else if let Some((name, status)) = pytest_test(line) {
            self.test(Framework::Pytest, name, status, failures);
        }
    }

    fn test(&mut self, framework: Framework, name: &str, status: Status, failures: &mut String) {
        self.seen[framework as usize] = true;
        self.tests[framework as usize].add(status, 1);
        if status == Status::Failed {
            failures.push_str(name);
            failures.push('\n');
        }
    }

    /// A failed test named by a framework's closing report, used only when its per-test lines
    /// (which name the failures already) were not seen.
    fn fallback_failure(&mut self, framework: Framework, name: &str, failures: &mut String) {
        if !self.seen[framework as usize] {
            failures.push_str(name);
            failures.push('\n');
        }
    }
}

/// libtest: `test path::name ... ok`, `... FAILED`, `... ignored`, `... ignored, reason`
/// (optionally followed by ` <0.001s>` with `--report-time`).
fn libtest_test(line: &str) -> Option<(&str, Status)> {
    let rest = line.strip_prefix("test ")?;
    let (name, result) = rest.split_once(" ... ")?;
    let result = match result.rsplit_once(" <") {
        Some((result, time)) if time.ends_with("s>") => result,
        _ => result,
    };
    let status = match result {
        "ok" => Status::Passed,
        "FAILED" => Status::Failed,
        r if r == "ignored" || r.starts_with("ignored, ") => Status::Skipped,
        _ => return None,
    };
    let name = name.strip_suffix(" - should panic").unwrap_or(name);
    Some((name, status))
}

/// libtest: `test result: FAILED. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out;
/// finished in 0.01s`.
fn libtest_summary(line: &str) -> Option<Counts> {
    let rest = line.strip_prefix("test result: ")?;
    let (_, parts) = rest.split_once(". ")?;
    let mut counts = Counts::default();
    for part in parts.split("; ") {
        let Some((n, word)) = part.split_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else {
            continue;
        };
        match word {
            "passed" => counts.add(Status::Passed, n),
            "failed" => counts.add(Status::Failed, n),
            "ignored" => counts.add(Status::Skipped, n),
            _ => {}
        }
    }
    Some(counts)
}

/// Go: `--- PASS: TestX (0.00s)`, `--- FAIL: ...`, `--- SKIP: ...`, indented for subtests.
fn go_test(line: &str) -> Option<(&str, Status)> {
    let rest = line.trim_start().strip_prefix("--- ")?;
    let (status, rest) = if let Some(r) = rest.strip_prefix("PASS: ") {
        (Status::Passed, r)
    } else if let Some(r) = rest.strip_prefix("FAIL: ") {
        (Status::Failed, r)
    } else if let Some(r) = rest.strip_prefix("SKIP: ") {
        (Status::Skipped, r)
    } else {
        return None;
    };
    let name = match rest.rsplit_once(" (") {
        Some((name, time)) if time.ends_with("s)") => name,
        _ => rest,
    };
    Some((name.trim(), status))
}

/// TAP: `ok 1 - description`, `not ok 2 - description`, with the directives `# SKIP reason`
/// (skipped) and `# TODO reason` (skipped, even when not ok). The test number is required, so
/// that Go's package lines (`ok`, two spaces, a tab, the package) and chatter that starts with
/// "ok" are not taken for tests; indented lines (subtests) are left to their parent's line.
fn tap_test(line: &str) -> Option<(&str, Status)> {
    let (mut status, rest) = if let Some(r) = line.strip_prefix("ok ") {
        (Status::Passed, r)
    } else if let Some(r) = line.strip_prefix("not ok ") {
        (Status::Failed, r)
    } else {
        return None;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || !(rest.len() == digits || rest[digits..].starts_with(' ')) {
        return None;
    }
    let name = match rest.find('#') {
        Some(hash) => {
            let directive = rest[hash + 1..].trim_start().as_bytes();
            let starts = |word: &[u8]| {
                directive.len() >= word.len() && directive[..word.len()].eq_ignore_ascii_case(word)
            };
            if starts(b"skip") || starts(b"todo") {
                status = Status::Skipped;
                &rest[..hash]
            } else {
                rest
            }
        }
        None => rest,
    };
    Some((name.trim_end(), status))
}

/// pytest: `==== 2 failed, 3 passed, 1 skipped in 0.12s ====`. Errors count as failed, xfailed as
/// skipped, xpassed as passed; deselected tests and warnings are not tests.
fn pytest_summary(line: &str) -> Option<Counts> {
    let inner = line
        .strip_prefix('=')?
        .trim_matches(|c| c == '=' || c == ' ');
    let (parts, _time) = inner.split_once(" in ")?;
    let mut counts = Counts::default();
    for part in parts.split(", ") {
        let (n, word) = part.split_once(' ')?;
        let n = n.parse::<u64>().ok()?;
        match word {
            "passed" | "xpassed" => counts.add(Status::Passed, n),
            "failed" | "error" | "errors" => counts.add(Status::Failed, n),
            "skipped" | "xfailed" => counts.add(Status::Skipped, n),
            _ => {}
        }
    }
    Some(counts)
}

/// pytest's short test summary: `FAILED tests/test_a.py::test_x - message` or `ERROR ...`, the
/// failed test's node id.
fn pytest_short_summary(line: &str) -> Option<&str> {
    let rest = line
        .strip_prefix("FAILED ")
        .or_else(|| line.strip_prefix("ERROR "))?;
    let id = rest.split_once(" - ").map_or(rest, |(id, _)| id).trim_end();
    (!id.is_empty() && !id.contains(' ')).then_some(id)
}

/// pytest -v: `tests/test_a.py::test_x PASSED  [ 50%]`, with FAILED, SKIPPED, ERROR, XFAIL or
/// XPASS, and a reason in parentheses after some. Also pytest-xdist's
/// `[gw0] [ 50%] PASSED tests/test_a.py::test_x`.
fn pytest_test(line: &str) -> Option<(&str, Status)> {
    if let Some(rest) = line.strip_prefix("[gw") {
        let (_, rest) = rest.split_once("] ")?;
        let rest = match rest.strip_prefix('[') {
            Some(r) => r.split_once("] ")?.1,
            None => rest,
        };
        let (status, id) = rest.split_once(' ')?;
        let id = id.trim_end();
        return (id.contains("::") && !id.contains(' ')).then_some((id, pytest_status(status)?));
    }
    // The node id runs to the first space, or past the parameters in brackets, which may hold
    // spaces; the status word follows.
    let end = match line.find(' ') {
        Some(space) if line[..space].contains('[') && !line[..space].contains(']') => {
            line.find("] ")? + 1
        }
        Some(space) => space,
        None => return None,
    };
    let id = &line[..end];
    let (file, _) = id.split_once("::")?;
    if file.is_empty() {
        return None;
    }
    let rest = &line[end + 1..];
    let word = rest.split_once(' ').map_or(rest, |(word, _)| word);
    Some((id, pytest_status(word)?))
}

/// A pytest -v status word.
fn pytest_status(word: &str) -> Option<Status> {
    Some(match word {
        "PASSED" | "XPASS" => Status::Passed,
        "FAILED" | "ERROR" => Status::Failed,
        "SKIPPED" | "XFAIL" => Status::Skipped,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` line by line, returning the counts and the failures log.
    fn tally(text: &str) -> (Counts, String) {
        let mut tally = Tally::default();
        let mut failures = String::new();
        for line in text.lines() {
            tally.line(line, &mut failures);
        }
        (tally.counts(), failures)
    }

    fn counts(passed: u64, failed: u64, skipped: u64) -> Counts {
        Counts {
            passed,
            failed,
            skipped,
        }
    }

    const LIBTEST: &str = include_str!("../tests/samples/libtest.txt");
    const LIBTEST_QUIET: &str = include_str!("../tests/samples/libtest-quiet.txt");
    const PYTEST_VERBOSE: &str = include_str!("../tests/samples/pytest-verbose.txt");
    const PYTEST_SUMMARY: &str = include_str!("../tests/samples/pytest-summary.txt");
    const GO: &str = include_str!("../tests/samples/go.txt");
    const TAP: &str = include_str!("../tests/samples/tap.txt");

    #[test]
    fn libtest() {
        assert_eq!(
            tally(LIBTEST),
            (counts(3, 1, 1), "tests::fails\n".to_owned())
        );
    }

    #[test]
    fn libtest_quiet() {
        assert_eq!(
            tally(LIBTEST_QUIET),
            (counts(3, 1, 1), "tests::fails\n".to_owned())
        );
    }

    #[test]
    fn libtest_summaries_add_up() {
        let text = "\
test result: FAILED. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s
test result: ok. 10 passed; 0 failed; 0 ignored; 0 measured; 5 filtered out; finished in 1.50s
test result: ok. 0 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s
";
        assert_eq!(tally(text).0, counts(13, 1, 3));
    }

    #[test]
    fn libtest_lines() {
        for (line, expected) in [
            ("test a::b ... ok", Some(("a::b", Status::Passed))),
            ("test a::b ... FAILED", Some(("a::b", Status::Failed))),
            ("test a::b ... ignored", Some(("a::b", Status::Skipped))),
            (
                "test a::b ... ignored, needs a database",
                Some(("a::b", Status::Skipped)),
            ),
            ("test a::b ... ok <0.002s>", Some(("a::b", Status::Passed))),
            (
                "test a::b - should panic ... FAILED",
                Some(("a::b", Status::Failed)),
            ),
            (
                "test src/lib.rs - add (line 3) ... ok",
                Some(("src/lib.rs - add (line 3)", Status::Passed)),
            ),
            ("test a::bench ... bench:      12 ns/iter (+/- 1)", None),
            ("test a::b has been running for over 60 seconds", None),
            ("test result: ok. 1 passed; 0 failed", None),
        ] {
            assert_eq!(libtest_test(line), expected, "{line}");
        }
    }

    #[test]
    fn pytest_verbose() {
        assert_eq!(
            tally(PYTEST_VERBOSE),
            (
                counts(3, 2, 2),
                "tests/test_a.py::test_sub\ntests/test_b.py::test_fixture\n".to_owned()
            )
        );
    }

    #[test]
    fn pytest_summary_only() {
        assert_eq!(
            tally(PYTEST_SUMMARY),
            (
                counts(3, 2, 2),
                "tests/test_a.py::test_sub\ntests/test_b.py::test_fixture\n".to_owned()
            )
        );
    }

    #[test]
    fn pytest_lines() {
        for (line, expected) in [
            (
                "tests/test_a.py::test_x PASSED  [ 50%]",
                Some(("tests/test_a.py::test_x", Status::Passed)),
            ),
            (
                "tests/test_a.py::TestA::test_x FAILED",
                Some(("tests/test_a.py::TestA::test_x", Status::Failed)),
            ),
            (
                "tests/test_a.py::test_p[a b] SKIPPED (why)   [100%]",
                Some(("tests/test_a.py::test_p[a b]", Status::Skipped)),
            ),
            (
                "[gw1] [ 33%] ERROR tests/test_a.py::test_x ",
                Some(("tests/test_a.py::test_x", Status::Failed)),
            ),
            (
                "[gw0] XFAIL tests/test_a.py::test_x",
                Some(("tests/test_a.py::test_x", Status::Skipped)),
            ),
            // libtest's terse failure line is not a pytest test.
            ("tests::fails --- FAILED", None),
            ("tests/test_a.py::test_add", None),
            ("::test_x PASSED", None),
            ("tests/test_a.py::test_x hello PASSED", None),
        ] {
            assert_eq!(pytest_test(line), expected, "{line}");
        }
        for (line, expected) in [
            ("= 3 passed in 0.01s =", Some(counts(3, 0, 0))),
            (
                "=== 1 failed, 2 passed, 3 errors, 4 xfailed, 5 xpassed in 62.10s (0:01:02) ===",
                Some(counts(7, 4, 4)),
            ),
            ("==== no tests ran in 0.01s ====", None),
            ("==== test session starts ====", None),
            ("=== short test summary info ===", None),
            ("===", None),
        ] {
            assert_eq!(pytest_summary(line), expected, "{line}");
        }
    }

    #[test]
    fn go() {
        assert_eq!(
            tally(GO),
            (
                counts(3, 3, 2),
                "TestSub\nTestTable\nTestTable/negative\n".to_owned()
            )
        );
    }

    #[test]
    fn tap() {
        assert_eq!(
            tally(TAP),
            (
                counts(3, 2, 2),
                "2 - rejects a bad header\n7 - nested\n".to_owned()
            )
        );
    }

    #[test]
    fn tap_lines() {
        for (line, expected) in [
            ("ok 1", Some(("1", Status::Passed))),
            ("ok 1 - a", Some(("1 - a", Status::Passed))),
            ("ok 12 bats style", Some(("12 bats style", Status::Passed))),
            (
                "not ok 2 - a # todo later",
                Some(("2 - a", Status::Skipped)),
            ),
            ("ok 3 # Skipped: no network", Some(("3", Status::Skipped))),
            (
                "not ok 4 - a # note",
                Some(("4 - a # note", Status::Failed)),
            ),
            ("ok  \texample.com/calc\t0.012s", None),
            ("ok computer", None),
            ("ok 5x", None),
            ("    ok 1 - subtest", None),
        ] {
            assert_eq!(tap_test(line), expected, "{line}");
        }
    }

    #[test]
    fn go_lines() {
        assert_eq!(
            go_test("        --- SKIP: TestA/b/c (0.00s)"),
            Some(("TestA/b/c", Status::Skipped))
        );
        assert_eq!(go_test("--- PASS: TestA"), Some(("TestA", Status::Passed)));
        assert_eq!(go_test("--- BENCH: BenchmarkA"), None);
        assert_eq!(go_test("=== RUN   TestA"), None);
    }

    #[test]
    fn every_framework_in_one_log() {
        let all = [LIBTEST_QUIET, PYTEST_VERBOSE, GO, TAP].concat();
        let (counts_all, failures) = tally(&all);
        assert_eq!(
            counts_all,
            counts(3 + 3 + 3 + 3, 1 + 2 + 3 + 2, 1 + 2 + 2 + 2)
        );
        assert_eq!(failures.lines().count(), 8);
    }

    #[test]
    fn per_test_lines_win_over_summaries() {
        // The summary disagrees on purpose: the per-test lines are what counts.
        let text = "test a ... ok\ntest b ... FAILED\n\
                    test result: FAILED. 5 passed; 5 failed; 5 ignored; 0 measured; 0 filtered out\n";
        assert_eq!(tally(text).0, counts(1, 1, 0));
    }

    #[test]
    fn coloured_and_crlf_lines() {
        let text = "test a ... \x1b[32mok\x1b[0m\r\ntest b ... \x1b[31mFAILED\x1b[0m\r\n";
        assert_eq!(tally(text), (counts(1, 1, 0), "b\n".to_owned()));
    }

    #[test]
    fn nothing_recognised() {
        assert_eq!(tally("hello\n\nworld\n"), (counts(0, 0, 0), String::new()));
    }
}
