//! The master's domain types: identities (newtypes over database ids) and the records that
//! flow from changes to claimed build requests, named as Buildbot names them.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use kiln_protocol::Outcome as Results;

macro_rules! id_type {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
            sqlx::Type,
        )]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    )*};
}

id_type! {
    /// A change (a commit) as the database numbers it.
    ChangeId;
    /// A source stamp.
    SourceStampId;
    /// A buildset: one source stamp built on several builders.
    BuildsetId;
    /// A buildset's request on one builder.
    BuildRequestId;
    /// A builder's row.
    BuilderId;
    /// A build.
    BuildId;
    /// A master sharing the database.
    MasterId;
    /// A worker's row.
    WorkerId;
    /// A user (an author in a blamelist).
    UserId;
}

/// A yes or no stored as an integer (0 or 1), as both databases can hold it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Flag(pub bool);

impl From<i64> for Flag {
    fn from(stored: i64) -> Self {
        Flag(stored != 0)
    }
}

impl std::ops::Deref for Flag {
    type Target = bool;
    fn deref(&self) -> &bool {
        &self.0
    }
}

/// A JSON column as stored (text), decoded into its value by `TryFrom` in a row's
/// `#[sqlx(try_from = "StoredJson")]`: text that does not parse is an error naming the column,
/// never `null`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::Type)]
#[sqlx(transparent)]
pub struct StoredJson(pub String);

/// The types rows decode from a [`StoredJson`] column. (One `impl` per type: a blanket one
/// over `DeserializeOwned` would overlap the standard library's `TryFrom` for `Into`.)
macro_rules! decoded_from_stored_json {
    ($($t:ty),* $(,)?) => {$(
        impl TryFrom<StoredJson> for $t {
            type Error = serde_json::Error;
            fn try_from(stored: StoredJson) -> Result<Self, Self::Error> {
                serde_json::from_str(&stored.0)
            }
        }
    )*};
}

decoded_from_stored_json!(Value, Vec<ChangeId>, BTreeMap<String, u64>);

/// A results column as stored: Buildbot's code, NULL while unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(transparent)]
pub struct ResultsCode(pub Option<i64>);

impl TryFrom<ResultsCode> for Option<Results> {
    type Error = String;
    fn try_from(stored: ResultsCode) -> Result<Self, Self::Error> {
        stored
            .0
            .map(|code| {
                results_from_code(code).ok_or_else(|| format!("{code} is not a result code"))
            })
            .transpose()
    }
}

/// Results as stored: Buildbot's codes 0 (SUCCESS) to 6 (CANCELLED).
pub fn results_from_code(code: i64) -> Option<Results> {
    usize::try_from(code)
        .ok()
        .and_then(|i| Results::ALL.get(i).copied())
}

/// Milliseconds since the Unix epoch, the unit of every time in the database.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A change as a change source reports it: the one input every change source (webhooks,
/// pollers, `kiln sendchange`) goes through.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NewChange {
    /// Who wrote it: "Name <email>" or a user name.
    pub author: String,
    /// Who committed it, when different.
    pub committer: Option<String>,
    /// The commit message.
    pub comments: String,
    /// Branch, if the version control system has branches.
    pub branch: Option<String>,
    /// Revision identifier (a commit hash for git).
    pub revision: Option<String>,
    /// A link to the revision in a web view.
    pub revlink: Option<String>,
    /// When the change was made (ms since the epoch); now when absent.
    pub when_ms: Option<i64>,
    /// A free-form category ("release", "docs").
    pub category: Option<String>,
    /// The repository URL.
    pub repository: String,
    /// The codebase, for builds that combine several repositories.
    pub codebase: String,
    /// The project.
    pub project: String,
    /// Files touched, relative to the repository root.
    pub files: Vec<String>,
    /// Change properties (name to JSON value).
    pub properties: serde_json::Map<String, Value>,
    /// Which change source reported it ("sendchange", "github", a poller's name).
    pub source: String,
    /// A key that identifies one delivery (a webhook delivery id, a poller's commit); a change
    /// with a key already seen is dropped, so redelivery is harmless.
    pub source_key: Option<String>,
    /// False for changes from untrusted origins (pull requests from forks): their builds go only
    /// to sandbox workers and never see secrets.
    pub trusted: Option<bool>,
}

/// A change as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Its id; ids grow in the order changes were recorded.
    pub id: ChangeId,
    /// Who wrote it.
    pub author: String,
    /// Who committed it.
    pub committer: Option<String>,
    /// The commit message.
    pub comments: String,
    /// Branch.
    pub branch: Option<String>,
    /// Revision.
    pub revision: Option<String>,
    /// Link to the revision.
    pub revlink: Option<String>,
    /// When it was made (ms).
    pub when_ms: i64,
    /// Category.
    pub category: Option<String>,
    /// Repository.
    pub repository: String,
    /// Codebase.
    pub codebase: String,
    /// Project.
    pub project: String,
    /// Files touched.
    pub files: Vec<String>,
    /// Properties.
    pub properties: serde_json::Map<String, Value>,
    /// The change source that reported it.
    pub source: String,
    /// Whether builds of it may see secrets and run on trusted workers.
    pub trusted: bool,
}

/// A patch applied on top of a source stamp's revision (try builds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    /// `patch -pN` level.
    pub level: i64,
    /// The diff.
    pub body: Vec<u8>,
    /// Who sent it.
    pub author: Option<String>,
    /// Why.
    pub comment: Option<String>,
    /// Subdirectory to apply it in.
    pub subdir: Option<String>,
}

/// What a build builds, for one codebase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceStamp {
    /// Codebase ("" for single-repository builds).
    pub codebase: String,
    /// Repository URL.
    pub repository: String,
    /// Branch.
    pub branch: Option<String>,
    /// Revision; none means the branch's tip.
    pub revision: Option<String>,
    /// Project.
    pub project: String,
    /// A patch on top (try builds).
    pub patch: Option<Patch>,
    /// The changes it includes, oldest first.
    pub changes: Vec<ChangeId>,
}

/// A property with the name of where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourcedProperty {
    /// Name.
    pub name: String,
    /// Value.
    pub value: Value,
    /// Source ("Scheduler", "Change", "Force Build Form", ...).
    pub source: String,
}

/// A buildset to create: what schedulers hand to the database.
#[derive(Debug, Clone, Default)]
pub struct NewBuildset {
    /// The scheduler that made it.
    pub scheduler: String,
    /// Why ("The SingleBranchScheduler 'main' triggered this build").
    pub reason: String,
    /// An idempotency key: a second buildset with the same scheduler and key is refused, so a
    /// timer cannot fire twice even across masters and restarts.
    pub external_id: Option<String>,
    /// Source stamps, one per codebase.
    pub sourcestamps: Vec<SourceStamp>,
    /// Properties.
    pub properties: Vec<SourcedProperty>,
    /// Builders to request, with each request's priority.
    pub builders: Vec<(String, i64)>,
    /// False if any change is untrusted.
    pub trusted: bool,
    /// The build that triggered it, for triggerable schedulers.
    pub parent_build: Option<BuildId>,
}

/// A request waiting in a builder's queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedRequest {
    /// Its id.
    pub id: BuildRequestId,
    /// Its buildset.
    pub buildset: BuildsetId,
    /// The builder's name.
    pub builder: String,
    /// Request priority (higher first).
    pub priority: i64,
    /// When it was submitted (ms).
    pub submitted_ms: i64,
    /// Whether the buildset is trusted.
    pub trusted: bool,
}

/// A buildset's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Buildset {
    /// Id.
    pub id: BuildsetId,
    /// The scheduler that made it.
    pub scheduler: Option<String>,
    /// Why.
    pub reason: String,
    /// Idempotency key.
    pub external_id: Option<String>,
    /// When (ms).
    pub submitted_ms: i64,
    /// Trusted.
    pub trusted: bool,
    /// Whether every request completed.
    pub complete: bool,
    /// The worst result of its requests, once complete.
    pub results: Option<Results>,
    /// When the first request failed, if one did.
    pub first_failure_ms: Option<i64>,
}

/// Properties that differ between otherwise identical requests without making them different
/// builds: where the request came from, not what it builds.
const COLLAPSE_IGNORED_PROPERTIES: &[&str] = &["scheduler", "reason", "owner"];

/// Buildbot's default collapse rule as a key: two buildsets' requests may merge when their keys
/// are equal. The key covers, per codebase, the repository, branch and project, and either
/// "has changes" or the exact revision (requests built from changes merge; a forced build of a
/// revision merges only with the same revision), plus the properties apart from those
/// recording where each request came from (change properties and
/// [`COLLAPSE_IGNORED_PROPERTIES`]). A patch means no key: try builds never merge.
pub fn collapse_key(stamps: &[SourceStamp], properties: &[SourcedProperty]) -> Option<String> {
    use sha2::Digest;
    if stamps.iter().any(|s| s.patch.is_some()) {
        return None;
    }
    let mut stamps: Vec<Value> = stamps
        .iter()
        .map(|s| {
            let what = if s.changes.is_empty() {
                json!({"revision": s.revision})
            } else {
                json!("changes")
            };
            json!([s.codebase, s.repository, s.branch, s.project, what])
        })
        .collect();
    stamps.sort_by_key(|v| v.to_string());
    let props: BTreeMap<&str, &Value> = properties
        .iter()
        .filter(|p| p.source != "Change" && !COLLAPSE_IGNORED_PROPERTIES.contains(&p.name.as_str()))
        .map(|p| (p.name.as_str(), &p.value))
        .collect();
    let text = json!([stamps, props]).to_string();
    Some(hex::encode(sha2::Sha256::digest(text.as_bytes())))
}
