//! What every part of the resolution shares: the collector of problems and warnings, and the
//! checks of names, properties, globs and regular expressions.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use super::error::{Diagnostic, quote};
use super::globs::Globs;

/// Collects every problem and warning while the file is resolved, so that one run of
/// `kiln checkconfig` shows them all.
pub(crate) struct Ctx {
    /// The file, as named by the caller.
    pub file: String,
    /// The directory relative paths are resolved against (absolute).
    pub dir: PathBuf,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Ctx {
    pub(crate) fn new(file: String, dir: PathBuf) -> Self {
        Ctx {
            file,
            dir,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn diagnostic(&self, key: String, message: String) -> Diagnostic {
        Diagnostic {
            file: self.file.clone(),
            position: None,
            key,
            message,
        }
    }

    /// Records a problem at `key`.
    pub(crate) fn error(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let d = self.diagnostic(key.into(), message.into());
        if !self.errors.contains(&d) {
            self.errors.push(d);
        }
    }

    /// Records a warning at `key`: the configuration works, but probably not as meant.
    pub(crate) fn warn(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let d = self.diagnostic(key.into(), message.into());
        if !self.warnings.contains(&d) {
            self.warnings.push(d);
        }
    }

    /// Records the error of a check, if any, and passes its value on.
    pub(crate) fn check<T>(&mut self, key: impl Into<String>, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(key, message);
                None
            }
        }
    }

    /// The number of problems so far.
    pub(crate) fn error_count(&self) -> usize {
        self.errors.len()
    }

    /// The problems and the warnings.
    pub(crate) fn finish(self) -> (Vec<Diagnostic>, Vec<Diagnostic>) {
        (self.errors, self.warnings)
    }
}

/// Checks the name of a worker, builder, scheduler, change source or reporter: names appear
/// in URLs, file names and messages. The rule is the protocol's, which workers and clients
/// apply too.
pub use kiln_protocol::names::check_name;

/// "a" or "an" before a type name in a message ("an http reporter", "an any-branch
/// scheduler").
pub(crate) fn a(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) || word.starts_with("http") {
        "an"
    } else {
        "a"
    }
}

/// Names for a message: `a, b, c`, or `none`.
pub(crate) fn list<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> String {
    let all: Vec<String> = names.into_iter().map(|s| s.as_ref().to_owned()).collect();
    if all.is_empty() {
        "none".into()
    } else {
        all.join(", ")
    }
}

/// A TOML value as JSON: datetimes become their RFC 3339 text.
pub(crate) fn to_json(value: toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(f.to_string())),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(items.into_iter().map(to_json).collect()),
        toml::Value::Table(t) => Value::Object(table_to_json(t)),
    }
}

/// A TOML table as a JSON object.
pub(crate) fn table_to_json(table: toml::Table) -> serde_json::Map<String, Value> {
    table.into_iter().map(|(k, v)| (k, to_json(v))).collect()
}

/// Properties from a table, their names checked.
pub(crate) fn properties(ctx: &mut Ctx, key: &str, table: toml::Table) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (name, value) in table {
        if let Err(e) = kiln_protocol::props::check_property_name(&name) {
            ctx.error(format!("{key}.{}", quote(&name)), e);
        }
        out.insert(name, to_json(value));
    }
    out
}

/// Whether a name is written as a glob.
pub(crate) fn is_glob(text: &str) -> bool {
    text.contains(['*', '?', '[', '{'])
}

/// Resolves a list of builder names and globs against the defined builders, in order and
/// without repeats.
pub(crate) fn builder_refs(
    ctx: &mut Ctx,
    key: &str,
    entries: &[String],
    builders: &[&str],
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |name: &str| {
        if !out.iter().any(|n| n == name) {
            out.push(name.to_owned());
        }
    };
    for entry in entries {
        if is_glob(entry) {
            match Globs::new(std::slice::from_ref(entry), false) {
                Ok(g) => {
                    let matched: Vec<&&str> = builders.iter().filter(|b| g.is_match(b)).collect();
                    if matched.is_empty() {
                        ctx.error(
                            key,
                            format!(
                                "the glob {} matches no builder (defined: {})",
                                quote(entry),
                                list(builders)
                            ),
                        );
                    }
                    matched.into_iter().for_each(|b| push(b));
                }
                Err(e) => ctx.error(key, e),
            }
        } else if builders.contains(&entry.as_str()) {
            push(entry);
        } else {
            ctx.error(
                key,
                format!(
                    "names builder {}, which is not defined (defined: {})",
                    quote(entry),
                    list(builders)
                ),
            );
        }
    }
    out
}

/// Checks a regular expression with the engine that will run it (Rust's `regex`, which the
/// force scheduler uses), so what passes here compiles there.
pub(crate) fn check_regex(re: &str) -> Result<(), String> {
    regex::Regex::new(re).map(|_| ()).map_err(|e| {
        // The engine's message spans lines (the pattern, a caret, the error); keep the error.
        let text = e.to_string();
        let why = text
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("error: "))
            .unwrap_or(text.trim())
            .to_owned();
        format!("{re:?} is not a valid regular expression: {why}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("linux-x86_64.2").is_ok());
        assert!(check_name("büild").is_ok());
        assert_eq!(
            check_name("a b").unwrap_err(),
            "\"a b\" is not a valid name; use 1 to 100 letters, digits, '-', '_' and '.', not starting with '-' or '.'"
        );
        assert!(check_name("").is_err());
        assert!(check_name("..").is_err());
        assert!(check_name("a/b").is_err());
    }

    #[test]
    fn regexes() {
        for ok in [
            r"^v\d+\.\d+$",
            "[[:alpha:]]+",
            "(?i)abc",
            "(?P<x>a|b)*?",
            "a{2,}",
            "",
        ] {
            assert_eq!(check_regex(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("(a", "unclosed group"),
            ("[a", "unclosed character class"),
            ("*a", "repetition operator missing expression"),
            (
                "a{3,2}",
                "invalid repetition count range, the start must be <= the end",
            ),
        ] {
            assert_eq!(
                check_regex(bad),
                Err(format!("{bad:?} is not a valid regular expression: {why}")),
                "{bad}"
            );
        }
    }

    #[test]
    fn toml_to_json() {
        let v: toml::Table =
            toml::from_str("a = 1979-05-27T07:32:00Z\nb = [1, 2.5, true]").unwrap();
        assert_eq!(
            Value::Object(table_to_json(v)),
            serde_json::json!({"a": "1979-05-27T07:32:00Z", "b": [1, 2.5, true]})
        );
    }
}
