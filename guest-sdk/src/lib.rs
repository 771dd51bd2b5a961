//! Write Kiln build steps, log observers and farm policies in Rust.
//!
//! A **step** is a function over a [`StepContext`]: it reads its arguments and the build's
//! properties, writes logs, runs the programs its grant allows, and returns an [`Outcome`].
//! A **log observer** is a type implementing [`LineObserver`]: it is fed the lines of a step's
//! log and reports progress, statistics, properties, URLs and a summary, like Buildbot's
//! `LogLineObserver`. A **farm policy** is a type implementing [`Policy`]: the master's
//! customization hooks (which request to build next, on which worker, ...), like Buildbot's
//! `nextBuild` and friends.
//!
//! All three compile to WebAssembly components with one command,
//! `cargo build --release --target wasm32-wasip2`, and run in exactly the sandbox the farm uses
//! (`kiln step run step.wasm --workdir DIR`).
//!
//! # A complete step
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "hello-step"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! guest-sdk = { git = "…", package = "guest-sdk" }  # or a path to kiln/guest-sdk
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```no_run
//! use guest_sdk::prelude::*;
//!
//! #[derive(serde::Deserialize)]
//! struct Args {
//!     greeting: String,
//! }
//!
//! fn run(ctx: &mut StepContext) -> StepResult {
//!     let args: Args = ctx.args()?;
//!     ctx.header("saying hello");
//!     ctx.stdout(&args.greeting);
//!     let done = ctx.command(["git", "rev-parse", "HEAD"]).capture_stdout(100).run()?;
//!     if !done.success() {
//!         return Err(format!("git failed: {}", done.describe()).into());
//!     }
//!     ctx.set_property("got_revision", done.stdout.trim())?;
//!     ctx.set_summary("said hello");
//!     Ok(Outcome::Success)
//! }
//!
//! guest_sdk::step!(run);
//! ```
//!
//! # A complete observer
//!
//! ```no_run
//! use guest_sdk::prelude::*;
//!
//! struct Errors {
//!     count: u64,
//! }
//!
//! impl LineObserver for Errors {
//!     fn new(_args: &Value) -> Result<Self, Error> {
//!         Ok(Errors { count: 0 })
//!     }
//!     fn err_line(&mut self, line: &str, _report: &Report) {
//!         if line.contains("error") {
//!             self.count += 1;
//!         }
//!     }
//!     fn finished(&mut self, report: &Report) -> Option<Outcome> {
//!         report.set_statistic("errors", self.count as f64);
//!         report.set_summary(&format!("{} errors", self.count));
//!         (self.count > 0).then_some(Outcome::Warnings)
//!     }
//! }
//!
//! guest_sdk::observer!(Errors);
//! ```
//!
//! # A complete policy
//!
//! Same `Cargo.toml` as a step (`serde` is not needed). Every hook has a default answering
//! `None` ("no opinion": Kiln decides as it would without a policy), so implement only the
//! hooks you care about. The master calls them with plain data; a policy has no files,
//! environment, network or host calls, a fresh instance per call and a deadline of 100 ms.
//!
//! ```no_run
//! use guest_sdk::prelude::*;
//!
//! struct Farm;
//!
//! impl Policy for Farm {
//!     // Requests collapse only when their "collapse_key" properties agree.
//!     fn collapse_requests(_builder: String, new: RequestInfo, older: RequestInfo) -> Option<bool> {
//!         Some(new.property("collapse_key")? == older.property("collapse_key")?)
//!     }
//!
//!     // Release builders go first; the rest keep Kiln's order.
//!     fn prioritize_builders(builders: Vec<BuilderInfo>) -> Option<Vec<String>> {
//!         let release = builders.into_iter().filter(|b| b.tags.iter().any(|t| t == "release"));
//!         Some(release.map(|b| b.name).collect())
//!     }
//!
//!     // The newest request on a "latest-only" builder.
//!     fn next_build(builder: String, _worker: Option<WorkerInfo>, requests: Vec<RequestInfo>) -> Option<u64> {
//!         if !builder.ends_with("-latest") {
//!             return None;
//!         }
//!         requests.iter().max_by_key(|r| r.submitted_at).map(|r| r.id)
//!     }
//!
//!     // The least busy worker.
//!     fn next_worker(_builder: String, workers: Vec<WorkerInfo>, _request: RequestInfo) -> Option<String> {
//!         workers.into_iter().min_by_key(|w| w.running_builds).map(|w| w.name)
//!     }
//!
//!     // Try builds (patches) only on sandbox workers.
//!     fn can_start_build(_builder: String, worker: WorkerInfo, request: RequestInfo) -> Option<bool> {
//!         request.has_patch.then_some(worker.sandbox)
//!     }
//!
//!     // Documentation-only changes never start builds.
//!     fn change_filter(_scheduler: String, change: ChangeInfo) -> Option<ChangeVerdict> {
//!         let docs_only = change.files.iter().all(|f| f.starts_with("docs/"));
//!         (docs_only && !change.files.is_empty()).then_some(ChangeVerdict::Unimportant)
//!     }
//! }
//!
//! guest_sdk::policy!(Farm);
//! ```
#![deny(missing_docs)]

mod args;
mod context;
mod observe;
mod policy;
mod text;

pub use args::{parse_args, seconds};
pub use context::{
    Artifact, Command, CommandLine, CommandResult, Exit, LogWriter, StepContext, TriggeredBuild,
};
pub use observe::LineObserver;
pub use policy::{BuilderInfo, ChangeInfo, ChangeVerdict, Policy, RequestInfo, WorkerInfo};
pub use serde_json::Value;
pub use text::strip_ansi;

/// The generated bindings of the `step` world. Use the safe API of this crate instead; this is
/// public only so that [`step!`] can name it from another crate.
#[doc(hidden)]
pub mod step_world {
    wit_bindgen::generate!({
        path: "../wit",
        world: "step",
        pub_export_macro: true,
        export_macro_name: "export_step",
        default_bindings_module: "guest_sdk::step_world",
    });
}

/// The generated bindings of the `log-observer` world, sharing the types of [`step_world`].
#[doc(hidden)]
pub mod observer_world {
    wit_bindgen::generate!({
        path: "../wit",
        world: "log-observer",
        pub_export_macro: true,
        export_macro_name: "export_observer",
        default_bindings_module: "guest_sdk::observer_world",
        with: {
            "kiln:step/types@0.1.0": crate::step_world::kiln::step::types,
            "kiln:step/report@0.1.0": crate::step_world::kiln::step::report,
            "kiln:step/logs@0.1.0": crate::step_world::kiln::step::logs,
        },
    });
}

/// The generated bindings of the `farm-policy` world. Use [`Policy`] and [`policy!`] instead;
/// this is public only so that [`policy!`] can name it from another crate.
#[doc(hidden)]
pub mod policy_world {
    wit_bindgen::generate!({
        path: "../wit",
        world: "farm-policy",
        pub_export_macro: true,
        export_macro_name: "export_policy",
        default_bindings_module: "guest_sdk::policy_world",
    });
}

use step_world::kiln::step::report as host_report;
pub use step_world::kiln::step::types::{Channel, HostError, Outcome};

impl Outcome {
    /// The worse of two outcomes, by Buildbot's order: SKIPPED < SUCCESS < WARNINGS < FAILURE <
    /// EXCEPTION < RETRY < CANCELLED. The farm combines a step's and its observers' this way.
    pub fn worst(self, other: Outcome) -> Outcome {
        fn rank(o: Outcome) -> u8 {
            match o {
                Outcome::Skipped => 0,
                Outcome::Success => 1,
                Outcome::Warnings => 2,
                Outcome::Failure => 3,
                Outcome::Exception => 4,
                Outcome::Retry => 5,
                Outcome::Cancelled => 6,
            }
        }
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// What a step function returns: its outcome, or an error that makes it a FAILURE.
pub type StepResult = Result<Outcome, Error>;

/// A step's own error. Its message ends up in the step's log and summary, and the step's result
/// is FAILURE. Anything that converts to a string converts to an `Error`, so `?` works on host
/// errors, JSON errors and your own messages alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    /// An error with this message.
    pub fn msg(message: impl std::fmt::Display) -> Self {
        Error(message.to_string())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error(message.to_owned())
    }
}

impl From<HostError> for Error {
    fn from(error: HostError) -> Self {
        Error(describe_host_error(&error))
    }
}

impl From<serde_json::Error> for Error {
    fn from(error: serde_json::Error) -> Self {
        Error(format!("invalid JSON: {error}"))
    }
}

/// A one-line description of a host error, as shown in logs.
pub fn describe_host_error(error: &HostError) -> String {
    match error {
        HostError::Invalid(m) => format!("invalid: {m}"),
        HostError::TooLarge(m) => format!("too large: {m}"),
        HostError::Denied(m) => format!("denied: {m}"),
        HostError::NotFound(m) => format!("not found: {m}"),
        HostError::Io(m) => format!("i/o error: {m}"),
    }
}

/// Reporting that steps and observers share: properties, progress, statistics, URLs and the
/// status summary. A [`StepContext`] dereferences to a `Report`, and observers receive one.
#[derive(Debug, Default)]
pub struct Report {
    _private: (),
}

impl Report {
    pub(crate) const fn new() -> Self {
        Report { _private: () }
    }

    /// The value of a build property, or `None` if it is not set.
    pub fn property(&self, name: &str) -> Option<Value> {
        let json = host_report::get_property(name)?;
        serde_json::from_str(&json).ok()
    }

    /// The value of a build property as a string, if it is set and is a string.
    pub fn property_str(&self, name: &str) -> Option<String> {
        match self.property(name)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The names of all properties currently set, sorted.
    pub fn property_names(&self) -> Vec<String> {
        host_report::property_names()
    }

    /// Sets a build property that later steps of the build see.
    pub fn set_property(&self, name: &str, value: impl serde::Serialize) -> Result<(), Error> {
        let json = serde_json::to_string(&value)?;
        host_report::set_property(name, &json).map_err(Error::from)
    }

    /// Reports progress on a metric (for example lines of "output"), used for ETAs.
    pub fn set_progress(&self, metric: &str, value: u64) {
        host_report::set_progress(metric, value);
    }

    /// Sets a statistic; the last value wins.
    pub fn set_statistic(&self, name: &str, value: f64) {
        host_report::set_statistic(name, value);
    }

    /// Adds to a statistic, starting from zero.
    pub fn add_statistic(&self, name: &str, delta: f64) {
        host_report::add_statistic(name, delta);
    }

    /// Adds a link shown with the step.
    pub fn add_url(&self, name: &str, url: &str) {
        host_report::add_url(name, url);
    }

    /// Sets the one-line status summary of the step.
    pub fn set_summary(&self, text: &str) {
        host_report::set_summary(text);
    }

    /// Appends text (one or more lines) to a named log's stdout channel. Observers use it to
    /// write their own logs, such as "warnings"; an observer may not write the log it observes.
    /// Each call is a host call: gather lines and write them together.
    pub fn write_log(&self, log: &str, text: &str) -> Result<(), Error> {
        step_world::kiln::step::logs::write_log(log, Channel::Stdout, text).map_err(Error::from)
    }
}

/// The names most steps and observers use.
pub mod prelude {
    pub use crate::{
        BuilderInfo, ChangeInfo, ChangeVerdict, Channel, Error, LineObserver, Outcome, Policy,
        Report, RequestInfo, StepContext, StepResult, Value, WorkerInfo,
    };
}

/// Exports a step function `fn(&mut StepContext) -> StepResult` as this component's `run`.
///
/// Logs written through the context are flushed when the function returns, whatever it
/// returns. An `Err` makes the step a FAILURE with the error's message.
#[macro_export]
macro_rules! step {
    ($run:path) => {
        #[doc(hidden)]
        struct __KilnStep;

        impl $crate::step_world::Guest for __KilnStep {
            fn run() -> ::core::result::Result<$crate::Outcome, ::std::string::String> {
                $crate::__run_step($run)
            }
        }

        $crate::step_world::export_step!(__KilnStep with_types_in $crate::step_world);
    };
}

/// Exports a [`LineObserver`] type as this component's observer.
#[macro_export]
macro_rules! observer {
    ($observer:ty) => {
        #[doc(hidden)]
        struct __KilnObserver;

        impl $crate::observer_world::exports::kiln::step::observer::Guest for __KilnObserver {
            fn init(args: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                $crate::__observer_init::<$observer>(&args)
            }
            fn lines(batch: ::std::vec::Vec<$crate::__Chunk>) {
                $crate::__observer_lines::<$observer>(batch)
            }
            fn finish() -> ::core::option::Option<$crate::Outcome> {
                $crate::__observer_finish::<$observer>()
            }
        }

        $crate::observer_world::export_observer!(__KilnObserver with_types_in $crate::observer_world);
    };
}

/// Exports a [`Policy`] type as this component's farm policy (world `farm-policy`).
///
/// Hooks the type does not implement answer `None`, so Kiln uses its defaults for them.
#[macro_export]
macro_rules! policy {
    ($policy:ty) => {
        #[doc(hidden)]
        struct __KilnPolicy;

        impl $crate::policy_world::exports::kiln::step::policy::Guest for __KilnPolicy {
            fn collapse_requests(
                builder: ::std::string::String,
                new: $crate::RequestInfo,
                older: $crate::RequestInfo,
            ) -> ::core::option::Option<bool> {
                <$policy as $crate::Policy>::collapse_requests(builder, new, older)
            }
            fn prioritize_builders(
                builders: ::std::vec::Vec<$crate::BuilderInfo>,
            ) -> ::core::option::Option<::std::vec::Vec<::std::string::String>> {
                <$policy as $crate::Policy>::prioritize_builders(builders)
            }
            fn next_build(
                builder: ::std::string::String,
                worker: ::core::option::Option<$crate::WorkerInfo>,
                requests: ::std::vec::Vec<$crate::RequestInfo>,
            ) -> ::core::option::Option<u64> {
                <$policy as $crate::Policy>::next_build(builder, worker, requests)
            }
            fn next_worker(
                builder: ::std::string::String,
                workers: ::std::vec::Vec<$crate::WorkerInfo>,
                request: $crate::RequestInfo,
            ) -> ::core::option::Option<::std::string::String> {
                <$policy as $crate::Policy>::next_worker(builder, workers, request)
            }
            fn can_start_build(
                builder: ::std::string::String,
                worker: $crate::WorkerInfo,
                request: $crate::RequestInfo,
            ) -> ::core::option::Option<bool> {
                <$policy as $crate::Policy>::can_start_build(builder, worker, request)
            }
            fn change_filter(
                scheduler: ::std::string::String,
                change: $crate::ChangeInfo,
            ) -> ::core::option::Option<$crate::ChangeVerdict> {
                <$policy as $crate::Policy>::change_filter(scheduler, change)
            }
        }

        $crate::policy_world::export_policy!(__KilnPolicy with_types_in $crate::policy_world);
    };
}

#[doc(hidden)]
pub use observe::{__observer_finish, __observer_init, __observer_lines};
#[doc(hidden)]
pub use step_world::kiln::step::types::Chunk as __Chunk;

#[doc(hidden)]
pub fn __run_step(run: fn(&mut StepContext) -> StepResult) -> Result<Outcome, String> {
    let mut ctx = StepContext::new();
    let result = run(&mut ctx);
    ctx.flush();
    result.map_err(|e| e.0)
}
