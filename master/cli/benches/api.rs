//! API benchmark: `cargo bench -p master --bench api` (release build; under a minute once
//! built). Does the API stay fast with a farm's history in the database?
//!
//! A SQLite database gets 10,000 finished builds on 4 builders (3 steps each, a 40-line log per
//! step, properties) and 200 pending requests, written through the master's own queries. A
//! real `kiln master` process then serves it, and each request a page of the web UI makes is
//! timed (the median of 30, over a fresh connection each, as a browser's first request is):
//! the builders page, the first and a deep page of builds, one builder's builds, a build page,
//! log lines, the pending queue with its estimates. The baseline, in the same run, is
//! `GET /api/v2/auth`: an API request that reads nothing, so each figure is also given as a
//! ratio to what any request costs.
//!
//! `cargo test --benches` runs this binary without `--bench`: then it seeds 500 builds.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_db::model::*;
use kiln_db::{self as db, Db};
use serde_json::json;

const BUILDERS: [&str; 4] = ["b0", "b1", "b2", "b3"];

fn config(dir: &Path) -> std::path::PathBuf {
    let mut text = String::from(
        "[master]\nname = \"bench\"\nlisten = \"127.0.0.1:0\"\nheartbeat = \"5s\"\n\n\
         [[workers]]\nname = \"w1\"\ntoken = \"t\"\n\n",
    );
    for b in BUILDERS {
        text.push_str(&format!(
            "[[builders]]\nname = \"{b}\"\ncollapse = false\n[[builders.steps]]\nmodule = \"shell\"\nargs = {{ command = [\"true\"] }}\n\n"
        ));
    }
    text.push_str("[[schedulers]]\nname = \"force\"\ntype = \"force\"\nbuilders = [\"b0\", \"b1\", \"b2\", \"b3\"]\n");
    let path = dir.join("kiln.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A forced buildset on one builder.
fn buildset(n: usize, builder: &str) -> NewBuildset {
    NewBuildset {
        scheduler: "force".into(),
        reason: format!("A build was forced by 'bench': {n}"),
        external_id: None,
        sourcestamps: vec![SourceStamp {
            repository: "https://example.org/app.git".into(),
            branch: Some("main".into()),
            revision: Some(format!("{n:040x}")),
            ..Default::default()
        }],
        properties: vec![SourcedProperty {
            name: "owner".into(),
            value: json!("bench"),
            source: "Force Build Form".into(),
        }],
        builders: vec![(builder.to_owned(), 0)],
        trusted: true,
        parent_build: None,
    }
}

/// Writes `builds` finished builds and `pending` queued requests; returns a build id and a
/// log id from the middle of the history.
async fn seed(db: &Db, builds: usize, pending: usize) -> (i64, i64) {
    let mut tx = db.begin().await.unwrap();
    let master = db::register_master(&mut tx, "seed", 0).await.unwrap();
    let ids = db::builder_ids(&mut tx).await.unwrap();
    let worker = db::worker_id(&mut tx, "w1").await.unwrap();
    let log_text: String = (0..40)
        .map(|i| format!("o[{i:02}] compiling module {i} of 40 ... ok\n"))
        .collect();
    let mut middle = (0, 0);
    let start = now_ms() - builds as i64 * 60_000;
    for n in 0..builds {
        let at = start + n as i64 * 60_000;
        let builder = BUILDERS[n % BUILDERS.len()];
        let (_, requests) = db::insert_buildset(&mut tx, &buildset(n, builder), &ids, at)
            .await
            .unwrap()
            .unwrap();
        let request = requests[0].0;
        assert!(
            db::claim_request(&mut tx, request, master, at)
                .await
                .unwrap()
        );
        let (build, _) = db::insert_build(&mut tx, request, worker, master, "c", at)
            .await
            .unwrap();
        for s in 0..3 {
            let name = format!("step {s}");
            let step = db::insert_step(&mut tx, &db::NewStep::started(build, s, &name, at))
                .await
                .unwrap();
            let log = db::insert_log(&mut tx, step, "stdio", "s", &log_text, true)
                .await
                .unwrap();
            db::finish_step(
                &mut tx,
                step,
                &db::StepEnd {
                    results: Results::Success,
                    state: "40 lines",
                    hidden: false,
                    urls: &json!([]),
                    statistics: &json!({"lines": 40}),
                    progress: &json!({"lines": 40}),
                    resources: None,
                },
                at + 20_000,
            )
            .await
            .unwrap();
            if n == builds / 2 && s == 1 {
                middle = (build.0, log);
            }
        }
        let result = if n % 7 == 0 {
            Results::Failure
        } else {
            Results::Success
        };
        db::finish_build(&mut tx, build, result, result.as_str(), at + 30_000)
            .await
            .unwrap();
        db::complete_request(&mut tx, request, master, result, None, at + 30_000)
            .await
            .unwrap();
    }
    for n in 0..pending {
        db::insert_buildset(
            &mut tx,
            &buildset(builds + n, BUILDERS[n % BUILDERS.len()]),
            &ids,
            now_ms(),
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    middle
}

/// A child process stopped when dropped.
struct Watched(Child);

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` over a fresh connection: (time, body length).
fn get(addr: &str, path: &str) -> (Duration, usize) {
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    let took = t.elapsed();
    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "GET {path}: {}",
        String::from_utf8_lossy(&response[..response.len().min(300)])
    );
    (took, response.len())
}

fn median(addr: &str, path: &str, runs: usize) -> (Duration, usize) {
    let mut times: Vec<(Duration, usize)> = (0..runs).map(|_| get(addr, path)).collect();
    times.sort();
    times[runs / 2]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (builds, pending, runs) = if full {
        (10_000, 200, 30)
    } else {
        (500, 20, 3)
    };
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("kiln.sqlite").display()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seeded = Instant::now();
    let (build, log) = rt.block_on(async {
        // The master's own start syncs builders and workers; do it first, then seed.
        let cfg = kiln_config::load(&config).unwrap();
        let master = master::server::Master::start(cfg, Some(&url))
            .await
            .unwrap();
        let db = master.db.clone();
        let seeded = seed(&db, builds, pending).await;
        drop(master);
        seeded
    });
    eprintln!(
        "seeded {builds} builds and {pending} pending requests in {:.1} s",
        seeded.elapsed().as_secs_f64()
    );
    let log_file = dir.path().join("master.log");
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["master", "--poll", "1"])
        .arg("--config")
        .arg(&config)
        .arg("--db")
        .arg(&url)
        .env("KILN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_file).unwrap())
        .spawn()
        .unwrap();
    let _child = Watched(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        let text = std::fs::read_to_string(&log_file).unwrap_or_default();
        if let Some((_, rest)) = text.split_once("API on http://")
            && let Some((addr, _)) = rest.split_once('/')
        {
            break addr.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "kiln master did not start:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let pages: Vec<(&str, String)> = vec![
        ("builders page", "/api/v2/builders".into()),
        ("builds, first page", "/api/v2/builds?limit=50".into()),
        (
            "builds, page 100",
            format!("/api/v2/builds?limit=50&offset={}", (builds / 2).min(4950)),
        ),
        (
            "one builder's failures",
            "/api/v2/builds?builder=b1&results=FAILURE&limit=50".into(),
        ),
        ("build page", format!("/api/v2/builds/{build}")),
        (
            "log lines 10-29",
            format!("/api/v2/logs/{log}/contents?offset=10&limit=20"),
        ),
        (
            "pending queue with estimates",
            "/api/v2/buildrequests?complete=false&limit=100".into(),
        ),
    ];
    let (baseline, _) = median(&addr, "/api/v2/auth", runs);
    let mut rows = Vec::new();
    for (label, path) in &pages {
        let (t, bytes) = median(&addr, path, runs);
        let figure = json!({
            "bench": "api", "page": label, "path": path, "builds": builds,
            "median_ms": t.as_secs_f64() * 1e3, "bytes": bytes,
            "ratio_to_empty_request": t.as_secs_f64() / baseline.as_secs_f64(),
        });
        println!("{figure}");
        rows.push((label.to_string(), t, bytes));
    }
    println!(
        "{}",
        json!({"bench": "api", "page": "baseline: GET /api/v2/auth", "median_ms": baseline.as_secs_f64() * 1e3})
    );
    println!(
        "\n{builds} builds in the database; median of {runs} requests, each on a new connection"
    );
    println!(
        "{:<32} {:>9} {:>9} {:>10}",
        "page", "ms", "x empty", "bytes"
    );
    println!(
        "{:<32} {:>9.2} {:>9} {:>10}",
        "empty request (baseline)",
        baseline.as_secs_f64() * 1e3,
        "1.0",
        ""
    );
    for (label, t, bytes) in rows {
        println!(
            "{label:<32} {:>9.2} {:>9.1} {bytes:>10}",
            t.as_secs_f64() * 1e3,
            t.as_secs_f64() / baseline.as_secs_f64()
        );
    }
}
