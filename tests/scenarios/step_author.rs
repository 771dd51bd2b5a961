//! A step author's journey: the step in the README, written to a fresh crate outside this
//! workspace, built with one cargo command, and run in the sandbox with a built-in observer.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use runtime::{
    CancelToken, Channel, DirStore, Grant, Loaded, ObserverSpec, Outcome, Properties, Runtime,
    RuntimeConfig, StepEvents, StepRun,
};
use serde_json::json;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The code block that follows `<!-- step-example:NAME -->` in the README.
fn readme_block(readme: &str, name: &str) -> String {
    let marker = format!("<!-- step-example:{name} -->");
    let after = &readme[readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README has no {marker}"))
        + marker.len()..];
    let start = after.find("```").unwrap();
    let body = &after[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("```").unwrap()].to_owned()
}

#[derive(Default)]
struct Lines(std::sync::Mutex<String>);

impl StepEvents for Lines {
    fn log(&self, _log: &str, channel: Channel, text: &str) {
        let tag = match channel {
            Channel::Stdout => "out",
            Channel::Stderr => "err",
            Channel::Header => "hdr",
        };
        let mut all = self.0.lock().unwrap();
        for line in text.lines() {
            all.push_str(&format!("[{tag}] {line}\n"));
        }
    }
}

#[test]
fn the_readme_step_builds_with_one_command_and_runs_in_the_sandbox() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let krate = tempfile::tempdir().unwrap();
    let manifest = readme_block(&readme, "Cargo.toml").replace(
        "../kiln/guest-sdk",
        root().join("guest-sdk").to_str().unwrap(),
    );
    std::fs::write(krate.path().join("Cargo.toml"), manifest).unwrap();
    std::fs::create_dir(krate.path().join("src")).unwrap();
    std::fs::write(
        krate.path().join("src/lib.rs"),
        readme_block(&readme, "src/lib.rs"),
    )
    .unwrap();
    // The same toolchain, and the workspace's lockfile so the build needs no network and
    // reuses what the workspace already compiled.
    std::fs::copy(
        root().join("rust-toolchain.toml"),
        krate.path().join("rust-toolchain.toml"),
    )
    .unwrap();
    std::fs::copy(root().join("Cargo.lock"), krate.path().join("Cargo.lock")).unwrap();

    let target_dir = root().join("target").join("guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The one command from the README.
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--offline",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .current_dir(krate.path())
        .status()
        .unwrap();
    assert!(status.success(), "building the README's step failed");
    let wasm = std::fs::read(target_dir.join("wasm32-wasip2/release/hello_step.wasm")).unwrap();

    let cache = tempfile::tempdir().unwrap();
    let rt = Runtime::new(RuntimeConfig {
        cache_dir: Some(cache.path().join("c")),
    })
    .unwrap();
    let Loaded::Step(step) = rt.load(&wasm, "hello_step.wasm").unwrap() else {
        panic!("the README's step is a step")
    };
    let Loaded::Observer(counter) = rt
        .load(steps::find("line-counter").unwrap().wasm, "line-counter")
        .unwrap()
    else {
        panic!("line-counter is an observer")
    };

    let workdir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let mut grant = Grant::new(
        workdir.path(),
        Arc::new(DirStore::new(store.path()).unwrap()),
    );
    grant.programs.push("wc".into());
    grant.confinement = Some(Arc::new(
        runtime::Confinement::probe(runtime::Helper::dedicated(target_helper()))
            .expect("this kernel confines"),
    ));
    let lines = Arc::new(Lines::default());
    let observers = [ObserverSpec {
        component: counter,
        name: "line-counter".into(),
        args: json!(null),
        log: "stdio".into(),
    }];
    let outcome = rt.run_step(StepRun {
        step: &step,
        args: &json!({"greeting": "hello, farm", "file": "greeting.txt"}),
        properties: &Properties::new(),
        observers: &observers,
        grant: &grant,
        events: lines.clone(),
        cancel: CancelToken::new(),
    });
    let log = lines.0.lock().unwrap().clone();
    assert_eq!(outcome.result, Outcome::Success, "{log}");
    assert_eq!(outcome.summary.as_deref(), Some("wrote 12 bytes"));
    assert_eq!(outcome.properties["greeting_bytes"], json!(12));
    assert_eq!(outcome.statistics["greetings"], 1.0);
    assert_eq!(
        outcome.statistics["lines"], 2.0,
        "wc's line and the greeting"
    );
    assert_eq!(
        std::fs::read_to_string(workdir.path().join("greeting.txt")).unwrap(),
        "hello, farm\n"
    );
    let expected_start = "[hdr] greeting into greeting.txt\n[hdr] $ wc -c greeting.txt\n[hdr]  confined (sandbox mode)\n[out] 12 greeting.txt\n[hdr] exit code 0, elapsed ";
    assert!(log.starts_with(expected_start), "{log}");
    assert!(log.ends_with("[out] hello, farm\n"), "{log}");
}

/// The `kiln-confine` helper, built by `cargo test --workspace` next to this test binary.
fn target_helper() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let helper = dir.join("kiln-confine");
    assert!(
        helper.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`",
        helper.display()
    );
    helper
}
