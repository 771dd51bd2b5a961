//! The worker: connects out to the master over a WebSocket, runs the builds it is sent with
//! the runtime, and streams what happens back (see [`kiln_protocol`]).
//!
//! - One connection at a time; when it drops, the worker reconnects with exponential backoff
//!   and jitter, and says what it is running so the master can adopt it. Builds go on while
//!   the master is away; their messages wait in the [`Outbox`] (a full window pauses them).
//! - A build runs in the builder's workdir under the base directory (one build per workdir at
//!   a time). In sandbox mode every command is confined, the network is off, secrets are never
//!   accepted, and the workdir is wiped before and after every build.
//! - Modules come from the built-ins or the master's file cache ([`filecache`]), verified by
//!   SHA-256 and size; compiled components are kept in memory by content.
//! - Shutdown: the first signal drains (no new builds, running ones finish and are reported);
//!   the second cancels running builds, reports them, and leaves.

pub mod filecache;
mod job;
pub mod outbox;
mod tls;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use kiln_protocol::{
    BuildRef, CONNECT_PATH, Capabilities, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ToMaster, ToWorker,
};
pub use outbox::Outbox;
use runtime::CancelToken;
use runtime::confine::Confinement;
use runtime::{Loaded, Runtime};

/// How long the writer lets messages gather before sending them.
const COALESCE: Duration = Duration::from_millis(1);

/// The longest wait between reconnection attempts (before jitter of up to half again).
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How a worker is set up.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The master's URL (`http://host:port`, `https://...`, or `ws://`/`wss://`).
    pub master: String,
    /// The worker's name, as in the master's `[[workers]]`.
    pub name: String,
    /// The worker's token.
    pub token: String,
    /// Sandbox mode.
    pub sandbox: bool,
    /// The base directory: builders' workdirs, the file cache, artifacts.
    pub base_dir: PathBuf,
    /// How many builds run at once.
    pub max_builds: u32,
    /// Tags advertised to the master.
    pub tags: Vec<String>,
    /// Where compiled components are cached (none: compile every time).
    pub component_cache: Option<PathBuf>,
    /// A PEM file of certificate authorities trusted for a TLS master, beside the public ones.
    pub ca_cert: Option<PathBuf>,
}

/// The master's two addresses, from the one URL a user gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The WebSocket URL of the worker endpoint.
    pub connect: String,
    /// The HTTP base (`http://host:port`, no trailing slash), for the file cache.
    pub http: String,
}

impl Endpoints {
    /// Parses the master's URL: `http(s)://` or `ws(s)://`, a host, an optional port and path.
    pub fn parse(master: &str) -> Result<Endpoints, String> {
        let (scheme, rest) = master.split_once("://").ok_or_else(|| {
            format!("--master {master:?}: write a URL such as http://master.example:8010")
        })?;
        let (ws, http) = match scheme.to_ascii_lowercase().as_str() {
            "http" | "ws" => ("ws", "http"),
            "https" | "wss" => ("wss", "https"),
            other => {
                return Err(format!(
                    "--master {master:?}: scheme {other:?} is not supported; use http://, https://, ws:// or wss://"
                ));
            }
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.starts_with('/') {
            return Err(format!("--master {master:?}: the URL names no host"));
        }
        Ok(Endpoints {
            connect: format!("{ws}://{rest}{CONNECT_PATH}"),
            http: format!("{http}://{rest}"),
        })
    }
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Taking builds.
    Running,
    /// Finishing running builds, taking no new ones.
    Draining,
    /// Cancelling running builds, then leaving.
    Aborting,
}

/// A build in progress: what stops it.
struct Active {
    build: BuildRef,
    cancel: CancelToken,
    steps: Arc<Mutex<HashMap<usize, CancelToken>>>,
}

impl Active {
    fn stop(&self) {
        self.cancel.cancel();
        for t in lock(&self.steps).values() {
            t.cancel();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the worker's tasks share.
struct Shared {
    options: WorkerOptions,
    endpoints: Endpoints,
    capabilities: Capabilities,
    runtime: Runtime,
    confinement: Option<Arc<Confinement>>,
    cache: filecache::FileCache,
    http: reqwest::Client,
    /// TLS settings for the WebSocket when `--ca-cert` adds roots (else the public roots).
    tls: Option<Arc<rustls::ClientConfig>>,
    outbox: Outbox,
    active: Mutex<HashMap<i64, Active>>,
    /// Compiled components by module, so a build of a known module loads nothing.
    modules: Mutex<HashMap<kiln_protocol::ModuleSpec, Loaded>>,
    /// One build per workdir at a time.
    workdirs: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The master asked this worker to shut down gracefully (as a first signal does).
    shutdown_asked: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn running(&self) -> Vec<BuildRef> {
        let mut builds: Vec<BuildRef> =
            self.outbox.running().into_iter().map(|r| r.build).collect();
        for a in lock(&self.active).values() {
            if !builds.contains(&a.build) {
                builds.push(a.build.clone());
            }
        }
        builds
    }

    fn stop(&self, build: &BuildRef) -> bool {
        let active = lock(&self.active);
        match active.get(&build.id).filter(|a| a.build == *build) {
            Some(a) => {
                a.stop();
                true
            }
            None => false,
        }
    }

    /// Cancels every running build.
    fn stop_all(&self) {
        for a in lock(&self.active).values() {
            a.stop();
        }
    }

    fn idle(&self) -> bool {
        lock(&self.active).is_empty() && self.outbox.is_empty()
    }
}

/// How one connection ended.
enum Ending {
    /// The worker is done (shutdown finished).
    Done,
    /// The master refused the worker for good (bad token, protocol).
    Refused(String),
}

/// The worker's capabilities, from the machine and the options.
fn capabilities(options: &WorkerOptions, confinement: Option<&Confinement>) -> Capabilities {
    Capabilities {
        arch: std::env::consts::ARCH.to_owned(),
        os: std::env::consts::OS.to_owned(),
        tags: options.tags.clone(),
        sandbox: options.sandbox,
        landlock_abi: confinement.map_or(0, |c| c.landlock_abi().max(0) as u32),
        max_builds: options.max_builds.max(1),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// Runs a worker until `phase` says to stop and its builds are done, or the master refuses
/// it. `confinement` is required in sandbox mode (the caller probes the kernel and refuses
/// to start a sandbox worker that cannot confine).
pub async fn run(
    options: WorkerOptions,
    confinement: Option<Arc<Confinement>>,
    mut phase: watch::Receiver<Phase>,
) -> anyhow::Result<()> {
    if options.sandbox && confinement.is_none() {
        bail!("sandbox mode needs confinement, and none was given");
    }
    let endpoints = Endpoints::parse(&options.master).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&options.base_dir)
        .with_context(|| format!("creating the base directory {}", options.base_dir.display()))?;
    let cache = filecache::FileCache::open(options.base_dir.join(".filecache"))
        .context("opening the file cache")?;
    let runtime = Runtime::new(runtime::RuntimeConfig {
        cache_dir: options.component_cache.clone(),
    })?;
    let extra_roots = match &options.ca_cert {
        Some(path) => tls::load_certificates(path)?,
        None => Vec::new(),
    };
    let mut http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
    for cert in &extra_roots {
        http = http.add_root_certificate(
            reqwest::Certificate::from_der(cert).context("a --ca-cert certificate")?,
        );
    }
    let http = http.build().context("building the HTTP client")?;
    let tls = if extra_roots.is_empty() {
        None
    } else {
        Some(tls::client_config(&extra_roots)?)
    };
    let shared = Arc::new(Shared {
        capabilities: capabilities(&options, confinement.as_deref()),
        endpoints,
        options,
        runtime,
        confinement,
        cache,
        http,
        tls,
        outbox: Outbox::default(),
        active: Mutex::new(HashMap::new()),
        modules: Mutex::new(HashMap::new()),
        workdirs: Mutex::new(HashMap::new()),
        shutdown_asked: Default::default(),
    });
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        match serve(&shared, &mut phase).await {
            Ok(Ending::Done) => return Ok(()),
            Ok(Ending::Refused(reason)) => bail!("the master refused this worker: {reason}"),
            Err(error) => {
                shared.outbox.disconnected();
                tracing::warn!(
                    master = %shared.endpoints.connect,
                    error = format!("{error:#}"),
                    "connection to the master lost; reconnecting"
                );
            }
        }
        if *phase.borrow() == Phase::Aborting {
            // Cancelled builds cannot be reported without a master; it retries them.
            shared.outbox.abandon();
            if lock(&shared.active).is_empty() {
                return Ok(());
            }
        }
        if started.elapsed() > MAX_BACKOFF * 3 {
            backoff = Duration::from_millis(100);
        }
        // Full jitter around the backoff, so a farm of workers does not reconnect in step.
        let wait = backoff.mul_f64(rand::random_range(0.5..1.5));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // A closed channel (no one left to signal) disables the branch, not spins on it.
            Ok(()) = phase.changed() => {
                if *phase.borrow() == Phase::Aborting {
                    shared.stop_all();
                }
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection: hello, welcome, then messages both ways until it drops or the worker is
/// done.
async fn serve(shared: &Arc<Shared>, phase: &mut watch::Receiver<Phase>) -> anyhow::Result<Ending> {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_tls_with_config(
            shared.endpoints.connect.as_str(),
            Some(config),
            true,
            shared.tls.clone().map(tokio_tungstenite::Connector::Rustls),
        ),
    )
    .await
    .context("connecting timed out")?
    .map_err(|e| anyhow::anyhow!("{e}{}", tls::hint(&e.to_string())))
    .with_context(|| format!("connecting to {}", shared.endpoints.connect))?;
    let (mut sink, mut stream) = ws.split();
    let hello = ToMaster::Hello {
        protocol: PROTOCOL_VERSION,
        name: shared.options.name.clone(),
        token: shared.options.token.clone(),
        capabilities: shared.capabilities.clone(),
        running: shared.outbox.running(),
    };
    sink.send(Message::text(serde_json::to_string(&hello)?))
        .await?;
    let heartbeat = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .context("the master did not answer the hello")?
            .context("the master closed the connection")??;
        let Message::Text(text) = frame else { continue };
        match serde_json::from_str::<ToWorker>(&text)? {
            ToWorker::Welcome {
                protocol,
                heartbeat_ms,
                adopted,
                abandoned,
            } => {
                if protocol != PROTOCOL_VERSION {
                    return Ok(Ending::Refused(format!(
                        "the master speaks protocol {protocol}, this worker {PROTOCOL_VERSION}"
                    )));
                }
                let mut dropped = shared.outbox.welcomed(&adopted);
                dropped.extend(abandoned);
                for b in &dropped {
                    if shared.stop(b) {
                        tracing::warn!(build = b.id, "the master abandoned this build; stopped it");
                    }
                }
                break Duration::from_millis(heartbeat_ms.clamp(100, 600_000));
            }
            ToWorker::Refused { reason, retry } => {
                if retry {
                    bail!("the master refused the connection: {reason}");
                }
                return Ok(Ending::Refused(reason));
            }
            other => bail!("the master sent {other:?} before its welcome"),
        }
    };
    tracing::info!(master = %shared.endpoints.connect, name = %shared.options.name, "connected");
    let mut beat = tokio::time::interval(heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut told_draining = false;
    loop {
        let asked = shared
            .shutdown_asked
            .load(std::sync::atomic::Ordering::Relaxed);
        let now_phase = (*phase.borrow()).max(if asked {
            Phase::Draining
        } else {
            Phase::Running
        });
        if now_phase > Phase::Running && !told_draining {
            sink.send(Message::text(serde_json::to_string(&ToMaster::Draining)?))
                .await?;
            told_draining = true;
        }
        if now_phase > Phase::Running && shared.idle() {
            let _ = sink.send(Message::Close(None)).await;
            return Ok(Ending::Done);
        }
        for text in shared.outbox.unsent() {
            sink.feed(Message::text(text)).await?;
        }
        sink.flush().await?;
        tokio::select! {
            frame = stream.next() => {
                let frame = frame.context("the master closed the connection")??;
                last_heard = Instant::now();
                match frame {
                    Message::Text(text) => {
                        let message: ToWorker = serde_json::from_str(&text)
                            .context("the master sent a message this worker does not understand")?;
                        if let Some(reply) = handle(shared, message, now_phase) {
                            sink.send(Message::text(serde_json::to_string(&reply)?)).await?;
                        }
                    }
                    Message::Close(_) => bail!("the master closed the connection"),
                    _ => {}
                }
            }
            _ = shared.outbox.ready.notified() => {
                // Let a burst finish (a short step's start, output and end) so it reaches the
                // master as one batch: one transaction there instead of several.
                tokio::time::sleep(COALESCE).await;
            }
            _ = beat.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    bail!("the master has been silent for {:?}", last_heard.elapsed());
                }
                let status = ToMaster::Status { scan: None, running: shared.running() };
                sink.send(Message::text(serde_json::to_string(&status)?)).await?;
                sink.send(Message::Ping(Default::default())).await?;
            }
            // A closed channel (no one left to signal) disables the branch, not spins on it.
            Ok(()) = phase.changed() => {
                if *phase.borrow() == Phase::Aborting {
                    shared.stop_all();
                }
            }
        }
    }
}

/// Handles a message from the master; returns the reply, if any.
fn handle(shared: &Arc<Shared>, message: ToWorker, phase: Phase) -> Option<ToMaster> {
    match message {
        ToWorker::Start(job) => {
            let build = job.build.clone();
            let reject = |reason: String| {
                tracing::warn!(build = build.id, %reason, "refused a build");
                Some(ToMaster::Reject {
                    build: build.clone(),
                    reason,
                })
            };
            if phase != Phase::Running {
                return reject("this worker is shutting down".into());
            }
            if let Err(reason) = job::check(shared, &job) {
                return reject(reason);
            }
            {
                let mut active = lock(&shared.active);
                if active.contains_key(&build.id) {
                    return reject("this worker is already running this build".into());
                }
                if active.len() >= shared.capabilities.max_builds as usize {
                    return reject(format!(
                        "this worker is full ({} builds running)",
                        active.len()
                    ));
                }
                active.insert(
                    build.id,
                    Active {
                        build: build.clone(),
                        cancel: CancelToken::new(),
                        steps: Default::default(),
                    },
                );
            }
            shared.outbox.open(build.clone());
            tracing::info!(build = build.id, builder = %job.builder, number = job.number, "build started");
            tokio::spawn(job::run(shared.clone(), *job));
            None
        }
        ToWorker::Stop { build, reason } => {
            if shared.stop(&build) {
                tracing::info!(build = build.id, %reason, "stopping a build");
            }
            None
        }
        ToWorker::StopStep {
            build,
            step,
            reason,
        } => {
            let active = lock(&shared.active);
            if let Some(a) = active.get(&build.id).filter(|a| a.build == build) {
                tracing::info!(build = build.id, step, %reason, "stopping a step");
                if let Some(t) = lock(&a.steps).get(&(step as usize)) {
                    t.cancel();
                }
            }
            None
        }
        ToWorker::Ack { build, seq } => {
            shared.outbox.ack(&build, seq);
            None
        }
        ToWorker::Scan { scan } => Some(ToMaster::Status {
            scan: Some(scan),
            running: shared.running(),
        }),
        ToWorker::Error { message } => {
            tracing::warn!(%message, "the master refused a message from this worker");
            None
        }
        ToWorker::Shutdown { reason } => {
            tracing::info!(%reason, "the master asked this worker to shut down; finishing running builds");
            shared
                .shutdown_asked
                .store(true, std::sync::atomic::Ordering::Relaxed);
            None
        }
        ToWorker::Welcome { .. } | ToWorker::Refused { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_urls() {
        assert_eq!(
            Endpoints::parse("http://127.0.0.1:8010/").unwrap(),
            Endpoints {
                connect: "ws://127.0.0.1:8010/workers/connect".into(),
                http: "http://127.0.0.1:8010".into()
            }
        );
        assert_eq!(
            Endpoints::parse("wss://ci.example.org").unwrap().http,
            "https://ci.example.org"
        );
        assert!(
            Endpoints::parse("ftp://x")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(Endpoints::parse("localhost:8010").is_err());
        assert!(Endpoints::parse("http://").is_err());
    }
}
