//! Kiln's wasmtime host: runs build steps and log observers as sandboxed WebAssembly components.
//!
//! A [`Runtime`] owns one wasmtime `Engine`, an epoch ticker for deadlines and a cache of
//! compiled components. [`Runtime::load`] turns bytes into a [`Loaded`] step or observer;
//! [`Runtime::run_step`] runs a step with its observers under a [`Grant`]: exactly the workdir,
//! read-only directories, programs, environment, secrets and limits it names, and nothing else.
//! Logs and reports stream to a [`StepEvents`] sink as they happen; the result is a
//! [`StepOutcome`].
//!
//! A [`Loaded::Policy`] is the master's customization hooks (Buildbot's `collapseRequests`,
//! `nextWorker` and the like) as a component with no capabilities: see [`policy`].
//!
//! The runtime is the host alone: it has no network client and knows nothing of the master or
//! its database. The worker (`kiln-worker`) drives it for a master; the data it shares with
//! the master (outcomes, properties, step options, log channels) is `kiln-protocol`'s, and is
//! re-exported here because the runtime's own API speaks it.

pub mod artifacts;
mod bindings;
pub mod build;
pub mod confine;
mod engine;
pub mod files;
pub mod grant;
mod host;
pub mod logs;
pub mod policy;
pub mod redact;
mod run;
pub mod trigger;

pub use artifacts::{Artifact, ArtifactStore, DirStore};
pub use build::{BuildOutcome, BuildProgress, BuildStep, Condition, StepOptions, StepRecord};
pub use confine::{Confinement, Helper};
pub use engine::{
    CONTRACT, EPOCH_TICK, LoadError, Loaded, ModuleDigest, ObserverComponent, Runtime,
    RuntimeConfig, StepComponent,
};
pub use grant::{Grant, Limits};
pub use host::report::MAX_NAMES as MAX_REPORT_NAMES;
pub use kiln_protocol::{LogStats, Outcome, Properties, Property, StepOutcome, StepResources, Url};
pub use logs::{Channel, LogLimits, NoEvents, ReportEvent, StepEvents};
pub use policy::PolicyComponent;
pub use run::{CancelToken, ObserverSpec, StepRun, human_duration};
pub use trigger::{LocalTriggers, TriggerRequest, TriggerResponse, TriggeredBuild, Triggers};
