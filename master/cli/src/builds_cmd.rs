//! `kiln builds`: recent builds, newest first, as a table or JSON.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

use kiln_client::{segment, with_query};

use crate::args::ClientArgs;
use crate::client_cmd::{block_on, print_json};
use crate::term::{local_time, result_paint, span, summary, table, text};

/// Arguments of `kiln builds`.
#[derive(Debug, Args)]
pub struct BuildsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Only this builder's builds.
    #[arg(long, value_name = "BUILDER")]
    builder: Option<String>,
    /// How many builds, newest first.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20,
        allow_negative_numbers = true
    )]
    limit: i64,
    /// Print the builds as the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `kiln builds`: recent builds, newest first.
pub fn builds(args: BuildsArgs) -> anyhow::Result<ExitCode> {
    let client = args.client.client()?;
    block_on(async move {
        let limit = args.limit.to_string();
        let mut query = vec![("limit", limit.as_str())];
        if let Some(b) = &args.builder {
            query.push(("builder", b));
        }
        let answer = client
            .get(&with_query("/api/v2/builds", &query))
            .await
            .context("listing builds")?;
        let builds = answer["builds"].as_array().cloned().unwrap_or_default();
        if args.json {
            print_json(&Value::Array(builds))?;
            return Ok(ExitCode::SUCCESS);
        }
        if builds.is_empty() {
            if let Some(b) = &args.builder {
                // An unknown builder is a mistake to point out, not an empty list.
                client
                    .get(&format!("/api/v2/builders/{}", segment(b)))
                    .await?;
                println!("builder {b} has no builds yet");
            } else {
                println!("no builds yet");
            }
            return Ok(ExitCode::SUCCESS);
        }
        let rows: Vec<Vec<String>> = builds
            .iter()
            .map(|b| {
                vec![
                    text(&b["buildid"]),
                    text(&b["builder"]),
                    format!("#{}", text(&b["number"])),
                    text(&b["worker"]),
                    local_time(&b["started_at"]),
                    span(&b["started_at"], &b["complete_at"]),
                    if b["complete"] == true {
                        text(&b["results"])
                    } else {
                        "running".into()
                    },
                    summary(b),
                ]
            })
            .collect();
        let color = std::io::stdout().is_terminal();
        print!(
            "{}",
            table(
                &[
                    "BUILD", "BUILDER", "NUMBER", "WORKER", "STARTED", "TOOK", "RESULT", "SUMMARY"
                ],
                &rows,
                |col, t| if col == 6 {
                    result_paint(t, color)
                } else {
                    ("", "")
                }
            )
        );
        Ok(ExitCode::SUCCESS)
    })
}
