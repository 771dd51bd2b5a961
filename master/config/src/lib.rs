//! The master's configuration: `kiln.toml`, read ([`load`], [`parse`]), checked as a whole
//! (every problem is reported, with its key path and the fix), and resolved into the
//! [`Config`] the master uses: matrices expanded into builders, defaults filled, durations
//! parsed, paths absolute, references (workers, builders, schedulers, modules, policies)
//! looked up. [`Config::diff`] says what a reload changes.
//!
//! The file format and its reference documentation are in [`schema`].

mod builders;
mod check;
pub use check::check_name;
mod diff;
mod duration;
mod error;
mod globs;
mod matrix;
mod outputs;
mod refs;
mod schedulers;
pub mod schema;
pub mod tls;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

pub use builders::{
    Builder, BuilderGrant, DEFAULT_LOG, DEFAULT_MEMORY_MIB, DEFAULT_STEP_TIMEOUT, Latent,
    MAX_MEMORY_MIB, MatrixCell, ModuleSource, Observer, Requirements, Step, Worker, WorkerAuth,
    WorkerSelector, hash_token,
};
pub use diff::{Changes, ConfigDiff, RESTART_SETTINGS};
pub use error::{ConfigError, Diagnostic};
pub use globs::{FileFilter, Globs};
pub use outputs::{
    ChangeSource, ChangeSourceKind, DEFAULT_POLL_INTERVAL, DEFAULT_STATUS_CONTEXT, Forge, Lookup,
    ReportMode, Reporter, ReporterKind,
};
pub use refs::{HookChoice, ModuleRef, ModuleVersion, PolicyRef, Secret, SecretValue};
pub use schedulers::{
    ChangeFilter, CronSchedule, ForceParameter, ForceParameterKind, Scheduler, SchedulerKind,
};

use builders::BuilderSite;
use check::{Ctx, list};
use error::quote;
use refs::Choice;

/// The configuration file's usual name.
pub const FILE_NAME: &str = "kiln.toml";
/// Default HTTP address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8010";
/// Default master heartbeat interval.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Default SQLite file, next to the configuration.
pub const DEFAULT_DATABASE: &str = "kiln.sqlite";

/// A checked, resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The configuration file (absolute).
    pub path: PathBuf,
    /// Its directory, against which relative paths were resolved.
    pub dir: PathBuf,
    /// `[master]`.
    pub master: MasterConfig,
    /// Global properties.
    pub properties: BTreeMap<String, Value>,
    /// Where secrets come from.
    pub secrets: SecretsConfig,
    /// The customization hooks.
    pub hooks: Hooks,
    /// Workers, in file order.
    pub workers: Vec<Worker>,
    /// Builders: those of `[[builders]]`, then those each `[[matrix]]` generates.
    pub builders: Vec<Builder>,
    /// Schedulers.
    pub schedulers: Vec<Scheduler>,
    /// Change sources.
    pub change_sources: Vec<ChangeSource>,
    /// Reporters.
    pub reporters: Vec<Reporter>,
    /// What works but is probably not what was meant (a builder no worker can run).
    pub warnings: Vec<Diagnostic>,
}

/// `[master]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct MasterConfig {
    /// This master's name.
    pub name: String,
    /// The database URL.
    pub database: DatabaseUrl,
    /// The HTTP address.
    pub listen: SocketAddr,
    /// The public URL, ending in `/`.
    pub url: String,
    /// The web UI's title.
    pub title: String,
    /// The heartbeat interval.
    pub heartbeat: Duration,
    /// HTTPS: the certificate chain and key files, checked to load.
    pub tls: Option<TlsFiles>,
    /// What requests without an API token may do (None: nothing, not even read).
    pub anonymous: Option<kiln_protocol::api::Role>,
}

/// The files of `[master] tls_cert` and `tls_key`, absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The PEM certificate chain.
    pub cert: std::path::PathBuf,
    /// The PEM private key.
    pub key: std::path::PathBuf,
}

/// A database URL: `sqlite:///ABS/PATH?mode=rwc` for a file, or as given (`postgres://...`).
/// `Debug` and `Display` hide a password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL, password included, for connecting.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is an SQLite database.
    pub fn is_sqlite(&self) -> bool {
        self.0.starts_with("sqlite:")
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // scheme://user:password@host/db -> scheme://user:<redacted>@host/db
        if let Some((scheme, rest)) = self.0.split_once("://")
            && let Some((userinfo, host)) = rest.split_once('@')
            && let Some((user, _)) = userinfo.split_once(':')
        {
            return write!(f, "{scheme}://{user}:<redacted>@{host}");
        }
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// `[secrets]`, resolved.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SecretsConfig {
    /// A directory of one file per secret (absolute).
    pub directory: Option<PathBuf>,
    /// The prefix of environment variables holding secrets.
    pub env_prefix: Option<String>,
}

impl SecretsConfig {
    /// The environment variable that holds secret `name`, if secrets come from the
    /// environment: the prefix, then the name in upper case with `-` and `.` as `_`.
    pub fn env_var(&self, name: &str) -> Option<String> {
        let prefix = self.env_prefix.as_ref()?;
        let suffix: String = name
            .chars()
            .map(|c| match c {
                '-' | '.' => '_',
                c => c.to_ascii_uppercase(),
            })
            .collect();
        Some(format!("{prefix}{suffix}"))
    }
}

/// The customization hooks.
#[derive(Debug, Clone, PartialEq)]
pub struct Hooks {
    /// Whether a new request may be merged with a pending one.
    pub collapse_requests: HookChoice<CollapseRequests>,
    /// Which builder gets a free worker first.
    pub prioritize_builders: HookChoice<PrioritizeBuilders>,
    /// Which request of a builder is built next.
    pub next_build: HookChoice<NextBuild>,
    /// Which worker takes a build.
    pub next_worker: HookChoice<NextWorker>,
    /// A last check before a build starts.
    pub can_start_build: HookChoice<CanStartBuild>,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            collapse_requests: HookChoice::Builtin(CollapseRequests::Default),
            prioritize_builders: HookChoice::Builtin(PrioritizeBuilders::Priority),
            next_build: HookChoice::Builtin(NextBuild::Oldest),
            next_worker: HookChoice::Builtin(NextWorker::LeastBusy),
            can_start_build: HookChoice::Builtin(CanStartBuild::Always),
        }
    }
}

/// Built-in request collapsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollapseRequests {
    /// Buildbot's rules: same builder, compatible source stamps, the builder's `collapse` on.
    Default,
    /// Never collapse.
    Never,
}

/// Built-in builder ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrioritizeBuilders {
    /// Builder priority, then the oldest pending request.
    Priority,
}

/// Built-in choice of a builder's next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextBuild {
    /// Request priority, then the oldest.
    Oldest,
}

/// Built-in choice of worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextWorker {
    /// The worker running the fewest builds.
    LeastBusy,
    /// Any eligible worker, at random.
    Random,
}

/// Built-in last check before a build starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanStartBuild {
    /// Start it.
    Always,
}

impl Choice for CollapseRequests {
    const ALL: &'static [(&'static str, Self)] = &[
        ("default", CollapseRequests::Default),
        ("never", CollapseRequests::Never),
    ];
}
impl Choice for PrioritizeBuilders {
    const ALL: &'static [(&'static str, Self)] = &[("priority", PrioritizeBuilders::Priority)];
}
impl Choice for NextBuild {
    const ALL: &'static [(&'static str, Self)] = &[("oldest", NextBuild::Oldest)];
}
impl Choice for NextWorker {
    const ALL: &'static [(&'static str, Self)] = &[
        ("least-busy", NextWorker::LeastBusy),
        ("random", NextWorker::Random),
    ];
}
impl Choice for CanStartBuild {
    const ALL: &'static [(&'static str, Self)] = &[("always", CanStartBuild::Always)];
}

/// Counts, for `kiln checkconfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Workers.
    pub workers: usize,
    /// Builders, generated ones included.
    pub builders: usize,
    /// Builders generated by matrices.
    pub matrix_builders: usize,
    /// Schedulers.
    pub schedulers: usize,
    /// Change sources.
    pub change_sources: usize,
    /// Reporters.
    pub reporters: usize,
    /// Warnings.
    pub warnings: usize,
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `2 workers, 6 builders (4 from matrices), 3 schedulers, 1 change source, 0 reporters`,
/// and the warnings if any.
impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, {}",
            count(self.workers, "worker", "workers"),
            count(self.builders, "builder", "builders")
        )?;
        if self.matrix_builders > 0 {
            write!(f, " ({} from matrices)", self.matrix_builders)?;
        }
        write!(
            f,
            ", {}, {}, {}",
            count(self.schedulers, "scheduler", "schedulers"),
            count(self.change_sources, "change source", "change sources"),
            count(self.reporters, "reporter", "reporters")
        )?;
        if self.warnings > 0 {
            write!(f, ", {}", count(self.warnings, "warning", "warnings"))?;
        }
        Ok(())
    }
}

impl Config {
    /// The builder with this name.
    pub fn builder(&self, name: &str) -> Option<&Builder> {
        self.builders.iter().find(|b| b.name == name)
    }

    /// The worker with this name.
    pub fn worker(&self, name: &str) -> Option<&Worker> {
        self.workers.iter().find(|w| w.name == name)
    }

    /// The scheduler with this name.
    pub fn scheduler(&self, name: &str) -> Option<&Scheduler> {
        self.schedulers.iter().find(|s| s.name == name)
    }

    /// The change source with this name.
    pub fn change_source(&self, name: &str) -> Option<&ChangeSource> {
        self.change_sources.iter().find(|c| c.name == name)
    }

    /// The reporter with this name.
    pub fn reporter(&self, name: &str) -> Option<&Reporter> {
        self.reporters.iter().find(|r| r.name == name)
    }

    /// The workers that may run a builder's builds.
    pub fn workers_for<'a>(&'a self, builder: &'a Builder) -> impl Iterator<Item = &'a Worker> {
        self.workers.iter().filter(|w| builder.accepts(w))
    }

    /// Counts of what is configured.
    pub fn summary(&self) -> Summary {
        Summary {
            workers: self.workers.len(),
            builders: self.builders.len(),
            matrix_builders: self.builders.iter().filter(|b| b.matrix.is_some()).count(),
            schedulers: self.schedulers.len(),
            change_sources: self.change_sources.len(),
            reporters: self.reporters.len(),
            warnings: self.warnings.len(),
        }
    }

    /// What changes from this configuration to `new` (on a reload).
    pub fn diff(&self, new: &Config) -> ConfigDiff {
        ConfigDiff::between(self, new)
    }
}

/// Reads and resolves the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::unreadable(path.display().to_string(), &e))?;
    parse(&text, path)
}

/// Resolves a configuration from its text. `origin` is the file it came from: messages name
/// it, and relative paths are resolved against its directory.
pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    let file = origin.display().to_string();
    let raw: schema::File =
        toml::from_str(text).map_err(|e| ConfigError::from_toml(file.clone(), text, &e))?;
    let path = std::path::absolute(origin).unwrap_or_else(|_| origin.to_path_buf());
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let mut ctx = Ctx::new(file, dir);
    let config = resolve(&mut ctx, raw, path);
    let (errors, warnings) = ctx.finish();
    if errors.is_empty() {
        Ok(Config { warnings, ..config })
    } else {
        Err(ConfigError::new(errors))
    }
}

/// Where a named entry is in the file: `workers."w1"` when its name is valid and unique,
/// `workers[3]` otherwise. Records problems with the name.
fn entry_key(
    ctx: &mut Ctx,
    section: &str,
    what: &str,
    index: usize,
    name: &str,
    seen: &mut Vec<(String, String)>,
) -> String {
    let at = format!("{section}[{index}]");
    if let Err(e) = check_name(name) {
        ctx.error(format!("{at}.name"), e);
        return at;
    }
    if let Some((_, first)) = seen.iter().find(|(n, _)| n == name) {
        ctx.error(
            format!("{at}.name"),
            format!(
                "{what} {} is already defined by {first}; names must be unique",
                quote(name)
            ),
        );
        return at;
    }
    seen.push((name.to_owned(), at));
    format!("{section}.{}", quote(name))
}

fn resolve(ctx: &mut Ctx, raw: schema::File, path: PathBuf) -> Config {
    let master = resolve_master(ctx, raw.master);
    let properties = check::properties(ctx, "properties", raw.properties);
    let secrets = resolve_secrets(ctx, raw.secrets);
    let hooks = resolve_hooks(ctx, raw.hooks);

    let mut seen = Vec::new();
    let mut workers = Vec::new();
    for (i, w) in raw.workers.into_iter().enumerate() {
        let key = entry_key(ctx, "workers", "worker", i, &w.name, &mut seen);
        workers.push(builders::resolve_worker(ctx, &key, w));
    }

    // Builders: [[builders]], then each matrix's. Names are unique across both.
    let mut seen = Vec::new();
    let mut candidates = Vec::new();
    for (i, b) in raw.builders.into_iter().enumerate() {
        let Some(name) = b.name.clone() else {
            ctx.error(format!("builders[{i}]"), "has no name; add name = \"...\"");
            continue;
        };
        let key = entry_key(ctx, "builders", "builder", i, &name, &mut seen);
        candidates.push((key, false, name, b, None));
    }
    for (i, m) in raw.matrix.into_iter().enumerate() {
        for g in matrix::expand(ctx, i, m) {
            let at = format!("matrix[{i}]");
            if let Err(e) = check_name(&g.name) {
                ctx.error(format!("{at}.name"), e);
            } else if let Some((_, first)) = seen.iter().find(|(n, _)| *n == g.name) {
                ctx.error(
                    format!("{at}.name"),
                    format!(
                        "generates builder {}, which is already defined by {first}; names must be unique",
                        quote(&g.name)
                    ),
                );
            } else {
                seen.push((g.name.clone(), at.clone()));
            }
            candidates.push((format!("{at}.builder"), true, g.name, g.entry, Some(g.cell)));
        }
    }
    let mut builder_keys = Vec::new();
    let mut builders = Vec::new();
    for (key, generated, name, entry, cell) in candidates {
        let site = BuilderSite {
            key: &key,
            generated,
        };
        builders.push(builders::resolve_builder(
            ctx, &site, name, entry, &workers, cell,
        ));
        builder_keys.push(key);
    }
    for (i, b) in builders.iter().enumerate() {
        if let Some(first) = builders[..i]
            .iter()
            .find(|o| o.workdir == b.workdir && o.name != b.name)
        {
            let who = if builders[i].matrix.is_some() {
                format!("builder {}: ", quote(&b.name))
            } else {
                String::new()
            };
            ctx.error(
                format!("{}.workdir", builder_keys[i]),
                format!(
                    "{who}{} is also the workdir of builder {}; builds of both on one worker would share files, so give each its own",
                    quote(&b.workdir),
                    quote(&first.name)
                ),
            );
        }
    }
    let mut builder_names: Vec<&str> = Vec::new();
    for b in &builders {
        if !builder_names.contains(&b.name.as_str()) {
            builder_names.push(&b.name);
        }
    }

    let mut seen = Vec::new();
    let mut schedulers = Vec::new();
    for (i, s) in raw.schedulers.into_iter().enumerate() {
        let key = entry_key(ctx, "schedulers", "scheduler", i, &s.name, &mut seen);
        let resolved = schedulers::resolve(ctx, &key, s, &builder_names);
        schedulers.push((key, resolved));
    }
    schedulers::check_dependents(ctx, &schedulers);
    check_triggers(ctx, &builders, &builder_keys, &schedulers);
    let schedulers: Vec<Scheduler> = schedulers.into_iter().map(|(_, s)| s).collect();

    let mut seen = Vec::new();
    let mut change_sources = Vec::new();
    for (i, c) in raw.change_sources.into_iter().enumerate() {
        let key = entry_key(
            ctx,
            "change_sources",
            "change source",
            i,
            &c.name,
            &mut seen,
        );
        change_sources.push(outputs::resolve_change_source(ctx, &key, c));
    }
    let mut seen = Vec::new();
    let mut reporters = Vec::new();
    for (i, r) in raw.reporters.into_iter().enumerate() {
        let key = entry_key(ctx, "reporters", "reporter", i, &r.name, &mut seen);
        reporters.push(outputs::resolve_reporter(ctx, &key, r, &builder_names));
    }

    Config {
        dir: ctx.dir.clone(),
        path,
        master,
        properties,
        secrets,
        hooks,
        workers,
        builders,
        schedulers,
        change_sources,
        reporters,
        warnings: Vec::new(),
    }
}

/// Trigger steps must name triggerable schedulers.
fn check_triggers(
    ctx: &mut Ctx,
    builders: &[Builder],
    keys: &[String],
    schedulers: &[(String, Scheduler)],
) {
    let triggerable: Vec<&str> = schedulers
        .iter()
        .filter(|(_, s)| s.kind == SchedulerKind::Triggerable)
        .map(|(_, s)| s.name.as_str())
        .collect();
    for (b, key) in builders.iter().zip(keys) {
        for (j, step) in b.steps.iter().enumerate() {
            if step.module != ModuleSource::Builtin("trigger") {
                continue;
            }
            let Some(Value::Array(names)) = step.args.get("schedulers") else {
                continue;
            };
            for name in names.iter().filter_map(Value::as_str) {
                if name.contains("%(") || triggerable.contains(&name) {
                    continue;
                }
                let who = if b.matrix.is_some() {
                    format!("builder {}: ", quote(&b.name))
                } else {
                    String::new()
                };
                ctx.error(
                    format!("{key}.steps[{j}].args.schedulers"),
                    format!(
                        "{who}names scheduler {}, which is not a triggerable scheduler (triggerable: {})",
                        quote(name),
                        list(&triggerable)
                    ),
                );
            }
        }
    }
}

fn resolve_master(ctx: &mut Ctx, m: schema::MasterSection) -> MasterConfig {
    let name = m.name.unwrap_or_else(host_name);
    if let Err(e) = check_name(&name) {
        ctx.error("master.name", e);
    }
    let database = database_url(ctx, m.database.as_deref());
    let listen_text = m.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen = match listen_text.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            ctx.error(
                "master.listen",
                format!(
                    "{} is not an address and port; give an IP address and port, as \"127.0.0.1:8010\", \"0.0.0.0:8010\" or \"[::]:8010\"",
                    quote(listen_text)
                ),
            );
            DEFAULT_LISTEN.parse().expect("a valid address")
        }
    };
    let url_given = m.url.is_some();
    let url = match m.url {
        Some(u) => {
            outputs::check_url(ctx, "master.url", &u);
            if u.ends_with('/') { u } else { format!("{u}/") }
        }
        None => {
            let host = if listen.ip().is_unspecified() {
                host_name()
            } else if listen.is_ipv6() {
                format!("[{}]", listen.ip())
            } else {
                listen.ip().to_string()
            };
            format!("http://{host}:{}/", listen.port())
        }
    };
    let heartbeat = m
        .heartbeat
        .and_then(|h| {
            ctx.check(
                "master.heartbeat",
                duration::parse_at_least(&h.0, Duration::from_secs(1)),
            )
        })
        .unwrap_or(DEFAULT_HEARTBEAT);
    let tls = match (m.tls_cert, m.tls_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let files = TlsFiles {
                cert: ctx.dir.join(cert),
                key: ctx.dir.join(key),
            };
            match crate::tls::server_config(&files) {
                Ok(_) => Some(files),
                Err((setting, e)) => {
                    ctx.error(format!("master.{setting}"), e);
                    None
                }
            }
        }
        (Some(_), None) => {
            ctx.error(
                "master.tls_key",
                "is missing: tls_cert needs the PEM file of its private key",
            );
            None
        }
        (None, Some(_)) => {
            ctx.error(
                "master.tls_cert",
                "is missing: tls_key needs the PEM file of its certificate chain",
            );
            None
        }
    };
    let url = match (&tls, url.strip_prefix("http://")) {
        // The derived URL follows the scheme actually served.
        (Some(_), Some(rest)) if !url_given => format!("https://{rest}"),
        _ => url,
    };
    let anonymous = match m.anonymous.as_deref() {
        None => Some(kiln_protocol::api::Role::Read),
        Some("none") => None,
        Some(text) => ctx
            .check(
                "master.anonymous",
                kiln_protocol::api::Role::parse(text)
                    .map(Some)
                    .map_err(|e| format!("{e}, or \"none\" to refuse requests without a token")),
            )
            .flatten(),
    };
    MasterConfig {
        name,
        database,
        listen,
        url,
        title: m.title.unwrap_or_else(|| "Kiln".to_owned()),
        heartbeat,
        tls,
        anonymous,
    }
}

/// The host name (for the master's default name), or `kiln` if it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| check_name(h).is_ok())
        .unwrap_or_else(|| "kiln".to_owned())
}

/// `sqlite://` and the absolute path, with the characters SQLite URLs give meaning to
/// escaped, and `mode=rwc` so the file is created on first start.
fn sqlite_url(ctx: &mut Ctx, path: &Path) -> DatabaseUrl {
    let Some(text) = path.to_str() else {
        ctx.error(
            "master.database",
            format!("{} is not UTF-8; choose another path", path.display()),
        );
        return DatabaseUrl(String::new());
    };
    let escaped = text
        .replace('%', "%25")
        .replace('?', "%3F")
        .replace('#', "%23");
    DatabaseUrl(format!("sqlite://{escaped}?mode=rwc"))
}

fn database_url(ctx: &mut Ctx, given: Option<&str>) -> DatabaseUrl {
    let dir = ctx.dir.clone();
    let Some(given) = given else {
        return sqlite_url(ctx, &dir.join(DEFAULT_DATABASE));
    };
    if given.starts_with("postgres://") || given.starts_with("postgresql://") {
        return DatabaseUrl(given.to_owned());
    }
    if let Some(rest) = given.strip_prefix("sqlite:") {
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let (file, query) = match rest.split_once('?') {
            Some((f, q)) => (f, Some(q)),
            None => (rest, None),
        };
        if file.is_empty() || file == ":memory:" || file.starts_with('/') {
            return DatabaseUrl(given.to_owned());
        }
        // A relative file is relative to the configuration, like a plain path.
        let base = sqlite_url(ctx, &dir);
        let base = base.0.trim_end_matches("?mode=rwc");
        let query = query.map(|q| format!("?{q}")).unwrap_or_default();
        return DatabaseUrl(format!("{base}/{file}{query}"));
    }
    if given.trim().is_empty() || given.contains("://") {
        ctx.error(
            "master.database",
            format!(
                "{} is not a supported database; give a file path (SQLite), \"sqlite:PATH\" or \"postgres://USER:PASSWORD@HOST/DATABASE\"",
                quote(given)
            ),
        );
        return DatabaseUrl(String::new());
    }
    sqlite_url(ctx, &dir.join(given))
}

fn resolve_secrets(ctx: &mut Ctx, s: schema::SecretsSection) -> SecretsConfig {
    let directory = s.directory.map(|d| ctx.dir.join(d));
    if let Some(d) = &directory
        && !d.is_dir()
    {
        ctx.warn(
            "secrets.directory",
            format!(
                "{} is not a directory (yet); secrets will be looked up in it when builds need them",
                d.display()
            ),
        );
    }
    if let Some(p) = &s.env_prefix
        && (p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        ctx.error(
            "secrets.env_prefix",
            format!(
                "{} is not an environment variable prefix; use letters, digits and '_', as \"KILN_SECRET_\"",
                quote(p)
            ),
        );
    }
    SecretsConfig {
        directory,
        env_prefix: s.env_prefix,
    }
}

fn hook<B: Choice>(ctx: &mut Ctx, key: &str, given: Option<String>, default: B) -> HookChoice<B> {
    let Some(text) = given else {
        return HookChoice::Builtin(default);
    };
    let dir = ctx.dir.clone();
    ctx.check(key, refs::parse_hook(&text, &dir))
        .unwrap_or(HookChoice::Builtin(default))
}

fn resolve_hooks(ctx: &mut Ctx, h: schema::HooksSection) -> Hooks {
    Hooks {
        collapse_requests: hook(
            ctx,
            "hooks.collapse_requests",
            h.collapse_requests,
            CollapseRequests::Default,
        ),
        prioritize_builders: hook(
            ctx,
            "hooks.prioritize_builders",
            h.prioritize_builders,
            PrioritizeBuilders::Priority,
        ),
        next_build: hook(ctx, "hooks.next_build", h.next_build, NextBuild::Oldest),
        next_worker: hook(
            ctx,
            "hooks.next_worker",
            h.next_worker,
            NextWorker::LeastBusy,
        ),
        can_start_build: hook(
            ctx,
            "hooks.can_start_build",
            h.can_start_build,
            CanStartBuild::Always,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Config {
        parse(text, Path::new("/etc/kiln/kiln.toml")).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn an_empty_file_has_defaults() {
        let c = parse_ok("");
        assert_eq!(c.path, Path::new("/etc/kiln/kiln.toml"));
        assert_eq!(
            c.master.database.as_str(),
            "sqlite:///etc/kiln/kiln.sqlite?mode=rwc"
        );
        assert_eq!(c.master.listen, "127.0.0.1:8010".parse().unwrap());
        assert_eq!(c.master.url, "http://127.0.0.1:8010/");
        assert_eq!(c.master.heartbeat, DEFAULT_HEARTBEAT);
        assert_eq!(c.master.title, "Kiln");
        assert_eq!(c.hooks, Hooks::default());
        assert_eq!(
            c.summary().to_string(),
            "0 workers, 0 builders, 0 schedulers, 0 change sources, 0 reporters"
        );
    }

    #[test]
    fn databases() {
        let db = |d: &str| {
            parse_ok(&format!("[master]\ndatabase = {d:?}"))
                .master
                .database
                .as_str()
                .to_owned()
        };
        assert_eq!(db("data/k.db"), "sqlite:///etc/kiln/data/k.db?mode=rwc");
        assert_eq!(db("/var/lib/k#1.db"), "sqlite:///var/lib/k%231.db?mode=rwc");
        assert_eq!(
            db("sqlite:k.db?mode=rwc"),
            "sqlite:///etc/kiln/k.db?mode=rwc"
        );
        assert_eq!(db("sqlite:///abs/k.db"), "sqlite:///abs/k.db");
        assert_eq!(db("sqlite::memory:"), "sqlite::memory:");
        let pg = parse_ok("[master]\ndatabase = \"postgres://kiln:pw@db/kiln\"");
        assert_eq!(pg.master.database.as_str(), "postgres://kiln:pw@db/kiln");
        assert_eq!(
            format!("{:?}", pg.master.database),
            "DatabaseUrl(postgres://kiln:<redacted>@db/kiln)"
        );
        assert!(!format!("{pg:?}").contains("pw@"));
    }

    #[test]
    fn urls_derive_from_listen() {
        let url = |l: &str| parse_ok(&format!("[master]\nlisten = {l:?}")).master.url;
        assert_eq!(url("[::1]:9000"), "http://[::1]:9000/");
        assert_eq!(url("10.0.0.2:80"), "http://10.0.0.2:80/");
        assert!(url("0.0.0.0:8010").ends_with(":8010/"));
        let given = parse_ok("[master]\nurl = \"https://ci.example.org\"");
        assert_eq!(given.master.url, "https://ci.example.org/");
    }

    #[test]
    fn tls_files_are_loaded_at_check_time_and_problems_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        let check = |text: &str| parse(text, &path).map_err(|e| e.to_string());
        let cert = rcgen::generate_simple_self_signed(vec!["ci.example.org".into()]).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("junk.pem"), "junk\n").unwrap();
        let c = check("[master]\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"").unwrap();
        assert_eq!(c.master.tls.unwrap().cert, dir.path().join("cert.pem"));
        assert!(c.master.url.starts_with("https://"), "{}", c.master.url);
        let e = check("[master]\ntls_cert = \"cert.pem\"").unwrap_err();
        assert!(e.contains("master.tls_key: is missing"), "{e}");
        let e = check("[master]\ntls_key = \"key.pem\"").unwrap_err();
        assert!(e.contains("master.tls_cert: is missing"), "{e}");
        let e = check("[master]\ntls_cert = \"junk.pem\"\ntls_key = \"key.pem\"").unwrap_err();
        assert!(
            e.contains("master.tls_cert") && e.contains("no certificate found"),
            "{e}"
        );
        let e = check("[master]\ntls_cert = \"cert.pem\"\ntls_key = \"cert.pem\"").unwrap_err();
        assert!(
            e.contains("master.tls_key") && e.contains("private key"),
            "{e}"
        );
        let e = check("[master]\ntls_cert = \"none.pem\"\ntls_key = \"key.pem\"").unwrap_err();
        assert!(
            e.contains("master.tls_cert") && e.contains("none.pem"),
            "{e}"
        );
    }

    #[test]
    fn secrets_in_the_environment_are_named_by_the_prefix() {
        let s = SecretsConfig {
            directory: None,
            env_prefix: Some("KILN_TEST_SECRET_".into()),
        };
        assert_eq!(
            s.env_var("gh-token.v2").as_deref(),
            Some("KILN_TEST_SECRET_GH_TOKEN_V2")
        );
    }
}
