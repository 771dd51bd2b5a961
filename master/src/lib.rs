//! The Kiln master and the `kiln` command line. The master proper (configuration, database,
//! schedulers, workers and dispatch, API) and the `kiln` command line.

pub mod api;
pub mod auth;
mod build_cmd;
pub mod change_hooks;
pub mod changes;
pub mod cli;
pub mod client;
mod client_cmd;
pub mod config;
pub mod db;
pub mod demo;
pub mod filecache;
mod follow;
pub mod hooks;
pub mod jobs;
pub mod latent;
mod master_cmd;
pub mod metrics;
pub mod model;
pub mod pgtemp;
pub mod poller;
pub mod properties;
pub mod reporters;
pub mod requests;
pub mod schedulers;
pub mod secrets;
pub mod server;
pub mod step_cmd;
pub mod tls;
mod token_cmd;
mod try_cmd;
pub mod ui;
pub mod workers;
