//! The regex observer's patterns: their arguments, compiled into one `RegexSet` per channel so
//! each line is tested once, and what they have matched so far. Pure: no SDK, so it is tested
//! on the host.

use regex::{Regex, RegexSet};
use serde::Deserialize;

/// Which lines a pattern looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelFilter {
    /// Standard output only.
    Stdout,
    /// Standard error only.
    Stderr,
    /// Both (the default).
    #[default]
    Any,
}

/// The verdict a pattern gives the step when it matches; the worst of all patterns wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// WARNINGS.
    Warnings,
    /// FAILURE.
    Failure,
}

/// One pattern of the observer's arguments (JSON). Each needs `regex` and at least one of
/// `statistic`, `property` and `outcome`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PatternArgs {
    /// The regular expression (Rust `regex` syntax), matched against each line without its
    /// line ending ("\n" or "\r\n"). Required.
    pub regex: Option<String>,
    /// Counts the matching lines in this statistic, set at the end (also when 0). Patterns
    /// naming the same statistic add up.
    pub statistic: Option<String>,
    /// Sets this property, at the end, to a string from the last matching line: the capture
    /// group named `value` if the regex has one, else group 1 if it has groups, else the whole
    /// match. Not set if the pattern never matched.
    pub property: Option<String>,
    /// Which lines to look at: "stdout", "stderr" or "any" (the default).
    pub channel: ChannelFilter,
    /// "warnings" or "failure": the step's verdict if the pattern matched at least once.
    pub outcome: Option<Verdict>,
}

/// The channel a line came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout = 0,
    /// Standard error.
    Stderr = 1,
}

/// Which capture group a property takes its value from.
#[derive(Debug, Clone, Copy)]
enum Group {
    /// The group named `value`, by its index.
    Value(usize),
    /// Group 1.
    First,
    /// The whole match.
    Whole,
}

/// A pattern ready to use: indexes into [`Patterns`]' statistics and properties.
#[derive(Debug)]
struct Compiled {
    statistic: Option<usize>,
    /// The property, with the regex to capture its value (the set says only whether a line
    /// matched).
    property: Option<(usize, Regex, Group)>,
    outcome: Option<Verdict>,
}

/// The patterns and what they have matched so far.
#[derive(Debug)]
pub struct Patterns {
    /// Per [`Stream`]: the set of the patterns that look at it, and their indexes in `patterns`.
    sets: [(RegexSet, Vec<usize>); 2],
    patterns: Vec<Compiled>,
    /// Statistics by name, with the number of matching lines.
    statistics: Vec<(String, u64)>,
    /// Properties by name, with the value from the last matching line.
    properties: Vec<(String, Option<String>)>,
    verdict: Option<Verdict>,
}

impl Patterns {
    /// Compiles the patterns. Errors name the pattern by its index in `patterns`.
    pub fn new(args: Vec<PatternArgs>) -> Result<Self, String> {
        if args.is_empty() {
            return Err("no patterns: give at least one, as in \
                        {\"patterns\": [{\"regex\": \"^error\", \"statistic\": \"errors\"}]}"
                .to_owned());
        }
        let mut patterns = Vec::with_capacity(args.len());
        let mut statistics: Vec<(String, u64)> = Vec::new();
        let mut properties: Vec<(String, Option<String>)> = Vec::new();
        let mut sources: [(Vec<&str>, Vec<usize>); 2] = Default::default();
        for (i, pattern) in args.iter().enumerate() {
            let Some(source) = pattern.regex.as_deref() else {
                return Err(format!("patterns[{i}]: `regex` is required"));
            };
            if pattern.statistic.is_none()
                && pattern.property.is_none()
                && pattern.outcome.is_none()
            {
                return Err(format!(
                    "patterns[{i}] ({source:?}) does nothing: give at least one of `statistic`, \
                     `property` and `outcome`"
                ));
            }
            for (key, name) in [
                ("statistic", &pattern.statistic),
                ("property", &pattern.property),
            ] {
                if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                    return Err(format!("patterns[{i}]: `{key}` must not be empty"));
                }
            }
            let regex = Regex::new(source)
                .map_err(|e| format!("patterns[{i}]: invalid regex {source:?}: {e}"))?;
            let statistic = pattern
                .statistic
                .as_ref()
                .map(|name| index_of(&mut statistics, name, 0));
            let property = pattern.property.as_ref().map(|name| {
                let group = match regex.capture_names().position(|n| n == Some("value")) {
                    Some(index) => Group::Value(index),
                    None if regex.captures_len() > 1 => Group::First,
                    None => Group::Whole,
                };
                (index_of(&mut properties, name, None), regex, group)
            });
            patterns.push(Compiled {
                statistic,
                property,
                outcome: pattern.outcome,
            });
            for stream in [Stream::Stdout, Stream::Stderr] {
                let wanted = match pattern.channel {
                    ChannelFilter::Any => true,
                    ChannelFilter::Stdout => stream == Stream::Stdout,
                    ChannelFilter::Stderr => stream == Stream::Stderr,
                };
                if wanted {
                    sources[stream as usize].0.push(source);
                    sources[stream as usize].1.push(i);
                }
            }
        }
        let [out, err] = sources.map(|(sources, indexes)| {
            RegexSet::new(sources)
                .map(|set| (set, indexes))
                .map_err(|e| format!("the patterns are too large together: {e}"))
        });
        Ok(Patterns {
            sets: [out?, err?],
            patterns,
            statistics,
            properties,
            verdict: None,
        })
    }

    /// Takes one line (without its "\n") of `stream`.
    pub fn line(&mut self, stream: Stream, line: &str) {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let (set, indexes) = &self.sets[stream as usize];
        // Most lines match nothing, and `is_match` is the cheapest way to find that out.
        if !set.is_match(line) {
            return;
        }
        for matched in set.matches(line).iter() {
            let pattern = &self.patterns[indexes[matched]];
            if let Some(s) = pattern.statistic {
                self.statistics[s].1 += 1;
            }
            if let Some((p, regex, group)) = &pattern.property
                && let Some(captures) = regex.captures(line)
            {
                let value = match *group {
                    Group::Value(i) => captures.get(i),
                    Group::First => captures.get(1),
                    Group::Whole => captures.get(0),
                };
                // A group that took no part in the match gives an empty value.
                let value = value.map_or("", |m| m.as_str());
                let slot = self.properties[*p].1.get_or_insert_with(String::new);
                slot.clear();
                slot.push_str(value);
            }
            self.verdict = self.verdict.max(pattern.outcome);
        }
    }

    /// Each statistic with its count of matching lines, in the order first named.
    pub fn statistics(&self) -> impl Iterator<Item = (&str, u64)> {
        self.statistics.iter().map(|(name, n)| (name.as_str(), *n))
    }

    /// Each property that matched, with its value from the last matching line.
    pub fn properties(&self) -> impl Iterator<Item = (&str, &str)> {
        self.properties
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.as_deref()?)))
    }

    /// The worst verdict of the patterns that matched.
    pub fn verdict(&self) -> Option<Verdict> {
        self.verdict
    }
}

/// The index of `name` in `list`, adding it with `initial` if it is not there yet.
fn index_of<T>(list: &mut Vec<(String, T)>, name: &str, initial: T) -> usize {
    match list.iter().position(|(n, _)| n == name) {
        Some(i) => i,
        None => {
            list.push((name.to_owned(), initial));
            list.len() - 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(regex: &str) -> PatternArgs {
        PatternArgs {
            regex: Some(regex.to_owned()),
            ..PatternArgs::default()
        }
    }

    fn statistic(regex: &str, name: &str) -> PatternArgs {
        PatternArgs {
            statistic: Some(name.to_owned()),
            ..pattern(regex)
        }
    }

    fn property(regex: &str, name: &str) -> PatternArgs {
        PatternArgs {
            property: Some(name.to_owned()),
            ..pattern(regex)
        }
    }

    fn outcome(regex: &str, verdict: Verdict) -> PatternArgs {
        PatternArgs {
            outcome: Some(verdict),
            ..pattern(regex)
        }
    }

    fn feed(patterns: &mut Patterns, stream: Stream, text: &str) {
        for line in text.split_terminator('\n') {
            patterns.line(stream, line);
        }
    }

    fn statistics(patterns: &Patterns) -> Vec<(&str, u64)> {
        patterns.statistics().collect()
    }

    fn properties(patterns: &Patterns) -> Vec<(&str, &str)> {
        patterns.properties().collect()
    }

    const LOG: &str = "\
compiling 3 files
error: disk full
warning: slow disk
error: disk still full
version 1.2.3 (build 40)
version 1.2.4 (build 41)
done in 12.5s
";

    #[test]
    fn statistics_count_matching_lines_also_none() {
        let mut p = Patterns::new(vec![
            statistic("^error:", "errors"),
            statistic("^warning:", "warnings"),
            statistic("^fatal:", "fatals"),
            statistic("disk", "disk"),
        ])
        .unwrap();
        feed(&mut p, Stream::Stdout, LOG);
        assert_eq!(
            statistics(&p),
            [("errors", 2), ("warnings", 1), ("fatals", 0), ("disk", 3)]
        );
        assert_eq!(p.verdict(), None);
        assert_eq!(properties(&p), []);
    }

    #[test]
    fn patterns_naming_one_statistic_add_up() {
        let mut p = Patterns::new(vec![
            statistic("^error:", "problems"),
            statistic("^warning:", "problems"),
        ])
        .unwrap();
        feed(&mut p, Stream::Stdout, LOG);
        assert_eq!(statistics(&p), [("problems", 3)]);
    }

    #[test]
    fn properties_from_the_last_matching_line() {
        let mut p = Patterns::new(vec![
            // Named group `value` wins over group 1.
            property(r"^version (\d+)\.(?<value>[\d.]+)", "minor"),
            // Else group 1.
            property(r"\(build (\d+)\)", "build"),
            // Else the whole match.
            property(r"\d+\.\d+s", "time"),
            // An optional group that took no part: empty.
            property(r"^done( at \d+)?", "done_at"),
            property(r"^never", "never"),
        ])
        .unwrap();
        feed(&mut p, Stream::Stderr, LOG);
        assert_eq!(
            properties(&p),
            [
                ("minor", "2.4"),
                ("build", "41"),
                ("time", "12.5s"),
                ("done_at", "")
            ]
        );
        assert_eq!(statistics(&p), []);
    }

    #[test]
    fn outcome_is_the_worst_matched() {
        let mut p = Patterns::new(vec![
            outcome("^warning:", Verdict::Warnings),
            outcome("^error:", Verdict::Failure),
            outcome("^panic", Verdict::Failure),
        ])
        .unwrap();
        feed(&mut p, Stream::Stdout, "warning: a\n");
        assert_eq!(p.verdict(), Some(Verdict::Warnings));
        feed(&mut p, Stream::Stdout, "error: b\nwarning: c\n");
        assert_eq!(p.verdict(), Some(Verdict::Failure));
    }

    #[test]
    fn channels() {
        let mut p = Patterns::new(vec![
            PatternArgs {
                channel: ChannelFilter::Stdout,
                ..statistic("x", "out")
            },
            PatternArgs {
                channel: ChannelFilter::Stderr,
                ..statistic("x", "err")
            },
            statistic("x", "any"),
        ])
        .unwrap();
        feed(&mut p, Stream::Stdout, "x\nx\n");
        feed(&mut p, Stream::Stderr, "x\n");
        assert_eq!(statistics(&p), [("out", 2), ("err", 1), ("any", 3)]);
    }

    #[test]
    fn one_pattern_with_everything() {
        let mut p = Patterns::new(vec![PatternArgs {
            statistic: Some("coverage_lines".to_owned()),
            property: Some("coverage".to_owned()),
            outcome: Some(Verdict::Warnings),
            ..pattern(r"^coverage: (\d+)%$")
        }])
        .unwrap();
        // Windows line endings do not defeat `$`.
        feed(&mut p, Stream::Stdout, "coverage: 80%\r\ncoverage: 85%\r\n");
        assert_eq!(statistics(&p), [("coverage_lines", 2)]);
        assert_eq!(properties(&p), [("coverage", "85")]);
        assert_eq!(p.verdict(), Some(Verdict::Warnings));
    }

    #[test]
    fn errors_name_the_pattern() {
        let error = |args: Vec<PatternArgs>| Patterns::new(args).unwrap_err();
        assert!(error(vec![]).starts_with("no patterns: give at least one"));
        assert_eq!(
            error(vec![statistic("a", "a"), PatternArgs::default()]),
            "patterns[1]: `regex` is required"
        );
        assert_eq!(
            error(vec![pattern("^a")]),
            "patterns[0] (\"^a\") does nothing: give at least one of `statistic`, `property` \
             and `outcome`"
        );
        assert_eq!(
            error(vec![statistic("a", " ")]),
            "patterns[0]: `statistic` must not be empty"
        );
        let bad = error(vec![statistic("a", "a"), statistic("b(", "b")]);
        assert!(
            bad.starts_with("patterns[1]: invalid regex \"b(\": regex parse error:"),
            "{bad}"
        );
        assert!(bad.contains("unclosed group"), "{bad}");
    }
}
