//! The git step, as Buildbot's Git: clones or updates a repository into the workdir with the
//! real `git` program, in mode `incremental` or `full` (method `clobber`, `fresh`, `clean` or
//! `copy`), optionally shallow, with submodules, checks out a branch or revision, applies a
//! patch (for try builds), and sets `got_revision` and `got_revision_short`.

use std::collections::BTreeMap;

use guest_sdk::prelude::*;
use serde::Deserialize;

/// The step's arguments. Unknown keys are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    /// What `git clone` is given: a URL or a path.
    repourl: String,
    /// The branch to build; else the build's `branch` property (its source stamp's, as in
    /// Buildbot); else the remote's default branch.
    #[serde(default)]
    branch: Option<String>,
    /// The revision to build (a commit id); else the build's `revision` property (its source
    /// stamp's: the change being built); else the branch's tip.
    #[serde(default)]
    revision: Option<String>,
    /// `incremental` (update in place) or `full` (see `method`).
    #[serde(default)]
    mode: Mode,
    /// For mode `full`: `clobber` (delete and clone), `fresh` (update, then remove untracked
    /// and ignored files), `clean` (update, then remove untracked files) or `copy` (update a
    /// source directory, then copy it fresh).
    #[serde(default)]
    method: Option<Method>,
    /// Clone depth for a shallow clone.
    #[serde(default)]
    shallow: Option<u32>,
    /// Check out submodules too.
    #[serde(default)]
    submodules: bool,
    /// A patch to apply after checkout: the diff text, or {"body": diff, "level": N}.
    #[serde(default)]
    patch: Option<Patch>,
    /// Where the checkout goes, relative to the workdir.
    #[serde(default = "default_dest")]
    dest: String,
    /// Extra git configuration for every git command (`-c key=value`).
    #[serde(default)]
    config: BTreeMap<String, String>,
    /// Seconds each git command may take.
    #[serde(default)]
    timeout: Option<f64>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    #[default]
    Incremental,
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Method {
    Clobber,
    Fresh,
    Clean,
    Copy,
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a patch: the diff text, or {\"body\": diff, \"level\": N}"
)]
enum Patch {
    Body(String),
    Leveled { body: String, level: u32 },
}

fn default_dest() -> String {
    ".".to_owned()
}

/// Where the `copy` method keeps its incrementally updated source.
const COPY_SOURCE: &str = ".kiln-git-source";

/// The file, in the checkout's git directory, a patch is applied from.
const PATCH_FILE: &str = "kiln-try.patch";

/// Checks what serde cannot, before any command runs.
fn check(args: &Args) -> Result<Method, Error> {
    if args.repourl.trim().is_empty() {
        return Err(Error::msg("repourl is empty"));
    }
    if args.repourl.starts_with('-') || args.branch.as_deref().is_some_and(|b| b.starts_with('-')) {
        return Err(Error::msg("repourl and branch may not start with '-'"));
    }
    if let Some(rev) = &args.revision
        && (rev.is_empty() || !rev.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(Error::msg(format!(
            "revision {rev:?} is not a commit id (hex digits)"
        )));
    }
    if let Some(t) = args.timeout {
        guest_sdk::seconds(t, "timeout")?;
    }
    if args.shallow == Some(0) {
        return Err(Error::msg("shallow: give a depth of at least 1"));
    }
    if args.dest.split('/').any(|p| p == "..") || args.dest.starts_with('/') {
        return Err(Error::msg(format!(
            "dest {:?} must stay inside the workdir",
            args.dest
        )));
    }
    match (args.mode, args.method) {
        (Mode::Incremental, None) => Ok(Method::Clean),
        (Mode::Incremental, Some(m)) => Err(Error::msg(format!(
            "method {m:?} goes with mode \"full\"; mode \"incremental\" takes no method"
        ))),
        (Mode::Full, m) => Ok(m.unwrap_or(Method::Fresh)),
    }
}

/// Runs git commands with the step's configuration.
struct Git<'a> {
    config: &'a BTreeMap<String, String>,
    timeout: Option<f64>,
}

impl Git<'_> {
    fn run(
        &self,
        ctx: &mut StepContext,
        dir: &str,
        args: &[&str],
    ) -> Result<guest_sdk::CommandResult, Error> {
        let mut argv = vec!["git".to_owned()];
        for (k, v) in self.config {
            argv.push("-c".to_owned());
            argv.push(format!("{k}={v}"));
        }
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        let mut cmd = ctx
            .command(argv)
            .cwd(dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .capture_stdout(4096);
        if let Some(t) = self.timeout {
            cmd = cmd.timeout(guest_sdk::seconds(t, "timeout")?);
        }
        cmd.run()
    }

    /// Runs a git command that must succeed.
    fn must(&self, ctx: &mut StepContext, dir: &str, args: &[&str]) -> Result<String, Error> {
        let done = self.run(ctx, dir, args)?;
        if done.success() {
            Ok(done.stdout)
        } else {
            Err(Error::msg(format!(
                "git {}: {}",
                args.first().unwrap_or(&""),
                done.describe()
            )))
        }
    }
}

fn is_repo(dir: &str) -> bool {
    std::fs::symlink_metadata(format!("{dir}/.git")).is_ok()
}

/// Removes a directory of the workdir (never following symlinks); "." is emptied.
fn remove(dir: &str) -> Result<(), Error> {
    if dir == "." {
        for entry in std::fs::read_dir(".").map_err(|e| Error::msg(format!("clobber: {e}")))? {
            let entry = entry.map_err(|e| Error::msg(format!("clobber: {e}")))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .map_err(|e| Error::msg(format!("clobber: {e}")))?;
            let done = if kind.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            done.map_err(|e| Error::msg(format!("clobber {}: {e}", path.display())))?;
        }
        return Ok(());
    }
    match std::fs::symlink_metadata(dir) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => {
            std::fs::remove_dir_all(dir).map_err(|e| Error::msg(format!("clobber {dir}: {e}")))
        }
        Ok(_) => std::fs::remove_file(dir).map_err(|e| Error::msg(format!("clobber {dir}: {e}"))),
    }
}

/// Brings `dir` to the wanted commit, cloning or fetching as needed.
fn update(ctx: &mut StepContext, git: &Git<'_>, args: &Args, dir: &str) -> Result<(), Error> {
    let depth = args.shallow.map(|d| format!("--depth={d}"));
    if !is_repo(dir) {
        let empty = std::fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true);
        if !empty {
            return Err(Error::msg(format!(
                "{dir} exists and is not a git repository; use mode \"full\" with method \"clobber\" to replace it"
            )));
        }
        let mut clone = vec!["clone", "--no-checkout"];
        if let Some(d) = &depth {
            clone.push(d);
        }
        // `clone --branch` takes a branch or tag name; a full ref (a pull request's
        // `refs/pull/N/head`, a merge request's) is fetched below instead.
        if let Some(b) = args.branch.as_deref().filter(|b| !b.starts_with("refs/")) {
            clone.extend(["--branch", b]);
        }
        clone.extend(["--", &args.repourl, dir]);
        git.must(ctx, ".", &clone)?;
    }
    // Fetch exactly what is wanted, then check it out.
    let target = args
        .revision
        .as_deref()
        .or(args.branch.as_deref())
        .unwrap_or("HEAD");
    let mut fetch = vec!["fetch", "--force", "--tags"];
    if let Some(d) = &depth {
        fetch.push(d);
    }
    fetch.extend(["--", &args.repourl, target]);
    git.must(ctx, dir, &fetch)?;
    git.must(ctx, dir, &["checkout", "--force", "--detach", "FETCH_HEAD"])?;
    if args.submodules {
        git.must(ctx, dir, &["submodule", "sync", "--recursive"])?;
        let mut sub = vec!["submodule", "update", "--init", "--recursive", "--force"];
        if let Some(d) = &depth {
            sub.push(d);
        }
        git.must(ctx, dir, &sub)?;
    }
    Ok(())
}

fn run(ctx: &mut StepContext) -> StepResult {
    let mut args: Args = ctx.args()?;
    // What the build is of, unless the arguments say otherwise (an empty property is unset).
    let from_build =
        |ctx: &StepContext, name: &str| ctx.property_str(name).filter(|v| !v.is_empty());
    if args.branch.is_none() {
        args.branch = from_build(ctx, "branch");
    }
    if args.revision.is_none() {
        args.revision = from_build(ctx, "revision");
    }
    let method = check(&args)?;
    let git = Git {
        config: &args.config,
        timeout: args.timeout,
    };
    let dest = args.dest.as_str();
    if dest != "." {
        std::fs::create_dir_all(dest).ok();
    }

    match (args.mode, method) {
        (Mode::Full, Method::Clobber) => {
            ctx.header(&format!("clobbering {dest}"));
            remove(dest)?;
            std::fs::create_dir_all(dest).ok();
            update(ctx, &git, &args, dest)?;
        }
        (Mode::Full, Method::Copy) => {
            std::fs::create_dir_all(COPY_SOURCE)
                .map_err(|e| Error::msg(format!("{COPY_SOURCE}: {e}")))?;
            update(ctx, &git, &args, COPY_SOURCE)?;
            ctx.header(&format!("copying {COPY_SOURCE} to {dest}"));
            remove(dest)?;
            let copy = ctx
                .command(["cp", "-a", &format!("{COPY_SOURCE}/."), dest])
                .run()?;
            if !copy.success() {
                return Err(Error::msg(format!("cp: {}", copy.describe())));
            }
        }
        (Mode::Full, m @ (Method::Fresh | Method::Clean)) => {
            update(ctx, &git, &args, dest)?;
            let flags = if m == Method::Fresh { "-fdx" } else { "-fd" };
            git.must(ctx, dest, &["clean", flags])?;
            if args.submodules {
                let each = format!("git clean {flags}");
                git.must(ctx, dest, &["submodule", "foreach", "--recursive", &each])?;
            }
        }
        (Mode::Incremental, _) => update(ctx, &git, &args, dest)?,
    }

    if let Some(patch) = &args.patch {
        let (body, level) = match patch {
            Patch::Body(b) => (b.as_str(), 1),
            Patch::Leveled { body, level } => (body.as_str(), *level),
        };
        let level = format!("-p{level}");
        // The patch goes through a file in the checkout's git directory (not its tree, and
        // not stdin, whose size a command's spawn is limited to).
        let file = format!("{dest}/.git/{PATCH_FILE}");
        std::fs::write(&file, body)
            .map_err(|e| Error::msg(format!("cannot write the patch to {file}: {e}")))?;
        let path = format!(".git/{PATCH_FILE}");
        let done = git.run(ctx, dest, &["apply", "--index", &level, &path]);
        std::fs::remove_file(&file).ok();
        let done = done?;
        if !done.success() {
            return Err(Error::msg(format!(
                "the patch does not apply: git apply {}",
                done.describe()
            )));
        }
        ctx.header("applied the patch");
    }

    let rev = git
        .must(ctx, dest, &["rev-parse", "HEAD"])?
        .trim()
        .to_owned();
    let short = git
        .must(ctx, dest, &["rev-parse", "--short", "HEAD"])?
        .trim()
        .to_owned();
    ctx.set_property("got_revision", &rev)?;
    ctx.set_property("got_revision_short", &short)?;
    let what = args
        .branch
        .as_deref()
        .map_or(String::new(), |b| format!("{b} "));
    ctx.set_summary(&format!("checked out {what}{short}"));
    Ok(Outcome::Success)
}

guest_sdk::step!(run);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Method, String> {
        let args: Args = serde_json::from_str(json).map_err(|e| e.to_string())?;
        check(&args).map_err(|e| e.to_string())
    }

    #[test]
    fn arguments_are_checked_before_anything_runs() {
        assert_eq!(
            parse(r#"{"repourl": "https://x/y.git"}"#),
            Ok(Method::Clean)
        );
        assert_eq!(
            parse(r#"{"repourl": "x", "mode": "full"}"#),
            Ok(Method::Fresh)
        );
        assert_eq!(
            parse(r#"{"repourl": "x", "mode": "full", "method": "copy"}"#),
            Ok(Method::Copy)
        );
        assert!(
            parse(r#"{}"#)
                .unwrap_err()
                .starts_with("missing field `repourl`")
        );
        assert!(
            parse(r#"{"repourl": "x", "mode": "fulll"}"#)
                .unwrap_err()
                .starts_with("unknown variant `fulll`, expected `incremental` or `full`")
        );
        assert!(
            parse(r#"{"repourl": "x", "mode": "full", "method": "scrub"}"#)
                .unwrap_err()
                .starts_with("unknown variant `scrub`")
        );
        assert_eq!(
            parse(r#"{"repourl": "x", "method": "clobber"}"#).unwrap_err(),
            "method Clobber goes with mode \"full\"; mode \"incremental\" takes no method"
        );
        assert_eq!(
            parse(r#"{"repourl": "x", "revision": "main"}"#).unwrap_err(),
            "revision \"main\" is not a commit id (hex digits)"
        );
        assert_eq!(
            parse(r#"{"repourl": "--upload-pack=evil"}"#).unwrap_err(),
            "repourl and branch may not start with '-'"
        );
        assert_eq!(
            parse(r#"{"repourl": "x", "shallow": 0}"#).unwrap_err(),
            "shallow: give a depth of at least 1"
        );
        assert_eq!(
            parse(r#"{"repourl": "x", "dest": "../up"}"#).unwrap_err(),
            "dest \"../up\" must stay inside the workdir"
        );
        assert!(
            parse(r#"{"repourl": "x", "patch": 3}"#)
                .unwrap_err()
                .starts_with("a patch: the diff text")
        );
    }
}
