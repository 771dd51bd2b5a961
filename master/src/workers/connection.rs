//! Connections: a worker's hello checked against `[[workers]]` (token in constant time, sandbox
//! mode and platform), the welcome that adopts the builds it runs, then its messages and the
//! master's over one connection until it closes, falls silent or is replaced.

use super::apply::BATCH;
use super::*;

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
}
