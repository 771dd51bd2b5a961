//! One build on a worker: check the job, take its workdir, fetch and load its modules, run its
//! steps, and report every step, log line and result through the outbox.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Shared, lock};
use kiln_protocol::Outcome;
use kiln_protocol::{BuildEvent, Job, LOG_CHUNK_BYTES, ModuleSpec, is_safe_component};
use runtime::Loaded;
use runtime::artifacts::DirStore;
use runtime::build::{BuildProgress, BuildStep, StepRecord};
use runtime::grant::Grant;
use runtime::logs::{Channel, ReportEvent, StepEvents};
use runtime::{CancelToken, ObserverSpec};

/// The job kinds this worker runs.
pub const KINDS: &[&str] = &["steps"];

/// Whether this worker may run `job` at all; the reason if not.
pub(super) fn check(shared: &Shared, job: &Job) -> Result<(), String> {
    if !KINDS.contains(&job.kind.as_str()) {
        return Err(format!(
            "this worker runs jobs of kind {}, not {:?}",
            KINDS.join(", "),
            job.kind
        ));
    }
    if !is_safe_component(&job.workdir) {
        return Err(format!(
            "workdir {:?} is not one safe path component",
            job.workdir
        ));
    }
    if job.workdir.starts_with('.') {
        return Err(format!(
            "workdir {:?} may not start with a dot (the worker keeps its own files there)",
            job.workdir
        ));
    }
    if !job.trusted && !shared.options.sandbox {
        return Err("an untrusted build runs only on a sandbox worker".into());
    }
    if shared.options.sandbox && !job.secrets.is_empty() {
        return Err("a sandbox worker accepts no secrets".into());
    }
    if job.steps.is_empty() {
        return Err("the job has no steps".into());
    }
    Ok(())
}

/// Runs a checked job to the end and reports it.
pub(super) async fn run(shared: Arc<Shared>, job: Job) {
    let id = job.build.id;
    let lock_of_dir = lock(&shared.workdirs)
        .entry(job.workdir.clone())
        .or_default()
        .clone();
    let _workdir_guard = lock_of_dir.lock().await;
    let workdir = shared.options.base_dir.join(&job.workdir);
    let cancel = lock(&shared.active)
        .get(&id)
        .map(|a| (a.cancel.clone(), a.steps.clone()));
    let Some((cancel, step_tokens)) = cancel else {
        return;
    };
    let prepared = prepare(&shared, &job, &workdir).await;
    let shared2 = shared.clone();
    let wipe_dir = workdir.clone();
    let ended = tokio::task::spawn_blocking(move || {
        let shared = shared2;
        let finished = match prepared {
            Err(message) => {
                tracing::warn!(build = id, %message, "the build could not start");
                BuildEvent::Finished {
                    result: Outcome::Exception,
                    message: Some(message),
                    properties: job.properties,
                }
            }
            Ok((steps, grant)) => {
                let progress = Progress {
                    shared: shared.clone(),
                    build: id,
                    steps: step_tokens,
                };
                let outcome =
                    shared
                        .runtime
                        .run_build(&steps, job.properties, &grant, &progress, &cancel);
                BuildEvent::Finished {
                    result: outcome.result,
                    message: None,
                    properties: outcome.properties,
                }
            }
        };
        if shared.options.sandbox
            && let Err(error) = wipe(&wipe_dir)
        {
            tracing::error!(build = id, workdir = %wipe_dir.display(), %error, "cannot wipe the workdir");
        }
        finished
    })
    .await;
    let finished = ended.unwrap_or_else(|error| {
        tracing::error!(build = id, %error, "the build's thread failed");
        BuildEvent::Finished {
            result: Outcome::Exception,
            message: Some(format!("the worker's build thread failed: {error}")),
            properties: Default::default(),
        }
    });
    if let BuildEvent::Finished { result, .. } = &finished {
        tracing::info!(build = id, result = %result, "build finished");
    }
    // Free first, then report: the master may dispatch the next build the moment it hears.
    lock(&shared.active).remove(&id);
    shared.outbox.push(id, finished);
    shared.outbox.ready.notify_one();
}

/// Makes the workdir ready and loads the steps: the error says what went wrong for a person.
async fn prepare(
    shared: &Arc<Shared>,
    job: &Job,
    workdir: &Path,
) -> Result<(Vec<BuildStep>, Grant), String> {
    if shared.options.sandbox {
        wipe(workdir).map_err(|e| format!("cannot wipe the workdir {}: {e}", workdir.display()))?;
    }
    std::fs::create_dir_all(workdir)
        .map_err(|e| format!("cannot create the workdir {}: {e}", workdir.display()))?;
    let mut steps = Vec::with_capacity(job.steps.len());
    for s in &job.steps {
        let at = format!("step {:?}", s.name);
        let step = match load(shared, &s.module, &at).await? {
            Loaded::Step(c) => c,
            other => {
                return Err(format!(
                    "{at}: module {} is a {}, not a step",
                    s.module.label(),
                    other.kind()
                ));
            }
        };
        let mut observers = Vec::with_capacity(s.observers.len());
        for o in &s.observers {
            let o_at = format!("{at}: observer {:?}", o.name);
            let component = match load(shared, &o.module, &o_at).await? {
                Loaded::Observer(c) => c,
                other => {
                    return Err(format!(
                        "{o_at}: module {} is a {}, not an observer",
                        o.module.label(),
                        other.kind()
                    ));
                }
            };
            observers.push(ObserverSpec {
                component,
                name: o.name.clone(),
                args: o.args.clone(),
                log: o.log.clone(),
            });
        }
        steps.push(BuildStep {
            name: s.name.clone(),
            step,
            args: s.args.clone(),
            observers,
            options: s.options.clone(),
            deadline: Some(Duration::from_millis(s.timeout_ms)),
        });
    }
    // One store per build: a build (an untrusted one above all) can never read what another
    // uploaded. Artifacts do not reach the master yet.
    let artifacts = DirStore::new(
        shared
            .options
            .base_dir
            .join(".artifacts")
            .join(job.build.id.to_string()),
    )
    .map_err(|e| format!("cannot open the artifact store: {e}"))?;
    let canonical = workdir
        .canonicalize()
        .map_err(|e| format!("workdir {}: {e}", workdir.display()))?;
    let mut grant = Grant::new(canonical, Arc::new(artifacts));
    grant.programs = job.grant.programs.clone();
    grant.ro_dirs = job.grant.ro_dirs.clone();
    grant.env = job.grant.env.clone();
    // Sandbox mode: no network for commands, whatever the builder says.
    grant.command_network = job.grant.network && !shared.options.sandbox;
    // Firing schedulers from a worker needs the master; until the protocol carries it, a
    // trigger step fails saying so rather than succeed having started nothing.
    grant.triggers = Arc::new(NoTriggers);
    grant.limits.memory_bytes = job.grant.memory_bytes.min(usize::MAX as u64) as usize;
    if !shared.options.sandbox {
        grant.secrets = job.secrets.clone();
    }
    grant.confinement = shared.confinement.clone();
    Ok((steps, grant))
}

/// A module's component: from memory, the built-ins, or the file cache.
async fn load(shared: &Arc<Shared>, module: &ModuleSpec, at: &str) -> Result<Loaded, String> {
    if let Some(l) = lock(&shared.modules).get(module) {
        return Ok(l.clone());
    }
    let loaded = match module {
        ModuleSpec::Builtin { name } => {
            let b = steps::find(name).ok_or_else(|| {
                format!("{at}: module {name:?} is not built into this worker (too old a version?)")
            })?;
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || shared.runtime.load(b.wasm, b.name))
                .await
                .map_err(|e| format!("{at}: {e}"))?
                .map_err(|e| format!("{at}: {e}"))?
        }
        ModuleSpec::File {
            label,
            sha1,
            sha256,
            size,
        } => {
            let path = shared
                .cache
                .get(
                    &shared.http,
                    &shared.endpoints.http,
                    super::filecache::FileRef {
                        sha1,
                        sha256,
                        size: *size,
                    },
                )
                .await
                .map_err(|e| format!("{at}: module {label}: {e}"))?;
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || shared.runtime.load_file(&path))
                .await
                .map_err(|e| format!("{at}: {e}"))?
                .map_err(|e| format!("{at}: module {label}: {e}"))?
        }
    };
    lock(&shared.modules).insert(module.clone(), loaded.clone());
    Ok(loaded)
}

/// Removes a workdir and everything in it, never following a symlink out of it.
fn wipe(workdir: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(workdir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        // `remove_dir_all` removes symlinks inside without following them.
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(workdir),
        Ok(_) => std::fs::remove_file(workdir),
    }
}

/// Reports a build's steps through the outbox; gives each step its own cancel token.
struct Progress {
    shared: Arc<Shared>,
    build: i64,
    steps: Arc<Mutex<HashMap<usize, CancelToken>>>,
}

impl BuildProgress for Progress {
    fn step_started(&self, index: usize, name: &str) -> Arc<dyn StepEvents> {
        self.shared.outbox.push(
            self.build,
            BuildEvent::StepStarted {
                step: index as u32,
                name: name.to_owned(),
            },
        );
        Arc::new(StepSink {
            shared: self.shared.clone(),
            build: self.build,
            step: index as u32,
        })
    }

    fn step_cancel(&self, index: usize, build: &CancelToken) -> CancelToken {
        let token = CancelToken::new();
        if build.is_cancelled() {
            token.cancel();
        }
        lock(&self.steps).insert(index, token.clone());
        token
    }

    fn step_finished(&self, index: usize, record: &StepRecord) {
        lock(&self.steps).remove(&index);
        self.shared.outbox.push(
            self.build,
            BuildEvent::StepFinished {
                step: index as u32,
                record: Box::new(record.clone()),
            },
        );
    }
}

/// A step's events, as build messages.
struct StepSink {
    shared: Arc<Shared>,
    build: i64,
    step: u32,
}

impl StepEvents for StepSink {
    fn log(&self, log: &str, channel: Channel, text: &str) {
        for chunk in line_chunks(text, LOG_CHUNK_BYTES) {
            self.shared.outbox.push(
                self.build,
                BuildEvent::Log {
                    step: self.step,
                    log: log.to_owned(),
                    channel,
                    text: chunk.to_owned(),
                },
            );
        }
    }

    fn report(&self, event: &ReportEvent) {
        self.shared.outbox.push(
            self.build,
            BuildEvent::Report {
                step: self.step,
                report: event.clone(),
            },
        );
    }
}

/// Splits complete lines into chunks of at most `max` bytes, at line ends where possible
/// (a single longer line becomes its own chunk).
fn line_chunks(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        // Cuts fall after a '\n' (or at the end): always a character boundary.
        let bytes = rest.as_bytes();
        let cut = if rest.len() <= max {
            rest.len()
        } else {
            match memchr::memrchr(b'\n', &bytes[..max]) {
                Some(i) => i + 1,
                None => memchr::memchr(b'\n', bytes).map_or(rest.len(), |i| i + 1),
            }
        };
        let (chunk, tail) = rest.split_at(cut);
        rest = tail;
        Some(chunk)
    })
}

/// Triggers on a worker: not carried by the protocol yet, so refused with the reason.
struct NoTriggers;

impl runtime::trigger::Triggers for NoTriggers {
    fn trigger(
        &self,
        request: &runtime::trigger::TriggerRequest,
        _cancel: &runtime::CancelToken,
    ) -> Result<runtime::trigger::TriggerResponse, String> {
        Err(format!(
            "cannot fire {} from a worker: triggering other builds from the farm is not supported yet",
            request.schedulers.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_chunked_at_line_ends() {
        let chunks: Vec<&str> = line_chunks("aa\nbb\ncc\n", 6).collect();
        assert_eq!(chunks, ["aa\nbb\n", "cc\n"]);
        let chunks: Vec<&str> = line_chunks("aaaaaaaa\nb\n", 4).collect();
        assert_eq!(chunks, ["aaaaaaaa\n", "b\n"]);
        assert_eq!(line_chunks("", 4).count(), 0);
        // A chunk limit inside a multi-byte character cuts at a line end, never in it.
        let text = "é\n".repeat(100);
        let chunks: Vec<&str> = line_chunks(&text, 8).collect();
        assert_eq!(chunks.concat(), text);
        assert!(chunks.iter().all(|c| c.len() <= 8 && c.ends_with('\n')));
        let chunks: Vec<&str> = line_chunks("ééééé\n", 3).collect();
        assert_eq!(chunks, ["ééééé\n"]);
    }
}
