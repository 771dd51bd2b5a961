//! The warnings observer: counts compiler warnings (gcc/clang, rustc/cargo, MSVC) on a step's
//! stdout and stderr, copies them to the "warnings" log, reports a "warnings" statistic and a
//! summary, and makes the step WARNINGS (or FAILURE, past a limit) when there are any.

mod parse;

use guest_sdk::prelude::*;
use serde::Deserialize;

use crate::parse::Scanner;

/// The log that warning lines are copied to.
const LOG: &str = "warnings";

/// The arguments of the "warnings" observer (JSON; `null` means all defaults).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Args {
    /// Make the step WARNINGS when there is at least one warning (default true).
    warn_on_warnings: bool,
    /// Make the step FAILURE when there are more warnings than this (default: no limit).
    max_warnings: Option<u64>,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            warn_on_warnings: true,
            max_warnings: None,
        }
    }
}

/// Counts warnings per channel, so that a rustc warning's location line is looked for on the
/// channel the warning came on.
struct Warnings {
    args: Args,
    stdout: Scanner,
    stderr: Scanner,
    /// Warning lines of the current batch, written to the log once per batch.
    pending: String,
}

impl Warnings {
    fn count(&self) -> u64 {
        self.stdout.count() + self.stderr.count()
    }

    fn flush(&mut self, report: &Report) {
        if !self.pending.is_empty() {
            // A log the host refuses (too large) must not stop the counting.
            report.write_log(LOG, &self.pending).ok();
            self.pending.clear();
        }
    }
}

impl LineObserver for Warnings {
    fn new(args: &Value) -> Result<Self, Error> {
        Ok(Warnings {
            args: guest_sdk::parse_args(args, "warnings")?,
            stdout: Scanner::default(),
            stderr: Scanner::default(),
            pending: String::new(),
        })
    }

    fn chunk(&mut self, channel: Channel, text: &str, _report: &Report) {
        match channel {
            Channel::Stdout => self.stdout.scan(text, &mut self.pending),
            Channel::Stderr => self.stderr.scan(text, &mut self.pending),
            Channel::Header => {}
        }
    }

    fn batch_done(&mut self, report: &Report) {
        self.flush(report);
    }

    fn finished(&mut self, report: &Report) -> Option<Outcome> {
        self.flush(report);
        let count = self.count();
        report.set_statistic("warnings", count as f64);
        if let Some(summary) = summary(count) {
            report.set_summary(&summary);
        }
        verdict(count, &self.args)
    }
}

/// "1 warning", "N warnings", or nothing when there are none.
fn summary(count: u64) -> Option<String> {
    match count {
        0 => None,
        1 => Some("1 warning".to_owned()),
        n => Some(format!("{n} warnings")),
    }
}

/// FAILURE past `max_warnings`, else WARNINGS if there are any and `warn_on_warnings`.
fn verdict(count: u64, args: &Args) -> Option<Outcome> {
    match args.max_warnings {
        Some(max) if count > max => Some(Outcome::Failure),
        _ if count > 0 && args.warn_on_warnings => Some(Outcome::Warnings),
        _ => None,
    }
}

guest_sdk::observer!(Warnings);

#[cfg(test)]
mod tests {
    use super::*;

    fn new(args: &str) -> Result<Warnings, Error> {
        Warnings::new(&args.parse::<Value>().unwrap())
    }

    fn args(json: &str) -> Args {
        new(json).unwrap().args
    }

    #[test]
    fn arguments() {
        let defaults = args("null");
        assert!(defaults.warn_on_warnings);
        assert_eq!(defaults.max_warnings, None);
        let set = args(r#"{"warn_on_warnings": false, "max_warnings": 10}"#);
        assert!(!set.warn_on_warnings);
        assert_eq!(set.max_warnings, Some(10));
        assert!(args("{}").warn_on_warnings);
    }

    #[test]
    fn bad_arguments_name_the_key() {
        let error = |json: &str| new(json).err().unwrap().to_string();
        assert_eq!(
            error(r#"{"max_warnings": "ten"}"#),
            "warnings: argument `max_warnings`: invalid type: string \"ten\", expected u64"
        );
        assert_eq!(
            error(r#"{"warn_on_warnings": true, "max_warnings": -1}"#),
            "warnings: argument `max_warnings`: invalid value: integer `-1`, expected u64"
        );
        assert_eq!(
            error(r#"{"warn_on_warnings": 1}"#),
            "warnings: argument `warn_on_warnings`: invalid type: integer `1`, expected a boolean"
        );
        assert_eq!(
            error(r#"{"max_warning": 3}"#),
            "warnings: argument `max_warning`: unknown field `max_warning`, \
             expected `warn_on_warnings` or `max_warnings`"
        );
        assert_eq!(
            error("[1]"),
            "warnings: arguments must be a JSON object or null, not an array"
        );
    }

    #[test]
    fn verdicts() {
        let defaults = Args::default();
        assert_eq!(verdict(0, &defaults), None);
        assert_eq!(verdict(1, &defaults), Some(Outcome::Warnings));
        let quiet = args(r#"{"warn_on_warnings": false}"#);
        assert_eq!(verdict(5, &quiet), None);
        let limited = args(r#"{"max_warnings": 2}"#);
        assert_eq!(verdict(2, &limited), Some(Outcome::Warnings));
        assert_eq!(verdict(3, &limited), Some(Outcome::Failure));
        let strict = args(r#"{"max_warnings": 0, "warn_on_warnings": false}"#);
        assert_eq!(verdict(0, &strict), None);
        assert_eq!(verdict(1, &strict), Some(Outcome::Failure));
    }

    #[test]
    fn summaries() {
        assert_eq!(summary(0), None);
        assert_eq!(summary(1).as_deref(), Some("1 warning"));
        assert_eq!(summary(7).as_deref(), Some("7 warnings"));
    }

    #[test]
    fn chunks_by_channel() {
        let report = Report::default();
        let mut observer = new("null").unwrap();
        observer.chunk(Channel::Stderr, "warning: unused variable: `x`\n", &report);
        // A stdout line in between does not take the stderr warning's location.
        observer.chunk(Channel::Stdout, " --> src/out.rs:1:1\n", &report);
        observer.chunk(
            Channel::Header,
            "warning: header lines are Kiln's own\n",
            &report,
        );
        observer.chunk(Channel::Stderr, " --> src/main.rs:2:9\n", &report);
        observer.chunk(Channel::Stdout, "a.c:1:2: warning: on stdout\n", &report);
        assert_eq!(observer.count(), 2);
        assert_eq!(
            observer.pending,
            "warning: unused variable: `x`\n --> src/main.rs:2:9\na.c:1:2: warning: on stdout\n"
        );
    }
}
