//! What the API's clients and server share: the roles a caller may hold, the shape of a token,
//! and the bodies of the requests a client sends (a force, a try).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What a caller may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Read everything the API shows.
    Read,
    /// Force, stop, cancel and rebuild builds; set request priorities; send changes.
    Force,
    /// Upload step modules.
    Upload,
    /// Everything: delete modules, pause and stop workers, reload the configuration.
    Admin,
}

/// The roles, lowest first, as configuration and tokens spell them.
pub const ROLES: &[(&str, Role)] = &[
    ("read", Role::Read),
    ("force", Role::Force),
    ("upload", Role::Upload),
    ("admin", Role::Admin),
];

impl Role {
    /// Parses a role's name.
    pub fn parse(text: &str) -> Result<Role, String> {
        ROLES
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, r)| *r)
            .ok_or_else(|| {
                format!(
                    "{text:?} is not a role; the roles are read, force, upload and admin (each includes the ones before it)"
                )
            })
    }

    /// The role's name.
    pub fn name(self) -> &'static str {
        ROLES
            .iter()
            .find(|(_, r)| *r == self)
            .map_or("read", |(n, _)| n)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The prefix of every token, so a leaked one is recognisable (and scanners can find it).
pub const TOKEN_PREFIX: &str = "kiln_";

/// Whether a token is shaped like one of ours (checked before any lookup).
pub fn is_token(text: &str) -> bool {
    text.strip_prefix(TOKEN_PREFIX)
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A user's request to force a build.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForceRequest {
    /// Builders to build on (a subset of the scheduler's); empty for all of them.
    pub builders: Vec<String>,
    /// Why.
    pub reason: String,
    /// Who asked.
    pub owner: String,
    /// Branch to build.
    pub branch: Option<String>,
    /// Revision to build.
    pub revision: Option<String>,
    /// Repository to build.
    pub repository: Option<String>,
    /// Project.
    pub project: Option<String>,
    /// Values of the scheduler's parameters.
    pub parameters: Map<String, Value>,
    /// Request priority.
    pub priority: i64,
}

/// The body of `POST /api/v2/tryschedulers/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TryBody {
    /// Builders to build on (a subset of the scheduler's); empty for all of them.
    #[serde(default)]
    pub builders: Vec<String>,
    /// The full commit id the patch applies to.
    pub baserev: String,
    /// The branch the base is on, if known.
    #[serde(default)]
    pub branch: Option<String>,
    /// The repository the base is in.
    #[serde(default)]
    pub repository: String,
    /// The project.
    #[serde(default)]
    pub project: String,
    /// The patch: a diff git can apply, as text.
    pub patch: String,
    /// Its `-p` level.
    #[serde(default = "default_level")]
    pub patch_level: u32,
    /// Why (it goes in the build's reason).
    #[serde(default)]
    pub comment: String,
    /// Properties for the builds (source "Try").
    #[serde(default)]
    pub properties: Map<String, Value>,
}

fn default_level() -> u32 {
    1
}
