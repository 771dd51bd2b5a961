//! The Kiln master and the `kiln` command line. The master proper (configuration, database,
//! schedulers, dispatch, API) grows here; today it holds the CLI and `kiln step` commands.

pub mod cli;
pub mod config;
mod step_cmd;
