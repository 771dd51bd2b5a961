//! Builds: steps in order, Buildbot's step options, properties flowing between steps.

use std::sync::Arc;

use runtime::{BuildStep, CancelToken, Outcome, Properties, StepEvents};
use serde_json::{Value, json};

use crate::harness::{Farm, Recorder, probe, runtime};

fn step(name: &str, args: Value, options: Value) -> BuildStep {
    BuildStep {
        name: name.into(),
        step: probe(),
        args,
        observers: Vec::new(),
        options: serde_json::from_value(options).unwrap(),
        deadline: None,
    }
}

fn build(farm: &Farm, steps: &[BuildStep], props: Properties) -> runtime::BuildOutcome {
    let events = |_: usize, _: &str| -> Arc<dyn StepEvents> { Arc::new(Recorder::default()) };
    runtime().run_build(steps, props, &farm.grant, &events, &CancelToken::new())
}

fn results(b: &runtime::BuildOutcome) -> Vec<(String, bool, Outcome)> {
    b.steps
        .iter()
        .map(|s| (s.name.clone(), s.ran, s.outcome.result))
        .collect()
}

fn fail() -> Value {
    json!({"action": "fail", "message": "broken"})
}

fn ok() -> Value {
    json!({"action": "ok"})
}

#[test]
fn properties_flow_from_step_to_step() {
    let farm = Farm::new();
    let steps = [
        step(
            "checkout",
            json!({"action": "set-prop", "name": "got_revision", "value": "abc"}),
            json!({}),
        ),
        step(
            "report",
            json!({"action": "echo-args", "text": "built %(prop:got_revision)s"}),
            json!({}),
        ),
    ];
    let b = build(&farm, &steps, Properties::new());
    assert_eq!(b.result, Outcome::Success);
    assert_eq!(b.steps[1].outcome.summary.as_deref(), Some("built abc"));
    assert_eq!(
        b.properties.get_property("got_revision").unwrap().source,
        "Step checkout"
    );
}

#[test]
fn halt_on_failure_stops_the_build_but_always_run_steps_still_run() {
    let farm = Farm::new();
    let steps = [
        step("compile", fail(), json!({"halt_on_failure": true})),
        step("test", ok(), json!({})),
        step("cleanup", ok(), json!({"always_run": true})),
    ];
    let b = build(&farm, &steps, Properties::new());
    assert_eq!(b.result, Outcome::Failure);
    assert_eq!(
        results(&b),
        [
            ("compile".into(), true, Outcome::Failure),
            ("test".into(), false, Outcome::Skipped),
            ("cleanup".into(), true, Outcome::Success)
        ]
    );
    assert_eq!(
        b.steps[1].outcome.summary.as_deref(),
        Some("not run: an earlier step halted the build")
    );
}

#[test]
fn without_halt_later_steps_run_and_flunk_decides_the_result() {
    let farm = Farm::new();
    let b = build(
        &farm,
        &[
            step("lint", fail(), json!({})),
            step("test", ok(), json!({})),
        ],
        Properties::new(),
    );
    assert_eq!((b.result, b.steps[1].ran), (Outcome::Failure, true));

    let b = build(
        &farm,
        &[step("lint", fail(), json!({"flunk_on_failure": false}))],
        Properties::new(),
    );
    assert_eq!(b.result, Outcome::Success);
    let b = build(
        &farm,
        &[step(
            "lint",
            fail(),
            json!({"flunk_on_failure": false, "warn_on_failure": true}),
        )],
        Properties::new(),
    );
    assert_eq!(b.result, Outcome::Warnings);

    let warn = json!({"action": "outcome", "outcome": "warnings"});
    assert_eq!(
        build(
            &farm,
            &[step("w", warn.clone(), json!({}))],
            Properties::new()
        )
        .result,
        Outcome::Warnings
    );
    assert_eq!(
        build(
            &farm,
            &[step("w", warn.clone(), json!({"warn_on_warnings": false}))],
            Properties::new()
        )
        .result,
        Outcome::Success
    );
    assert_eq!(
        build(
            &farm,
            &[step("w", warn, json!({"flunk_on_warnings": true}))],
            Properties::new()
        )
        .result,
        Outcome::Failure
    );
}

#[test]
fn an_exception_ends_the_build() {
    let farm = Farm::new();
    let b = build(
        &farm,
        &[
            step("crash", json!({"action": "panic"}), json!({})),
            step("next", ok(), json!({})),
        ],
        Properties::new(),
    );
    assert_eq!(b.result, Outcome::Exception);
    assert!(!b.steps[1].ran);
}

#[test]
fn do_step_if_and_hide_step_if() {
    let farm = Farm::new();
    let mut props = Properties::new();
    props.set("branch", json!("feature"), "Change");
    let steps = [
        step(
            "deploy",
            ok(),
            json!({"do_step_if": {"property": "branch", "equals": "main"}, "hide_step_if": ["SKIPPED"]}),
        ),
        step("docs", ok(), json!({"do_step_if": "%(prop:branch)s"})),
        step("quiet", ok(), json!({"hide_step_if": true})),
        step(
            "broken",
            ok(),
            json!({"do_step_if": {"property": "branch"}}),
        ),
    ];
    let b = build(&farm, &steps, props);
    let shown: Vec<(bool, Outcome, bool)> = b
        .steps
        .iter()
        .map(|s| (s.ran, s.outcome.result, s.hidden))
        .collect();
    assert_eq!(
        shown,
        [
            (false, Outcome::Skipped, true),
            (true, Outcome::Success, false),
            (true, Outcome::Success, true),
            (false, Outcome::Exception, false)
        ]
    );
    assert_eq!(
        b.steps[0].outcome.summary.as_deref(),
        Some("skipped: its condition is false")
    );
    assert_eq!(
        b.steps[3].outcome.summary.as_deref(),
        Some(
            "do_step_if: the condition on property \"branch\" needs exactly one of \"equals\", \"in\" and \"exists\""
        )
    );
    assert_eq!(b.result, Outcome::Exception);
}

#[test]
fn each_step_can_have_its_own_deadline() {
    let farm = Farm::new();
    let mut looping = step("spin", json!({"action": "loop"}), json!({}));
    looping.deadline = Some(std::time::Duration::from_millis(300));
    let after = step("after", json!({"action": "ok"}), json!({}));
    let started = std::time::Instant::now();
    let b = build(&farm, &[looping, after], Properties::new());
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(b.steps[0].outcome.result, Outcome::Exception);
    assert_eq!(
        b.steps[0].outcome.summary.as_deref(),
        Some("the step's deadline of 300 ms passed")
    );
    // An EXCEPTION halts the build; the next step is not run.
    assert!(!b.steps[1].ran);
}
