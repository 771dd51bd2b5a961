//! Logs: turns the bytes a step writes (itself, or through its commands) into complete lines,
//! split at the grant's maximum line length, decoded as UTF-8 with replacement characters,
//! redacted of secrets and capped in size; then hands them to the [`StepEvents`] sink (capped)
//! and to the step's observers (everything).
//!
//! Lines travel as chunks: runs of complete lines of one channel, each ending in "\n", so that
//! the cost of a line stays close to the cost of copying it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_protocol::LogStats;
pub use kiln_protocol::logs::{Channel, LogLimits, ReportEvent};

use crate::redact::Redactor;

/// The index of a channel's pending line.
fn channel_index(channel: Channel) -> usize {
    match channel {
        Channel::Stdout => 0,
        Channel::Stderr => 1,
        Channel::Header => 2,
    }
}

/// Receives what a step run produces, as it happens. The worker forwards these to the master;
/// `kiln step run` prints them. Implementations must be cheap: they are called on the step's
/// thread.
pub trait StepEvents: Send + Sync {
    /// Complete lines (each ending in "\n") appended to a log, already redacted and capped.
    fn log(&self, log: &str, channel: Channel, text: &str) {
        let _ = (log, channel, text);
    }

    /// A report from the step or an observer.
    fn report(&self, event: &ReportEvent) {
        let _ = event;
    }
}

/// A sink that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

impl StepEvents for NoEvents {}

#[derive(Debug, Default)]
struct LogState {
    /// Unfinished line per channel.
    pending: [Vec<u8>; 3],
    stats: LogStats,
    truncated: bool,
    /// Dropped bytes already reported by a marker line, so `finish` can run more than once.
    noted_dropped: u64,
}

/// The logs of one step run.
pub struct Logs {
    limits: LogLimits,
    redactor: Arc<Redactor>,
    events: Arc<dyn StepEvents>,
    logs: BTreeMap<String, LogState>,
}

/// Where observers get their lines: (log, channel, complete lines).
pub type Feed<'a> = &'a mut dyn FnMut(&str, Channel, &str);

impl Logs {
    /// Logs with these limits, redacting with `redactor`, reporting to `events`.
    pub fn new(limits: LogLimits, redactor: Arc<Redactor>, events: Arc<dyn StepEvents>) -> Self {
        assert!(
            limits.max_line_bytes >= 16,
            "a line limit under 16 bytes cannot hold a character"
        );
        Logs {
            limits,
            redactor,
            events,
            logs: BTreeMap::new(),
        }
    }

    /// The redactor in use.
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// The live event sink.
    pub fn events(&self) -> &Arc<dyn StepEvents> {
        &self.events
    }

    /// True if the log exists or another one may still be created.
    pub fn can_open(&self, log: &str) -> bool {
        self.logs.contains_key(log) || self.logs.len() < self.limits.max_logs
    }

    /// Appends bytes to a log's channel. Complete lines go out at once; an unfinished line waits
    /// for its end (or is split once it outgrows the line limit).
    pub fn write(&mut self, log: &str, channel: Channel, bytes: &[u8], feed: Feed<'_>) {
        if !self.logs.contains_key(log) {
            self.logs.insert(log.to_owned(), LogState::default());
        }
        let state = self.logs.get_mut(log).expect("inserted above");
        let pending = &mut state.pending[channel_index(channel)];
        let owned;
        let data: &[u8] = if pending.is_empty() {
            bytes
        } else {
            pending.extend_from_slice(bytes);
            owned = std::mem::take(pending);
            &owned
        };
        let split = memchr::memrchr(b'\n', data).map_or(0, |i| i + 1);
        let (complete, tail) = data.split_at(split);
        if !complete.is_empty() {
            let text = lines_to_text(complete, self.limits.max_line_bytes);
            self.emit(log, channel, &text, feed);
        }
        let state = self.logs.get_mut(log).expect("inserted above");
        let pending = &mut state.pending[channel_index(channel)];
        pending.clear();
        pending.extend_from_slice(tail);
        // An unfinished line may not grow without bound: split it, keeping back enough bytes that
        // a secret straddling the cut is still seen whole.
        let holdback = self.redactor.longest();
        while self.logs[log].pending[channel_index(channel)].len()
            >= self.limits.max_line_bytes + holdback
        {
            let state = self.logs.get_mut(log).expect("exists");
            let pending = std::mem::take(&mut state.pending[channel_index(channel)]);
            let valid = complete_utf8_len(&pending);
            let decoded = String::from_utf8_lossy(&pending[..valid]);
            let redacted = self.redactor.redact(&decoded);
            let cut = floor_char_boundary(&redacted, self.limits.max_line_bytes);
            let mut piece = String::with_capacity(cut + 1);
            piece.push_str(&redacted[..cut]);
            piece.push('\n');
            let mut rest = redacted.as_bytes()[cut..].to_vec();
            rest.extend_from_slice(&pending[valid..]);
            self.logs.get_mut(log).expect("exists").pending[channel_index(channel)] = rest;
            self.emit_redacted(log, channel, &piece, feed);
        }
    }

    /// Ends every unfinished line and writes the marker of dropped output. Call after the step
    /// and its commands are done; calling it again only adds what came since.
    pub fn finish(&mut self, feed: Feed<'_>) {
        let names: Vec<String> = self.logs.keys().cloned().collect();
        for name in names {
            for channel in [Channel::Stdout, Channel::Stderr, Channel::Header] {
                let state = self.logs.get_mut(&name).expect("listed");
                let mut pending = std::mem::take(&mut state.pending[channel_index(channel)]);
                if !pending.is_empty() {
                    pending.push(b'\n');
                    let text = lines_to_text(&pending, self.limits.max_line_bytes);
                    self.emit(&name, channel, &text, feed);
                }
            }
            let state = self.logs.get_mut(&name).expect("listed");
            if state.stats.dropped_bytes > state.noted_dropped {
                state.noted_dropped = state.stats.dropped_bytes;
                let note = format!(
                    "kiln: {} bytes of output were dropped past the {}-byte cap of log {name:?}\n",
                    state.stats.dropped_bytes, self.limits.max_log_bytes
                );
                self.events.log(&name, Channel::Header, &note);
            }
        }
    }

    /// Per-log statistics.
    pub fn stats(&self) -> BTreeMap<String, LogStats> {
        self.logs
            .iter()
            .map(|(k, v)| (k.clone(), v.stats.clone()))
            .collect()
    }

    fn emit(&mut self, log: &str, channel: Channel, text: &str, feed: Feed<'_>) {
        let redacted = self.redactor.redact(text);
        self.emit_redacted(log, channel, &redacted, feed);
    }

    fn emit_redacted(&mut self, log: &str, channel: Channel, text: &str, feed: Feed<'_>) {
        feed(log, channel, text);
        let cap = self.limits.max_log_bytes;
        let state = self.logs.get_mut(log).expect("emit only for known logs");
        if state.truncated {
            state.stats.dropped_bytes += text.len() as u64;
            return;
        }
        let room = cap.saturating_sub(state.stats.bytes);
        let keep = if text.len() as u64 <= room {
            text.len()
        } else {
            // Keep whole lines only.
            memchr::memrchr(b'\n', &text.as_bytes()[..room as usize]).map_or(0, |i| i + 1)
        };
        if keep > 0 {
            let kept = &text[..keep];
            state.stats.bytes += keep as u64;
            state.stats.lines += memchr::memchr_iter(b'\n', kept.as_bytes()).count() as u64;
            self.events.log(log, channel, kept);
        }
        if keep < text.len() {
            state.truncated = true;
            state.stats.dropped_bytes += (text.len() - keep) as u64;
            let marker = format!(
                "kiln: log {log:?} reached its cap of {cap} bytes; further output is dropped\n"
            );
            self.events.log(log, Channel::Header, &marker);
        }
    }
}

/// Turns bytes made of complete lines (each ending in "\n") into text: CRLF becomes LF,
/// invalid UTF-8 becomes U+FFFD, and lines longer than `max_line` are split.
fn lines_to_text(bytes: &[u8], max_line: usize) -> Cow<'_, str> {
    let short = bytes.len() <= max_line + 1;
    if let Ok(text) = std::str::from_utf8(bytes)
        && memchr::memmem::find(bytes, b"\r\n").is_none()
        && (short || text.split_terminator('\n').all(|l| l.len() <= max_line))
    {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(bytes.len() + 16);
    for raw in bytes.split_inclusive(|&b| b == b'\n') {
        let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let mut line = &*String::from_utf8_lossy(raw);
        while line.len() > max_line {
            let cut = floor_char_boundary(line, max_line);
            out.push_str(&line[..cut]);
            out.push('\n');
            line = &line[cut..];
        }
        out.push_str(line);
        out.push('\n');
    }
    Cow::Owned(out)
}

/// The length of the longest prefix of `bytes` that does not end inside a UTF-8 sequence (an
/// unfinished character at the end may be completed by the next read).
fn complete_utf8_len(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => {
            // Invalid bytes somewhere; only an unfinished sequence in the last 3 bytes matters.
            let start = bytes.len().saturating_sub(3);
            (start..bytes.len())
                .find(|&i| {
                    let b = bytes[i];
                    let need = if b >= 0xF0 {
                        4
                    } else if b >= 0xE0 {
                        3
                    } else if b >= 0xC0 {
                        2
                    } else {
                        0
                    };
                    need > 0 && i + need > bytes.len()
                })
                .unwrap_or(bytes.len())
        }
    }
}

/// The largest char boundary of `s` at or below `at`, but at least one character in.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    if at >= s.len() {
        return s.len();
    }
    let mut i = at;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    if i == 0 {
        s.chars().next().map_or(0, char::len_utf8)
    } else {
        i
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, Channel, String)>>);

    impl StepEvents for Recorder {
        fn log(&self, log: &str, channel: Channel, text: &str) {
            self.0
                .lock()
                .unwrap()
                .push((log.to_owned(), channel, text.to_owned()));
        }
    }

    fn logs(limits: LogLimits, secrets: &[(&str, &str)]) -> (Logs, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let logs = Logs::new(
            limits,
            Arc::new(Redactor::new(secrets.iter().copied())),
            rec.clone(),
        );
        (logs, rec)
    }

    fn text_of(rec: &Recorder) -> String {
        rec.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, t)| t.as_str())
            .collect()
    }

    #[test]
    fn partial_lines_wait_for_their_end() {
        let (mut l, rec) = logs(LogLimits::default(), &[]);
        let mut fed = String::new();
        l.write("stdio", Channel::Stdout, b"one\ntw", &mut |_, _, t| {
            fed.push_str(t)
        });
        l.write("stdio", Channel::Stdout, b"o\r\nthree", &mut |_, _, t| {
            fed.push_str(t)
        });
        assert_eq!(text_of(&rec), "one\ntwo\n");
        l.finish(&mut |_, _, t| fed.push_str(t));
        assert_eq!(text_of(&rec), "one\ntwo\nthree\n");
        assert_eq!(fed, "one\ntwo\nthree\n");
        assert_eq!(l.stats()["stdio"].lines, 3);
    }

    #[test]
    fn invalid_utf8_becomes_replacement_characters_and_split_chars_survive() {
        let (mut l, rec) = logs(LogLimits::default(), &[]);
        l.write("stdio", Channel::Stdout, b"a\xffb\n\xc3", &mut |_, _, _| {});
        l.write("stdio", Channel::Stdout, b"\xa9\n", &mut |_, _, _| {});
        assert_eq!(text_of(&rec), "a\u{fffd}b\n\u{e9}\n");
    }

    #[test]
    fn long_lines_are_split_at_char_boundaries() {
        let limits = LogLimits {
            max_line_bytes: 16,
            ..LogLimits::default()
        };
        let (mut l, rec) = logs(limits, &[]);
        let line = "é".repeat(20) + "\n"; // 40 bytes of two-byte characters
        l.write("stdio", Channel::Stdout, line.as_bytes(), &mut |_, _, _| {});
        assert_eq!(
            text_of(&rec),
            format!("{0}\n{0}\n{1}\n", "é".repeat(8), "é".repeat(4))
        );
        // An unfinished line is split as soon as it outgrows the limit.
        let (mut l, rec) = logs(limits, &[]);
        l.write("stdio", Channel::Stdout, &[b'x'; 40], &mut |_, _, _| {});
        assert_eq!(text_of(&rec), format!("{0}\n{0}\n", "x".repeat(16)));
    }

    #[test]
    fn secrets_split_across_writes_and_long_line_cuts_are_redacted() {
        let limits = LogLimits {
            max_line_bytes: 16,
            ..LogLimits::default()
        };
        let (mut l, rec) = logs(limits, &[("tok", "SECRETVALUE")]);
        l.write("stdio", Channel::Stdout, b"key=SECRE", &mut |_, _, _| {});
        l.write("stdio", Channel::Stdout, b"TVALUE ok\n", &mut |_, _, _| {});
        // A secret straddling the 16-byte cut of a long unfinished line.
        l.write(
            "stdio",
            Channel::Stdout,
            b"0123456789abSECRETVALUE",
            &mut |_, _, _| {},
        );
        l.write(
            "stdio",
            Channel::Stdout,
            b"0123456789abcdef",
            &mut |_, _, _| {},
        );
        l.finish(&mut |_, _, _| {});
        let all = text_of(&rec);
        assert!(!all.contains("SECRET"), "{all}");
        assert_eq!(
            all,
            "key=<secret:tok> \nok\n0123456789ab<sec\nret:tok>01234567\n89abcdef\n"
        );
    }

    #[test]
    fn output_past_the_cap_is_dropped_with_a_marker() {
        let limits = LogLimits {
            max_log_bytes: 10,
            ..LogLimits::default()
        };
        let (mut l, rec) = logs(limits, &[]);
        let mut fed = 0;
        l.write(
            "stdio",
            Channel::Stdout,
            b"1234\n5678\nabcd\n",
            &mut |_, _, t| fed += t.len(),
        );
        l.write("stdio", Channel::Stdout, b"more\n", &mut |_, _, t| {
            fed += t.len()
        });
        l.finish(&mut |_, _, _| {});
        assert_eq!(fed, 20, "observers see everything");
        let all = text_of(&rec);
        assert_eq!(
            all,
            "1234\n5678\nkiln: log \"stdio\" reached its cap of 10 bytes; further output is dropped\n\
             kiln: 10 bytes of output were dropped past the 10-byte cap of log \"stdio\"\n"
        );
        assert_eq!(
            l.stats()["stdio"],
            LogStats {
                lines: 2,
                bytes: 10,
                dropped_bytes: 10
            }
        );
    }
}
