//! A build: a builder's steps run in order on one workdir, with Buildbot's standard step
//! options deciding how each step's result affects the build (`haltOnFailure`,
//! `flunkOnFailure`, `warnOnFailure`, `flunkOnWarnings`, `warnOnWarnings`, `alwaysRun`,
//! `doStepIf`, `hideStepIf`), and the properties each step sets passed to the next.

use std::sync::Arc;

use serde_json::Value;

pub use kiln_protocol::build::{
    BuildOutcome, Condition, HideIf, PropertyTest, StepOptions, StepRecord,
};
use kiln_protocol::{Outcome, Properties, StepOutcome};

use crate::engine::{Runtime, StepComponent};
use crate::grant::Grant;
use crate::logs::StepEvents;
use crate::run::{CancelToken, ObserverSpec, StepRun};

/// One step of a build.
#[derive(Clone)]
pub struct BuildStep {
    /// Its name in the build ("checkout", "compile").
    pub name: String,
    /// The component.
    pub step: StepComponent,
    /// Its arguments, before interpolation.
    pub args: Value,
    /// Observers of its logs.
    pub observers: Vec<ObserverSpec>,
    /// How its result affects the build.
    pub options: StepOptions,
    /// Its own wall-clock limit; `None` keeps the grant's.
    pub deadline: Option<std::time::Duration>,
}

/// Follows a build as it runs: gives each step its event sink and cancel token, and hears
/// each step's end. A closure `Fn(step index, step name) -> Arc<dyn StepEvents>` is the
/// simplest progress (it only gives sinks).
pub trait BuildProgress {
    /// Step `index` named `name` starts: its event sink.
    fn step_started(&self, index: usize, name: &str) -> Arc<dyn StepEvents>;

    /// The token that stops step `index`. The default is the build's; a worker gives each
    /// step its own so the master can stop one step (it must also stop when `build` does).
    fn step_cancel(&self, index: usize, build: &CancelToken) -> CancelToken {
        let _ = index;
        build.clone()
    }

    /// Step `index` ended (ran, or was skipped).
    fn step_finished(&self, index: usize, record: &StepRecord) {
        let _ = (index, record);
    }
}

impl<F: Fn(usize, &str) -> Arc<dyn StepEvents>> BuildProgress for F {
    fn step_started(&self, index: usize, name: &str) -> Arc<dyn StepEvents> {
        self(index, name)
    }
}

impl Runtime {
    /// Runs a build's steps in order on one grant, applying the step options as Buildbot does.
    pub fn run_build(
        &self,
        steps: &[BuildStep],
        mut properties: Properties,
        grant: &Grant,
        progress: &dyn BuildProgress,
        cancel: &CancelToken,
    ) -> BuildOutcome {
        let mut result = Outcome::Success;
        let mut halted = false;
        let mut records = Vec::with_capacity(steps.len());
        for (i, s) in steps.iter().enumerate() {
            let span = tracing::info_span!("build_step", step = %s.name, index = i);
            let _enter = span.enter();
            let not_run = |why: String| StepRecord {
                name: s.name.clone(),
                ran: false,
                hidden: false,
                outcome: skipped(why),
            };
            if cancel.is_cancelled() {
                finish(
                    &mut records,
                    progress,
                    not_run("not run: the build was cancelled".into()),
                );
                continue;
            }
            if halted && !s.options.always_run {
                finish(
                    &mut records,
                    progress,
                    not_run("not run: an earlier step halted the build".into()),
                );
                continue;
            }
            match s.options.do_step_if.as_ref().map(|c| c.holds(&properties)) {
                Some(Ok(false)) => {
                    let mut record = not_run("skipped: its condition is false".into());
                    record.hidden = hidden(&s.options, &record.outcome, &properties);
                    finish(&mut records, progress, record);
                    continue;
                }
                Some(Err(e)) => {
                    let mut outcome = skipped(String::new());
                    outcome.result = Outcome::Exception;
                    outcome.summary = Some(format!("do_step_if: {e}"));
                    outcome.message = outcome.summary.clone();
                    result = result.worst(Outcome::Exception);
                    halted = true;
                    finish(
                        &mut records,
                        progress,
                        StepRecord {
                            name: s.name.clone(),
                            ran: false,
                            hidden: false,
                            outcome,
                        },
                    );
                    continue;
                }
                _ => {}
            }
            let own_grant;
            let step_grant = match s.deadline {
                Some(deadline) => {
                    let mut g = grant.clone();
                    g.limits.deadline = deadline;
                    own_grant = g;
                    &own_grant
                }
                None => grant,
            };
            let outcome = self.run_step(StepRun {
                step: &s.step,
                args: &s.args,
                properties: &properties,
                observers: &s.observers,
                grant: step_grant,
                events: progress.step_started(i, &s.name),
                cancel: progress.step_cancel(i, cancel),
            });
            for (name, value) in &outcome.properties {
                properties.set(name.clone(), value.clone(), format!("Step {}", s.name));
            }
            let o = &s.options;
            match outcome.result {
                Outcome::Failure => {
                    if o.warn_on_failure {
                        result = result.worst(Outcome::Warnings);
                    }
                    if o.flunk_on_failure {
                        result = result.worst(Outcome::Failure);
                    }
                    halted |= o.halt_on_failure;
                }
                Outcome::Warnings => {
                    if o.warn_on_warnings {
                        result = result.worst(Outcome::Warnings);
                    }
                    if o.flunk_on_warnings {
                        result = result.worst(Outcome::Failure);
                    }
                }
                Outcome::Exception | Outcome::Retry | Outcome::Cancelled => {
                    result = result.worst(outcome.result);
                    halted = true;
                }
                Outcome::Success | Outcome::Skipped => {}
            }
            let hidden = hidden(o, &outcome, &properties);
            finish(
                &mut records,
                progress,
                StepRecord {
                    name: s.name.clone(),
                    ran: true,
                    hidden,
                    outcome,
                },
            );
        }
        BuildOutcome {
            result,
            steps: records,
            properties,
        }
    }
}

/// Records a step's end and tells `progress`.
fn finish(records: &mut Vec<StepRecord>, progress: &dyn BuildProgress, record: StepRecord) {
    progress.step_finished(records.len(), &record);
    records.push(record);
}

fn skipped(why: String) -> StepOutcome {
    StepOutcome {
        result: Outcome::Skipped,
        summary: (!why.is_empty()).then_some(why),
        message: None,
        properties: Default::default(),
        statistics: Default::default(),
        progress: Default::default(),
        urls: Vec::new(),
        logs: Default::default(),
        elapsed: Default::default(),
        resources: None,
    }
}

fn hidden(options: &StepOptions, outcome: &StepOutcome, props: &Properties) -> bool {
    match &options.hide_step_if {
        None => false,
        Some(HideIf::Results(results)) => results.contains(&outcome.result),
        // A condition that cannot be evaluated shows the step rather than hide a problem.
        Some(HideIf::Condition(c)) => c.holds(props).unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn props() -> Properties {
        let mut p = Properties::new();
        p.set("branch", json!("main"), "Change");
        p.set("deploy", json!("yes"), "Force");
        p.set("empty", json!(""), "Force");
        p
    }

    fn holds(c: Value) -> Result<bool, String> {
        let c: Condition = serde_json::from_value(c).map_err(|e| e.to_string())?;
        c.holds(&props())
    }

    #[test]
    fn conditions() {
        assert_eq!(holds(json!(true)), Ok(true));
        assert_eq!(holds(json!("%(prop:deploy)s")), Ok(true));
        assert_eq!(holds(json!("%(prop:empty)s")), Ok(false));
        assert_eq!(holds(json!("%(prop:nope:-false)s")), Ok(false));
        assert_eq!(
            holds(json!({"property": "branch", "equals": "main"})),
            Ok(true)
        );
        assert_eq!(
            holds(json!({"property": "branch", "in": ["dev", "release"]})),
            Ok(false)
        );
        assert_eq!(
            holds(json!({"property": "nope", "exists": false})),
            Ok(true)
        );
        assert_eq!(
            holds(json!({"not": {"property": "branch", "equals": "main"}})),
            Ok(false)
        );
        assert_eq!(
            holds(json!({"all": [true, {"property": "deploy", "exists": true}]})),
            Ok(true)
        );
        assert_eq!(holds(json!({"any": [false, "%(prop:empty)s"]})), Ok(false));
        assert_eq!(
            holds(json!({"property": "branch"})),
            Err("the condition on property \"branch\" needs exactly one of \"equals\", \"in\" and \"exists\"".into())
        );
        assert!(
            holds(json!("%(prop:nope)s"))
                .unwrap_err()
                .contains("not set")
        );
        assert!(
            holds(json!(3))
                .unwrap_err()
                .starts_with("a condition: true/false")
        );
    }

    #[test]
    fn options_parse_with_defaults_and_refuse_typos() {
        let o: StepOptions =
            serde_json::from_value(json!({"halt_on_failure": true, "hide_step_if": ["SKIPPED"]}))
                .unwrap();
        assert!(o.halt_on_failure && o.flunk_on_failure && o.warn_on_warnings && !o.always_run);
        assert_eq!(
            o.hide_step_if,
            Some(HideIf::Results(vec![Outcome::Skipped]))
        );
        let err =
            serde_json::from_value::<StepOptions>(json!({"halt_on_failur": true})).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("unknown field `halt_on_failur`")
        );
    }
}
