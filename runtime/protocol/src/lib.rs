//! The vocabulary Kiln's parts share, and nothing else: serde types and pure rules.
//!
//! [`messages`] is every message a master and a worker exchange (the one place they are
//! defined, versioned by [`PROTOCOL_VERSION`]), with the [`Job`] a worker runs. [`outcome`],
//! [`build`], [`logs`] and [`props`] are what those messages carry: results and outcomes, step
//! options and records, log channels and reports, properties. [`names`] holds the rules for
//! names; [`api`] what the API's clients and server share (roles, tokens, request bodies).
//!
//! It depends on serde alone, so a worker, a client or a tool can speak to a master without
//! linking wasmtime, tokio or a database.

pub mod api;
pub mod build;
pub mod logs;
pub mod messages;
pub mod names;
pub mod outcome;
pub mod props;

pub use build::{BuildOutcome, Condition, HideIf, PropertyTest, StepOptions, StepRecord};
pub use logs::{Channel, LogLimits, ReportEvent};
pub use messages::*;
pub use names::check_name;
pub use outcome::{LogStats, Outcome, StepOutcome, StepResources, Url};
pub use props::{InterpolateError, Properties, Property, check_property_name, interpolate};
