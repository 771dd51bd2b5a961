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
