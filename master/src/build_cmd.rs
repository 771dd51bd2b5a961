//! `kiln build run`: a builder's configured steps run locally, in order, exactly as a worker
//! will run them: built-ins with their presets and default observers, the builder's grant,
//! Buildbot's step options, properties layered as on the farm and secrets from the
//! configuration's providers. Each step's log is printed live (as `kiln step run` prints it),
//! then a table of the steps' results and the build's.
//!
//! [`plan_build`] turns a configured builder into what the runtime runs; the worker reuses it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use runtime::protocol::{GrantSpec, ModuleSpec, ObserverSpecWire, StepSpec};
use runtime::{
    ArtifactStore, BuildOutcome, BuildStep, DirStore, Grant, LoadError, Loaded, ObserverSpec,
    Outcome, Properties, Runtime, RuntimeConfig, StepEvents,
};
use serde_json::{Map, Value};

use crate::config::{self, Builder, BuilderGrant, Config, DEFAULT_LOG, ModuleRef, ModuleSource};
use crate::model::SourceStamp;
use crate::properties::BuildFacts;
use crate::step_cmd::{self, Printer};

/// `kiln build ...`.
#[derive(Debug, Subcommand)]
pub enum BuildCommand {
    /// Run a builder's steps from the configuration locally, exactly as a worker would, and
    /// print their logs live, a table of results, and the build's result.
    ///
    /// Exit status: 0 for SUCCESS or WARNINGS, 1 for FAILURE, 2 for bad input, 3 for any other
    /// result (EXCEPTION, RETRY, CANCELLED).
    Run(Box<BuildRunArgs>),
}

/// Arguments of `kiln build run`.
#[derive(Debug, Args)]
pub struct BuildRunArgs {
    /// The builder, by name (as in `[[builders]]`, or a name a `[[matrix]]` generates).
    pub builder: String,
    /// The master's configuration file.
    #[arg(
        long,
        short,
        value_name = "FILE",
        env = "KILN_CONFIG",
        default_value = "kiln.toml"
    )]
    pub config: PathBuf,
    /// The build's workdir: read-write for every step, the cwd of their commands (on a worker,
    /// the builder's `workdir` under the worker's base directory).
    #[arg(long, value_name = "DIR")]
    pub workdir: PathBuf,
    /// A build property, NAME=VALUE (VALUE is read as JSON if it parses, else as a string),
    /// with source "Command line": it wins over global and builder properties.
    #[arg(long = "prop", value_name = "NAME=VALUE")]
    pub props: Vec<String>,
    /// The branch built (property `branch`, `%(src::branch)s`).
    #[arg(long)]
    pub branch: Option<String>,
    /// The revision built (property `revision`); none means the branch's tip.
    #[arg(long)]
    pub revision: Option<String>,
    /// The repository URL (property `repository`).
    #[arg(long)]
    pub repository: Option<String>,
    /// The component file of an uploaded module the builder names, NAME@VERSION=FILE.wasm
    /// (written as in the configuration; uploaded modules otherwise live on the master).
    #[arg(long = "module", value_name = "NAME@VERSION=FILE")]
    pub modules: Vec<String>,
    /// Sandbox mode: confine commands (Landlock, seccomp, rlimits), as on a sandbox worker.
    /// Always on for an untrusted builder, whose builds run only on sandbox workers.
    #[arg(long)]
    pub sandbox: bool,
    /// The local file store for artifact uploads and downloads.
    #[arg(long, value_name = "DIR", default_value = "kiln-artifacts")]
    pub artifacts: PathBuf,
    /// Where compiled components are cached.
    #[arg(long, value_name = "DIR", env = "KILN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Print the build's outcome (result, steps, properties) as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

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

/// Runs a `kiln build` command.
pub(crate) fn run(command: BuildCommand) -> anyhow::Result<ExitCode> {
    match command {
        BuildCommand::Run(args) => run_build(*args),
    }
}

fn run_build(args: BuildRunArgs) -> anyhow::Result<ExitCode> {
    // Every input is checked before anything runs.
    let config = config::load(&args.config).map_err(|e| anyhow!("{e}"))?;
    let builder = find_builder(&config, &args.builder, &args.config)?;
    let mut command_line = Vec::new();
    for p in &args.props {
        let (name, value) = step_cmd::parse_prop(p)?;
        if let Some(flag) = ["branch", "revision", "repository"]
            .into_iter()
            .find(|f| *f == name)
        {
            bail!("--prop {p}: the source stamp's {flag} is set with --{flag}");
        }
        command_line.push((name.to_owned(), value));
    }
    let modules = module_files(&args.modules, builder)?;
    if !args.workdir.is_dir() {
        bail!(
            "--workdir {}: no such directory; create it first",
            args.workdir.display()
        );
    }
    let stamps = [SourceStamp {
        repository: args.repository.clone().unwrap_or_default(),
        branch: args.branch.clone(),
        revision: args.revision.clone(),
        ..SourceStamp::default()
    }];
    let properties = build_properties(&config, builder, &stamps, &command_line);
    let step_args = builder
        .steps
        .iter()
        .flat_map(|s| std::iter::once(&s.args).chain(s.observers.iter().map(|o| &o.args)));
    let secrets = crate::secrets::for_build(&config.secrets, step_args, builder.trusted)
        .map_err(|e| anyhow!("builder {:?}: {e}", builder.name))?;
    // As on the farm, an untrusted builder's builds run only in sandbox mode.
    let confinement = step_cmd::confinement(args.sandbox || !builder.trusted)?;

    let cache_dir = args.cache_dir.clone().or_else(step_cmd::default_cache_dir);
    let rt = Runtime::new(RuntimeConfig { cache_dir })?;
    let plan = plan_build(builder, &rt, &modules, &stamps)
        .map_err(|e| anyhow!("builder {:?}: {e}", builder.name))?;
    let workdir = args
        .workdir
        .canonicalize()
        .with_context(|| format!("--workdir {}", args.workdir.display()))?;
    let mut grant = plan.grant(workdir, Arc::new(DirStore::new(&args.artifacts)?));
    grant.secrets = secrets;
    grant.confinement = confinement;

    if !builder.trusted && !args.sandbox {
        eprintln!(
            "kiln: builder {:?} is untrusted, so its commands run confined (sandbox mode), as on a sandbox worker",
            builder.name
        );
    }

    let cancel = step_cmd::cancel_on_ctrlc()?;
    let printer = Arc::new(Printer::new());
    let color = printer.color;
    let total = plan.steps.len();
    let events = |i: usize, name: &str| -> Arc<dyn StepEvents> {
        let (start, end) = if color {
            ("\x1b[1m", "\x1b[0m")
        } else {
            ("", "")
        };
        let banner = format!(
            "{start}==> step {}/{total}: {name} ({}){end}\n",
            i + 1,
            plan.modules[i]
        );
        // A closed stdout (a pipe into `head`) must not stop the build.
        let _ = std::io::stdout().lock().write_all(banner.as_bytes());
        printer.clone()
    };
    let started = Instant::now();
    let outcome = rt.run_build(&plan.steps, properties, &grant, &events, &cancel);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        print_build(&outcome, started.elapsed(), color);
    }
    Ok(step_cmd::exit_code(outcome.result))
}

fn find_builder<'a>(config: &'a Config, name: &str, file: &Path) -> anyhow::Result<&'a Builder> {
    if let Some(b) = config.builder(name) {
        return Ok(b);
    }
    let names: Vec<&str> = config.builders.iter().map(|b| b.name.as_str()).collect();
    if names.is_empty() {
        bail!(
            "builder {name:?} is not defined in {}, which defines no builders; add a [[builders]] entry",
            file.display()
        )
    }
    bail!(
        "builder {name:?} is not defined in {} (defined: {})",
        file.display(),
        names.join(", ")
    )
}

/// The `--module NAME@VERSION=FILE` flags, each naming a module the builder uses and an
/// existing file.
fn module_files(flags: &[String], builder: &Builder) -> anyhow::Result<ModuleFiles> {
    let used: Vec<&ModuleRef> = builder
        .steps
        .iter()
        .flat_map(|s| std::iter::once(&s.module).chain(s.observers.iter().map(|o| &o.module)))
        .filter_map(|m| match m {
            ModuleSource::Uploaded(r) => Some(r),
            ModuleSource::Builtin(_) => None,
        })
        .collect();
    let mut files = ModuleFiles::default();
    for flag in flags {
        let Some((module, file)) = flag
            .split_once('=')
            .filter(|(m, f)| !m.is_empty() && !f.is_empty())
        else {
            bail!("--module {flag}: write NAME@VERSION=FILE.wasm");
        };
        let module = ModuleRef::parse(module).map_err(|e| anyhow!("--module {flag}: {e}"))?;
        if !used.contains(&&module) {
            let uses: Vec<String> = used.iter().map(|m| m.to_string()).collect();
            bail!(
                "--module {flag}: builder {:?} does not use module {module} ({})",
                builder.name,
                if uses.is_empty() {
                    "it uses no uploaded modules".to_owned()
                } else {
                    format!("it uses: {}", uses.join(", "))
                }
            );
        }
        let file = PathBuf::from(file);
        if !file.is_file() {
            bail!("--module {flag}: {}: no such file", file.display());
        }
        files.insert(module, file);
    }
    Ok(files)
}

/// The properties a local build starts with, layered as on the farm: global, builder, the
/// build's own (source stamp, buildername, buildnumber 0, workername "local"), then the
/// command line's.
fn build_properties(
    config: &Config,
    builder: &Builder,
    stamps: &[SourceStamp],
    command_line: &[(String, Value)],
) -> Properties {
    let map = |m: &std::collections::BTreeMap<String, Value>| -> Map<String, Value> {
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    let mut props = crate::properties::for_build(
        &map(&config.properties),
        &[],
        &map(&builder.properties),
        &Map::new(),
        stamps,
        &BuildFacts {
            builder: &builder.name,
            number: 0,
            worker: Some("local"),
            scheduler: None,
            reason: "a local build (kiln build run)",
            blamelist: &[],
        },
    );
    for (name, value) in command_line {
        props.set(name.clone(), value.clone(), "Command line");
    }
    props
}

/// One line of the results table.
struct Row<'a> {
    name: &'a str,
    result: Outcome,
    elapsed: String,
    summary: &'a str,
}

/// Prints the table of steps (name, result, elapsed, summary), the properties the steps set,
/// and the build's result.
fn print_build(outcome: &BuildOutcome, elapsed: Duration, color: bool) {
    let rows: Vec<Row<'_>> = outcome
        .steps
        .iter()
        .map(|s| Row {
            name: &s.name,
            result: s.outcome.result,
            // A step that did not run has no time of its own.
            elapsed: if s.ran {
                runtime::human_duration(s.outcome.elapsed)
            } else {
                "-".to_owned()
            },
            summary: s
                .outcome
                .summary
                .as_deref()
                .or(s.outcome.message.as_deref())
                .unwrap_or(""),
        })
        .collect();
    let width = |title: &str, cell: fn(&Row<'_>) -> usize| {
        rows.iter()
            .map(cell)
            .chain([title.len()])
            .max()
            .unwrap_or(0)
    };
    let name_w = width("STEP", |r| r.name.chars().count());
    let result_w = width("RESULT", |r| r.result.as_str().len());
    let elapsed_w = width("ELAPSED", |r| r.elapsed.chars().count());
    let mut out = format!(
        "\n{:<name_w$}  {:<result_w$}  {:<elapsed_w$}  SUMMARY\n",
        "STEP", "RESULT", "ELAPSED"
    );
    for r in &rows {
        let (start, end) = if r.result == Outcome::Skipped {
            ("", "")
        } else {
            step_cmd::paint(r.result, color)
        };
        let line = format!(
            "{:<name_w$}  {start}{:<result_w$}{end}  {:<elapsed_w$}  {}",
            r.name,
            r.result.as_str(),
            r.elapsed,
            r.summary
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    for (name, p) in outcome.properties.iter() {
        if p.source.starts_with("Step ") {
            let _ = writeln!(out, "property:   {name} = {} ({})", p.value, p.source);
        }
    }
    let (start, end) = step_cmd::paint(outcome.result, color);
    let _ = writeln!(out, "result:     {start}{}{end}", outcome.result);
    let _ = writeln!(out, "elapsed:    {}", runtime::human_duration(elapsed));
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
}
