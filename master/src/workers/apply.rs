//! Applying what workers send: a batch of build messages checked against the lease (worker,
//! cookie, next sequence number) and applied in one transaction that also advances the build's
//! `last_seq`, then acknowledged; status reports answered.

use super::*;

/// Largest batch of messages applied in one transaction.
pub(super) const BATCH: usize = 256;

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

impl Master {
    /// Handles a batch of messages from a worker's connection.
    pub(super) async fn handle_messages(
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
    pub(super) fn holds(&self, worker: &str, build: &BuildRef) -> bool {
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
    pub(super) async fn apply(
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
}
