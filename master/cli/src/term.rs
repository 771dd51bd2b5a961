//! Terminal output, in one place: tables, results in colour, durations, times, sizes, and log
//! lines as `kiln step run` and `kiln force --wait` print them. Text from elsewhere (a master,
//! a step) is made printable first, so it cannot drive the terminal.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use runtime::{Channel, Outcome, StepEvents};
use serde_json::Value;

/// A table: left-aligned columns two spaces apart, the last one unpadded. `paint` gives the
/// colour codes of a cell (column, text), applied around the padded text.
pub(crate) fn table(
    headers: &[&str],
    rows: &[Vec<String>],
    paint: impl Fn(usize, &str) -> (&'static str, &'static str),
) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|t| printable(t)).collect())
        .collect();
    let rows = &rows;
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<(String, (&str, &str))>| {
        let mut out = String::new();
        let last = cells.len() - 1;
        for (i, (text, (start, end))) in cells.into_iter().enumerate() {
            let pad = if i == last {
                0
            } else {
                widths[i] - text.chars().count() + 2
            };
            out.push_str(start);
            out.push_str(&text);
            out.push_str(end);
            out.push_str(&" ".repeat(pad));
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.iter().map(|h| (h.to_string(), ("", ""))).collect());
    for r in rows {
        out += &line(
            r.iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), paint(i, t)))
                .collect(),
        );
    }
    out
}

/// Text from the master made safe for a terminal: control characters (an escape sequence in a
/// step's summary, a newline in a worker's note) are shown as escapes, not obeyed.
pub(crate) fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Prints log lines as they arrive: `[out]`, `[err]` and `[hdr]` tell the channels apart (and
/// colours, on a terminal); logs other than stdio carry their name.
pub(crate) struct Printer {
    /// Whether stdout is a terminal, so colours are used.
    pub(crate) color: bool,
}

impl Printer {
    /// A printer to stdout, in colour on a terminal.
    pub(crate) fn new() -> Self {
        Printer {
            color: std::io::stdout().is_terminal(),
        }
    }
}

impl StepEvents for Printer {
    fn log(&self, log: &str, channel: Channel, text: &str) {
        let tag = match channel {
            Channel::Stdout => "out",
            Channel::Stderr => "err",
            Channel::Header => "hdr",
        };
        let (start, end) = match (self.color, channel) {
            (true, Channel::Stderr) => ("\x1b[31m", "\x1b[0m"),
            (true, Channel::Header) => ("\x1b[36m", "\x1b[0m"),
            _ => ("", ""),
        };
        let prefix = if log == "stdio" {
            format!("[{tag}] ")
        } else {
            format!("[{log}:{tag}] ")
        };
        let mut buf = String::with_capacity(text.len() + 64);
        for line in text.split_terminator('\n') {
            buf.push_str(start);
            buf.push_str(&prefix);
            buf.push_str(line);
            buf.push_str(end);
            buf.push('\n');
        }
        // A closed stdout (a pipe into `head`) must not kill the step.
        let _ = std::io::stdout().lock().write_all(buf.as_bytes());
    }
}

/// The colour codes (start, reset) a result is printed in; empty when `color` is off.
pub(crate) fn paint(result: Outcome, color: bool) -> (&'static str, &'static str) {
    let start = match (color, result) {
        (false, _) => "",
        (true, Outcome::Success) => "\x1b[32m",
        (true, Outcome::Warnings) => "\x1b[33m",
        (true, _) => "\x1b[31m",
    };
    (start, if color { "\x1b[0m" } else { "" })
}

/// A result's name as an [`Outcome`].
pub(crate) fn outcome(results: &Value) -> Option<Outcome> {
    serde_json::from_value(results.clone()).ok()
}

/// The colours of a result's name, on a terminal.
pub(crate) fn result_paint(text: &str, color: bool) -> (&'static str, &'static str) {
    match outcome(&Value::String(text.to_owned())) {
        Some(Outcome::Skipped) | None => ("", ""),
        Some(o) => paint(o, color),
    }
}

/// "2024-05-01 12:03" in local time, from ms since the epoch.
pub(crate) fn local_time(ms: &Value) -> String {
    ms.as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M")
                .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

/// "12 s ago", "5 min ago", "3 h ago", "2 days ago".
pub(crate) fn ago(ms: &Value) -> String {
    let Some(ms) = ms.as_i64() else {
        return "-".into();
    };
    let s = (kiln_db::model::now_ms() - ms).max(0) / 1000;
    match s {
        s if s < 60 => format!("{s} s ago"),
        s if s < 3600 => format!("{} min ago", s / 60),
        s if s < 86_400 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}

/// How long from `start` to `end` (or to now, for what still runs), from ms since the epoch.
pub(crate) fn span(start: &Value, end: &Value) -> String {
    let Some(start) = start.as_i64() else {
        return "-".into();
    };
    let end = end.as_i64().unwrap_or_else(kiln_db::model::now_ms);
    runtime::human_duration(Duration::from_millis((end - start).max(0) as u64))
}

/// A build's or step's `state_string`, unless it only repeats the result.
pub(crate) fn summary(item: &Value) -> String {
    let state = text(&item["state_string"]);
    if state == text(&item["results"]) {
        String::new()
    } else {
        state
    }
}

pub(crate) use kiln_client::text;

/// "512 KiB", "130.0 MiB", "2.1 GiB".
pub(crate) fn human_bytes(n: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    match n {
        n if n < MIB => format!("{} KiB", n.div_ceil(KIB)),
        n if n < GIB => format!("{:.1} MiB", n as f64 / MIB as f64),
        n => format!("{:.1} GiB", n as f64 / GIB as f64),
    }
}

/// The exit status for a result: 0 for SUCCESS and WARNINGS, 1 for FAILURE, 3 for the rest
/// (2 is bad input).
pub(crate) fn exit_code(result: Outcome) -> ExitCode {
    ExitCode::from(match result {
        Outcome::Success | Outcome::Warnings => 0,
        Outcome::Failure => 1,
        _ => 3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_show_control_characters_rather_than_obey_them() {
        let rows = vec![vec![
            "\u{1b}]0;owned\u{7}\u{1b}[2Jgone".to_owned(),
            "two\nlines".to_owned(),
        ]];
        let out = table(&["STATE", "NOTE"], &rows, |_, _| ("", ""));
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
        assert!(out.contains("\\u{1b}]0;owned"), "{out}");
        assert_eq!(out.lines().count(), 2, "{out}");
        assert_eq!(printable("plain · text"), "plain · text");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONGER"],
            &[vec!["xyz".into(), "1".into()], vec!["é".into(), "".into()]],
            |_, _| ("", ""),
        );
        assert_eq!(t, "A    LONGER\nxyz  1\né\n");
    }
}
