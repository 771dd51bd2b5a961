//! The `kiln` command line, run as a real process.

mod api;
mod build_run;
mod change_hooks;
mod cli_api;
mod demo;
mod farm;
mod git_step;
mod master_cli;
mod poller;
mod reliability;
mod reporters;
mod standard_steps;
mod step_resources;
mod try_build;
mod ui;

use std::path::Path;
use std::process::{Command, Output};

pub(crate) fn kiln(args: &[&str], workdir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_CACHE_DIR", workdir.parent().unwrap().join("cache"))
        .current_dir(workdir.parent().unwrap())
        .output()
        .unwrap()
}

fn probe() -> &'static str {
    steps::guest_path("probe-step").unwrap()
}

pub(crate) struct Dir {
    _root: tempfile::TempDir,
    pub(crate) workdir: std::path::PathBuf,
}

pub(crate) fn dir() -> Dir {
    let root = tempfile::tempdir().unwrap();
    let workdir = root.path().join("work");
    std::fs::create_dir(&workdir).unwrap();
    Dir {
        _root: root,
        workdir,
    }
}

pub(crate) fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_step_runs_with_live_channels_and_an_outcome() {
    let d = dir();
    let w = d.workdir.to_str().unwrap();
    let args = r#"{"action":"run","argv":["sh","-c","echo hello; echo oops >&2"]}"#;
    let out = kiln(
        &[
            "step",
            "run",
            probe(),
            "--workdir",
            w,
            "--allow-program",
            "sh",
            "--args",
            args,
            "--observer",
            "line-counter",
        ],
        &d.workdir,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "[hdr] $ sh -c 'echo hello; echo oops >&2'");
    assert!(lines.contains(&"[out] hello"), "{text}");
    assert!(lines.contains(&"[err] oops"), "{text}");
    assert!(text.contains("result:     SUCCESS\nsummary:    exit code 0\nstatistic:  lines = 2\nprogress:   output = 2\n"), "{text}");
}

#[test]
fn a_step_run_shows_what_its_commands_used() {
    let d = dir();
    let w = d.workdir.to_str().unwrap();
    let burn = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done";
    let args = serde_json::json!({"action": "run", "argv": ["sh", "-c", burn]}).to_string();
    let run = |json: bool| {
        let mut argv = vec![
            "step",
            "run",
            probe(),
            "--workdir",
            w,
            "--allow-program",
            "sh",
            "--args",
            &args,
        ];
        if json {
            argv.push("--json");
        }
        let out = kiln(&argv, &d.workdir);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        stdout(&out)
    };
    let text = run(false);
    let cpu = text.lines().find(|l| l.starts_with("cpu:")).expect(&text);
    assert!(cpu.ends_with(" in 1 command"), "{text}");
    assert!(text.contains("\nmemory:     commands "), "{text}");
    // The log lines come first, then the JSON outcome.
    let text = run(true);
    let at = text.find("\n{\n").expect(&text) + 1;
    let outcome: serde_json::Value = serde_json::from_str(&text[at..]).unwrap();
    let r = &outcome["resources"];
    assert_eq!(r["commands"], 1, "{outcome}");
    assert!(r["cpu_ms"].as_u64().unwrap() >= 50, "{outcome}");
    assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0, "{outcome}");
    assert!(r["guest_memory_bytes"].as_u64().unwrap() > 0, "{outcome}");
}

#[test]
fn exit_status_follows_the_result() {
    let d = dir();
    let w = d.workdir.to_str().unwrap();
    let fail = kiln(
        &[
            "step",
            "run",
            probe(),
            "--workdir",
            w,
            "--args",
            r#"{"action":"fail","message":"no"}"#,
        ],
        &d.workdir,
    );
    assert_eq!(fail.status.code(), Some(1));
    assert!(
        stdout(&fail).contains("[hdr] step failed: no\nresult:     FAILURE\nsummary:    no\n"),
        "{}",
        stdout(&fail)
    );
    let warn = kiln(
        &[
            "step",
            "run",
            probe(),
            "--workdir",
            w,
            "--args",
            r#"{"action":"outcome","outcome":"warnings"}"#,
        ],
        &d.workdir,
    );
    assert_eq!(warn.status.code(), Some(0));
    let exc = kiln(
        &[
            "step",
            "run",
            probe(),
            "--workdir",
            w,
            "--timeout",
            "0.3",
            "--args",
            r#"{"action":"loop"}"#,
        ],
        &d.workdir,
    );
    assert_eq!(exc.status.code(), Some(3));
    assert!(
        stdout(&exc)
            .contains("result:     EXCEPTION\nsummary:    the step's deadline of 300 ms passed\n"),
        "{}",
        stdout(&exc)
    );
}

#[test]
fn properties_secrets_and_json_output() {
    let d = dir();
    let w = d.workdir.to_str().unwrap();
    let args = r#"{"action":"echo-args","text":"%(prop:branch)s/%(prop:n)s/%(secret:tok)s"}"#;
    let out = kiln(
        &[
            "step",
            "run",
            probe(),
            "--workdir",
            w,
            "--prop",
            "branch=main",
            "--prop",
            "n=3",
            "--secret",
            "tok=s3cr3t",
            "--json",
            "--args",
            args,
        ],
        &d.workdir,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let outcome: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(outcome["result"], "SUCCESS");
    assert_eq!(outcome["summary"], "main/3/<secret:tok>");
}

#[test]
fn sandbox_mode_confines_commands_through_the_kiln_binary_itself() {
    let d = dir();
    let w = d.workdir.to_str().unwrap();
    let outside = d.workdir.parent().unwrap().join("outside.txt");
    let script = format!("echo in > inside.txt; echo out > {}", outside.display());
    let args = serde_json::json!({"action": "run", "argv": ["sh", "-c", script]}).to_string();
    let out = kiln(
        &[
            "step",
            "run",
            probe(),
            "--workdir",
            w,
            "--sandbox",
            "--allow-program",
            "sh",
            "--args",
            &args,
        ],
        &d.workdir,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("Permission denied"),
        "{}",
        stdout(&out)
    );
    assert!(d.workdir.join("inside.txt").exists());
    assert!(!outside.exists());
}

#[test]
fn artifacts_go_to_the_local_store() {
    let d = dir();
    let w = d.workdir.to_str().unwrap();
    std::fs::write(d.workdir.join("a.txt"), "artifact").unwrap();
    let store = d.workdir.parent().unwrap().join("store");
    let out = kiln(
        &[
            "step",
            "run",
            probe(),
            "--workdir",
            w,
            "--artifacts",
            store.to_str().unwrap(),
            "--args",
            r#"{"action":"upload","path":"a.txt","name":"a.txt"}"#,
        ],
        &d.workdir,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(
        std::fs::read_to_string(store.join("a.txt")).unwrap(),
        "artifact"
    );
}

/// Each bad input gives exit status 2 and one line on stderr that says what to fix.
#[test]
fn bad_input_gets_one_line_that_says_what_to_fix() {
    let d = dir();
    let w = d.workdir.to_str().unwrap();
    let not_wasm = d.workdir.join("notes.txt");
    std::fs::write(&not_wasm, "hello").unwrap();
    let core = d.workdir.join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let counter = steps::guest_path("count-observer").unwrap();
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec![not_wasm.to_str().unwrap()],
            format!(
                "{} is not a WebAssembly file (it does not start with \\0asm); give the .wasm file cargo built",
                not_wasm.display()
            ),
        ),
        (
            vec![core.to_str().unwrap()],
            format!(
                "{} is a core WebAssembly module, not a component; build the step with `cargo build --target wasm32-wasip2` (not wasm32-unknown-unknown or wasm32-wasip1)",
                core.display()
            ),
        ),
        (
            vec!["missing.wasm"],
            "cannot read missing.wasm: No such file or directory (os error 2)".into(),
        ),
        (
            vec![counter],
            format!("{counter} is a log observer, not a step; pass it with --observer"),
        ),
        (
            vec![probe(), "--args", "{nope"],
            "--args is not valid JSON: key must be a string at line 1 column 2".into(),
        ),
        (
            vec![probe(), "--observer", probe()],
            format!("--observer {}: this is a step, not a log observer", probe()),
        ),
        (
            vec![probe(), "--timeout", "-1"],
            "--timeout -1.0: give a positive number of seconds".into(),
        ),
        (
            vec![probe(), "--timeout", "1e300"],
            "--timeout 1e300: give a positive number of seconds".into(),
        ),
        (
            vec![probe(), "--memory", "0"],
            "--memory 0: give 1 to 4096 MiB (a wasm32 guest cannot use more than 4 GiB)".into(),
        ),
        (
            vec![probe(), "--log-limit", "0"],
            "--log-limit 0: give at least 1 MiB".into(),
        ),
        (
            vec!["line-cuonter"],
            format!(
                "line-cuonter: no such file, and no built-in step or observer has that name (built in: {})",
                steps::BUILTINS
                    .iter()
                    .map(|b| b.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["step", "run"];
        args.extend(&extra);
        args.extend(["--workdir", w]);
        let out = kiln(&args, &d.workdir);
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        assert_eq!(
            stderr(&out),
            format!("kiln: error: {expected}\n"),
            "{extra:?}"
        );
        assert_eq!(stdout(&out), "", "{extra:?}");
    }
    let out = kiln(
        &["step", "run", probe(), "--workdir", "/nonexistent/dir"],
        &d.workdir,
    );
    assert_eq!(
        stderr(&out),
        "kiln: error: --workdir /nonexistent/dir: no such directory; create it first\n"
    );
}

#[test]
fn step_list_names_the_builtins() {
    let d = dir();
    let out = kiln(&["step", "list"], &d.workdir);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(
        text.starts_with("NAME                       KIND      DESCRIPTION\n"),
        "{text}"
    );
    assert!(
        text.contains("\nline-counter               observer  counts output lines"),
        "{text}"
    );
    assert!(
        text.contains("\nset-property-from-command  step      set a property"),
        "{text}"
    );
}

/// Every command that takes `NAME=VALUE` properties parses them one way: a pair without `=`
/// or a name the master would refuse is a usage error (exit 2) naming the flag, before the
/// command reads a file, runs a step or reaches a master (none listens at 127.0.0.1:1, so a
/// command that got past its flags would fail to connect instead).
#[test]
fn every_property_flag_checks_its_names() {
    let d = dir();
    let master = ["--master", "http://127.0.0.1:1"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["step", "run", probe(), "--prop", "novalue"],
            "--prop <NAME=VALUE>",
        ),
        (
            vec!["step", "run", probe(), "--prop", "a\u{7}=1"],
            "--prop <NAME=VALUE>",
        ),
        (
            vec!["build", "run", "b", "--prop", "a\u{1b}=1"],
            "--prop <NAME=VALUE>",
        ),
        (
            [&["force", "b", "--prop", "x\u{1}y=1"][..], &master[..]].concat(),
            "--prop <NAME=VALUE>",
        ),
        (
            [&["try", "--property", "=1"][..], &master[..]].concat(),
            "--property <NAME=VALUE>",
        ),
        (
            [&["sendchange", "--property", "a\tb=1"][..], &master[..]].concat(),
            "--property <NAME=VALUE>",
        ),
    ];
    for (args, flag) in cases {
        let out = kiln(&args, &d.workdir);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!("for '{flag}'")) && err.contains("invalid value"),
            "{args:?}: {err}"
        );
    }
}
