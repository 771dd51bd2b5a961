//! The standard steps, run by name through `kiln step run NAME --json`, with real programs:
//! cargo's own warnings and test output, real files and a real file store.

use std::path::Path;

use serde_json::{Value, json};

use crate::{dir, kiln, stderr, stdout};

/// Runs a built-in step; returns the exit status, the outcome and the printed log lines.
pub(crate) fn step(
    name: &str,
    args: Value,
    extra: &[&str],
    workdir: &Path,
) -> (i32, Value, String) {
    let args = args.to_string();
    let w = workdir.to_str().unwrap();
    let mut argv = vec![
        "step",
        "run",
        name,
        "--workdir",
        w,
        "--json",
        "--args",
        &args,
    ];
    argv.extend(extra);
    let out = kiln(&argv, workdir);
    let text = stdout(&out);
    // The log lines come first, then the JSON outcome.
    let at = text.find("\n{\n").map_or(0, |i| i + 1);
    let at = if text.starts_with("{\n") { 0 } else { at };
    let outcome: Value =
        serde_json::from_str(&text[at..]).unwrap_or_else(|e| panic!("{e}: {text}{}", stderr(&out)));
    (out.status.code().unwrap(), outcome, text[..at].to_owned())
}

#[test]
fn shell_runs_argv_or_a_string_in_a_granted_shell() {
    let d = dir();
    std::fs::create_dir(d.workdir.join("sub")).unwrap();
    let (code, out, log) = step(
        "shell",
        json!({"command": "echo \"$GREETING from $(basename $(pwd))\"", "env": {"GREETING": "hi"}, "workdir": "sub"}),
        &["--allow-program", "sh"],
        &d.workdir,
    );
    assert_eq!(
        (code, out["result"].as_str()),
        (0, Some("SUCCESS")),
        "{log}"
    );
    assert!(log.contains("[out] hi from sub\n"), "{log}");

    // The string form needs the shell granted.
    let (code, out, _) = step("shell", json!({"command": "echo hi"}), &[], &d.workdir);
    assert_eq!(code, 1);
    assert!(
        out["message"]
            .as_str()
            .unwrap()
            .starts_with("denied: program \"sh\" is not granted"),
        "{out}"
    );

    let (_, out, _) = step(
        "shell",
        json!({"command": ["sh", "-c", "exit 3"], "decode_rc": {"0": "SUCCESS", "3": "WARNINGS"}}),
        &["--allow-program", "sh"],
        &d.workdir,
    );
    assert_eq!(out["result"], "WARNINGS");
    assert_eq!(out["summary"], "sh: exit code 3");

    let (_, out, log) = step(
        "shell",
        json!({"command": ["sleep", "10"], "timeout": 0.3}),
        &["--allow-program", "sleep"],
        &d.workdir,
    );
    assert_eq!(out["result"], "FAILURE");
    assert_eq!(out["summary"], "sleep: timed out");
    assert!(
        log.contains("[hdr] timed out after 300 ms; its process group was killed"),
        "{log}"
    );
}

#[test]
fn shell_follows_logfiles() {
    let d = dir();
    let (_, out, log) = step(
        "shell",
        json!({"command": "echo building > build.log; echo done", "logfiles": {"build": "build.log"}}),
        &["--allow-program", "sh"],
        &d.workdir,
    );
    assert_eq!(out["result"], "SUCCESS");
    assert!(log.contains("[build:out] building\n"), "{log}");
    assert_eq!(out["logs"]["build"]["lines"], 1);
}

#[test]
fn bad_arguments_fail_before_any_command_runs() {
    let d = dir();
    let cases = [
        (
            "shell",
            json!({}),
            "bad step arguments: missing field `command`",
        ),
        (
            "shell",
            json!({"command": ["true"], "timout": 1}),
            "bad step arguments: unknown field `timout`",
        ),
        (
            "shell",
            json!({"command": 7}),
            "bad step arguments: a command: a list of strings",
        ),
        (
            "shell",
            json!({"command": ["true"], "decode_rc": {"0": "GOOD"}}),
            "decode_rc: exit code 0 maps to \"GOOD\"",
        ),
        (
            "set-property-from-command",
            json!({"command": ["true"]}),
            "bad step arguments: missing field `property`",
        ),
        (
            "set-property-from-command",
            json!({"command": ["true"], "property": "p", "regex": "("}),
            "regex: regex parse error",
        ),
        (
            "file-download",
            json!({"name": "x"}),
            "bad step arguments: missing field `dest`",
        ),
        (
            "set-property",
            json!({"name": "a"}),
            "property \"a\" has no value",
        ),
        (
            "git",
            json!({"branch": "main"}),
            "bad step arguments: missing field `repourl`",
        ),
        (
            "git",
            json!({"repourl": "x", "timeout": 1e300}),
            "timeout: 1e300 is not a number of seconds",
        ),
        (
            "shell",
            json!({"command": ["true"], "timeout": 1e300}),
            "timeout: 1e300 is not a number of seconds",
        ),
        (
            "set-property-from-command",
            json!({"command": ["true"], "property": "p", "timeout": -2}),
            "timeout: -2.0 is not a number of seconds",
        ),
        (
            "git",
            json!({"repourl": "x", "mode": "fresh"}),
            "bad step arguments: unknown variant `fresh`, expected `incremental` or `full`",
        ),
        (
            "git",
            json!({"repourl": "x", "method": "copy"}),
            "method Copy goes with mode \"full\"",
        ),
        (
            "trigger",
            json!({"schedulers": "nightly"}),
            "bad step arguments: invalid type: string \"nightly\", expected a sequence",
        ),
    ];
    for (name, args, expected) in cases {
        let grants = ["--allow-program", "true", "--allow-program", "git"];
        let (code, out, log) = step(name, args.clone(), &grants, &d.workdir);
        assert_eq!(
            (code, out["result"].as_str()),
            (1, Some("FAILURE")),
            "{name} {args}"
        );
        let message = out["message"].as_str().unwrap();
        assert!(message.starts_with(expected), "{name} {args}: {message}");
        assert!(
            !log.contains("[hdr] $ "),
            "{name} {args} ran a command: {log}"
        );
    }
}

#[test]
fn set_property_steps() {
    let d = dir();
    let (_, out, _) = step(
        "set-property",
        json!({"properties": {"a": 1, "b": "x"}}),
        &[],
        &d.workdir,
    );
    assert_eq!(out["properties"], json!({"a": 1, "b": "x"}));
    assert_eq!(out["summary"], "set a, b");

    let (_, out, _) = step(
        "set-property-from-command",
        json!({"command": ["printf", "  v1.2.3\\n  "], "property": "version"}),
        &["--allow-program", "printf"],
        &d.workdir,
    );
    assert_eq!(out["properties"]["version"], "v1.2.3");
    let (_, out, _) = step(
        "set-property-from-command",
        json!({"command": "echo 'tool version 4.5 (build 9)'", "property": "version", "regex": "version (?<value>[0-9.]+)"}),
        &["--allow-program", "sh"],
        &d.workdir,
    );
    assert_eq!(out["properties"]["version"], "4.5");
    let (_, out, _) = step(
        "set-property-from-command",
        json!({"command": ["echo", "nothing"], "property": "version", "regex": "version (\\d+)"}),
        &["--allow-program", "echo"],
        &d.workdir,
    );
    assert_eq!(out["result"], "FAILURE");
    assert_eq!(
        out["message"],
        "regex \"version (\\\\d+)\" did not match the command's output"
    );
}

#[test]
fn file_transfer_steps_round_trip_with_checksums() {
    let d = dir();
    let store = d.workdir.parent().unwrap().join("store");
    let s = store.to_str().unwrap();
    std::fs::create_dir_all(d.workdir.join("dist/sub")).unwrap();
    std::fs::write(d.workdir.join("dist/app.bin"), "hello\n").unwrap();
    std::fs::write(d.workdir.join("dist/sub/x"), "x").unwrap();

    let (_, out, log) = step(
        "file-upload",
        json!({"source": "dist/app.bin", "property": "app"}),
        &["--artifacts", s],
        &d.workdir,
    );
    assert_eq!(out["result"], "SUCCESS", "{log}");
    assert_eq!(out["summary"], "uploaded app.bin (6 bytes)");
    assert_eq!(
        out["properties"]["app"],
        json!({"name": "app.bin", "size": 6, "sha1": "f572d396fae9206628714fb2ce00f72e94f2258f",
               "sha256": "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"})
    );
    let (_, out, _) = step(
        "file-upload",
        json!({"source": "dist/app.bin", "max_size": 3}),
        &["--artifacts", s],
        &d.workdir,
    );
    assert_eq!(
        out["message"],
        "dist/app.bin is 6 bytes, more than max_size 3"
    );

    let (_, out, _) = step(
        "directory-upload",
        json!({"source": "dist"}),
        &["--artifacts", s],
        &d.workdir,
    );
    assert_eq!(out["result"], "SUCCESS");
    assert!(store.join("dist.tar").is_file());

    let (_, out, _) = step(
        "file-download",
        json!({"name": "app.bin", "dest": "fetched/app.bin"}),
        &["--artifacts", s],
        &d.workdir,
    );
    assert_eq!(out["summary"], "downloaded app.bin (6 bytes)");
    assert_eq!(
        std::fs::read_to_string(d.workdir.join("fetched/app.bin")).unwrap(),
        "hello\n"
    );

    std::os::unix::fs::symlink("/etc/passwd", d.workdir.join("passwd")).unwrap();
    let (_, out, _) = step(
        "file-upload",
        json!({"source": "passwd"}),
        &["--artifacts", s],
        &d.workdir,
    );
    assert_eq!(out["result"], "FAILURE");
    assert_eq!(
        out["message"],
        "not found: passwd is or passes through a symlink, which Kiln never follows"
    );
}

/// A throwaway cargo project in the workdir, and the flags that let a step run that cargo.
fn cargo_project(workdir: &Path, lib_rs: &str) -> Vec<String> {
    std::fs::create_dir_all(workdir.join("proj/src")).unwrap();
    std::fs::write(
        workdir.join("proj/Cargo.toml"),
        "[package]\nname = \"proj\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(workdir.join("proj/src/lib.rs"), lib_rs).unwrap();
    // The toolchain's own cargo and rustc, found without the rustup proxy.
    let cargo = std::env::var("CARGO").unwrap();
    let bin = Path::new(&cargo).parent().unwrap().display().to_string();
    vec![
        "--allow-program".into(),
        "cargo".into(),
        "--env".into(),
        format!("PATH={bin}:/usr/bin:/bin"),
    ]
}

#[test]
fn compile_counts_real_cargo_warnings() {
    let d = dir();
    let flags = cargo_project(
        &d.workdir,
        "use std::fmt;\npub fn f() -> u32 { let unused = 1; 2 }\n",
    );
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (code, out, log) = step(
        "compile",
        json!({"command": ["cargo", "build", "--offline", "-q"], "workdir": "proj"}),
        &flags,
        &d.workdir,
    );
    assert_eq!(code, 0, "{log}");
    assert_eq!(out["result"], "WARNINGS", "{log}");
    assert_eq!(out["statistics"]["warnings"], 2.0, "{log}");
    assert_eq!(out["summary"], "2 warnings");
    assert!(
        log.contains("[warnings:out] warning: unused import: `std::fmt`"),
        "{log}"
    );
    assert!(
        log.contains("[warnings:out] warning: unused variable: `unused`"),
        "{log}"
    );

    let (_, out, log) = step(
        "compile",
        json!({"command": ["cargo", "build", "--offline", "-q"], "workdir": "proj", "warnings": {"max_warnings": 1}}),
        &flags,
        &d.workdir,
    );
    assert_eq!(out["result"], "FAILURE", "{log}");
}

#[test]
fn test_counts_real_libtest_results() {
    let d = dir();
    let lib = "#[cfg(test)]\nmod tests {\n    #[test] fn passes() {}\n    #[test] fn also_passes() {}\n    \
               #[test] fn breaks() { panic!(\"no\") }\n    #[test] #[ignore] fn slow() {}\n}\n";
    let flags = cargo_project(&d.workdir, lib);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (code, out, log) = step(
        "test",
        json!({"command": ["cargo", "test", "--offline", "-q"], "workdir": "proj"}),
        &flags,
        &d.workdir,
    );
    assert_eq!(code, 1, "{log}");
    assert_eq!(out["result"], "FAILURE");
    assert_eq!(
        (
            out["statistics"]["tests_passed"].as_f64(),
            out["statistics"]["tests_failed"].as_f64(),
            out["statistics"]["tests_skipped"].as_f64()
        ),
        (Some(2.0), Some(1.0), Some(1.0)),
        "{log}"
    );
    assert!(log.contains("[failures:out] tests::breaks\n"), "{log}");
}

#[test]
fn test_reads_junit_xml_after_the_command() {
    let d = dir();
    let xml = r#"<testsuites><testsuite name="s">
        <testcase classname="A" name="one"/><testcase classname="A" name="two"/>
        <testcase classname="A" name="bad"><failure message="x"/></testcase>
        <testcase classname="A" name="later"><skipped/></testcase></testsuite></testsuites>"#;
    std::fs::write(d.workdir.join("junit.xml"), xml).unwrap();
    let (_, out, log) = step(
        "test",
        json!({"command": ["true"], "junit": ["junit.xml"]}),
        &["--allow-program", "true"],
        &d.workdir,
    );
    assert_eq!(out["result"], "FAILURE");
    assert_eq!(out["summary"], "2 passed, 1 failed, 1 skipped");
    assert_eq!(out["statistics"]["tests_passed"], 2.0);
    assert!(log.contains("[failures:out] A.bad\n"), "{log}");
    let (_, out, _) = step(
        "test",
        json!({"command": ["true"], "junit": ["missing.xml"]}),
        &["--allow-program", "true"],
        &d.workdir,
    );
    assert_eq!(out["result"], "FAILURE");
    assert!(
        out["message"]
            .as_str()
            .unwrap()
            .starts_with("junit file missing.xml: "),
        "{out}"
    );
}

#[test]
fn trigger_run_locally_says_what_it_would_start() {
    let d = dir();
    let args = json!({"schedulers": ["nightly"], "copy_properties": ["branch"], "set_properties": {"reason": "release"}});
    let (code, out, log) = step("trigger", args, &["--prop", "branch=main"], &d.workdir);
    assert_eq!((code, out["result"].as_str()), (0, Some("SUCCESS")));
    assert_eq!(out["summary"], "triggered nightly: no builds started");
    assert!(log.contains("[hdr] triggering nightly with properties {\"branch\":\"main\",\"reason\":\"release\"}\n"), "{log}");
    assert!(
        log.contains("[hdr] run locally: nothing was started; on a farm this would fire nightly\n"),
        "{log}"
    );
    let (_, out, _) = step("trigger", json!({"schedulers": []}), &[], &d.workdir);
    assert_eq!(
        out["message"],
        "schedulers is empty: name at least one triggerable scheduler"
    );
}
