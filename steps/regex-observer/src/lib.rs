//! The regex observer: configurable regular expressions over a step's stdout and stderr, each
//! counting its matching lines in a statistic, setting a property from a capture of its last
//! matching line, or giving the step a verdict when it matches.

mod patterns;

use guest_sdk::prelude::*;
use serde::Deserialize;

use crate::patterns::{PatternArgs, Patterns, Stream, Verdict};

/// The arguments of the "regex" observer (JSON), such as
/// `{"patterns": [{"regex": "^error", "statistic": "errors", "outcome": "failure"}]}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Args {
    /// The patterns, each a [`PatternArgs`] object; at least one is required. They are kept as
    /// JSON here so that an error in one can name it by its index.
    patterns: Vec<Value>,
}

struct RegexObserver {
    patterns: Patterns,
}

impl LineObserver for RegexObserver {
    fn new(args: &Value) -> Result<Self, Error> {
        let args: Args = guest_sdk::parse_args(args, "regex")?;
        let mut list = Vec::with_capacity(args.patterns.len());
        for (i, pattern) in args.patterns.iter().enumerate() {
            if !pattern.is_object() {
                return Err(Error::msg(format!(
                    "regex: patterns[{i}] must be a JSON object such as \
                     {{\"regex\": \"^error\", \"statistic\": \"errors\"}}, not {pattern}"
                )));
            }
            list.push(guest_sdk::parse_args::<PatternArgs>(
                pattern,
                &format!("regex: patterns[{i}]"),
            )?);
        }
        let patterns = Patterns::new(list).map_err(|e| Error::msg(format!("regex: {e}")))?;
        Ok(RegexObserver { patterns })
    }

    fn chunk(&mut self, channel: Channel, text: &str, _report: &Report) {
        let stream = match channel {
            Channel::Stdout => Stream::Stdout,
            Channel::Stderr => Stream::Stderr,
            Channel::Header => return,
        };
        for line in text.split_terminator('\n') {
            self.patterns.line(stream, line);
        }
    }

    fn finished(&mut self, report: &Report) -> Option<Outcome> {
        for (name, count) in self.patterns.statistics() {
            report.set_statistic(name, count as f64);
        }
        for (name, value) in self.patterns.properties() {
            // The host refuses only values over its size limit; the statistics and the verdict
            // still stand.
            report.set_property(name, value).ok();
        }
        self.patterns.verdict().map(|verdict| match verdict {
            Verdict::Warnings => Outcome::Warnings,
            Verdict::Failure => Outcome::Failure,
        })
    }
}

guest_sdk::observer!(RegexObserver);

#[cfg(test)]
mod tests {
    use super::*;

    fn new(args: &str) -> Result<RegexObserver, Error> {
        RegexObserver::new(&args.parse::<Value>().unwrap())
    }

    fn error(args: &str) -> String {
        new(args).err().unwrap().to_string()
    }

    #[test]
    fn lines_by_channel_and_not_headers() {
        let report = Report::default();
        let mut observer = new(r#"{"patterns": [
                {"regex": "^error", "statistic": "errors", "channel": "stderr"},
                {"regex": "^v(?<value>\\d+)", "property": "version", "outcome": "warnings"}
            ]}"#)
        .unwrap();
        observer.chunk(Channel::Stdout, "error on stdout\nv1\n", &report);
        observer.chunk(Channel::Stderr, "error: one\nv2\nerror: two\n", &report);
        observer.chunk(Channel::Header, "error in a header\nv3\n", &report);
        let p = &observer.patterns;
        assert_eq!(p.statistics().collect::<Vec<_>>(), [("errors", 2)]);
        assert_eq!(p.properties().collect::<Vec<_>>(), [("version", "2")]);
        assert_eq!(p.verdict(), Some(Verdict::Warnings));
    }

    #[test]
    fn bad_arguments_name_the_key() {
        assert_eq!(
            error("null"),
            "regex: no patterns: give at least one, as in \
             {\"patterns\": [{\"regex\": \"^error\", \"statistic\": \"errors\"}]}"
        );
        assert_eq!(
            error(r#"{"pattern": []}"#),
            "regex: argument `pattern`: unknown field `pattern`, expected `patterns`"
        );
        assert_eq!(
            error(r#"{"patterns": {"regex": "a"}}"#),
            "regex: argument `patterns`: invalid type: map, expected a sequence"
        );
        assert_eq!(
            error(r#"{"patterns": ["^error"]}"#),
            "regex: patterns[0] must be a JSON object such as \
             {\"regex\": \"^error\", \"statistic\": \"errors\"}, not \"^error\""
        );
        assert_eq!(
            error(r#"{"patterns": [{"regex": "a", "statistic": "a", "channel": "both"}]}"#),
            "regex: patterns[0]: argument `channel`: unknown variant `both`, \
             expected one of `stdout`, `stderr`, `any`"
        );
        assert_eq!(
            error(r#"{"patterns": [{"regex": "a", "outcome": "success"}]}"#),
            "regex: patterns[0]: argument `outcome`: unknown variant `success`, \
             expected `warnings` or `failure`"
        );
        assert_eq!(
            error(r#"{"patterns": [{"regex": "a", "statistic": "a", "stat": "b"}]}"#),
            "regex: patterns[0]: argument `stat`: unknown field `stat`, \
             expected one of `regex`, `statistic`, `property`, `channel`, `outcome`"
        );
        assert_eq!(
            error(r#"{"patterns": [{"regex": 1, "statistic": "a"}]}"#),
            "regex: patterns[0]: argument `regex`: invalid type: integer `1`, expected a string"
        );
        let bad = error(
            r#"{"patterns": [{"regex": "a", "statistic": "a"}, {"regex": "[", "outcome": "failure"}]}"#,
        );
        assert!(
            bad.starts_with("regex: patterns[1]: invalid regex \"[\": regex parse error:"),
            "{bad}"
        );
    }
}
