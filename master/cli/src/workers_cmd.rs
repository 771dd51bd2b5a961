//! `kiln workers`: the configured workers, connected or not, with their builds, health and
//! pause.

use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use crate::args::ClientArgs;
use crate::client_cmd::{block_on, print_json};
use crate::term::{table, text};

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

pub(crate) fn workers_table(workers: &[Value]) -> String {
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
