//! Arguments with errors that name the bad key: serde's own messages say what was expected, but
//! not for which key.

use serde::de::DeserializeOwned;

use crate::{Error, Value};

/// Parses JSON arguments into `T`: `null` gives `T::default()`, an object is deserialized with
/// serde. `T` must default every field (`#[serde(default)]`), which lets a failure be traced to
/// its key by deserializing the keys one at a time. `what` (the step or observer's name)
/// prefixes every message: `warnings: argument `max_warnings`: invalid type: ...`.
pub fn parse_args<T: DeserializeOwned + Default>(args: &Value, what: &str) -> Result<T, Error> {
    match args {
        Value::Null => Ok(T::default()),
        Value::Object(map) => T::deserialize(args).map_err(|whole| {
            for key in map.keys() {
                let mut single = args.clone();
                if let Value::Object(m) = &mut single {
                    m.retain(|k, _| k == key);
                }
                if let Err(e) = T::deserialize(&single) {
                    return Error::msg(format!("{what}: argument `{key}`: {e}"));
                }
            }
            Error::msg(format!("{what}: bad arguments: {whole}"))
        }),
        other => Err(Error::msg(format!(
            "{what}: arguments must be a JSON object or null, not {}",
            kind(other)
        ))),
    }
}

/// What kind of JSON value this is, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A duration given in seconds by an argument (`"timeout": 2.5`), checked: positive, finite and
/// not absurdly large. `what` names the argument in the error.
pub fn seconds(value: f64, what: &str) -> Result<std::time::Duration, Error> {
    match std::time::Duration::try_from_secs_f64(value) {
        Ok(d) if !d.is_zero() && d <= MAX_SECONDS => Ok(d),
        _ => Err(Error::msg(format!(
            "{what}: {value:?} is not a number of seconds between 0 and {}",
            MAX_SECONDS.as_secs()
        ))),
    }
}

/// The longest duration an argument may give: a week.
const MAX_SECONDS: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_checked() {
        assert_eq!(
            seconds(2.5, "timeout").unwrap(),
            std::time::Duration::from_millis(2500)
        );
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300, 1e7] {
            assert_eq!(
                seconds(bad, "timeout").unwrap_err().to_string(),
                format!("timeout: {bad:?} is not a number of seconds between 0 and 604800")
            );
        }
    }
}
