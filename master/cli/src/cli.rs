//! Command-line definitions (clap derive) and dispatch.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status for input Kiln could not use (a bad file, bad JSON, a bad flag).
pub const EXIT_BAD_INPUT: u8 = 2;

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
    Checkconfig(crate::args::FarmArgs),
    /// Record a change, as a change source would, for the schedulers to build (through the
    /// master's API; with --direct, in the farm's database).
    Sendchange(Box<crate::sendchange_cmd::SendchangeArgs>),
    /// Force a build of a builder; with --wait, follow it live and exit with its result.
    ///
    /// Exit status with --wait: 0 for SUCCESS or WARNINGS, 1 for FAILURE (or a master that
    /// cannot be reached), 2 for a refused request, 3 for any other result.
    Force(Box<crate::force_cmd::ForceArgs>),
    /// Build the local git checkout's uncommitted changes on the farm, as a patch on the
    /// revision it is based on (`buildbot try`); with --wait, follow the builds.
    ///
    /// Exit status with --wait: as `force --wait`, for the worst of the builds.
    Try(Box<crate::try_cmd::TryArgs>),
    /// Recent builds, newest first.
    Builds(crate::builds_cmd::BuildsArgs),
    /// The farm at a glance: builders, workers, the queue.
    Status(crate::status_cmd::StatusArgs),
    /// The configured workers: connected or not, busy, paused, quarantined.
    Workers(crate::workers_cmd::WorkersArgs),
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
    Run(Box<crate::step_cmd::RunArgs>),
    /// List the steps and observers built into Kiln, and the modules uploaded to the master.
    List(crate::module_cmd::ListArgs),
    /// Upload a step, observer or policy component to the master, which checks and stores
    /// it; builders can use it by name and version at once.
    Upload(crate::module_cmd::UploadArgs),
    /// Delete an uploaded module version that the configuration does not use.
    Delete(crate::module_cmd::DeleteArgs),
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
        Command::Step(StepCommand::List(args)) => crate::module_cmd::list(args),
        Command::Step(StepCommand::Upload(args)) => crate::module_cmd::upload(args),
        Command::Step(StepCommand::Delete(args)) => crate::module_cmd::delete(args),
        Command::Master(args) => crate::master_cmd::master(args),
        Command::Demo(args) => crate::demo::demo(args),
        Command::Checkconfig(args) => crate::master_cmd::checkconfig(args),
        Command::Sendchange(args) => crate::sendchange_cmd::sendchange(*args),
        Command::Force(args) => crate::force_cmd::force(*args),
        Command::Try(args) => crate::try_cmd::try_build(*args),
        Command::Builds(args) => crate::builds_cmd::builds(args),
        Command::Status(args) => crate::status_cmd::status(args),
        Command::Workers(args) => crate::workers_cmd::workers(args),
        Command::Build(command) => crate::build_cmd::run(command),
        Command::Token(command) => crate::token_cmd::run(command),
    }
}
