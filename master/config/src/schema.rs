//! The `kiln.toml` file format, as written: the structs serde reads. Their doc comments are the
//! configuration reference. Values are kept as written (durations as text, names unchecked);
//! `super::resolve` checks them and builds the [`super::Config`] the master uses.

use std::collections::BTreeMap;
use std::fmt;

use kiln_protocol::build::{Condition, HideIf};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// The whole file. Every section is optional; a file with only workers, builders and a
/// scheduler is a working farm.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `[master]`: this master's name, database, address and public URL.
    #[serde(default)]
    pub master: MasterSection,
    /// `[properties]`: global properties, given to every build (any TOML values).
    #[serde(default)]
    pub properties: toml::Table,
    /// `[secrets]`: where `%(secret:NAME)s` values come from.
    #[serde(default)]
    pub secrets: SecretsSection,
    /// `[hooks]`: Buildbot's customization hooks, built in or as policy components.
    #[serde(default)]
    pub hooks: HooksSection,
    /// `[[workers]]`: the machines that may connect and run builds.
    #[serde(default)]
    pub workers: Vec<WorkerEntry>,
    /// `[[builders]]`: one per kind of build.
    #[serde(default)]
    pub builders: Vec<BuilderEntry>,
    /// `[[matrix]]`: builders generated from a template, one per combination of axis values.
    #[serde(default)]
    pub matrix: Vec<MatrixEntry>,
    /// `[[schedulers]]`: when builds happen.
    #[serde(default)]
    pub schedulers: Vec<SchedulerEntry>,
    /// `[[change_sources]]`: where changes come from (pollers and webhooks).
    #[serde(default)]
    pub change_sources: Vec<ChangeSourceEntry>,
    /// `[[reporters]]`: who is told about builds.
    #[serde(default)]
    pub reporters: Vec<ReporterEntry>,
}

/// `[master]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterSection {
    /// This master's name among several sharing one database. Default: the host name.
    pub name: Option<String>,
    /// The database: a file path (SQLite; relative to the directory of `kiln.toml`), or a URL
    /// `sqlite:PATH` or `postgres://user:password@host/db`. Default: `kiln.sqlite` next to
    /// `kiln.toml`.
    pub database: Option<String>,
    /// Address and port of the HTTP server (API, web UI, worker connections).
    /// Default: `127.0.0.1:8010`. Use `0.0.0.0:8010` or `[::]:8010` to accept other machines.
    pub listen: Option<String>,
    /// The URL users and workers reach this master at, used in links and notifications.
    /// Default: `http://` and the listen address (the host name if listening on all addresses).
    pub url: Option<String>,
    /// The title of the web UI. Default: `Kiln`.
    pub title: Option<String>,
    /// How often this master records that it is alive, so that other masters sharing the
    /// database can take over its work when it stops. Default: `10s`.
    pub heartbeat: Option<DurationText>,
    /// Serve HTTPS (and `wss://` for workers): a PEM file holding the certificate chain,
    /// server certificate first (relative to the directory of `kiln.toml`). Needs `tls_key`.
    pub tls_cert: Option<String>,
    /// The PEM file holding the private key of `tls_cert`.
    pub tls_key: Option<String>,
    /// What requests without an API token may do: `"read"` (the default), `"none"`, or a role
    /// (`"force"`, `"upload"`, `"admin"`) for a farm only trusted people can reach.
    pub anonymous: Option<String>,
}

/// `[secrets]`: secrets are looked up by name, first in the directory, then in the
/// environment. Secrets are granted only to trusted builders and are redacted from every log.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsSection {
    /// A directory holding one file per secret, named after the secret (relative to the
    /// directory of `kiln.toml`). A trailing newline in a file is not part of the secret.
    pub directory: Option<String>,
    /// Secrets are also read from environment variables: with `KILN_SECRET_`, secret
    /// `deploy_key` comes from `KILN_SECRET_DEPLOY_KEY` (upper case, `-` and `.` as `_`).
    pub env_prefix: Option<String>,
}

/// `[hooks]`: each is a built-in choice, an uploaded policy component
/// (`"module:NAME@VERSION"`, `@latest` allowed) or a component file
/// (`"policy:PATH.wasm"`, relative to the directory of `kiln.toml`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksSection {
    /// Whether a new build request may be merged with a pending one: `"default"` (Buildbot's
    /// rules: same builder, compatible source stamps, builder's `collapse` on) or `"never"`.
    pub collapse_requests: Option<String>,
    /// Which builder gets a free worker first: `"priority"` (builder priority, then the oldest
    /// request).
    pub prioritize_builders: Option<String>,
    /// Which of a builder's requests is built next: `"oldest"` (request priority, then age).
    pub next_build: Option<String>,
    /// Which eligible worker takes a build: `"least-busy"` or `"random"`.
    pub next_worker: Option<String>,
    /// A last check before a build starts on a worker: `"always"` (start it).
    pub can_start_build: Option<String>,
}

/// `[[workers]]`: a worker the master accepts. The worker connects with its name and token.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerEntry {
    /// The worker's name (letters, digits, `-`, `_`, `.`); `kiln-worker --name`.
    pub name: String,
    /// The token the worker presents (`kiln-worker --token`). Give this or `token_hash`.
    pub token: Option<Secret>,
    /// The SHA-256 of the token instead of the token: `"sha256:"` and 64 lowercase hex digits
    /// (`printf %s "$TOKEN" | sha256sum`). Keeps the token out of this file.
    pub token_hash: Option<String>,
    /// The worker's architecture (`x86_64`, `aarch64`), matched by builders' `requires.arch`.
    pub arch: Option<String>,
    /// The worker's operating system (`linux`, `freebsd`), matched by `requires.os`.
    pub os: Option<String>,
    /// Free-form capabilities (`big`, `gpu`), matched by `requires.tags`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// How many builds the worker runs at once, at least 1. Default: 1.
    pub max_builds: Option<u32>,
    /// A sandbox-mode worker (`kiln-worker --sandbox`): confines every command, so it may take
    /// untrusted builds. Default: false.
    pub sandbox: Option<bool>,
    /// Properties given to every build on this worker.
    #[serde(default)]
    pub properties: toml::Table,
    /// A latent worker: the master starts it when builds wait for it and stops it when it
    /// has been idle. Needs `token` (the master passes it to the worker it starts).
    pub latent: Option<LatentEntry>,
}

/// `[workers.latent]`: how the master starts and stops a latent worker.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatentEntry {
    /// `"local"`: a `kiln-worker` child process of the master on this machine.
    pub kind: String,
    /// Stop it after this long without a build. Default: "10m".
    pub idle_timeout: Option<String>,
    /// Its base directory. Default: `workers/NAME` next to the configuration.
    pub workdir: Option<std::path::PathBuf>,
    /// The `kiln-worker` program. Default: the one next to `kiln`.
    pub program: Option<std::path::PathBuf>,
}

/// `[[builders]]` (and the template `[matrix.builder]`): a named queue for one kind of build.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BuilderEntry {
    /// The builder's name (letters, digits, `-`, `_`, `.`). Not given in `[matrix.builder]`,
    /// whose builders are named by the matrix's `name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// One line for the web UI.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The workers that may run this builder's builds, by name. Give this or `requires`, or
    /// neither to let any worker run them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<String>>,
    /// The capabilities a worker needs to run this builder's builds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requires: Option<Requires>,
    /// Trusted builds may use secrets and the network and run on ordinary workers. Untrusted
    /// builds (from forks, from other tenants) run only on sandbox workers, without secrets or
    /// network. Default: true.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted: Option<bool>,
    /// Let this trusted builder's builds also run on sandbox workers. Default: false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_sandbox_workers: Option<bool>,
    /// Merge compatible pending requests into one build (Buildbot's collapsing). Default: true.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collapse: Option<bool>,
    /// Builders with a higher priority get free workers first. Default: 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// The build directory on the worker: one path component. Default: the builder's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Tags for the web UI and for reporters' filters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Properties given to every build of this builder.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub properties: toml::Table,
    /// What the builder's steps may use.
    #[serde(default)]
    pub grant: GrantSection,
    /// The steps, run in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepEntry>,
}

/// `requires = { ... }`: every given capability must match the worker's.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Requires {
    /// The worker's `arch` must be this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// The worker's `os` must be this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// The worker must have every one of these tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// `[builders.grant]`: everything the builder's steps may touch beyond their workdir.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrantSection {
    /// Programs the steps may run: names looked up on `PATH`, or absolute paths. Granting a
    /// shell (`sh`, `bash`) grants everything the shell can run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<String>,
    /// Directories the steps may read (a toolchain, say): absolute paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ro_dirs: Vec<String>,
    /// Environment variables of the steps and their commands.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Let commands use the network (trusted builders only). Default: false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<bool>,
    /// The deadline of each step, unless the step gives its own `timeout`. Default: `1h`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_timeout: Option<DurationText>,
    /// The memory a step (and each of its observers) may use, in MiB, 1 to 4096.
    /// Default: 512.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
}

/// `[[builders.steps]]`: one step, with Buildbot's step options.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepEntry {
    /// A built-in step (`shell`, `compile`, `test`, `git`, ...; `kiln step list`) or an
    /// uploaded module, `NAME@VERSION` or `NAME@latest`.
    pub module: String,
    /// The step's name in the build, unique within the builder. Default: the module's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The step's arguments (see the step's documentation). Strings may use
    /// `%(prop:NAME)s`, `%(prop:NAME:-default)s` and, in trusted builders, `%(secret:NAME)s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<toml::Table>,
    /// Log observers watching the step's output, besides those the step brings: a built-in
    /// observer's name, or `{ module = ..., args = {...}, log = "stdio" }`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub observers: Vec<ObserverEntry>,
    /// The step's deadline, instead of the grant's `step_timeout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationText>,
    /// On FAILURE, run no further steps (except those with `always_run`). Default: false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halt_on_failure: Option<bool>,
    /// On FAILURE, the build fails. Default: true.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flunk_on_failure: Option<bool>,
    /// On FAILURE, the build is at least WARNINGS. Default: false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warn_on_failure: Option<bool>,
    /// On WARNINGS, the build fails. Default: false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flunk_on_warnings: Option<bool>,
    /// On WARNINGS, the build is at least WARNINGS. Default: true.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warn_on_warnings: Option<bool>,
    /// Run even after an earlier step halted the build. Default: false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub always_run: Option<bool>,
    /// Run only if this condition holds, otherwise the step is SKIPPED: `true`/`false`, a
    /// string such as `"%(prop:deploy:-)s"`, `{ property = NAME, equals = V }`,
    /// `{ property = NAME, in = [...] }`, `{ property = NAME, exists = true }`,
    /// `{ not = C }`, `{ all = [...] }` or `{ any = [...] }`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub do_step_if: Option<Condition>,
    /// Hide the step in the web UI: `true`, a list of results (`["SKIPPED", "SUCCESS"]`) or a
    /// condition as for `do_step_if`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hide_step_if: Option<HideIf>,
}

/// An observer: a built-in observer's name, or a table.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ObserverEntry {
    /// A built-in observer (or `NAME@VERSION`) with no arguments, on the `stdio` log.
    Name(String),
    /// An observer with arguments or on another log.
    Table(ObserverTable),
}

/// `{ module = ..., args = {...}, log = ... }`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ObserverTable {
    /// A built-in observer (`line-counter`, `warnings`, `test-results`, `regex`) or an
    /// uploaded one, `NAME@VERSION` or `NAME@latest`.
    pub module: String,
    /// The observer's arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<toml::Table>,
    /// The log it watches. Default: `stdio`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

// By hand rather than `#[serde(untagged)]`: an untagged enum would replace the table's own
// error ("unknown field `modul`", with its position) by "did not match any variant".
impl<'de> Deserialize<'de> for ObserverEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ObserverEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an observer's name or { module = ..., args = {...}, log = ... }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ObserverEntry, E> {
                Ok(ObserverEntry::Name(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ObserverEntry, A::Error> {
                ObserverTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(ObserverEntry::Table)
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// `[[matrix]]`: generates one builder per combination of the axes' values.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixEntry {
    /// The generated builders' names: a template using every axis, as `"test-{os}-{rust}"`.
    pub name: String,
    /// The axes and their values, as `{ os = ["linux", "freebsd"], rust = ["stable"] }`.
    /// Combinations are generated in the order of the axis names.
    pub axes: BTreeMap<String, Vec<String>>,
    /// Combinations to leave out. Each entry gives values for some axes and leaves out every
    /// combination that has them all: `{ os = "freebsd" }` leaves out every FreeBSD builder.
    #[serde(default)]
    pub exclude: Vec<BTreeMap<String, String>>,
    /// Extra combinations, with a value for every axis (values need not be among the axis's).
    #[serde(default)]
    pub include: Vec<BTreeMap<String, String>>,
    /// The builder template: the fields of `[[builders]]` except `name`. `{AXIS}` in any
    /// string value is replaced by the axis's value (`{{` and `}}` are literal braces; `${VAR}` is
    /// left alone for shells). Each builder also gets its axis values as properties.
    pub builder: BuilderEntry,
}

/// `[[schedulers]]`: decides when builds happen. `type` picks the kind; each kind takes the
/// common fields plus its own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerEntry {
    /// The scheduler's name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// `single-branch`, `any-branch`, `periodic`, `nightly`, `force`, `triggerable`,
    /// `dependent` or `try`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The builders it starts builds on: names, or globs such as `"test-*"` (which must match
    /// at least one builder). Required, not empty.
    pub builders: Option<Vec<String>>,
    /// Properties given to the builds it starts.
    #[serde(default)]
    pub properties: toml::Table,
    /// The reason shown for its builds; may use `%(prop:NAME)s`.
    pub reason: Option<String>,
    /// single-branch: the branch to build (required). nightly: the branch to build (default:
    /// the repository's default branch).
    pub branch: Option<String>,
    /// any-branch: the branches to build, as globs (`"release/*"`). Default: every branch.
    pub branches: Option<Vec<String>>,
    /// single-branch, any-branch: only changes to this repository URL.
    pub repository: Option<String>,
    /// single-branch, any-branch: only changes of this project.
    pub project: Option<String>,
    /// single-branch, any-branch: only changes of this codebase.
    pub codebase: Option<String>,
    /// single-branch, any-branch: only changes of this category.
    pub category: Option<String>,
    /// single-branch, any-branch: wait until no change has arrived for this long, then build
    /// them all at once. Default: `0s` (build each change).
    pub tree_stable_timer: Option<DurationText>,
    /// single-branch, any-branch: the files that matter, as globs (`"src/**"`); a leading `!`
    /// excludes (`"!docs/**"`). A change touching no important file is built only when an
    /// important change comes (or never, with `only_important`).
    pub file_is_important: Option<Vec<String>>,
    /// single-branch, any-branch: ignore changes with no important file. Default: false.
    pub only_important: Option<bool>,
    /// single-branch, any-branch: a change-filter policy component, `"module:NAME@VERSION"`
    /// or `"policy:PATH.wasm"`.
    pub policy: Option<String>,
    /// periodic: the time between builds, at least `1s`. Required.
    pub interval: Option<DurationText>,
    /// periodic, nightly: build only if a change arrived since the last build. Default: false.
    pub only_if_changed: Option<bool>,
    /// nightly: when, as a five-field cron expression (`"0 3 * * 1-5"`: 03:00 on weekdays).
    /// Required.
    pub cron: Option<String>,
    /// nightly: the time zone of `cron`, as `"Europe/Paris"`. Default: `UTC`.
    pub timezone: Option<String>,
    /// force: the parameters a user fills in (a `reason` parameter is always there).
    pub parameters: Option<Vec<ForceParameterEntry>>,
    /// dependent: the scheduler whose successful builds start this one's. Required.
    pub upstream: Option<String>,
    /// try: the users allowed to send try jobs. Default: every authenticated user.
    pub users: Option<Vec<String>>,
}

/// A parameter of a force scheduler: becomes a property of the forced build.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForceParameterEntry {
    /// The parameter's name, which is also the property's.
    pub name: String,
    /// `string`, `int`, `bool` or `choice`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The label in the web UI. Default: the name.
    pub label: Option<String>,
    /// The initial value, of the parameter's type.
    pub default: Option<toml::Value>,
    /// A value must be given. Default: false.
    pub required: Option<bool>,
    /// choice: the values offered (required, not empty).
    pub choices: Option<Vec<String>>,
    /// string: a regular expression the whole value must match.
    pub regex: Option<String>,
}

/// `[[change_sources]]`: turns the outside world into changes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeSourceEntry {
    /// The change source's name; webhooks are posted to `/change_hook/NAME`.
    pub name: String,
    /// `git-poller`, `github`, `gitlab`, `gitea` or `generic` (a JSON webhook).
    #[serde(rename = "type")]
    pub kind: String,
    /// git-poller: the repository to poll. Required.
    pub repourl: Option<String>,
    /// git-poller: the branches to follow, as globs. Default: the remote's default branch.
    pub branches: Option<Vec<String>>,
    /// git-poller: the time between polls, at least `1s`. Default: `10m`.
    pub interval: Option<DurationText>,
    /// The project given to its changes. Default: empty.
    pub project: Option<String>,
    /// The category given to its changes.
    pub category: Option<String>,
    /// Webhooks: the shared secret that signs payloads, or `"%(secret:NAME)s"`.
    pub secret: Option<Secret>,
}

/// `[[reporters]]`: tells the outside world about builds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReporterEntry {
    /// The reporter's name.
    pub name: String,
    /// `http`, `github-status`, `gitlab-status`, `gitea-status` or `email`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Report only builds of these builders (names or globs). Default: all.
    pub builders: Option<Vec<String>>,
    /// http, email: which builds to report: `"all"`, `"failing"` (failed builds) or
    /// `"problem"` (a failure after a success). Default: `"all"`.
    pub mode: Option<String>,
    /// http: the URL each finished build is posted to as JSON. Required.
    pub url: Option<String>,
    /// http: a secret to sign the payload with (HMAC-SHA256), or `"%(secret:NAME)s"`.
    pub secret: Option<Secret>,
    /// github-status, gitlab-status, gitea-status: the API token, or `"%(secret:NAME)s"`.
    /// Required.
    pub token: Option<Secret>,
    /// github-status, gitlab-status, gitea-status: the API's base URL. Default:
    /// `https://api.github.com` or `https://gitlab.com`; required for gitea-status.
    pub base_url: Option<String>,
    /// github-status, gitlab-status, gitea-status: the status context. Default:
    /// `kiln/%(prop:buildername)s`.
    pub context: Option<String>,
    /// email: the SMTP relay, `host` or `host:port`. Required.
    pub relay: Option<String>,
    /// email: the sender address. Required.
    pub from: Option<String>,
    /// email: addresses that get every reported build.
    pub to: Option<Vec<String>>,
    /// email: where the authors of a build's changes are mailed: a domain (`"example.org"`:
    /// at `USER@DOMAIN`, the user part of their address or name), or a table of authors to
    /// addresses (`{ "jane" = "jane@corp.example" }`: an author is found by their whole
    /// identifier, the address in its angle brackets, or that address's user part, ignoring
    /// case; authors it does not name are not mailed).
    pub lookup: Option<LookupEntry>,
    /// email: the SMTP user name.
    pub smtp_user: Option<String>,
    /// email: the SMTP password, or `"%(secret:NAME)s"`.
    pub smtp_password: Option<Secret>,
    /// http, email: also report buildsets: when one of their builds first fails, and when
    /// they complete. Default: false.
    pub buildsets: Option<bool>,
}

/// An email reporter's `lookup` as written: a domain, or a table of authors to addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupEntry {
    /// `lookup = "example.org"`.
    Domain(String),
    /// `lookup = { "jane" = "jane@corp.example" }`, author and address, every entry kept.
    Map(Vec<(String, String)>),
}

impl<'de> Deserialize<'de> for LookupEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LookupEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a mail domain, such as \"example.org\", or a table of authors to addresses, such as { \"jane\" = \"jane@example.org\" }",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LookupEntry, E> {
                Ok(LookupEntry::Domain(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LookupEntry, A::Error> {
                let mut out = Vec::new();
                while let Some((author, address)) = map.next_entry::<String, String>()? {
                    out.push((author, address));
                }
                Ok(LookupEntry::Map(out))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A duration as written: `"30s"`, `"10m"`, `"1h 30m"`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct DurationText(pub String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration with its unit, such as \"30s\", \"10m\" or \"1h\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_owned()))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// A secret value as written; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// The value.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}
