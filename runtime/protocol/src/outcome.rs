//! What a step run produces: its result, and everything it reported.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The result of a step, with Buildbot's names and codes 0 to 6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    /// The step did what it was asked.
    Success,
    /// It succeeded, but something deserves a look.
    Warnings,
    /// The step failed (a command failed, or the step reported its own error).
    Failure,
    /// The step did not run.
    Skipped,
    /// Something outside the step went wrong: a trap, a limit, a host fault.
    Exception,
    /// A transient failure: run it again.
    Retry,
    /// Stopped on request.
    Cancelled,
}

impl Outcome {
    /// Every outcome, in code order.
    pub const ALL: [Outcome; 7] = [
        Outcome::Success,
        Outcome::Warnings,
        Outcome::Failure,
        Outcome::Skipped,
        Outcome::Exception,
        Outcome::Retry,
        Outcome::Cancelled,
    ];

    /// Buildbot's numeric code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The upper-case name, as Buildbot shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "SUCCESS",
            Outcome::Warnings => "WARNINGS",
            Outcome::Failure => "FAILURE",
            Outcome::Skipped => "SKIPPED",
            Outcome::Exception => "EXCEPTION",
            Outcome::Retry => "RETRY",
            Outcome::Cancelled => "CANCELLED",
        }
    }

    /// True for the results that count as a passing step (SUCCESS and WARNINGS).
    pub fn is_ok(self) -> bool {
        matches!(self, Outcome::Success | Outcome::Warnings)
    }

    /// The worse of two outcomes, by Buildbot's `worst_status` order:
    /// SKIPPED < SUCCESS < WARNINGS < FAILURE < EXCEPTION < RETRY < CANCELLED.
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

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A link a step reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Url {
    /// What the link is.
    pub name: String,
    /// Where it points.
    pub url: String,
}

/// How much a log received, and how much of it was kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogStats {
    /// Lines kept.
    pub lines: u64,
    /// Bytes kept.
    pub bytes: u64,
    /// Bytes dropped past the log-size cap.
    pub dropped_bytes: u64,
}

/// What a step run used, as its worker measured it. Commands count with the descendants they
/// waited for; what they left running is killed with their process group, uncounted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepResources {
    /// Commands the step ran to their end.
    pub commands: u32,
    /// CPU time (user plus system) of those commands, in milliseconds.
    pub cpu_ms: u64,
    /// Peak resident memory of the largest of those commands, in bytes (`None`: no command
    /// ran, or none could be measured). Exact when it is above the worker's own peak; below
    /// that, Linux's figure may be the worker's (a spawned child inherits its spawner's peak),
    /// so it is the command's own peak as sampled while it ran: a lower bound that misses its
    /// children, and none for a command that ended before its first sample (50 ms).
    pub peak_rss_bytes: Option<u64>,
    /// The most linear memory the step's guest held at once, in bytes.
    pub guest_memory_bytes: u64,
    /// The same for the largest of its observers, in bytes (`None`: no observers). Kept apart
    /// from the step's because the memory limit applies to each guest on its own.
    pub observer_memory_bytes: Option<u64>,
}

/// Everything a step run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepOutcome {
    /// The step's result, after observers' verdicts.
    pub result: Outcome,
    /// The status summary ("3 warnings"), from the step, else the last observer that set one.
    pub summary: Option<String>,
    /// For EXCEPTION (and a step's own error), the message naming the cause.
    pub message: Option<String>,
    /// Properties the step and its observers set, in the order they were set (last wins).
    pub properties: BTreeMap<String, serde_json::Value>,
    /// Statistics ("warnings", "tests_failed", ...).
    pub statistics: BTreeMap<String, f64>,
    /// Progress metrics, at their last value.
    pub progress: BTreeMap<String, u64>,
    /// Links.
    pub urls: Vec<Url>,
    /// Per log: lines and bytes kept and dropped.
    pub logs: BTreeMap<String, LogStats>,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
    /// What the run used (`None`: the step's guest never ran, or an older worker did not say).
    #[serde(default)]
    pub resources: Option<StepResources>,
}

impl StepOutcome {
    pub fn exception(message: String, elapsed: Duration) -> Self {
        StepOutcome {
            result: Outcome::Exception,
            summary: None,
            message: Some(message),
            properties: BTreeMap::new(),
            statistics: BTreeMap::new(),
            progress: BTreeMap::new(),
            urls: Vec::new(),
            logs: BTreeMap::new(),
            elapsed,
            resources: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_follows_buildbot_order() {
        assert_eq!(Outcome::Success.worst(Outcome::Warnings), Outcome::Warnings);
        assert_eq!(Outcome::Skipped.worst(Outcome::Success), Outcome::Success);
        assert_eq!(Outcome::Failure.worst(Outcome::Warnings), Outcome::Failure);
        assert_eq!(
            Outcome::Exception.worst(Outcome::Failure),
            Outcome::Exception
        );
        assert_eq!(Outcome::Retry.worst(Outcome::Cancelled), Outcome::Cancelled);
        for (code, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(usize::from(o.code()), code);
        }
    }
}
