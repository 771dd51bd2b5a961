//! `kiln`: the command line of the Kiln build farm.

use std::process::ExitCode;

use clap::Parser;

mod args;
mod build_cmd;
mod builds_cmd;
mod cli;
mod client_cmd;
mod demo;
mod follow;
mod force_cmd;
mod master_cmd;
mod module_cmd;
mod props;
mod sendchange_cmd;
mod status_cmd;
mod step_cmd;
mod term;
mod token_cmd;
mod try_cmd;
mod workers_cmd;

fn main() -> ExitCode {
    // A kiln binary doubles as the sandbox's confinement helper; that must come before anything
    // else (no threads, no logging).
    runtime::confine::run_helper_if_requested();
    let cli = cli::Cli::parse();
    cli::init_tracing();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            ExitCode::from(cli::EXIT_BAD_INPUT)
        }
    }
}
