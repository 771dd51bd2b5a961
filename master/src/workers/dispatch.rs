//! Dispatch: free, healthy workers offered to the builders' queues
//! ([`crate::requests::plan_for_workers`]), then one transaction that claims the planned
//! requests and records their builds, then a lease and a job for each.

use super::*;

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

impl Master {
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
                .is_none_or(|h| !*h.paused && h.quarantine_until.is_none_or(|until| until <= now))
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
}
