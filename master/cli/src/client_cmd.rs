//! The `kiln` commands that talk to a running master through its API ([`crate::client`]):
//! `force` (following a build live with `--wait` is [`crate::follow`]), `builds`, `status`,
//! `workers`, `sendchange`, and `step upload|list|delete`.
//!
//! Exit status: 0 when done (with `force --wait`: the build's SUCCESS or WARNINGS), 1 for a
//! FAILURE or a master that cannot be reached or failed, 2 for input the master or Kiln
//! refused, 3 for any other build result (EXCEPTION, RETRY, CANCELLED, SKIPPED).

use std::future::Future;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use kiln_client::{ClientError, segment, submitted_requests, with_query};

use crate::args::ClientArgs;
use crate::args::FarmArgs;
use crate::props::PropArg;
use crate::term::{ago, human_bytes, local_time, result_paint, span, summary, table, text};
use kiln_db::model::NewChange;

/// Runs a client command on a runtime of its own; a [`ClientError`] is printed here with
/// its own exit status (1 or 2), other errors go up as bad input.
pub(crate) fn block_on(
    f: impl Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(f) {
        Ok(code) => Ok(code),
        Err(e) => match e.downcast_ref::<ClientError>() {
            Some(c) => {
                eprintln!("kiln: error: {e:#}");
                Ok(ExitCode::from(c.exit_code()))
            }
            None => Err(e),
        },
    }
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// kiln builds

/// Arguments of `kiln builds`.
#[derive(Debug, Args)]
pub struct BuildsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Only this builder's builds.
    #[arg(long, value_name = "BUILDER")]
    builder: Option<String>,
    /// How many builds, newest first.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20,
        allow_negative_numbers = true
    )]
    limit: i64,
    /// Print the builds as the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `kiln builds`: recent builds, newest first.
pub fn builds(args: BuildsArgs) -> anyhow::Result<ExitCode> {
    let client = args.client.client()?;
    block_on(async move {
        let limit = args.limit.to_string();
        let mut query = vec![("limit", limit.as_str())];
        if let Some(b) = &args.builder {
            query.push(("builder", b));
        }
        let answer = client
            .get(&with_query("/api/v2/builds", &query))
            .await
            .context("listing builds")?;
        let builds = answer["builds"].as_array().cloned().unwrap_or_default();
        if args.json {
            print_json(&Value::Array(builds))?;
            return Ok(ExitCode::SUCCESS);
        }
        if builds.is_empty() {
            if let Some(b) = &args.builder {
                // An unknown builder is a mistake to point out, not an empty list.
                client
                    .get(&format!("/api/v2/builders/{}", segment(b)))
                    .await?;
                println!("builder {b} has no builds yet");
            } else {
                println!("no builds yet");
            }
            return Ok(ExitCode::SUCCESS);
        }
        let rows: Vec<Vec<String>> = builds
            .iter()
            .map(|b| {
                vec![
                    text(&b["buildid"]),
                    text(&b["builder"]),
                    format!("#{}", text(&b["number"])),
                    text(&b["worker"]),
                    local_time(&b["started_at"]),
                    span(&b["started_at"], &b["complete_at"]),
                    if b["complete"] == true {
                        text(&b["results"])
                    } else {
                        "running".into()
                    },
                    summary(b),
                ]
            })
            .collect();
        let color = std::io::stdout().is_terminal();
        print!(
            "{}",
            table(
                &[
                    "BUILD", "BUILDER", "NUMBER", "WORKER", "STARTED", "TOOK", "RESULT", "SUMMARY"
                ],
                &rows,
                |col, t| if col == 6 {
                    result_paint(t, color)
                } else {
                    ("", "")
                }
            )
        );
        Ok(ExitCode::SUCCESS)
    })
}

// ---------------------------------------------------------------------------------------
// kiln status, kiln workers

/// Arguments of `kiln status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Print what the master answered as JSON (builders, workers, queue length, caller).
    #[arg(long)]
    json: bool,
}

/// Arguments of `kiln workers`.
#[derive(Debug, Args)]
pub struct WorkersArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Print the workers as the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// A worker's state from its `GET /api/v2/workers` entry, as the master's `kiln_workers`
/// gauge counts it.
/// A worker's state as the master reports it (the one `/metrics` counts), with a latent
/// worker's own state where it is not connected.
fn worker_state(w: &Value) -> String {
    let state = w["state"].as_str().unwrap_or("unknown");
    match (state, w["latent"].as_str()) {
        ("offline", Some(latent)) => format!("latent ({latent})"),
        _ => state.to_owned(),
    }
}

fn builder_state(b: &Value) -> &'static str {
    if b["running"].as_i64().unwrap_or(0) > 0 {
        "building"
    } else if b["pending"].as_i64().unwrap_or(0) > 0 {
        "waiting"
    } else {
        "idle"
    }
}

fn last_build(b: &Value) -> String {
    let last = &b["last_build"];
    if last.is_null() {
        return "-".into();
    }
    if last["complete"] == true {
        format!(
            "#{} {}, {}",
            text(&last["number"]),
            text(&last["results"]),
            ago(&last["complete_at"])
        )
    } else {
        format!(
            "#{} running for {}",
            text(&last["number"]),
            span(&last["started_at"], &Value::Null)
        )
    }
}

/// `kiln status`: the farm at a glance.
pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = args.client.client()?;
    block_on(async move {
        let builders = client.get("/api/v2/builders").await?;
        let workers = client.get("/api/v2/workers").await?;
        let queue = client
            .get("/api/v2/buildrequests?complete=false&claimed=false&limit=1")
            .await?;
        let caller = client.get("/api/v2/auth").await?;
        let builders = builders["builders"].as_array().cloned().unwrap_or_default();
        let workers = workers["workers"].as_array().cloned().unwrap_or_default();
        let queued = queue["meta"]["total"].as_i64().unwrap_or(0);
        if args.json {
            print_json(&json!({
                "master": client.base(),
                "caller": caller,
                "queue": queued,
                "builders": builders,
                "workers": workers,
            }))?;
            return Ok(ExitCode::SUCCESS);
        }
        let who = match caller["name"].as_str() {
            Some(name) => format!("token {name:?}, {} role", text(&caller["role"])),
            None => format!("anonymous, {} role", text(&caller["role"])),
        };
        let connected = workers.iter().filter(|w| w["connected"] == true).count();
        let mut out = format!(
            "master   {} ({who})\nqueue    {queued} request{} waiting\nworkers  {connected} of {} connected\n",
            client.base(),
            if queued == 1 { "" } else { "s" },
            workers.len()
        );
        let color = std::io::stdout().is_terminal();
        if !builders.is_empty() {
            let rows: Vec<Vec<String>> = builders
                .iter()
                .map(|b| {
                    vec![
                        text(&b["name"]),
                        builder_state(b).into(),
                        text(&b["pending"]),
                        text(&b["running"]),
                        last_build(b),
                    ]
                })
                .collect();
            out += "\n";
            out += &table(
                &["BUILDER", "STATE", "PENDING", "RUNNING", "LAST BUILD"],
                &rows,
                |col, t| match col {
                    4 => t
                        .split_whitespace()
                        .nth(1)
                        .map_or(("", ""), |r| result_paint(r.trim_end_matches(','), color)),
                    _ => ("", ""),
                },
            );
        }
        if !workers.is_empty() {
            out += "\n";
            out += &workers_table(&workers);
        }
        print!("{out}");
        Ok(ExitCode::SUCCESS)
    })
}

fn workers_table(workers: &[Value]) -> String {
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let info = &w["info"];
            let platform = if info.is_null() {
                "-".to_owned()
            } else {
                format!("{}/{}", text(&info["arch"]), text(&info["os"]))
            };
            let builds = w["builds"]
                .as_array()
                .map(|b| {
                    b.iter()
                        .map(|id| format!("#{}", text(id)))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            vec![
                text(&w["name"]),
                worker_state(w),
                if w["sandbox"] == true {
                    "sandbox"
                } else {
                    "plain"
                }
                .into(),
                platform,
                if builds.is_empty() {
                    "-".into()
                } else {
                    builds
                },
                text(&w["health"]),
                text(&w["notes"]),
            ]
            .into_iter()
            .map(|c| if c.is_empty() { "-".into() } else { c })
            .collect()
        })
        .collect();
    table(
        &[
            "WORKER", "STATE", "MODE", "PLATFORM", "BUILDS", "HEALTH", "NOTES",
        ],
        &rows,
        |_, _| ("", ""),
    )
}

/// `kiln workers`: the configured workers, connected or not.
pub fn workers(args: WorkersArgs) -> anyhow::Result<ExitCode> {
    let client = args.client.client()?;
    block_on(async move {
        let answer = client.get("/api/v2/workers").await?;
        let workers = answer["workers"].as_array().cloned().unwrap_or_default();
        if args.json {
            print_json(&Value::Array(workers))?;
        } else if workers.is_empty() {
            println!("no workers are configured ([[workers]] in kiln.toml)");
        } else {
            print!("{}", workers_table(&workers));
        }
        Ok(ExitCode::SUCCESS)
    })
}

// ---------------------------------------------------------------------------------------
// kiln sendchange

/// Arguments of `kiln sendchange`.
#[derive(Debug, Args)]
pub struct SendchangeArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Write the change into the farm's database (the one kiln.toml names, or --db) instead of
    /// sending it to the master: for a hook on the master's machine that must not lose a
    /// change while the master is down.
    #[arg(long)]
    direct: bool,
    #[command(flatten)]
    farm: FarmArgs,
    /// Who made the change ("Name <email>").
    #[arg(long, short = 'W')]
    who: String,
    /// The branch.
    #[arg(long, short)]
    branch: Option<String>,
    /// The revision (a commit hash).
    #[arg(long, short)]
    revision: Option<String>,
    /// The repository URL.
    #[arg(long, default_value = "")]
    repository: String,
    /// The project.
    #[arg(long, short, default_value = "")]
    project: String,
    /// The codebase.
    #[arg(long, default_value = "")]
    codebase: String,
    /// The commit message.
    #[arg(long, short = 'm', default_value = "")]
    comments: String,
    /// A category.
    #[arg(long, short = 'C')]
    category: Option<String>,
    /// A link to the revision.
    #[arg(long)]
    revlink: Option<String>,
    /// When (seconds since the epoch); now by default.
    #[arg(long)]
    when: Option<f64>,
    /// A change property, NAME=VALUE (VALUE read as JSON if it parses).
    #[arg(long = "property", value_name = "NAME=VALUE", value_parser = PropArg::parse)]
    properties: Vec<PropArg>,
    /// Mark the change untrusted: its builds run only on sandbox workers, without secrets.
    #[arg(long)]
    untrusted: bool,
    /// Files touched.
    files: Vec<String>,
}

impl SendchangeArgs {
    fn change(&self) -> anyhow::Result<NewChange> {
        let mut properties = serde_json::Map::new();
        for p in &self.properties {
            properties.insert(p.name.clone(), p.json());
        }
        let when_ms = match self.when {
            Some(s) if s.is_finite() && s >= 0.0 => Some((s * 1000.0) as i64),
            Some(s) => bail!("--when {s}: give seconds since the epoch"),
            None => None,
        };
        Ok(NewChange {
            author: self.who.clone(),
            comments: self.comments.clone(),
            branch: self.branch.clone(),
            revision: self.revision.clone(),
            revlink: self.revlink.clone(),
            when_ms,
            category: self.category.clone(),
            repository: self.repository.clone(),
            codebase: self.codebase.clone(),
            project: self.project.clone(),
            files: self.files.clone(),
            properties,
            source: "sendchange".into(),
            source_key: None,
            trusted: Some(!self.untrusted),
            committer: None,
        })
    }
}

/// `kiln sendchange`: records a change for the schedulers, through the master's API (or,
/// with `--direct`, in the farm's database).
pub fn sendchange(args: SendchangeArgs) -> anyhow::Result<ExitCode> {
    let change = args.change()?;
    if args.direct {
        return crate::master_cmd::record_change(&args.farm, &change);
    }
    let client = args.client.client()?;
    block_on(async move {
        let answer = client
            .post("/api/v2/changes", &serde_json::to_value(&change)?)
            .await?;
        match answer["changeid"].as_i64() {
            Some(id) => println!("change {id} recorded"),
            None => println!("change already recorded"),
        }
        Ok(ExitCode::SUCCESS)
    })
}

// ---------------------------------------------------------------------------------------
// kiln force

/// Arguments of `kiln force`.
#[derive(Debug, Args)]
pub struct ForceArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The builder to build. (The older form, a force scheduler's name, still works: it builds
    /// all of that scheduler's builders, or those given with --builder.)
    builder: String,
    /// The force scheduler to use, when several have the builder.
    #[arg(long, value_name = "NAME")]
    scheduler: Option<String>,
    /// With a scheduler's name instead of a builder: a builder of it to build (repeatable).
    #[arg(long = "builder", value_name = "BUILDER")]
    builders: Vec<String>,
    /// A parameter of the force scheduler, NAME=VALUE; VALUE is converted to the parameter's
    /// type (int, bool, string, choice) and checked by the master.
    #[arg(long = "prop", visible_alias = "param", value_name = "NAME=VALUE", value_parser = PropArg::parse)]
    props: Vec<PropArg>,
    /// Why.
    #[arg(long, default_value = "")]
    reason: String,
    /// Who asks (default: the token's name).
    #[arg(long)]
    owner: Option<String>,
    /// The branch to build.
    #[arg(long)]
    branch: Option<String>,
    /// The revision to build.
    #[arg(long)]
    revision: Option<String>,
    /// The repository to build.
    #[arg(long)]
    repository: Option<String>,
    /// The request's priority (higher starts first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i64,
    /// Follow the build: a progress line, its logs as they are written, a table of its steps;
    /// the exit status follows its result.
    #[arg(long)]
    wait: bool,
}

/// The force scheduler and builders a `kiln force` names.
fn pick_scheduler(args: &ForceArgs, schedulers: &[Value]) -> anyhow::Result<(Value, Vec<String>)> {
    let names = |list: &[&Value]| -> String {
        list.iter()
            .filter_map(|s| s["name"].as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let has = |s: &Value, builder: &str| {
        s["builders"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b == builder))
    };
    if schedulers.is_empty() {
        bail!(
            "the master has no force scheduler; add one to kiln.toml ([[schedulers]] with type = \"force\" and the builders it may force)"
        );
    }
    let all: Vec<&Value> = schedulers.iter().collect();
    let named = |name: &str| schedulers.iter().find(|s| s["name"] == name);
    let wanted = &args.builder;
    let with_builder: Vec<&Value> = schedulers.iter().filter(|s| has(s, wanted)).collect();
    if !with_builder.is_empty() {
        if !args.builders.is_empty() {
            bail!(
                "--builder goes with a force scheduler's name; {wanted:?} is a builder, so drop --builder"
            );
        }
        let s = match &args.scheduler {
            Some(name) => match named(name) {
                Some(s) if has(s, wanted) => s,
                Some(_) => bail!(
                    "force scheduler {name:?} does not build {wanted:?}; these do: {}",
                    names(&with_builder)
                ),
                None => bail!(
                    "there is no force scheduler {name:?} (defined: {})",
                    names(&all)
                ),
            },
            None if with_builder.len() == 1 => with_builder[0],
            None => bail!(
                "builder {wanted:?} is in several force schedulers ({}); pick one with --scheduler NAME",
                names(&with_builder)
            ),
        };
        return Ok((s.clone(), vec![wanted.clone()]));
    }
    // The older form: a scheduler's name, all of its builders or those of --builder.
    if let Some(s) = named(wanted).filter(|_| args.scheduler.is_none()) {
        let builders = if args.builders.is_empty() {
            s["builders"]
                .as_array()
                .map(|b| b.iter().map(text).collect())
                .unwrap_or_default()
        } else {
            args.builders.clone()
        };
        return Ok((s.clone(), builders));
    }
    let mut forceable: Vec<String> = schedulers
        .iter()
        .flat_map(|s| s["builders"].as_array().cloned().unwrap_or_default())
        .map(|b| text(&b))
        .collect();
    forceable.sort();
    forceable.dedup();
    bail!(
        "no force scheduler builds {wanted:?}; the builders one can force are: {}",
        forceable.join(", ")
    )
}

/// The scheduler's parameters from `--prop NAME=VALUE`, typed as the scheduler declares them
/// (a value that does not convert is sent as given, for the master to refuse with its reason).
fn parameters(scheduler: &Value, props: &[PropArg]) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for PropArg { name, value } in props {
        let kind = scheduler["parameters"]
            .as_array()
            .and_then(|ps| ps.iter().find(|x| x["name"] == name.as_str()))
            .and_then(|x| x["type"].as_str())
            .unwrap_or("string");
        let typed = match kind {
            "int" => value.trim().parse::<i64>().ok().map(Value::from),
            "bool" => match value.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Some(Value::Bool(true)),
                "false" | "no" | "off" | "0" => Some(Value::Bool(false)),
                _ => None,
            },
            _ => None,
        };
        out.insert(
            name.to_owned(),
            typed.unwrap_or_else(|| Value::String(value.to_owned())),
        );
    }
    out
}

/// `kiln force`: forces a build through a force scheduler; with `--wait`, follows it.
pub fn force(args: ForceArgs) -> anyhow::Result<ExitCode> {
    let client = args.client.client()?;
    block_on(async move {
        let answer = client
            .get("/api/v2/forceschedulers")
            .await
            .context("reading the force schedulers")?;
        let schedulers = answer["forceschedulers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let (scheduler, builders) = pick_scheduler(&args, &schedulers)?;
        let name = text(&scheduler["name"]);
        if args.wait && builders.len() != 1 {
            bail!(
                "--wait follows one build; scheduler {name:?} builds {}: name one builder",
                builders.join(", ")
            );
        }
        let mut body = json!({
            "builders": builders,
            "reason": args.reason,
            "parameters": parameters(&scheduler, &args.props),
            "priority": args.priority,
        });
        for (key, value) in [
            ("owner", &args.owner),
            ("branch", &args.branch),
            ("revision", &args.revision),
            ("repository", &args.repository),
        ] {
            if let Some(v) = value {
                body[key] = Value::String(v.clone());
            }
        }
        let submitted = client
            .post(
                &format!("/api/v2/forceschedulers/{}", segment(&name)),
                &body,
            )
            .await?;
        let buildset = text(&submitted["buildsetid"]);
        let requests = submitted_requests(&submitted);
        if args.wait
            && let [(request, builder)] = requests.as_slice()
        {
            println!("request {request} queued for {builder} (buildset {buildset})");
            return crate::follow::follow(&client, *request, builder).await;
        }
        for (request, builder) in &requests {
            let started = client
                .get(&format!("/api/v2/builds?buildrequestid={request}&limit=1"))
                .await?;
            match started["builds"][0]["buildid"].as_i64() {
                Some(build) => println!(
                    "request {request} started as build {build} on {builder}: {}",
                    client.page(&format!("/builds/{build}"))
                ),
                None => println!(
                    "request {request} queued for {builder} (buildset {buildset}): {}",
                    client.page(&with_query("/builds", &[("builder", builder)]))
                ),
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

// ---------------------------------------------------------------------------------------
// kiln step upload | list | delete

/// Arguments of `kiln step upload`.
#[derive(Debug, Args)]
pub struct UploadArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The component: a step, log observer or farm policy (.wasm).
    file: PathBuf,
    /// The module's name, as builders will name it (`module = "NAME@VERSION"`).
    #[arg(long)]
    name: String,
    /// Its version; default: the first 12 hex digits of its SHA-256.
    #[arg(long)]
    version: Option<String>,
}

/// Arguments of `kiln step list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Also list the modules uploaded to the master (the default when a master is named by
    /// --master, KILN_MASTER or the client config file).
    #[arg(long)]
    remote: bool,
}

/// Arguments of `kiln step delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The module's name.
    name: String,
    /// The version to delete.
    version: String,
}

/// `kiln step upload`: sends a module to the master, which checks and stores it.
pub fn upload(args: UploadArgs) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("{}: cannot read it", args.file.display()))?;
    let client = args.client.client()?;
    block_on(async move {
        let mut query = vec![("name", args.name.as_str())];
        if let Some(v) = &args.version {
            query.push(("version", v));
        }
        let m = client
            .upload("/api/v2/stepmodules", &query, "application/wasm", bytes)
            .await
            .with_context(|| format!("the master refused {}", args.file.display()))?;
        let module = format!("{}@{}", text(&m["name"]), text(&m["version"]));
        let kind = text(&m["kind"]);
        let size = m["size"].as_u64().unwrap_or(0);
        if m["created"] == false {
            println!("{module} was uploaded before with the same content; nothing changed");
        } else {
            println!("uploaded {module}: a {kind} component");
        }
        println!("kind:     {kind}");
        println!("sha1:     {}", text(&m["sha1"]));
        println!("sha256:   {}", text(&m["sha256"]));
        println!("size:     {} ({size} bytes)", human_bytes(size));
        let usage = match kind.as_str() {
            "step" => format!("module = \"{module}\" in a [[builders.steps]] entry"),
            "observer" => format!("observers = [{{ module = \"{module}\" }}] in a step"),
            _ => format!("\"module:{module}\" as a [hooks] value"),
        };
        println!("use it:   {usage}");
        Ok(ExitCode::SUCCESS)
    })
}

/// `kiln step list`: the built-ins, and the modules uploaded to the master.
pub fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    crate::step_cmd::list();
    let client = args.client.client()?;
    if !args.remote && !client.master_named() {
        return Ok(ExitCode::SUCCESS);
    }
    let explicit = args.remote;
    block_on(async move {
        let answer = match client.get("/api/v2/stepmodules?limit=10000").await {
            Ok(a) => a,
            // Listing the built-ins was asked for too; a master away is said, not fatal.
            Err(e) if !explicit => {
                eprintln!("kiln: warning: cannot list the modules uploaded to the master: {e}");
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => return Err(anyhow::Error::new(e).context("listing uploaded modules")),
        };
        let modules = answer["stepmodules"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        println!();
        if modules.is_empty() {
            println!("no modules uploaded to {}", client.base());
            return Ok(ExitCode::SUCCESS);
        }
        println!("uploaded to {}:", client.base());
        let rows: Vec<Vec<String>> = modules
            .iter()
            .map(|m| {
                let used: Vec<String> = m["used_by"]
                    .as_array()
                    .map(|u| u.iter().map(text).collect())
                    .unwrap_or_default();
                vec![
                    text(&m["name"]),
                    text(&m["version"]),
                    text(&m["kind"]),
                    human_bytes(m["size"].as_u64().unwrap_or(0)),
                    text(&m["sha256"]).chars().take(12).collect(),
                    local_time(&m["uploaded_at"]),
                    if used.is_empty() {
                        "-".into()
                    } else {
                        used.join(", ")
                    },
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &[
                    "NAME", "VERSION", "KIND", "SIZE", "SHA256", "UPLOADED", "USED BY"
                ],
                &rows,
                |_, _| ("", "")
            )
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// `kiln step delete`: deletes an uploaded version the configuration does not use.
pub fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let client = args.client.client()?;
    block_on(async move {
        client
            .delete(&format!(
                "/api/v2/stepmodules/{}/{}",
                segment(&args.name),
                segment(&args.version)
            ))
            .await?;
        println!("deleted {}@{}", args.name, args.version);
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheds() -> Vec<Value> {
        vec![
            json!({"name": "force", "builders": ["linux", "mac"], "parameters": [
                {"name": "jobs", "type": "int"}, {"name": "fast", "type": "bool"},
                {"name": "who", "type": "string"}]}),
            json!({"name": "release", "builders": ["linux"], "parameters": []}),
            json!({"name": "docs", "builders": ["docs"], "parameters": []}),
        ]
    }

    fn args(builder: &str, scheduler: Option<&str>, builders: &[&str]) -> ForceArgs {
        ForceArgs {
            client: ClientArgs::default(),
            builder: builder.into(),
            scheduler: scheduler.map(Into::into),
            builders: builders.iter().map(|b| b.to_string()).collect(),
            props: Vec::new(),
            reason: String::new(),
            owner: None,
            branch: None,
            revision: None,
            repository: None,
            priority: 0,
            wait: false,
        }
    }

    #[test]
    fn a_builder_picks_its_force_scheduler() {
        let s = scheds();
        let (sched, builders) = pick_scheduler(&args("docs", None, &[]), &s).unwrap();
        assert_eq!(
            (sched["name"].as_str(), builders),
            (Some("docs"), vec!["docs".into()])
        );
        let e = pick_scheduler(&args("linux", None, &[]), &s)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "builder \"linux\" is in several force schedulers (force, release); pick one with --scheduler NAME"
        );
        let (sched, _) = pick_scheduler(&args("linux", Some("release"), &[]), &s).unwrap();
        assert_eq!(sched["name"], "release");
        let e = pick_scheduler(&args("mac", Some("release"), &[]), &s)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "force scheduler \"release\" does not build \"mac\"; these do: force"
        );
        let e = pick_scheduler(&args("win", None, &[]), &s)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "no force scheduler builds \"win\"; the builders one can force are: docs, linux, mac"
        );
    }

    #[test]
    fn a_scheduler_name_still_forces_its_builders() {
        let s = scheds();
        let (sched, builders) = pick_scheduler(&args("force", None, &[]), &s).unwrap();
        assert_eq!(sched["name"], "force");
        assert_eq!(builders, vec!["linux".to_owned(), "mac".to_owned()]);
        let (_, builders) = pick_scheduler(&args("force", None, &["mac"]), &s).unwrap();
        assert_eq!(builders, vec!["mac".to_owned()]);
        let e = pick_scheduler(&args("docs", None, &["x"]), &s)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--builder goes with a force scheduler's name"),
            "{e}"
        );
        assert!(
            pick_scheduler(&args("x", None, &[]), &[])
                .unwrap_err()
                .to_string()
                .starts_with("the master has no force scheduler")
        );
    }

    #[test]
    fn props_are_typed_by_the_parameters() {
        let s = &scheds()[0];
        let props: Vec<PropArg> = ["jobs=8", "fast=yes", "who=ada=b", "other=1", "jobs2=x"]
            .into_iter()
            .map(|p| PropArg::parse(p).unwrap())
            .collect();
        let p = parameters(s, &props);
        assert_eq!(
            Value::Object(p),
            json!({"jobs": 8, "fast": true, "who": "ada=b", "other": "1", "jobs2": "x"})
        );
        // What does not convert goes as given: the master says why it is wrong.
        let p = parameters(s, &[PropArg::parse("jobs=many").unwrap()]);
        assert_eq!(p["jobs"], "many");
    }
}
