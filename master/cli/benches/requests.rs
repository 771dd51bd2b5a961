//! Request benchmark: `cargo bench -p master --bench requests` (release build; about two
//! minutes). One JSON object per measurement, then a table. Each database is measured against
//! its own baseline in the same run: what one commit of a one-row INSERT costs.
//!
//! On a SQLite file and on a durable PostgreSQL (fsync on):
//!
//! (a) the baseline: N one-row INSERTs as N transactions, and as one transaction;
//! (b) 10,000 force requests through `schedulers::force`, one client after the other: each a
//!     buildset with one request, spread over 4 builders that do not collapse;
//! (c) claiming them all through `requests::claim_for_workers`: passes over 50 free workers of 2
//!     builds each (every pass starts with all of them free, as if the last builds had
//!     finished) until the queue is empty; then a check that each request was claimed exactly
//!     once (one claim row each, no request in two assignments, nothing left queued);
//! (d) 100,000 queued requests (25,000 buildsets on the 4 builders, inserted through
//!     `db::insert_buildset` in one transaction; then PostgreSQL's ANALYZE, as autovacuum would
//!     have run by the time a farm has queued that many): the peak resident memory (VmHWM) of a real
//!     `kiln master` process running scheduler passes and heartbeats over them for 3 s while its
//!     API serves the queue (`GET /api/v2/buildrequests`, the first 1,000) three times, and of a
//!     fresh master process (this binary, run again as a child) that starts and runs one claim
//!     pass over them; each beside the same process on an empty database;
//! (e) one force request to a builder that collapses (the default) while 0, 100 and 1,000
//!     requests it cannot collapse (other revisions) are queued there: the collapse scan reads
//!     every queued request of the builder and compares source stamps and properties, so a
//!     submit costs O(queue). On PostgreSQL the deepest queue is measured again after ANALYZE:
//!     a database younger than autovacuum's first visit plans that scan worse.
//!
//! `cargo test --benches` runs this binary without `--bench`: then everything is scaled down.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_config as config;
use kiln_db::model::*;
use kiln_db::{self as db, Db};
use kiln_testkit::pgtemp::TempPostgres;
use master::requests::{self, FreeWorker};
use master::schedulers::{self, ForceRequest};
use master::server::Master;
use serde_json::{Value, json};

/// Builders the requests are spread over; none collapses.
const BUILDERS: [&str; 4] = ["b0", "b1", "b2", "b3"];
/// A builder with the default `collapse = true`, for (e).
const COLLAPSING: &str = "collapsing";
/// Free workers offered to each claim pass.
const WORKERS: usize = 50;
/// Builds each worker may run at once.
const MAX_BUILDS: u32 = 2;
/// How long the `kiln master` process runs before its peak memory is read.
const MASTER_RUN: Duration = Duration::from_secs(3);
/// Set in the environment of the child process that runs one claim pass, to the database URL.
const CHILD_URL: &str = "KILN_BENCH_CLAIM_URL";
/// Set with [`CHILD_URL`]: the configuration file of the child's master.
const CHILD_CONFIG: &str = "KILN_BENCH_CLAIM_CONFIG";

/// How much work a run does.
struct Scale {
    /// Force requests submitted and claimed, (b) and (c).
    requests: usize,
    /// One-row INSERTs of the baseline, (a).
    baseline_rows: usize,
    /// Queued requests for the memory figures, (d).
    queued: usize,
    /// Queue depths of the collapsing builder, (e).
    depths: &'static [usize],
    /// Force requests timed at each depth.
    per_depth: usize,
}

/// The farm: 50 workers, the 4 builders, the collapsing one, and a force scheduler for all.
fn config_text(master_name: &str) -> String {
    // Port 0: several masters run at once, and the API's address is read from the log.
    let mut t = format!(
        "[master]\nname = \"{master_name}\"\nheartbeat = \"1s\"\nlisten = \"127.0.0.1:0\"\n"
    );
    for i in 0..WORKERS {
        t += &format!(
            "\n[[workers]]\nname = \"w{i:02}\"\ntoken = \"token-{i}\"\nmax_builds = {MAX_BUILDS}\n"
        );
    }
    let step = "[[builders.steps]]\nmodule = \"shell\"\nargs = { command = [\"true\"] }\n";
    for b in BUILDERS {
        t += &format!("\n[[builders]]\nname = \"{b}\"\ncollapse = false\n{step}");
    }
    t += &format!("\n[[builders]]\nname = \"{COLLAPSING}\"\n{step}");
    let all: Vec<String> = BUILDERS
        .iter()
        .chain([&COLLAPSING])
        .map(|b| format!("{b:?}"))
        .collect();
    t += &format!(
        "\n[[schedulers]]\nname = \"force\"\ntype = \"force\"\nbuilders = [{}]\n",
        all.join(", ")
    );
    t
}

/// Writes the configuration for `master_name` into `dir` and returns its path.
fn write_config(dir: &Path, master_name: &str) -> PathBuf {
    let path = dir.join(format!("{master_name}.toml"));
    std::fs::write(&path, config_text(master_name)).unwrap();
    path
}

fn load_config(path: &Path) -> config::Config {
    config::load(path).unwrap_or_else(|e| panic!("{e}"))
}

/// The workers of one claim pass, all free.
fn free_workers() -> Vec<FreeWorker> {
    (0..WORKERS)
        .map(|i| FreeWorker {
            name: format!("w{i:02}"),
            arch: None,
            os: None,
            tags: vec![],
            sandbox: false,
            running_builds: 0,
            max_builds: MAX_BUILDS,
        })
        .collect()
}

/// A field of /proc/PID/status in KiB (`VmHWM`, `VmRSS`).
fn proc_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The measurements so far, for the table at the end.
#[derive(Default)]
struct Report {
    rows: Vec<(String, String, String)>,
}

impl Report {
    fn emit(&mut self, name: &str, value: Value, shown: String, ratio: String) {
        let mut obj = json!({"bench": name});
        obj.as_object_mut()
            .unwrap()
            .extend(value.as_object().unwrap().clone());
        println!("{obj}");
        self.rows.push((name.to_owned(), shown, ratio));
    }

    fn table(&self) {
        println!();
        println!("{:<44} {:<66} vs baseline", "benchmark", "figure");
        for (name, shown, ratio) in &self.rows {
            println!("{name:<44} {shown:<66} {ratio}");
        }
    }
}

/// What one commit costs on this database, measured in (a).
#[derive(Clone, Copy)]
struct Baseline {
    /// One one-row INSERT in its own transaction.
    commit: Duration,
    /// One one-row INSERT inside a large transaction.
    row: Duration,
}

/// (a): one-row INSERTs into a scratch table, each committed, then all in one transaction.
async fn baseline(db: &Db, label: &str, rows: usize, report: &mut Report) -> Baseline {
    let mut conn = db.pool().acquire().await.unwrap();
    sqlx::query(
        "CREATE TABLE bench_rows (id BIGINT PRIMARY KEY, note TEXT NOT NULL, at BIGINT NOT NULL)",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let insert = "INSERT INTO bench_rows (id, note, at) VALUES ($1, $2, $3)";
    let t = Instant::now();
    for i in 0..rows {
        sqlx::query(insert)
            .bind(i as i64)
            .bind(format!("row {i}"))
            .bind(now_ms())
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let separate = t.elapsed();
    drop(conn);
    let t = Instant::now();
    let mut tx = db.begin().await.unwrap();
    for i in rows..2 * rows {
        sqlx::query(insert)
            .bind(i as i64)
            .bind(format!("row {i}"))
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let single = t.elapsed();
    let b = Baseline {
        commit: separate / rows as u32,
        row: single / rows as u32,
    };
    report.emit(
        &format!("{label}.a.insert_per_commit"),
        json!({"rows": rows, "elapsed_ms": ms(separate), "us_per_row": us(b.commit), "rows_per_s": rows as f64 / separate.as_secs_f64()}),
        format!(
            "{:.0} rows/s ({:.1} us per one-row transaction)",
            rows as f64 / separate.as_secs_f64(),
            us(b.commit)
        ),
        "baseline".into(),
    );
    report.emit(
        &format!("{label}.a.insert_one_transaction"),
        json!({"rows": rows, "elapsed_ms": ms(single), "us_per_row": us(b.row), "rows_per_s": rows as f64 / single.as_secs_f64(), "commit_over_row": b.commit.as_secs_f64() / b.row.as_secs_f64()}),
        format!(
            "{:.0} rows/s ({:.1} us per row)",
            rows as f64 / single.as_secs_f64(),
            us(b.row)
        ),
        format!(
            "a commit costs {:.1}x a row",
            b.commit.as_secs_f64() / b.row.as_secs_f64()
        ),
    );
    b
}

/// A force request for request number `i`: one builder, its own revision.
fn force_request(i: usize, builder: &str) -> ForceRequest {
    ForceRequest {
        builders: vec![builder.into()],
        reason: format!("bench {i}"),
        owner: "bench".into(),
        branch: Some("main".into()),
        revision: Some(format!("{i:040x}")),
        repository: Some("https://example.org/app.git".into()),
        ..Default::default()
    }
}

async fn force(master: &Master, req: &ForceRequest) -> requests::Submitted {
    master
        .with_env(async |env| {
            schedulers::force(env, "force", req, now_ms())
                .await
                .unwrap()
                .unwrap()
        })
        .await
}

/// (a), (b), (c) and (e) on one database; returns the baseline.
async fn throughput(label: &str, url: &str, scale: &Scale, report: &mut Report) -> Baseline {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(load_config(&write_config(dir.path(), "bench")), Some(url))
        .await
        .unwrap();
    let base = baseline(&master.db, label, scale.baseline_rows, report).await;

    // (b) Submit.
    let n = scale.requests;
    let mut latencies = Vec::with_capacity(n);
    let t = Instant::now();
    for i in 0..n {
        let req = force_request(i, BUILDERS[i % BUILDERS.len()]);
        let s = Instant::now();
        let submitted = force(&master, &req).await;
        latencies.push(s.elapsed());
        assert_eq!(submitted.requests.len(), 1);
        assert!(submitted.collapsed.is_empty());
    }
    let submit = t.elapsed();
    latencies.sort();
    let submit_each = submit / n as u32;
    report.emit(
        &format!("{label}.b.submit"),
        json!({"requests": n, "elapsed_ms": ms(submit), "requests_per_s": n as f64 / submit.as_secs_f64(),
               "us_per_request": us(submit_each), "p50_us": us(percentile(&latencies, 0.5)),
               "p99_us": us(percentile(&latencies, 0.99)), "max_us": us(latencies[n - 1]),
               "ratio_to_commit": submit_each.as_secs_f64() / base.commit.as_secs_f64()}),
        format!(
            "{:.0} requests/s (p50 {:.0} us, p99 {:.0} us)",
            n as f64 / submit.as_secs_f64(),
            us(percentile(&latencies, 0.5)),
            us(percentile(&latencies, 0.99))
        ),
        format!(
            "{:.1}x a one-row commit",
            submit_each.as_secs_f64() / base.commit.as_secs_f64()
        ),
    );

    // (c) Claim.
    let reads = queue_reads(&master.db).await;
    let state = master.state();
    let mut claimed = HashSet::with_capacity(n);
    let mut passes = Vec::new();
    let t = Instant::now();
    loop {
        let mut workers = free_workers();
        let s = Instant::now();
        let got = requests::claim_for_workers(
            &master.db,
            master.id,
            &state.builders,
            &mut workers,
            &mut Default::default(),
            &state.hooks,
            now_ms(),
        )
        .await
        .unwrap();
        if got.is_empty() {
            break;
        }
        passes.push(s.elapsed());
        for a in got {
            assert!(claimed.insert(a.request), "{} assigned twice", a.request);
        }
        assert!(passes.len() <= n, "claim passes do not empty the queue");
    }
    let claim = t.elapsed();
    let mut conn = master.db.pool().acquire().await.unwrap();
    let rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM buildrequest_claims WHERE master_id = $1")
            .bind(master.id.0)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let left = db::queued_requests(&mut conn, None, 1, 0).await.unwrap();
    assert_eq!(claimed.len(), n, "every request claimed");
    assert_eq!(rows, n as i64, "one claim row per request");
    assert!(left.is_empty(), "nothing left queued: {left:?}");
    let claim_each = claim / n as u32;
    report.emit(
        &format!("{label}.c.claim"),
        json!({"requests": n, "elapsed_ms": ms(claim), "claims_per_s": n as f64 / claim.as_secs_f64(),
               "us_per_claim": us(claim_each), "passes": passes.len(), "claims_per_pass": WORKERS as u32 * MAX_BUILDS,
               "first_pass_ms": ms(passes[0]), "last_pass_ms": ms(passes[passes.len() - 1]),
               "claim_rows": rows, "exactly_once": true,
               "ratio_to_commit": claim_each.as_secs_f64() / base.commit.as_secs_f64()}),
        format!(
            "{:.0} claims/s ({} passes: first {:.1} ms, last {:.1} ms)",
            n as f64 / claim.as_secs_f64(),
            passes.len(),
            ms(passes[0]),
            ms(passes[passes.len() - 1])
        ),
        format!(
            "{:.1}x a one-row commit",
            claim_each.as_secs_f64() / base.commit.as_secs_f64()
        ),
    );
    drop(conn);
    report.emit(
        &format!("{label}.c.queue_reads"),
        json!({"queued": n, "queue_summary_ms": reads.0, "queued_requests_200_ms": reads.1,
               "share_of_first_pass": (reads.0 + reads.1) / ms(passes[0])}),
        format!(
            "queue_summary {:.1} ms, one builder's 200 {:.1} ms, {n} queued",
            reads.0, reads.1
        ),
        format!(
            "{:.0}% of the first pass",
            100.0 * (reads.0 + reads.1) / ms(passes[0])
        ),
    );

    // (e) Submitting to a builder that collapses, over requests it cannot collapse.
    let mut queued = 0;
    let mut figures = Vec::new();
    let emit_depth = |report: &mut Report, name: String, depth: usize, median: Duration| {
        report.emit(
            &name,
            json!({"queued": depth, "submits": scale.per_depth, "median_us": us(median),
                   "ratio_to_submit": median.as_secs_f64() / submit_each.as_secs_f64()}),
            format!("{:.0} us per request with {depth} queued", us(median)),
            format!(
                "{:.1}x a non-collapsing submit",
                median.as_secs_f64() / submit_each.as_secs_f64()
            ),
        );
    };
    for &depth in scale.depths {
        fill(
            &master.db,
            depth.saturating_sub(queued),
            &[COLLAPSING],
            queued,
        )
        .await;
        queued = queued.max(depth);
        let median = collapsing_submits(&master, n + queued, scale.per_depth).await;
        // The timed requests stay queued too.
        queued += scale.per_depth;
        figures.push((depth, median));
        emit_depth(
            report,
            format!("{label}.e.submit_collapsing_q{depth}"),
            depth,
            median,
        );
    }
    // PostgreSQL plans from statistics, and this database is younger than autovacuum's first
    // visit: its plan for reading a buildset's source stamps is a sequential scan. Measure
    // the deepest queue again as a farm that has been up for a minute would see it.
    if master.db.backend() == db::Backend::Postgres
        && let Some(&(depth, _)) = figures.last()
    {
        analyze(&master.db).await;
        let median = collapsing_submits(&master, n + queued, scale.per_depth).await;
        emit_depth(
            report,
            format!("{label}.e.submit_collapsing_q{depth}_analyzed"),
            depth,
            median,
        );
        figures.push((depth, median));
    }
    if let (Some(&(d0, t0)), Some(&(d1, t1))) = (figures.first(), figures.last())
        && d1 > d0
    {
        let slope = (t1.as_secs_f64() - t0.as_secs_f64()) / (d1 - d0) as f64;
        let at_10k = (t0.as_secs_f64() + slope * 10_000.0) * 1e3;
        report.emit(
            &format!("{label}.e.collapse_scan_per_queued"),
            json!({"us_per_queued_request": slope * 1e6, "from_queued": d0, "to_queued": d1,
                   "extrapolated_ms_at_10000_queued": at_10k}),
            format!(
                "{:.0} us per queued request (10,000 queued: ~{:.1} s per submit)",
                slope * 1e6,
                at_10k / 1e3
            ),
            format!(
                "{:.1} one-row commits per queued request",
                slope / base.commit.as_secs_f64()
            ),
        );
    }
    master.db.close().await;
    base
}

/// The two reads a claim pass starts with: every builder's queue length and oldest request
/// (`db::queue_summary`), and one builder's first 200 (`db::queued_requests`). Medians of 5,
/// in ms.
async fn queue_reads(db: &Db) -> (f64, f64) {
    let mut conn = db.pool().acquire().await.unwrap();
    let (mut summary, mut queue) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        db::queue_summary(&mut conn).await.unwrap();
        summary.push(ms(t.elapsed()));
        let t = Instant::now();
        db::queued_requests(&mut conn, Some(BUILDERS[0]), 200, 0)
            .await
            .unwrap();
        queue.push(ms(t.elapsed()));
    }
    summary.sort_by(f64::total_cmp);
    queue.sort_by(f64::total_cmp);
    (summary[2], queue[2])
}

/// Times `count` force requests (revisions numbered from `first`) to the collapsing builder;
/// returns the median.
async fn collapsing_submits(master: &Master, first: usize, count: usize) -> Duration {
    let mut times = Vec::with_capacity(count);
    for k in 0..count {
        let req = force_request(first + k, COLLAPSING);
        let s = Instant::now();
        let submitted = force(master, &req).await;
        times.push(s.elapsed());
        assert!(
            submitted.collapsed.is_empty(),
            "other revisions never collapse"
        );
    }
    times.sort();
    times[times.len() / 2]
}

/// Updates PostgreSQL's planner statistics, as autovacuum does within a minute of a table
/// growing; SQLite has none unless asked, and Kiln never asks.
async fn analyze(db: &Db) {
    if db.backend() == db::Backend::Postgres {
        let mut conn = db.pool().acquire().await.unwrap();
        sqlx::query("ANALYZE").execute(&mut *conn).await.unwrap();
    }
}

/// Queues `requests` requests, as force requests would (one source stamp with its own
/// revision, the scheduler and owner properties), over `builders` (one buildset per
/// `builders.len()` requests), through `db::insert_buildset` in one transaction. Revisions
/// are numbered from `first`.
async fn fill(db: &Db, requests: usize, builders: &[&str], first: usize) -> Duration {
    let t = Instant::now();
    let mut tx = db.begin().await.unwrap();
    let ids = db::builder_ids(&mut tx).await.unwrap();
    let now = now_ms();
    for i in 0..requests / builders.len() {
        let n = first + i;
        let bs = NewBuildset {
            scheduler: "force".into(),
            reason: format!("A build was forced by 'bench': fill {n}"),
            external_id: None,
            sourcestamps: vec![SourceStamp {
                repository: "https://example.org/app.git".into(),
                branch: Some("main".into()),
                revision: Some(format!("f{n:039x}")),
                ..Default::default()
            }],
            properties: vec![
                SourcedProperty {
                    name: "scheduler".into(),
                    value: json!("force"),
                    source: "Scheduler force".into(),
                },
                SourcedProperty {
                    name: "owner".into(),
                    value: json!("bench"),
                    source: "Force Build Form".into(),
                },
            ],
            builders: builders.iter().map(|b| (b.to_string(), 0)).collect(),
            trusted: true,
            parent_build: None,
        };
        db::insert_buildset(&mut tx, &bs, &ids, now)
            .await
            .unwrap()
            .unwrap();
    }
    tx.commit().await.unwrap();
    t.elapsed()
}

/// A child process being watched: stopped (SIGTERM, then SIGKILL) when dropped.
struct Watched(Child);

impl Drop for Watched {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill has no memory preconditions; the pid is our own unreaped child.
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// What a `kiln master` process did over [`MASTER_RUN`].
struct MasterRun {
    /// Peak resident memory.
    hwm_kib: u64,
    /// The slowest of [`API_GETS`] `GET /api/v2/buildrequests`.
    api_ms: f64,
    /// The size of its response.
    api_bytes: usize,
}

/// Times the master's queue listing is fetched while it runs.
const API_GETS: usize = 3;

/// `GET path` on `addr` over HTTP/1.1; the whole response, which must be 200.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "GET {path}: {}",
        response.lines().next().unwrap_or_default()
    );
    response
}

/// Runs `kiln master` on `url` until it has started and then for [`MASTER_RUN`], fetching
/// the queue listing from its API [`API_GETS`] times meanwhile; then stops it.
fn kiln_master_run(dir: &Path, url: &str, master_name: &str) -> MasterRun {
    let config = write_config(dir, master_name);
    let log = dir.join(format!("{master_name}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("master")
        .arg("--config")
        .arg(&config)
        .arg("--db")
        .arg(url)
        .arg("--poll")
        .arg("0.5")
        .env("KILN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting kiln master");
    let mut child = Watched(child);
    let pid = child.0.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some((_, rest)) = text.split_once("API on http://")
            && let Some((addr, _)) = rest.split_once('/')
        {
            break addr.to_owned();
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("kiln master exited ({status}) before starting:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "kiln master did not start:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let started = Instant::now();
    let mut api_ms: f64 = 0.0;
    let mut api_bytes = 0;
    for _ in 0..API_GETS {
        std::thread::sleep(MASTER_RUN / (API_GETS as u32 + 1));
        let t = Instant::now();
        api_bytes = http_get(&addr, "/api/v2/buildrequests?complete=false&limit=1000").len();
        api_ms = api_ms.max(ms(t.elapsed()));
    }
    std::thread::sleep(MASTER_RUN.saturating_sub(started.elapsed()));
    if let Ok(Some(status)) = child.0.try_wait() {
        panic!(
            "kiln master exited ({status}):\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let hwm_kib = proc_kib(&pid, "VmHWM").expect("reading the master's VmHWM");
    drop(child);
    MasterRun {
        hwm_kib,
        api_ms,
        api_bytes,
    }
}

/// What the child process reports about its one claim pass.
struct ClaimPass {
    start_ms: f64,
    pass_ms: f64,
    claimed: u64,
    hwm_started_kib: u64,
    hwm_kib: u64,
    /// [`queue_reads`] after the pass.
    reads: (f64, f64),
}

/// Runs this binary again as a fresh master process that runs one claim pass on `url`.
fn claim_pass_in_child(dir: &Path, url: &str, master_name: &str) -> ClaimPass {
    let config = write_config(dir, master_name);
    let child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_URL, url)
        .env(CHILD_CONFIG, &config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the claim-pass child");
    let mut child = Watched(child);
    let line = BufReader::new(child.0.stdout.take().unwrap())
        .lines()
        .next()
        .expect("the claim-pass child printed nothing")
        .unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "the claim-pass child failed: {status}");
    let v: Value = serde_json::from_str(&line).unwrap();
    ClaimPass {
        start_ms: v["start_ms"].as_f64().unwrap(),
        pass_ms: v["pass_ms"].as_f64().unwrap(),
        claimed: v["claimed"].as_u64().unwrap(),
        hwm_started_kib: v["hwm_started_kib"].as_u64().unwrap(),
        hwm_kib: v["hwm_kib"].as_u64().unwrap(),
        reads: (
            v["queue_summary_ms"].as_f64().unwrap(),
            v["queued_requests_200_ms"].as_f64().unwrap(),
        ),
    }
}

/// The child's side of [`claim_pass_in_child`]: start a master, one claim pass, one JSON line.
fn claim_pass_child(url: &str, config: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let t = Instant::now();
        let master = Master::start(load_config(config), Some(url)).await.unwrap();
        let start = t.elapsed();
        let hwm_started = proc_kib("self", "VmHWM").unwrap();
        let state = master.state();
        let mut workers = free_workers();
        let t = Instant::now();
        let got = requests::claim_for_workers(
            &master.db,
            master.id,
            &state.builders,
            &mut workers,
            &mut Default::default(),
            &state.hooks,
            now_ms(),
        )
        .await
        .unwrap();
        let pass = t.elapsed();
        let hwm = proc_kib("self", "VmHWM").unwrap();
        let reads = queue_reads(&master.db).await;
        println!(
            "{}",
            json!({"start_ms": ms(start), "pass_ms": ms(pass), "claimed": got.len(),
                   "hwm_started_kib": hwm_started, "hwm_kib": hwm,
                   "queue_summary_ms": reads.0, "queued_requests_200_ms": reads.1})
        );
        master.db.close().await;
    });
}

/// (d) on one database: `empty_url` and `full_url` are fresh, migrated by the first master.
async fn memory(
    label: &str,
    empty_url: &str,
    full_url: &str,
    base: Baseline,
    scale: &Scale,
    report: &mut Report,
) {
    let dir = tempfile::tempdir().unwrap();
    // A master registers the builders; then the queue is filled behind its back.
    let filler = Master::start(
        load_config(&write_config(dir.path(), "filler")),
        Some(full_url),
    )
    .await
    .unwrap();
    let took = fill(&filler.db, scale.queued, &BUILDERS, 0).await;
    // As autovacuum would have by the time a farm has 100,000 requests queued.
    analyze(&filler.db).await;
    let mut conn = filler.db.pool().acquire().await.unwrap();
    let queued = db::queue_summary(&mut conn).await.unwrap();
    let total: i64 = queued.iter().map(|q| q.1).sum();
    assert_eq!(total, scale.queued as i64);
    drop(conn);
    filler.db.close().await;
    report.emit(
        &format!("{label}.d.fill"),
        json!({"requests": scale.queued, "buildsets": scale.queued / BUILDERS.len(), "elapsed_ms": ms(took),
               "requests_per_s": scale.queued as f64 / took.as_secs_f64(),
               "how": "db::insert_buildset in one transaction, 4 requests per buildset"}),
        format!(
            "{:.0} requests/s ({} in {:.1} s, one transaction)",
            scale.queued as f64 / took.as_secs_f64(),
            scale.queued,
            took.as_secs_f64()
        ),
        "(setup)".into(),
    );

    let (d, e, f) = (
        dir.path().to_owned(),
        empty_url.to_owned(),
        full_url.to_owned(),
    );
    let (empty, full) = tokio::task::spawn_blocking(move || {
        (
            kiln_master_run(&d, &e, "kiln-empty"),
            kiln_master_run(&d, &f, "kiln-full"),
        )
    })
    .await
    .unwrap();
    report.emit(
        &format!("{label}.d.kiln_master_peak"),
        json!({"queued": scale.queued, "vm_hwm_mib": mib(full.hwm_kib), "empty_vm_hwm_mib": mib(empty.hwm_kib),
               "ratio_to_empty": full.hwm_kib as f64 / empty.hwm_kib as f64, "ran_s": MASTER_RUN.as_secs(),
               "api_buildrequests_ms": full.api_ms, "api_buildrequests_bytes": full.api_bytes,
               "empty_api_buildrequests_ms": empty.api_ms}),
        format!(
            "{:.1} MiB peak with {} queued; GET buildrequests {:.0} ms, {} KiB",
            mib(full.hwm_kib),
            scale.queued,
            full.api_ms,
            full.api_bytes / 1024
        ),
        format!(
            "{:.2}x empty ({:.1} MiB)",
            full.hwm_kib as f64 / empty.hwm_kib as f64,
            mib(empty.hwm_kib)
        ),
    );

    let (d, e, f) = (
        dir.path().to_owned(),
        empty_url.to_owned(),
        full_url.to_owned(),
    );
    let (empty, full) = tokio::task::spawn_blocking(move || {
        (
            claim_pass_in_child(&d, &e, "claim-empty"),
            claim_pass_in_child(&d, &f, "claim-full"),
        )
    })
    .await
    .unwrap();
    assert_eq!(empty.claimed, 0);
    assert_eq!(full.claimed, WORKERS as u64 * MAX_BUILDS as u64);
    report.emit(
        &format!("{label}.d.claim_pass_peak"),
        json!({"queued": scale.queued, "claimed": full.claimed, "vm_hwm_mib": mib(full.hwm_kib),
               "vm_hwm_started_mib": mib(full.hwm_started_kib), "start_ms": full.start_ms,
               "pass_ms": full.pass_ms, "empty_vm_hwm_mib": mib(empty.hwm_kib),
               "empty_pass_ms": empty.pass_ms,
               "ratio_to_empty": full.hwm_kib as f64 / empty.hwm_kib as f64}),
        format!(
            "{:.1} MiB peak ({:.1} MiB after the start, before the pass)",
            mib(full.hwm_kib),
            mib(full.hwm_started_kib),
        ),
        format!(
            "{:.2}x empty ({:.1} MiB)",
            full.hwm_kib as f64 / empty.hwm_kib as f64,
            mib(empty.hwm_kib)
        ),
    );
    let commits = ms(base.commit) * full.claimed as f64;
    report.emit(
        &format!("{label}.d.claim_pass_time"),
        json!({"queued": scale.queued, "claimed": full.claimed, "pass_ms": full.pass_ms,
               "start_ms": full.start_ms, "queue_summary_ms": full.reads.0,
               "queued_requests_200_ms": full.reads.1, "empty_pass_ms": empty.pass_ms,
               "empty_start_ms": empty.start_ms, "claim_commits_ms": commits}),
        format!(
            "pass {:.0} ms (summary {:.0} ms, 200 of b0 {:.0} ms); start {:.0} ms",
            full.pass_ms, full.reads.0, full.reads.1, full.start_ms
        ),
        format!(
            "{:.1}x its {} claims' commits",
            full.pass_ms / commits,
            full.claimed
        ),
    );
}

fn sqlite_url(dir: &Path, name: &str) -> String {
    format!("sqlite://{}?mode=rwc", dir.join(name).display())
}

/// A new database on `pg` (createdb is a blocking process).
fn pg_database(pg: &TempPostgres) -> String {
    tokio::task::block_in_place(|| pg.create_database().unwrap())
}

fn main() {
    if let (Ok(url), Some(config)) = (std::env::var(CHILD_URL), std::env::var_os(CHILD_CONFIG)) {
        claim_pass_child(&url, Path::new(&config));
        return;
    }
    // `cargo test --benches` runs this binary with no --bench flag: keep that run quick.
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full {
        Scale {
            requests: 10_000,
            baseline_rows: 2_000,
            queued: 100_000,
            depths: &[0, 100, 1_000],
            per_depth: 3,
        }
    } else {
        Scale {
            requests: 400,
            baseline_rows: 100,
            queued: 2_000,
            depths: &[0, 20],
            per_depth: 2,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut report = Report::default();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = throughput(
            "sqlite",
            &sqlite_url(dir.path(), "throughput.sqlite"),
            &scale,
            &mut report,
        )
        .await;
        // Durable: fsync on, so a commit costs what it costs in production.
        let pg = match tokio::task::block_in_place(|| TempPostgres::start(true)) {
            Ok(pg) => Some(pg),
            Err(e) => {
                eprintln!("postgres: skipped: {e:#}");
                None
            }
        };
        let postgres = match &pg {
            Some(pg) => Some(throughput("postgres", &pg_database(pg), &scale, &mut report).await),
            None => None,
        };
        memory(
            "sqlite",
            &sqlite_url(dir.path(), "empty.sqlite"),
            &sqlite_url(dir.path(), "queued.sqlite"),
            sqlite,
            &scale,
            &mut report,
        )
        .await;
        if let (Some(pg), Some(base)) = (&pg, postgres) {
            let (empty, full) = (pg_database(pg), pg_database(pg));
            memory("postgres", &empty, &full, base, &scale, &mut report).await;
        }
    });
    report.table();
    println!("\ntotal {:.0} s", started.elapsed().as_secs_f64());
}
