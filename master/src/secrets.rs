//! Secret providers (a directory with one file per secret; environment variables with a
//! prefix) and the rule for handing secrets to a build: only the secrets its steps' arguments
//! name with `%(secret:NAME)s`, only to trusted builds, resolved at dispatch and never stored.
//! The worker's runtime substitutes them and redacts their values from every log.

use serde_json::Value;
use std::collections::BTreeMap;

/// Where secrets come from, tried in order: the configuration's `[secrets]` (a directory of
/// files named after their secret, whose content without a trailing newline is the value; then
/// environment variables with a prefix).
pub type SecretProviders = kiln_config::SecretsConfig;

/// Why a build cannot have its secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// An untrusted build named a secret.
    #[error(
        "secret {0:?}: this build is untrusted (an untrusted builder, or a change from a fork), \
         and secrets are never given to untrusted builds"
    )]
    Untrusted(String),
    /// No provider knows the secret.
    #[error("secret {name:?} is not defined: {looked}")]
    Missing {
        /// The secret.
        name: String,
        /// Where Kiln looked.
        looked: String,
    },
    /// A name that cannot be a secret's.
    #[error(
        "secret name {0:?} is not valid: use letters, digits, '_', '-' and '.', not starting \
         with '.'"
    )]
    BadName(String),
    /// A provider failed.
    #[error("secret {name:?}: {message}")]
    Provider {
        /// The secret.
        name: String,
        /// What went wrong.
        message: String,
    },
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Reading a secret from the configured providers (at dispatch, never before: the
/// configuration only says where secrets are).
pub trait SecretLookup {
    /// The value of a secret, or an error saying where Kiln looked.
    fn get(&self, name: &str) -> Result<String, SecretError>;
}

impl SecretLookup for SecretProviders {
    fn get(&self, name: &str) -> Result<String, SecretError> {
        if !valid_name(name) {
            return Err(SecretError::BadName(name.into()));
        }
        let mut looked = Vec::new();
        if let Some(dir) = &self.directory {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let value = text.strip_suffix('\n').unwrap_or(&text);
                    return Ok(value.strip_suffix('\r').unwrap_or(value).to_owned());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    looked.push(format!("no file {}", path.display()));
                }
                Err(e) => {
                    return Err(SecretError::Provider {
                        name: name.into(),
                        message: format!("cannot read {}: {e}", path.display()),
                    });
                }
            }
        }
        if let Some(var) = self.env_var(name) {
            match std::env::var(&var) {
                Ok(v) => return Ok(v),
                Err(_) => looked.push(format!("no environment variable {var}")),
            }
        }
        if looked.is_empty() {
            looked.push(
                "no secret provider is configured; add [secrets] directory or env_prefix to \
                 kiln.toml"
                    .into(),
            );
        }
        Err(SecretError::Missing {
            name: name.into(),
            looked: looked.join(", "),
        })
    }
}

/// The names of the secrets `%(secret:NAME)s` references in `value`'s strings.
pub fn referenced(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(i) = rest.find("%(secret:") {
                // "%%(secret:x)s" is a literal.
                let escaped = rest[..i].ends_with('%')
                    && rest[..i].chars().rev().take_while(|c| *c == '%').count() % 2 == 1;
                rest = &rest[i + "%(secret:".len()..];
                if escaped {
                    continue;
                }
                if let Some(end) = rest.find(")s") {
                    let name = rest[..end].to_owned();
                    if !out.contains(&name) {
                        out.push(name);
                    }
                    rest = &rest[end + 2..];
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| referenced(v, out)),
        Value::Object(map) => map.values().for_each(|v| referenced(v, out)),
        _ => {}
    }
}

/// The secrets a build's steps name, resolved: what the master hands to the worker (never to
/// the database). An untrusted build that names any secret is refused.
pub fn for_build<'a>(
    providers: &SecretProviders,
    step_args: impl IntoIterator<Item = &'a Value>,
    trusted: bool,
) -> Result<BTreeMap<String, String>, SecretError> {
    let mut names = Vec::new();
    for args in step_args {
        referenced(args, &mut names);
    }
    let mut secrets = BTreeMap::new();
    for name in names {
        if !trusted {
            return Err(SecretError::Untrusted(name));
        }
        let value = providers.get(&name)?;
        secrets.insert(name, value);
    }
    Ok(secrets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn files_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("deploy_key"), "k3y\n").unwrap();
        // SAFETY: the variable name is unique to this test.
        unsafe { std::env::set_var("KILN_TEST_SECRET_API_TOKEN", "t0k") };
        let p = SecretProviders {
            directory: Some(dir.path().into()),
            env_prefix: Some("KILN_TEST_SECRET_".into()),
        };
        assert_eq!(p.get("deploy_key").unwrap(), "k3y");
        assert_eq!(p.get("api-token").unwrap(), "t0k");
        assert_eq!(
            p.get("nope").unwrap_err().to_string(),
            format!(
                "secret \"nope\" is not defined: no file {}, no environment variable KILN_TEST_SECRET_NOPE",
                dir.path().join("nope").display()
            )
        );
        assert_eq!(
            p.get("../etc/passwd").unwrap_err(),
            SecretError::BadName("../etc/passwd".into())
        );
        assert!(matches!(
            SecretProviders::default().get("x").unwrap_err(),
            SecretError::Missing { .. }
        ));
    }

    #[test]
    fn only_named_secrets_and_only_for_trusted_builds() {
        // SAFETY: the variable name is unique to this test.
        unsafe { std::env::set_var("KILN_TEST_SECRET2_TOKEN", "t") };
        let p = SecretProviders {
            directory: None,
            env_prefix: Some("KILN_TEST_SECRET2_".into()),
        };
        let args = [
            json!({"argv": ["deploy", "--token=%(secret:token)s", "%%(secret:literal)s"]}),
            json!({"x": "%(secret:token)s"}),
        ];
        let got = for_build(&p, &args, true).unwrap();
        assert_eq!(
            got,
            BTreeMap::from([("token".to_string(), "t".to_string())])
        );
        assert_eq!(
            for_build(&p, &args, false).unwrap_err(),
            SecretError::Untrusted("token".into())
        );
        assert!(
            for_build(&p, &[json!({"plain": 1})], false)
                .unwrap()
                .is_empty()
        );
    }
}
