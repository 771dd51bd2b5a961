//! Limits: deadline, memory, cancellation, traps, host-call sizes.

use std::time::Duration;

use runtime::{Channel, Outcome};
use serde_json::json;

use crate::harness::Farm;

#[test]
fn an_infinite_loop_hits_the_deadline() {
    let mut farm = Farm::new();
    farm.grant.limits.deadline = Duration::from_millis(300);
    let (out, rec) = farm.run(json!({"action": "loop"}));
    assert_eq!(out.result, Outcome::Exception);
    assert_eq!(
        out.message.as_deref(),
        Some("the step's deadline of 300 ms passed")
    );
    assert!(out.elapsed < Duration::from_secs(5), "{:?}", out.elapsed);
    assert_eq!(
        rec.all("stdio"),
        "kiln: EXCEPTION: the step's deadline of 300 ms passed\n"
    );
}

#[test]
fn the_deadline_also_bounds_commands() {
    let mut farm = Farm::new();
    farm.allow(&["sleep"]);
    farm.grant.limits.deadline = Duration::from_millis(400);
    let (out, rec) = farm.run(json!({"action": "run", "argv": ["sleep", "30"]}));
    assert_eq!(out.result, Outcome::Exception, "{}", rec.all("stdio"));
    assert_eq!(
        out.message.as_deref(),
        Some("the step's deadline of 400 ms passed")
    );
    assert!(out.elapsed < Duration::from_secs(5));
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    let mut farm = Farm::new();
    farm.grant.limits.memory_bytes = 64 << 20;
    let (out, _) = farm.run(json!({"action": "alloc"}));
    assert_eq!(out.result, Outcome::Exception);
    let message = out.message.unwrap();
    assert!(
        message.starts_with("the memory limit of 64 MiB was exceeded (the guest asked for "),
        "{message}"
    );
}

#[test]
fn cancelling_stops_a_running_step() {
    let farm = Farm::new();
    let cancel = farm.cancel.clone();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        cancel.cancel();
    });
    let (out, _) = farm.run(json!({"action": "loop"}));
    stopper.join().unwrap();
    assert_eq!(out.result, Outcome::Cancelled);
    assert_eq!(out.message.as_deref(), Some("the step was cancelled"));
}

#[test]
fn cancelling_kills_a_running_command() {
    let mut farm = Farm::new();
    farm.allow(&["sleep"]);
    let cancel = farm.cancel.clone();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        cancel.cancel();
    });
    let (out, rec) = farm.run(json!({"action": "run", "argv": ["sleep", "30"]}));
    stopper.join().unwrap();
    assert_eq!(out.result, Outcome::Cancelled);
    assert!(out.elapsed < Duration::from_secs(5));
    assert!(
        rec.text("stdio", Channel::Header)
            .contains("cancelled after ")
    );
}

#[test]
fn a_panic_is_an_exception_with_the_panic_in_the_log() {
    let farm = Farm::new();
    let (out, rec) = farm.run(json!({"action": "panic"}));
    assert_eq!(out.result, Outcome::Exception);
    assert_eq!(
        out.message.as_deref(),
        Some("the guest trapped: wasm trap: wasm `unreachable` instruction executed")
    );
    assert!(
        rec.text("stdio", Channel::Stderr)
            .contains("the probe panicked on purpose"),
        "{}",
        rec.all("stdio")
    );
}

#[test]
fn the_steps_own_error_is_a_failure() {
    let farm = Farm::new();
    let (out, rec) = farm.run(json!({"action": "fail", "message": "tests did not compile"}));
    assert_eq!(out.result, Outcome::Failure);
    assert_eq!(out.message.as_deref(), Some("tests did not compile"));
    assert_eq!(out.summary.as_deref(), Some("tests did not compile"));
    assert_eq!(rec.all("stdio"), "step failed: tests did not compile\n");
}

#[test]
fn bad_arguments_fail_with_the_reason() {
    let farm = Farm::new();
    let (out, _) = farm.run(json!({"action": "no-such-action"}));
    assert_eq!(out.result, Outcome::Failure);
    assert!(
        out.message
            .unwrap()
            .starts_with("bad step arguments: unknown variant `no-such-action`")
    );
}

#[test]
fn interpolation_errors_are_exceptions_before_the_step_runs() {
    let farm = Farm::new();
    let (out, rec) = farm.run(json!({"action": "echo-args", "text": "%(prop:branch)s"}));
    assert_eq!(out.result, Outcome::Exception);
    let expected = "step arguments use property \"branch\", which is not set (write %(prop:branch:-default)s to give a default)";
    assert_eq!(out.message.as_deref(), Some(expected));
    assert_eq!(rec.all("stdio"), format!("kiln: {expected}\n"));
}

#[test]
fn every_outcome_a_step_returns_is_kept() {
    let farm = Farm::new();
    for (name, expected) in [
        ("success", Outcome::Success),
        ("warnings", Outcome::Warnings),
        ("skipped", Outcome::Skipped),
        ("retry", Outcome::Retry),
    ] {
        let (out, _) = farm.run(json!({"action": "outcome", "outcome": name}));
        assert_eq!(out.result, expected);
    }
}

#[test]
fn a_missing_workdir_is_an_exception() {
    let mut farm = Farm::new();
    farm.grant.workdir = farm.path("nope");
    let (out, _) = farm.run(json!({"action": "ok"}));
    assert_eq!(out.result, Outcome::Exception);
    assert!(
        out.message
            .unwrap()
            .starts_with(&format!("workdir {}: ", farm.path("nope").display()))
    );
}
