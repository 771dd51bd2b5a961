//! Secret redaction: every secret value of a grant is replaced by `<secret:NAME>` in anything
//! that leaves the runtime (logs, summaries, properties, URLs).

use std::borrow::Cow;

use memchr::memmem;

/// Replaces secret values in text.
#[derive(Debug, Default, Clone)]
pub struct Redactor {
    /// (finder for the value, replacement), longest values first so that a secret containing
    /// another is replaced whole.
    patterns: Vec<(memmem::Finder<'static>, String)>,
    longest: usize,
}

impl Redactor {
    /// A redactor for these (name, value) secrets. A value spanning several lines is redacted
    /// line by line, since logs are handled a line at a time.
    pub fn new<'a>(secrets: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut pieces: Vec<(String, String)> = Vec::new();
        for (name, value) in secrets {
            for piece in value.split(['\n', '\r']) {
                if !piece.is_empty() {
                    pieces.push((piece.to_owned(), format!("<secret:{name}>")));
                }
            }
        }
        pieces.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        pieces.dedup_by(|a, b| a.0 == b.0);
        let longest = pieces.first().map_or(0, |p| p.0.len());
        let patterns = pieces
            .into_iter()
            .map(|(value, marker)| (memmem::Finder::new(value.as_bytes()).into_owned(), marker))
            .collect();
        Redactor { patterns, longest }
    }

    /// True if there is nothing to redact.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The length in bytes of the longest secret line.
    pub fn longest(&self) -> usize {
        self.longest
    }

    /// The text with every secret replaced.
    pub fn redact<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let mut out: Cow<'t, str> = Cow::Borrowed(text);
        for (finder, marker) in &self.patterns {
            if finder.find(out.as_bytes()).is_none() {
                continue;
            }
            let needle = finder.needle().len();
            let source = out.as_bytes();
            let mut replaced = String::with_capacity(source.len());
            let mut last = 0;
            for at in finder.find_iter(source) {
                replaced.push_str(&out[last..at]);
                replaced.push_str(marker);
                last = at + needle;
            }
            replaced.push_str(&out[last..]);
            out = Cow::Owned(replaced);
        }
        out
    }

    /// Redacts every string inside a JSON value.
    pub fn redact_json(&self, value: &mut serde_json::Value) {
        if self.is_empty() {
            return;
        }
        match value {
            serde_json::Value::String(s) => {
                if let Cow::Owned(r) = self.redact(s) {
                    *s = r;
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| self.redact_json(v)),
            serde_json::Value::Object(map) => map.values_mut().for_each(|v| self.redact_json(v)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_every_occurrence_longest_first() {
        let r = Redactor::new([("short", "abc"), ("long", "abcdef")]);
        assert_eq!(
            r.redact("x abcdef y abc z"),
            "x <secret:long> y <secret:short> z"
        );
        assert_eq!(r.redact("nothing here"), "nothing here");
        assert!(matches!(r.redact("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn multi_line_secrets_are_redacted_per_line() {
        let r = Redactor::new([("key", "line-one\nline-two")]);
        assert_eq!(
            r.redact("line-one\nline-two\n"),
            "<secret:key>\n<secret:key>\n"
        );
        assert_eq!(r.longest(), 8);
    }

    #[test]
    fn json_strings_are_redacted() {
        let r = Redactor::new([("t", "hunter2")]);
        let mut v = serde_json::json!({"a": ["hunter2", 3], "b": "my hunter2!"});
        r.redact_json(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"a": ["<secret:t>", 3], "b": "my <secret:t>!"})
        );
    }
}
