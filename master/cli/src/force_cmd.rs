//! `kiln force`: forces a build through a force scheduler; with `--wait`, follows it
//! ([`crate::follow`]) and exits with its result.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use kiln_client::{segment, submitted_requests, with_query};

use crate::args::ClientArgs;
use crate::client_cmd::block_on;
use crate::props::PropArg;
use crate::term::text;

/// Arguments of `kiln force`.
#[derive(Debug, Args)]
pub struct ForceArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The builder to build. (The older form, a force scheduler's name, still works: it builds
    /// all of that scheduler's builders, or those given with --builder.)
    builder: String,
    /// The force scheduler to use, when several have the builder.
    #[arg(long, value_name = "NAME")]
    scheduler: Option<String>,
    /// With a scheduler's name instead of a builder: a builder of it to build (repeatable).
    #[arg(long = "builder", value_name = "BUILDER")]
    builders: Vec<String>,
    /// A parameter of the force scheduler, NAME=VALUE; VALUE is converted to the parameter's
    /// type (int, bool, string, choice) and checked by the master.
    #[arg(long = "prop", visible_alias = "param", value_name = "NAME=VALUE", value_parser = PropArg::parse)]
    props: Vec<PropArg>,
    /// Why.
    #[arg(long, default_value = "")]
    reason: String,
    /// Who asks (default: the token's name).
    #[arg(long)]
    owner: Option<String>,
    /// The branch to build.
    #[arg(long)]
    branch: Option<String>,
    /// The revision to build.
    #[arg(long)]
    revision: Option<String>,
    /// The repository to build.
    #[arg(long)]
    repository: Option<String>,
    /// The request's priority (higher starts first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i64,
    /// Follow the build: a progress line, its logs as they are written, a table of its steps;
    /// the exit status follows its result.
    #[arg(long)]
    wait: bool,
}

/// The force scheduler and builders a `kiln force` names.
fn pick_scheduler(args: &ForceArgs, schedulers: &[Value]) -> anyhow::Result<(Value, Vec<String>)> {
    let names = |list: &[&Value]| -> String {
        list.iter()
            .filter_map(|s| s["name"].as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let has = |s: &Value, builder: &str| {
        s["builders"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b == builder))
    };
    if schedulers.is_empty() {
        bail!(
            "the master has no force scheduler; add one to kiln.toml ([[schedulers]] with type = \"force\" and the builders it may force)"
        );
    }
    let all: Vec<&Value> = schedulers.iter().collect();
    let named = |name: &str| schedulers.iter().find(|s| s["name"] == name);
    let wanted = &args.builder;
    let with_builder: Vec<&Value> = schedulers.iter().filter(|s| has(s, wanted)).collect();
    if !with_builder.is_empty() {
        if !args.builders.is_empty() {
            bail!(
                "--builder goes with a force scheduler's name; {wanted:?} is a builder, so drop --builder"
            );
        }
        let s = match &args.scheduler {
            Some(name) => match named(name) {
                Some(s) if has(s, wanted) => s,
                Some(_) => bail!(
                    "force scheduler {name:?} does not build {wanted:?}; these do: {}",
                    names(&with_builder)
                ),
                None => bail!(
                    "there is no force scheduler {name:?} (defined: {})",
                    names(&all)
                ),
            },
            None if with_builder.len() == 1 => with_builder[0],
            None => bail!(
                "builder {wanted:?} is in several force schedulers ({}); pick one with --scheduler NAME",
                names(&with_builder)
            ),
        };
        return Ok((s.clone(), vec![wanted.clone()]));
    }
    // The older form: a scheduler's name, all of its builders or those of --builder.
    if let Some(s) = named(wanted).filter(|_| args.scheduler.is_none()) {
        let builders = if args.builders.is_empty() {
            s["builders"]
                .as_array()
                .map(|b| b.iter().map(text).collect())
                .unwrap_or_default()
        } else {
            args.builders.clone()
        };
        return Ok((s.clone(), builders));
    }
    let mut forceable: Vec<String> = schedulers
        .iter()
        .flat_map(|s| s["builders"].as_array().cloned().unwrap_or_default())
        .map(|b| text(&b))
        .collect();
    forceable.sort();
    forceable.dedup();
    bail!(
        "no force scheduler builds {wanted:?}; the builders one can force are: {}",
        forceable.join(", ")
    )
}

/// The scheduler's parameters from `--prop NAME=VALUE`, typed as the scheduler declares them
/// (a value that does not convert is sent as given, for the master to refuse with its reason).
fn parameters(scheduler: &Value, props: &[PropArg]) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for PropArg { name, value } in props {
        let kind = scheduler["parameters"]
            .as_array()
            .and_then(|ps| ps.iter().find(|x| x["name"] == name.as_str()))
            .and_then(|x| x["type"].as_str())
            .unwrap_or("string");
        let typed = match kind {
            "int" => value.trim().parse::<i64>().ok().map(Value::from),
            "bool" => match value.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Some(Value::Bool(true)),
                "false" | "no" | "off" | "0" => Some(Value::Bool(false)),
                _ => None,
            },
            _ => None,
        };
        out.insert(
            name.to_owned(),
            typed.unwrap_or_else(|| Value::String(value.to_owned())),
        );
    }
    out
}

/// `kiln force`: forces a build through a force scheduler; with `--wait`, follows it.
pub fn force(args: ForceArgs) -> anyhow::Result<ExitCode> {
    let client = args.client.client()?;
    block_on(async move {
        let answer = client
            .get("/api/v2/forceschedulers")
            .await
            .context("reading the force schedulers")?;
        let schedulers = answer["forceschedulers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let (scheduler, builders) = pick_scheduler(&args, &schedulers)?;
        let name = text(&scheduler["name"]);
        if args.wait && builders.len() != 1 {
            bail!(
                "--wait follows one build; scheduler {name:?} builds {}: name one builder",
                builders.join(", ")
            );
        }
        let mut body = json!({
            "builders": builders,
            "reason": args.reason,
            "parameters": parameters(&scheduler, &args.props),
            "priority": args.priority,
        });
        for (key, value) in [
            ("owner", &args.owner),
            ("branch", &args.branch),
            ("revision", &args.revision),
            ("repository", &args.repository),
        ] {
            if let Some(v) = value {
                body[key] = Value::String(v.clone());
            }
        }
        let submitted = client
            .post(
                &format!("/api/v2/forceschedulers/{}", segment(&name)),
                &body,
            )
            .await?;
        let buildset = text(&submitted["buildsetid"]);
        let requests = submitted_requests(&submitted);
        if args.wait
            && let [(request, builder)] = requests.as_slice()
        {
            println!("request {request} queued for {builder} (buildset {buildset})");
            return crate::follow::follow(&client, *request, builder).await;
        }
        for (request, builder) in &requests {
            let started = client
                .get(&format!("/api/v2/builds?buildrequestid={request}&limit=1"))
                .await?;
            match started["builds"][0]["buildid"].as_i64() {
                Some(build) => println!(
                    "request {request} started as build {build} on {builder}: {}",
                    client.page(&format!("/builds/{build}"))
                ),
                None => println!(
                    "request {request} queued for {builder} (buildset {buildset}): {}",
                    client.page(&with_query("/builds", &[("builder", builder)]))
                ),
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheds() -> Vec<Value> {
        vec![
            json!({"name": "force", "builders": ["linux", "mac"], "parameters": [
                {"name": "jobs", "type": "int"}, {"name": "fast", "type": "bool"},
                {"name": "who", "type": "string"}]}),
            json!({"name": "release", "builders": ["linux"], "parameters": []}),
            json!({"name": "docs", "builders": ["docs"], "parameters": []}),
        ]
    }

    fn args(builder: &str, scheduler: Option<&str>, builders: &[&str]) -> ForceArgs {
        ForceArgs {
            client: ClientArgs::default(),
            builder: builder.into(),
            scheduler: scheduler.map(Into::into),
            builders: builders.iter().map(|b| b.to_string()).collect(),
            props: Vec::new(),
            reason: String::new(),
            owner: None,
            branch: None,
            revision: None,
            repository: None,
            priority: 0,
            wait: false,
        }
    }

    #[test]
    fn a_builder_picks_its_force_scheduler() {
        let s = scheds();
        let (sched, builders) = pick_scheduler(&args("docs", None, &[]), &s).unwrap();
        assert_eq!(
            (sched["name"].as_str(), builders),
            (Some("docs"), vec!["docs".into()])
        );
        let e = pick_scheduler(&args("linux", None, &[]), &s)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "builder \"linux\" is in several force schedulers (force, release); pick one with --scheduler NAME"
        );
        let (sched, _) = pick_scheduler(&args("linux", Some("release"), &[]), &s).unwrap();
        assert_eq!(sched["name"], "release");
        let e = pick_scheduler(&args("mac", Some("release"), &[]), &s)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "force scheduler \"release\" does not build \"mac\"; these do: force"
        );
        let e = pick_scheduler(&args("win", None, &[]), &s)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "no force scheduler builds \"win\"; the builders one can force are: docs, linux, mac"
        );
    }

    #[test]
    fn a_scheduler_name_still_forces_its_builders() {
        let s = scheds();
        let (sched, builders) = pick_scheduler(&args("force", None, &[]), &s).unwrap();
        assert_eq!(sched["name"], "force");
        assert_eq!(builders, vec!["linux".to_owned(), "mac".to_owned()]);
        let (_, builders) = pick_scheduler(&args("force", None, &["mac"]), &s).unwrap();
        assert_eq!(builders, vec!["mac".to_owned()]);
        let e = pick_scheduler(&args("docs", None, &["x"]), &s)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--builder goes with a force scheduler's name"),
            "{e}"
        );
        assert!(
            pick_scheduler(&args("x", None, &[]), &[])
                .unwrap_err()
                .to_string()
                .starts_with("the master has no force scheduler")
        );
    }

    #[test]
    fn props_are_typed_by_the_parameters() {
        let s = &scheds()[0];
        let props: Vec<PropArg> = ["jobs=8", "fast=yes", "who=ada=b", "other=1", "jobs2=x"]
            .into_iter()
            .map(|p| PropArg::parse(p).unwrap())
            .collect();
        let p = parameters(s, &props);
        assert_eq!(
            Value::Object(p),
            json!({"jobs": 8, "fast": true, "who": "ada=b", "other": "1", "jobs2": "x"})
        );
        // What does not convert goes as given: the master says why it is wrong.
        let p = parameters(s, &[PropArg::parse("jobs=many").unwrap()]);
        assert_eq!(p["jobs"], "many");
    }
}
