//! A real `kiln master` process, killed (SIGKILL) at random moments while changes pour in and
//! timers fire, and restarted: afterwards no change, buildset or request is lost, every change
//! is built exactly once per scheduler, and no timer fired twice.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_db::model::*;
use kiln_db::{self as db, Db};

use kiln_testkit::db::TestDb;
use kiln_testkit::on_both_databases;

on_both_databases!(a_master_killed_at_any_moment_loses_nothing_and_fires_nothing_twice);

const CONFIG: &str = r#"
[master]
name = "crashy"
heartbeat = "1s"
# Tests run side by side: let the system pick a free port.
listen = "127.0.0.1:0"

[[workers]]
name = "w1"
token = "t"

[[builders]]
name = "a"
collapse = false
[[builders.steps]]
module = "shell"
args = { command = ["true"] }

[[builders]]
name = "b"
collapse = false
[[builders.steps]]
module = "shell"
args = { command = ["true"] }

[[schedulers]]
name = "every-change"
type = "single-branch"
branch = "main"
builders = ["a", "b"]

[[schedulers]]
name = "stable"
type = "single-branch"
branch = "main"
tree_stable_timer = "300ms"
builders = ["a"]

[[schedulers]]
name = "tick"
type = "periodic"
interval = "1s"
builders = ["b"]
"#;

fn start(config: &Path, url: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["master", "--poll", "0.02", "--db", url, "--config"])
        .arg(config)
        .env("KILN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

async fn wait_until(db: &Db, what: &str, mut ok: impl AsyncFnMut(&Db) -> bool) {
    let start = Instant::now();
    while !ok(db).await {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_master_killed_at_any_moment_loses_nothing_and_fires_nothing_twice(t: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let db = t.db.clone();
    let mut child = start(&config, &t.url);
    // The change schedulers start reading at the newest change once they first run.
    wait_until(&db, "schedulers to start", async |db| {
        let mut c = db.pool().acquire().await.unwrap();
        db::get_state(&mut c, "stable", "last_change")
            .await
            .unwrap()
            .is_some()
            && db::get_state(&mut c, "every-change", "last_change")
                .await
                .unwrap()
                .is_some()
    })
    .await;

    let mut sent = Vec::new();
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut next_kill = Instant::now() + Duration::from_millis(rand::random_range(50..400));
    let mut n = 0;
    while Instant::now() < deadline {
        n += 1;
        let change = NewChange {
            author: format!("dev{}", n % 5),
            branch: Some("main".into()),
            revision: Some(format!("{n:040x}")),
            files: vec![format!("src/f{n}.rs")],
            source: "test".into(),
            ..Default::default()
        };
        let id = master::changes::add_change(&db, &change)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        sent.push(id);
        if Instant::now() >= next_kill {
            child.kill().unwrap();
            child.wait().unwrap();
            kills += 1;
            child = start(&config, &t.url);
            next_kill = Instant::now() + Duration::from_millis(rand::random_range(50..700));
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..15))).await;
    }
    assert!(kills >= 5, "only {kills} kills");
    // Let the last master catch up (the stable timer and a periodic tick), then stop it.
    let last = *sent.last().unwrap();
    wait_until(&db, "every change to be built", async |db| {
        let mut c = db.pool().acquire().await.unwrap();
        let every = db::get_state(&mut c, "every-change", "last_change")
            .await
            .unwrap();
        let held = db::classified_changes(&mut c, "stable").await.unwrap();
        every.and_then(|v| v.as_i64()) == Some(last.0)
            && db::get_state(&mut c, "stable", "last_change")
                .await
                .unwrap()
                .and_then(|v| v.as_i64())
                == Some(last.0)
            && held.is_empty()
    })
    .await;
    terminate(&child);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");

    let mut c = db.pool().acquire().await.unwrap();
    assert_eq!(
        db::count_changes(&mut c).await.unwrap() as usize,
        sent.len()
    );
    for scheduler in ["every-change", "stable"] {
        let mut built: BTreeMap<ChangeId, usize> = BTreeMap::new();
        for bs in db::buildsets_of(&mut c, scheduler).await.unwrap() {
            let stamps = db::buildset_sourcestamps(&mut c, bs.id).await.unwrap();
            for ch in &stamps[0].changes {
                *built.entry(*ch).or_default() += 1;
            }
            let requests = db::buildset_requests(&mut c, bs.id).await.unwrap();
            let want = if scheduler == "stable" { 1 } else { 2 };
            assert_eq!(requests.len(), want, "buildset {} lost requests", bs.id);
        }
        for id in &sent {
            assert_eq!(
                built.get(id),
                Some(&1),
                "{scheduler}: change {id} built {:?} times",
                built.get(id)
            );
        }
        assert_eq!(
            built.len(),
            sent.len(),
            "{scheduler}: built changes that were never sent"
        );
    }
    // The periodic scheduler: one buildset per due time, due times at least an interval apart.
    let ticks = db::buildsets_of(&mut c, "tick").await.unwrap();
    assert!(ticks.len() >= 3, "{} ticks", ticks.len());
    let dues: Vec<i64> = ticks
        .iter()
        .map(|b| {
            b.external_id
                .as_deref()
                .unwrap()
                .strip_prefix("timer:")
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    for pair in dues.windows(2) {
        assert!(
            pair[1] - pair[0] >= 1000,
            "fired twice within an interval: {dues:?}"
        );
    }
    // Every request is queued, none claimed by a dead master.
    let queued = db::queued_requests(&mut c, None, 1_000_000, 0)
        .await
        .unwrap();
    let every = db::buildsets_of(&mut c, "every-change")
        .await
        .unwrap()
        .len();
    let stable = db::buildsets_of(&mut c, "stable").await.unwrap().len();
    assert_eq!(queued.len(), every * 2 + stable + ticks.len());
    eprintln!(
        "{kills} kills; {} changes; buildsets: {every} every-change, {stable} stable, {} ticks",
        sent.len(),
        ticks.len()
    );
}

fn terminate(child: &Child) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}
