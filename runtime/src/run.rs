//! One step run: a fresh store and instance for the step and for each observer, under the
//! grant's limits; logs streamed; reports merged into a [`StepOutcome`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::Store;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::engine::{ObserverComponent, Runtime, StepComponent};
use crate::grant::Grant;
use crate::host::observers::{ObserverEnd, ObserverStart};
use crate::host::{
    ContextState, GuestOutput, Limiter, ObserverRun, ReportState, StepState, describe_error,
    limit_store,
};
use crate::logs::{Channel, Logs, StepEvents};
use crate::redact::Redactor;
use kiln_protocol::outcome::{Outcome, StepOutcome, StepResources};
use kiln_protocol::props::{Properties, interpolate};

/// Stops a running step from another thread: the guest is interrupted at the next epoch tick
/// and a running command's process group is killed. The step ends CANCELLED.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that has not fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels the step.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the step was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// An observer to attach to a step run.
#[derive(Clone)]
pub struct ObserverSpec {
    /// The observer component.
    pub component: ObserverComponent,
    /// Its name, for messages ("line-counter").
    pub name: String,
    /// Its arguments.
    pub args: serde_json::Value,
    /// The log it watches, usually "stdio".
    pub log: String,
}

/// Everything one step run needs.
pub struct StepRun<'a> {
    /// The step component.
    pub step: &'a StepComponent,
    /// The step's arguments, before interpolation.
    pub args: &'a serde_json::Value,
    /// The build's properties as the step starts.
    pub properties: &'a Properties,
    /// Observers watching the step's logs.
    pub observers: &'a [ObserverSpec],
    /// What the step may touch.
    pub grant: &'a Grant,
    /// Where logs and reports stream to.
    pub events: Arc<dyn StepEvents>,
    /// Cancels the run.
    pub cancel: CancelToken,
}

impl Runtime {
    /// Runs a step to its end. Never fails: problems become an EXCEPTION outcome (or FAILURE for
    /// the step's own error) with a message naming the cause.
    pub fn run_step(&self, run: StepRun<'_>) -> StepOutcome {
        let started = Instant::now();
        let span = tracing::info_span!("step", module = %run.step.digest());
        let _enter = span.enter();
        let grant = run.grant;
        let limit = grant.limits.deadline;
        let deadline = started + limit;
        let redactor = Arc::new(Redactor::new(
            grant.secrets.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        ));
        let fail = |message: String| {
            let message = redactor.redact(&message).into_owned();
            run.events
                .log("stdio", Channel::Header, &format!("kiln: {message}\n"));
            StepOutcome::exception(message, started.elapsed())
        };

        let args = match interpolate(run.args, run.properties, &grant.secrets) {
            Ok(a) => a,
            Err(e) => return fail(e.to_string()),
        };
        let workdir = match crate::files::open_dir(&grant.workdir) {
            Ok(fd) => fd,
            Err(e) => return fail(format!("workdir {}: {e}", grant.workdir.display())),
        };
        let base = Arc::new(run.properties.clone());

        let mut observers = Vec::with_capacity(run.observers.len());
        for spec in run.observers {
            let start = ObserverStart {
                engine: &self.engine,
                component: &spec.component,
                name: &spec.name,
                log: &spec.log,
                args: &spec.args,
                base: base.clone(),
                redactor: redactor.clone(),
                events: run.events.clone(),
                memory_bytes: grant.limits.memory_bytes,
                max_property_bytes: grant.limits.max_property_bytes,
                deadline,
                limit,
                cancel: run.cancel.clone(),
            };
            match ObserverRun::start(start) {
                Ok(o) => observers.push(o),
                Err(e) => return fail(format!("observer {}: {e}", spec.name)),
            }
        }

        let guest_stdout = GuestOutput::default();
        let guest_stderr = GuestOutput::default();
        let mut wasi = WasiCtxBuilder::new();
        if let Err(e) = wasi.preopened_dir(&grant.workdir, ".", FsPerms::ReadWrite) {
            return fail(format!("workdir {}: {e:#}", grant.workdir.display()));
        }
        for dir in &grant.ro_dirs {
            let guest_path = dir.to_string_lossy();
            if let Err(e) = wasi.preopened_dir(dir, &guest_path, FsPerms::ReadOnly) {
                return fail(format!("read-only directory {}: {e:#}", dir.display()));
            }
        }
        wasi.envs(&grant.env.iter().collect::<Vec<_>>());
        wasi.stdout(guest_stdout.clone())
            .stderr(guest_stderr.clone());

        let state = StepState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: Limiter::new(grant.limits.memory_bytes),
            report: ReportState::new(
                base,
                redactor.clone(),
                run.events.clone(),
                grant.limits.max_property_bytes,
            ),
            ctx: ContextState {
                args_json: args.to_string(),
                grant: grant.clone(),
                workdir,
                logs: Logs::new(grant.limits.logs, redactor.clone(), run.events.clone()),
                observers,
                cancel: run.cancel.clone(),
                deadline,
                guest_stdout,
                guest_stderr,
                tmpdir: None,
                usage: Default::default(),
            },
        };
        let mut store = Store::new(&self.engine, state);
        limit_store(
            &mut store,
            |s| &mut s.limiter,
            deadline,
            limit,
            run.cancel.clone(),
        );

        let called = run
            .step
            .pre
            .instantiate(&mut store)
            .and_then(|step| step.call_run(&mut store));
        let state = store.data_mut();
        state.ctx.drain_guest_output();
        let (mut result, mut message) = match called {
            Ok(Ok(outcome)) => (Outcome::from(outcome), None),
            Ok(Err(own)) => {
                let own = redactor.redact(&own).into_owned();
                state.ctx.header(&format!("step failed: {own}"));
                (Outcome::Failure, Some(own))
            }
            Err(e) => {
                let (result, message) = describe_error(&e, &state.limiter);
                let message = redactor.redact(&message).into_owned();
                state.ctx.header(&format!("kiln: {result}: {message}"));
                (result, Some(message))
            }
        };
        for note in std::mem::take(&mut state.report.notes) {
            state.ctx.header(&format!("kiln: {note}"));
        }
        state.ctx.finish_logs();

        let StepState {
            report,
            mut ctx,
            limiter,
            ..
        } = store.into_data();
        let mut outcome = StepOutcome {
            result,
            summary: report.summary,
            message: None,
            properties: report.properties,
            statistics: report.statistics,
            progress: report.progress,
            urls: report.urls,
            logs: Default::default(),
            elapsed: Duration::ZERO,
            resources: None,
        };
        let commands = ctx.usage;
        let mut resources = StepResources {
            commands: commands.commands,
            cpu_ms: commands.cpu.as_millis() as u64,
            peak_rss_bytes: commands.peak_rss,
            guest_memory_bytes: limiter.memory_peak(),
            observer_memory_bytes: None,
        };
        let observers = std::mem::take(&mut ctx.observers);
        for end in observers.into_iter().map(ObserverRun::finish) {
            let ObserverEnd {
                name,
                verdict,
                report,
                logs,
                failed,
                memory_peak,
            } = end;
            resources.observer_memory_bytes =
                resources.observer_memory_bytes.max(Some(memory_peak));
            for (log, channel, text) in logs {
                ctx.logs
                    .write(&log, channel, text.as_bytes(), &mut |_, _, _| {});
            }
            for note in report.notes {
                ctx.header(&format!("kiln: observer {name}: {note}"));
            }
            if let Some(why) = failed {
                let why = format!("observer {name}: {why}");
                ctx.header(&format!("kiln: {why}"));
                if result.worst(Outcome::Exception) == Outcome::Exception {
                    result = Outcome::Exception;
                    message.get_or_insert(why);
                }
            }
            if let Some(v) = verdict {
                result = result.worst(v);
            }
            outcome.properties.extend(report.properties);
            // The step's own word wins over an observer's reading of its output (a test step's
            // JUnit counts over the test-results observer's), and the first observer over later ones.
            for (name, value) in report.statistics {
                outcome.statistics.entry(name).or_insert(value);
            }
            outcome.progress.extend(report.progress);
            outcome.urls.extend(report.urls);
            if outcome.summary.is_none() {
                outcome.summary = report.summary;
            }
        }
        // Observers' last lines may have left unfinished lines in their logs.
        ctx.finish_logs();
        outcome.logs = ctx.logs.stats();
        outcome.resources = Some(resources);
        outcome.result = result;
        if outcome.summary.is_none() {
            outcome.summary = message.clone();
        }
        outcome.message = message;
        outcome.elapsed = started.elapsed();
        tracing::info!(
            result = %outcome.result,
            elapsed_ms = outcome.elapsed.as_millis() as u64,
            cpu_ms = resources.cpu_ms,
            peak_rss_bytes = resources.peak_rss_bytes,
            guest_memory_bytes = resources.guest_memory_bytes,
            "step finished"
        );
        outcome
    }
}

/// "250 ms", "1.5 s", "2 min 5 s".
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        let s = d.as_secs_f64();
        if s.fract() == 0.0 {
            format!("{s:.0} s")
        } else {
            format!("{s:.1} s")
        }
    } else {
        format!("{} min {} s", d.as_secs() / 60, d.as_secs() % 60)
    }
}
