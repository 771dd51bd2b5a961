//! `kiln demo`: a whole farm in one command. It writes a sample project (a real git
//! repository), a configuration for it, starts a master on SQLite with a plain worker and
//! (where the kernel can confine) a sandbox worker, forces builds, commits a change for the
//! scheduler to build, and reports the builds as they finish.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Map, Value};

use kiln_db as db;
use kiln_db::model::{NewChange, Results, now_ms};
use master::schedulers::{self, ForceRequest};
use master::server::Master;

/// Arguments of `kiln demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the demo farm lives: configuration, database, sample project, worker directories.
    /// Kept between runs (its builds accumulate); delete it to start afresh.
    #[arg(long, value_name = "DIR", default_value = "kiln-demo")]
    pub dir: PathBuf,
    /// The address the master serves on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8010")]
    pub listen: std::net::SocketAddr,
    /// Leave once the demo's builds have finished (exit status 0 if all succeeded), instead
    /// of serving until Ctrl-C.
    #[arg(long)]
    pub exit_when_done: bool,
}

/// The sample project's files: a greeting script, a build that lints it (reporting a
/// compiler-style warning for each TODO) and assembles it, and TAP tests.
const PROJECT: &[(&str, &str)] = &[
    (
        "README",
        "A sample project for the Kiln demo: `sh build.sh` makes out/greet, `sh test.sh` tests it.\n",
    ),
    (
        "src/greet.sh",
        "# TODO: greet in other languages\ngreet() {\n    echo \"hello, $1\"\n}\n",
    ),
    (
        "build.sh",
        r#"#!/bin/sh
# Lint (every TODO is reported as a compiler would report a warning), then assemble.
set -e
grep -n TODO src/*.sh | while IFS=: read -r file line text; do
    echo "$file:$line:1: warning: unfinished work: $text" >&2
done
mkdir -p out
{ echo '#!/bin/sh'; cat src/greet.sh; echo 'greet "${1:-world}"'; } > out/greet
chmod +x out/greet
echo "built out/greet ($(wc -c < out/greet) bytes)"
"#,
    ),
    (
        "test.sh",
        r#"#!/bin/sh
# Tests in TAP, which Kiln's test-results observer counts.
n=0
failed=0
check() {
    n=$((n + 1))
    if [ "$2" = "$3" ]; then echo "ok $n - $1"; else echo "not ok $n - $1: got '$2'"; failed=1; fi
}
echo "1..$(grep -c '^check ' test.sh)"
check "greets the world" "$(sh out/greet)" "hello, world"
check "greets a name" "$(sh out/greet kiln)" "hello, kiln"
check "greets a name with spaces" "$(sh out/greet 'build farm')" "hello, build farm"
exit $failed
"#,
    ),
];

/// What the change the demo commits adds: one more test.
const CHANGE: &str = r#"check "greets a farm" "$(sh out/greet farm)" "hello, farm"
"#;

fn git(repo: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=Kiln Demo",
            "-c",
            "user.email=demo@kiln.invalid",
        ])
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(repo)
        .output()
        .context("running git (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "git {} in {}: {}",
            args.join(" "),
            repo.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Creates the sample repository unless it exists. Returns its path.
fn sample_project(dir: &Path) -> anyhow::Result<PathBuf> {
    let repo = dir.join("project");
    if repo.join(".git").is_dir() {
        return Ok(repo);
    }
    std::fs::create_dir_all(repo.join("src"))
        .with_context(|| format!("creating {}", repo.display()))?;
    for (name, text) in PROJECT {
        std::fs::write(repo.join(name), text)?;
    }
    git(&repo, &["init", "-q"])?;
    git(&repo, &["add", "."])?;
    git(&repo, &["commit", "-qm", "A greeting, built and tested"])?;
    Ok(repo)
}

/// The demo's `kiln.toml`.
fn config(listen: std::net::SocketAddr, project: &Path, sandbox: bool) -> String {
    let project = project.display().to_string();
    let builder = |name: &str, worker: &str, trusted: bool| {
        format!(
            r#"
[[builders]]
name = "{name}"
description = "checkout, compile, test and upload the sample project on the {worker} worker"
workers = ["{worker}"]
trusted = {trusted}
grant = {{ programs = ["git", "sh"], ro_dirs = [{project:?}] }}

[[builders.steps]]
name = "checkout"
module = "git"
args = {{ repourl = "%(src::repository)s", mode = "full", method = "clobber" }}
halt_on_failure = true

[[builders.steps]]
name = "compile"
module = "compile"
args = {{ command = ["sh", "build.sh"] }}
halt_on_failure = true

[[builders.steps]]
name = "test"
module = "test"
args = {{ command = ["sh", "test.sh"] }}

[[builders.steps]]
name = "upload"
module = "file-upload"
args = {{ source = "out/greet", property = "artifact" }}
"#
        )
    };
    let mut t = format!(
        r#"# Written by `kiln demo`; rewritten on every run.
[master]
name = "demo"
listen = "{listen}"
database = "kiln.sqlite"
title = "Kiln demo"
heartbeat = "2s"
# The demo listens on 127.0.0.1 only: anyone who can reach it may force and stop builds
# from the web UI without a token (pages of other sites still cannot).
anonymous = "force"

[properties]
project = "greet"

[[workers]]
name = "local"
token = "demo-local"
max_builds = 2
"#
    );
    if sandbox {
        t += "\n[[workers]]\nname = \"sandbox\"\ntoken = \"demo-sandbox\"\nsandbox = true\nmax_builds = 2\n";
    }
    t += &builder("sample", "local", true);
    let mut builders = vec!["\"sample\""];
    if sandbox {
        t += &builder("sample-untrusted", "sandbox", false);
        builders.push("\"sample-untrusted\"");
    }
    let builders = builders.join(", ");
    t += &format!(
        r#"
[[schedulers]]
name = "force"
type = "force"
builders = [{builders}]

[[schedulers]]
name = "on-commit"
type = "single-branch"
branch = "main"
tree_stable_timer = "1s"
builders = [{builders}]
"#
    );
    t
}

/// `kiln demo`.
pub fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let project = sample_project(&dir)?;
    let confinement = runtime::Helper::current_exe()
        .map_err(anyhow::Error::from)
        .and_then(|h| runtime::Confinement::probe(h).map_err(anyhow::Error::from));
    let confinement = match confinement {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            eprintln!("kiln demo: no sandbox worker: {e:#}");
            None
        }
    };
    let config_path = dir.join("kiln.toml");
    std::fs::write(
        &config_path,
        config(args.listen, &project, confinement.is_some()),
    )?;
    let cfg = kiln_config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::master_cmd::runtime()?.block_on(async move {
        let master = Master::start(cfg, None).await?;
        let (addr, scheme) = kiln_http::serve(&master)
            .await
            .map_err(|e| anyhow::anyhow!("{e:#}; give the demo another address with --listen"))?;
        let url = format!("{scheme}://{addr}");
        let (phase_tx, phase_rx) = tokio::sync::watch::channel(kiln_worker::Phase::Running);
        let workers = start_workers(&dir, &url, confinement, phase_rx)?;
        eprintln!("kiln demo: master on {url}/ (farm in {})", dir.display());
        eprintln!("  web UI:   {url}/");
        eprintln!("  API:      {url}/api/v2/builds (all of it: {url}/api/v2/openapi.json)");
        eprintln!("  CLI:      kiln status --master {url}");
        eprintln!("  config:   {}", config_path.display());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(master.clone().run(Duration::from_millis(500), async move {
            let _ = stopped.await;
        }));
        let outcome = drive(&master, &project, args.exit_when_done).await;
        // Workers first (their running builds are cancelled and reported), then the master.
        let _ = phase_tx.send(kiln_worker::Phase::Aborting);
        let _ = tokio::task::spawn_blocking(move || workers.join()).await;
        let _ = stop.send(());
        run.await??;
        outcome
    })
}

/// Starts the workers on a runtime of their own (a worker's steps must not share the
/// master's one thread), on a thread that returns when they have left.
fn start_workers(
    dir: &Path,
    url: &str,
    confinement: Option<Arc<runtime::Confinement>>,
    phase: tokio::sync::watch::Receiver<kiln_worker::Phase>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let mut specs = vec![("local", "demo-local", None)];
    if let Some(c) = confinement {
        specs.push(("sandbox", "demo-sandbox", Some(c)));
    }
    let options: Vec<_> = specs
        .into_iter()
        .map(|(name, token, confinement)| {
            let options = kiln_worker::WorkerOptions {
                master: url.to_owned(),
                name: name.to_owned(),
                token: token.to_owned(),
                sandbox: confinement.is_some(),
                base_dir: dir.join("workers").join(name),
                max_builds: 2,
                tags: Vec::new(),
                component_cache: runtime::RuntimeConfig::default_cache_dir(),
                ca_cert: None,
            };
            (options, confinement)
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    Ok(std::thread::spawn(move || {
        rt.block_on(async move {
            let runs = options.into_iter().map(|(options, confinement)| {
                let phase = phase.clone();
                async move {
                    let name = options.name.clone();
                    if let Err(e) = kiln_worker::run(options, confinement, phase).await {
                        eprintln!("kiln demo: worker {name} stopped: {e:#}");
                    }
                }
            });
            futures_util::future::join_all(runs).await;
        })
    }))
}

/// Forces a build on every builder, then commits a change for the scheduler, reporting
/// builds as they finish; then serves until Ctrl-C (or, with `exit_when_done`, leaves).
async fn drive(
    master: &Arc<Master>,
    project: &Path,
    exit_when_done: bool,
) -> anyhow::Result<ExitCode> {
    let mut report = Report {
        since: {
            let mut conn = master.db.pool().acquire().await?;
            db::builds(&mut conn, None, 1)
                .await?
                .first()
                .map_or(0, |b| b.id.0)
        },
        reported: Default::default(),
        worst: Results::Success,
    };
    let builders = master.state().config.builders.len();
    let request = ForceRequest {
        builders: Vec::new(),
        reason: "the Kiln demo".into(),
        owner: "kiln demo".into(),
        branch: Some("main".into()),
        revision: None,
        repository: Some(project.display().to_string()),
        project: Some("greet".into()),
        parameters: Map::new(),
        priority: 0,
    };
    master
        .with_env(async |env| schedulers::force(env, "force", &request, now_ms()).await)
        .await?
        .map_err(|e| anyhow::anyhow!("forcing the demo builds: {e}"))?;
    master.wake_dispatch();
    eprintln!("kiln demo: forced a build on each of the {builders} builders");
    let mut interrupt = std::pin::pin!(tokio::signal::ctrl_c());
    if !report.until(master, builders, &mut interrupt).await? {
        return Ok(ExitCode::SUCCESS);
    }
    let revision = commit_change(master, project).await?;
    eprintln!(
        "kiln demo: committed {} to the sample project; the on-commit scheduler builds it",
        &revision[..12]
    );
    if !report.until(master, builders * 2, &mut interrupt).await? {
        return Ok(ExitCode::SUCCESS);
    }
    if exit_when_done {
        return Ok(match report.worst {
            Results::Success | Results::Warnings => ExitCode::SUCCESS,
            _ => ExitCode::from(1),
        });
    }
    eprintln!("kiln demo: the demo's builds are done; the farm runs on until Ctrl-C");
    interrupt.await?;
    eprintln!("kiln demo: stopping");
    Ok(ExitCode::SUCCESS)
}

/// The demo's builds, reported once each as they finish.
struct Report {
    /// The newest build before the demo started.
    since: i64,
    reported: std::collections::HashSet<i64>,
    worst: Results,
}

impl Report {
    /// Reports finished builds until `count` have been. False if interrupted first.
    async fn until(
        &mut self,
        master: &Master,
        count: usize,
        interrupt: &mut (impl std::future::Future<Output = std::io::Result<()>> + Unpin),
    ) -> anyhow::Result<bool> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        while self.reported.len() < count {
            tokio::select! {
                _ = &mut *interrupt => {
                    eprintln!("kiln demo: stopping");
                    return Ok(false);
                }
                _ = tick.tick() => {}
            }
            let mut conn = master.db.pool().acquire().await?;
            let mut finished: Vec<db::BuildRow> = db::builds(&mut conn, None, 100)
                .await?
                .into_iter()
                .filter(|b| {
                    b.id.0 > self.since
                        && b.complete_at.is_some()
                        && !self.reported.contains(&b.id.0)
                })
                .collect();
            finished.sort_by_key(|b| b.id.0);
            for b in finished {
                self.reported.insert(b.id.0);
                let results = b.results.unwrap_or(Results::Exception);
                self.worst = self.worst.worst(results);
                let steps: Vec<String> = db::build_steps(&mut conn, b.id)
                    .await?
                    .iter()
                    .map(|(_, _, name, results, state)| match results {
                        Some(Results::Success) => format!("{name}: {state}"),
                        Some(r) => format!("{name}: {state} ({r})"),
                        None => format!("{name}: not run"),
                    })
                    .collect();
                let artifact = db::build_properties(&mut conn, b.id)
                    .await?
                    .into_iter()
                    .find(|p| p.name == "artifact")
                    .map(|p| p.value);
                println!(
                    "{} #{} on {}: {results} in {:.1} s\n    {}{}",
                    b.builder,
                    b.number,
                    b.worker.as_deref().unwrap_or("?"),
                    (b.complete_at.unwrap_or(b.started_at) - b.started_at) as f64 / 1000.0,
                    steps.join("; "),
                    artifact
                        .map(|a| format!("\n    artifact: {}", artifact_line(&a)))
                        .unwrap_or_default()
                );
            }
        }
        Ok(true)
    }
}

fn artifact_line(a: &Value) -> String {
    format!(
        "{} ({} bytes, sha256 {})",
        a["name"].as_str().unwrap_or("?"),
        a["size"],
        a["sha256"].as_str().unwrap_or("?")
    )
}

/// Commits one more test to the sample project and records the change, as a change source
/// would.
async fn commit_change(master: &Arc<Master>, project: &Path) -> anyhow::Result<String> {
    let test = project.join("test.sh");
    let text = std::fs::read_to_string(&test)?.replacen(
        "exit $failed",
        &format!("{CHANGE}exit $failed"),
        1,
    );
    std::fs::write(&test, text)?;
    git(project, &["commit", "-qam", "Test one more greeting"])?;
    let revision = git(project, &["rev-parse", "HEAD"])?;
    let change = NewChange {
        author: "Kiln Demo <demo@kiln.invalid>".into(),
        comments: "Test one more greeting".into(),
        branch: Some("main".into()),
        revision: Some(revision.clone()),
        repository: project.display().to_string(),
        project: "greet".into(),
        files: vec!["test.sh".into()],
        source: "demo".into(),
        ..NewChange::default()
    };
    match master.add_change(&change).await? {
        Ok(_) => Ok(revision),
        Err(e) => bail!("recording the demo's change: {e}"),
    }
}
