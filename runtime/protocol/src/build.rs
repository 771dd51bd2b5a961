//! How a step's result affects its build, with Buildbot's step options (`haltOnFailure`,
//! `flunkOnFailure`, `warnOnFailure`, `flunkOnWarnings`, `warnOnWarnings`, `alwaysRun`,
//! `doStepIf`, `hideStepIf`), and what a build's steps produced: shared by the runtime that
//! applies them, the configuration that names them and the protocol that carries them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::outcome::{Outcome, StepOutcome};
use crate::props::{Properties, interpolate};
/// How a step's result affects its build, with Buildbot's names and meanings. The defaults
/// suit ordinary steps: a failure fails the build (and later steps still run), warnings make
/// it WARNINGS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StepOptions {
    /// On FAILURE, run no further steps (except those with `always_run`).
    pub halt_on_failure: bool,
    /// On FAILURE, the build fails.
    pub flunk_on_failure: bool,
    /// On FAILURE, the build is at least WARNINGS (for steps whose failure is not fatal).
    pub warn_on_failure: bool,
    /// On WARNINGS, the build fails.
    pub flunk_on_warnings: bool,
    /// On WARNINGS, the build is at least WARNINGS.
    pub warn_on_warnings: bool,
    /// Run even after an earlier step halted the build.
    pub always_run: bool,
    /// Run only if this condition holds; otherwise the step is SKIPPED.
    pub do_step_if: Option<Condition>,
    /// Hide the step in the UI: `true`, a list of results ("SKIPPED", "SUCCESS"), or a
    /// condition on properties.
    pub hide_step_if: Option<HideIf>,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            halt_on_failure: false,
            flunk_on_failure: true,
            warn_on_failure: false,
            flunk_on_warnings: false,
            warn_on_warnings: true,
            always_run: false,
            do_step_if: None,
            hide_step_if: None,
        }
    }
}

/// A condition on the build's properties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a condition: true/false, a string such as \"%(prop:deploy:-)s\", {\"property\": NAME, \"equals\": V}, \
                 {\"property\": NAME, \"in\": [..]}, {\"property\": NAME, \"exists\": true}, {\"not\": C}, {\"all\": [..]} or {\"any\": [..]}"
)]
pub enum Condition {
    /// Always or never.
    Bool(bool),
    /// A string interpolated with `%(prop:...)s`; true unless empty, "0", "false" or "no".
    Rendered(String),
    /// A test of one property.
    Property(PropertyTest),
    /// The negation of a condition.
    Not {
        /// The condition negated.
        not: Box<Condition>,
    },
    /// All conditions hold.
    All {
        /// The conditions.
        all: Vec<Condition>,
    },
    /// At least one condition holds.
    Any {
        /// The conditions.
        any: Vec<Condition>,
    },
}

/// A test of one property: exactly one of `equals`, `in`, `exists`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyTest {
    /// The property.
    pub property: String,
    /// Holds if the property equals this value.
    #[serde(default)]
    pub equals: Option<Value>,
    /// Holds if the property equals one of these values.
    #[serde(default, rename = "in")]
    pub one_of: Option<Vec<Value>>,
    /// Holds if the property is set (`true`) or unset (`false`).
    #[serde(default)]
    pub exists: Option<bool>,
}

/// When to hide a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HideIf {
    /// When the step ended with one of these results.
    Results(Vec<Outcome>),
    /// When the condition holds (evaluated after the step).
    Condition(Condition),
}

impl Condition {
    /// Evaluates the condition against the build's properties.
    pub fn holds(&self, props: &Properties) -> Result<bool, String> {
        Ok(match self {
            Condition::Bool(b) => *b,
            Condition::Rendered(text) => {
                let rendered =
                    interpolate(&Value::String(text.clone()), props, &Default::default())
                        .map_err(|e| e.to_string())?;
                let s = rendered
                    .as_str()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase();
                !matches!(s.as_str(), "" | "0" | "false" | "no")
            }
            Condition::Property(t) => {
                let value = props.get(&t.property);
                match (&t.equals, &t.one_of, t.exists) {
                    (Some(v), None, None) => value == Some(v),
                    (None, Some(vs), None) => value.is_some_and(|v| vs.contains(v)),
                    (None, None, Some(e)) => value.is_some() == e,
                    _ => {
                        return Err(format!(
                            "the condition on property {:?} needs exactly one of \"equals\", \"in\" and \"exists\"",
                            t.property
                        ));
                    }
                }
            }
            Condition::Not { not } => !not.holds(props)?,
            Condition::All { all } => {
                for c in all {
                    if !c.holds(props)? {
                        return Ok(false);
                    }
                }
                true
            }
            Condition::Any { any } => {
                for c in any {
                    if c.holds(props)? {
                        return Ok(true);
                    }
                }
                false
            }
        })
    }
}

/// What happened to one step of a build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step's name.
    pub name: String,
    /// Whether it ran (a skipped or halted-over step did not).
    pub ran: bool,
    /// Whether the UI should hide it.
    pub hidden: bool,
    /// Its outcome; for a step that did not run, SKIPPED with the reason as summary.
    pub outcome: StepOutcome,
}

/// What a build produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildOutcome {
    /// The build's result.
    pub result: Outcome,
    /// Each step, in order.
    pub steps: Vec<StepRecord>,
    /// The properties at the end of the build.
    pub properties: Properties,
}
