//! Configuration errors and warnings. Each names the file, the key (`builders."linux".workers`)
//! and what to do; TOML syntax errors and unknown keys also give the line and column.

use std::fmt;
use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// One problem (or warning) in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as it was named to [`super::load`] or [`super::parse`].
    pub file: String,
    /// Line and column (from 1), when known: for TOML syntax errors and unknown keys.
    pub position: Option<(usize, usize)>,
    /// The key path, as `builders."linux".steps[0].module`; empty for the file as a whole.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        f.write_str(": ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a configuration was refused: every problem found, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    problems: Vec<Diagnostic>,
}

impl ConfigError {
    /// An error of these problems (at least one).
    pub(crate) fn new(problems: Vec<Diagnostic>) -> Self {
        debug_assert!(!problems.is_empty());
        ConfigError { problems }
    }

    /// The file could not be read.
    pub(crate) fn unreadable(file: String, error: &std::io::Error) -> Self {
        ConfigError::new(vec![Diagnostic {
            message: format!("cannot read the configuration: {error}"),
            file,
            position: None,
            key: String::new(),
        }])
    }

    /// A TOML syntax error, or a value serde refused (unknown key, wrong type), with its
    /// position and key path.
    pub(crate) fn from_toml(file: String, text: &str, error: &toml::de::Error) -> Self {
        let span = error.span();
        let position = span.as_ref().map(|s| line_column(text, s.start));
        let key = span.map(|s| key_at(text, s)).unwrap_or_default();
        let message = error.message().trim().replace('\n', "; ");
        ConfigError::new(vec![Diagnostic {
            file,
            position,
            key,
            message,
        }])
    }

    /// Every problem, in the order they were found.
    pub fn problems(&self) -> &[Diagnostic] {
        &self.problems
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Line and column (from 1, the column in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Top-level arrays whose entries are named in key paths by their `name`, not their index.
const NAMED_ARRAYS: &[&str] = &[
    "workers",
    "builders",
    "schedulers",
    "change_sources",
    "reporters",
];

/// The key path of the innermost key or value at `span` (empty if the file does not parse).
fn key_at(text: &str, span: Range<usize>) -> String {
    let Ok(root) = DeTable::parse(text) else {
        return String::new();
    };
    let mut path = Vec::new();
    find_in_table(root.get_ref(), span.start, &mut path, true);
    path.concat()
}

fn find_in_table(table: &DeTable<'_>, at: usize, path: &mut Vec<String>, top: bool) -> bool {
    for (key, value) in table.iter() {
        let name = key.get_ref();
        path.push(if path.is_empty() {
            key_segment(name)
        } else {
            format!(".{}", key_segment(name))
        });
        if key.span().contains(&at) {
            return true;
        }
        let named = top && NAMED_ARRAYS.contains(&name.as_ref());
        if find_in_value(value.get_ref(), at, path, named) || value.span().contains(&at) {
            return true;
        }
        path.pop();
    }
    false
}

fn find_in_value(value: &DeValue<'_>, at: usize, path: &mut Vec<String>, named: bool) -> bool {
    match value {
        DeValue::Table(t) => find_in_table(t, at, path, false),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let label = match item.get_ref() {
                    DeValue::Table(t) if named => t
                        .get("name")
                        .and_then(|n| n.get_ref().as_str())
                        .map(|n| format!(".{}", quote(n))),
                    _ => None,
                };
                path.push(label.unwrap_or_else(|| format!("[{i}]")));
                if find_in_value(item.get_ref(), at, path, false) || item.span().contains(&at) {
                    return true;
                }
                path.pop();
            }
            false
        }
        _ => false,
    }
}

/// A key as written in a path: bare if it can be, quoted otherwise.
fn key_segment(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        key.to_owned()
    } else {
        quote(key)
    }
}

/// A name quoted for a message or key path: `"linux"`.
pub(crate) fn quote(name: &str) -> String {
    format!("{name:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toml_error(text: &str) -> String {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct W {
            name: String,
            n: Option<u32>,
        }
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct F {
            #[serde(default)]
            workers: Vec<W>,
            #[serde(default)]
            matrix: Vec<W>,
        }
        let e = toml::from_str::<F>(text).unwrap_err();
        ConfigError::from_toml("k.toml".into(), text, &e).to_string()
    }

    #[test]
    fn toml_errors_have_position_and_key_path() {
        assert_eq!(
            toml_error("[[workers]]\nname = \"w1\"\n\n[[workers]]\nname = \"w2\"\nnn = 1\n"),
            "k.toml:6:1: workers.\"w2\".nn: unknown field `nn`, expected `name` or `n`"
        );
        assert_eq!(
            toml_error("[[matrix]]\nname = \"w1\"\nn = -1\n"),
            "k.toml:3:5: matrix[0].n: invalid value: integer `-1`, expected u32"
        );
        assert_eq!(
            toml_error("workers = [{ name = \"a\", x = 1 }]"),
            "k.toml:1:26: workers.\"a\".x: unknown field `x`, expected `name` or `n`"
        );
        assert_eq!(
            toml_error("[workers\n"),
            "k.toml:1:9: unclosed table, expected `]`"
        );
    }

    #[test]
    fn display_is_one_problem_per_line() {
        let d = |key: &str| Diagnostic {
            file: "kiln.toml".into(),
            position: None,
            key: key.into(),
            message: "bad".into(),
        };
        let e = ConfigError::new(vec![d("a"), d("")]);
        assert_eq!(e.to_string(), "kiln.toml: a: bad\nkiln.toml: bad");
    }

    #[test]
    fn columns_count_characters() {
        assert_eq!(line_column("é = 1\nab", 7), (2, 1));
        assert_eq!(line_column("é = 1\nab", 3), (1, 3));
    }
}
