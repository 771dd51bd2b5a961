//! `kiln master`, `kiln checkconfig`, `kiln sendchange` and `kiln force`: the master's
//! commands. `sendchange` and `force` write to the farm's database directly (the same
//! functions the master's API calls), so they work with the master running or not: a running
//! master picks the new work up on its next pass.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;

use crate::config;
use crate::model::{NewChange, now_ms};
use crate::schedulers::{self, ForceRequest};
use crate::server::{self, Master};

/// Where the farm is: its configuration, and optionally another database.
#[derive(Debug, Args)]
pub struct FarmArgs {
    /// The master's configuration file.
    #[arg(
        long,
        short,
        value_name = "FILE",
        env = "KILN_CONFIG",
        default_value = "kiln.toml"
    )]
    pub config: PathBuf,
    /// The database URL (sqlite:///PATH or postgres://...), instead of the configuration's.
    #[arg(long, value_name = "URL", env = "KILN_DATABASE_URL")]
    pub db: Option<String>,
}

/// Arguments of `kiln master`.
#[derive(Debug, Args)]
pub struct MasterArgs {
    #[command(flatten)]
    pub farm: FarmArgs,
    /// How often to look for work written by other processes (sendchange, other masters).
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    pub poll: f64,
}

/// Arguments of `kiln sendchange`.
#[derive(Debug, Args)]
pub struct SendchangeArgs {
    #[command(flatten)]
    pub farm: FarmArgs,
    /// Who made the change ("Name <email>").
    #[arg(long, short = 'W')]
    pub who: String,
    /// The branch.
    #[arg(long, short)]
    pub branch: Option<String>,
    /// The revision (a commit hash).
    #[arg(long, short)]
    pub revision: Option<String>,
    /// The repository URL.
    #[arg(long, default_value = "")]
    pub repository: String,
    /// The project.
    #[arg(long, short, default_value = "")]
    pub project: String,
    /// The codebase.
    #[arg(long, default_value = "")]
    pub codebase: String,
    /// The commit message.
    #[arg(long, short = 'm', default_value = "")]
    pub comments: String,
    /// A category.
    #[arg(long, short = 'C')]
    pub category: Option<String>,
    /// A link to the revision.
    #[arg(long)]
    pub revlink: Option<String>,
    /// When (seconds since the epoch); now by default.
    #[arg(long)]
    pub when: Option<f64>,
    /// A change property, NAME=VALUE (VALUE read as JSON if it parses).
    #[arg(long = "property", value_name = "NAME=VALUE")]
    pub properties: Vec<String>,
    /// Mark the change untrusted: its builds run only on sandbox workers, without secrets.
    #[arg(long)]
    pub untrusted: bool,
    /// Files touched.
    pub files: Vec<String>,
}

/// Arguments of `kiln force`.
#[derive(Debug, Args)]
pub struct ForceArgs {
    #[command(flatten)]
    pub farm: FarmArgs,
    /// The force scheduler.
    pub scheduler: String,
    /// A builder to build on (repeat for several); all of the scheduler's by default.
    #[arg(long = "builder")]
    pub builders: Vec<String>,
    /// Why.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who asks.
    #[arg(long, env = "USER", default_value = "")]
    pub owner: String,
    /// Branch.
    #[arg(long)]
    pub branch: Option<String>,
    /// Revision.
    #[arg(long)]
    pub revision: Option<String>,
    /// Repository.
    #[arg(long)]
    pub repository: Option<String>,
    /// A parameter of the scheduler, NAME=VALUE (converted to the parameter's type).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Request priority (higher starts first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i64,
}

fn load_config(path: &std::path::Path) -> anyhow::Result<config::Config> {
    config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn name_value(flag: &str, s: &str) -> anyhow::Result<(String, Value)> {
    let (name, value) = s
        .split_once('=')
        .with_context(|| format!("{flag} {s}: write NAME=VALUE"))?;
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    Ok((name.to_owned(), value))
}

/// The master's runtime: one thread for its async work. The master waits on sockets and
/// on the database (whose connections run on threads of their own); a second async thread
/// only adds wake-ups between threads. Measured with the farm benchmark (W3): 2.3 ms of master
/// CPU per build with one thread, 2.9 ms with two, and 20% more builds per second.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// `kiln checkconfig`: validates the configuration and prints what it defines.
pub fn checkconfig(args: FarmArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&args.config)?;
    for w in &cfg.warnings {
        eprintln!("kiln: warning: {w}");
    }
    println!("{}: OK ({})", args.config.display(), cfg.summary());
    Ok(ExitCode::SUCCESS)
}

/// `kiln master`: runs the master until SIGINT or SIGTERM; SIGHUP reloads the configuration.
pub fn master(args: MasterArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&args.farm.config)?;
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let poll = Duration::try_from_secs_f64(args.poll)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--poll {}: give a positive number of seconds", args.poll))?;
    runtime()?.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let master = Master::start(cfg, args.farm.db.as_deref()).await?;
        let (addr, scheme) = serve_http(&master).await?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let reloader = master.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match reloader.reload().await {
                    Ok(diff) => eprintln!("kiln: configuration reloaded: {}", diff_line(&diff)),
                    Err(e) => {
                        eprintln!("kiln: configuration NOT reloaded; the old one stays:\n{e:#}")
                    }
                }
            }
        });
        eprintln!(
            "kiln: master {} running on {} (pid {}), API on {scheme}://{addr}/api/v2; SIGHUP reloads {}",
            master.state().config.master.name,
            crate::db::redact_url(
                args.farm
                    .db
                    .as_deref()
                    .unwrap_or(master.state().config.master.database.as_str())
            ),
            std::process::id(),
            args.farm.config.display()
        );
        master
            .run(poll, async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            })
            .await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Binds the master's `listen` address and serves the API, the worker endpoint and the file
/// cache there (HTTPS when `[master] tls_cert` is set). Returns the bound address and scheme.
pub(crate) async fn serve_http(
    master: &std::sync::Arc<Master>,
) -> anyhow::Result<(std::net::SocketAddr, &'static str)> {
    let (listen, tls) = {
        let state = master.state();
        (state.config.master.listen, state.config.master.tls.clone())
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} ([master] listen)"))?;
    let addr = listener.local_addr()?;
    master.set_address(addr);
    let app = crate::api::router(master.clone());
    let tls = match &tls {
        Some(files) => Some(
            crate::tls::server_config(files)
                .map_err(|(setting, e)| anyhow::anyhow!("[master] {setting}: {e}"))?,
        ),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let server = match tls {
        Some(config) => {
            let listener = crate::tls::TlsListener::new(listener, config)?;
            tokio::spawn(async move { axum::serve(listener, app).await })
        }
        None => {
            use axum::serve::ListenerExt;
            // Small messages (a job, an acknowledgement) must not wait for Nagle's algorithm
            // and a delayed ACK: that is 40 ms per round trip.
            let listener = listener.tap_io(|tcp| {
                if let Err(error) = tcp.set_nodelay(true) {
                    tracing::debug!(%error, "cannot set TCP_NODELAY");
                }
            });
            tokio::spawn(async move { axum::serve(listener, app).await })
        }
    };
    tokio::spawn(async move {
        if let Ok(Err(error)) = server.await {
            tracing::error!(%error, "the HTTP server stopped");
        }
    });
    Ok((addr, scheme))
}

fn diff_line(diff: &config::ConfigDiff) -> String {
    let part = |what: &str, c: &config::Changes| {
        let mut bits = Vec::new();
        if !c.added.is_empty() {
            bits.push(format!("+{}", c.added.join(" +")));
        }
        if !c.removed.is_empty() {
            bits.push(format!("-{}", c.removed.join(" -")));
        }
        if !c.changed.is_empty() {
            bits.push(format!("~{}", c.changed.join(" ~")));
        }
        (!bits.is_empty()).then(|| format!("{what} {}", bits.join(" ")))
    };
    let parts: Vec<String> = [
        part("builders", &diff.builders),
        part("workers", &diff.workers),
        part("schedulers", &diff.schedulers),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "no changes to builders, workers or schedulers".into()
    } else {
        parts.join("; ")
    }
}

pub(crate) async fn open_farm(args: &FarmArgs) -> anyhow::Result<(config::Config, crate::db::Db)> {
    let cfg = load_config(&args.config)?;
    let url = args
        .db
        .clone()
        .unwrap_or_else(|| cfg.master.database.as_str().to_owned());
    let db = crate::db::Db::open(&url).await?;
    Ok((cfg, db))
}

/// `kiln sendchange`: records a change, as a change source would.
pub fn sendchange(args: SendchangeArgs) -> anyhow::Result<ExitCode> {
    let mut properties = serde_json::Map::new();
    for p in &args.properties {
        let (n, v) = name_value("--property", p)?;
        properties.insert(n, v);
    }
    let when_ms = match args.when {
        Some(s) if s.is_finite() && s >= 0.0 => Some((s * 1000.0) as i64),
        Some(s) => bail!("--when {s}: give seconds since the epoch"),
        None => None,
    };
    let change = NewChange {
        author: args.who.clone(),
        comments: args.comments.clone(),
        branch: args.branch.clone(),
        revision: args.revision.clone(),
        revlink: args.revlink.clone(),
        when_ms,
        category: args.category.clone(),
        repository: args.repository.clone(),
        codebase: args.codebase.clone(),
        project: args.project.clone(),
        files: args.files.clone(),
        properties,
        source: "sendchange".into(),
        source_key: None,
        trusted: Some(!args.untrusted),
        committer: None,
    };
    runtime()?.block_on(async {
        let (_, db) = open_farm(&args.farm).await?;
        match crate::changes::add_change(&db, &change).await? {
            Ok(Some(id)) => println!("change {id} recorded"),
            Ok(None) => println!("change already recorded"),
            Err(e) => bail!("{e}"),
        }
        db.close().await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `kiln force`: forces a build through a force scheduler.
pub fn force(args: ForceArgs) -> anyhow::Result<ExitCode> {
    let mut parameters = serde_json::Map::new();
    for p in &args.params {
        // Parameters are typed by the scheduler, which converts text as a web form's would.
        let (n, v) = p
            .split_once('=')
            .with_context(|| format!("--param {p}: write NAME=VALUE"))?;
        parameters.insert(n.to_owned(), Value::String(v.to_owned()));
    }
    let request = ForceRequest {
        builders: args.builders.clone(),
        reason: args.reason.clone(),
        owner: args.owner.clone(),
        branch: args.branch.clone(),
        revision: args.revision.clone(),
        repository: args.repository.clone(),
        project: None,
        parameters,
        priority: args.priority,
    };
    runtime()?.block_on(async {
        let (cfg, db) = open_farm(&args.farm).await?;
        let mut conn = db.pool().acquire().await?;
        let master_id =
            crate::db::register_master(&mut conn, &format!("{}-cli", cfg.master.name), now_ms())
                .await?;
        crate::db::deactivate_master(&mut conn, master_id).await?;
        drop(conn);
        let state = server::build_state(
            &runtime::Runtime::new(runtime::RuntimeConfig {
                cache_dir: crate::step_cmd::default_cache_dir(),
            })?,
            &db,
            cfg,
        )
        .await?;
        let env = schedulers::Env {
            db: &db,
            master: master_id,
            config: &state.config,
            builders: &state.builders,
            hooks: &state.hooks,
            policies: &state.policies,
        };
        match schedulers::force(&env, &args.scheduler, &request, now_ms()).await? {
            Ok(s) => {
                let builders: Vec<&str> = s.requests.iter().map(|(_, b)| b.as_str()).collect();
                println!(
                    "buildset {} submitted: {} request(s) on {}",
                    s.buildset,
                    s.requests.len(),
                    builders.join(", ")
                );
            }
            Err(e) => bail!("{e}"),
        }
        db.close().await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
