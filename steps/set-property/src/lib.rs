//! The set-property steps, as Buildbot's SetProperty and SetPropertyFromCommand: set build
//! properties from given values, or from a command's standard output (stripped, or a regex
//! capture).

use std::collections::BTreeMap;

use guest_sdk::CommandLine;
use guest_sdk::prelude::*;
use serde::Deserialize;

/// Most standard output captured from the command.
const CAPTURE: u32 = 1 << 20;

/// The arguments; `mode` is fixed by the built-in (`set-property` or
/// `set-property-from-command`).
#[derive(Debug, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
enum Args {
    /// `set-property`: `{"name": "k", "value": v}` or `{"properties": {"k": v}}`.
    Value {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        value: Option<Value>,
        #[serde(default)]
        properties: BTreeMap<String, Value>,
    },
    /// `set-property-from-command`.
    Command {
        command: CommandLine,
        property: String,
        #[serde(default = "yes")]
        strip: bool,
        #[serde(default)]
        regex: Option<String>,
        #[serde(default = "default_shell")]
        shell: String,
        #[serde(default)]
        env: BTreeMap<String, String>,
        #[serde(default)]
        workdir: Option<String>,
        #[serde(default)]
        timeout: Option<f64>,
    },
}

fn yes() -> bool {
    true
}

fn default_shell() -> String {
    "sh".to_owned()
}

/// The property values a `set-property` step sets, checked.
fn values(
    name: Option<String>,
    value: Option<Value>,
    properties: BTreeMap<String, Value>,
) -> Result<BTreeMap<String, Value>, Error> {
    let mut all = properties;
    match (name, value) {
        (Some(n), Some(v)) => {
            all.insert(n, v);
        }
        (None, None) => {}
        (Some(n), None) => {
            return Err(Error::msg(format!(
                "property {n:?} has no value: give \"value\""
            )));
        }
        (None, Some(_)) => return Err(Error::msg("\"value\" needs a \"name\"")),
    }
    if all.is_empty() {
        return Err(Error::msg(
            "nothing to set: give \"name\" and \"value\", or \"properties\"",
        ));
    }
    Ok(all)
}

/// The value a regex extracts: the `value` group, else group 1, else the whole match.
fn extract(re: &regex::Regex, text: &str) -> Option<String> {
    let caps = re.captures(text)?;
    let m = caps
        .name("value")
        .or_else(|| caps.get(1))
        .or_else(|| caps.get(0))?;
    Some(m.as_str().to_owned())
}

fn run(ctx: &mut StepContext) -> StepResult {
    match ctx.args::<Args>()? {
        Args::Value {
            name,
            value,
            properties,
        } => {
            let all = values(name, value, properties)?;
            for (k, v) in &all {
                ctx.set_property(k, v)?;
                ctx.header(&format!("{k} = {v}"));
            }
            let names: Vec<&str> = all.keys().map(String::as_str).collect();
            ctx.set_summary(&format!("set {}", names.join(", ")));
            Ok(Outcome::Success)
        }
        Args::Command {
            command,
            property,
            strip,
            regex,
            shell,
            env,
            workdir,
            timeout,
        } => {
            let re = match &regex {
                Some(r) => {
                    Some(regex::Regex::new(r).map_err(|e| Error::msg(format!("regex: {e}")))?)
                }
                None => None,
            };
            let argv = command.argv(&shell)?;
            let mut cmd = ctx.command(argv).capture_stdout(CAPTURE);
            if let Some(dir) = &workdir {
                cmd = cmd.cwd(dir);
            }
            for (k, v) in &env {
                cmd = cmd.env(k, v);
            }
            if let Some(t) = timeout {
                cmd = cmd.timeout(guest_sdk::seconds(t, "timeout")?);
            }
            let done = cmd.run()?;
            if !done.success() {
                ctx.set_summary(&format!("{}: {}", command.describe(), done.describe()));
                return Ok(Outcome::Failure);
            }
            let value = match &re {
                Some(re) => extract(re, &done.stdout).ok_or_else(|| {
                    Error::msg(format!(
                        "regex {:?} did not match the command's output",
                        regex.as_deref().unwrap_or("")
                    ))
                })?,
                None if strip => done.stdout.trim().to_owned(),
                None => done.stdout.clone(),
            };
            ctx.set_property(&property, &value)?;
            ctx.set_summary(&format!("{property}: {value}"));
            Ok(Outcome::Success)
        }
    }
}

guest_sdk::step!(run);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Args, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn arguments_are_checked() {
        assert!(parse(json!({"mode": "value", "name": "a", "value": 1})).is_ok());
        assert!(
            parse(json!({"mode": "command", "command": "git rev-parse HEAD", "property": "rev"}))
                .is_ok()
        );
        assert!(
            parse(json!({"mode": "command", "command": ["x"]}))
                .unwrap_err()
                .starts_with("missing field `property`")
        );
        assert!(
            parse(json!({"mode": "value", "nmae": "a"}))
                .unwrap_err()
                .starts_with("unknown field `nmae`")
        );
        assert_eq!(
            values(None, None, BTreeMap::new()).unwrap_err().to_string(),
            "nothing to set: give \"name\" and \"value\", or \"properties\""
        );
        assert_eq!(
            values(Some("a".into()), None, BTreeMap::new())
                .unwrap_err()
                .to_string(),
            "property \"a\" has no value: give \"value\""
        );
        let all = values(
            Some("a".into()),
            Some(json!(1)),
            BTreeMap::from([("b".into(), json!("x"))]),
        )
        .unwrap();
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn regex_extraction_prefers_the_value_group() {
        let re = regex::Regex::new(r"version (?<value>\d+\.\d+)").unwrap();
        assert_eq!(extract(&re, "tool version 1.2 (x)").as_deref(), Some("1.2"));
        let re = regex::Regex::new(r"v(\d+)").unwrap();
        assert_eq!(extract(&re, "v42").as_deref(), Some("42"));
        let re = regex::Regex::new(r"\d+").unwrap();
        assert_eq!(extract(&re, "abc 7").as_deref(), Some("7"));
        assert_eq!(extract(&re, "none"), None);
    }
}
