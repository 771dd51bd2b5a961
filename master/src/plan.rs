//! A builder's plan: what a configured builder's steps become for the runtime
//! ([`plan_build`], which `kiln build run` runs locally) and for a worker ([`job_steps`] and
//! [`job_grant`], which the master puts in a job). Both read the same configuration the same
//! way: built-ins with their presets and default observers, then the configured observers;
//! uploaded modules by content; `%(src:...)s` rendered.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_config::{Builder, BuilderGrant, DEFAULT_LOG, ModuleRef, ModuleSource};
use kiln_db::model::SourceStamp;
use kiln_protocol::{GrantSpec, ModuleSpec, ObserverSpecWire, StepSpec};
use runtime::{ArtifactStore, BuildStep, Grant, LoadError, Loaded, ObserverSpec, Runtime};
use serde_json::Value;

/// Component files standing in for uploaded modules, by the reference the configuration
/// writes (`lint@1.2`, `lint@latest`).
#[derive(Debug, Clone, Default)]
pub struct ModuleFiles(HashMap<ModuleRef, PathBuf>);

impl ModuleFiles {
    /// Maps a module reference to its component file.
    pub fn insert(&mut self, module: ModuleRef, file: PathBuf) {
        self.0.insert(module, file);
    }

    /// The file of a module, if one was given.
    pub fn get(&self, module: &ModuleRef) -> Option<&Path> {
        self.0.get(module).map(PathBuf::as_path)
    }
}

/// Why a builder's steps could not be made ready to run.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// An uploaded module with no local file.
    #[error(
        "{at} uses uploaded module {module}, which only the master has; to run it here, pass \
         its component file with --module {module}=FILE.wasm"
    )]
    NotAvailable {
        /// The step (and observer) that names it.
        at: String,
        /// The module reference.
        module: String,
    },
    /// A component that could not be loaded, or is not of the kind its place needs.
    #[error("{at}: {error}")]
    Load {
        /// The step (and observer).
        at: String,
        /// Why.
        error: LoadError,
    },
    /// Arguments that cannot be used (a built-in's preset key set, a bad `%(src:...)s`).
    #[error("{at}: {message}")]
    Args {
        /// The step (and observer).
        at: String,
        /// What is wrong.
        message: String,
    },
}

/// A builder's build, ready for [`Runtime::run_build`]: its steps loaded, and what its grant
/// gives besides the workdir, the file store, secrets and confinement (which depend on where
/// and for whom the build runs).
pub struct BuildPlan {
    /// The steps, in order: components loaded, built-ins' presets merged and their default
    /// observers before the configured ones, `%(src:...)s` rendered.
    pub steps: Vec<BuildStep>,
    /// Each step's module as configured (`shell`, `lint@1.2`), for display.
    pub modules: Vec<String>,
    /// The builder's default step deadline (each step carries its own `timeout`).
    pub deadline: Duration,
    grant: BuilderGrant,
}

impl BuildPlan {
    /// The grant of the build's steps: the builder's programs, read-only directories,
    /// environment, network and memory cap, with the plan's deadline, on this workdir and file
    /// store. No secrets and no confinement: the caller adds them.
    pub fn grant(&self, workdir: PathBuf, artifacts: Arc<dyn ArtifactStore>) -> Grant {
        let mut grant = Grant::new(workdir, artifacts);
        grant.programs = self.grant.programs.clone();
        grant.ro_dirs = self.grant.ro_dirs.clone();
        grant.env = self.grant.env.clone();
        grant.command_network = self.grant.network;
        grant.limits.deadline = self.deadline;
        grant.limits.memory_bytes = (self.grant.memory_mib as usize).saturating_mul(1 << 20);
        grant
    }
}

/// A configured builder's steps as a worker receives them: each built-in with its preset
/// arguments merged and its default observers (on `stdio`) before the step's configured
/// observers; each uploaded module as `uploaded` names it (by content); `%(src:...)s` rendered
/// from `stamps` in step and observer arguments (`%(prop:...)s` and `%(secret:...)s` are left
/// for the runtime, which renders them as each step starts). The first `git` step whose
/// arguments name no patch gets the first source stamp's (a try build's), as `{body, level}`.
pub fn job_steps(
    builder: &Builder,
    stamps: &[SourceStamp],
    uploaded: &dyn Fn(&ModuleRef, &str) -> Result<ModuleSpec, PlanError>,
) -> Result<Vec<StepSpec>, PlanError> {
    let mut steps = Vec::with_capacity(builder.steps.len());
    let mut patch = stamps.first().and_then(|s| s.patch.as_ref());
    for s in &builder.steps {
        let at = format!("step {:?}", s.name);
        let mut args = render(&s.args, stamps, &at)?;
        if let (ModuleSource::Builtin(name), Some(p), Value::Object(map)) =
            (&s.module, patch, &mut args)
            && *name == "git"
            && !map.contains_key("patch")
        {
            let body = String::from_utf8(p.body.clone()).map_err(|_| PlanError::Args {
                at: at.clone(),
                message: "the try patch is not UTF-8 text".into(),
            })?;
            map.insert(
                "patch".into(),
                serde_json::json!({"body": body, "level": p.level}),
            );
            patch = None;
        }
        let mut observers = Vec::new();
        let (module, args) = match &s.module {
            ModuleSource::Builtin(name) => {
                let b = builtin(name, &at)?;
                let merged = b.args(&args).map_err(|message| PlanError::Args {
                    at: at.clone(),
                    message,
                })?;
                for (o, o_args) in b.default_observers(&merged) {
                    observers.push(ObserverSpecWire {
                        name: o.name.to_owned(),
                        module: ModuleSpec::Builtin {
                            name: o.name.to_owned(),
                        },
                        args: o_args,
                        log: DEFAULT_LOG.to_owned(),
                    });
                }
                (
                    ModuleSpec::Builtin {
                        name: b.name.to_owned(),
                    },
                    merged,
                )
            }
            ModuleSource::Uploaded(m) => (uploaded(m, &at)?, args),
        };
        for o in &s.observers {
            let o_at = format!("{at}: observer {:?}", o.module.to_string());
            let (module, name) = match &o.module {
                ModuleSource::Builtin(name) => {
                    let b = builtin(name, &o_at)?;
                    (
                        ModuleSpec::Builtin {
                            name: b.name.to_owned(),
                        },
                        b.name.to_owned(),
                    )
                }
                ModuleSource::Uploaded(m) => (uploaded(m, &o_at)?, m.name.clone()),
            };
            observers.push(ObserverSpecWire {
                name,
                module,
                args: render(&o.args, stamps, &o_at)?,
                log: o.log.clone(),
            });
        }
        steps.push(StepSpec {
            name: s.name.clone(),
            module,
            args,
            observers,
            options: s.options.clone(),
            timeout_ms: s.timeout.as_millis().min(u64::MAX as u128) as u64,
        });
    }
    Ok(steps)
}

/// The grant a job carries: the builder's programs, directories, environment, network and
/// memory cap.
pub fn job_grant(builder: &Builder) -> GrantSpec {
    let g = &builder.grant;
    GrantSpec {
        programs: g.programs.clone(),
        ro_dirs: g.ro_dirs.clone(),
        env: g.env.clone(),
        network: g.network,
        memory_bytes: u64::from(g.memory_mib) << 20,
    }
}

/// Turns a configured builder into the runtime's steps ([`job_steps`], loaded): built-ins from
/// this binary, uploaded modules from the files `modules` maps them to.
pub fn plan_build(
    builder: &Builder,
    runtime: &Runtime,
    modules: &ModuleFiles,
    stamps: &[SourceStamp],
) -> Result<BuildPlan, PlanError> {
    // The files of uploaded modules, by SHA-1, as the worker's file cache would hold them.
    let files: std::cell::RefCell<HashMap<String, PathBuf>> = Default::default();
    let uploaded = |m: &ModuleRef, at: &str| -> Result<ModuleSpec, PlanError> {
        let file = modules.get(m).ok_or_else(|| PlanError::NotAvailable {
            at: at.to_owned(),
            module: m.to_string(),
        })?;
        let bytes = std::fs::read(file).map_err(|e| PlanError::Args {
            at: at.to_owned(),
            message: format!("{}: {e}", file.display()),
        })?;
        use sha2::Digest;
        let sha1 = hex::encode(sha1_checked::Sha1::digest(&bytes));
        files.borrow_mut().insert(sha1.clone(), file.to_owned());
        Ok(ModuleSpec::File {
            label: m.to_string(),
            sha1,
            sha256: hex::encode(sha2::Sha256::digest(&bytes)),
            size: bytes.len() as u64,
        })
    };
    let specs = job_steps(builder, stamps, &uploaded)?;
    let files = files.into_inner();
    let load = |module: &ModuleSpec, at: &str| -> Result<Loaded, PlanError> {
        let loaded = match module {
            ModuleSpec::Builtin { name } => {
                let b = builtin(name, at)?;
                runtime.load(b.wasm, b.name)
            }
            ModuleSpec::File { sha1, .. } => runtime.load_file(&files[sha1]),
        };
        loaded.map_err(|error| PlanError::Load {
            at: at.to_owned(),
            error,
        })
    };
    let mut steps = Vec::with_capacity(specs.len());
    for spec in specs {
        let at = format!("step {:?}", spec.name);
        let step = match load(&spec.module, &at)? {
            Loaded::Step(s) => s,
            other => return Err(wrong_kind(&other, spec.module.label(), "step", &at)),
        };
        let mut observers = Vec::with_capacity(spec.observers.len());
        for o in spec.observers {
            let o_at = format!("{at}: observer {:?}", o.module.label());
            let component = match load(&o.module, &o_at)? {
                Loaded::Observer(c) => c,
                other => return Err(wrong_kind(&other, o.module.label(), "observer", &o_at)),
            };
            observers.push(ObserverSpec {
                component,
                name: o.name,
                args: o.args,
                log: o.log,
            });
        }
        steps.push(BuildStep {
            name: spec.name,
            step,
            args: spec.args,
            observers,
            options: spec.options,
            deadline: Some(Duration::from_millis(spec.timeout_ms)),
        });
    }
    Ok(BuildPlan {
        steps,
        modules: builder.steps.iter().map(|s| s.module.to_string()).collect(),
        deadline: builder.grant.step_timeout,
        grant: builder.grant.clone(),
    })
}

/// A built-in by name (the configuration only names built-ins this binary has).
fn builtin(name: &str, at: &str) -> Result<&'static steps::Builtin, PlanError> {
    steps::find(name).ok_or_else(|| PlanError::Args {
        at: at.to_owned(),
        message: format!(
            "{name} is not built into this kiln (`kiln step list` names those that are)"
        ),
    })
}

fn render(args: &Value, stamps: &[SourceStamp], at: &str) -> Result<Value, PlanError> {
    crate::properties::render_sources(args, stamps).map_err(|e| PlanError::Args {
        at: at.to_owned(),
        message: e.to_string(),
    })
}

fn wrong_kind(loaded: &Loaded, label: &str, wanted: &'static str, at: &str) -> PlanError {
    PlanError::Load {
        at: at.to_owned(),
        error: LoadError::WrongKind {
            label: label.to_owned(),
            found: loaded.kind(),
            wanted,
        },
    }
}
