//! Build properties and Buildbot-style interpolation of step arguments.
//!
//! Strings in a step's arguments may contain `%(prop:NAME)s` (the property's value),
//! `%(prop:NAME:-DEFAULT)s` (DEFAULT when unset), `%(prop:NAME:~DEFAULT)s` (DEFAULT when unset
//! or false-ish: empty, 0, false, null), `%(prop:NAME:+REPLACEMENT)s` (REPLACEMENT when set,
//! else empty), `%(secret:NAME)s` (a secret of the grant, redacted in every log) and `%%`
//! (a literal `%`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest property name accepted from a guest.
pub const MAX_PROPERTY_NAME: usize = 256;

/// A property's value and where it came from ("Step compile", "Scheduler nightly", ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Property {
    /// The value.
    pub value: Value,
    /// Where it was set, as Buildbot's property source.
    pub source: String,
}

/// A build's properties.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Properties {
    map: BTreeMap<String, Property>,
}

impl Properties {
    /// No properties.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a property, replacing any earlier value.
    pub fn set(&mut self, name: impl Into<String>, value: Value, source: impl Into<String>) {
        self.map.insert(
            name.into(),
            Property {
                value,
                source: source.into(),
            },
        );
    }

    /// The value of a property.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.map.get(name).map(|p| &p.value)
    }

    /// The property with its source.
    pub fn get_property(&self, name: &str) -> Option<&Property> {
        self.map.get(name)
    }

    /// All properties, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Property)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Property names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }
}

/// Checks a property name: 1 to 256 characters, no control characters.
pub fn check_property_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("property name is empty".into());
    }
    if name.len() > MAX_PROPERTY_NAME {
        return Err(format!(
            "property name is {} bytes, longer than {MAX_PROPERTY_NAME}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "property name {name:?} contains a control character"
        ));
    }
    Ok(())
}

/// Why interpolation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterpolateError {
    /// A `%(prop:NAME)s` named a property that is not set and gave no default.
    MissingProperty(String),
    /// A `%(secret:NAME)s` named a secret the grant does not have.
    MissingSecret(String),
    /// A malformed placeholder.
    Malformed(String),
}

impl std::fmt::Display for InterpolateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InterpolateError::MissingProperty(name) => write!(
                f,
                "step arguments use property {name:?}, which is not set (write %(prop:{name}:-default)s to give a default)"
            ),
            InterpolateError::MissingSecret(name) => write!(
                f,
                "step arguments use secret {name:?}, which this builder is not granted"
            ),
            InterpolateError::Malformed(text) => write!(
                f,
                "step arguments: malformed placeholder {text:?}: write %(prop:NAME)s, %(prop:NAME:-default)s, %(secret:NAME)s or %% for a literal %"
            ),
        }
    }
}

impl std::error::Error for InterpolateError {}

/// Replaces placeholders in every string of `args` (keys are left alone).
pub fn interpolate(
    args: &Value,
    props: &Properties,
    secrets: &BTreeMap<String, String>,
) -> Result<Value, InterpolateError> {
    Ok(match args {
        Value::String(s) => Value::String(interpolate_str(s, props, secrets)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| interpolate(v, props, secrets))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), interpolate(v, props, secrets)?)))
                .collect::<Result<_, _>>()?,
        ),
        other => other.clone(),
    })
}

fn interpolate_str(
    s: &str,
    props: &Properties,
    secrets: &BTreeMap<String, String>,
) -> Result<String, InterpolateError> {
    if !s.contains('%') {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("%%") {
            out.push('%');
            rest = after;
            continue;
        }
        let Some(body_start) = rest.strip_prefix("%(") else {
            // A lone % that is not a placeholder stays as it is (e.g. "100%").
            out.push('%');
            rest = &rest[1..];
            continue;
        };
        let Some(end) = body_start.find(")s") else {
            return Err(InterpolateError::Malformed(rest.to_owned()));
        };
        let body = &body_start[..end];
        rest = &body_start[end + 2..];
        out.push_str(&expand(body, props, secrets)?);
    }
    out.push_str(rest);
    Ok(out)
}

fn expand(
    body: &str,
    props: &Properties,
    secrets: &BTreeMap<String, String>,
) -> Result<String, InterpolateError> {
    let malformed = || InterpolateError::Malformed(format!("%({body})s"));
    let (kind, rest) = body.split_once(':').ok_or_else(malformed)?;
    match kind {
        "secret" => secrets
            .get(rest)
            .cloned()
            .ok_or_else(|| InterpolateError::MissingSecret(rest.to_owned())),
        "prop" => {
            let (name, op) = match rest
                .find(":-")
                .or_else(|| rest.find(":~"))
                .or_else(|| rest.find(":+"))
            {
                Some(i) => (&rest[..i], Some((&rest[i + 1..i + 2], &rest[i + 2..]))),
                None => (rest, None),
            };
            if name.is_empty() {
                return Err(malformed());
            }
            let value = props.get(name);
            match (op, value) {
                (None, Some(v)) => Ok(render(v)),
                (None, None) => Err(InterpolateError::MissingProperty(name.to_owned())),
                (Some(("-", default)), v) => Ok(v.map_or_else(|| default.to_owned(), render)),
                (Some(("~", default)), v) => Ok(match v {
                    Some(v) if truthy(v) => render(v),
                    _ => default.to_owned(),
                }),
                (Some(("+", replacement)), v) => Ok(if v.is_some() {
                    replacement.to_owned()
                } else {
                    String::new()
                }),
                _ => Err(malformed()),
            }
        }
        _ => Err(malformed()),
    }
}

fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props() -> Properties {
        let mut p = Properties::new();
        p.set("branch", json!("main"), "Change");
        p.set("jobs", json!(4), "Worker");
        p.set("empty", json!(""), "Builder");
        p
    }

    #[test]
    fn placeholders_expand() {
        let secrets = BTreeMap::from([("token".to_owned(), "s3cr3t".to_owned())]);
        let args = json!({
            "cmd": ["make", "-j%(prop:jobs)s", "BRANCH=%(prop:branch)s"],
            "d": "%(prop:missing:-fallback)s|%(prop:empty:~dflt)s|%(prop:branch:+yes)s|%(prop:nope:+yes)s",
            "t": "Bearer %(secret:token)s", "pct": "100% and 50%%", "n": 3
        });
        let out = interpolate(&args, &props(), &secrets).unwrap();
        assert_eq!(
            out,
            json!({
                "cmd": ["make", "-j4", "BRANCH=main"],
                "d": "fallback|dflt|yes|",
                "t": "Bearer s3cr3t", "pct": "100% and 50%", "n": 3
            })
        );
    }

    #[test]
    fn errors_name_the_fix() {
        let none = BTreeMap::new();
        let err = interpolate(&json!("%(prop:nope)s"), &props(), &none).unwrap_err();
        assert_eq!(
            err.to_string(),
            "step arguments use property \"nope\", which is not set (write %(prop:nope:-default)s to give a default)"
        );
        let err = interpolate(&json!("%(secret:k)s"), &props(), &none).unwrap_err();
        assert_eq!(err, InterpolateError::MissingSecret("k".into()));
        let err = interpolate(&json!("%(prop:branch"), &props(), &none).unwrap_err();
        assert!(matches!(err, InterpolateError::Malformed(_)));
        let err = interpolate(&json!("%(kw:x)s"), &props(), &none).unwrap_err();
        assert!(matches!(err, InterpolateError::Malformed(_)));
    }

    #[test]
    fn property_names_are_checked() {
        assert!(check_property_name("got_revision").is_ok());
        assert!(check_property_name("").is_err());
        assert!(check_property_name("a\nb").is_err());
        assert!(check_property_name(&"x".repeat(300)).is_err());
    }
}
