//! `kiln try`, as `buildbot try`: builds what is in a local git checkout, uncommitted, on the
//! farm. The base is the merge-base of HEAD with the current branch's upstream (or
//! `--baserev`); the patch is the diff from it to the working tree (staged or not; untracked
//! files with `--untracked`), with binary files as git binary patches. The master builds that
//! source stamp through a try scheduler (`POST /api/v2/tryschedulers/{name}`, the force role;
//! a scheduler's `users` list names the tokens it takes), whose builders' first git step
//! applies the patch after its checkout. With `--wait`, each build is followed as
//! `kiln force --wait` follows one.
//!
//! `kiln_protocol::api::TryBody` is the request, shared by this command and the master, which
//! checks it (`master::schedulers::try_request`) before anything is stored.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Map, Value};

use crate::args::ClientArgs;
use crate::client_cmd::block_on;
use crate::term::text;
use kiln_client::{segment, submitted_requests, with_query};
use kiln_protocol::api::TryBody;
use master::schedulers::MAX_TRY_PATCH;

/// Arguments of `kiln try`.
#[derive(Debug, Args)]
pub struct TryArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// A builder to build on (repeatable); default: all of the try scheduler's builders.
    #[arg(long = "builder", short = 'b', value_name = "BUILDER")]
    builders: Vec<String>,
    /// The try scheduler, when the master has several.
    #[arg(long, value_name = "NAME")]
    scheduler: Option<String>,
    /// Follow the builds (one after the other): their logs as they are written and a table of
    /// steps; the exit status is the worst result's.
    #[arg(long)]
    wait: bool,
    /// The revision the patch applies to. Default: where HEAD meets the current branch's
    /// upstream (git merge-base HEAD @{upstream}).
    #[arg(long, value_name = "REV")]
    baserev: Option<String>,
    /// The branch the base is on. Default: the upstream's branch.
    #[arg(long)]
    branch: Option<String>,
    /// The repository. Default: the upstream remote's URL.
    #[arg(long)]
    repository: Option<String>,
    /// Include untracked files (those .gitignore does not ignore) in the patch.
    #[arg(long)]
    untracked: bool,
    /// Send this diff (`-` for stdin) instead of the working tree's; needs --baserev.
    #[arg(long, value_name = "FILE")]
    diff: Option<PathBuf>,
    /// The -p level of --diff.
    #[arg(long, short = 'p', value_name = "N", default_value_t = 1)]
    patchlevel: u32,
    /// Why (shown in the builds' reason).
    #[arg(long, short = 'm', default_value = "")]
    comment: String,
    /// A build property, NAME=VALUE (VALUE read as JSON if it parses).
    #[arg(long = "property", value_name = "NAME=VALUE", value_parser = crate::props::PropArg::parse)]
    properties: Vec<crate::props::PropArg>,
    /// Print what would be sent (the base, the branch and the patch) and send nothing.
    #[arg(long)]
    dry_run: bool,
    /// The git checkout. Default: the current directory.
    #[arg(long, short = 'C', value_name = "DIR", default_value = ".")]
    dir: PathBuf,
}

/// Runs git in `dir`; its stdout, or an error naming the command and what git said.
fn git(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> anyhow::Result<Vec<u8>> {
    let mut cmd = Command::new("git");
    cmd.args(args).current_dir(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .context("cannot run git (is it installed and on PATH?)")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn git_text(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    Ok(String::from_utf8_lossy(&git(dir, args, &[])?)
        .trim()
        .to_owned())
}

/// What `kiln try` found in the checkout.
#[derive(Debug)]
struct Local {
    baserev: String,
    branch: Option<String>,
    repository: String,
    patch: String,
}

/// The current branch's upstream: (remote, branch on the remote), if it has one.
fn upstream(dir: &Path) -> Option<(String, String)> {
    let current = git_text(dir, &["symbolic-ref", "--quiet", "--short", "HEAD"]).ok()?;
    let remote = git_text(dir, &["config", &format!("branch.{current}.remote")]).ok()?;
    let merge = git_text(dir, &["config", &format!("branch.{current}.merge")]).ok()?;
    let branch = merge
        .strip_prefix("refs/heads/")
        .unwrap_or(&merge)
        .to_owned();
    Some((remote, branch))
}

/// The diff from `base` to the working tree, through a copy of the index (so the real one is
/// untouched): tracked files as they are on disk, untracked ones too if asked.
fn working_tree_diff(top: &Path, base: &str, untracked: bool) -> anyhow::Result<Vec<u8>> {
    let index = PathBuf::from(git_text(
        top,
        &["rev-parse", "--path-format=absolute", "--git-path", "index"],
    )?);
    let scratch = tempfile::tempdir().context("cannot make a temporary directory")?;
    let copy = scratch.path().join("index");
    if index.exists() {
        std::fs::copy(&index, &copy).with_context(|| format!("cannot copy {}", index.display()))?;
    }
    let env = [("GIT_INDEX_FILE", copy.as_path())];
    if !index.exists() {
        git(top, &["read-tree", "HEAD"], &env)?;
    }
    git(
        top,
        &[
            "add",
            if untracked { "--all" } else { "--update" },
            "--",
            ".",
        ],
        &env,
    )?;
    let diff = |extra: &[&str]| -> anyhow::Result<Vec<u8>> {
        let mut args = vec![
            "-c",
            "diff.noprefix=false",
            "-c",
            "diff.mnemonicPrefix=false",
            "diff",
            "--cached",
            "--binary",
            "--full-index",
            "--no-color",
            "--no-ext-diff",
            "--no-textconv",
            "--no-renames",
        ];
        args.extend(extra);
        args.extend([base, "--"]);
        git(top, &args, &env)
    };
    let patch = diff(&[])?;
    if std::str::from_utf8(&patch).is_ok() {
        return Ok(patch);
    }
    // Text in another encoding: send every file as a git binary patch (ASCII) instead.
    let attributes = scratch.path().join("attributes");
    std::fs::write(&attributes, "* -diff\n")?;
    let attr = format!("core.attributesFile={}", attributes.display());
    let mut args = vec!["-c", attr.as_str()];
    args.extend([
        "diff",
        "--cached",
        "--binary",
        "--full-index",
        "--no-color",
        "--no-ext-diff",
        "--no-renames",
        base,
        "--",
    ]);
    git(top, &args, &env)
}

/// A remote's URL as the master should see it: a relative local path made absolute (it was
/// relative to this checkout), and a password (`https://user:TOKEN@host/...`) left out, so a
/// personal credential is not stored with the build.
fn remote_url(top: &Path, url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        return match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}@{host}{path}")
            }
            None => url.to_owned(),
        };
    }
    // `host:path` (scp-like) has a colon before any slash; anything else is a local path.
    let scp_like = url
        .find(':')
        .is_some_and(|colon| url.find('/').is_none_or(|slash| colon < slash));
    let path = Path::new(url);
    if scp_like || path.is_absolute() {
        return url.to_owned();
    }
    let joined = top.join(path);
    joined
        .canonicalize()
        .unwrap_or(joined)
        .display()
        .to_string()
}

/// Works out the base, the branch, the repository and the patch.
fn local(args: &TryArgs) -> anyhow::Result<Local> {
    let dir = &args.dir;
    let top = PathBuf::from(
        git_text(dir, &["rev-parse", "--show-toplevel"])
            .with_context(|| format!("{} is not in a git checkout", dir.display()))?,
    );
    let upstream = upstream(&top);
    let baserev = match (&args.baserev, &upstream) {
        (Some(rev), _) => git_text(
            &top,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{rev}^{{commit}}"),
            ],
        )
        .ok()
        .filter(|r| !r.is_empty())
        .with_context(|| format!("--baserev {rev}: no such commit in this checkout"))?,
        (None, Some(_)) => git_text(&top, &["merge-base", "HEAD", "@{upstream}"])
            .context("cannot find where HEAD meets its upstream; fetch it, or give --baserev")?,
        (None, None) => bail!(
            "the current branch has no upstream to try against; set one (git branch --set-upstream-to origin/main) or give --baserev REV"
        ),
    };
    let branch = args
        .branch
        .clone()
        .or_else(|| upstream.as_ref().map(|(_, b)| b.clone()));
    let repository = match (&args.repository, &upstream) {
        (Some(r), _) => r.clone(),
        (None, Some((remote, _))) if remote != "." => {
            git_text(&top, &["remote", "get-url", remote])
                .map(|url| remote_url(&top, &url))
                .unwrap_or_default()
        }
        _ => String::new(),
    };
    let patch = match &args.diff {
        Some(file) => {
            if args.baserev.is_none() {
                bail!(
                    "--diff sends a patch made elsewhere: give the revision it applies to with --baserev"
                );
            }
            let mut bytes = Vec::new();
            if file.as_os_str() == "-" {
                std::io::stdin()
                    .read_to_end(&mut bytes)
                    .context("cannot read the patch from stdin")?;
            } else {
                bytes = std::fs::read(file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
            }
            bytes
        }
        None => working_tree_diff(&top, &baserev, args.untracked)?,
    };
    let patch = String::from_utf8(patch).map_err(|_| {
        anyhow::anyhow!(
            "the patch is not UTF-8 text; make it with git diff --binary, which encodes other bytes"
        )
    })?;
    if patch.trim().is_empty() {
        bail!(
            "nothing to try: the working tree does not differ from {} (use kiln force to build a revision as it is{})",
            &baserev[..12.min(baserev.len())],
            if args.untracked {
                ""
            } else {
                "; --untracked adds new files"
            }
        );
    }
    if patch.len() > MAX_TRY_PATCH {
        bail!(
            "the patch is {} bytes; the limit is {} MiB",
            patch.len(),
            MAX_TRY_PATCH >> 20
        );
    }
    Ok(Local {
        baserev,
        branch,
        repository,
        patch,
    })
}

/// The try scheduler and builders to use.
fn pick_scheduler(args: &TryArgs, schedulers: &[Value]) -> anyhow::Result<(String, Vec<String>)> {
    let tries: Vec<&Value> = schedulers.iter().filter(|s| s["type"] == "try").collect();
    let names = |list: &[&Value]| {
        list.iter()
            .map(|s| text(&s["name"]))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let builders_of = |s: &Value| -> Vec<String> {
        s["builders"]
            .as_array()
            .map(|b| b.iter().map(text).collect())
            .unwrap_or_default()
    };
    if tries.is_empty() {
        bail!(
            "the master has no try scheduler; add one to kiln.toml ([[schedulers]] with type = \"try\" and the builders it may build)"
        );
    }
    let fits = |s: &Value| {
        let has = builders_of(s);
        args.builders.iter().all(|b| has.contains(b))
    };
    let s = match &args.scheduler {
        Some(name) => {
            let Some(s) = tries.iter().find(|s| s["name"] == name.as_str()) else {
                bail!(
                    "there is no try scheduler {name:?} (defined: {})",
                    names(&tries)
                );
            };
            if !fits(s) {
                bail!(
                    "try scheduler {name:?} does not build {}; its builders: {}",
                    args.builders
                        .iter()
                        .filter(|b| !builders_of(s).contains(b))
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    builders_of(s).join(", ")
                );
            }
            *s
        }
        None => {
            let fitting: Vec<&Value> = tries.iter().copied().filter(|s| fits(s)).collect();
            match fitting.as_slice() {
                [s] => *s,
                [] => {
                    let mut all: Vec<String> = tries.iter().flat_map(|s| builders_of(s)).collect();
                    all.sort();
                    all.dedup();
                    bail!(
                        "no try scheduler builds {}; the builders one can try on are: {}",
                        args.builders.join(", "),
                        all.join(", ")
                    );
                }
                several => bail!(
                    "several try schedulers could take this ({}); pick one with --scheduler NAME",
                    names(several)
                ),
            }
        }
    };
    let builders = if args.builders.is_empty() {
        builders_of(s)
    } else {
        args.builders.clone()
    };
    Ok((text(&s["name"]), builders))
}

/// `kiln try`: sends the working tree's diff to the master as a try build.
pub fn try_build(args: TryArgs) -> anyhow::Result<ExitCode> {
    if args.diff.is_some() && args.untracked {
        bail!("--untracked is about the working tree; it does not go with --diff");
    }
    let local = local(&args)?;
    let mut properties = Map::new();
    for p in &args.properties {
        properties.insert(p.name.clone(), p.json());
    }
    if args.dry_run {
        println!("base:       {}", local.baserev);
        println!("branch:     {}", local.branch.as_deref().unwrap_or("-"));
        println!(
            "repository: {}",
            if local.repository.is_empty() {
                "-"
            } else {
                &local.repository
            }
        );
        println!(
            "patch:      {} bytes, -p{}",
            local.patch.len(),
            args.patchlevel
        );
        print!("{}", local.patch);
        return Ok(ExitCode::SUCCESS);
    }
    let client = args.client.client()?;
    block_on(async move {
        let answer = client
            .get("/api/v2/schedulers")
            .await
            .context("reading the schedulers")?;
        let schedulers = answer["schedulers"].as_array().cloned().unwrap_or_default();
        let (scheduler, builders) = pick_scheduler(&args, &schedulers)?;
        let body = TryBody {
            builders,
            baserev: local.baserev.clone(),
            branch: local.branch.clone(),
            repository: local.repository.clone(),
            project: String::new(),
            patch: local.patch,
            patch_level: args.patchlevel,
            comment: args.comment.clone(),
            properties,
        };
        let submitted = client
            .post(
                &format!("/api/v2/tryschedulers/{}", segment(&scheduler)),
                &serde_json::to_value(&body)?,
            )
            .await?;
        let buildset = text(&submitted["buildsetid"]);
        let requests = submitted_requests(&submitted);
        println!(
            "try buildset {buildset} on {} (base {}{}):",
            scheduler,
            &local.baserev[..12],
            local
                .branch
                .as_deref()
                .map_or(String::new(), |b| format!(" on {b}"))
        );
        for (request, builder) in &requests {
            println!(
                "  request {request} for {builder}: {}",
                client.page(&with_query("/builds", &[("builder", builder)]))
            );
        }
        if !args.wait {
            return Ok(ExitCode::SUCCESS);
        }
        // Followed one after the other; the worst result decides.
        let mut worst = ExitCode::SUCCESS;
        let rank = |c: ExitCode| {
            [ExitCode::SUCCESS, ExitCode::from(1), ExitCode::from(3)]
                .iter()
                .position(|x| *x == c)
                .unwrap_or(3)
        };
        for (request, builder) in &requests {
            if requests.len() > 1 {
                println!("== {builder} (request {request})");
            }
            let code = crate::follow::follow(&client, *request, builder).await?;
            if code == ExitCode::from(130) {
                return Ok(code);
            }
            if rank(code) > rank(worst) {
                worst = code;
            }
        }
        Ok(worst)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_url_loses_its_password_and_a_relative_path_its_relativity() {
        let top = Path::new("/nonexistent/work/app");
        assert_eq!(
            remote_url(top, "https://ada:ghp_s3cr3t@github.com/org/app.git"),
            "https://ada@github.com/org/app.git"
        );
        assert_eq!(
            remote_url(top, "ssh://git@host:22/app.git"),
            "ssh://git@host:22/app.git"
        );
        assert_eq!(
            remote_url(top, "git@github.com:org/app.git"),
            "git@github.com:org/app.git"
        );
        assert_eq!(remote_url(top, "/srv/git/app.git"), "/srv/git/app.git");
        assert_eq!(
            remote_url(top, "../upstream"),
            "/nonexistent/work/app/../upstream"
        );
    }
}
