//! `kiln sendchange`: records a change as a change source would, through the master's API or,
//! with `--direct`, in the farm's database.

use std::process::ExitCode;

use anyhow::bail;
use clap::Args;

use crate::args::{ClientArgs, FarmArgs};
use crate::client_cmd::block_on;
use crate::props::PropArg;
use kiln_db::model::NewChange;

/// Arguments of `kiln sendchange`.
#[derive(Debug, Args)]
pub struct SendchangeArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Write the change into the farm's database (the one kiln.toml names, or --db) instead of
    /// sending it to the master: for a hook on the master's machine that must not lose a
    /// change while the master is down.
    #[arg(long)]
    direct: bool,
    #[command(flatten)]
    farm: FarmArgs,
    /// Who made the change ("Name <email>").
    #[arg(long, short = 'W')]
    who: String,
    /// The branch.
    #[arg(long, short)]
    branch: Option<String>,
    /// The revision (a commit hash).
    #[arg(long, short)]
    revision: Option<String>,
    /// The repository URL.
    #[arg(long, default_value = "")]
    repository: String,
    /// The project.
    #[arg(long, short, default_value = "")]
    project: String,
    /// The codebase.
    #[arg(long, default_value = "")]
    codebase: String,
    /// The commit message.
    #[arg(long, short = 'm', default_value = "")]
    comments: String,
    /// A category.
    #[arg(long, short = 'C')]
    category: Option<String>,
    /// A link to the revision.
    #[arg(long)]
    revlink: Option<String>,
    /// When (seconds since the epoch); now by default.
    #[arg(long)]
    when: Option<f64>,
    /// A change property, NAME=VALUE (VALUE read as JSON if it parses).
    #[arg(long = "property", value_name = "NAME=VALUE", value_parser = PropArg::parse)]
    properties: Vec<PropArg>,
    /// Mark the change untrusted: its builds run only on sandbox workers, without secrets.
    #[arg(long)]
    untrusted: bool,
    /// Files touched.
    files: Vec<String>,
}

impl SendchangeArgs {
    fn change(&self) -> anyhow::Result<NewChange> {
        let mut properties = serde_json::Map::new();
        for p in &self.properties {
            properties.insert(p.name.clone(), p.json());
        }
        let when_ms = match self.when {
            Some(s) if s.is_finite() && s >= 0.0 => Some((s * 1000.0) as i64),
            Some(s) => bail!("--when {s}: give seconds since the epoch"),
            None => None,
        };
        Ok(NewChange {
            author: self.who.clone(),
            comments: self.comments.clone(),
            branch: self.branch.clone(),
            revision: self.revision.clone(),
            revlink: self.revlink.clone(),
            when_ms,
            category: self.category.clone(),
            repository: self.repository.clone(),
            codebase: self.codebase.clone(),
            project: self.project.clone(),
            files: self.files.clone(),
            properties,
            source: "sendchange".into(),
            source_key: None,
            trusted: Some(!self.untrusted),
            committer: None,
        })
    }
}

/// `kiln sendchange`: records a change for the schedulers, through the master's API (or,
/// with `--direct`, in the farm's database).
pub fn sendchange(args: SendchangeArgs) -> anyhow::Result<ExitCode> {
    let change = args.change()?;
    if args.direct {
        return crate::master_cmd::record_change(&args.farm, &change);
    }
    let client = args.client.client()?;
    block_on(async move {
        let answer = client
            .post("/api/v2/changes", &serde_json::to_value(&change)?)
            .await?;
        match answer["changeid"].as_i64() {
            Some(id) => println!("change {id} recorded"),
            None => println!("change already recorded"),
        }
        Ok(ExitCode::SUCCESS)
    })
}
