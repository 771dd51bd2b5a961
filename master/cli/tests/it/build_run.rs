//! `kiln build run`: a builder's configured steps run locally by the real `kiln` binary, with
//! the standard steps, the step options, layered properties, secrets and uploaded modules.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Dir, dir, kiln, stderr, stdout};

/// A farm of one builder exercising the step options, and another the list of defined
/// builders names.
const CONFIG: &str = r#"
[properties]
greeting = "hello"
who = "global"

[[builders]]
name = "local"
properties = { who = "builder" }

[builders.grant]
programs = ["sh"]

[[builders.steps]]
module = "shell"
name = "hello"
args = { command = ["sh", "-c", "echo %(prop:greeting)s from %(prop:buildername)s on %(prop:workername)s"] }

[[builders.steps]]
module = "set-property-from-command"
name = "version"
args = { command = ["sh", "-c", "echo '  1.2.3  '"], property = "version" }

[[builders.steps]]
module = "shell"
name = "use version"
args = { command = "echo version=%(prop:version)s who=%(prop:who)s branch=%(prop:branch:~none)s" }

[[builders.steps]]
module = "shell"
name = "deploy"
args = { command = ["sh", "-c", "echo deploying"] }
do_step_if = false

[[builders.steps]]
module = "shell"
name = "broken"
args = { command = ["sh", "-c", "echo broken >&2; exit 3"] }
halt_on_failure = true

[[builders.steps]]
module = "shell"
name = "never"
args = { command = ["sh", "-c", "echo never"] }

[[builders.steps]]
module = "shell"
name = "cleanup"
args = { command = ["sh", "-c", "echo cleaned > cleaned.txt"] }
always_run = true

[[builders]]
name = "other"
[[builders.steps]]
module = "shell"
args = { command = ["true"] }
"#;

/// Writes `text` as the configuration beside the workdir; returns its path.
fn config(d: &Dir, text: &str) -> PathBuf {
    let path = d.workdir.parent().unwrap().join("kiln.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn build(cfg: &Path, d: &Dir, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "build",
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--workdir",
        d.workdir.to_str().unwrap(),
    ];
    args.extend(extra);
    kiln(&args, &d.workdir)
}

/// The rows of the results table: (step, result, elapsed, summary).
fn table(text: &str) -> Vec<Vec<String>> {
    let start = text
        .lines()
        .position(|l| l.starts_with("STEP "))
        .unwrap_or_else(|| panic!("no table in:\n{text}"));
    text.lines()
        .skip(start + 1)
        .take_while(|l| !l.starts_with("property:") && !l.starts_with("result:"))
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

#[test]
fn a_builder_runs_its_steps_with_options_and_properties() {
    let d = dir();
    let cfg = config(&d, CONFIG);
    let out = build(&cfg, &d, &["local"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    let lines: Vec<&str> = text.lines().collect();
    // Each step that runs announces itself, then its log streams as `kiln step run` prints it.
    assert_eq!(lines[0], "==> step 1/7: hello (shell)");
    assert_eq!(lines[1], "[hdr] $ sh -c 'echo hello from local on local'");
    for expected in [
        "[out] hello from local on local",
        "==> step 2/7: version (set-property-from-command)",
        "==> step 3/7: use version (shell)",
        // The property set by the step before; builder properties win over global ones.
        "[out] version=1.2.3 who=builder branch=none",
        "==> step 5/7: broken (shell)",
        "[err] broken",
        "==> step 7/7: cleanup (shell)",
        "property:   version = \"1.2.3\" (Step version)",
        "result:     FAILURE",
    ] {
        assert!(
            lines.contains(&expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    // The skipped step and the step after the halt never start.
    assert!(
        !text.contains("step 4/7") && !text.contains("deploying"),
        "{text}"
    );
    assert!(
        !text.contains("step 6/7") && !text.contains("[out] never"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(d.workdir.join("cleaned.txt")).unwrap(),
        "cleaned\n"
    );

    let rows = table(&text);
    let summary: Vec<(&str, &str, Option<&str>)> = rows
        .iter()
        .map(|r| (r[0].as_str(), r[1].as_str(), r.get(3).map(String::as_str)))
        .collect();
    assert_eq!(summary.len(), 7, "{text}");
    assert_eq!((summary[0].0, summary[0].1), ("hello", "SUCCESS"), "{text}");
    assert_eq!((summary[1].0, summary[1].1), ("version", "SUCCESS"));
    assert_eq!((summary[2].0, summary[2].1), ("use version", "SUCCESS"));
    assert_eq!(
        summary[3],
        ("deploy", "SKIPPED", Some("skipped: its condition is false"))
    );
    assert_eq!((summary[4].0, summary[4].1), ("broken", "FAILURE"));
    assert_eq!(
        summary[5],
        (
            "never",
            "SKIPPED",
            Some("not run: an earlier step halted the build")
        )
    );
    assert_eq!((summary[6].0, summary[6].1), ("cleanup", "SUCCESS"));
    // Steps that did not run have no elapsed time.
    assert_eq!(rows[3][2], "-");
    assert!(
        rows[0][2].ends_with(" ms") || rows[0][2].ends_with(" s"),
        "{text}"
    );
}

#[test]
fn properties_layer_as_on_the_farm_and_json_gives_the_build() {
    let d = dir();
    let cfg = config(&d, CONFIG);
    let out = build(
        &cfg,
        &d,
        &[
            "local",
            "--prop",
            "who=cli",
            "--prop",
            "n=3",
            "--branch",
            "main",
            "--revision",
            "abc123",
            "--repository",
            "https://example.org/app.git",
            "--json",
        ],
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(
        text.contains("[out] version=1.2.3 who=cli branch=main\n"),
        "{text}"
    );
    // The live log comes first, then the build's outcome as JSON.
    let json = &text[text.find("\n{\n").expect("a JSON object") + 1..];
    let outcome: Value = serde_json::from_str(json).unwrap();
    assert_eq!(outcome["result"], "FAILURE");
    let prop = |name: &str| {
        let p = &outcome["properties"]["map"][name];
        (
            p["value"].clone(),
            p["source"].as_str().unwrap_or("").to_owned(),
        )
    };
    assert_eq!(prop("greeting"), ("hello".into(), "Global".into()));
    assert_eq!(prop("who"), ("cli".into(), "Command line".into()));
    assert_eq!(prop("n"), (3.into(), "Command line".into()));
    assert_eq!(prop("version"), ("1.2.3".into(), "Step version".into()));
    assert_eq!(prop("buildername"), ("local".into(), "Build".into()));
    assert_eq!(prop("buildnumber"), (0.into(), "Build".into()));
    assert_eq!(prop("workername"), ("local".into(), "Build".into()));
    assert_eq!(prop("branch"), ("main".into(), "Build".into()));
    assert_eq!(prop("revision"), ("abc123".into(), "Build".into()));
    assert_eq!(
        prop("repository"),
        ("https://example.org/app.git".into(), "Build".into())
    );
    let steps = outcome["steps"].as_array().unwrap();
    let ran: Vec<(&str, bool, &str)> = steps
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap(),
                s["ran"].as_bool().unwrap(),
                s["outcome"]["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ran,
        [
            ("hello", true, "SUCCESS"),
            ("version", true, "SUCCESS"),
            ("use version", true, "SUCCESS"),
            ("deploy", false, "SKIPPED"),
            ("broken", true, "FAILURE"),
            ("never", false, "SKIPPED"),
            ("cleanup", true, "SUCCESS"),
        ]
    );
}

#[test]
fn secrets_come_from_the_providers_and_uploaded_modules_from_files() {
    let d = dir();
    let root = d.workdir.parent().unwrap();
    std::fs::create_dir(root.join("secrets")).unwrap();
    std::fs::write(root.join("secrets").join("token"), "s3cr3t-value\n").unwrap();
    let cfg = config(
        &d,
        r#"
[secrets]
directory = "secrets"

[[builders]]
name = "deploy"
[builders.grant]
programs = ["sh"]

[[builders.steps]]
module = "shell"
name = "push"
args = { command = ["sh", "-c", "echo token=%(secret:token)s"] }

[[builders.steps]]
module = "probe@1.0"
name = "probe"
args = { action = "echo-args", text = "on %(src::branch:-no branch)s" }

[[builders]]
name = "missing-secret"
[[builders.steps]]
module = "shell"
args = { command = ["echo", "%(secret:nope)s"] }
"#,
    );
    // An uploaded module lives on the master; locally it needs its file.
    let out = build(&cfg, &d, &["deploy"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "kiln: error: builder \"deploy\": step \"probe\" uses uploaded module probe@1.0, which only the master has; to run it here, pass its component file with --module probe@1.0=FILE.wasm\n"
    );
    assert_eq!(stdout(&out), "");

    let module = format!("probe@1.0={}", steps::guest_path("probe-step").unwrap());
    let out = build(&cfg, &d, &["deploy", "--module", &module, "--json"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(text.contains("[out] token=<secret:token>\n"), "{text}");
    assert!(!text.contains("s3cr3t-value"), "{text}");
    let json = &text[text.find("\n{\n").unwrap() + 1..];
    let outcome: Value = serde_json::from_str(json).unwrap();
    // `%(src:...)s` is rendered from the local source stamp.
    assert_eq!(outcome["steps"][1]["outcome"]["summary"], "on no branch");

    let out = build(&cfg, &d, &["missing-secret"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        format!(
            "kiln: error: builder \"missing-secret\": secret \"nope\" is not defined: no file {}\n",
            root.join("secrets").join("nope").display()
        )
    );
}

#[test]
fn an_untrusted_builder_runs_confined() {
    let d = dir();
    let cfg = config(
        &d,
        r#"
[[builders]]
name = "fork"
trusted = false
[builders.grant]
programs = ["sh"]
[[builders.steps]]
module = "shell"
args = { command = ["sh", "-c", "echo in > inside.txt; echo out > ../outside.txt"] }
"#,
    );
    let out = build(&cfg, &d, &["fork"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        stderr(&out),
        "kiln: builder \"fork\" is untrusted, so its commands run confined (sandbox mode), as on a sandbox worker\n"
    );
    assert!(
        stdout(&out).contains("Permission denied"),
        "{}",
        stdout(&out)
    );
    assert!(d.workdir.join("inside.txt").exists());
    assert!(!d.workdir.parent().unwrap().join("outside.txt").exists());
}

/// Each bad input gives exit status 2, nothing on stdout, and one message saying what to fix.
#[test]
fn bad_input_says_what_to_fix() {
    let d = dir();
    let cfg = config(&d, CONFIG);
    let c = cfg.display();
    let untrusted = d.workdir.parent().unwrap().join("untrusted.toml");
    std::fs::write(
        &untrusted,
        r#"
[[builders]]
name = "fork"
trusted = false
[[builders.steps]]
module = "shell"
args = { command = ["echo", "%(secret:token)s"] }
"#,
    )
    .unwrap();
    let missing = d.workdir.parent().unwrap().join("nope.toml");
    let u = untrusted.display();
    let m = missing.display();
    let (cfg, untrusted, missing) = (
        cfg.to_str().unwrap(),
        untrusted.to_str().unwrap(),
        missing.to_str().unwrap(),
    );
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["nightly", "--config", cfg],
            format!("builder \"nightly\" is not defined in {c} (defined: local, other)"),
        ),
        (
            vec!["local", "--config", missing],
            format!("{m}: cannot read the configuration: No such file or directory (os error 2)"),
        ),
        (
            vec!["fork", "--config", untrusted],
            format!(
                "{u}: builders.\"fork\".steps[0].args: an untrusted builder cannot use secrets (\"%(secret:token)s\"); remove it, or set trusted = true"
            ),
        ),
        (
            vec!["local", "--config", cfg, "--prop", "branch=dev"],
            "--prop branch=dev: the source stamp's branch is set with --branch".into(),
        ),
        (
            vec!["local", "--config", cfg, "--module", "lint@1.0=lint.wasm"],
            "--module lint@1.0=lint.wasm: builder \"local\" does not use module lint@1.0 (it uses no uploaded modules)".into(),
        ),
    ];
    let w = d.workdir.to_str().unwrap();
    for (extra, expected) in cases {
        let mut args = vec!["build", "run", "--workdir", w];
        args.extend(&extra);
        let out = kiln(&args, &d.workdir);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {}", stderr(&out));
        assert_eq!(
            stderr(&out),
            format!("kiln: error: {expected}\n"),
            "{extra:?}"
        );
        assert_eq!(stdout(&out), "", "{extra:?}");
    }
    let out = kiln(
        &[
            "build",
            "run",
            "local",
            "--config",
            cfg,
            "--workdir",
            "/nonexistent/dir",
        ],
        &d.workdir,
    );
    assert_eq!(
        stderr(&out),
        "kiln: error: --workdir /nonexistent/dir: no such directory; create it first\n"
    );
}
