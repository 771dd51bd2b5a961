//! Farm policies: the master's customization hooks (Buildbot's `collapseRequests`,
//! `prioritizeBuilders`, `nextBuild`, `nextWorker`, `canStartBuild`, and a scheduler's change
//! filter) as components of the `farm-policy` world. Callers see plain Rust types; every hook
//! call gets a fresh store with no capabilities at all, a memory cap and a short deadline.
//!
//! Calls are synchronous and may take up to the deadline: from async code, call them inside
//! `tokio::task::spawn_blocking`.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wasmtime::Store;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::WasiCtxBuilder;

use crate::bindings::policy::FarmPolicyPre;
use crate::bindings::policy::exports::kiln::step::policy as wit;
use crate::engine::{EpochTicker, ModuleDigest};
use crate::host::{GuestOutput, Limiter, PolicyState, Stopped, limit_store, why_stopped};
use crate::run::{CancelToken, human_duration};

/// How long a hook may run unless configured otherwise. Hooks sit on the master's scheduling
/// path, so a slow one delays every build; real hooks answer in microseconds.
pub const DEFAULT_POLICY_DEADLINE: Duration = Duration::from_millis(100);

/// How much memory a hook's instance may use unless configured otherwise: ample for sorting
/// thousands of requests, small enough that many concurrent calls cannot exhaust the master.
pub const DEFAULT_POLICY_MEMORY: usize = 64 << 20;

/// Most bytes of a policy's stderr kept for error messages (a panic's message is its start).
const POLICY_STDERR_BYTES: usize = 4096;

/// The limits of every call of a policy's hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyLimits {
    /// Wall-clock time one call may take, instantiation included. It is checked every
    /// [`EPOCH_TICK`](crate::EPOCH_TICK), so a runaway hook is stopped at most that much later.
    pub deadline: Duration,
    /// Linear memory one call's instance may grow to, in bytes.
    pub memory_bytes: usize,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        PolicyLimits {
            deadline: DEFAULT_POLICY_DEADLINE,
            memory_bytes: DEFAULT_POLICY_MEMORY,
        }
    }
}

/// A build request waiting in a builder's queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestInfo {
    /// The request's id, unique in the farm and increasing with submission.
    pub id: u64,
    /// The builder it is queued on.
    pub builder: String,
    /// Its priority: higher is started first.
    pub priority: i32,
    /// When it was submitted, in milliseconds since the Unix epoch.
    pub submitted_at: i64,
    /// Why it was made.
    pub reason: String,
    /// The branch of its source stamp, if it names one.
    pub branch: Option<String>,
    /// The repository of its source stamp, if it names one.
    pub repository: Option<String>,
    /// The codebase of its source stamp ("" in a farm with one codebase).
    pub codebase: String,
    /// True if it builds a patch (a try build).
    pub has_patch: bool,
    /// Its properties (values only), passed to the guest as a JSON object.
    pub properties: serde_json::Map<String, serde_json::Value>,
}

/// A worker as the master sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Its name.
    pub name: String,
    /// The architecture it advertises, such as "x86_64".
    pub arch: Option<String>,
    /// The operating system it advertises, such as "linux".
    pub os: Option<String>,
    /// The tags it advertises.
    pub tags: Vec<String>,
    /// True if it is a sandbox-mode worker.
    pub sandbox: bool,
    /// How many builds it is running now.
    pub running_builds: u32,
    /// How many builds it may run at once.
    pub max_builds: u32,
}

/// A builder with queued requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuilderInfo {
    /// Its name.
    pub name: String,
    /// Its configured priority: higher is served first.
    pub priority: i32,
    /// When its oldest queued request was submitted, in milliseconds since the Unix epoch.
    pub oldest_request_at: Option<i64>,
    /// How many requests are queued on it. Counted only for a prioritize policy, which is
    /// the one reader; the built-in order leaves it 0.
    pub queued: u32,
    /// Its configured tags.
    pub tags: Vec<String>,
}

/// A change (a commit) offered to a scheduler.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeInfo {
    /// The change's id, unique in the farm.
    pub id: u64,
    /// Who made it.
    pub author: String,
    /// The branch it was made on, if known.
    pub branch: Option<String>,
    /// The repository it belongs to.
    pub repository: String,
    /// The project it belongs to ("" if none).
    pub project: String,
    /// Its category, if the change source gave one.
    pub category: Option<String>,
    /// The files it touches, relative to the repository's root.
    pub files: Vec<String>,
    /// Its commit message.
    pub comments: String,
    /// The revision it made, if known.
    pub revision: Option<String>,
}

/// What a scheduler does with a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeVerdict {
    /// The scheduler does not see the change at all.
    Ignore,
    /// The scheduler records the change, but it does not start a build by itself.
    Unimportant,
    /// The change may start a build.
    Important,
}

/// A hook of the `policy` interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    /// `collapse-requests`.
    CollapseRequests,
    /// `prioritize-builders`.
    PrioritizeBuilders,
    /// `next-build`.
    NextBuild,
    /// `next-worker`.
    NextWorker,
    /// `can-start-build`.
    CanStartBuild,
    /// `change-filter`.
    ChangeFilter,
}

impl Hook {
    /// Every hook.
    pub const ALL: [Hook; 6] = [
        Hook::CollapseRequests,
        Hook::PrioritizeBuilders,
        Hook::NextBuild,
        Hook::NextWorker,
        Hook::CanStartBuild,
        Hook::ChangeFilter,
    ];

    /// Its name in the WIT contract, such as "next-worker".
    pub fn name(self) -> &'static str {
        match self {
            Hook::CollapseRequests => "collapse-requests",
            Hook::PrioritizeBuilders => "prioritize-builders",
            Hook::NextBuild => "next-build",
            Hook::NextWorker => "next-worker",
            Hook::CanStartBuild => "can-start-build",
            Hook::ChangeFilter => "change-filter",
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A hook call that gave no answer: which hook, and why. The caller decides what to do
/// instead (usually Kiln's default, as if the hook had answered `None`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy hook {hook} {failure}")]
pub struct PolicyError {
    /// The hook that failed.
    pub hook: Hook,
    /// Why.
    pub failure: PolicyFailure,
}

/// Why a hook call gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyFailure {
    /// It ran past its deadline.
    #[error(
        "ran past its deadline of {}; a hook must answer at once, without waiting or looping",
        human_duration(*.0)
    )]
    Deadline(Duration),
    /// It asked for more memory than its limit.
    #[error(
        "exceeded the memory limit of {} MiB (it asked for {} MiB)",
        .limit_bytes >> 20,
        .asked_bytes.div_ceil(1 << 20)
    )]
    Memory {
        /// The limit, in bytes.
        limit_bytes: usize,
        /// What it asked for, in bytes.
        asked_bytes: usize,
    },
    /// It panicked; the message is the panic's, as the guest printed it.
    #[error("panicked at {0}")]
    Panic(String),
    /// It trapped for another reason; the message names the trap (and the start of what the
    /// guest wrote to stderr, if anything).
    #[error("trapped: {0}")]
    Trap(String),
    /// It could not be instantiated or called, or broke another limit.
    #[error("failed: {0}")]
    Failed(String),
}

/// A loaded policy component, ready to call. Cheap to clone, `Send` and `Sync`: clones share the
/// compiled code, and every call gets its own store and instance, so calls may run concurrently
/// from any threads. Obtain one from [`Runtime::load_policy`](crate::Runtime::load_policy) or
/// [`Loaded::Policy`](crate::Loaded::Policy).
#[derive(Clone)]
pub struct PolicyComponent {
    pub(crate) digest: ModuleDigest,
    pub(crate) pre: FarmPolicyPre<PolicyState>,
    pub(crate) limits: PolicyLimits,
    /// Keeps the epoch advancing, and so the deadline working, while the policy is held.
    pub(crate) _ticker: Arc<EpochTicker>,
}

impl fmt::Debug for PolicyComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyComponent")
            .field("digest", &self.digest)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl PolicyComponent {
    /// The SHA-256 of the component's bytes.
    pub fn digest(&self) -> ModuleDigest {
        self.digest
    }

    /// The limits of each call.
    pub fn limits(&self) -> PolicyLimits {
        self.limits
    }

    /// The same policy under other limits.
    pub fn with_limits(mut self, limits: PolicyLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Buildbot's `collapseRequests`: may `new` be merged into `older`, queued earlier on
    /// `builder`?
    pub fn collapse_requests(
        &self,
        builder: &str,
        new: &RequestInfo,
        older: &RequestInfo,
    ) -> Result<Option<bool>, PolicyError> {
        let (new, older) = (new.into(), older.into());
        self.call(Hook::CollapseRequests, |guest, store| {
            guest.call_collapse_requests(store, builder, &new, &older)
        })
    }

    /// Buildbot's `prioritizeBuilders`: builder names, first served first. The answer is the
    /// guest's; names it leaves out or invents are the caller's to handle.
    pub fn prioritize_builders(
        &self,
        builders: &[BuilderInfo],
    ) -> Result<Option<Vec<String>>, PolicyError> {
        let builders: Vec<wit::BuilderInfo> = builders.iter().map(Into::into).collect();
        self.call(Hook::PrioritizeBuilders, |guest, store| {
            guest.call_prioritize_builders(store, &builders)
        })
    }

    /// Buildbot's `nextBuild`: the id of the request `builder` should start next, on `worker`
    /// if one is chosen. The id is the guest's; check it is one of `requests`.
    pub fn next_build(
        &self,
        builder: &str,
        worker: Option<&WorkerInfo>,
        requests: &[RequestInfo],
    ) -> Result<Option<u64>, PolicyError> {
        let worker: Option<wit::WorkerInfo> = worker.map(Into::into);
        let requests: Vec<wit::RequestInfo> = requests.iter().map(Into::into).collect();
        self.call(Hook::NextBuild, |guest, store| {
            guest.call_next_build(store, builder, worker.as_ref(), &requests)
        })
    }

    /// Buildbot's `nextWorker`: the name of the worker that should run `request`. The name is
    /// the guest's; check it is one of `workers`.
    pub fn next_worker(
        &self,
        builder: &str,
        workers: &[WorkerInfo],
        request: &RequestInfo,
    ) -> Result<Option<String>, PolicyError> {
        let workers: Vec<wit::WorkerInfo> = workers.iter().map(Into::into).collect();
        let request = request.into();
        self.call(Hook::NextWorker, |guest, store| {
            guest.call_next_worker(store, builder, &workers, &request)
        })
    }

    /// Buildbot's `canStartBuild`: may `worker` start `request` now?
    pub fn can_start_build(
        &self,
        builder: &str,
        worker: &WorkerInfo,
        request: &RequestInfo,
    ) -> Result<Option<bool>, PolicyError> {
        let (worker, request) = (worker.into(), request.into());
        self.call(Hook::CanStartBuild, |guest, store| {
            guest.call_can_start_build(store, builder, &worker, &request)
        })
    }

    /// A scheduler's change filter: what `scheduler` does with `change`.
    pub fn change_filter(
        &self,
        scheduler: &str,
        change: &ChangeInfo,
    ) -> Result<Option<ChangeVerdict>, PolicyError> {
        let change = change.into();
        let verdict = self.call(Hook::ChangeFilter, |guest, store| {
            guest.call_change_filter(store, scheduler, &change)
        })?;
        Ok(verdict.map(Into::into))
    }

    /// Calls one hook in a fresh store: an empty WASI context (no preopens, environment,
    /// arguments or network; stdout discarded, stderr kept in a small buffer), the memory cap,
    /// and the deadline counted from now.
    fn call<R>(
        &self,
        hook: Hook,
        f: impl FnOnce(&wit::Guest, &mut Store<PolicyState>) -> wasmtime::Result<R>,
    ) -> Result<R, PolicyError> {
        let started = Instant::now();
        let stderr = GuestOutput::with_limit(POLICY_STDERR_BYTES);
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = PolicyState {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter::new(self.limits.memory_bytes),
        };
        let mut store = Store::new(self.pre.engine(), state);
        // Nothing cancels a policy call: its deadline is short.
        limit_store(
            &mut store,
            |s| &mut s.limiter,
            started + self.limits.deadline,
            self.limits.deadline,
            CancelToken::new(),
        );
        let called = self
            .pre
            .instantiate(&mut store)
            .and_then(|instance| f(instance.kiln_step_policy(), &mut store));
        called.map_err(|e| {
            let (written, _) = stderr.take();
            let failure = failure(
                why_stopped(&e, &store.data().limiter),
                &String::from_utf8_lossy(&written),
            );
            tracing::debug!(module = %self.digest, %hook, error = %failure, "policy hook failed");
            PolicyError { hook, failure }
        })
    }
}

/// Words why a call stopped, using what the guest wrote to stderr: with `panic = "abort"` a
/// panic is an `unreachable` trap, and only its printed message tells it apart.
fn failure(stopped: Stopped, stderr: &str) -> PolicyFailure {
    match stopped {
        Stopped::Deadline(limit) => PolicyFailure::Deadline(limit),
        Stopped::Memory(limit_bytes, asked_bytes) => PolicyFailure::Memory {
            limit_bytes,
            asked_bytes,
        },
        Stopped::Trap(trap) => match panic_message(stderr) {
            Some(message) => PolicyFailure::Panic(message),
            None if stderr.trim().is_empty() => PolicyFailure::Trap(trap.to_string()),
            None => PolicyFailure::Trap(format!("{trap} (stderr: {})", one_line(stderr))),
        },
        Stopped::Cancelled => PolicyFailure::Failed("it was cancelled".to_owned()),
        Stopped::Limit(message) | Stopped::Failed(message) => PolicyFailure::Failed(message),
    }
}

/// "src/lib.rs:7:5: boom" from Rust's "thread '…' panicked at src/lib.rs:7:5:\nboom\nnote: …".
fn panic_message(stderr: &str) -> Option<String> {
    let (_, rest) = stderr.split_once("panicked at ")?;
    let kept: Vec<&str> = rest
        .lines()
        .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE"))
        .collect();
    Some(one_line(&kept.join("\n")))
}

/// Text on one line: lines trimmed, empty ones dropped, joined with spaces.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

impl From<&RequestInfo> for wit::RequestInfo {
    fn from(r: &RequestInfo) -> Self {
        wit::RequestInfo {
            id: r.id,
            builder: r.builder.clone(),
            priority: r.priority,
            submitted_at: r.submitted_at,
            reason: r.reason.clone(),
            branch: r.branch.clone(),
            repository: r.repository.clone(),
            codebase: r.codebase.clone(),
            has_patch: r.has_patch,
            properties: serde_json::Value::Object(r.properties.clone()).to_string(),
        }
    }
}

impl From<&WorkerInfo> for wit::WorkerInfo {
    fn from(w: &WorkerInfo) -> Self {
        wit::WorkerInfo {
            name: w.name.clone(),
            arch: w.arch.clone(),
            os: w.os.clone(),
            tags: w.tags.clone(),
            sandbox: w.sandbox,
            running_builds: w.running_builds,
            max_builds: w.max_builds,
        }
    }
}

impl From<&BuilderInfo> for wit::BuilderInfo {
    fn from(b: &BuilderInfo) -> Self {
        wit::BuilderInfo {
            name: b.name.clone(),
            priority: b.priority,
            oldest_request_at: b.oldest_request_at,
            queued: b.queued,
            tags: b.tags.clone(),
        }
    }
}

impl From<&ChangeInfo> for wit::ChangeInfo {
    fn from(c: &ChangeInfo) -> Self {
        wit::ChangeInfo {
            id: c.id,
            author: c.author.clone(),
            branch: c.branch.clone(),
            repository: c.repository.clone(),
            project: c.project.clone(),
            category: c.category.clone(),
            files: c.files.clone(),
            comments: c.comments.clone(),
            revision: c.revision.clone(),
        }
    }
}

impl From<wit::ChangeVerdict> for ChangeVerdict {
    fn from(v: wit::ChangeVerdict) -> Self {
        match v {
            wit::ChangeVerdict::Ignore => ChangeVerdict::Ignore,
            wit::ChangeVerdict::Unimportant => ChangeVerdict::Unimportant,
            wit::ChangeVerdict::Important => ChangeVerdict::Important,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_read_from_stderr() {
        let stderr = "\nthread '<unnamed>' panicked at src/lib.rs:7:5:\nboom\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            panic_message(stderr).as_deref(),
            Some("src/lib.rs:7:5: boom")
        );
        assert_eq!(panic_message("memory allocation failed"), None);
    }

    #[test]
    fn failures_say_which_hook_and_why() {
        let e = PolicyError {
            hook: Hook::NextWorker,
            failure: PolicyFailure::Deadline(Duration::from_millis(100)),
        };
        assert_eq!(
            e.to_string(),
            "policy hook next-worker ran past its deadline of 100 ms; a hook must answer at once, without waiting or looping"
        );
        let e = PolicyError {
            hook: Hook::CollapseRequests,
            failure: PolicyFailure::Memory {
                limit_bytes: 64 << 20,
                asked_bytes: (64 << 20) + 1,
            },
        };
        assert_eq!(
            e.to_string(),
            "policy hook collapse-requests exceeded the memory limit of 64 MiB (it asked for 65 MiB)"
        );
    }

    #[test]
    fn policy_components_can_be_shared_across_threads() {
        fn shared<T: Send + Sync + Clone + 'static>() {}
        shared::<PolicyComponent>();
    }
}
