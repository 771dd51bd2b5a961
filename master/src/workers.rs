//! Workers as the master sees them: their connections (`/workers/connect`, a WebSocket
//! speaking [`runtime::protocol`]), the builds leased to them, dispatch, and recovery.
//!
//! - **Connections.** A worker says hello with its name, token and capabilities; the master
//!   checks them against `[[workers]]` and answers welcome (adopting the builds the worker
//!   says it runs, when the database agrees) or refused. A newer connection under the same
//!   name replaces an older one.
//! - **Leases.** Each dispatched build is leased to one worker under a fresh cookie. A message
//!   about a build is applied only if the lease (in memory) and the build row (in the
//!   database, in the same transaction as the message's effects) agree on worker, cookie and
//!   sequence number; anything else is refused and logged. Messages are applied in batches,
//!   one transaction per batch, and acknowledged after the commit.
//! - **Dispatch.** Free workers (connected, not draining, paused or quarantined, with room)
//!   go to [`crate::requests::plan_for_workers`]; one transaction then claims the planned
//!   requests and records their builds, and each becomes a lease and a job composed by the
//!   builder's [`JobBehaviour`].
//! - **Recovery.** A worker silent or disconnected for three heartbeats is lost: its builds end
//!   RETRY and their requests are queued again. Every heartbeat the master scans: each worker
//!   says what it runs, and a leased build the worker forgot is retried (Launchpad's
//!   `scanActiveBuilders`). Running builds nobody holds (after a master restart) are adopted
//!   when their worker reconnects, or retried when it does not.
//! - **Health.** Rejected jobs, lost builds and builds the worker could not start count as
//!   failures; three in a row quarantine the worker with exponential backoff; a build it runs
//!   properly makes it healthy again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use kiln_protocol::{
    BuildEvent, BuildRef, Capabilities, PROTOCOL_VERSION, Running, ToMaster, ToWorker,
};
use runtime::Outcome;
use runtime::policy::WorkerInfo;
use serde_json::json;
use tokio::sync::mpsc;

use crate::jobs::{self, IdleBehaviour, JobBehaviour, JobContext, RequestFate};
use crate::requests::Assignment;
use crate::server::{Master, State as MasterState};
use kiln_config as config;
use kiln_db as db;
use kiln_db::model::*;

/// Failures in a row that quarantine a worker.
pub const QUARANTINE_AFTER: i64 = 3;

/// How long a worker with `failures` failures in a row is quarantined, in ms: 30 s, doubling
/// with each further failure, at most an hour.
pub fn quarantine_ms(failures: i64) -> i64 {
    let doublings = (failures - QUARANTINE_AFTER).clamp(0, 7) as u32;
    (30_000i64 << doublings).min(3_600_000)
}

/// How long a running build nobody holds (a master restarted, a master died) waits for its
/// worker to reconnect before it is retried.
const UNHELD_GRACE: Duration = Duration::from_secs(30);

/// Largest batch of messages applied in one transaction.
const BATCH: usize = 256;

/// A worker's connection.
struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<ToWorker>,
    info: WorkerInfo,
    worker_id: WorkerId,
    draining: bool,
    /// The scan sent and not yet answered: its number and when it was sent.
    scan: Option<(u64, Instant)>,
}

/// A build leased to a worker.
#[derive(Debug, Clone)]
struct Lease {
    worker: String,
    worker_id: WorkerId,
    cookie: String,
    kind: &'static str,
    builder: String,
    request: BuildRequestId,
    last_seq: u64,
    /// Step number to (step id, name).
    steps: HashMap<u32, (i64, String)>,
    /// (step number, log name) to log id.
    logs: HashMap<(u32, String), i64>,
    /// Steps this master recorded starting (so their logs are known to be new).
    fresh: HashSet<u32>,
    /// Running steps' progress metrics at their last value, by step number.
    progress: HashMap<u32, std::collections::BTreeMap<String, u64>>,
    dispatched: Instant,
    /// When its worker's connection went away.
    orphaned: Option<Instant>,
}

/// A dispatch decision with what starting it reads (before the write lock is taken).
struct Prepared<'a> {
    a: &'a Assignment,
    builder: &'a config::Builder,
    worker_cfg: &'a config::Worker,
    info: WorkerInfo,
    worker_id: WorkerId,
    buildset: Buildset,
    stamps: Vec<SourceStamp>,
    bs_props: Vec<SourcedProperty>,
    blamelist: Vec<String>,
    modules: Vec<db::StepModule>,
}

/// A build recorded by a dispatch pass, to announce once its transaction commits.
enum Started {
    /// Its job goes to its worker under `lease`.
    Running {
        job: Box<kiln_protocol::Job>,
        number: i64,
        reported: bool,
        lease: Box<Lease>,
    },
    /// It cannot run as configured and ended EXCEPTION.
    Failed {
        build: i64,
        builder: String,
        message: String,
    },
}

/// What one batch of messages shares while it is applied.
///
/// Rows first seen in a batch (its steps and logs) are written as it flushes, once each and
/// whole: a step that starts and ends in the batch is one INSERT with its end, a new log one
/// INSERT with its line count and state and one chunk. On SQLite every statement holds the
/// write lock a round trip longer, and most builds' messages arrive in one batch.
struct Batch<'e> {
    /// Steps that finish in the batch: their live summaries are not worth a write.
    ending: HashSet<(i64, u32)>,
    /// Log text to append to stored logs when the batch commits, by log id: one chunk per log
    /// per batch.
    appends: std::collections::BTreeMap<i64, String>,
    /// Steps first seen in the batch, in order.
    new_steps: Vec<NewStep<'e>>,
    /// Logs first seen in the batch, in order.
    new_logs: Vec<NewLog<'e>>,
    /// Stored steps that ended in the batch (their new logs are written complete).
    closed: HashSet<i64>,
    /// The batch's time.
    now: i64,
    /// Steps that ended, by builder, with their duration and what they used (counted once the
    /// batch commits).
    steps_ended: Vec<(String, Duration, Option<runtime::StepResources>)>,
    /// Steps that started, changed or ended, for live updates (kept only when someone listens).
    live_steps: Vec<i64>,
    /// Running steps whose progress moved, by step id, with all their metrics: written once
    /// per batch.
    progress: std::collections::BTreeMap<i64, serde_json::Value>,
    /// Builds whose run of messages in the batch ends with their end, by id: the run's first
    /// and last numbers, checked against the build's row as it ends.
    checks: HashMap<i64, (i64, i64)>,
}

/// A step as a batch refers to it: by its row, or by its place in the batch's new steps.
#[derive(Debug, Clone, Copy)]
enum StepRef {
    Stored(i64),
    New(usize),
}

/// A step first seen in a batch, as it stands when the batch flushes.
struct NewStep<'e> {
    build: i64,
    number: u32,
    name: &'e str,
    /// Its latest summary, while it runs.
    state: Option<&'e str>,
    /// Its progress metrics, while it runs.
    progress: Option<serde_json::Value>,
    /// How it ended, if it did in the batch.
    end: Option<&'e runtime::StepRecord>,
}

/// A log first seen in a batch: its step and all its text so far.
struct NewLog<'e> {
    build: i64,
    number: u32,
    step: StepRef,
    name: &'e str,
    text: String,
}

/// A step's end as the database stores it, from its worker's record.
struct StepEndRow {
    state: String,
    urls: serde_json::Value,
    statistics: serde_json::Value,
    progress: serde_json::Value,
}

impl StepEndRow {
    fn of(record: &runtime::StepRecord) -> anyhow::Result<StepEndRow> {
        let o = &record.outcome;
        Ok(StepEndRow {
            state: o
                .summary
                .clone()
                .or_else(|| o.message.clone())
                .unwrap_or_default(),
            urls: serde_json::to_value(&o.urls)?,
            statistics: serde_json::to_value(&o.statistics)?,
            progress: serde_json::to_value(&o.progress)?,
        })
    }

    fn end<'a>(&'a self, record: &runtime::StepRecord) -> db::StepEnd<'a> {
        db::StepEnd {
            results: record.outcome.result,
            state: &self.state,
            hidden: record.hidden,
            urls: &self.urls,
            statistics: &self.statistics,
            progress: &self.progress,
            resources: record.outcome.resources,
        }
    }
}

#[derive(Default)]
struct Inner {
    conns: HashMap<String, Conn>,
    leases: HashMap<i64, Lease>,
    /// Running builds in the database that nobody holds, and since when.
    unheld: HashMap<i64, Instant>,
    /// Builds that ended here lately (id to cookie, and when): a worker's scan answer may
    /// still list one whose end it has sent, and that is no stray build.
    ended: HashMap<i64, (String, Instant)>,
    /// Workers known to have no failures recorded (so a good build costs no query).
    healthy: HashSet<String>,
    /// Every worker's health as last read, and when (dispatch rereads it after a second, or
    /// after a failure is recorded).
    health: Option<(
        Instant,
        std::collections::BTreeMap<String, db::WorkerHealth>,
    )>,
}

/// The master's workers.
#[derive(Default)]
pub struct Workers {
    inner: Mutex<Inner>,
    next_conn: AtomicU64,
    next_scan: AtomicU64,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").finish_non_exhaustive()
    }
}

impl Workers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Names of connected workers.
    pub fn connected(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().conns.keys().cloned().collect();
        names.sort();
        names
    }

    /// Builds leased now, by worker: (build id, worker).
    pub fn leases(&self) -> Vec<(i64, String)> {
        let mut l: Vec<(i64, String)> = self
            .lock()
            .leases
            .iter()
            .map(|(id, l)| (*id, l.worker.clone()))
            .collect();
        l.sort();
        l
    }
}

/// A frame read from a worker's connection, as the HTTP layer hands it over (it owns the
/// WebSocket; the master reads messages, not sockets).
#[derive(Debug)]
pub enum Frame<T> {
    /// A text frame: one message.
    Text(T),
    /// The worker closed the connection.
    Close,
    /// A ping, pong or binary frame: ignored.
    Other,
    /// The connection failed.
    Broken,
}

fn text(message: &ToWorker) -> String {
    serde_json::to_string(message).unwrap_or_else(|_| "{}".into())
}

/// A refusal to say hello.
struct Refusal {
    reason: String,
    retry: bool,
}

/// Serves one worker connection: its hello, then its messages and the master's, until it
/// closes, falls silent or is replaced. `stream` is what the worker sends, `sink` what the
/// master sends it (text frames; closing the sink closes the connection).
pub async fn serve<T, S, K>(master: Arc<Master>, mut stream: S, mut sink: K)
where
    T: AsRef<str>,
    S: Stream<Item = Frame<T>> + Unpin,
    K: Sink<String> + Unpin,
{
    let hello = match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(Frame::Text(t))) => serde_json::from_str::<ToMaster>(t.as_ref()).ok(),
        _ => None,
    };
    let Some(ToMaster::Hello {
        protocol,
        name,
        token,
        capabilities,
        running,
    }) = hello
    else {
        let refused = ToWorker::Refused {
            reason: "the first message must be a hello".into(),
            retry: false,
        };
        let _ = sink.send(text(&refused)).await;
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let accepted = master
        .accept_worker(protocol, &name, &token, capabilities, &running, tx)
        .await;
    let (conn_id, welcome) = match accepted {
        Ok(a) => a,
        Err(Refusal { reason, retry }) => {
            tracing::warn!(worker = %name, %reason, "refused a worker");
            let _ = sink.send(text(&ToWorker::Refused { reason, retry })).await;
            let _ = sink.close().await;
            return;
        }
    };
    if sink.send(text(&welcome)).await.is_err() {
        master.worker_gone(&name, conn_id).await;
        return;
    }
    master.wake_dispatch();
    let heartbeat = master.state().config.master.heartbeat;
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let why = loop {
        tokio::select! {
            frame = stream.next() => {
                let Some(frame) = frame.filter(|f| !matches!(f, Frame::Broken)) else {
                    break "the connection closed".to_owned()
                };
                let mut batch = Vec::new();
                let mut closed = false;
                let mut push = |frame: Frame<T>, batch: &mut Vec<ToMaster>| match frame {
                    Frame::Text(t) => match serde_json::from_str::<ToMaster>(t.as_ref()) {
                        Ok(m) => batch.push(m),
                        Err(e) => {
                            tracing::warn!(worker = %name, error = %e, "a message from a worker could not be read");
                            master.send_to(&name, ToWorker::Error {
                                message: format!("message not understood: {e}"),
                            });
                        }
                    },
                    Frame::Close | Frame::Broken => closed = true,
                    Frame::Other => {}
                };
                push(frame, &mut batch);
                // Whatever else has already arrived joins this batch: one transaction.
                while batch.len() < BATCH {
                    match stream.next().now_or_never() {
                        Some(Some(frame @ (Frame::Text(_) | Frame::Close | Frame::Other))) => {
                            push(frame, &mut batch)
                        }
                        Some(_) => { closed = true; break }
                        None => break,
                    }
                }
                if let Err(error) = master.handle_messages(&name, conn_id, batch).await {
                    tracing::error!(worker = %name, error = format!("{error:#}"), "applying a worker's messages failed; dropping its connection");
                    break "the master could not apply its messages".to_owned();
                }
                // Heard from once its messages are applied: while the master applies them it
                // reads nothing, and that time is its own, not the worker's silence (under load,
                // waiting for the database took longer than three heartbeats and dropped live
                // workers: the farm benchmark's W5).
                last_heard = Instant::now();
                if closed {
                    break "the worker closed the connection".to_owned();
                }
            }
            out = rx.recv() => {
                let Some(out) = out else { break "replaced by a newer connection".to_owned() };
                if sink.send(text(&out)).await.is_err() {
                    break "sending failed".to_owned();
                }
            }
            _ = tick.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    break format!("silent for {:.1}s", last_heard.elapsed().as_secs_f64());
                }
            }
        }
    };
    tracing::info!(worker = %name, reason = %why, "worker disconnected");
    master.worker_gone(&name, conn_id).await;
}

impl Master {
    /// Checks a hello and registers the connection; the welcome to send.
    async fn accept_worker(
        &self,
        protocol: u32,
        name: &str,
        token: &str,
        caps: Capabilities,
        running: &[Running],
        tx: mpsc::UnboundedSender<ToWorker>,
    ) -> Result<(u64, ToWorker), Refusal> {
        let refuse = |reason: String| Refusal {
            reason,
            retry: false,
        };
        if protocol != PROTOCOL_VERSION {
            return Err(refuse(format!(
                "this worker speaks protocol {protocol} and the master {PROTOCOL_VERSION}; upgrade the older one"
            )));
        }
        let state = self.state();
        let Some(cfg) = state.config.workers.iter().find(|w| w.name == name) else {
            // The same answer as a bad token: names are not to be probed.
            return Err(refuse(format!("unknown worker {name:?} or wrong token")));
        };
        if !cfg.auth.verify(token) {
            return Err(refuse(format!("unknown worker {name:?} or wrong token")));
        }
        if cfg.sandbox != caps.sandbox {
            return Err(refuse(if cfg.sandbox {
                format!("worker {name} is configured as a sandbox worker; start it with --sandbox")
            } else {
                format!(
                    "worker {name} runs in sandbox mode but is not configured as a sandbox worker; add `sandbox = true` to its [[workers]] entry or start it without --sandbox"
                )
            }));
        }
        for (what, configured, advertised) in
            [("arch", &cfg.arch, &caps.arch), ("os", &cfg.os, &caps.os)]
        {
            if let Some(c) = configured
                && c != advertised
            {
                return Err(refuse(format!(
                    "worker {name} is configured with {what} {c:?} but runs on {advertised:?}"
                )));
            }
        }
        let mut tags: Vec<String> = cfg.tags.iter().cloned().collect();
        for t in &caps.tags {
            if !tags.contains(t) {
                tags.push(t.clone());
            }
        }
        let info = WorkerInfo {
            name: name.to_owned(),
            arch: Some(caps.arch.clone()),
            os: Some(caps.os.clone()),
            tags,
            sandbox: caps.sandbox,
            running_builds: 0,
            max_builds: cfg.max_builds.min(caps.max_builds.max(1)),
        };
        let now = now_ms();
        let (worker_id, adopted, abandoned) = match self.adopt(name, running).await {
            Ok(r) => r,
            Err(error) => {
                tracing::error!(worker = %name, error = format!("{error:#}"), "cannot reconcile a worker's builds");
                return Err(Refusal {
                    reason: "the master cannot reach its database; try again".into(),
                    retry: true,
                });
            }
        };
        let id = self.workers.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut inner = self.workers.lock();
            // A newer connection replaces an older one (dropping its sender ends it).
            inner.conns.insert(
                name.to_owned(),
                Conn {
                    id,
                    tx,
                    info,
                    worker_id,
                    draining: false,
                    scan: None,
                },
            );
            for l in inner.leases.values_mut() {
                if l.worker == name {
                    l.orphaned = None;
                }
            }
        }
        if let Ok(mut conn) = self.db.pool().acquire().await
            && let Err(error) =
                db::set_worker_state(&mut conn, name, "connected", Some(self.id), now).await
        {
            tracing::warn!(worker = %name, %error, "cannot record a worker's state");
        }
        self.live
            .send("worker", || json!({"name": name, "connected": true}));
        tracing::info!(
            worker = %name, arch = %caps.arch, sandbox = caps.sandbox,
            landlock_abi = caps.landlock_abi, adopted = adopted.len(), "worker connected"
        );
        Ok((
            id,
            ToWorker::Welcome {
                protocol: PROTOCOL_VERSION,
                heartbeat_ms: state.config.master.heartbeat.as_millis() as u64,
                adopted,
                abandoned,
            },
        ))
    }

    /// Decides which of the builds a reconnecting worker runs the master takes back: those
    /// still running in the database on this worker under the same cookie.
    async fn adopt(
        &self,
        name: &str,
        running: &[Running],
    ) -> anyhow::Result<(WorkerId, Vec<Running>, Vec<BuildRef>)> {
        let mut conn = self.db.pool().acquire().await?;
        let worker_id = db::worker_id(&mut conn, name)
            .await?
            .context("a configured worker has no row")?;
        let mut adopted = Vec::new();
        let mut abandoned = Vec::new();
        let in_db = if running.is_empty() {
            Vec::new()
        } else {
            // Not builds of another live master: it holds them, and retries them if this
            // worker is lost to it.
            db::running_builds(&mut conn, Some(self.id), None).await?
        };
        for r in running {
            // Held in memory already (a reconnect while this master ran)?
            let held = {
                let inner = self.workers.lock();
                inner
                    .leases
                    .get(&r.build.id)
                    .filter(|l| l.worker == name && l.cookie == r.build.cookie)
                    .map(|l| l.last_seq)
            };
            if let Some(last_seq) = held {
                adopted.push(Running {
                    build: r.build.clone(),
                    acked: last_seq,
                });
                continue;
            }
            let row = in_db.iter().find(|b| {
                b.id.0 == r.build.id
                    && b.cookie == r.build.cookie
                    && b.worker.as_deref() == Some(name)
            });
            let Some(b) = row else {
                abandoned.push(r.build.clone());
                continue;
            };
            db::adopt_build(&mut conn, b.id, b.request, self.id).await?;
            let kind = "steps";
            self.workers.lock().unheld.remove(&b.id.0);
            self.workers.lock().leases.insert(
                b.id.0,
                Lease {
                    worker: name.to_owned(),
                    worker_id,
                    cookie: b.cookie.clone(),
                    kind,
                    builder: b.builder.clone(),
                    request: b.request,
                    last_seq: b.last_seq as u64,
                    steps: HashMap::new(),
                    logs: HashMap::new(),
                    fresh: HashSet::new(),
                    progress: HashMap::new(),
                    dispatched: Instant::now(),
                    orphaned: None,
                },
            );
            tracing::info!(worker = %name, build = b.id.0, "adopted a running build");
            adopted.push(Running {
                build: r.build.clone(),
                acked: b.last_seq as u64,
            });
        }
        Ok((worker_id, adopted, abandoned))
    }

    /// A connection ended: its worker's builds are orphaned (retried if it does not come back
    /// within three heartbeats).
    async fn worker_gone(&self, name: &str, conn_id: u64) {
        let gone = {
            let mut inner = self.workers.lock();
            if inner.conns.get(name).is_some_and(|c| c.id == conn_id) {
                inner.conns.remove(name);
                let now = Instant::now();
                for l in inner.leases.values_mut() {
                    if l.worker == name {
                        l.orphaned.get_or_insert(now);
                    }
                }
                true
            } else {
                false
            }
        };
        if gone {
            self.live
                .send("worker", || json!({"name": name, "connected": false}));
        }
        if gone
            && let Ok(mut conn) = self.db.pool().acquire().await
            && let Err(error) =
                db::set_worker_state(&mut conn, name, "offline", None, now_ms()).await
        {
            tracing::warn!(worker = %name, %error, "cannot record a worker's state");
        }
    }

    /// Sends a message to a connected worker (dropped if it is not connected).
    pub(crate) fn send_to(&self, name: &str, message: ToWorker) -> bool {
        let inner = self.workers.lock();
        inner
            .conns
            .get(name)
            .is_some_and(|c| c.tx.send(message).is_ok())
    }

    /// Asks a connected worker to shut down gracefully; it gets no new builds meanwhile.
    /// False if it is not connected.
    pub fn shutdown_worker(&self, name: &str) -> bool {
        let mut inner = self.workers.lock();
        let Some(c) = inner.conns.get_mut(name) else {
            return false;
        };
        c.draining = true;
        c.tx.send(ToWorker::Shutdown {
            reason: "asked through the API".into(),
        })
        .is_ok()
    }

    /// Drops the cached health table, so a pause or unpause counts at the next dispatch.
    pub fn forget_worker_health(&self) {
        self.workers.lock().health = None;
    }

    /// Handles a batch of messages from a worker's connection.
    async fn handle_messages(
        &self,
        name: &str,
        conn_id: u64,
        batch: Vec<ToMaster>,
    ) -> anyhow::Result<()> {
        let mut events = Vec::new();
        for m in batch {
            match m {
                ToMaster::Build { build, seq, event } => events.push((build, seq, event)),
                ToMaster::Status { scan, running } => {
                    self.status(name, conn_id, scan, running).await?
                }
                ToMaster::Reject { build, reason } => {
                    tracing::warn!(worker = %name, build = build.id, %reason, "the worker rejected a build");
                    if self.holds(name, &build) {
                        self.retry_build(build.id, &format!("worker {name} rejected it: {reason}"))
                            .await?;
                        self.worker_failed(name, &format!("rejected build {}: {reason}", build.id))
                            .await?;
                    }
                }
                ToMaster::Draining => {
                    tracing::info!(worker = %name, "the worker is shutting down; no new builds go to it");
                    if let Some(c) = self.workers.lock().conns.get_mut(name) {
                        c.draining = true;
                    }
                }
                ToMaster::Hello { .. } => {
                    self.send_to(
                        name,
                        ToWorker::Error {
                            message: "hello again on a connection that said hello".into(),
                        },
                    );
                }
            }
        }
        if !events.is_empty() {
            self.apply(name, events).await?;
        }
        Ok(())
    }

    /// Whether `build` is leased to `worker` under its cookie.
    fn holds(&self, worker: &str, build: &BuildRef) -> bool {
        self.workers
            .lock()
            .leases
            .get(&build.id)
            .is_some_and(|l| l.worker == worker && l.cookie == build.cookie)
    }

    /// A worker's status: a heartbeat, or the answer to a scan (builds it forgot are retried;
    /// builds it runs that nobody holds are stopped).
    async fn status(
        &self,
        name: &str,
        conn_id: u64,
        scan: Option<u64>,
        running: Vec<BuildRef>,
    ) -> anyhow::Result<()> {
        let Some(scan) = scan else { return Ok(()) };
        let (forgotten, unknown) = {
            let mut inner = self.workers.lock();
            let Some(conn) = inner.conns.get_mut(name).filter(|c| c.id == conn_id) else {
                return Ok(());
            };
            let Some((expected, sent)) = conn.scan.filter(|(n, _)| *n == scan) else {
                return Ok(());
            };
            let _ = expected;
            conn.scan = None;
            let forgotten: Vec<i64> = inner
                .leases
                .iter()
                .filter(|(id, l)| {
                    l.worker == name
                        && l.dispatched < sent
                        && !running.iter().any(|b| b.id == **id && b.cookie == l.cookie)
                })
                .map(|(id, _)| *id)
                .collect();
            let unknown: Vec<BuildRef> = running
                .into_iter()
                .filter(|b| {
                    !inner
                        .leases
                        .get(&b.id)
                        .is_some_and(|l| l.worker == name && l.cookie == b.cookie)
                        && inner.ended.get(&b.id).is_none_or(|(c, _)| *c != b.cookie)
                })
                .collect();
            (forgotten, unknown)
        };
        for id in forgotten {
            tracing::warn!(worker = %name, build = id, "the worker does not know a build leased to it; retrying it");
            self.retry_build(id, &format!("worker {name} forgot it"))
                .await?;
        }
        for build in unknown {
            tracing::warn!(worker = %name, build = build.id, "the worker runs a build the master does not hold; stopping it");
            self.send_to(
                name,
                ToWorker::Stop {
                    build,
                    reason: "the master does not hold this build (it was retried or finished)"
                        .into(),
                },
            );
        }
        Ok(())
    }

    /// Applies build messages from `worker`: as one batch, or, if the batch fails, one by
    /// one, so that a message the database will not take (a broken or hostile worker's: a
    /// log of a step that never started, a step started twice) is refused alone and the
    /// build's stream goes on. A database that is down fails the connection, as it must.
    async fn apply(
        &self,
        worker: &str,
        events: Vec<(BuildRef, u64, BuildEvent)>,
    ) -> anyhow::Result<()> {
        let Err(error) = self.apply_batch(worker, &events).await else {
            return Ok(());
        };
        if events.len() == 1 {
            return self.skip_message(worker, &events[0], error).await;
        }
        tracing::debug!(worker = %worker, error = format!("{error:#}"), "a batch failed; applying its messages one by one");
        for one in events.chunks(1) {
            if let Err(error) = self.apply_batch(worker, one).await {
                self.skip_message(worker, &one[0], error).await?;
            }
        }
        Ok(())
    }

    /// A message that failed to apply: if it was next in its build's stream, records it as
    /// received (so the stream goes on), acknowledges it and tells the worker it was
    /// refused. Otherwise the failure was not the message's: `error` is returned.
    async fn skip_message(
        &self,
        worker: &str,
        (build, seq, _): &(BuildRef, u64, BuildEvent),
        error: anyhow::Error,
    ) -> anyhow::Result<()> {
        let lease = self.workers.lock().leases.get(&build.id).cloned();
        let Some(lease) = lease
            .filter(|l| l.worker == worker && l.cookie == build.cookie && *seq == l.last_seq + 1)
        else {
            return Err(error);
        };
        let mut tx = self.db.begin().await?;
        let id = BuildId(build.id);
        let n = *seq as i64;
        let recorded =
            db::advance_build(&mut tx, id, &build.cookie, lease.worker_id, n, n, None).await?;
        tx.commit().await?;
        if !recorded {
            return Err(error);
        }
        if let Some(l) = self.workers.lock().leases.get_mut(&build.id) {
            l.last_seq = *seq;
        }
        tracing::warn!(worker = %worker, build = build.id, seq, error = format!("{error:#}"), "a worker's message could not be stored; refused");
        self.metrics.refused(1);
        self.send_to(
            worker,
            ToWorker::Ack {
                build: build.clone(),
                seq: *seq,
            },
        );
        self.send_to(
            worker,
            ToWorker::Error {
                message: format!(
                    "build {}: message {seq} could not be stored (it does not fit the build as recorded); refused",
                    build.id
                ),
            },
        );
        Ok(())
    }

    /// Applies build messages from `worker` in one transaction, then acknowledges them.
    async fn apply_batch(
        &self,
        worker: &str,
        events: &[(BuildRef, u64, BuildEvent)],
    ) -> anyhow::Result<()> {
        // Working copies of the leases involved; written back after the commit.
        let mut work: HashMap<i64, Lease> = HashMap::new();
        let mut refusals = Vec::new();
        let mut acks: HashMap<i64, (BuildRef, u64)> = HashMap::new();
        let mut finished: Vec<(i64, Outcome, Option<String>)> = Vec::new();
        let now = now_ms();
        // Each build's run of consecutive messages in this batch (ending at its last message)
        // advances its row once.
        let runs: Vec<(i64, String, u64, bool)> = events
            .iter()
            .map(|(b, seq, e)| {
                (
                    b.id,
                    b.cookie.clone(),
                    *seq,
                    matches!(e, BuildEvent::Finished { .. }),
                )
            })
            .collect();
        // Where a build's run of messages starting at `i` ends, and whether with its end.
        let run_end = |i: usize| {
            let (id, cookie, mut upto, mut last) = (runs[i].0, &runs[i].1, runs[i].2, runs[i].3);
            for (other, c, seq, fin) in &runs[i + 1..] {
                let (other, seq, fin) = (*other, *seq, *fin);
                if last {
                    break;
                }
                if other == id && c == cookie && seq == upto + 1 {
                    upto = seq;
                    last = fin;
                }
            }
            (upto, last)
        };
        let mut advanced: HashMap<i64, u64> = HashMap::new();
        // Steps that finish in this batch: their live summary is not worth a write.
        let ending: HashSet<(i64, u32)> = events
            .iter()
            .filter_map(|(b, _, e)| match e {
                BuildEvent::StepFinished { step, .. } => Some((b.id, *step)),
                _ => None,
            })
            .collect();
        let mut batch = Batch {
            ending,
            appends: Default::default(),
            new_steps: Vec::new(),
            new_logs: Vec::new(),
            closed: HashSet::new(),
            now,
            steps_ended: Vec::new(),
            live_steps: Vec::new(),
            progress: Default::default(),
            checks: HashMap::new(),
        };
        let mut tx = self.db.begin().await?;
        for (i, (build, seq, event)) in events.iter().enumerate() {
            let seq = *seq;
            if finished.iter().any(|(f, ..)| *f == build.id) {
                refusals.push(format!(
                    "build {}: message {seq} follows the build's end; refused",
                    build.id
                ));
                continue;
            }
            let lease = match work.get(&build.id) {
                Some(l) => Some(l.clone()),
                None => self.workers.lock().leases.get(&build.id).cloned(),
            };
            let Some(mut lease) = lease.filter(|l| l.worker == worker) else {
                let busy = work.values().any(|l| l.worker == worker)
                    || self
                        .workers
                        .lock()
                        .leases
                        .values()
                        .any(|l| l.worker == worker);
                let why = if busy {
                    String::new()
                } else {
                    // A worker with no job: every build operation is a mismatch.
                    let idle = IdleBehaviour {
                        worker: worker.to_owned(),
                    };
                    idle.handle_finished(Outcome::Success)
                        .err()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                };
                refusals.push(format!(
                    "build {} is not leased to worker {worker}{why}; message refused",
                    build.id
                ));
                continue;
            };
            if lease.cookie != build.cookie {
                refusals.push(format!(
                    "build {}: wrong or stale cookie; message refused",
                    build.id
                ));
                continue;
            }
            if seq <= lease.last_seq {
                // Sent again after a reconnect: applied already.
                acks.insert(build.id, (build.clone(), lease.last_seq));
                continue;
            }
            let in_order = seq == lease.last_seq + 1;
            let recorded = in_order
                && (advanced.get(&build.id).is_some_and(|&upto| seq <= upto) || {
                    let (upto, finishes) = run_end(i);
                    // A run that ends the build is checked by the statement that ends it (one
                    // statement fewer under the write lock). Should that check fail, the batch
                    // rolls back and its messages are applied one by one, each checked first.
                    let ok = if finishes && events.len() > 1 {
                        batch.checks.insert(build.id, (seq as i64, upto as i64));
                        true
                    } else {
                        db::advance_build(
                            &mut tx,
                            BuildId(build.id),
                            &build.cookie,
                            lease.worker_id,
                            seq as i64,
                            upto as i64,
                            None,
                        )
                        .await?
                    };
                    if ok {
                        advanced.insert(build.id, upto);
                    }
                    ok
                });
            if !recorded {
                refusals.push(format!(
                    "build {}: message {seq} does not follow {} or the build is no longer running; refused",
                    build.id, lease.last_seq
                ));
                continue;
            }
            lease.last_seq = seq;
            if let Some(end) = self
                .apply_event(&mut tx, &mut lease, BuildId(build.id), event, &mut batch)
                .await?
            {
                finished.push((build.id, end.0, end.1));
            }
            acks.insert(build.id, (build.clone(), seq));
            work.insert(build.id, lease);
        }
        let live = self.live.wanted();
        // The batch's new steps, then its new logs (which may belong to them).
        let mut step_ids = Vec::with_capacity(batch.new_steps.len());
        for s in &batch.new_steps {
            let end = s
                .end
                .map(|r| StepEndRow::of(r).map(|e| (e, r)))
                .transpose()?;
            let row = db::NewStep {
                build: BuildId(s.build),
                number: i64::from(s.number),
                name: s.name,
                started_at: now,
                state: s.state.unwrap_or_default(),
                progress: s.progress.as_ref(),
                end: end.as_ref().map(|(e, r)| (e.end(r), now)),
            };
            let id = db::insert_step(&mut tx, &row).await?;
            step_ids.push(id);
            batch.live_steps.push(id);
            if let Some(lease) = work.get_mut(&s.build) {
                lease.steps.insert(s.number, (id, s.name.to_owned()));
            }
        }
        let mut log_ids = Vec::with_capacity(batch.new_logs.len());
        for l in &batch.new_logs {
            let (step_id, complete) = match l.step {
                StepRef::Stored(id) => (id, batch.closed.contains(&id)),
                StepRef::New(i) => (step_ids[i], batch.new_steps[i].end.is_some()),
            };
            let id = db::insert_log(&mut tx, step_id, l.name, "s", &l.text, complete).await?;
            log_ids.push(id);
            // Its step's event tells a build page to show the new log.
            batch.live_steps.push(step_id);
            if let Some(lease) = work.get_mut(&l.build) {
                lease.logs.insert((l.number, l.name.to_owned()), id);
            }
        }
        for (step_id, progress) in &batch.progress {
            db::set_step_progress(&mut tx, *step_id, progress).await?;
        }
        let mut live_logs = Vec::new();
        for (log_id, text) in &batch.appends {
            let end = db::append_log(&mut tx, *log_id, text).await?;
            if live {
                live_logs.push((*log_id, end - text.lines().count() as i64, text.as_str()));
            }
        }
        tx.commit().await?;
        {
            let mut inner = self.workers.lock();
            for (id, lease) in work {
                if let Some((_, result, _)) = finished.iter().find(|(f, ..)| *f == id) {
                    self.metrics.build_finished(
                        &lease.builder,
                        *result,
                        Some(lease.dispatched.elapsed()),
                    );
                    inner.leases.remove(&id);
                    inner.ended.insert(id, (lease.cookie, Instant::now()));
                } else if let Some(l) = inner.leases.get_mut(&id) {
                    *l = lease;
                }
            }
        }
        for (builder, took, resources) in &batch.steps_ended {
            self.metrics.step_finished(builder, *took);
            if let Some(r) = resources {
                self.metrics.step_resources(builder, r);
            }
        }
        self.metrics.refused(refusals.len());
        for (build, seq) in acks.into_values() {
            self.send_to(worker, ToWorker::Ack { build, seq });
        }
        for message in refusals {
            tracing::warn!(worker = %worker, %message, "refused a worker's message");
            self.send_to(worker, ToWorker::Error { message });
        }
        for (id, result, message) in &finished {
            tracing::info!(worker = %worker, build = id, result = %result, "build finished");
            match message {
                // The worker could not even start the build.
                Some(m) => self.worker_failed(worker, m).await?,
                None => self.worker_ok(worker).await?,
            }
        }
        if !finished.is_empty() {
            self.wake_dispatch();
            // Reports and buildset events were queued with the builds' ends.
            self.wake_reporters();
        }
        // Live updates last: leases, acknowledgements and dispatch do not wait on them.
        if live {
            let new_logs = log_ids.iter().zip(&batch.new_logs);
            for (log_id, offset, text) in live_logs
                .into_iter()
                .chain(new_logs.map(|(id, l)| (*id, 0, l.text.as_str())))
            {
                self.live
                    .send_log(log_id, || crate::live::log_event(log_id, offset, text));
            }
            let ended: Vec<i64> = finished.iter().map(|(id, ..)| *id).collect();
            crate::live::publish(self, &batch.live_steps, &ended).await;
        }
        Ok(())
    }

    /// Applies one build event in `tx`. Returns the build's end when it finished.
    async fn apply_event<'e>(
        &self,
        tx: &mut db::Tx,
        lease: &mut Lease,
        build: BuildId,
        event: &'e BuildEvent,
        batch: &mut Batch<'e>,
    ) -> anyhow::Result<Option<(Outcome, Option<String>)>> {
        match *event {
            BuildEvent::StepStarted { step, ref name } => {
                // A step started twice fails the batch as its second row is written; the
                // messages are then applied one by one and that one is refused.
                batch.new_steps.push(NewStep {
                    build: build.0,
                    number: step,
                    name,
                    state: None,
                    progress: None,
                    end: None,
                });
                lease.fresh.insert(step);
            }
            BuildEvent::Log {
                step,
                ref log,
                channel,
                ref text,
            } => {
                let step_ref = self.step_of(tx, lease, batch, build, step).await?;
                // The log's text so far in this batch: a stored log's, or a new one's.
                let new = batch
                    .new_logs
                    .iter()
                    .position(|l| l.build == build.0 && l.number == step && l.name == log);
                let target = match (lease.logs.get(&(step, log.clone())), new) {
                    (Some(id), _) => Ok(*id),
                    (None, Some(i)) => Err(i),
                    (None, None) => {
                        let known = match step_ref {
                            StepRef::Stored(id) if !lease.fresh.contains(&step) => {
                                db::log_id(&mut *tx, id, log).await?
                            }
                            _ => None,
                        };
                        match known {
                            Some(id) => {
                                lease.logs.insert((step, log.clone()), id);
                                Ok(id)
                            }
                            None => {
                                batch.new_logs.push(NewLog {
                                    build: build.0,
                                    number: step,
                                    step: step_ref,
                                    name: log,
                                    text: String::new(),
                                });
                                Err(batch.new_logs.len() - 1)
                            }
                        }
                    }
                };
                // Buildbot's stream logs: each line starts with its channel (o, e, h).
                let tag = match channel {
                    runtime::Channel::Stdout => 'o',
                    runtime::Channel::Stderr => 'e',
                    runtime::Channel::Header => 'h',
                };
                // Written when the batch commits: one chunk per log per batch.
                let tagged = match target {
                    Ok(id) => batch.appends.entry(id).or_default(),
                    Err(i) => &mut batch.new_logs[i].text,
                };
                for line in text.lines() {
                    tagged.push(tag);
                    tagged.push_str(line);
                    tagged.push('\n');
                }
            }
            BuildEvent::Report { step, ref report } => {
                // A step that ends in this batch has its final summary and progress written
                // as it ends.
                if batch.ending.contains(&(build.0, step)) {
                    return Ok(None);
                }
                match report {
                    runtime::ReportEvent::Summary { text } => {
                        match self.step_of(tx, lease, batch, build, step).await? {
                            StepRef::Stored(id) => {
                                db::set_step_state(&mut *tx, id, text).await?;
                                batch.live_steps.push(id);
                            }
                            StepRef::New(i) => batch.new_steps[i].state = Some(text),
                        }
                    }
                    runtime::ReportEvent::Progress { metric, value } => {
                        let step_ref = self.step_of(tx, lease, batch, build, step).await?;
                        let metrics = lease.progress.entry(step).or_default();
                        // A worker's host bounds a step's metrics; a hostile worker is
                        // bounded here.
                        if metrics.len() >= runtime::MAX_REPORT_NAMES
                            && !metrics.contains_key(metric)
                        {
                            return Ok(None);
                        }
                        metrics.insert(metric.clone(), *value);
                        let all = serde_json::to_value(&*metrics)?;
                        match step_ref {
                            StepRef::Stored(id) => {
                                batch.progress.insert(id, all);
                            }
                            StepRef::New(i) => batch.new_steps[i].progress = Some(all),
                        }
                    }
                    _ => {}
                }
            }
            BuildEvent::StepFinished { step, ref record } => {
                let step_ref = match self.step_of(tx, lease, batch, build, step).await {
                    Ok(r) => r,
                    // A step that never started (skipped) gets its row as it ends.
                    Err(_) => {
                        batch.new_steps.push(NewStep {
                            build: build.0,
                            number: step,
                            name: &record.name,
                            state: None,
                            progress: None,
                            end: None,
                        });
                        StepRef::New(batch.new_steps.len() - 1)
                    }
                };
                lease.progress.remove(&step);
                let o = &record.outcome;
                if record.ran {
                    batch
                        .steps_ended
                        .push((lease.builder.clone(), o.elapsed, o.resources));
                }
                match step_ref {
                    StepRef::New(i) => batch.new_steps[i].end = Some(&**record),
                    StepRef::Stored(id) => {
                        let end = StepEndRow::of(record)?;
                        db::finish_step(&mut *tx, id, &end.end(record), batch.now).await?;
                        batch.closed.insert(id);
                        batch.live_steps.push(id);
                    }
                }
                let props: Vec<SourcedProperty> = o
                    .properties
                    .iter()
                    .map(|(name, value)| SourcedProperty {
                        name: name.clone(),
                        value: value.clone(),
                        source: format!("Step {}", record.name),
                    })
                    .collect();
                db::set_build_properties(&mut *tx, build, &props).await?;
            }
            // The build's properties are stored already: those it started with at dispatch,
            // each step's as the step finished. The worker's final set only repeats them.
            BuildEvent::Finished {
                result,
                ref message,
                properties: _,
            } => {
                let behaviour = jobs::behaviour(lease.kind).context("a lease of no kind")?;
                let state = message.clone().unwrap_or_else(|| result.to_string());
                match batch.checks.remove(&build.0) {
                    Some((from, to)) => {
                        let end = db::BuildEnd {
                            results: result,
                            state: &state,
                            at: batch.now,
                        };
                        let recorded = db::advance_build(
                            &mut *tx,
                            build,
                            &lease.cookie,
                            lease.worker_id,
                            from,
                            to,
                            Some(end),
                        )
                        .await?;
                        anyhow::ensure!(
                            recorded,
                            "build {build} is no longer running under this lease in the database"
                        );
                    }
                    None => {
                        db::finish_build(&mut *tx, build, result, &state, batch.now).await?;
                    }
                }
                crate::reporters::queue_build(
                    tx,
                    &self.state().config.reporters,
                    &lease.builder,
                    build.0,
                    crate::reporters::Event::BuildFinished,
                    Some(result),
                    batch.now,
                )
                .await?;
                match behaviour.handle_finished(result)? {
                    RequestFate::Requeue => {
                        db::unclaim_requests(&mut *tx, &[lease.request], self.id).await?;
                    }
                    RequestFate::Complete(r) => {
                        crate::requests::finish_requests(
                            &self.db,
                            tx,
                            self.id,
                            &[(lease.request, r, None)],
                            batch.now,
                        )
                        .await?;
                    }
                }
                return Ok(Some((result, message.clone())));
            }
        }
        Ok(None)
    }

    /// The id of a step of a leased build.
    async fn step_of(
        &self,
        tx: &mut db::Tx,
        lease: &mut Lease,
        batch: &Batch<'_>,
        build: BuildId,
        step: u32,
    ) -> anyhow::Result<StepRef> {
        let new = |s: &NewStep| s.build == build.0 && s.number == step;
        if let Some(i) = batch.new_steps.iter().rposition(new) {
            return Ok(StepRef::New(i));
        }
        if let Some((id, _)) = lease.steps.get(&step) {
            return Ok(StepRef::Stored(*id));
        }
        let id = db::step_id(&mut *tx, build, i64::from(step))
            .await?
            .with_context(|| format!("step {step} of build {build} has not started"))?;
        lease.steps.insert(step, (id, String::new()));
        Ok(StepRef::Stored(id))
    }

    /// Ends a running build RETRY (its request goes back to the queue) and tells its worker
    /// to stop it; late reports of that attempt are refused. False if it was not running.
    pub async fn retry_build(&self, build: i64, why: &str) -> anyhow::Result<bool> {
        let lease = self.workers.lock().leases.remove(&build);
        let mut tx = self.db.begin().await?;
        let row = db::running_builds(&mut tx, Some(self.id), Some(BuildId(build)))
            .await?
            .pop();
        let Some(row) = row else {
            tx.commit().await?;
            return Ok(false);
        };
        if row.master != self.id {
            db::adopt_build(&mut tx, row.id, row.request, self.id).await?;
        }
        let ended = db::finish_build(&mut tx, row.id, Outcome::Retry, why, now_ms()).await?;
        if ended {
            db::unclaim_requests(&mut tx, &[row.request], self.id).await?;
            crate::reporters::queue_build(
                &mut tx,
                &self.state().config.reporters,
                &row.builder,
                row.id.0,
                crate::reporters::Event::BuildFinished,
                Some(Outcome::Retry),
                now_ms(),
            )
            .await?;
        }
        tx.commit().await?;
        if ended {
            self.wake_reporters();
        }
        if ended {
            self.metrics.build_finished(
                &row.builder,
                Outcome::Retry,
                lease.as_ref().map(|l| l.dispatched.elapsed()),
            );
            tracing::warn!(build, reason = %why, "build ended RETRY; its request is queued again");
            if let (Some(worker), Some(lease)) = (row.worker.as_deref(), lease) {
                self.send_to(
                    worker,
                    ToWorker::Stop {
                        build: BuildRef {
                            id: build,
                            cookie: lease.cookie,
                        },
                        reason: format!("retried: {why}"),
                    },
                );
            }
            self.wake_dispatch();
            crate::live::publish(self, &[], &[build]).await;
        }
        Ok(ended)
    }

    async fn worker_failed(&self, name: &str, note: &str) -> anyhow::Result<()> {
        {
            let mut inner = self.workers.lock();
            inner.healthy.remove(name);
            inner.health = None;
        }
        let mut conn = self.db.pool().acquire().await?;
        let h = db::record_worker_outcome(
            &mut conn,
            name,
            Some(note),
            QUARANTINE_AFTER,
            quarantine_ms,
            now_ms(),
        )
        .await?;
        if let Some(h) = h
            && let Some(until) = h.quarantine_until
        {
            tracing::warn!(worker = %name, failures = h.failure_count, note, quarantined_for_ms = until - now_ms(), "worker quarantined");
        }
        Ok(())
    }

    async fn worker_ok(&self, name: &str) -> anyhow::Result<()> {
        if self.workers.lock().healthy.contains(name) {
            return Ok(());
        }
        let mut conn = self.db.pool().acquire().await?;
        db::record_worker_outcome(
            &mut conn,
            name,
            None,
            QUARANTINE_AFTER,
            quarantine_ms,
            now_ms(),
        )
        .await?;
        {
            let mut inner = self.workers.lock();
            inner.healthy.insert(name.to_owned());
            inner.health = None;
        }
        Ok(())
    }

    /// One dispatch pass: free workers take claimed requests. Returns the builds started.
    pub async fn dispatch(&self) -> anyhow::Result<usize> {
        let state = self.state();
        let now = now_ms();
        let mut free: Vec<WorkerInfo> = {
            let inner = self.workers.lock();
            if inner.conns.is_empty() {
                return Ok(0);
            }
            inner
                .conns
                .iter()
                .filter(|(_, c)| !c.draining)
                .map(|(name, c)| {
                    let mut info = c.info.clone();
                    info.running_builds =
                        inner.leases.values().filter(|l| &l.worker == name).count() as u32;
                    info
                })
                .filter(|w| w.running_builds < w.max_builds)
                .collect()
        };
        if free.is_empty() {
            return Ok(0);
        }
        let cached = self
            .workers
            .lock()
            .health
            .as_ref()
            .filter(|(at, _)| at.elapsed() < Duration::from_secs(1))
            .map(|(_, h)| h.clone());
        let health = match cached {
            Some(h) => h,
            None => {
                let mut conn = self.db.pool().acquire().await?;
                let h = db::worker_health(&mut conn).await?;
                self.workers.lock().health = Some((Instant::now(), h.clone()));
                h
            }
        };
        free.retain(|w| {
            health
                .get(&w.name)
                .is_none_or(|h| !h.paused && h.quarantine_until.is_none_or(|until| until <= now))
        });
        if free.is_empty() {
            return Ok(0);
        }
        free.sort_by(|a, b| a.name.cmp(&b.name));
        let mut busy = {
            let inner = self.workers.lock();
            inner
                .leases
                .values()
                .map(|l| (l.builder.clone(), l.worker.clone()))
                .collect()
        };
        let assignments = crate::requests::plan_for_workers(
            &self.db,
            &state.builders,
            &mut free,
            &mut busy,
            &state.hooks,
        )
        .await?;
        tracing::debug!(
            free = ?free.iter().map(|w| (&w.name, w.running_builds)).collect::<Vec<_>>(),
            planned = assignments.len(),
            "dispatch pass"
        );
        // Each build's reads first, outside the write lock; then one transaction claims the
        // pass's requests and records their builds. (Claiming in a transaction of its own,
        // then starting each build in another, held SQLite's write lock twice as often: the
        // farm benchmark's W3.) One builder's builds start one after another in it, each
        // taking the builder's next number.
        let mut prepared = Vec::with_capacity(assignments.len());
        for a in &assignments {
            match self.prepare_start(&state, a).await {
                Ok(p) => prepared.push(p),
                Err(error) => {
                    tracing::error!(request = %a.request, worker = %a.worker, error = format!("{error:#}"), "cannot start a build; its request stays queued");
                }
            }
        }
        let started = match self.start_builds(&state, &prepared).await {
            Ok(started) => started,
            Err(error) => {
                // One bad request must not hold up the others: each alone, in its own
                // transaction (a claim rolled back leaves its request queued).
                if prepared.len() > 1 {
                    tracing::debug!(
                        error = format!("{error:#}"),
                        "starting a pass's builds together failed; one at a time"
                    );
                }
                let mut started = Vec::new();
                for p in &prepared {
                    match self.start_builds(&state, std::slice::from_ref(p)).await {
                        Ok(s) => started.extend(s),
                        Err(error) => {
                            tracing::error!(request = %p.a.request, worker = %p.a.worker, error = format!("{error:#}"), "cannot start a build; its request stays queued");
                        }
                    }
                }
                started
            }
        };
        let count = started.len();
        for s in started {
            self.announce_start(&s).await;
        }
        Ok(count)
    }

    /// What starting assignment `a` reads, before any lock: its builder, worker and buildset.
    async fn prepare_start<'a>(
        &self,
        state: &'a MasterState,
        a: &'a Assignment,
    ) -> anyhow::Result<Prepared<'a>> {
        let builder = state
            .config
            .builder(&a.builder)
            .with_context(|| format!("builder {} is not configured", a.builder))?;
        let worker_cfg = state
            .config
            .workers
            .iter()
            .find(|w| w.name == a.worker)
            .with_context(|| format!("worker {} is not configured", a.worker))?;
        let (info, worker_id) = {
            let inner = self.workers.lock();
            let c = inner
                .conns
                .get(&a.worker)
                .with_context(|| format!("worker {} disconnected", a.worker))?;
            (c.info.clone(), c.worker_id)
        };
        let request = &a.queued;
        let mut conn = self.db.pool().acquire().await?;
        let (buildset, bs_props) = db::buildset_with_properties(&mut conn, request.buildset)
            .await?
            .context("the request's buildset vanished")?;
        let stamps = db::buildset_sourcestamps(&mut conn, request.buildset).await?;
        // Forced builds have no changes, so no one to blame.
        let blamelist = if stamps.iter().any(|s| !s.changes.is_empty()) {
            db::blamelist(&mut conn, request.buildset).await?
        } else {
            Vec::new()
        };
        let uses_uploads = builder.steps.iter().any(|s| {
            std::iter::once(&s.module)
                .chain(s.observers.iter().map(|o| &o.module))
                .any(|m| matches!(m, config::ModuleSource::Uploaded(_)))
        });
        let modules = if uses_uploads {
            db::step_modules(&mut conn, None).await?
        } else {
            Vec::new()
        };
        Ok(Prepared {
            a,
            builder,
            worker_cfg,
            info,
            worker_id,
            buildset,
            stamps,
            bs_props,
            blamelist,
            modules,
        })
    }

    /// Claims the prepared requests and records their builds in one transaction. A request
    /// another master claimed first is left out; a build that cannot run as configured ends
    /// EXCEPTION in the same transaction.
    async fn start_builds(
        &self,
        state: &MasterState,
        prepared: &[Prepared<'_>],
    ) -> anyhow::Result<Vec<Started>> {
        if prepared.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.db.begin().await?;
        let mut started = Vec::with_capacity(prepared.len());
        for p in prepared {
            if !db::claim_request(&mut tx, p.a.request, self.id, now_ms()).await? {
                tracing::debug!(request = %p.a.request, "another master claimed the request first");
                continue;
            }
            started.push(self.record_start(&mut tx, state, p).await?);
        }
        tx.commit().await?;
        Ok(started)
    }

    /// Records the build of a claimed request in `tx` and composes its job.
    async fn record_start(
        &self,
        tx: &mut db::Tx,
        state: &MasterState,
        p: &Prepared<'_>,
    ) -> anyhow::Result<Started> {
        let (a, builder, info) = (p.a, p.builder, &p.info);
        let request = &a.queued;
        let trusted = builder.trusted && request.trusted;
        let cookie = new_cookie();
        let (build_id, number) = db::insert_build(
            &mut *tx,
            a.request,
            Some(p.worker_id),
            self.id,
            &cookie,
            now_ms(),
        )
        .await?;
        let map = |m: &std::collections::BTreeMap<String, serde_json::Value>| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<serde_json::Map<_, _>>()
        };
        let properties = crate::properties::for_build(
            &map(&state.config.properties),
            &p.bs_props,
            &map(&builder.properties),
            &map(&p.worker_cfg.properties),
            &p.stamps,
            &crate::properties::BuildFacts {
                builder: &builder.name,
                number,
                worker: Some(&a.worker),
                scheduler: p.buildset.scheduler.as_deref(),
                reason: &p.buildset.reason,
                blamelist: &p.blamelist,
            },
        );
        let sourced: Vec<SourcedProperty> = properties
            .iter()
            .map(|(name, p)| SourcedProperty {
                name: name.to_owned(),
                value: p.value.clone(),
                source: p.source.clone(),
            })
            .collect();
        db::set_build_properties(&mut *tx, build_id, &sourced).await?;
        let step_args = builder
            .steps
            .iter()
            .flat_map(|s| std::iter::once(&s.args).chain(s.observers.iter().map(|o| &o.args)));
        let secrets = if info.sandbox {
            Ok(Default::default())
        } else {
            crate::secrets::for_build(&state.config.secrets, step_args, trusted)
                .map_err(|e| e.to_string())
        };
        let build = BuildRef {
            id: build_id.0,
            cookie: cookie.clone(),
        };
        let behaviour: &dyn JobBehaviour = &jobs::StepsBehaviour;
        let resolve = |m: &config::ModuleRef| {
            let versions = p.modules.iter().filter(|s| s.name == m.name);
            let module = match &m.version {
                config::ModuleVersion::Latest => versions.max_by_key(|s| s.uploaded_ms),
                config::ModuleVersion::Exact(v) => versions.into_iter().find(|s| &s.version == v),
            }?;
            Some(kiln_protocol::ModuleSpec::File {
                label: m.to_string(),
                sha1: module.sha1.clone(),
                sha256: module.sha256.clone(),
                size: module.size as u64,
            })
        };
        let job = secrets.and_then(|secrets| {
            let job = behaviour
                .compose(JobContext {
                    build: build.clone(),
                    number,
                    builder,
                    stamps: &p.stamps,
                    properties,
                    secrets,
                    trusted,
                    modules: &resolve,
                })
                .map_err(|e| e.to_string())?;
            behaviour.verify(&job, info).map_err(|e| e.to_string())?;
            Ok(job)
        });
        let job = match job {
            Ok(job) => job,
            Err(message) => {
                // A build that can never run as configured: EXCEPTION, with the reason.
                // (Never reported as started.)
                db::finish_build(&mut *tx, build_id, Outcome::Exception, &message, now_ms())
                    .await?;
                crate::reporters::queue_build(
                    tx,
                    &state.config.reporters,
                    &builder.name,
                    build_id.0,
                    crate::reporters::Event::BuildFinished,
                    Some(Outcome::Exception),
                    now_ms(),
                )
                .await?;
                crate::requests::finish_requests(
                    &self.db,
                    tx,
                    self.id,
                    &[(a.request, Outcome::Exception, None)],
                    now_ms(),
                )
                .await?;
                return Ok(Started::Failed {
                    build: build_id.0,
                    builder: builder.name.clone(),
                    message,
                });
            }
        };
        let reported = crate::reporters::queue_build(
            tx,
            &state.config.reporters,
            &builder.name,
            build_id.0,
            crate::reporters::Event::BuildStarted,
            None,
            now_ms(),
        )
        .await?;
        Ok(Started::Running {
            job: Box::new(job),
            number,
            reported,
            lease: Box::new(Lease {
                worker: a.worker.clone(),
                worker_id: p.worker_id,
                cookie,
                kind: behaviour.kind(),
                builder: a.builder.clone(),
                request: a.request,
                last_seq: 0,
                steps: HashMap::new(),
                logs: HashMap::new(),
                fresh: HashSet::new(),
                progress: HashMap::new(),
                dispatched: Instant::now(),
                orphaned: None,
            }),
        })
    }

    /// After the commit: a started build's lease, its job sent to its worker, and the news.
    async fn announce_start(&self, started: &Started) {
        match started {
            Started::Failed {
                build,
                builder,
                message,
            } => {
                self.wake_reporters();
                self.metrics
                    .build_finished(builder, Outcome::Exception, None);
                tracing::error!(build, %builder, %message, "build cannot run");
                crate::live::publish(self, &[], &[*build]).await;
            }
            Started::Running {
                job,
                number,
                reported,
                lease,
            } => {
                if *reported {
                    self.wake_reporters();
                }
                let id = job.build.id;
                self.workers.lock().leases.insert(id, (**lease).clone());
                self.metrics.build_started(&lease.builder);
                tracing::info!(build = id, builder = %lease.builder, number, worker = %lease.worker, "build dispatched");
                if !self.send_to(&lease.worker, ToWorker::Start(job.clone())) {
                    // Gone between the claim and now: the scan retries it.
                    if let Some(l) = self.workers.lock().leases.get_mut(&id) {
                        l.orphaned.get_or_insert(Instant::now());
                    }
                }
                crate::live::publish(self, &[], &[id]).await;
            }
        }
    }

    /// The periodic check (every heartbeat): asks each worker what it runs, retries builds
    /// of workers lost for `lost_after`, and builds in the database nobody holds.
    pub async fn scan(&self, lost_after: Duration) -> anyhow::Result<()> {
        let now = Instant::now();
        let lost: Vec<(i64, String)> = {
            let mut inner = self.workers.lock();
            // A scan answers within a heartbeat; ends older than that cannot be in one.
            inner.ended.retain(|_, (_, at)| {
                now.duration_since(*at) < lost_after / crate::server::DEAD_AFTER_BEATS
            });
            for (_, c) in inner.conns.iter_mut() {
                // An unanswered scan is simply replaced.
                let n = self.workers.next_scan.fetch_add(1, Ordering::Relaxed) + 1;
                if c.tx.send(ToWorker::Scan { scan: n }).is_ok() {
                    c.scan = Some((n, now));
                }
            }
            inner
                .leases
                .iter()
                .filter(|(_, l)| l.orphaned.is_some_and(|t| now - t > lost_after))
                .map(|(id, l)| (*id, l.worker.clone()))
                .collect()
        };
        for (id, worker) in lost {
            if self
                .retry_build(id, &format!("worker {worker} was lost"))
                .await?
            {
                self.worker_failed(&worker, &format!("lost while running build {id}"))
                    .await?;
            }
        }
        let running = {
            let mut conn = self.db.pool().acquire().await?;
            db::running_builds(&mut conn, Some(self.id), None).await?
        };
        let stale: Vec<(i64, Option<String>)> = {
            let mut inner = self.workers.lock();
            let ids: HashSet<i64> = running.iter().map(|b| b.id.0).collect();
            inner.unheld.retain(|id, _| ids.contains(id));
            let mut stale = Vec::new();
            for b in &running {
                if inner.leases.contains_key(&b.id.0) {
                    inner.unheld.remove(&b.id.0);
                    continue;
                }
                let since = *inner.unheld.entry(b.id.0).or_insert(now);
                // After a master restart its workers need time to notice and reconnect
                // (their backoff tops out at 15 s).
                if now - since > lost_after.max(UNHELD_GRACE) {
                    stale.push((b.id.0, b.worker.clone()));
                }
            }
            stale
        };
        for (id, worker) in stale {
            let who = worker.as_deref().unwrap_or("(none)");
            self.retry_build(id, &format!("worker {who} did not come back to claim it"))
                .await?;
            self.workers.lock().unheld.remove(&id);
        }
        Ok(())
    }
}

impl Master {
    /// Asks the worker running build `id` to stop its step `step` (it ends CANCELLED, which
    /// halts the build unless later steps are `always_run`). False if no worker of this
    /// master runs the build.
    pub fn stop_step(&self, id: i64, step: u32, reason: &str) -> bool {
        let lease = self.workers.lock().leases.get(&id).cloned();
        lease.is_some_and(|l| {
            self.send_to(
                &l.worker,
                ToWorker::StopStep {
                    build: BuildRef {
                        id,
                        cookie: l.cookie,
                    },
                    step,
                    reason: reason.to_owned(),
                },
            )
        })
    }

    /// Asks the worker running build `id` to stop it. False if no worker of this master runs
    /// it.
    pub fn stop_build(&self, id: i64, reason: &str) -> bool {
        let lease = self.workers.lock().leases.get(&id).cloned();
        lease.is_some_and(|l| {
            self.send_to(
                &l.worker,
                ToWorker::Stop {
                    build: BuildRef {
                        id,
                        cookie: l.cookie,
                    },
                    reason: reason.to_owned(),
                },
            )
        })
    }
}

/// A fresh build cookie: 128 random bits in hex.
fn new_cookie() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

/// What the API shows of a connected worker.
pub fn describe(master: &Master) -> Vec<serde_json::Value> {
    let inner = master.workers.lock();
    let mut out: Vec<serde_json::Value> = inner
        .conns
        .iter()
        .map(|(name, c)| {
            let builds: Vec<i64> = inner
                .leases
                .iter()
                .filter(|(_, l)| &l.worker == name)
                .map(|(id, _)| *id)
                .collect();
            json!({
                "name": name,
                "connected": true,
                "sandbox": c.info.sandbox,
                "arch": c.info.arch,
                "os": c.info.os,
                "tags": c.info.tags,
                "max_builds": c.info.max_builds,
                "draining": c.draining,
                "builds": builds,
            })
        })
        .collect();
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_backs_off_exponentially_up_to_an_hour() {
        assert_eq!(quarantine_ms(3), 30_000);
        assert_eq!(quarantine_ms(4), 60_000);
        assert_eq!(quarantine_ms(5), 120_000);
        assert_eq!(quarantine_ms(50), 3_600_000);
    }

    #[test]
    fn cookies_are_fresh_and_hex() {
        let a = new_cookie();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_cookie());
    }
}
