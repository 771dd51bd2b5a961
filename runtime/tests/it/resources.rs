//! What a step used: CPU time and peak memory of its commands, and its guests' linear memory.

use std::sync::Arc;

use runtime::{Confinement, Outcome};
use serde_json::json;

use crate::harness::{Farm, counter, helper};

/// Holds 64 MiB in the shell (a string read from a pipe) while it counts to 200,000, then says
/// how long the string was.
const BURN: &str = "x=$(head -c 67108864 /dev/zero | tr '\\0' a); \
                    i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo ${#x}";

#[test]
fn a_step_reports_what_its_commands_used() {
    let mut farm = Farm::new();
    farm.allow(&["sh"]);
    let (out, rec) = farm.run(json!({"action": "run", "argv": ["sh", "-c", BURN]}));
    assert_eq!(out.result, Outcome::Success, "{}", rec.all("stdio"));
    assert!(rec.all("stdio").contains("67108864\n"));
    let r = out.resources.expect("the step ran");
    assert_eq!(r.commands, 1);
    // Counting in the shell alone takes about 0.2 s of CPU on a fast machine.
    assert!(r.cpu_ms >= 50, "{r:?}");
    // The shell held the 64 MiB string (and read it through a buffer as large again).
    let rss = r.peak_rss_bytes.expect("a command ran");
    assert!(rss >= 64 << 20, "{r:?}");
    assert!(rss < 1 << 30, "{r:?}");
    assert!(r.guest_memory_bytes > 0, "{r:?}");
    assert_eq!(r.observer_memory_bytes, None);
}

#[test]
fn confined_commands_are_measured_too() {
    // The helper execs the command in the process the worker spawned, so the figures are the
    // command's (plus the helper's moment before its exec).
    let mut farm = Farm::new();
    farm.grant.confinement = Some(Arc::new(
        Confinement::probe(helper()).expect("this kernel confines (Landlock ABI 4+)"),
    ));
    farm.allow(&["sh"]);
    let (out, rec) = farm.run(json!({"action": "run", "argv": ["sh", "-c", BURN]}));
    assert_eq!(out.result, Outcome::Success, "{}", rec.all("stdio"));
    let r = out.resources.unwrap();
    assert!(r.cpu_ms >= 50, "{r:?}");
    assert!(r.peak_rss_bytes.unwrap() >= 64 << 20, "{r:?}");
}

#[test]
fn a_command_is_not_charged_with_the_workers_memory() {
    // Linux charges a spawned child with its spawner's peak memory; a worker that once held
    // 256 MiB must not see every command after that use 256 MiB.
    let held = vec![1u8; 256 << 20];
    let mut farm = Farm::new();
    farm.allow(&["true", "sh"]);
    let (out, rec) = farm.run(json!({"action": "run", "argv": ["true"]}));
    assert_eq!(out.result, Outcome::Success, "{}", rec.all("stdio"));
    let r = out.resources.unwrap();
    assert_eq!(r.commands, 1);
    // Too brief to be sampled, and below the worker's peak: not measured, rather than wrong.
    assert!(r.peak_rss_bytes.is_none_or(|b| b < 64 << 20), "{r:?}");

    // Below the worker's peak, a command's own memory is still seen while it runs.
    let hold = "x=$(head -c 67108864 /dev/zero | tr '\\0' a); sleep 0.5; echo ${#x}";
    let (out, rec) = farm.run(json!({"action": "run", "argv": ["sh", "-c", hold]}));
    std::hint::black_box(&held);
    assert_eq!(out.result, Outcome::Success, "{}", rec.all("stdio"));
    assert!(rec.all("stdio").contains("67108864\n"));
    let r = out.resources.unwrap();
    assert!(r.peak_rss_bytes.unwrap() >= 64 << 20, "{r:?}");
    assert!(r.peak_rss_bytes.unwrap() < 256 << 20, "{r:?}");
}

#[test]
fn a_step_without_commands_reports_its_guests_memory() {
    let mut farm = Farm::new();
    farm.observe(counter(), "count", json!({}));
    let (out, _) = farm.run(json!({"action": "ok"}));
    let r = out.resources.unwrap();
    assert_eq!((r.commands, r.cpu_ms, r.peak_rss_bytes), (0, 0, None));
    assert!(r.guest_memory_bytes >= 64 << 10, "{r:?}");
    assert!(r.observer_memory_bytes.unwrap() >= 64 << 10, "{r:?}");
}

#[test]
fn guest_memory_is_the_peak_the_limit_allowed() {
    let mut farm = Farm::new();
    farm.grant.limits.memory_bytes = 64 << 20;
    let (out, _) = farm.run(json!({"action": "alloc"}));
    assert_eq!(out.result, Outcome::Exception);
    let r = out.resources.unwrap();
    // The refused growth is not counted; the last allowed one is.
    assert!(r.guest_memory_bytes <= 64 << 20, "{r:?}");
    assert!(r.guest_memory_bytes > 48 << 20, "{r:?}");
}

#[test]
fn a_step_that_never_ran_reports_nothing() {
    let farm = Farm::new();
    let (out, _) = farm.run(json!({"action": "echo-args", "text": "%(prop:missing)s"}));
    assert_eq!(out.result, Outcome::Exception);
    assert_eq!(out.resources, None);
}
