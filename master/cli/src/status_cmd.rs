//! `kiln status`: the farm at a glance: builders, workers, the queue.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Args;
use serde_json::{Value, json};

use crate::args::ClientArgs;
use crate::client_cmd::{block_on, print_json};
use crate::term::{ago, result_paint, span, table, text};

use crate::workers_cmd::workers_table;

/// Arguments of `kiln status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Print what the master answered as JSON (builders, workers, queue length, caller).
    #[arg(long)]
    json: bool,
}

fn builder_state(b: &Value) -> &'static str {
    if b["running"].as_i64().unwrap_or(0) > 0 {
        "building"
    } else if b["pending"].as_i64().unwrap_or(0) > 0 {
        "waiting"
    } else {
        "idle"
    }
}

fn last_build(b: &Value) -> String {
    let last = &b["last_build"];
    if last.is_null() {
        return "-".into();
    }
    if last["complete"] == true {
        format!(
            "#{} {}, {}",
            text(&last["number"]),
            text(&last["results"]),
            ago(&last["complete_at"])
        )
    } else {
        format!(
            "#{} running for {}",
            text(&last["number"]),
            span(&last["started_at"], &Value::Null)
        )
    }
}

/// `kiln status`: the farm at a glance.
pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = args.client.client()?;
    block_on(async move {
        let builders = client.get("/api/v2/builders").await?;
        let workers = client.get("/api/v2/workers").await?;
        let queue = client
            .get("/api/v2/buildrequests?complete=false&claimed=false&limit=1")
            .await?;
        let caller = client.get("/api/v2/auth").await?;
        let builders = builders["builders"].as_array().cloned().unwrap_or_default();
        let workers = workers["workers"].as_array().cloned().unwrap_or_default();
        let queued = queue["meta"]["total"].as_i64().unwrap_or(0);
        if args.json {
            print_json(&json!({
                "master": client.base(),
                "caller": caller,
                "queue": queued,
                "builders": builders,
                "workers": workers,
            }))?;
            return Ok(ExitCode::SUCCESS);
        }
        let who = match caller["name"].as_str() {
            Some(name) => format!("token {name:?}, {} role", text(&caller["role"])),
            None => format!("anonymous, {} role", text(&caller["role"])),
        };
        let connected = workers.iter().filter(|w| w["connected"] == true).count();
        let mut out = format!(
            "master   {} ({who})\nqueue    {queued} request{} waiting\nworkers  {connected} of {} connected\n",
            client.base(),
            if queued == 1 { "" } else { "s" },
            workers.len()
        );
        let color = std::io::stdout().is_terminal();
        if !builders.is_empty() {
            let rows: Vec<Vec<String>> = builders
                .iter()
                .map(|b| {
                    vec![
                        text(&b["name"]),
                        builder_state(b).into(),
                        text(&b["pending"]),
                        text(&b["running"]),
                        last_build(b),
                    ]
                })
                .collect();
            out += "\n";
            out += &table(
                &["BUILDER", "STATE", "PENDING", "RUNNING", "LAST BUILD"],
                &rows,
                |col, t| match col {
                    4 => t
                        .split_whitespace()
                        .nth(1)
                        .map_or(("", ""), |r| result_paint(r.trim_end_matches(','), color)),
                    _ => ("", ""),
                },
            );
        }
        if !workers.is_empty() {
            out += "\n";
            out += &workers_table(&workers);
        }
        print!("{out}");
        Ok(ExitCode::SUCCESS)
    })
}
