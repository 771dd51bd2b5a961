//! `kiln step upload | list | delete`: step, observer and policy modules on the master.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use kiln_client::segment;

use crate::args::ClientArgs;
use crate::client_cmd::block_on;
use crate::term::{human_bytes, local_time, table, text};

/// Arguments of `kiln step upload`.
#[derive(Debug, Args)]
pub struct UploadArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The component: a step, log observer or farm policy (.wasm).
    file: PathBuf,
    /// The module's name, as builders will name it (`module = "NAME@VERSION"`).
    #[arg(long)]
    name: String,
    /// Its version; default: the first 12 hex digits of its SHA-256.
    #[arg(long)]
    version: Option<String>,
}

/// Arguments of `kiln step list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Also list the modules uploaded to the master (the default when a master is named by
    /// --master, KILN_MASTER or the client config file).
    #[arg(long)]
    remote: bool,
}

/// Arguments of `kiln step delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The module's name.
    name: String,
    /// The version to delete.
    version: String,
}

/// `kiln step upload`: sends a module to the master, which checks and stores it.
pub fn upload(args: UploadArgs) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("{}: cannot read it", args.file.display()))?;
    let client = args.client.client()?;
    block_on(async move {
        let mut query = vec![("name", args.name.as_str())];
        if let Some(v) = &args.version {
            query.push(("version", v));
        }
        let m = client
            .upload("/api/v2/stepmodules", &query, "application/wasm", bytes)
            .await
            .with_context(|| format!("the master refused {}", args.file.display()))?;
        let module = format!("{}@{}", text(&m["name"]), text(&m["version"]));
        let kind = text(&m["kind"]);
        let size = m["size"].as_u64().unwrap_or(0);
        if m["created"] == false {
            println!("{module} was uploaded before with the same content; nothing changed");
        } else {
            println!("uploaded {module}: a {kind} component");
        }
        println!("kind:     {kind}");
        println!("sha1:     {}", text(&m["sha1"]));
        println!("sha256:   {}", text(&m["sha256"]));
        println!("size:     {} ({size} bytes)", human_bytes(size));
        let usage = match kind.as_str() {
            "step" => format!("module = \"{module}\" in a [[builders.steps]] entry"),
            "observer" => format!("observers = [{{ module = \"{module}\" }}] in a step"),
            _ => format!("\"module:{module}\" as a [hooks] value"),
        };
        println!("use it:   {usage}");
        Ok(ExitCode::SUCCESS)
    })
}

/// `kiln step list`: the built-ins, and the modules uploaded to the master.
pub fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    crate::step_cmd::list();
    let client = args.client.client()?;
    if !args.remote && !client.master_named() {
        return Ok(ExitCode::SUCCESS);
    }
    let explicit = args.remote;
    block_on(async move {
        let answer = match client.get("/api/v2/stepmodules?limit=10000").await {
            Ok(a) => a,
            // Listing the built-ins was asked for too; a master away is said, not fatal.
            Err(e) if !explicit => {
                eprintln!("kiln: warning: cannot list the modules uploaded to the master: {e}");
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => return Err(anyhow::Error::new(e).context("listing uploaded modules")),
        };
        let modules = answer["stepmodules"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        println!();
        if modules.is_empty() {
            println!("no modules uploaded to {}", client.base());
            return Ok(ExitCode::SUCCESS);
        }
        println!("uploaded to {}:", client.base());
        let rows: Vec<Vec<String>> = modules
            .iter()
            .map(|m| {
                let used: Vec<String> = m["used_by"]
                    .as_array()
                    .map(|u| u.iter().map(text).collect())
                    .unwrap_or_default();
                vec![
                    text(&m["name"]),
                    text(&m["version"]),
                    text(&m["kind"]),
                    human_bytes(m["size"].as_u64().unwrap_or(0)),
                    text(&m["sha256"]).chars().take(12).collect(),
                    local_time(&m["uploaded_at"]),
                    if used.is_empty() {
                        "-".into()
                    } else {
                        used.join(", ")
                    },
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &[
                    "NAME", "VERSION", "KIND", "SIZE", "SHA256", "UPLOADED", "USED BY"
                ],
                &rows,
                |_, _| ("", "")
            )
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// `kiln step delete`: deletes an uploaded version the configuration does not use.
pub fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let client = args.client.client()?;
    block_on(async move {
        client
            .delete(&format!(
                "/api/v2/stepmodules/{}/{}",
                segment(&args.name),
                segment(&args.version)
            ))
            .await?;
        println!("deleted {}@{}", args.name, args.version);
        Ok(ExitCode::SUCCESS)
    })
}
