//! W5, scale: one `kiln master` with 100,000 queued requests and 1,000 simulated workers.
//!
//! The requests are queued before the master starts (through `db::insert_buildset`, one
//! transaction, as force requests would be: a buildset of one request each, on one builder that
//! does not collapse). The workers are tokio tasks of this process that speak the real worker
//! protocol (`runtime::protocol`) over real WebSockets on 127.0.0.1: hello, welcome, status
//! every heartbeat, scan answers, and for every Start the build's end (`Finished`, SUCCESS)
//! at once. They are the load, not something under test: the master cannot tell them from
//! `kiln-worker`s with `max_builds = 1` whose builds take no time. As a real worker does, each
//! lists a build as running until the master acknowledged its end.
//!
//! Figures: the master's resident memory with the queue before any worker connects, and its
//! peak (VmHWM) at the end; the time for the 1,000 to connect; builds/s over the drain;
//! **dispatch latency**, per worker, from sending a build's end (its one slot frees when the
//! master applies that message) to the next Start arriving, over every build but each
//! worker's first (whose wait, from the welcome, is reported apart); and the proof that nothing
//! was lost or built twice: every request complete with SUCCESS and exactly one build, no other
//! builds, no Stop or refusal seen by any worker, each build id started once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use kiln_db::model::*;
use kiln_db::{self as db, Db};
use kiln_protocol::{
    BuildEvent, BuildRef, CONNECT_PATH, Capabilities, PROTOCOL_VERSION, ToMaster, ToWorker,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::procs::{self, Backend, MasterProc};

/// The builder the requests queue on.
const BUILDER: &str = "sim";

/// How big W5 is: `KILN_BENCH_W5` as `REQUESTS,WORKERS` scales it (to profile, or try it out).
pub fn scale() -> (usize, usize) {
    let Ok(text) = std::env::var("KILN_BENCH_W5") else {
        return if super::benchmarking() {
            (100_000, 1_000)
        } else {
            (500, 50)
        };
    };
    let (r, w) = text
        .split_once(',')
        .expect("KILN_BENCH_W5=REQUESTS,WORKERS");
    (r.trim().parse().unwrap(), w.trim().parse().unwrap())
}

fn config(port: u16, workers: usize) -> String {
    let mut t = format!(
        "[master]\nname = \"bench-w5\"\nlisten = \"127.0.0.1:{port}\"\nheartbeat = \"5s\"\nanonymous = \"read\"\n\n"
    );
    for i in 0..workers {
        t += &format!("[[workers]]\nname = \"s{i:04}\"\ntoken = \"t{i}\"\n");
    }
    t += &format!(
        "\n[[builders]]\nname = \"{BUILDER}\"\ncollapse = false\ngrant = {{ programs = [\"true\"] }}\n\
         [[builders.steps]]\nmodule = \"shell\"\nargs = {{ command = [\"true\"] }}\n\n\
         [[schedulers]]\nname = \"force\"\ntype = \"force\"\nbuilders = [\"{BUILDER}\"]\n"
    );
    t
}

/// Queues `n` requests as force requests would, one buildset each, in one transaction.
async fn fill(db: &Db, n: usize) {
    let mut tx = db.begin().await.unwrap();
    let ids = db::builder_ids(&mut tx).await.unwrap();
    let now = now_ms();
    for i in 0..n {
        let bs = NewBuildset {
            scheduler: "force".into(),
            reason: format!("A build was forced by 'bench': {i}"),
            external_id: None,
            sourcestamps: vec![SourceStamp {
                repository: "https://example.org/app.git".into(),
                branch: Some("main".into()),
                revision: Some(format!("{i:040x}")),
                ..Default::default()
            }],
            properties: vec![SourcedProperty {
                name: "owner".into(),
                value: json!("bench"),
                source: "Force Build Form".into(),
            }],
            builders: vec![(BUILDER.to_owned(), 0)],
            trusted: true,
            parent_build: None,
        };
        db::insert_buildset(&mut tx, &bs, &ids, now)
            .await
            .unwrap()
            .unwrap();
    }
    tx.commit().await.unwrap();
}

/// What the simulated workers saw, together.
#[derive(Default)]
struct Tally {
    /// Connect to welcome, per worker.
    connect: Vec<Duration>,
    /// Welcome to the first Start, per worker that got one.
    first: Vec<Duration>,
    /// A build's end sent to the next Start arriving.
    dispatch: Vec<Duration>,
    /// Starts per build id.
    starts: HashMap<i64, u32>,
    /// Builds whose end the master acknowledged.
    acked: usize,
    /// When the first Start and the last acknowledgement arrived.
    first_start: Option<Instant>,
    last_ack: Option<Instant>,
    stops: usize,
    errors: Vec<String>,
}

type Shared = Arc<Mutex<Tally>>;

fn lock(t: &Shared) -> std::sync::MutexGuard<'_, Tally> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

fn text(m: &ToMaster) -> Message {
    Message::text(serde_json::to_string(m).unwrap())
}

/// One simulated worker, until `done` changes.
async fn worker(
    port: u16,
    i: usize,
    tally: Shared,
    mut done: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let url = format!("ws://127.0.0.1:{port}{CONNECT_PATH}");
    let t0 = Instant::now();
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
    let (mut sink, mut stream) = ws.split();
    let hello = ToMaster::Hello {
        protocol: PROTOCOL_VERSION,
        name: format!("s{i:04}"),
        token: format!("t{i}"),
        capabilities: Capabilities {
            arch: std::env::consts::ARCH.into(),
            os: std::env::consts::OS.into(),
            tags: vec![],
            sandbox: false,
            landlock_abi: 0,
            max_builds: 1,
            version: "bench".into(),
        },
        running: vec![],
    };
    sink.send(text(&hello)).await?;
    let heartbeat = loop {
        let Some(frame) = stream.next().await else {
            anyhow::bail!("closed before the welcome")
        };
        if let Message::Text(t) = frame? {
            match serde_json::from_str::<ToWorker>(&t)? {
                ToWorker::Welcome { heartbeat_ms, .. } => {
                    break Duration::from_millis(heartbeat_ms);
                }
                other => anyhow::bail!("before the welcome: {other:?}"),
            }
        }
    };
    lock(&tally).connect.push(t0.elapsed());
    // When this worker's slot became free, and whether that was the welcome.
    let mut free_since = Some((Instant::now(), true));
    // Builds whose end is not acknowledged yet: still "running", as a real worker says.
    let mut unacked: Vec<BuildRef> = Vec::new();
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    loop {
        tokio::select! {
            frame = stream.next() => {
                let Some(frame) = frame else { anyhow::bail!("the master closed the connection") };
                let Message::Text(t) = frame? else { continue };
                match serde_json::from_str::<ToWorker>(&t)? {
                    ToWorker::Start(job) => {
                        let now = Instant::now();
                        {
                            let mut t = lock(&tally);
                            match free_since.take() {
                                Some((since, true)) => t.first.push(now - since),
                                Some((since, false)) => t.dispatch.push(now - since),
                                None => t.errors.push(format!("s{i:04}: a Start while busy")),
                            }
                            *t.starts.entry(job.build.id).or_default() += 1;
                            t.first_start.get_or_insert(now);
                        }
                        let end = ToMaster::Build {
                            build: job.build.clone(),
                            seq: 1,
                            event: BuildEvent::Finished {
                                result: runtime::Outcome::Success,
                                message: None,
                                properties: Default::default(),
                            },
                        };
                        sink.send(text(&end)).await?;
                        unacked.push(job.build);
                        free_since = Some((Instant::now(), false));
                    }
                    ToWorker::Ack { build, seq } if seq >= 1 && unacked.contains(&build) => {
                        unacked.retain(|b| *b != build);
                        let mut t = lock(&tally);
                        t.acked += 1;
                        t.last_ack = Some(Instant::now());
                    }
                    ToWorker::Scan { scan } => {
                        let status = ToMaster::Status { scan: Some(scan), running: unacked.clone() };
                        sink.send(text(&status)).await?;
                    }
                    ToWorker::Stop { .. } | ToWorker::StopStep { .. } => lock(&tally).stops += 1,
                    ToWorker::Error { message } => lock(&tally).errors.push(format!("s{i:04}: {message}")),
                    _ => {}
                }
            }
            _ = beat.tick() => {
                let status = ToMaster::Status { scan: None, running: unacked.clone() };
                sink.send(text(&status)).await?;
            }
            _ = done.changed() => {
                let _ = sink.send(Message::Close(None)).await;
                return Ok(());
            }
        }
    }
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let k = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[k].as_secs_f64() * 1000.0
}

/// Runs W5 in `dir`; its JSON object.
pub fn run(backend: &Backend, dir: &Path) -> Value {
    let (requests, workers) = scale();
    let port = procs::free_port();
    let config_path = dir.join("kiln.toml");
    std::fs::write(&config_path, config(port, workers)).unwrap();
    let url = backend.database(dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = Instant::now();
    rt.block_on(async {
        // The master's own start creates the builder and worker rows; then the queue.
        let cfg = kiln_config::load(&config_path).unwrap();
        let m = master::server::Master::start(cfg, Some(&url))
            .await
            .unwrap();
        fill(&m.db, requests).await;
        if matches!(backend, Backend::Postgres(_)) {
            // As autovacuum would have by the time a farm queued this many.
            sqlx::query("ANALYZE").execute(m.db.pool()).await.unwrap();
        }
    });
    eprintln!(
        "W5: queued {requests} requests in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut master = MasterProc::spawn(dir, &url, port);
    master.wait_ready(Duration::from_secs(60));
    let rss_queued = procs::proc_status_kib(master.pid(), "VmRSS") as f64 / 1024.0;
    let cpu_before = procs::cpu_ms(master.pid());

    let tally: Shared = Arc::default();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let (connected, drained) = rt.block_on(async {
        let tasks: Vec<_> = (0..workers)
            .map(|i| {
                let (tally, done) = (tally.clone(), done_rx.clone());
                tokio::spawn(async move {
                    if let Err(e) = worker(port, i, tally.clone(), done).await {
                        lock(&tally).errors.push(format!("s{i:04}: {e:#}"));
                    }
                })
            })
            .collect();
        let mut connected = None;
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let t = lock(&tally);
            if connected.is_none() && t.connect.len() == workers {
                connected = Some(started.elapsed());
            }
            if t.acked >= requests || !t.errors.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "W5 timed out: {} of {requests} builds done",
                t.acked
            );
        }
        {
            let t = lock(&tally);
            assert!(
                t.errors.is_empty(),
                "W5: {:?}",
                &t.errors[..t.errors.len().min(10)]
            );
        }
        // A few seconds more: anything the master would still dispatch shows up as a Start.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let drained = {
            let t = lock(&tally);
            t.last_ack.unwrap() - t.first_start.unwrap()
        };
        let _ = done_tx.send(true);
        for task in tasks {
            let _ = task.await;
        }
        (connected, drained)
    });
    let hwm = procs::vm_hwm_mib(master.pid());
    let master_cpu = procs::cpu_ms(master.pid()) - cpu_before;
    drop(master);

    let mut t = std::mem::take(&mut *lock(&tally));
    assert!(
        t.errors.is_empty(),
        "W5: {:?}",
        &t.errors[..t.errors.len().min(10)]
    );
    let twice = t.starts.values().filter(|&&n| n > 1).count();
    // The database's account: every request complete with SUCCESS and built exactly once.
    let check = rt.block_on(async {
        let db = Db::connect(&url).await.unwrap();
        let count = async |sql: &str| -> i64 {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(db.pool())
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        };
        json!({
            "requests": count("SELECT COUNT(*) FROM buildrequests").await,
            "complete_success": count("SELECT COUNT(*) FROM buildrequests WHERE complete = 1 AND results = 0").await,
            "builds": count("SELECT COUNT(*) FROM builds").await,
            "builds_not_success": count("SELECT COUNT(*) FROM builds WHERE results IS NULL OR results <> 0").await,
            "requests_built_twice": count("SELECT COUNT(*) FROM (SELECT request_id FROM builds GROUP BY request_id HAVING COUNT(*) > 1) t").await,
            "requests_never_built": count("SELECT COUNT(*) FROM buildrequests r WHERE NOT EXISTS (SELECT 1 FROM builds b WHERE b.request_id = r.id)").await,
        })
    });
    let n = requests as i64;
    let exact = check["requests"] == n
        && check["complete_success"] == n
        && check["builds"] == n
        && check["builds_not_success"] == 0
        && check["requests_built_twice"] == 0
        && check["requests_never_built"] == 0
        && t.starts.len() == requests
        && twice == 0
        && t.stops == 0;
    t.dispatch.sort();
    t.first.sort();
    t.connect.sort();
    let figure = json!({
        "workload": "W5", "db": backend.name(), "requests": requests, "workers": workers,
        "master_rss_queued_mib": rss_queued, "master_vm_hwm_mib": hwm,
        "connect_all_s": connected.map(|d| d.as_secs_f64()),
        "connect_p50_ms": percentile_ms(&t.connect, 0.5),
        "connect_p99_ms": percentile_ms(&t.connect, 0.99),
        "drain_s": drained.as_secs_f64(),
        "builds_per_s": requests as f64 / drained.as_secs_f64(),
        "master_cpu_ms_per_build": master_cpu / requests as f64,
        "dispatch_samples": t.dispatch.len(),
        "dispatch_p50_ms": percentile_ms(&t.dispatch, 0.5),
        "dispatch_p99_ms": percentile_ms(&t.dispatch, 0.99),
        "dispatch_max_ms": percentile_ms(&t.dispatch, 1.0),
        "first_dispatch_p50_ms": percentile_ms(&t.first, 0.5),
        "first_dispatch_p99_ms": percentile_ms(&t.first, 0.99),
        "starts": t.starts.values().sum::<u32>(), "build_ids_started_twice": twice,
        "stops_seen": t.stops, "database": check, "each_request_built_once": exact,
    });
    assert!(exact, "W5 lost or repeated work: {figure}");
    figure
}
