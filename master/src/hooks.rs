//! Customization hooks (Buildbot's `collapseRequests`, `prioritizeBuilders`, `nextBuild`,
//! `nextWorker`, `canStartBuild`, and a scheduler's change filter): each either a built-in
//! behaviour or a policy component. A policy that fails (traps, runs out of time or memory,
//! answers nonsense) never stops the farm: the default decides, and the failure is logged and
//! counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use runtime::policy::{
    BuilderInfo, ChangeInfo, ChangeVerdict, PolicyComponent, RequestInfo, WorkerInfo,
};

/// A loaded policy component and the name it was configured by.
#[derive(Clone)]
pub struct Policy {
    /// "module:lint-policy@1.0" or the file path, for messages.
    pub name: String,
    /// The component (shared: one compiled component serves every call).
    pub component: Arc<PolicyComponent>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy").field("name", &self.name).finish()
    }
}

/// How compatible requests are collapsed.
#[derive(Debug, Clone, Default)]
pub enum CollapseHook {
    /// Buildbot's rules (see [`crate::requests::can_collapse`]).
    #[default]
    Default,
    /// Never collapse.
    Never,
    /// Ask a policy.
    Policy(Policy),
}

/// In which order builders get free workers.
#[derive(Debug, Clone, Default)]
pub enum PrioritizeHook {
    /// Builder priority (highest first), then the oldest queued request.
    #[default]
    Priority,
    /// Ask a policy.
    Policy(Policy),
}

/// Which queued request a builder starts next.
#[derive(Debug, Clone, Default)]
pub enum NextBuildHook {
    /// Request priority (highest first), then the oldest.
    #[default]
    Oldest,
    /// Ask a policy.
    Policy(Policy),
}

/// Which free worker takes a request.
#[derive(Debug, Clone, Default)]
pub enum NextWorkerHook {
    /// The worker running the fewest builds for its capacity (ties: by name).
    #[default]
    LeastBusy,
    /// Any worker, at random (Buildbot's default).
    Random,
    /// Ask a policy.
    Policy(Policy),
}

/// Whether a worker may start a request now.
#[derive(Debug, Clone, Default)]
pub enum CanStartHook {
    /// Always.
    #[default]
    Always,
    /// Ask a policy.
    Policy(Policy),
}

/// The farm's hooks.
#[derive(Debug, Default)]
pub struct Hooks {
    /// collapse-requests.
    pub collapse: CollapseHook,
    /// prioritize-builders.
    pub prioritize: PrioritizeHook,
    /// next-build.
    pub next_build: NextBuildHook,
    /// next-worker.
    pub next_worker: NextWorkerHook,
    /// can-start-build.
    pub can_start: CanStartHook,
    failures: AtomicU64,
}

/// Runs a blocking policy call without stalling the async runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl Hooks {
    /// Hooks with every choice given.
    pub fn new(
        collapse: CollapseHook,
        prioritize: PrioritizeHook,
        next_build: NextBuildHook,
        next_worker: NextWorkerHook,
        can_start: CanStartHook,
    ) -> Arc<Hooks> {
        Arc::new(Hooks {
            collapse,
            prioritize,
            next_build,
            next_worker,
            can_start,
            failures: AtomicU64::new(0),
        })
    }

    /// Whether collapsing asks a policy, which needs each request's source stamps and
    /// properties (the built-in rules read those themselves).
    pub fn collapse_needs_details(&self) -> bool {
        matches!(self.collapse, CollapseHook::Policy(_))
    }

    /// Whether collapsing follows Kiln's default rule (a key comparison the database does).
    pub fn collapse_is_default(&self) -> bool {
        matches!(self.collapse, CollapseHook::Default)
    }

    /// Whether builders are ordered by a policy, which is told how many requests each has
    /// queued (the default order needs only their priority and oldest request).
    pub fn prioritize_needs_counts(&self) -> bool {
        matches!(self.prioritize, PrioritizeHook::Policy(_))
    }

    /// Whether dispatch asks a policy about requests (built-in choices need only priority and
    /// age).
    pub fn dispatch_needs_details(&self) -> bool {
        matches!(self.next_build, NextBuildHook::Policy(_))
            || matches!(self.next_worker, NextWorkerHook::Policy(_))
            || matches!(self.can_start, CanStartHook::Policy(_))
    }

    /// How many policy calls failed (and fell back to the default) since the master started.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn ask<T>(
        &self,
        policy: &Policy,
        call: impl FnOnce(&PolicyComponent) -> Result<Option<T>, runtime::policy::PolicyError>,
    ) -> Option<T> {
        match blocking(|| call(&policy.component)) {
            Ok(answer) => answer,
            Err(error) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(policy = %policy.name, %error, "policy hook failed; using the default");
                None
            }
        }
    }

    /// Whether `new` may absorb `older` (both queued on `builder`); `default` is Kiln's rule.
    pub fn collapse(
        &self,
        builder: &str,
        new: &RequestInfo,
        older: &RequestInfo,
        default: impl FnOnce() -> bool,
    ) -> bool {
        match &self.collapse {
            CollapseHook::Default => default(),
            CollapseHook::Never => false,
            CollapseHook::Policy(p) => self
                .ask(p, |c| c.collapse_requests(builder, new, older))
                .unwrap_or_else(default),
        }
    }

    /// Orders builders (already in the default order). Names a policy leaves out keep their
    /// default order after the ones it names; names it invents are ignored.
    pub fn prioritize(&self, builders: Vec<BuilderInfo>) -> Vec<BuilderInfo> {
        let PrioritizeHook::Policy(p) = &self.prioritize else {
            return builders;
        };
        let Some(order) = self.ask(p, |c| c.prioritize_builders(&builders)) else {
            return builders;
        };
        let mut rest = builders;
        let mut out = Vec::with_capacity(rest.len());
        for name in order {
            if let Some(i) = rest.iter().position(|b| b.name == name) {
                out.push(rest.remove(i));
            }
        }
        out.extend(rest);
        out
    }

    /// The index in `requests` (default order) to start next.
    pub fn next_build(
        &self,
        builder: &str,
        worker: Option<&WorkerInfo>,
        requests: &[RequestInfo],
    ) -> usize {
        let NextBuildHook::Policy(p) = &self.next_build else {
            return 0;
        };
        match self.ask(p, |c| c.next_build(builder, worker, requests)) {
            Some(id) => match requests.iter().position(|r| r.id == id) {
                Some(i) => i,
                None => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(policy = %p.name, request = id, "next-build named a request that was not offered; using the default");
                    0
                }
            },
            None => 0,
        }
    }

    /// The index in `workers` to run `request`.
    pub fn next_worker(
        &self,
        builder: &str,
        workers: &[WorkerInfo],
        request: &RequestInfo,
    ) -> Option<usize> {
        if workers.is_empty() {
            return None;
        }
        let least_busy = || {
            (0..workers.len()).min_by(|&a, &b| {
                let load = |w: &WorkerInfo| w.running_builds as f64 / w.max_builds.max(1) as f64;
                load(&workers[a])
                    .total_cmp(&load(&workers[b]))
                    .then_with(|| workers[a].name.cmp(&workers[b].name))
            })
        };
        match &self.next_worker {
            NextWorkerHook::LeastBusy => least_busy(),
            NextWorkerHook::Random => Some(rand::random_range(0..workers.len())),
            NextWorkerHook::Policy(p) => {
                match self.ask(p, |c| c.next_worker(builder, workers, request)) {
                    Some(name) => match workers.iter().position(|w| w.name == name) {
                        Some(i) => Some(i),
                        None => {
                            self.failures.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(policy = %p.name, worker = %name, "next-worker named a worker that was not offered; using the default");
                            least_busy()
                        }
                    },
                    None => least_busy(),
                }
            }
        }
    }

    /// Whether `worker` may start `request` now.
    pub fn can_start(&self, builder: &str, worker: &WorkerInfo, request: &RequestInfo) -> bool {
        match &self.can_start {
            CanStartHook::Always => true,
            CanStartHook::Policy(p) => self
                .ask(p, |c| c.can_start_build(builder, worker, request))
                .unwrap_or(true),
        }
    }

    /// A scheduler's change filter, when it has a policy: `None` when the policy has no opinion
    /// (or failed), so the scheduler's own filters decide.
    pub fn change_filter(
        &self,
        policy: &Policy,
        scheduler: &str,
        change: &ChangeInfo,
    ) -> Option<ChangeVerdict> {
        self.ask(policy, |c| c.change_filter(scheduler, change))
    }
}
