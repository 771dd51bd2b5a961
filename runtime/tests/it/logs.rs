//! Logs and observers: floods, long lines, invalid UTF-8, secrets, observer counts.

use runtime::{Channel, Outcome};
use serde_json::json;

use crate::harness::{Farm, counter};

#[test]
fn a_flood_of_output_is_capped_with_a_visible_marker() {
    let mut farm = Farm::new();
    farm.grant.limits.logs.max_log_bytes = 1 << 20;
    let (out, rec) = farm.run(json!({"action": "flood", "count": 200_000, "width": 99}));
    assert_eq!(out.result, Outcome::Success);
    let stats = &out.logs["stdio"];
    assert_eq!(
        stats.bytes, 1_048_500,
        "whole 100-byte lines up to the 1 MiB cap"
    );
    assert_eq!(stats.lines, 10_485);
    assert_eq!(stats.dropped_bytes, 20_000_000 - 1_048_500);
    assert_eq!(
        rec.text("stdio", Channel::Header),
        "kiln: log \"stdio\" reached its cap of 1048576 bytes; further output is dropped\n\
         kiln: 18951500 bytes of output were dropped past the 1048576-byte cap of log \"stdio\"\n"
    );
}

#[test]
fn a_one_megabyte_line_is_split_at_the_line_limit() {
    let farm = Farm::new();
    let (out, rec) = farm.run(json!({"action": "long-line", "length": 1_000_000}));
    assert_eq!(out.result, Outcome::Success);
    let text = rec.text("stdio", Channel::Stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 16, "1,000,000 bytes in 64 KiB pieces");
    assert!(lines[..15].iter().all(|l| l.len() == 65_536));
    assert_eq!(lines[15].len(), 1_000_000 - 15 * 65_536);
    let expected: String = "0123456789".chars().cycle().take(1_000_000).collect();
    assert_eq!(lines.concat(), expected);
}

#[test]
fn invalid_utf8_from_commands_becomes_replacement_characters() {
    let mut farm = Farm::new();
    farm.allow(&["printf"]);
    let (out, rec) =
        farm.run(json!({"action": "run", "argv": ["printf", "a\\377b\\r\\nc\\303\\251\\n"]}));
    assert_eq!(out.result, Outcome::Success);
    assert_eq!(rec.text("stdio", Channel::Stdout), "a\u{fffd}b\nc\u{e9}\n");
}

#[test]
fn an_unfinished_last_line_is_kept() {
    let farm = Farm::new();
    let (out, rec) = farm.run(json!({"action": "write-raw", "log": "notes", "channel": "stdout", "text": "first\nsecond"}));
    assert_eq!(out.result, Outcome::Success);
    assert_eq!(rec.all("notes"), "first\nsecond\n");
    assert_eq!(out.logs["notes"].lines, 2);
}

#[test]
fn bad_log_names_are_refused() {
    let farm = Farm::new();
    let (out, _) =
        farm.run(json!({"action": "write-raw", "log": "../etc", "channel": "stdout", "text": "x"}));
    assert_eq!(out.result, Outcome::Failure);
    assert_eq!(
        out.message.as_deref(),
        Some("invalid: log name \"../etc\" must be 1-64 letters, digits, spaces, '.', '_' or '-'")
    );
}

#[test]
fn an_observer_counts_100k_lines_exactly() {
    let mut farm = Farm::new();
    farm.observe(counter(), "count", json!(null));
    let (out, _) = farm.run(json!({"action": "flood", "count": 100_000, "width": 20}));
    assert_eq!(out.result, Outcome::Success);
    assert_eq!(out.statistics["out_lines"], 100_000.0);
    assert_eq!(out.statistics["err_lines"], 0.0);
    assert!(
        out.statistics["batches"] < 100.0,
        "lines arrive in batches, not one by one"
    );
    assert_eq!(out.progress["output"], 100_000);
    // The step's own summary wins over an observer's.
    assert_eq!(out.summary.as_deref(), Some("wrote 100000 lines"));
}

#[test]
fn an_observer_counts_command_output_by_channel_even_past_the_log_cap() {
    let mut farm = Farm::new();
    farm.allow(&["sh"]);
    farm.grant.limits.logs.max_log_bytes = 10_000;
    farm.observe(counter(), "count", json!(null));
    let (out, _) =
        farm.run(json!({"action": "run", "argv": ["sh", "-c", "seq 1 100000; seq 1 7 >&2"]}));
    assert_eq!(out.result, Outcome::Success);
    assert_eq!(out.statistics["out_lines"], 100_000.0);
    assert_eq!(out.statistics["err_lines"], 7.0);
    assert_eq!(
        out.statistics["header_lines"], 2.0,
        "the command line and its exit status"
    );
    assert!(out.logs["stdio"].dropped_bytes > 0);
}

#[test]
fn an_observer_verdict_makes_the_result_worse() {
    let mut farm = Farm::new();
    farm.observe(counter(), "count", json!({"fail_over": 10}));
    let (out, _) = farm.run(json!({"action": "flood", "count": 11, "width": 1}));
    assert_eq!(out.result, Outcome::Warnings);
}

#[test]
fn an_observer_summary_is_used_when_the_step_sets_none() {
    let mut farm = Farm::new();
    farm.allow(&["seq"]);
    farm.observe(counter(), "count", json!(null));
    let (out, _) = farm.run(json!({"action": "run", "argv": ["seq", "1", "5"]}));
    // The probe sets "exit code 0" as its summary; a step that sets none gets the observer's.
    assert_eq!(out.summary.as_deref(), Some("exit code 0"));
    let (out, _) = farm
        .run(json!({"action": "write-raw", "log": "stdio", "channel": "stdout", "text": "a\nb\n"}));
    assert_eq!(out.summary.as_deref(), Some("2 out, 0 err"));
}

#[test]
fn secrets_are_redacted_everywhere() {
    let mut farm = Farm::new();
    farm.allow(&["echo"]);
    farm.grant
        .secrets
        .insert("token".into(), "hunter2-very-secret".into());
    let (out, rec) = farm
        .run(json!({"action": "run", "argv": ["echo", "token=%(secret:token)s"], "capture": 100}));
    assert_eq!(out.result, Outcome::Success);
    assert_eq!(rec.text("stdio", Channel::Stdout), "token=<secret:token>\n");
    assert!(
        rec.text("stdio", Channel::Header)
            .starts_with("$ echo token=<secret:token>\n")
    );
    assert_eq!(out.properties["captured"], json!("token=<secret:token>\n"));

    let (out, rec) =
        farm.run(json!({"action": "echo-args", "text": "the token is %(secret:token)s"}));
    assert_eq!(out.summary.as_deref(), Some("the token is <secret:token>"));
    let (out, _) =
        farm.run(json!({"action": "set-prop", "name": "leak", "value": {"v": "%(secret:token)s"}}));
    assert_eq!(out.properties["leak"], json!({"v": "<secret:token>"}));
    let (out, _) = farm.run(json!({"action": "fail", "message": "bad %(secret:token)s"}));
    assert_eq!(out.message.as_deref(), Some("bad <secret:token>"));
    assert!(!format!("{:?}", rec.lines.lock().unwrap()).contains("hunter2"));
}

#[test]
fn observers_write_their_own_logs_but_not_the_one_they_observe() {
    let mut farm = Farm::new();
    farm.observe(counter(), "count", json!(null));
    let (out, rec) = farm.run(json!({"action": "flood", "count": 3, "width": 1}));
    assert_eq!(out.result, Outcome::Success);
    assert_eq!(rec.all("counts"), "3 out\n0 err\n");
    assert_eq!(out.logs["counts"].lines, 2);
    assert_eq!(out.statistics["own_log_refused"], 1.0);
    assert!(!rec.all("stdio").contains("loop!"));
}

#[test]
fn logfiles_are_followed_live_into_their_own_logs() {
    let mut farm = Farm::new();
    farm.allow(&["sh"]);
    let script = "for i in 1 2 3; do echo line$i >> out/build.log; sleep 0.15; done; echo done";
    std::fs::create_dir(farm.path("out")).unwrap();
    let (out, rec) = farm.run(json!({
        "action": "run", "argv": ["sh", "-c", script],
        "logfiles": [["build.log", "out/build.log"], ["never", "missing.log"]]
    }));
    assert_eq!(out.result, Outcome::Success, "{}", rec.all("stdio"));
    assert_eq!(rec.all("build.log"), "line1\nline2\nline3\n");
    assert!(
        rec.all("stdio")
            .contains(" following out/build.log into log build.log\n")
    );
    // The lines arrived while the command ran, interleaved with its own output's arrival.
    let order: Vec<String> = rec
        .lines
        .lock()
        .unwrap()
        .iter()
        .map(|(l, _, t)| format!("{l}:{t}"))
        .collect();
    let first_logfile = order
        .iter()
        .position(|l| l.starts_with("build.log:"))
        .unwrap();
    let done = order.iter().position(|l| l == "stdio:done\n").unwrap();
    assert!(first_logfile < done, "{order:?}");
}

#[test]
fn a_logfile_that_is_a_symlink_is_not_followed() {
    let mut farm = Farm::new();
    farm.allow(&["true"]);
    std::os::unix::fs::symlink("/etc/passwd", farm.path("sneaky.log")).unwrap();
    let (out, rec) = farm
        .run(json!({"action": "run", "argv": ["true"], "logfiles": [["sneaky", "sneaky.log"]]}));
    assert_eq!(out.result, Outcome::Success);
    assert_eq!(rec.all("sneaky"), "");
}
