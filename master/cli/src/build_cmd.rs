//! `kiln build run`: a builder's configured steps run locally, in order, exactly as a worker
//! will run them: built-ins with their presets and default observers, the builder's grant,
//! Buildbot's step options, properties layered as on the farm and secrets from the
//! configuration's providers. Each step's log is printed live (as `kiln step run` prints it),
//! then a table of the steps' results and the build's.
//!
//! [`master::plan`] turns the configured builder into what the runtime runs, as it does for a
//! worker's job.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use runtime::{BuildOutcome, DirStore, Properties, Runtime, RuntimeConfig, StepEvents};
use serde_json::{Map, Value};

use kiln_config::{self as config, Builder, Config, ModuleRef, ModuleSource};
use kiln_db::model::SourceStamp;
use master::plan::{ModuleFiles, plan_build};
use master::properties::BuildFacts;

use crate::step_cmd;
use crate::term::{self, Printer};

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
    #[command(flatten)]
    pub props: crate::props::BuildProps,
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
    for p in &args.props.props {
        let (name, value) = (p.name.as_str(), p.json());
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
    let secrets = master::secrets::for_build(&config.secrets, step_args, builder.trusted)
        .map_err(|e| anyhow!("builder {:?}: {e}", builder.name))?;
    // As on the farm, an untrusted builder's builds run only in sandbox mode.
    let confinement = step_cmd::confinement(args.sandbox || !builder.trusted)?;

    let cache_dir = args
        .cache_dir
        .clone()
        .or_else(runtime::RuntimeConfig::default_cache_dir);
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
    Ok(term::exit_code(outcome.result))
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
    let mut props = master::properties::for_build(
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

/// Prints the table of steps (name, result, elapsed, summary), the properties the steps set,
/// and the build's result.
fn print_build(outcome: &BuildOutcome, elapsed: Duration, color: bool) {
    let rows: Vec<Vec<String>> = outcome
        .steps
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.outcome.result.as_str().to_owned(),
                // A step that did not run has no time of its own.
                if s.ran {
                    runtime::human_duration(s.outcome.elapsed)
                } else {
                    "-".to_owned()
                },
                s.outcome
                    .summary
                    .as_deref()
                    .or(s.outcome.message.as_deref())
                    .unwrap_or("")
                    .to_owned(),
            ]
        })
        .collect();
    let mut out = String::from("\n");
    out += &term::table(
        &["STEP", "RESULT", "ELAPSED", "SUMMARY"],
        &rows,
        |col, t| {
            if col == 1 {
                term::result_paint(t, color)
            } else {
                ("", "")
            }
        },
    );
    for (name, p) in outcome.properties.iter() {
        if p.source.starts_with("Step ") {
            let _ = writeln!(out, "property:   {name} = {} ({})", p.value, p.source);
        }
    }
    let (start, end) = term::paint(outcome.result, color);
    let _ = writeln!(out, "result:     {start}{}{end}", outcome.result);
    let _ = writeln!(out, "elapsed:    {}", runtime::human_duration(elapsed));
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
}
