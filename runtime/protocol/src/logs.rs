//! Logs as the protocol carries them: a line's channel, what a step or observer reports while it
//! runs, and the limits a grant sets on logs.

use serde::{Deserialize, Serialize};

use crate::outcome::Url;

/// The channel of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// Ordinary output.
    Stdout,
    /// Error output.
    Stderr,
    /// Kiln's own lines about the step.
    Header,
}

/// Something a step or observer reported, streamed live to the [`StepEvents`] sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ReportEvent {
    /// A progress metric moved.
    Progress {
        /// The metric.
        metric: String,
        /// Its value.
        value: u64,
    },
    /// A statistic changed.
    Statistic {
        /// The statistic.
        name: String,
        /// Its new value.
        value: f64,
    },
    /// A property was set.
    Property {
        /// The property.
        name: String,
        /// Its value.
        value: serde_json::Value,
    },
    /// A link was added.
    Url(Url),
    /// The summary changed.
    Summary {
        /// The new summary.
        text: String,
    },
}

/// Limits on logs, from the grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLimits {
    /// Longest line kept whole, in bytes; longer lines are split.
    pub max_line_bytes: usize,
    /// Largest log, in bytes; output past it is dropped with a marker line.
    pub max_log_bytes: u64,
    /// Most distinct logs one step may create.
    pub max_logs: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            max_line_bytes: 64 * 1024,
            max_log_bytes: 64 * 1024 * 1024,
            max_logs: 64,
        }
    }
}
