//! `kiln demo`, as the README tells a newcomer to run it: a real master, real workers (a
//! sandbox one where the kernel can confine), a real git project, forced and change-made
//! builds.

use std::process::Command;

use kiln_db::model::Results;
use kiln_db::{self as db, Db};

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_builds_its_sample_project_forced_and_on_a_commit_then_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let farm = dir.path().join("farm");
    let demo = |farm: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "demo",
                "--listen",
                "127.0.0.1:0",
                "--exit-when-done",
                "--dir",
            ])
            .arg(farm)
            .env("KILN_CACHE_DIR", dir.path().join("cache"))
            .output()
            .unwrap()
    };
    let out = demo(&farm);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let sandbox = !stderr.contains("no sandbox worker");
    let builders = if sandbox { 2 } else { 1 };
    assert!(stderr.contains("/api/v2/builds"), "{stderr}");
    // Forced builds test the first commit (3 tests), the change's builds the second (4).
    assert_eq!(
        stdout.matches("test: 3 passed").count(),
        builders,
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("test: 4 passed").count(),
        builders,
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("compile: 1 warning (WARNINGS)").count(),
        builders * 2
    );
    assert_eq!(
        stdout.matches("artifact: greet (96 bytes").count(),
        builders * 2
    );

    // What the database says: every build on its worker, the change's builds at its revision.
    let head = String::from_utf8(
        Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(farm.join("project"))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let db = Db::connect(&format!(
        "sqlite://{}?mode=rwc",
        farm.join("kiln.sqlite").display()
    ))
    .await
    .unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let mut builds = db::builds(&mut conn, None, 100).await.unwrap();
    builds.reverse();
    assert_eq!(builds.len(), builders * 2);
    for (i, b) in builds.iter().enumerate() {
        assert_eq!(b.results, Some(Results::Warnings), "{b:?}");
        let worker = if b.builder == "sample" {
            "local"
        } else {
            "sandbox"
        };
        assert_eq!(b.worker.as_deref(), Some(worker), "{b:?}");
        let props = db::build_properties(&mut conn, b.id).await.unwrap();
        let got = props.iter().find(|p| p.name == "got_revision").unwrap();
        let at_head = got.value.as_str() == Some(head.trim());
        assert_eq!(at_head, i >= builders, "build {i}: {got:?}, head {head}");
    }
    drop(conn);
    db.close().await;

    // Run again in the same directory: the farm and its history are kept.
    let out = demo(&farm);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("sample #3 on local"), "{stdout}");
    assert!(stdout.contains("test: 5 passed"), "{stdout}");
}
