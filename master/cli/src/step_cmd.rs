//! `kiln step run` and `kiln step list`: run one step locally in exactly the sandbox a worker
//! uses, printing its logs live and its outcome at the end.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use runtime::{
    CancelToken, Confinement, DirStore, Grant, Helper, Loaded, ObserverSpec, Properties, Runtime,
    RuntimeConfig, StepOutcome, StepResources, StepRun,
};
use serde_json::Value;

use crate::term::{Printer, exit_code, human_bytes, paint};

/// Arguments of `kiln step run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The step: a .wasm component file, or the name of a built-in step.
    pub module: String,
    /// The workdir the step gets read-write (its "."; the cwd of its commands).
    #[arg(long, value_name = "DIR")]
    pub workdir: PathBuf,
    /// The step's arguments as JSON. `%(prop:NAME)s` and `%(secret:NAME)s` are interpolated.
    #[arg(long, value_name = "JSON", default_value = "{}")]
    pub args: String,
    #[command(flatten)]
    pub props: crate::props::BuildProps,
    /// An observer of the stdio log: a .wasm file or a built-in name, optionally =JSON args
    /// (`--observer line-counter`, `--observer obs.wasm='{"x":1}'`).
    #[arg(long = "observer", value_name = "OBSERVER[=JSON]")]
    pub observers: Vec<String>,
    /// A program the step may run, by name (looked up on PATH) or absolute path.
    #[arg(long = "allow-program", value_name = "PROGRAM")]
    pub programs: Vec<String>,
    /// A directory the step may read (at the same path).
    #[arg(long = "ro-dir", value_name = "DIR")]
    pub ro_dirs: Vec<PathBuf>,
    /// An environment variable for the step and its commands, NAME=VALUE.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// A secret, NAME=VALUE, or NAME to take the value from the environment variable NAME.
    /// Usable as %(secret:NAME)s; redacted from all output.
    #[arg(long = "secret", value_name = "NAME[=VALUE]")]
    pub secrets: Vec<String>,
    /// Wall-clock limit for the whole step, in seconds.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 3600.0,
        allow_negative_numbers = true
    )]
    pub timeout: f64,
    /// Memory limit of the step (and of each observer), in MiB.
    #[arg(long, value_name = "MB", default_value_t = 512)]
    pub memory: usize,
    /// Largest log, in MiB; output past it is dropped with a marker line.
    #[arg(long, value_name = "MB", default_value_t = 64)]
    pub log_limit: u64,
    /// Longest log line kept whole, in bytes; longer lines are split.
    #[arg(long, value_name = "BYTES", default_value_t = 65536)]
    pub max_line: usize,
    /// Sandbox mode: confine commands (Landlock, seccomp, rlimits), as on an untrusted worker.
    #[arg(long)]
    pub sandbox: bool,
    /// Let commands use the network (only enforced in sandbox mode; the step itself never has it).
    #[arg(long)]
    pub network: bool,
    /// The local file store for artifact uploads and downloads.
    #[arg(long, value_name = "DIR", default_value = "kiln-artifacts")]
    pub artifacts: PathBuf,
    /// Where compiled components are cached.
    #[arg(long, value_name = "DIR", env = "KILN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Print the outcome as JSON instead of the summary table.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    // Every input is checked before anything runs.
    let step_args: Value = serde_json::from_str(&args.args).context("--args is not valid JSON")?;
    let mut properties = Properties::new();
    for p in &args.props.props {
        properties.set(&p.name, p.json(), "Command line");
    }
    let mut env = BTreeMap::new();
    for e in &args.env {
        let (name, value) = split_pair(e, "--env")?;
        env.insert(name.to_owned(), value.to_owned());
    }
    let mut secrets = BTreeMap::new();
    for s in &args.secrets {
        let (name, value) = match s.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => {
                let v = std::env::var(s).with_context(|| {
                    format!("--secret {s}: environment variable {s} is not set")
                })?;
                (s.clone(), v)
            }
        };
        if name.is_empty() || value.is_empty() {
            bail!("--secret {name}: a secret needs a name and a non-empty value");
        }
        secrets.insert(name, value);
    }
    if !args.workdir.is_dir() {
        bail!(
            "--workdir {}: no such directory; create it first",
            args.workdir.display()
        );
    }
    let deadline = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| {
            format!(
                "--timeout {:?}: give a positive number of seconds",
                args.timeout
            )
        })?;
    if !(1..=4096).contains(&args.memory) {
        bail!(
            "--memory {}: give 1 to 4096 MiB (a wasm32 guest cannot use more than 4 GiB)",
            args.memory
        );
    }
    if args.log_limit == 0 {
        bail!("--log-limit 0: give at least 1 MiB");
    }
    if !(16..=64 << 20).contains(&args.max_line) {
        bail!("--max-line {}: give 16 bytes to 64 MiB", args.max_line);
    }
    for dir in &args.ro_dirs {
        if !dir.is_absolute() || !dir.is_dir() {
            bail!(
                "--ro-dir {}: give an existing directory by absolute path",
                dir.display()
            );
        }
    }
    let confinement = confinement(args.sandbox)?;

    let cache_dir = args
        .cache_dir
        .clone()
        .or_else(runtime::RuntimeConfig::default_cache_dir);
    let rt = Runtime::new(RuntimeConfig { cache_dir })?;
    let (step, builtin) = match load(&rt, &args.module)? {
        (Loaded::Step(s), builtin) => (s, builtin),
        (Loaded::Observer(_), _) => bail!(
            "{} is a log observer, not a step; pass it with --observer",
            args.module
        ),
        (Loaded::Policy(_), _) => bail!(
            "{} is a policy (customization hooks), not a step; name it in the master's \
             [hooks] or a scheduler's `policy`",
            args.module
        ),
    };
    // A built-in step brings its preset arguments and its own observers (compile: warnings).
    let mut observers = Vec::new();
    let step_args = match builtin {
        Some(b) => {
            let merged = b
                .args(&step_args)
                .map_err(|e| anyhow::anyhow!("--args: {e}"))?;
            for (observer, obs_args) in b.default_observers(&merged) {
                let Loaded::Observer(component) = rt.load(observer.wasm, observer.name)? else {
                    bail!("built-in {} is not an observer", observer.name)
                };
                observers.push(ObserverSpec {
                    component,
                    name: observer.name.to_owned(),
                    args: obs_args,
                    log: "stdio".into(),
                });
            }
            merged
        }
        None => step_args,
    };
    for spec in &args.observers {
        let (module, obs_args) = match spec.split_once('=') {
            Some((m, json)) => (
                m,
                serde_json::from_str(json)
                    .with_context(|| format!("--observer {spec}: arguments are not valid JSON"))?,
            ),
            None => (spec.as_str(), Value::Null),
        };
        let component = match load(&rt, module)?.0 {
            Loaded::Observer(o) => o,
            Loaded::Step(_) => bail!("--observer {module}: this is a step, not a log observer"),
            Loaded::Policy(_) => bail!("--observer {module}: this is a policy, not a log observer"),
        };
        let name = Path::new(module)
            .file_stem()
            .map_or(module.to_owned(), |s| s.to_string_lossy().into_owned());
        observers.push(ObserverSpec {
            component,
            name,
            args: obs_args,
            log: "stdio".into(),
        });
    }

    let workdir = args
        .workdir
        .canonicalize()
        .with_context(|| format!("--workdir {}", args.workdir.display()))?;
    let mut grant = Grant::new(workdir, Arc::new(DirStore::new(&args.artifacts)?));
    grant.ro_dirs = args.ro_dirs.clone();
    grant.env = env;
    grant.programs = args.programs.clone();
    grant.secrets = secrets;
    grant.limits.deadline = deadline;
    grant.limits.memory_bytes = args.memory.saturating_mul(1 << 20);
    grant.limits.logs.max_log_bytes = args.log_limit.saturating_mul(1 << 20);
    grant.limits.logs.max_line_bytes = args.max_line;
    grant.command_network = args.network;
    grant.confinement = confinement;

    let cancel = cancel_on_ctrlc()?;
    let printer = Arc::new(Printer::new());
    let outcome = rt.run_step(StepRun {
        step: &step,
        args: &step_args,
        properties: &properties,
        observers: &observers,
        grant: &grant,
        events: printer.clone(),
        cancel,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        print_outcome(&outcome, printer.color);
    }
    Ok(exit_code(outcome.result))
}

/// Sandbox mode's confinement, probed (refused with the reason on a kernel that cannot
/// enforce it), or `None` without `--sandbox`.
pub(crate) fn confinement(sandbox: bool) -> anyhow::Result<Option<Arc<Confinement>>> {
    if !sandbox {
        return Ok(None);
    }
    let helper = Helper::current_exe().context("finding the kiln binary for the sandbox helper")?;
    Ok(Some(Arc::new(Confinement::probe(helper)?)))
}

/// A token that Ctrl-C cancels.
pub(crate) fn cancel_on_ctrlc() -> anyhow::Result<CancelToken> {
    let cancel = CancelToken::new();
    let handler = cancel.clone();
    ctrlc::set_handler(move || handler.cancel()).context("installing the Ctrl-C handler")?;
    Ok(cancel)
}

pub(crate) fn list() {
    let width = steps::BUILTINS
        .iter()
        .map(|b| b.name.len())
        .max()
        .unwrap_or(4);
    println!("{:<width$}  {:<8}  DESCRIPTION", "NAME", "KIND");
    for b in steps::BUILTINS {
        let kind = match b.kind {
            steps::Kind::Step => "step",
            steps::Kind::Observer => "observer",
        };
        println!("{:<width$}  {kind:<8}  {}", b.name, b.description);
    }
}

/// Loads a component from a file, or a built-in by name (returned too: it brings a preset and
/// default observers).
fn load(rt: &Runtime, module: &str) -> anyhow::Result<(Loaded, Option<&'static steps::Builtin>)> {
    let path = Path::new(module);
    if path.exists() || module.ends_with(".wasm") || module.contains('/') {
        return Ok((rt.load_file(path)?, None));
    }
    match steps::find(module) {
        Some(b) => Ok((rt.load(b.wasm, b.name)?, Some(b))),
        None => {
            let names: Vec<&str> = steps::BUILTINS.iter().map(|b| b.name).collect();
            bail!(
                "{module}: no such file, and no built-in step or observer has that name (built in: {})",
                names.join(", ")
            )
        }
    }
}

fn split_pair<'a>(pair: &'a str, flag: &str) -> anyhow::Result<(&'a str, &'a str)> {
    match pair.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name, value)),
        _ => bail!("{flag} {pair}: write NAME=VALUE"),
    }
}

fn print_outcome(o: &StepOutcome, color: bool) {
    let (paint, reset) = paint(o.result, color);
    let mut out = format!("result:     {paint}{}{reset}\n", o.result);
    if let Some(s) = &o.summary {
        out.push_str(&format!("summary:    {s}\n"));
    }
    if let Some(m) = &o.message
        && o.summary.as_deref() != Some(m)
    {
        out.push_str(&format!("message:    {m}\n"));
    }
    for (k, v) in &o.properties {
        out.push_str(&format!("property:   {k} = {v}\n"));
    }
    for (k, v) in &o.statistics {
        out.push_str(&format!("statistic:  {k} = {v}\n"));
    }
    for (k, v) in &o.progress {
        out.push_str(&format!("progress:   {k} = {v}\n"));
    }
    for u in &o.urls {
        out.push_str(&format!("url:        {} {}\n", u.name, u.url));
    }
    for (name, s) in &o.logs {
        let dropped = if s.dropped_bytes > 0 {
            format!(", {} bytes dropped", s.dropped_bytes)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "log:        {name}: {} lines, {} bytes{dropped}\n",
            s.lines, s.bytes
        ));
    }
    out.push_str(&format!(
        "elapsed:    {}\n",
        runtime::human_duration(o.elapsed)
    ));
    if let Some(r) = &o.resources {
        out.push_str(&resource_lines(r));
    }
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
}

/// "cpu:        1.5 s in 2 commands" and "memory:     commands 130.0 MiB, guest 1.1 MiB".
fn resource_lines(r: &StepResources) -> String {
    let plural = if r.commands == 1 { "" } else { "s" };
    let mut out = format!(
        "cpu:        {} in {} command{plural}\n",
        runtime::human_duration(std::time::Duration::from_millis(r.cpu_ms)),
        r.commands
    );
    out.push_str("memory:     ");
    match r.peak_rss_bytes {
        Some(rss) => out.push_str(&format!("commands {}, ", human_bytes(rss))),
        None if r.commands > 0 => out.push_str("commands not measured, "),
        None => {}
    }
    out.push_str(&format!("guest {}", human_bytes(r.guest_memory_bytes)));
    if let Some(m) = r.observer_memory_bytes {
        out.push_str(&format!(", observers {}", human_bytes(m)));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_read_in_units_people_use() {
        let r = StepResources {
            commands: 2,
            cpu_ms: 1500,
            peak_rss_bytes: Some(130 << 20),
            guest_memory_bytes: 1_114_112,
            observer_memory_bytes: Some(512 << 10),
        };
        assert_eq!(
            resource_lines(&r),
            "cpu:        1.5 s in 2 commands\nmemory:     commands 130.0 MiB, guest 1.1 MiB, observers 512 KiB\n"
        );
        let none = StepResources {
            commands: 0,
            guest_memory_bytes: 3 << 30,
            ..StepResources::default()
        };
        assert_eq!(
            resource_lines(&none),
            "cpu:        0 ms in 0 commands\nmemory:     guest 3.0 GiB\n"
        );
        let brief = StepResources {
            commands: 1,
            ..none
        };
        assert_eq!(
            resource_lines(&brief),
            "cpu:        0 ms in 1 command\nmemory:     commands not measured, guest 3.0 GiB\n"
        );
    }
}
