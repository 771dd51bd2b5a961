//! `kiln token`: API tokens, made and revoked where the farm's database is (on the master's
//! machine), as one makes a user on a database server.

use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};

use crate::args::FarmArgs;
use kiln_db as db;
use kiln_db::model::now_ms;
use kiln_protocol::api::Role;

/// `kiln token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it (the only time it is shown; the master keeps its SHA-256).
    Create(CreateArgs),
    /// List the tokens: names, roles, when made.
    List(ListArgs),
    /// Revoke a token: requests carrying it are refused from now on.
    Revoke(RevokeArgs),
}

/// Arguments of `kiln token create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    farm: FarmArgs,
    /// A name for the token: who or what uses it ("ci", "alice").
    name: String,
    /// What it may do: read, force (force, stop, cancel, rebuild), upload (step modules) or
    /// admin (everything); each includes the ones before it.
    #[arg(long, default_value = "force")]
    role: String,
}

/// Arguments of `kiln token list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    farm: FarmArgs,
}

/// Arguments of `kiln token revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    farm: FarmArgs,
    /// The token's name.
    name: String,
}

/// Runs a `kiln token` command.
pub fn run(command: TokenCommand) -> anyhow::Result<ExitCode> {
    crate::master_cmd::runtime()?.block_on(async {
        match command {
            TokenCommand::Create(a) => {
                let role = Role::parse(&a.role).map_err(anyhow::Error::msg)?;
                if kiln_config::check_name(&a.name).is_err() {
                    bail!(
                        "{:?} is not a token name; use letters, digits, '-', '_' and '.'",
                        a.name
                    );
                }
                let (_, db) = crate::master_cmd::open_farm(&a.farm).await?;
                let token = kiln_db::tokens::new_token();
                let mut conn = db.pool().acquire().await?;
                if !db::insert_token(&mut conn, &a.name, role.name(), &kiln_db::tokens::token_hash(&token), now_ms())
                    .await?
                {
                    bail!(
                        "there is a token named {:?} already; revoke it first (kiln token revoke {}) or pick another name",
                        a.name,
                        a.name
                    );
                }
                eprintln!(
                    "kiln token: made {:?} with the {role} role; it is shown once, keep it (KILN_TOKEN=...):",
                    a.name
                );
                println!("{token}");
            }
            TokenCommand::List(a) => {
                let (_, db) = crate::master_cmd::open_farm(&a.farm).await?;
                let mut conn = db.pool().acquire().await?;
                let tokens = db::tokens(&mut conn).await?;
                if tokens.is_empty() {
                    println!("no tokens (make one with `kiln token create NAME --role ROLE`)");
                }
                for t in tokens {
                    let made = chrono::DateTime::from_timestamp_millis(t.created_ms)
                        .map(|d| d.format("%Y-%m-%d %H:%M UTC").to_string())
                        .unwrap_or_default();
                    println!("{:<24} {:<7} made {made}", t.name, t.role);
                }
            }
            TokenCommand::Revoke(a) => {
                let (_, db) = crate::master_cmd::open_farm(&a.farm).await?;
                let mut conn = db.pool().acquire().await?;
                if !db::delete_token(&mut conn, &a.name).await? {
                    bail!("there is no token named {:?} (kiln token list shows them)", a.name);
                }
                println!("revoked {:?}", a.name);
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
