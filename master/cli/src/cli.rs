//! Command-line definitions (clap derive) and dispatch.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Exit status for input Kiln could not use (a bad file, bad JSON, a bad flag).
pub const EXIT_BAD_INPUT: u8 = 2;

/// Options every command that talks to a master takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientArgs {
    /// The master's URL. Default: `master` in ~/.config/kiln/client.toml, else
    /// http://127.0.0.1:8010.
    #[arg(long, value_name = "URL", env = "KILN_MASTER")]
    pub master: Option<String>,
    /// A file holding the API token (else KILN_TOKEN, else `token` in the client config file).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A PEM file of certificate authorities to trust beside the public ones (a farm's private
    /// CA, or the master's own certificate if it is self-signed).
    #[arg(long, value_name = "FILE", env = "KILN_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

impl ClientArgs {
    /// A client of the master these options name.
    pub fn client(&self) -> anyhow::Result<kiln_client::Client> {
        kiln_client::Client::new(&kiln_client::ClientOptions {
            master: self.master.clone(),
            token_file: self.token_file.clone(),
            ca_cert: self.ca_cert.clone(),
        })
    }
}

/// Kiln: a build farm whose steps run as sandboxed WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run, list and inspect steps and observers.
    #[command(subcommand)]
    Step(StepCommand),
    /// Run the master: schedulers, build requests, dispatch to workers, the API. SIGHUP
    /// reloads the configuration; SIGINT or SIGTERM stops it.
    Master(crate::master_cmd::MasterArgs),
    /// A whole farm in one command: a sample git project, a master on SQLite with a plain and
    /// a sandbox worker, forced builds and a committed change; Ctrl-C stops it.
    Demo(crate::demo::DemoArgs),
    /// Check a master configuration without starting anything.
    Checkconfig(crate::master_cmd::FarmArgs),
    /// Record a change, as a change source would, for the schedulers to build (through the
    /// master's API; with --direct, in the farm's database).
    Sendchange(Box<crate::client_cmd::SendchangeArgs>),
    /// Force a build of a builder; with --wait, follow it live and exit with its result.
    ///
    /// Exit status with --wait: 0 for SUCCESS or WARNINGS, 1 for FAILURE (or a master that
    /// cannot be reached), 2 for a refused request, 3 for any other result.
    Force(Box<crate::client_cmd::ForceArgs>),
    /// Build the local git checkout's uncommitted changes on the farm, as a patch on the
    /// revision it is based on (`buildbot try`); with --wait, follow the builds.
    ///
    /// Exit status with --wait: as `force --wait`, for the worst of the builds.
    Try(Box<crate::try_cmd::TryArgs>),
    /// Recent builds, newest first.
    Builds(crate::client_cmd::BuildsArgs),
    /// The farm at a glance: builders, workers, the queue.
    Status(crate::client_cmd::StatusArgs),
    /// The configured workers: connected or not, busy, paused, quarantined.
    Workers(crate::client_cmd::WorkersArgs),
    /// Run a builder's steps from the configuration locally, exactly as a worker would.
    #[command(subcommand)]
    Build(crate::build_cmd::BuildCommand),
    /// Make, list and revoke API tokens (on the master's machine: it opens the database).
    #[command(subcommand)]
    Token(crate::token_cmd::TokenCommand),
}

#[derive(Debug, Subcommand)]
enum StepCommand {
    /// Run one step locally, exactly as a worker would, and print its logs and result.
    ///
    /// Exit status: 0 for SUCCESS or WARNINGS, 1 for FAILURE, 2 for bad input, 3 for any other
    /// result (EXCEPTION, SKIPPED, RETRY, CANCELLED).
    Run(Box<RunArgs>),
    /// List the steps and observers built into Kiln, and the modules uploaded to the master.
    List(crate::client_cmd::ListArgs),
    /// Upload a step, observer or policy component to the master, which checks and stores
    /// it; builders can use it by name and version at once.
    Upload(crate::client_cmd::UploadArgs),
    /// Delete an uploaded module version that the configuration does not use.
    Delete(crate::client_cmd::DeleteArgs),
}

/// Arguments of `kiln step run`.
#[derive(Debug, Args)]
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

/// Sets up logging to stderr: `KILN_LOG` (or `RUST_LOG`) filters, warnings by default.
pub fn init_tracing() {
    let filter = std::env::var("KILN_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "warn".into());
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never escape codes in a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Step(StepCommand::Run(args)) => crate::step_cmd::run(*args),
        Command::Step(StepCommand::List(args)) => crate::client_cmd::list(args),
        Command::Step(StepCommand::Upload(args)) => crate::client_cmd::upload(args),
        Command::Step(StepCommand::Delete(args)) => crate::client_cmd::delete(args),
        Command::Master(args) => crate::master_cmd::master(args),
        Command::Demo(args) => crate::demo::demo(args),
        Command::Checkconfig(args) => crate::master_cmd::checkconfig(args),
        Command::Sendchange(args) => crate::client_cmd::sendchange(*args),
        Command::Force(args) => crate::client_cmd::force(*args),
        Command::Try(args) => crate::try_cmd::try_build(*args),
        Command::Builds(args) => crate::client_cmd::builds(args),
        Command::Status(args) => crate::client_cmd::status(args),
        Command::Workers(args) => crate::client_cmd::workers(args),
        Command::Build(command) => crate::build_cmd::run(command),
        Command::Token(command) => crate::token_cmd::run(command),
    }
}
