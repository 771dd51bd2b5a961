//! The test-results observer: counts the results of libtest (`cargo test`), pytest, `go test -v`
//! and TAP tests on a step's stdout and stderr, reports tests_passed, tests_failed and
//! tests_skipped, a "tests" progress metric and a summary, writes the failed tests' names to the
//! "failures" log, and makes the step FAILURE when a test failed.

mod parse;

use guest_sdk::prelude::*;
use serde::Deserialize;

use crate::parse::{Counts, Tally};

/// The log that failed tests' names are written to, one per line.
const LOG: &str = "failures";

/// The arguments of the "test-results" observer (JSON; `null` means all defaults).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Args {
    /// Make the step WARNINGS when a test was skipped or ignored (default false).
    warn_on_skipped: bool,
}

struct TestResults {
    args: Args,
    tally: Tally,
    /// Failed tests' names from the current batch, written to the log once per batch.
    failures: String,
    /// The total last reported as progress, so an unchanged total costs no host call.
    reported: Option<u64>,
}

impl TestResults {
    fn flush(&mut self, report: &Report) {
        if !self.failures.is_empty() {
            // A log the host refuses (too large) must not stop the counting.
            report.write_log(LOG, &self.failures).ok();
            self.failures.clear();
        }
        let total = self.tally.counts().total();
        if self.reported != Some(total) {
            report.set_progress("tests", total);
            self.reported = Some(total);
        }
    }
}

impl LineObserver for TestResults {
    fn new(args: &Value) -> Result<Self, Error> {
        Ok(TestResults {
            args: guest_sdk::parse_args(args, "test-results")?,
            tally: Tally::default(),
            failures: String::new(),
            reported: None,
        })
    }

    fn chunk(&mut self, channel: Channel, text: &str, _report: &Report) {
        if channel == Channel::Header {
            return;
        }
        for line in text.split_terminator('\n') {
            self.tally.line(line, &mut self.failures);
        }
    }

    fn batch_done(&mut self, report: &Report) {
        self.flush(report);
    }

    fn finished(&mut self, report: &Report) -> Option<Outcome> {
        self.flush(report);
        let counts = self.tally.counts();
        report.set_statistic("tests_passed", counts.passed as f64);
        report.set_statistic("tests_failed", counts.failed as f64);
        report.set_statistic("tests_skipped", counts.skipped as f64);
        report.set_summary(&summary(&counts));
        verdict(&counts, &self.args)
    }
}

/// "120 passed, 2 failed, 1 skipped", leaving out no failures and no skips; "0 tests" if none.
fn summary(counts: &Counts) -> String {
    if counts.total() == 0 {
        return "0 tests".to_owned();
    }
    let mut text = format!("{} passed", counts.passed);
    if counts.failed > 0 {
        text += &format!(", {} failed", counts.failed);
    }
    if counts.skipped > 0 {
        text += &format!(", {} skipped", counts.skipped);
    }
    text
}

/// FAILURE if a test failed, else WARNINGS if one was skipped and `warn_on_skipped`.
fn verdict(counts: &Counts, args: &Args) -> Option<Outcome> {
    if counts.failed > 0 {
        Some(Outcome::Failure)
    } else if counts.skipped > 0 && args.warn_on_skipped {
        Some(Outcome::Warnings)
    } else {
        None
    }
}

guest_sdk::observer!(TestResults);

#[cfg(test)]
mod tests {
    use super::*;

    fn new(args: &str) -> Result<TestResults, Error> {
        TestResults::new(&args.parse::<Value>().unwrap())
    }

    fn counts(passed: u64, failed: u64, skipped: u64) -> Counts {
        Counts {
            passed,
            failed,
            skipped,
        }
    }

    #[test]
    fn arguments() {
        assert!(!new("null").unwrap().args.warn_on_skipped);
        assert!(!new("{}").unwrap().args.warn_on_skipped);
        assert!(
            new(r#"{"warn_on_skipped": true}"#)
                .unwrap()
                .args
                .warn_on_skipped
        );
        let error = |json: &str| new(json).err().unwrap().to_string();
        assert_eq!(
            error(r#"{"warn_on_skipped": "yes"}"#),
            "test-results: argument `warn_on_skipped`: invalid type: string \"yes\", \
             expected a boolean"
        );
        assert_eq!(
            error(r#"{"warn_on_skip": true}"#),
            "test-results: argument `warn_on_skip`: unknown field `warn_on_skip`, \
             expected `warn_on_skipped`"
        );
        assert_eq!(
            error("true"),
            "test-results: arguments must be a JSON object or null, not a boolean"
        );
    }

    #[test]
    fn summaries() {
        assert_eq!(summary(&counts(0, 0, 0)), "0 tests");
        assert_eq!(summary(&counts(120, 0, 0)), "120 passed");
        assert_eq!(
            summary(&counts(120, 2, 1)),
            "120 passed, 2 failed, 1 skipped"
        );
        assert_eq!(summary(&counts(0, 2, 0)), "0 passed, 2 failed");
        assert_eq!(summary(&counts(3, 0, 4)), "3 passed, 4 skipped");
    }

    #[test]
    fn verdicts() {
        let defaults = Args::default();
        let warn = Args {
            warn_on_skipped: true,
        };
        assert_eq!(verdict(&counts(0, 0, 0), &defaults), None);
        assert_eq!(verdict(&counts(5, 0, 2), &defaults), None);
        assert_eq!(verdict(&counts(5, 0, 2), &warn), Some(Outcome::Warnings));
        assert_eq!(verdict(&counts(5, 1, 2), &warn), Some(Outcome::Failure));
        assert_eq!(verdict(&counts(5, 1, 0), &defaults), Some(Outcome::Failure));
    }

    #[test]
    fn chunks_skip_header_lines() {
        let report = Report::default();
        let mut observer = new("null").unwrap();
        observer.chunk(Channel::Header, "test kiln ... FAILED\n", &report);
        observer.chunk(
            Channel::Stdout,
            "test a ... ok\ntest b ... FAILED\n",
            &report,
        );
        observer.chunk(Channel::Stderr, "--- FAIL: TestC (0.00s)\n", &report);
        assert_eq!(observer.tally.counts(), counts(1, 2, 0));
        assert_eq!(observer.failures, "b\nTestC\n");
    }
}
