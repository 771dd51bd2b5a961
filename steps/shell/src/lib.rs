//! The shell step, as Buildbot's ShellCommand: runs a command (an argv, or a string for a
//! granted shell) in the workdir or a subdirectory, with extra environment, a timeout and
//! logfiles followed live, and decodes its exit code into a result. It is also the body of the
//! `compile` step (with the warnings observer) and the `test` step (with the test-results
//! observer, plus JUnit XML files read after the command).

use std::collections::BTreeMap;

use guest_sdk::prelude::*;
use guest_sdk::{CommandLine, Exit};
use serde::Deserialize;

/// The step's arguments. Unknown keys are refused, so a typo fails before anything runs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    /// The command: `["make", "-j4"]`, or `"make -j4 && make check"` for the shell.
    command: CommandLine,
    /// The shell that runs a string command.
    #[serde(default = "default_shell")]
    shell: String,
    /// Extra environment variables.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// The directory to run in, relative to the workdir.
    #[serde(default)]
    workdir: Option<String>,
    /// Seconds before the command's process group is killed.
    #[serde(default)]
    timeout: Option<f64>,
    /// Files followed live into logs while the command runs: {"log name": "path"}.
    #[serde(default)]
    logfiles: BTreeMap<String, String>,
    /// Exit codes to results, as Buildbot's decodeRC: {"0": "SUCCESS", "1": "WARNINGS"}. Codes
    /// not listed are FAILURE; the default maps only 0 to SUCCESS.
    #[serde(default)]
    decode_rc: BTreeMap<String, String>,
    /// JUnit XML files to read after the command; their counts become the test statistics.
    #[serde(default)]
    junit: Vec<String>,
    /// Arguments of the warnings observer (used by the `compile` step).
    #[serde(default)]
    #[allow(dead_code)]
    warnings: Option<Value>,
    /// Arguments of the test-results observer (used by the `test` step).
    #[serde(default)]
    #[allow(dead_code)]
    results: Option<Value>,
}

fn default_shell() -> String {
    "sh".to_owned()
}

/// Parses a result name, as used in `decode_rc`.
fn outcome_named(name: &str) -> Option<Outcome> {
    Some(match name.to_ascii_uppercase().as_str() {
        "SUCCESS" => Outcome::Success,
        "WARNINGS" => Outcome::Warnings,
        "FAILURE" => Outcome::Failure,
        "SKIPPED" => Outcome::Skipped,
        "EXCEPTION" => Outcome::Exception,
        "RETRY" => Outcome::Retry,
        "CANCELLED" => Outcome::Cancelled,
        _ => return None,
    })
}

/// Checks the arguments and builds the exit-code table, before anything runs.
fn decode_table(args: &Args) -> Result<BTreeMap<i32, Outcome>, Error> {
    let mut table = BTreeMap::from([(0, Outcome::Success)]);
    if !args.decode_rc.is_empty() {
        table.clear();
    }
    for (code, name) in &args.decode_rc {
        let code: i32 = code.trim().parse().map_err(|_| {
            Error::msg(format!(
                "decode_rc: {code:?} is not an exit code (write {{\"0\": \"SUCCESS\"}})"
            ))
        })?;
        let outcome = outcome_named(name).ok_or_else(|| {
            Error::msg(format!(
                "decode_rc: exit code {code} maps to {name:?}; use SUCCESS, WARNINGS, FAILURE, SKIPPED, EXCEPTION, RETRY or CANCELLED"
            ))
        })?;
        table.insert(code, outcome);
    }
    if let Some(t) = args.timeout {
        guest_sdk::seconds(t, "timeout")?;
    }
    Ok(table)
}

fn run(ctx: &mut StepContext) -> StepResult {
    let args: Args = ctx.args()?;
    let table = decode_table(&args)?;
    let argv = args.command.argv(&args.shell)?;

    let mut cmd = ctx.command(argv);
    if let Some(dir) = &args.workdir {
        cmd = cmd.cwd(dir);
    }
    for (name, value) in &args.env {
        cmd = cmd.env(name, value);
    }
    if let Some(t) = args.timeout {
        cmd = cmd.timeout(guest_sdk::seconds(t, "timeout")?);
    }
    for (log, path) in &args.logfiles {
        cmd = cmd.logfile(log, path);
    }
    let done = cmd.run()?;
    let mut outcome = match done.exit {
        Exit::Code(code) => table.get(&code).copied().unwrap_or(Outcome::Failure),
        Exit::Signal(_) | Exit::TimedOut => Outcome::Failure,
        Exit::Cancelled => Outcome::Cancelled,
    };
    let what = args.command.describe();
    if outcome != Outcome::Success {
        ctx.set_summary(&format!("{what}: {}", done.describe()));
    }
    if !args.junit.is_empty() {
        outcome = outcome.worst(read_junit(ctx, &args.junit)?);
    }
    Ok(outcome)
}

/// Test counts from JUnit XML.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
    skipped: u64,
    failures: Vec<String>,
}

/// Counts the test cases of one JUnit XML document (a `<testsuites>` or a `<testsuite>` root).
fn count_junit(xml: &str, counts: &mut Counts) -> Result<(), String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let root = doc.root_element();
    if !matches!(root.tag_name().name(), "testsuites" | "testsuite") {
        return Err(format!(
            "the root element is <{}>, not <testsuites> or <testsuite>",
            root.tag_name().name()
        ));
    }
    for case in root.descendants().filter(|n| n.has_tag_name("testcase")) {
        let child = |name: &str| case.children().any(|c| c.has_tag_name(name));
        if child("failure") || child("error") {
            counts.failed += 1;
            let class = case.attribute("classname").unwrap_or("");
            let name = case.attribute("name").unwrap_or("?");
            counts.failures.push(if class.is_empty() {
                name.to_owned()
            } else {
                format!("{class}.{name}")
            });
        } else if child("skipped") {
            counts.skipped += 1;
        } else {
            counts.passed += 1;
        }
    }
    Ok(())
}

/// Reads the JUnit files, reports statistics, a summary and the failing tests, and returns the
/// outcome they imply.
fn read_junit(ctx: &mut StepContext, paths: &[String]) -> Result<Outcome, Error> {
    let mut counts = Counts::default();
    for path in paths {
        let xml = std::fs::read_to_string(path)
            .map_err(|e| Error::msg(format!("junit file {path}: {e}")))?;
        count_junit(&xml, &mut counts)
            .map_err(|e| Error::msg(format!("junit file {path}: {e}")))?;
    }
    ctx.set_statistic("tests_passed", counts.passed as f64);
    ctx.set_statistic("tests_failed", counts.failed as f64);
    ctx.set_statistic("tests_skipped", counts.skipped as f64);
    let mut summary = format!("{} passed", counts.passed);
    if counts.failed > 0 {
        summary.push_str(&format!(", {} failed", counts.failed));
    }
    if counts.skipped > 0 {
        summary.push_str(&format!(", {} skipped", counts.skipped));
    }
    ctx.set_summary(&summary);
    for name in &counts.failures {
        ctx.log("failures").line(name);
    }
    Ok(if counts.failed > 0 {
        Outcome::Failure
    } else {
        Outcome::Success
    })
}

guest_sdk::step!(run);

#[cfg(test)]
mod tests {
    use super::*;

    fn args(json: &str) -> Result<Args, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn arguments_are_validated_before_anything_runs() {
        assert!(args(r#"{"command": ["make"]}"#).is_ok());
        assert!(args(r#"{"command": "make && make check", "shell": "bash"}"#).is_ok());
        assert!(
            args(r#"{}"#)
                .unwrap_err()
                .starts_with("missing field `command`")
        );
        assert!(
            args(r#"{"command": ["make"], "timout": 3}"#)
                .unwrap_err()
                .starts_with("unknown field `timout`")
        );
        assert!(args(r#"{"command": 3}"#).unwrap_err().starts_with(
            "a command: a list of strings such as [\"make\", \"-j4\"], or one string for the shell"
        ));
        let a = args(
            r#"{"command": ["x"], "decode_rc": {"0": "SUCCESS", "1": "warnings", "2": "WARN"}}"#,
        )
        .unwrap();
        assert_eq!(
            decode_table(&a).unwrap_err().to_string(),
            "decode_rc: exit code 2 maps to \"WARN\"; use SUCCESS, WARNINGS, FAILURE, SKIPPED, EXCEPTION, RETRY or CANCELLED"
        );
        let a =
            args(r#"{"command": ["x"], "decode_rc": {"0": "SUCCESS", "1": "warnings"}}"#).unwrap();
        assert_eq!(
            decode_table(&a).unwrap(),
            BTreeMap::from([(0, Outcome::Success), (1, Outcome::Warnings)])
        );
        let a = args(r#"{"command": ["x"], "decode_rc": {"one": "SUCCESS"}}"#).unwrap();
        assert!(
            decode_table(&a)
                .unwrap_err()
                .to_string()
                .starts_with("decode_rc: \"one\" is not an exit code")
        );
        let a = args(r#"{"command": ["x"], "timeout": -1}"#).unwrap();
        assert_eq!(
            decode_table(&a).unwrap_err().to_string(),
            "timeout: -1.0 is not a number of seconds between 0 and 604800"
        );
        assert_eq!(
            CommandLine::Argv(vec![])
                .argv("sh")
                .unwrap_err()
                .to_string(),
            "command is empty: give a program and its arguments"
        );
    }

    #[test]
    fn junit_counts_cases() {
        let xml = r#"<?xml version="1.0"?>
<testsuites>
  <testsuite name="a" tests="4">
    <testcase classname="pkg.A" name="ok1"/>
    <testcase classname="pkg.A" name="bad"><failure message="boom">trace</failure></testcase>
    <testcase classname="pkg.A" name="skip"><skipped/></testcase>
    <testcase name="err"><error message="x"/></testcase>
  </testsuite>
  <testsuite name="b"><testcase classname="B" name="ok2"/></testsuite>
</testsuites>"#;
        let mut c = Counts::default();
        count_junit(xml, &mut c).unwrap();
        assert_eq!(
            c,
            Counts {
                passed: 2,
                failed: 2,
                skipped: 1,
                failures: vec!["pkg.A.bad".into(), "err".into()]
            }
        );
        assert!(
            count_junit("<html/>", &mut c)
                .unwrap_err()
                .contains("not <testsuites>")
        );
        assert!(count_junit("<testsuite>", &mut c).is_err());
    }
}
