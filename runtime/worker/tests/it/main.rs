//! The `kiln-worker` binary as a user runs it: what it refuses before it connects, and how it
//! says so. (The worker against a real master is the farm tests', in `master/cli/tests/it`.)

use std::process::{Command, Output};

fn worker(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln-worker"));
    c.args(args);
    for var in [
        "KILN_MASTER",
        "KILN_NAME",
        "KILN_TOKEN",
        "KILN_SANDBOX",
        "KILN_WORKER_CONFIG",
    ] {
        c.env_remove(var);
    }
    c.envs(env.iter().copied());
    c.output().expect("running kiln-worker")
}

fn refused(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn says_which_setting_is_missing_and_where_it_goes() {
    let err = refused(&worker(&["--name", "w1", "--token", "t"], &[]));
    assert!(
        err.contains(
            "no master URL: pass --master, set KILN_MASTER, or write `master = ...` in --config"
        ),
        "{err}"
    );
    let err = refused(&worker(
        &["--master", "http://127.0.0.1:1"],
        &[("KILN_NAME", "w1")],
    ));
    assert!(
        err.contains("no token: pass --token, set KILN_TOKEN"),
        "{err}"
    );
}

#[test]
fn refuses_a_name_the_master_could_not_hold() {
    for bad in ["../w", "-w", "a b", ""] {
        // As `--name=VALUE`, so clap takes "-w" for the value, not for a flag.
        let name = format!("--name={bad}");
        let err = refused(&worker(
            &["--master", "http://127.0.0.1:1", "--token", "t", &name],
            &[],
        ));
        assert!(
            err.contains("--name: ") && err.contains("is not a valid name"),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn refuses_zero_builds_and_unknown_config_keys() {
    let err = refused(&worker(
        &[
            "--master",
            "http://127.0.0.1:1",
            "--token",
            "t",
            "--name",
            "w1",
            "--max-builds",
            "0",
        ],
        &[],
    ));
    assert!(err.contains("--max-builds 0"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("worker.toml");
    std::fs::write(
        &file,
        "master = \"http://127.0.0.1:1\"\nname = \"w1\"\ntoken = \"t\"\nsandbx = true\n",
    )
    .unwrap();
    let err = refused(&worker(&["--config", file.to_str().unwrap()], &[]));
    assert!(err.contains("unknown field `sandbx`"), "{err}");
}

#[test]
fn prints_its_version() {
    let out = worker(&["--version"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("kiln-worker "));
}
