//! `kiln master` and `kiln checkconfig`: the master's commands; and `kiln sendchange --direct`,
//! which writes a change into the farm's database (the function the master's API calls), so it
//! works with the master running or not. The commands that talk to a running master are in
//! `client_cmd`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use kiln_config as config;
use kiln_db::model::NewChange;
use master::server::Master;

use crate::args::FarmArgs;

/// Arguments of `kiln master`.
#[derive(Debug, Args)]
pub struct MasterArgs {
    #[command(flatten)]
    pub farm: FarmArgs,
    /// How often to look for work written by other processes (sendchange, other masters).
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    pub poll: f64,
}

fn load_config(path: &std::path::Path) -> anyhow::Result<config::Config> {
    config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
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
        let (addr, scheme) = kiln_http::serve(&master).await?;
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
            kiln_db::redact_url(
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

pub(crate) async fn open_farm(args: &FarmArgs) -> anyhow::Result<(config::Config, kiln_db::Db)> {
    let cfg = load_config(&args.config)?;
    let url = args
        .db
        .clone()
        .unwrap_or_else(|| cfg.master.database.as_str().to_owned());
    let db = kiln_db::Db::open(&url).await?;
    Ok((cfg, db))
}

/// `kiln sendchange --direct`: records a change in the farm's database, as a change source
/// would, whether a master runs or not (a running master picks it up on its next pass).
pub fn record_change(farm: &FarmArgs, change: &NewChange) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let (_, db) = open_farm(farm).await?;
        match master::changes::add_change(&db, change).await? {
            Ok(Some(id)) => println!("change {id} recorded"),
            Ok(None) => println!("change already recorded"),
            Err(e) => bail!("{e}"),
        }
        db.close().await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
