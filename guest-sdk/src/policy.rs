//! Farm policies: the [`Policy`] trait that the [`policy!`](crate::policy!) macro exports, and
//! the types its hooks receive.

use crate::Value;

pub use crate::policy_world::exports::kiln::step::policy::{
    BuilderInfo, ChangeInfo, ChangeVerdict, RequestInfo, WorkerInfo,
};

/// The master's customization hooks, as Buildbot's `collapseRequests`, `prioritizeBuilders`,
/// `nextBuild`, `nextWorker` and `canStartBuild`, plus a scheduler's change filter.
///
/// Every hook has a default that returns `None`, "no opinion": Kiln then decides as it would
/// without a policy. Implement only the hooks you care about and export the type with
/// [`policy!`](crate::policy!). Hooks are plain functions (there is no `self`): each call runs in
/// a fresh instance, so nothing carries over from one call to the next. A policy has no files,
/// environment, network or host calls, and a short deadline (100 ms by default): decide from the
/// arguments alone, at once. A panic, a trap or an exceeded limit counts as no answer.
///
/// ```no_run
/// use guest_sdk::prelude::*;
///
/// struct Quiet;
///
/// impl Policy for Quiet {
///     // Never collapse try builds; leave everything else to Kiln.
///     fn collapse_requests(_builder: String, new: RequestInfo, older: RequestInfo) -> Option<bool> {
///         (new.has_patch || older.has_patch).then_some(false)
///     }
/// }
///
/// guest_sdk::policy!(Quiet);
/// ```
pub trait Policy {
    /// May `new` be merged into `older`, a request queued earlier on `builder`, so one build
    /// serves both?
    fn collapse_requests(_builder: String, _new: RequestInfo, _older: RequestInfo) -> Option<bool> {
        None
    }

    /// The order in which builders get free workers, first first; names left out keep the
    /// default order after the ones given.
    fn prioritize_builders(_builders: Vec<BuilderInfo>) -> Option<Vec<String>> {
        None
    }

    /// The id of the request `builder` should start next, on `worker` if one is already chosen.
    /// Answer with one of the ids of `requests`.
    fn next_build(
        _builder: String,
        _worker: Option<WorkerInfo>,
        _requests: Vec<RequestInfo>,
    ) -> Option<u64> {
        None
    }

    /// The name of the worker that should run `request` on `builder`, one of `workers`.
    fn next_worker(
        _builder: String,
        _workers: Vec<WorkerInfo>,
        _request: RequestInfo,
    ) -> Option<String> {
        None
    }

    /// May `worker` start `request` on `builder` now? `Some(false)` leaves it queued.
    fn can_start_build(
        _builder: String,
        _worker: WorkerInfo,
        _request: RequestInfo,
    ) -> Option<bool> {
        None
    }

    /// What `scheduler` does with `change`: ignore it, record it as unimportant, or let it start
    /// a build.
    fn change_filter(_scheduler: String, _change: ChangeInfo) -> Option<ChangeVerdict> {
        None
    }
}

impl RequestInfo {
    /// The value of one of the request's properties, or `None` if it is not set.
    pub fn property(&self, name: &str) -> Option<Value> {
        self.parsed_properties().remove(name)
    }

    /// The request's properties, parsed (empty if the host sent something other than a JSON
    /// object, which it does not).
    pub fn parsed_properties(&self) -> serde_json::Map<String, Value> {
        match serde_json::from_str(&self.properties) {
            Ok(Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        }
    }
}
