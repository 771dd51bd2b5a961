//! References written as strings: uploaded modules (`NAME@VERSION`), policy components
//! (`module:NAME@VERSION`, `policy:PATH.wasm`), hook choices, and secret values
//! (`%(secret:NAME)s` or the value itself).

use std::fmt;
use std::path::{Path, PathBuf};

pub use super::schema::Secret;

/// Longest module name; names travel in URLs and file names.
const MAX_MODULE_NAME: usize = 64;

/// A module uploaded to the master, by name and version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModuleRef {
    /// The module's name.
    pub name: String,
    /// Which of its versions.
    pub version: ModuleVersion,
}

/// A version of an uploaded module.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModuleVersion {
    /// The newest uploaded version, looked up when a build starts.
    Latest,
    /// This version.
    Exact(String),
}

impl fmt::Display for ModuleVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleVersion::Latest => f.write_str("latest"),
            ModuleVersion::Exact(v) => f.write_str(v),
        }
    }
}

impl fmt::Display for ModuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

impl ModuleRef {
    /// Parses `NAME@VERSION` (or `NAME@latest`).
    pub fn parse(text: &str) -> Result<ModuleRef, String> {
        let Some((name, version)) = text.split_once('@') else {
            return Err(format!("{text:?} is not NAME@VERSION"));
        };
        if name.is_empty()
            || name.len() > MAX_MODULE_NAME
            || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "{text:?}: a module name is 1 to {MAX_MODULE_NAME} letters, digits, '-' and '_', starting with a letter or digit"
            ));
        }
        let version = if version == "latest" {
            ModuleVersion::Latest
        } else if !version.is_empty()
            && version.len() <= 64
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_'))
        {
            ModuleVersion::Exact(version.to_owned())
        } else {
            return Err(format!(
                "{text:?}: the version after '@' is \"latest\" or 1 to 64 letters, digits, '.', '-', '+' and '_' (as \"1.2.0\")"
            ));
        };
        Ok(ModuleRef {
            name: name.to_owned(),
            version,
        })
    }
}

/// A policy component: a hook (or change filter) implemented by a wasm component.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PolicyRef {
    /// A module uploaded to the master: `module:NAME@VERSION`.
    Uploaded {
        /// The module's name.
        name: String,
        /// Its version.
        version: ModuleVersion,
    },
    /// A component file: `policy:PATH.wasm` (made absolute against the config's directory).
    File(PathBuf),
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyRef::Uploaded { name, version } => write!(f, "module:{name}@{version}"),
            PolicyRef::File(path) => write!(f, "policy:{}", path.display()),
        }
    }
}

/// How to write a policy component, for messages.
pub(crate) const POLICY_FORMS: &str = "\"module:NAME@VERSION\" or \"policy:PATH.wasm\"";

impl PolicyRef {
    /// Whether `text` is written as a policy reference (rather than a built-in choice).
    pub(crate) fn is_policy(text: &str) -> bool {
        text.starts_with("module:") || text.starts_with("policy:")
    }

    /// Parses `module:NAME@VERSION` or `policy:PATH.wasm`; a file must exist.
    pub(crate) fn parse(text: &str, dir: &Path) -> Result<PolicyRef, String> {
        if let Some(module) = text.strip_prefix("module:") {
            let m = ModuleRef::parse(module)?;
            Ok(PolicyRef::Uploaded {
                name: m.name,
                version: m.version,
            })
        } else if let Some(path) = text.strip_prefix("policy:") {
            if !path.ends_with(".wasm") || path.len() == ".wasm".len() {
                return Err(format!(
                    "{text:?}: name the component file, as \"policy:hooks/collapse.wasm\""
                ));
            }
            let path = dir.join(path);
            if !path.is_file() {
                return Err(format!(
                    "{}: no such file; build the policy component or fix the path (relative to the configuration's directory)",
                    path.display()
                ));
            }
            Ok(PolicyRef::File(path))
        } else {
            Err(format!("{text:?}: write {POLICY_FORMS}"))
        }
    }
}

/// A customization hook: one of Kiln's built-in behaviours, or a policy component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookChoice<B> {
    /// A built-in behaviour.
    Builtin(B),
    /// A policy component.
    Policy(PolicyRef),
}

/// The built-in behaviours of one hook, by the names `kiln.toml` uses.
pub(crate) trait Choice: Sized + Copy + 'static {
    /// Every choice and its name.
    const ALL: &'static [(&'static str, Self)];
}

/// Parses a hook's value: a built-in's name or a policy reference.
pub(crate) fn parse_hook<B: Choice>(text: &str, dir: &Path) -> Result<HookChoice<B>, String> {
    if PolicyRef::is_policy(text) {
        return PolicyRef::parse(text, dir).map(HookChoice::Policy);
    }
    match B::ALL.iter().find(|(name, _)| *name == text) {
        Some((_, b)) => Ok(HookChoice::Builtin(*b)),
        None => Err(format!(
            "{text:?} is not a choice; give {}, or a policy component ({POLICY_FORMS})",
            B::ALL
                .iter()
                .map(|(name, _)| format!("{name:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// A secret value in the configuration: the value itself, or a secret looked up by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretValue {
    /// The value, written in `kiln.toml`.
    Plain(Secret),
    /// `%(secret:NAME)s`: the secret NAME of the `[secrets]` providers.
    Named(String),
}

impl SecretValue {
    /// Parses a value that is either plain or exactly `%(secret:NAME)s`.
    pub(crate) fn parse(value: &Secret) -> Result<SecretValue, String> {
        let text = value.expose();
        if !text.contains("%(secret:") {
            if text.is_empty() {
                return Err("is empty; give the value or \"%(secret:NAME)s\"".into());
            }
            return Ok(SecretValue::Plain(value.clone()));
        }
        match text
            .strip_prefix("%(secret:")
            .and_then(|rest| rest.strip_suffix(")s"))
        {
            Some(name) if check_secret_name(name).is_ok() => Ok(SecretValue::Named(name.into())),
            Some(name) => Err(check_secret_name(name).unwrap_err()),
            None => Err(
                "mixes text and a secret; give either the value or exactly \"%(secret:NAME)s\""
                    .into(),
            ),
        }
    }
}

/// Checks a secret's name: it names a file in the secrets directory and an environment
/// variable, so 1 to 100 letters, digits, '_', '-' and '.', not starting with '.'.
pub(crate) fn check_secret_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 100
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(format!(
            "secret name {name:?}: use 1 to 100 letters, digits, '_', '-' and '.', not starting with '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_refs() {
        assert_eq!(
            ModuleRef::parse("lint@1.2.0").unwrap(),
            ModuleRef {
                name: "lint".into(),
                version: ModuleVersion::Exact("1.2.0".into())
            }
        );
        assert_eq!(
            ModuleRef::parse("lint@latest").unwrap().version,
            ModuleVersion::Latest
        );
        assert_eq!(
            ModuleRef::parse("lint@latest").unwrap().to_string(),
            "lint@latest"
        );
        assert_eq!(
            ModuleRef::parse("lint@").unwrap_err(),
            "\"lint@\": the version after '@' is \"latest\" or 1 to 64 letters, digits, '.', '-', '+' and '_' (as \"1.2.0\")"
        );
        assert!(ModuleRef::parse("../x@1").is_err());
        assert!(ModuleRef::parse("lint").is_err());
    }

    #[test]
    fn policies() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.wasm"), b"").unwrap();
        assert_eq!(
            PolicyRef::parse("policy:p.wasm", dir.path()).unwrap(),
            PolicyRef::File(dir.path().join("p.wasm"))
        );
        assert!(
            PolicyRef::parse("policy:q.wasm", dir.path())
                .unwrap_err()
                .ends_with("q.wasm: no such file; build the policy component or fix the path (relative to the configuration's directory)")
        );
        assert_eq!(
            PolicyRef::parse("module:collapse@2", dir.path()).unwrap(),
            PolicyRef::Uploaded {
                name: "collapse".into(),
                version: ModuleVersion::Exact("2".into())
            }
        );
    }

    #[test]
    fn secret_values() {
        let s = |t: &str| SecretValue::parse(&Secret(t.into()));
        assert_eq!(s("%(secret:hook)s"), Ok(SecretValue::Named("hook".into())));
        assert_eq!(s("plain"), Ok(SecretValue::Plain(Secret("plain".into()))));
        assert_eq!(
            s("x%(secret:hook)s"),
            Err(
                "mixes text and a secret; give either the value or exactly \"%(secret:NAME)s\""
                    .into()
            )
        );
        assert!(s("%(secret:../x)s").is_err());
        assert_eq!(
            format!("{:?}", s("plain").unwrap()),
            "Plain(Secret(<redacted>))"
        );
    }
}
