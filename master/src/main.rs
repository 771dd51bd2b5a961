//! `kiln`: the command line of the Kiln build farm.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // A kiln binary doubles as the sandbox's confinement helper; that must come before anything
    // else (no threads, no logging).
    runtime::confine::run_helper_if_requested();
    let cli = master::cli::Cli::parse();
    master::cli::init_tracing();
    match master::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            ExitCode::from(master::cli::EXIT_BAD_INPUT)
        }
    }
}
