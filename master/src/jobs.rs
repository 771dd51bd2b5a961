//! Job behaviours: what is build-type specific in dispatching a build, behind one trait, as
//! Launchpad's `IBuildFarmJobBehaviour` is. A behaviour composes the job a worker receives,
//! verifies it may go to a given worker, and decides what a finished build means for its
//! request. The steps of a configured builder are one behaviour ([`StepsBehaviour`]); a
//! worker with no job has the [`IdleBehaviour`], whose every build operation fails with a
//! clear mismatch error (a report about a build the worker does not have, say).

use std::collections::BTreeMap;

use kiln_protocol::{BuildRef, Job, ModuleSpec};
use runtime::Outcome;
use runtime::policy::WorkerInfo;

use crate::plan::{PlanError, job_grant, job_steps};
use kiln_config::{Builder, ModuleRef};
use kiln_db::model::SourceStamp;

/// Why a behaviour could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BehaviourError {
    /// The operation does not apply to this behaviour (Launchpad's `BuildBehaviourMismatch`).
    #[error("{0}")]
    Mismatch(String),
    /// The job cannot be composed (a module missing, bad arguments).
    #[error("{0}")]
    Compose(String),
    /// The job may not go to this worker.
    #[error("{0}")]
    Refused(String),
}

/// What becomes of a request when its build ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFate {
    /// The request completes with this result.
    Complete(Outcome),
    /// The request goes back to the queue (the build ended RETRY).
    Requeue,
}

/// Everything a behaviour composes a job from.
pub struct JobContext<'a> {
    /// The build.
    pub build: BuildRef,
    /// Its number within the builder.
    pub number: i64,
    /// The builder.
    pub builder: &'a Builder,
    /// The source stamps.
    pub stamps: &'a [SourceStamp],
    /// The starting properties.
    pub properties: runtime::Properties,
    /// The secrets its steps use (empty for untrusted builds and sandbox workers).
    pub secrets: BTreeMap<String, String>,
    /// Whether the build is trusted (its builder and its buildset).
    pub trusted: bool,
    /// Uploaded modules the builder names, resolved to their content.
    pub modules: &'a dyn Fn(&ModuleRef) -> Option<ModuleSpec>,
}

/// Build-type-specific dispatch logic.
pub trait JobBehaviour: Send + Sync {
    /// The job kind the worker sees.
    fn kind(&self) -> &'static str;

    /// The job a worker receives for this build.
    fn compose(&self, ctx: JobContext<'_>) -> Result<Job, BehaviourError>;

    /// Whether `job` may go to `worker` (checked again just before sending).
    fn verify(&self, job: &Job, worker: &WorkerInfo) -> Result<(), BehaviourError>;

    /// What a finished build with `result` means for its request.
    fn handle_finished(&self, result: Outcome) -> Result<RequestFate, BehaviourError>;
}

/// A configured builder's steps.
#[derive(Debug, Default, Clone, Copy)]
pub struct StepsBehaviour;

impl JobBehaviour for StepsBehaviour {
    fn kind(&self) -> &'static str {
        "steps"
    }

    fn compose(&self, ctx: JobContext<'_>) -> Result<Job, BehaviourError> {
        let uploaded = |m: &ModuleRef, at: &str| {
            (ctx.modules)(m).ok_or_else(|| PlanError::NotAvailable {
                at: at.to_owned(),
                module: m.to_string(),
            })
        };
        let steps = job_steps(ctx.builder, ctx.stamps, &uploaded).map_err(|e| match e {
            PlanError::NotAvailable { at, module } => BehaviourError::Compose(format!(
                "{at} uses module {module}, which has not been uploaded (kiln step upload)"
            )),
            other => BehaviourError::Compose(other.to_string()),
        })?;
        Ok(Job {
            build: ctx.build,
            kind: self.kind().to_owned(),
            builder: ctx.builder.name.clone(),
            number: ctx.number,
            workdir: ctx.builder.workdir.clone(),
            steps,
            properties: ctx.properties,
            secrets: ctx.secrets,
            grant: {
                // An untrusted build (an untrusted builder, or a change from a fork) never
                // gets the network, whatever its builder grants; its worker, a sandbox
                // worker, would withhold it too.
                let mut grant = job_grant(ctx.builder);
                grant.network &= ctx.trusted;
                grant
            },
            trusted: ctx.trusted,
        })
    }

    fn verify(&self, job: &Job, worker: &WorkerInfo) -> Result<(), BehaviourError> {
        if !job.trusted && !worker.sandbox {
            return Err(BehaviourError::Refused(format!(
                "build {} is untrusted and worker {} is not a sandbox worker",
                job.build.id, worker.name
            )));
        }
        if worker.sandbox && !job.secrets.is_empty() {
            return Err(BehaviourError::Refused(format!(
                "build {} uses secrets, which never go to sandbox worker {}",
                job.build.id, worker.name
            )));
        }
        Ok(())
    }

    fn handle_finished(&self, result: Outcome) -> Result<RequestFate, BehaviourError> {
        Ok(match result {
            Outcome::Retry => RequestFate::Requeue,
            other => RequestFate::Complete(other),
        })
    }
}

/// The behaviour of a worker with no job: every build operation is a mismatch.
#[derive(Debug, Clone)]
pub struct IdleBehaviour {
    /// The worker.
    pub worker: String,
}

impl IdleBehaviour {
    fn mismatch(&self, what: &str) -> BehaviourError {
        BehaviourError::Mismatch(format!(
            "worker {} has no job, so it cannot {what}",
            self.worker
        ))
    }
}

impl JobBehaviour for IdleBehaviour {
    fn kind(&self) -> &'static str {
        "idle"
    }

    fn compose(&self, _: JobContext<'_>) -> Result<Job, BehaviourError> {
        Err(self.mismatch("compose a job"))
    }

    fn verify(&self, job: &Job, _: &WorkerInfo) -> Result<(), BehaviourError> {
        Err(self.mismatch(&format!("take build {}", job.build.id)))
    }

    fn handle_finished(&self, _: Outcome) -> Result<RequestFate, BehaviourError> {
        Err(self.mismatch("finish a build"))
    }
}

/// The behaviour of a job kind.
pub fn behaviour(kind: &str) -> Option<&'static dyn JobBehaviour> {
    match kind {
        "steps" => Some(&StepsBehaviour),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(sandbox: bool) -> WorkerInfo {
        WorkerInfo {
            name: "w".into(),
            sandbox,
            max_builds: 1,
            ..Default::default()
        }
    }

    fn job(trusted: bool, secrets: &[&str]) -> Job {
        Job {
            build: BuildRef {
                id: 1,
                cookie: "c".into(),
            },
            kind: "steps".into(),
            builder: "b".into(),
            number: 1,
            workdir: "b".into(),
            steps: vec![],
            properties: Default::default(),
            secrets: secrets
                .iter()
                .map(|s| (s.to_string(), "v".to_string()))
                .collect(),
            grant: Default::default(),
            trusted,
        }
    }

    #[test]
    fn untrusted_jobs_go_only_to_sandbox_workers_and_secrets_never_do() {
        let b = StepsBehaviour;
        assert!(b.verify(&job(true, &[]), &worker(false)).is_ok());
        assert!(b.verify(&job(false, &[]), &worker(true)).is_ok());
        assert!(b.verify(&job(false, &[]), &worker(false)).is_err());
        assert!(b.verify(&job(true, &["key"]), &worker(true)).is_err());
    }

    #[test]
    fn an_untrusted_build_gets_no_network_whatever_its_builder_grants() {
        let config = kiln_config::parse(
            r#"
[[workers]]
name = "w"
token = "t"

[[builders]]
name = "net"
grant = { programs = ["sh"], network = true }
[[builders.steps]]
module = "shell"
args = { command = ["sh", "-c", "true"] }
"#,
            std::path::Path::new("/kiln.toml"),
        )
        .unwrap();
        let builder = config.builder("net").unwrap();
        let compose = |trusted: bool| {
            StepsBehaviour
                .compose(JobContext {
                    build: BuildRef {
                        id: 1,
                        cookie: "c".into(),
                    },
                    number: 1,
                    builder,
                    stamps: &[],
                    properties: Default::default(),
                    secrets: Default::default(),
                    trusted,
                    modules: &|_| None,
                })
                .unwrap()
        };
        assert!(compose(true).grant.network);
        let untrusted = compose(false);
        assert!(!untrusted.grant.network);
        assert!(!untrusted.trusted);
    }

    #[test]
    fn retry_requeues() {
        let b = StepsBehaviour;
        assert_eq!(b.handle_finished(Outcome::Retry), Ok(RequestFate::Requeue));
        assert_eq!(
            b.handle_finished(Outcome::Failure),
            Ok(RequestFate::Complete(Outcome::Failure))
        );
    }

    #[test]
    fn an_idle_worker_mismatches_every_build_operation() {
        let idle = IdleBehaviour {
            worker: "w1".into(),
        };
        let e = idle.handle_finished(Outcome::Success).unwrap_err();
        assert_eq!(
            e.to_string(),
            "worker w1 has no job, so it cannot finish a build"
        );
        assert!(matches!(
            idle.verify(&job(true, &[]), &worker(false)),
            Err(BehaviourError::Mismatch(_))
        ));
    }
}
