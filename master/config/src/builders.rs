//! Workers and builders as the master uses them: checked, defaults filled, durations parsed,
//! step modules looked up, and the rules of trust applied.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use kiln_protocol::build::{Condition, StepOptions};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::check::{self, Ctx, list};
use super::duration;
use super::error::quote;
use super::refs::{ModuleRef, Secret};
use super::schema::{BuilderEntry, GrantSection, ObserverEntry, StepEntry, WorkerEntry};

/// Default deadline of a step (the runtime's default).
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default memory cap of a step, in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Largest memory cap: a wasm32 guest cannot address more than 4 GiB.
pub const MAX_MEMORY_MIB: u32 = 4096;
/// The log observers watch unless told otherwise.
pub const DEFAULT_LOG: &str = "stdio";

/// A worker the master accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct Worker {
    /// Its name.
    pub name: String,
    /// How it proves it is this worker.
    pub auth: WorkerAuth,
    /// Its architecture, if declared.
    pub arch: Option<String>,
    /// Its operating system, if declared.
    pub os: Option<String>,
    /// Its tags.
    pub tags: BTreeSet<String>,
    /// How many builds it runs at once (at least 1).
    pub max_builds: u32,
    /// Whether it is a sandbox-mode worker (may take untrusted builds).
    pub sandbox: bool,
    /// Properties of every build on it.
    pub properties: BTreeMap<String, Value>,
    /// Set for a latent worker, which the master starts and stops.
    pub latent: Option<Latent>,
}

/// A latent worker's settings: a `kiln-worker` the master starts as its child process when
/// builds wait for it, and stops when it has been idle.
#[derive(Debug, Clone, PartialEq)]
pub struct Latent {
    /// Stop it after this long without a build.
    pub idle_timeout: Duration,
    /// Its base directory.
    pub workdir: std::path::PathBuf,
    /// The `kiln-worker` program (`None`: the one next to the running `kiln`).
    pub program: Option<std::path::PathBuf>,
}

/// How a worker authenticates. `Debug` never shows a token.
#[derive(Clone, PartialEq, Eq)]
pub enum WorkerAuth {
    /// The token, as written in the configuration.
    Token(Secret),
    /// The SHA-256 of the token.
    TokenHash([u8; 32]),
}

impl fmt::Debug for WorkerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerAuth::Token(_) => f.write_str("Token(<redacted>)"),
            WorkerAuth::TokenHash(h) => write!(f, "TokenHash(sha256:{})", hex::encode(h)),
        }
    }
}

impl WorkerAuth {
    /// The SHA-256 of the worker's token (what the database stores).
    pub fn hash(&self) -> [u8; 32] {
        match self {
            WorkerAuth::Token(t) => Sha256::digest(t.expose().as_bytes()).into(),
            WorkerAuth::TokenHash(h) => *h,
        }
    }

    /// Whether `token` is this worker's, compared in constant time.
    pub fn verify(&self, token: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        presented
            .iter()
            .zip(self.hash())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// The `token_hash` form of a token: `sha256:` and 64 lowercase hex digits.
pub fn hash_token(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

/// A builder: a queue for one kind of build, its steps and where they may run.
#[derive(Debug, Clone, PartialEq)]
pub struct Builder {
    /// Its name.
    pub name: String,
    /// One line for the web UI.
    pub description: Option<String>,
    /// Which workers may run its builds (before the rules of trust).
    pub workers: WorkerSelector,
    /// Whether its builds are trusted (secrets, network, ordinary workers).
    pub trusted: bool,
    /// Whether a trusted builder's builds may also go to sandbox workers.
    pub allow_sandbox_workers: bool,
    /// Whether compatible pending requests are collapsed into one build.
    pub collapse: bool,
    /// Builders with a higher priority get free workers first.
    pub priority: i32,
    /// The build directory on the worker: one safe path component.
    pub workdir: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Properties of every build (for a matrix builder, including the axis values).
    pub properties: BTreeMap<String, Value>,
    /// What its steps may use.
    pub grant: BuilderGrant,
    /// Its steps, in order (at least one).
    pub steps: Vec<Step>,
    /// The matrix that generated it, if one did.
    pub matrix: Option<MatrixCell>,
}

impl Builder {
    /// Whether `worker` may run this builder's builds: it is selected, and the rules of
    /// trust allow it (untrusted builds only on sandbox workers; trusted builds on sandbox
    /// workers only with `allow_sandbox_workers`).
    pub fn accepts(&self, worker: &Worker) -> bool {
        let selected = match &self.workers {
            WorkerSelector::Any => true,
            WorkerSelector::Named(names) => names.contains(&worker.name),
            WorkerSelector::Requires(r) => r.matches(worker),
        };
        let trust = if self.trusted {
            !worker.sandbox || self.allow_sandbox_workers
        } else {
            worker.sandbox
        };
        selected && trust
    }
}

/// The builder and axis values a matrix builder was generated from.
#[derive(Debug, Clone, PartialEq)]
pub struct MatrixCell {
    /// The matrix's name template.
    pub matrix: String,
    /// The value of each axis.
    pub values: BTreeMap<String, String>,
}

/// Which workers a builder's builds may go to.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerSelector {
    /// Any worker.
    Any,
    /// These workers (all defined).
    Named(Vec<String>),
    /// Workers with these capabilities.
    Requires(Requirements),
}

/// Capabilities a builder needs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Requirements {
    /// The worker's `arch` must be this.
    pub arch: Option<String>,
    /// The worker's `os` must be this.
    pub os: Option<String>,
    /// The worker must have all these tags.
    pub tags: BTreeSet<String>,
}

impl Requirements {
    /// Whether the worker has every required capability.
    pub fn matches(&self, worker: &Worker) -> bool {
        self.arch
            .as_ref()
            .is_none_or(|a| worker.arch.as_ref() == Some(a))
            && self
                .os
                .as_ref()
                .is_none_or(|o| worker.os.as_ref() == Some(o))
            && self.tags.is_subset(&worker.tags)
    }
}

impl fmt::Display for Requirements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(a) = &self.arch {
            parts.push(format!("arch {}", quote(a)));
        }
        if let Some(o) = &self.os {
            parts.push(format!("os {}", quote(o)));
        }
        if !self.tags.is_empty() {
            parts.push(format!("tags {}", list(self.tags.iter().map(|t| quote(t)))));
        }
        if parts.is_empty() {
            f.write_str("nothing")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// What a builder's steps may use, besides their workdir.
#[derive(Debug, Clone, PartialEq)]
pub struct BuilderGrant {
    /// Programs the steps may run (names on `PATH` or absolute paths).
    pub programs: Vec<String>,
    /// Directories the steps may read (absolute).
    pub ro_dirs: Vec<PathBuf>,
    /// Environment of the steps and their commands.
    pub env: BTreeMap<String, String>,
    /// Whether commands may use the network (only ever true for trusted builders).
    pub network: bool,
    /// The deadline of a step that gives none.
    pub step_timeout: Duration,
    /// The memory cap of a step and of each of its observers, in MiB (1 to 4096).
    pub memory_mib: u32,
}

/// A step of a builder.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Its name, unique within the builder.
    pub name: String,
    /// The component that runs it.
    pub module: ModuleSource,
    /// Its arguments (a JSON object; a built-in's preset is merged in when it runs).
    pub args: Value,
    /// Observers besides those the step brings.
    pub observers: Vec<Observer>,
    /// Its deadline (its own `timeout`, or the grant's `step_timeout`).
    pub timeout: Duration,
    /// How its result affects the build.
    pub options: StepOptions,
}

/// Where a step's or observer's component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// A built-in, by name (see [`ModuleSource::builtin`]).
    Builtin(&'static str),
    /// A module uploaded to the master.
    Uploaded(ModuleRef),
}

impl ModuleSource {
    /// The built-in, for [`ModuleSource::Builtin`].
    pub fn builtin(&self) -> Option<&'static steps::Builtin> {
        match self {
            ModuleSource::Builtin(name) => steps::find(name),
            ModuleSource::Uploaded(_) => None,
        }
    }
}

impl fmt::Display for ModuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleSource::Builtin(name) => f.write_str(name),
            ModuleSource::Uploaded(m) => write!(f, "{m}"),
        }
    }
}

/// A log observer attached to a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Observer {
    /// Its component.
    pub module: ModuleSource,
    /// Its arguments.
    pub args: Value,
    /// The log it watches.
    pub log: String,
}

/// Resolves a `[[workers]]` entry (its name is checked by the caller).
pub(crate) fn resolve_worker(ctx: &mut Ctx, key: &str, w: WorkerEntry) -> Worker {
    let auth = match (w.token, w.token_hash) {
        (Some(_), Some(_)) => {
            ctx.error(
                key,
                "gives both token and token_hash; keep one (token_hash keeps the token out of this file)",
            );
            None
        }
        (None, None) => {
            ctx.error(
                key,
                "has no token; add token = \"...\" or token_hash = \"sha256:...\" (the SHA-256 of the token the worker presents with --token)",
            );
            None
        }
        (Some(t), None) if t.expose().is_empty() => {
            ctx.error(format!("{key}.token"), "is empty; give the worker's token");
            None
        }
        (Some(t), None) => Some(WorkerAuth::Token(t)),
        (None, Some(h)) => ctx
            .check(format!("{key}.token_hash"), parse_token_hash(&h))
            .map(WorkerAuth::TokenHash),
    };
    let max_builds = w.max_builds.unwrap_or(1);
    if max_builds == 0 {
        ctx.error(
            format!("{key}.max_builds"),
            "is 0; give at least 1 (the number of builds the worker runs at once)",
        );
    }
    check_nonempty(ctx, &format!("{key}.arch"), w.arch.as_deref());
    check_nonempty(ctx, &format!("{key}.os"), w.os.as_deref());
    check_tags(ctx, &format!("{key}.tags"), &w.tags);
    let latent = w.latent.and_then(|l| {
        let at = format!("{key}.latent");
        if l.kind != "local" {
            ctx.error(
                format!("{at}.kind"),
                format!("is {:?}; the latent worker kind Kiln has is \"local\"", l.kind),
            );
            return None;
        }
        if !matches!(auth, Some(WorkerAuth::Token(_))) {
            ctx.error(
                &at,
                "needs the worker's token = \"...\" (not token_hash): the master gives it to the worker it starts",
            );
        }
        let idle_timeout = match l.idle_timeout {
            Some(t) => ctx.check(format!("{at}.idle_timeout"), super::duration::parse_at_least(&t, Duration::from_secs(1)))?,
            None => Duration::from_secs(600),
        };
        let workdir = l
            .workdir
            .map(|d| ctx.dir.join(d))
            .unwrap_or_else(|| ctx.dir.join("workers").join(&w.name));
        Some(Latent {
            idle_timeout,
            workdir,
            program: l.program.map(|p| ctx.dir.join(p)),
        })
    });
    Worker {
        latent,
        name: w.name,
        auth: auth.unwrap_or(WorkerAuth::TokenHash([0; 32])),
        arch: w.arch,
        os: w.os,
        tags: w.tags.into_iter().collect(),
        max_builds,
        sandbox: w.sandbox.unwrap_or(false),
        properties: check::properties(ctx, &format!("{key}.properties"), w.properties),
    }
}

fn parse_token_hash(text: &str) -> Result<[u8; 32], String> {
    let bad = || {
        format!(
            "{text:?} is not \"sha256:\" and 64 lowercase hex digits; compute it with `printf %s \"$TOKEN\" | sha256sum`"
        )
    };
    let hex_part = text.strip_prefix("sha256:").ok_or_else(bad)?;
    if hex_part.len() != 64
        || !hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| bad())?;
    Ok(out)
}

fn check_nonempty(ctx: &mut Ctx, key: &str, value: Option<&str>) {
    if value.is_some_and(|v| v.trim().is_empty()) {
        ctx.error(key, "is empty; give a value or leave the key out");
    }
}

fn check_tags(ctx: &mut Ctx, key: &str, tags: &[String]) {
    if tags.iter().any(|t| t.trim().is_empty()) {
        ctx.error(key, "has an empty tag; remove it");
    }
}

/// Where a builder was written, for messages: `builders."linux"` or `matrix[0].builder`.
pub(crate) struct BuilderSite<'a> {
    /// Key path prefix of the builder's fields.
    pub key: &'a str,
    /// Whether it is a matrix template (messages name the generated builder).
    pub generated: bool,
}

/// Resolves a builder entry named `name` (checked by the caller) against the workers.
pub(crate) fn resolve_builder(
    ctx: &mut Ctx,
    site: &BuilderSite<'_>,
    name: String,
    entry: BuilderEntry,
    workers: &[Worker],
    matrix: Option<MatrixCell>,
) -> Builder {
    let key = site.key;
    let trusted = entry.trusted.unwrap_or(true);
    let allow_sandbox_workers = entry.allow_sandbox_workers.unwrap_or(false);
    let defined = || list(workers.iter().map(|w| w.name.as_str()));
    let selector = match (entry.workers, entry.requires) {
        (Some(_), Some(_)) => {
            ctx.error(
                key,
                "gives both workers and requires; keep one (worker names, or the capabilities a worker needs)",
            );
            WorkerSelector::Any
        }
        (Some(names), None) => {
            let wkey = format!("{key}.workers");
            if names.is_empty() {
                ctx.error(
                    &wkey,
                    "is empty; name at least one worker, or leave workers out to let any worker build",
                );
            }
            for n in &names {
                match workers.iter().find(|w| &w.name == n) {
                    None => ctx.error(
                        &wkey,
                        format!(
                            "names worker {}, which is not defined (defined: {})",
                            quote(n),
                            defined()
                        ),
                    ),
                    Some(w) if !trusted && !w.sandbox => ctx.error(
                        &wkey,
                        format!(
                            "names worker {}, which is not a sandbox worker; untrusted builds run only on sandbox workers (set sandbox = true on a worker started with --sandbox)",
                            quote(n)
                        ),
                    ),
                    Some(w) if trusted && w.sandbox && !allow_sandbox_workers => ctx.error(
                        &wkey,
                        format!(
                            "names worker {}, which is a sandbox worker; set allow_sandbox_workers = true to let this trusted builder use it",
                            quote(n)
                        ),
                    ),
                    Some(_) => {}
                }
            }
            WorkerSelector::Named(names)
        }
        (None, Some(r)) => {
            let rkey = format!("{key}.requires");
            check_nonempty(ctx, &format!("{rkey}.arch"), r.arch.as_deref());
            check_nonempty(ctx, &format!("{rkey}.os"), r.os.as_deref());
            check_tags(ctx, &format!("{rkey}.tags"), &r.tags);
            WorkerSelector::Requires(Requirements {
                arch: r.arch,
                os: r.os,
                tags: r.tags.into_iter().collect(),
            })
        }
        (None, None) => WorkerSelector::Any,
    };
    let grant = resolve_grant(ctx, &format!("{key}.grant"), entry.grant, trusted);
    let workdir = entry.workdir.unwrap_or_else(|| name.clone());
    if let Err(e) = check_workdir(&workdir) {
        ctx.error(format!("{key}.workdir"), e);
    }
    check_tags(ctx, &format!("{key}.tags"), &entry.tags);
    let mut properties = check::properties(ctx, &format!("{key}.properties"), entry.properties);
    if let Some(cell) = &matrix {
        for (axis, value) in &cell.values {
            properties
                .entry(axis.clone())
                .or_insert_with(|| Value::String(value.clone()));
        }
    }

    let mut steps: Vec<Step> = Vec::new();
    if entry.steps.is_empty() {
        ctx.error(
            format!("{key}.steps"),
            "the builder has no steps; add at least one [[builders.steps]]",
        );
    }
    for (i, s) in entry.steps.into_iter().enumerate() {
        let skey = format!("{key}.steps[{i}]");
        let step = resolve_step(ctx, &skey, s, grant.step_timeout);
        if let Some(j) = steps.iter().position(|o| o.name == step.name) {
            ctx.error(
                format!("{skey}.name"),
                format!(
                    "step name {} is already used by steps[{j}]; give each step its own name = \"...\"",
                    quote(&step.name)
                ),
            );
        }
        if !trusted {
            let mut found = secret_reference(&step.args).map(|s| (format!("{skey}.args"), s));
            for (k, o) in step.observers.iter().enumerate() {
                if found.is_none() {
                    found = secret_reference(&o.args)
                        .map(|s| (format!("{skey}.observers[{k}].args"), s));
                }
            }
            if let Some((at, placeholder)) = found {
                ctx.error(
                    at,
                    format!(
                        "an untrusted builder cannot use secrets ({}); remove it, or set trusted = true",
                        quote(&placeholder)
                    ),
                );
            }
        }
        steps.push(step);
    }

    let builder = Builder {
        name,
        description: entry.description,
        workers: selector,
        trusted,
        allow_sandbox_workers,
        collapse: entry.collapse.unwrap_or(true),
        priority: entry.priority.unwrap_or(0),
        workdir,
        tags: entry.tags,
        properties,
        grant,
        steps,
        matrix,
    };
    warn_if_no_worker(ctx, site, &builder, workers);
    builder
}

/// Warns when no defined worker may run the builder's builds: they would wait forever.
fn warn_if_no_worker(ctx: &mut Ctx, site: &BuilderSite<'_>, b: &Builder, workers: &[Worker]) {
    if workers.iter().any(|w| b.accepts(w)) {
        return;
    }
    let who = if site.generated {
        format!("builder {}: ", quote(&b.name))
    } else {
        String::new()
    };
    let key = site.key;
    match &b.workers {
        // Named workers that cannot take the builds are errors already.
        WorkerSelector::Named(_) => {}
        WorkerSelector::Requires(r) if !workers.iter().any(|w| r.matches(w)) => ctx.warn(
            format!("{key}.requires"),
            format!(
                "{who}no defined worker has {r}; its builds will wait until such a worker is added"
            ),
        ),
        _ if workers.is_empty() => ctx.warn(
            key,
            format!("{who}no worker is defined, so its builds will wait; add a [[workers]] entry"),
        ),
        _ if !b.trusted => ctx.warn(
            key,
            format!(
                "{who}untrusted, and no worker it may use is a sandbox worker; its builds will wait (set sandbox = true on a worker started with --sandbox)"
            ),
        ),
        _ => ctx.warn(
            key,
            format!(
                "{who}every worker it may use is a sandbox worker; set allow_sandbox_workers = true, or its builds will wait"
            ),
        ),
    }
}

/// The first `%(secret:...)s` placeholder in any string of `v`.
fn secret_reference(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => s.find("%(secret:").map(|at| {
            let rest = &s[at..];
            let end = rest.find(")s").map_or(rest.len(), |e| e + 2);
            rest[..end].to_owned()
        }),
        Value::Array(items) => items.iter().find_map(secret_reference),
        Value::Object(map) => map.values().find_map(secret_reference),
        _ => None,
    }
}

/// Checks that a workdir is one safe path component.
fn check_workdir(dir: &str) -> Result<(), String> {
    if dir.is_empty()
        || dir == "."
        || dir == ".."
        || dir.len() > 255
        || dir.contains(['/', '\\'])
        || dir.chars().any(char::is_control)
    {
        return Err(format!(
            "{} is not a single directory name; give a name without '/' or control characters (not \".\" or \"..\")",
            quote(dir)
        ));
    }
    Ok(())
}

fn resolve_grant(ctx: &mut Ctx, key: &str, g: GrantSection, trusted: bool) -> BuilderGrant {
    for p in &g.programs {
        if p.is_empty() || p.contains('\0') || (p.contains('/') && !p.starts_with('/')) {
            ctx.error(
                format!("{key}.programs"),
                format!(
                    "{}: give a program name (looked up on PATH) or an absolute path",
                    quote(p)
                ),
            );
        }
    }
    let mut ro_dirs = Vec::new();
    for d in &g.ro_dirs {
        let path = Path::new(d);
        if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
            ctx.error(
                format!("{key}.ro_dirs"),
                format!(
                    "{} is not an absolute path without \"..\"; give the full path, as \"/usr/local/cargo\"",
                    quote(d)
                ),
            );
        }
        ro_dirs.push(path.to_path_buf());
    }
    for (name, value) in &g.env {
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            ctx.error(
                format!("{key}.env.{}", quote(name)),
                "an environment variable's name is not empty and has no '='; neither name nor value may contain NUL",
            );
        }
    }
    let network = g.network.unwrap_or(false);
    if network && !trusted {
        ctx.error(
            format!("{key}.network"),
            "an untrusted builder's commands cannot use the network; remove network, or set trusted = true",
        );
    }
    let step_timeout = g
        .step_timeout
        .and_then(|t| positive_duration(ctx, &format!("{key}.step_timeout"), &t.0))
        .unwrap_or(DEFAULT_STEP_TIMEOUT);
    let memory_mib = g.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
    if !(1..=MAX_MEMORY_MIB).contains(&memory_mib) {
        ctx.error(
            format!("{key}.memory_mib"),
            format!(
                "{memory_mib} is out of range; give 1 to {MAX_MEMORY_MIB} (a wasm32 guest cannot use more than 4 GiB)"
            ),
        );
    }
    BuilderGrant {
        programs: g.programs,
        ro_dirs,
        env: g.env,
        network,
        step_timeout,
        memory_mib,
    }
}

fn positive_duration(ctx: &mut Ctx, key: &str, text: &str) -> Option<Duration> {
    let d = ctx.check(key, duration::parse(text))?;
    if d.is_zero() {
        ctx.error(key, format!("{text:?} is zero; give a positive duration"));
        return None;
    }
    Some(d)
}

fn builtin_names(kind: steps::Kind) -> String {
    list(
        steps::BUILTINS
            .iter()
            .filter(|b| b.kind == kind)
            .map(|b| b.name),
    )
}

/// Resolves a step or observer module: a built-in of `kind`, or `NAME@VERSION`.
fn resolve_module(module: &str, kind: steps::Kind) -> Result<ModuleSource, String> {
    if module.contains('@') {
        return ModuleRef::parse(module).map(ModuleSource::Uploaded);
    }
    let (what, other, place) = match kind {
        steps::Kind::Step => ("step", "a log observer", "list it in a step's observers"),
        steps::Kind::Observer => ("log observer", "a step", "use it as a step's module"),
    };
    match steps::find(module) {
        Some(b) if b.kind == kind => Ok(ModuleSource::Builtin(b.name)),
        Some(_) => Err(format!(
            "{} is {other}, not a {what}; {place} (built-in {what}s: {})",
            quote(module),
            builtin_names(kind)
        )),
        None => Err(format!(
            "{} is not a built-in {what} (built-in {what}s: {}); for an uploaded module write NAME@VERSION or NAME@latest",
            quote(module),
            builtin_names(kind)
        )),
    }
}

fn resolve_step(ctx: &mut Ctx, key: &str, s: StepEntry, default_timeout: Duration) -> Step {
    let module = ctx.check(
        format!("{key}.module"),
        resolve_module(&s.module, steps::Kind::Step),
    );
    let name = s.name.unwrap_or_else(|| match &module {
        Some(ModuleSource::Uploaded(m)) => m.name.clone(),
        _ => s.module.clone(),
    });
    if name.trim().is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        ctx.error(
            format!("{key}.name"),
            format!(
                "{} is not a valid step name; give 1 to 100 characters, not all spaces, without control characters",
                quote(&name)
            ),
        );
    }
    let args = Value::Object(s.args.map(check::table_to_json).unwrap_or_default());
    if let Some(b) = module.as_ref().and_then(ModuleSource::builtin)
        && let Err(e) = b.args(&args)
    {
        ctx.error(format!("{key}.args"), e);
    }
    let mut observers = Vec::new();
    for (i, o) in s.observers.into_iter().enumerate() {
        let okey = format!("{key}.observers[{i}]");
        let (module, args, log) = match o {
            ObserverEntry::Name(m) => (m, None, None),
            ObserverEntry::Table(t) => (t.module, t.args, t.log),
        };
        let mkey = if log.is_some() || args.is_some() {
            format!("{okey}.module")
        } else {
            okey.clone()
        };
        let Some(module) = ctx.check(mkey, resolve_module(&module, steps::Kind::Observer)) else {
            continue;
        };
        let log = log.unwrap_or_else(|| DEFAULT_LOG.to_owned());
        if log.trim().is_empty() {
            ctx.error(
                format!("{okey}.log"),
                "is empty; name the log to watch, as \"stdio\"",
            );
        }
        observers.push(Observer {
            module,
            args: args.map_or(Value::Null, |a| Value::Object(check::table_to_json(a))),
            log,
        });
    }
    let timeout = s
        .timeout
        .and_then(|t| positive_duration(ctx, &format!("{key}.timeout"), &t.0))
        .unwrap_or(default_timeout);
    for (field, c) in [("do_step_if", s.do_step_if.as_ref())].into_iter().chain([(
        "hide_step_if",
        match &s.hide_step_if {
            Some(kiln_protocol::build::HideIf::Condition(c)) => Some(c),
            _ => None,
        },
    )]) {
        if let Some(Err(e)) = c.map(check_condition) {
            ctx.error(format!("{key}.{field}"), e);
        }
    }
    let d = StepOptions::default();
    let options = StepOptions {
        halt_on_failure: s.halt_on_failure.unwrap_or(d.halt_on_failure),
        flunk_on_failure: s.flunk_on_failure.unwrap_or(d.flunk_on_failure),
        warn_on_failure: s.warn_on_failure.unwrap_or(d.warn_on_failure),
        flunk_on_warnings: s.flunk_on_warnings.unwrap_or(d.flunk_on_warnings),
        warn_on_warnings: s.warn_on_warnings.unwrap_or(d.warn_on_warnings),
        always_run: s.always_run.unwrap_or(d.always_run),
        do_step_if: s.do_step_if,
        hide_step_if: s.hide_step_if,
    };
    Step {
        name,
        module: module.unwrap_or(ModuleSource::Builtin("shell")),
        args,
        observers,
        timeout,
        options,
    }
}

/// Checks what can be checked of a condition before any build: each property test has
/// exactly one test, and property names are valid.
fn check_condition(c: &Condition) -> Result<(), String> {
    match c {
        Condition::Bool(_) | Condition::Rendered(_) => Ok(()),
        Condition::Property(t) => {
            kiln_protocol::props::check_property_name(&t.property)?;
            let tests = [t.equals.is_some(), t.one_of.is_some(), t.exists.is_some()];
            if tests.iter().filter(|&&b| b).count() != 1 {
                return Err(format!(
                    "the test of property {} needs exactly one of equals, in and exists",
                    quote(&t.property)
                ));
            }
            Ok(())
        }
        Condition::Not { not } => check_condition(not),
        Condition::All { all: cs } | Condition::Any { any: cs } => {
            cs.iter().try_for_each(check_condition)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hashes_verify() {
        let h = hash_token("s3cret");
        assert_eq!(
            h,
            "sha256:1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"
        );
        let auth = WorkerAuth::TokenHash(parse_token_hash(&h).unwrap());
        assert!(auth.verify("s3cret"));
        assert!(!auth.verify("s3cre"));
        let plain = WorkerAuth::Token(Secret("s3cret".into()));
        assert!(plain.verify("s3cret"));
        assert_eq!(plain.hash(), auth.hash());
        assert_eq!(format!("{plain:?}"), "Token(<redacted>)");
        assert!(parse_token_hash(&h.to_uppercase()).is_err());
    }

    #[test]
    fn workdirs() {
        assert!(check_workdir("linux-x86").is_ok());
        for bad in ["", ".", "..", "a/b", "a\nb"] {
            assert!(check_workdir(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secret_references_are_found_anywhere() {
        let v = serde_json::json!({"a": [1, {"b": "x %(secret:deploy)s y"}]});
        assert_eq!(secret_reference(&v).as_deref(), Some("%(secret:deploy)s"));
        assert_eq!(
            secret_reference(&serde_json::json!({"a": "%(prop:x)s"})),
            None
        );
    }

    #[test]
    fn modules() {
        assert_eq!(
            resolve_module("shell", steps::Kind::Step),
            Ok(ModuleSource::Builtin("shell"))
        );
        assert!(
            resolve_module("warnings", steps::Kind::Step)
                .unwrap_err()
                .starts_with(
                    "\"warnings\" is a log observer, not a step; list it in a step's observers"
                )
        );
        assert_eq!(
            resolve_module("lint@1.0", steps::Kind::Observer),
            Ok(ModuleSource::Uploaded(
                ModuleRef::parse("lint@1.0").unwrap()
            ))
        );
    }
}
