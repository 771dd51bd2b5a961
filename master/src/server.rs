//! The running master: its identity in the database, the configuration in force (swapped
//! whole on reload), the loaded policy components, and the loops that keep it alive
//! (heartbeat, taking over from dead masters) and run the schedulers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use sha2::Digest;
use tokio::sync::Notify;

use crate::hooks::{
    CanStartHook, CollapseHook, Hooks, NextBuildHook, NextWorkerHook, Policy, PrioritizeHook,
};
use crate::requests::BuilderQueueing;
use crate::schedulers::{self, Env, Pass};
use kiln_config::{self as config, Config, ConfigDiff, HookChoice, PolicyRef, WorkerSelector};
use kiln_db::model::*;
use kiln_db::{self as db, Db};

/// What the master works from; replaced whole by a reload, so a pass always sees one
/// consistent configuration.
#[derive(Debug)]
pub struct State {
    /// The configuration.
    pub config: Config,
    /// Builder queueing settings, by name.
    pub builders: BTreeMap<String, BuilderQueueing>,
    /// Hooks.
    pub hooks: Arc<Hooks>,
    /// Policy components, by reference.
    pub policies: HashMap<PolicyRef, Policy>,
}

/// Builder queueing settings from the configuration.
pub fn queueing(config: &Config) -> BTreeMap<String, BuilderQueueing> {
    config
        .builders
        .iter()
        .map(|b| {
            let (workers, requires) = match &b.workers {
                WorkerSelector::Any => (None, None),
                WorkerSelector::Named(names) => (Some(names.clone()), None),
                WorkerSelector::Requires(r) => (None, Some(r)),
            };
            (
                b.name.clone(),
                BuilderQueueing {
                    name: b.name.clone(),
                    priority: b.priority,
                    collapse: b.collapse,
                    tags: b.tags.clone(),
                    trusted: b.trusted,
                    allow_sandbox_workers: b.allow_sandbox_workers,
                    workers,
                    requires_arch: requires.and_then(|r| r.arch.clone()),
                    requires_os: requires.and_then(|r| r.os.clone()),
                    requires_tags: requires
                        .map(|r| r.tags.iter().cloned().collect())
                        .unwrap_or_default(),
                },
            )
        })
        .collect()
}

/// Every policy the configuration names (hooks and schedulers' change filters).
pub fn policy_refs(config: &Config) -> Vec<PolicyRef> {
    let h = &config.hooks;
    let mut refs = Vec::new();
    let mut add = |r: Option<&PolicyRef>| {
        if let Some(r) = r
            && !refs.contains(r)
        {
            refs.push(r.clone());
        }
    };
    fn policy_of<B>(c: &HookChoice<B>) -> Option<&PolicyRef> {
        match c {
            HookChoice::Policy(p) => Some(p),
            HookChoice::Builtin(_) => None,
        }
    }
    add(policy_of(&h.collapse_requests));
    add(policy_of(&h.prioritize_builders));
    add(policy_of(&h.next_build));
    add(policy_of(&h.next_worker));
    add(policy_of(&h.can_start_build));
    for s in &config.schedulers {
        if let config::SchedulerKind::SingleBranch { filter, .. }
        | config::SchedulerKind::AnyBranch { filter, .. } = &s.kind
        {
            add(filter.policy.as_ref());
        }
    }
    refs
}

/// Loads one policy: a file next to the config, or an uploaded module (verified against its
/// recorded SHA-256 before use). Reading the file and compiling the component (which takes
/// Cranelift tens of milliseconds or more) happen on a blocking thread, never on the master's
/// one async thread, which meanwhile goes on serving workers and the API.
async fn load_policy(
    runtime: &Arc<runtime::Runtime>,
    db: &Db,
    r: &PolicyRef,
) -> anyhow::Result<Policy> {
    let label = r.to_string();
    let bytes = match r {
        PolicyRef::File(path) => {
            let path = path.clone();
            let what = label.clone();
            tokio::task::spawn_blocking(move || {
                std::fs::read(&path)
                    .with_context(|| format!("policy {what}: cannot read {}", path.display()))
            })
            .await
            .context("reading a policy")??
        }
        PolicyRef::Uploaded { name, version } => {
            let mut conn = db.pool().acquire().await?;
            let versions = db::step_modules(&mut conn, Some(name)).await?;
            let module = match version {
                config::ModuleVersion::Latest => versions.first(),
                config::ModuleVersion::Exact(v) => versions.iter().find(|m| &m.version == v),
            }
            .with_context(|| {
                format!(
                    "policy {label}: no such module has been uploaded (uploaded versions of {name:?}: {})",
                    if versions.is_empty() {
                        "none".to_string()
                    } else {
                        versions.iter().map(|m| m.version.as_str()).collect::<Vec<_>>().join(", ")
                    }
                )
            })?;
            let (sha256, content) = db::get_file(&mut conn, &module.sha1)
                .await?
                .with_context(|| format!("policy {label}: the module's file is missing"))?;
            let actual = hex::encode(sha2::Sha256::digest(&content));
            if actual != sha256 || actual != module.sha256 {
                bail!(
                    "policy {label}: the stored file does not match its SHA-256; upload it again"
                );
            }
            content
        }
    };
    let component = {
        let (runtime, name) = (runtime.clone(), label.clone());
        tokio::task::spawn_blocking(move || runtime.load_policy(&bytes, &name))
            .await
            .context("compiling a policy")?
            .map_err(|e| anyhow::anyhow!("policy {label}: {e}"))?
    };
    Ok(Policy {
        name: label,
        component: Arc::new(component),
    })
}

/// Builds the state for a configuration: loads its policies and resolves its hooks.
pub async fn build_state(
    runtime: &Arc<runtime::Runtime>,
    db: &Db,
    config: Config,
) -> anyhow::Result<State> {
    let mut policies = HashMap::new();
    for r in policy_refs(&config) {
        let p = load_policy(runtime, db, &r).await?;
        policies.insert(r, p);
    }
    let h = &config.hooks;
    let pick = |c: &PolicyRef| policies[c].clone();
    let hooks = Hooks::new(
        match &h.collapse_requests {
            HookChoice::Builtin(config::CollapseRequests::Default) => CollapseHook::Default,
            HookChoice::Builtin(config::CollapseRequests::Never) => CollapseHook::Never,
            HookChoice::Policy(p) => CollapseHook::Policy(pick(p)),
        },
        match &h.prioritize_builders {
            HookChoice::Builtin(config::PrioritizeBuilders::Priority) => PrioritizeHook::Priority,
            HookChoice::Policy(p) => PrioritizeHook::Policy(pick(p)),
        },
        match &h.next_build {
            HookChoice::Builtin(config::NextBuild::Oldest) => NextBuildHook::Oldest,
            HookChoice::Policy(p) => NextBuildHook::Policy(pick(p)),
        },
        match &h.next_worker {
            HookChoice::Builtin(config::NextWorker::LeastBusy) => NextWorkerHook::LeastBusy,
            HookChoice::Builtin(config::NextWorker::Random) => NextWorkerHook::Random,
            HookChoice::Policy(p) => NextWorkerHook::Policy(pick(p)),
        },
        match &h.can_start_build {
            HookChoice::Builtin(config::CanStartBuild::Always) => CanStartHook::Always,
            HookChoice::Policy(p) => CanStartHook::Policy(pick(p)),
        },
    );
    Ok(State {
        builders: queueing(&config),
        hooks,
        policies,
        config,
    })
}

/// A running master.
pub struct Master {
    /// Its database.
    pub db: Db,
    /// Its id among the masters sharing the database.
    pub id: MasterId,
    runtime: Arc<runtime::Runtime>,
    state: RwLock<Arc<State>>,
    wake: Notify,
    /// Connected workers and the builds leased to them.
    pub workers: crate::workers::Workers,
    /// Latent workers this master starts and stops.
    pub latent: crate::latent::LatentWorkers,
    /// What `GET /metrics` reports.
    pub metrics: crate::metrics::Metrics,
    /// Live updates for `GET /api/v2/events`.
    pub live: crate::live::Live,
    /// The git pollers of the configuration in force.
    pub pollers: crate::poller::Pollers,
    /// The reporters' task's wake-up.
    pub reporters: crate::reporters::Reporters,
    dispatch: Notify,
    address: std::sync::OnceLock<std::net::SocketAddr>,
    /// Held for a whole reload, so two at once (SIGHUP and `POST /api/v2/control/reconfig`)
    /// run one after the other: each diffs against the state the previous one installed, and
    /// the last one asked for is the one in force.
    reloading: tokio::sync::Mutex<()>,
    /// Reloads asked for, and reloads past the lock: what the test of the lock observes.
    #[cfg(test)]
    reload_probe: (std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64),
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master").field("id", &self.id).finish()
    }
}

/// A master that has not beaten its heart for this many intervals is dead: others release
/// what it held.
pub(crate) const DEAD_AFTER_BEATS: u32 = 3;

impl Master {
    /// Opens the database (migrating it), registers this master, and syncs builders and
    /// workers with the configuration. `db_url` overrides the configuration's database.
    pub async fn start(config: Config, db_url: Option<&str>) -> anyhow::Result<Arc<Master>> {
        let url = db_url.unwrap_or(config.master.database.as_str()).to_owned();
        let db = Db::open(&url).await?;
        let runtime = Arc::new(runtime::Runtime::new(runtime::RuntimeConfig {
            cache_dir: runtime::RuntimeConfig::default_cache_dir(),
        })?);
        let now = now_ms();
        // One transaction: one commit (a disk sync on PostgreSQL) for the start's writes.
        let mut tx = db.begin().await?;
        let id = db::register_master(&mut tx, &config.master.name, now).await?;
        // Claims this master held before a restart, with no build behind them, go back to
        // the queue.
        let released = db::release_master_claims(&mut tx, id).await?;
        tx.commit().await?;
        if !released.is_empty() {
            tracing::info!(
                count = released.len(),
                "requeued requests claimed before a restart"
            );
        }
        let state = build_state(&runtime, &db, config).await?;
        let master = Arc::new(Master {
            db,
            id,
            runtime,
            state: RwLock::new(Arc::new(state)),
            wake: Notify::new(),
            workers: Default::default(),
            latent: Default::default(),
            metrics: Default::default(),
            live: Default::default(),
            pollers: Default::default(),
            reporters: Default::default(),
            dispatch: Notify::new(),
            address: Default::default(),
            reloading: Default::default(),
            #[cfg(test)]
            reload_probe: Default::default(),
        });
        master.sync_tables().await?;
        tracing::info!(master = %master.state().config.master.name, id = %id, "master started");
        Ok(master)
    }

    async fn sync_tables(&self) -> anyhow::Result<()> {
        let state = self.state();
        let mut tx = self.db.begin().await?;
        let builders: Vec<(String, String, Vec<String>)> = state
            .config
            .builders
            .iter()
            .map(|b| {
                (
                    b.name.clone(),
                    b.description.clone().unwrap_or_default(),
                    b.tags.clone(),
                )
            })
            .collect();
        db::sync_builders(&mut tx, &builders).await?;
        let workers: Vec<(String, serde_json::Value)> = state
            .config
            .workers
            .iter()
            .map(|w| {
                (
                    w.name.clone(),
                    serde_json::json!({
                        "arch": w.arch, "os": w.os, "tags": w.tags, "max_builds": w.max_builds,
                        "sandbox": w.sandbox,
                    }),
                )
            })
            .collect();
        db::sync_workers(&mut tx, &workers).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The state in force.
    pub fn state(&self) -> Arc<State> {
        self.state.read().expect("state lock").clone()
    }

    /// Reloads the configuration from its file. A configuration with errors is refused and
    /// the old one stays; queued requests and running builds are untouched either way
    /// (requests of a removed builder stay queued until it returns, and its running builds
    /// finish).
    pub async fn reload(&self) -> anyhow::Result<ConfigDiff> {
        #[cfg(test)]
        self.reload_probe
            .0
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _one_at_a_time = self.reloading.lock().await;
        #[cfg(test)]
        self.reload_probe
            .1
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let old = self.state();
        let path = old.config.path.clone();
        let new = tokio::task::spawn_blocking(move || config::load(&path))
            .await
            .context("reading the configuration")??;
        let diff = old.config.diff(&new);
        for setting in diff
            .master
            .iter()
            .filter(|s| config::RESTART_SETTINGS.contains(s))
        {
            tracing::warn!(
                setting,
                "this [master] setting takes effect only after a restart"
            );
        }
        let mut state = build_state(&self.runtime, &self.db, new).await?;
        // Settings that need a restart keep their running values.
        state.config.master.name = old.config.master.name.clone();
        state.config.master.database = old.config.master.database.clone();
        state.config.master.listen = old.config.master.listen;
        state.config.master.tls = old.config.master.tls.clone();
        let mut conn = self.db.pool().acquire().await?;
        for name in &diff.schedulers.removed {
            db::release_scheduler(&mut conn, name, self.id).await?;
        }
        drop(conn);
        *self.state.write().expect("state lock") = Arc::new(state);
        self.pollers.reconfigured();
        self.sync_tables().await?;
        tracing::info!(?diff, "configuration reloaded");
        self.wake.notify_one();
        Ok(diff)
    }

    /// Records the address the HTTP server listens on (latent workers connect to it).
    pub fn set_address(&self, address: std::net::SocketAddr) {
        let _ = self.address.set(address);
    }

    /// The address the HTTP server listens on, once it does.
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        self.address.get().copied()
    }

    /// Tells the reporters' task that deliveries were queued or buildset events appended.
    /// With no reporter configured there is nothing for it to read (it still polls now and
    /// then, for deliveries a reload left behind), so it is not woken after every build.
    pub fn wake_reporters(&self) {
        if !self.state().config.reporters.is_empty() {
            self.reporters.wake();
        }
    }

    /// Asks for a dispatch pass soon (a worker connected, a build finished, a request was
    /// queued).
    pub fn wake_dispatch(&self) {
        self.dispatch.notify_one();
    }

    /// The component runtime (to check uploaded modules).
    pub fn runtime(&self) -> &Arc<runtime::Runtime> {
        &self.runtime
    }

    /// Asks for a scheduler pass soon (a buildset completed, a change arrived).
    pub fn wake_schedulers(&self) {
        self.wake.notify_one();
    }

    /// Adds a change through the one internal interface and wakes the schedulers.
    pub async fn add_change(
        &self,
        change: &NewChange,
    ) -> anyhow::Result<Result<Option<ChangeId>, crate::changes::ChangeError>> {
        let r = crate::changes::add_change(&self.db, change).await?;
        self.wake.notify_one();
        Ok(r)
    }

    /// Runs `f` with a scheduler environment over the state in force.
    pub async fn with_env<T>(&self, f: impl AsyncFnOnce(&Env<'_>) -> T) -> T {
        let state = self.state();
        let env = Env {
            db: &self.db,
            master: self.id,
            config: &state.config,
            builders: &state.builders,
            hooks: &state.hooks,
            policies: &state.policies,
        };
        f(&env).await
    }

    /// One pass of every scheduler this master runs.
    pub async fn scheduler_pass(&self) -> anyhow::Result<Pass> {
        self.with_env(async |env| schedulers::run_pass(env, now_ms()).await)
            .await
    }

    /// Records this master's heartbeat and releases what dead masters held.
    pub async fn heartbeat(&self) -> anyhow::Result<()> {
        let now = now_ms();
        let beat = self.state().config.master.heartbeat;
        // A write transaction like any other: on SQLite it queues on this process's write
        // lock (a bare UPDATE waited on SQLite's busy timeout behind builds' transactions, for
        // seconds under load, and once failed "database is locked": the farm benchmark's W5).
        let mut tx = self.db.begin().await?;
        db::heartbeat(&mut tx, self.id, now).await?;
        let dead_before = now - (beat * DEAD_AFTER_BEATS).as_millis() as i64;
        let mut taken = Vec::new();
        for (id, name) in db::stale_masters(&mut tx, dead_before).await? {
            if id == self.id {
                continue;
            }
            let released = db::release_master_claims(&mut tx, id).await?;
            db::deactivate_master(&mut tx, id).await?;
            taken.push((name, released.len()));
        }
        tx.commit().await?;
        for (name, requeued) in taken {
            tracing::warn!(master = %name, requeued, "a master stopped beating; took over its schedulers and requests");
        }
        Ok(())
    }

    /// A dispatch pass whose failure is logged (the next pass tries again).
    async fn dispatch_logged(&self) {
        if let Err(error) = self.dispatch().await {
            tracing::error!(error = format!("{error:#}"), "dispatch failed");
        }
        if let Err(error) = self.manage_latent().await {
            tracing::error!(
                error = format!("{error:#}"),
                "managing latent workers failed"
            );
        }
    }

    /// Runs until `shutdown` resolves: heartbeats, and scheduler passes when woken (a new
    /// change, a reload), when a timer is due, and at least every `poll` (changes written by
    /// other processes: `kiln sendchange`, other masters).
    pub async fn run(
        self: Arc<Self>,
        poll: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        // The git pollers run as long as this does.
        let _pollers = crate::poller::start(&self);
        // So does the reporters' delivery queue.
        let _reporters = crate::reporters::start(&self);
        let mut beat = tokio::time::interval(self.state().config.master.heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_pass = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = beat.tick() => {
                    if let Err(error) = self.heartbeat().await {
                        tracing::error!(error = format!("{error:#}"), "heartbeat failed");
                    }
                    let lost_after = self.state().config.master.heartbeat * DEAD_AFTER_BEATS;
                    if let Err(error) = self.scan(lost_after).await {
                        tracing::error!(error = format!("{error:#}"), "scanning workers failed");
                    }
                    self.dispatch_logged().await;
                    // A reload may have changed the interval.
                    let period = self.state().config.master.heartbeat;
                    if beat.period() != period {
                        beat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
                _ = self.wake.notified() => next_pass = tokio::time::Instant::now(),
                _ = self.dispatch.notified() => self.dispatch_logged().await,
                _ = tokio::time::sleep_until(next_pass) => {
                    let wait = match self.scheduler_pass().await {
                        Ok(pass) => {
                            let made: Vec<i64> = pass.buildsets.iter().map(|(_, b)| b.0).collect();
                            crate::live::publish_buildsets(&self, &made).await;
                            let until_timer = pass.next_timer_ms.map(|t| {
                                Duration::from_millis((t - now_ms()).max(0) as u64)
                            });
                            until_timer.map_or(poll, |t| t.min(poll))
                        }
                        Err(error) => {
                            tracing::error!(error = format!("{error:#}"), "scheduler pass failed");
                            poll
                        }
                    };
                    next_pass = tokio::time::Instant::now() + wait;
                    self.dispatch_logged().await;
                }
            }
        }
        let mut conn = self.db.pool().acquire().await?;
        db::deactivate_master(&mut conn, self.id).await?;
        tracing::info!("master stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reloads_run_one_at_a_time() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, "[master]\nname = \"m1\"\n").unwrap();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("kiln.sqlite").display()
        );
        let master = Master::start(config::load(&path).unwrap(), Some(&url))
            .await
            .unwrap();
        // A reload in progress (held here) makes the next one wait for it.
        let held = master.reloading.lock().await;
        std::fs::write(&path, "[master]\nname = \"m1\"\nheartbeat = \"7s\"\n").unwrap();
        let second = tokio::spawn({
            let master = master.clone();
            async move { master.reload().await.map(|_| ()) }
        });
        // This test's runtime has one thread: the reload runs only while this task yields.
        // Asking and passing the lock happen in one poll unless the lock holds it back.
        while master.reload_probe.0.load(SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(master.reload_probe.1.load(SeqCst), 0, "it did not wait");
        assert_ne!(
            master.state().config.master.heartbeat,
            Duration::from_secs(7)
        );
        drop(held);
        second.await.unwrap().unwrap();
        assert_eq!(master.reload_probe.1.load(SeqCst), 1);
        assert_eq!(
            master.state().config.master.heartbeat,
            Duration::from_secs(7)
        );
    }
}
