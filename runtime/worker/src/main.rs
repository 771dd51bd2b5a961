//! `kiln-worker`: a Kiln worker. Connects out to the master and runs the builds it is sent.
//!
//! Settings come from the command line, then `KILN_*` environment variables, then a small
//! TOML file (`--config`), in that order of precedence.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use kiln_worker::{Phase, WorkerOptions};
use serde::Deserialize;

/// A Kiln worker: connects out to the master (it may sit behind NAT), runs the builds the
/// master sends it as WebAssembly components, and streams their logs and results back.
///
/// The first SIGINT or SIGTERM stops taking builds and lets running ones finish; a second one
/// cancels them.
#[derive(Debug, Parser)]
#[command(name = "kiln-worker", version)]
struct Args {
    /// The master's URL, e.g. http://master.example:8010 (https:// or wss:// for TLS).
    #[arg(long, env = "KILN_MASTER")]
    master: Option<String>,
    /// This worker's name, as in the master's [[workers]].
    #[arg(long, env = "KILN_NAME")]
    name: Option<String>,
    /// This worker's token (prefer KILN_TOKEN or the config file: arguments are visible to
    /// other users in `ps`).
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Sandbox mode: confine every command (Landlock, seccomp), no network, no secrets, and
    /// wipe the workdir after every build. Needed for untrusted builds.
    #[arg(long, env = "KILN_SANDBOX")]
    sandbox: bool,
    /// The base directory: builders' workdirs, the file cache. Default: ./kiln-worker.
    #[arg(long, env = "KILN_WORKDIR", value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// How many builds run at once. Default: 1.
    #[arg(long, env = "KILN_MAX_BUILDS", value_name = "N")]
    max_builds: Option<u32>,
    /// A tag to advertise (repeat for several).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// A TOML file with the same settings (master, name, token, sandbox, workdir, max_builds,
    /// tags, ca_cert).
    #[arg(long, env = "KILN_WORKER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where compiled components are cached. Default: $XDG_CACHE_HOME/kiln/components.
    #[arg(long, env = "KILN_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Leave (cancelling running builds) when the process that started this worker exits:
    /// how the master starts latent workers, so none outlives a master that was killed.
    #[arg(long, hide = true)]
    exit_with_parent: bool,
    /// A PEM file of certificate authorities to trust for an https:// or wss:// master, beside
    /// the public ones (for a master with a private or self-signed certificate).
    #[arg(long, env = "KILN_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    master: Option<String>,
    name: Option<String>,
    token: Option<String>,
    sandbox: Option<bool>,
    workdir: Option<PathBuf>,
    max_builds: Option<u32>,
    #[serde(default)]
    tags: Vec<String>,
    ca_cert: Option<PathBuf>,
}

fn options(args: Args) -> anyhow::Result<WorkerOptions> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--config {}", path.display()))?;
            toml::from_str::<FileConfig>(&text)
                .map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let need = |value: Option<String>, what: &str, flag: &str, env: &str| {
        value.with_context(|| {
            format!("no {what}: pass --{flag}, set {env}, or write `{flag} = ...` in --config")
        })
    };
    let master = need(
        args.master.or(file.master),
        "master URL",
        "master",
        "KILN_MASTER",
    )?;
    let name = need(args.name.or(file.name), "worker name", "name", "KILN_NAME")?;
    let token = need(args.token.or(file.token), "token", "token", "KILN_TOKEN")?;
    // The rule the master's [[workers]] names follow.
    kiln_protocol::check_name(&name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    let max_builds = args.max_builds.or(file.max_builds).unwrap_or(1);
    if max_builds == 0 {
        bail!("--max-builds 0: a worker runs at least one build at a time");
    }
    let mut tags = file.tags;
    tags.extend(args.tags);
    let component_cache = args
        .cache_dir
        .or_else(runtime::RuntimeConfig::default_cache_dir);
    Ok(WorkerOptions {
        master,
        name,
        token,
        sandbox: args.sandbox || file.sandbox.unwrap_or(false),
        base_dir: args
            .workdir
            .or(file.workdir)
            .unwrap_or_else(|| PathBuf::from("kiln-worker")),
        max_builds,
        tags,
        component_cache,
        ca_cert: args.ca_cert.or(file.ca_cert),
    })
}

fn main() -> ExitCode {
    // The worker doubles as the sandbox's confinement helper; that comes before anything else.
    runtime::confine::run_helper_if_requested();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-worker: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Read first: once the parent is gone, this reads 1 (or a subreaper).
    let parent = args
        .exit_with_parent
        .then(std::os::unix::process::parent_id);
    let options = options(args)?;
    let confinement = if options.sandbox {
        let helper = runtime::Helper::current_exe().context("finding this binary")?;
        let c = runtime::Confinement::probe(helper).map_err(|e| {
            anyhow::anyhow!(
                "sandbox mode is not possible on this machine, so this worker refuses to start \
                 rather than run untrusted builds unconfined: {e}"
            )
        })?;
        tracing::info!(
            landlock_abi = c.landlock_abi(),
            "sandbox mode: commands are confined"
        );
        Some(Arc::new(c))
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Running);
        if let Some(parent) = parent {
            let phase_tx = phase_tx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                while std::os::unix::process::parent_id() == parent {
                    tick.tick().await;
                }
                tracing::warn!(
                    parent,
                    "the process that started this worker is gone; cancelling builds and leaving"
                );
                let _ = phase_tx.send(Phase::Aborting);
            });
        }
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            for next in [Phase::Draining, Phase::Aborting] {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                match next {
                    Phase::Draining => tracing::info!(
                        "shutting down: running builds finish first (signal again to cancel them)"
                    ),
                    _ => tracing::warn!("cancelling running builds"),
                }
                let _ = phase_tx.send(next);
            }
        });
        kiln_worker::run(options, confinement, phase_rx).await
    })
}
