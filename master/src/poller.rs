//! The git poller, as Buildbot's `GitPoller`: for each `git-poller` change source, a task
//! that fetches the repository's followed branches with the real `git` into a bare working
//! repository (`gitpoller-work/NAME.git` next to `kiln.toml`) and turns each new commit into
//! a Change, oldest first.
//!
//! What counts as new follows Buildbot: the very first poll of a source records the heads and
//! reports nothing (no flood of history); later, a branch's new commits are those on its
//! first-parent line not reachable from any head seen before (so a force-push reports only
//! the rewritten commits, a merge is one change whose files are its diff against the first
//! parent, and a new branch reports only commits no followed branch had). The heads and the
//! changes are recorded in one transaction, guarded by the source's generation (see
//! `db::poller`), so a crash loses or repeats nothing and masters sharing a database record
//! each commit once. A failed poll is logged, counted, shown at `GET /api/v2/changesources`
//! and retried with backoff; it never stops the master.
//!
//! One supervisor task follows the configuration (sources added, removed or changed on
//! reload); each source's task receives its new configuration through a watch channel and
//! takes it after the poll it is in; a removed source's task is stopped at once.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::server::Master;
use kiln_config::{ChangeSource, ChangeSourceKind, Globs};
use kiln_db as db;
use kiln_db::model::{NewChange, now_ms};

/// Longest any one git command may run; a fetch that hangs (a server that never answers) is
/// killed, with every process it started, and the poll fails and is retried.
pub const GIT_TIMEOUT: Duration = Duration::from_secs(300);

/// Most changes one poll reports for one branch. More new commits than this at once (an
/// unrelated history pushed to a followed branch) are reported as their newest commits only,
/// with a warning, rather than flooding the schedulers.
pub const MAX_CHANGES_PER_BRANCH: usize = 200;

/// The first retry after a failed poll comes after the interval or this, whichever is
/// shorter; each further failure doubles the wait.
const FIRST_RETRY: Duration = Duration::from_secs(5);

/// Retries back off to at most the interval or this, whichever is longer.
const MAX_RETRY: Duration = Duration::from_secs(300);

/// The directory, next to the configuration, where pollers keep their repositories.
pub const WORK_DIR: &str = "gitpoller-work";

/// Where the fetched heads are kept in a poller's working repository.
const TRACKING: &str = "refs/kiln/heads/";

/// What a source's polls have come to, as `GET /api/v2/changesources` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PollStatus {
    /// When the last poll ended (ms), whatever its result.
    pub last_poll_at: Option<i64>,
    /// When the last successful poll ended (ms).
    pub last_success_at: Option<i64>,
    /// Why the last poll failed; `None` once a poll succeeds.
    pub last_error: Option<String>,
    /// When a poll last failed (ms).
    pub last_error_at: Option<i64>,
    /// Polls failed in a row.
    pub failures: u32,
    /// When the next poll is due (ms).
    pub next_poll_at: Option<i64>,
    /// Changes this master recorded from the source since it started.
    pub changes: u64,
}

/// A running poller task.
struct Running {
    config: watch::Sender<ChangeSource>,
    status: Arc<Mutex<PollStatus>>,
    poke: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// The master's git pollers: one task per `git-poller` source of the configuration in force.
#[derive(Default)]
pub struct Pollers {
    running: Mutex<BTreeMap<String, Running>>,
    reconfigured: Notify,
}

impl std::fmt::Debug for Pollers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pollers").finish_non_exhaustive()
    }
}

impl Pollers {
    /// Tells the supervisor the configuration was replaced.
    pub fn reconfigured(&self) {
        self.reconfigured.notify_one();
    }

    /// The status of poller `name`, if one runs.
    pub fn status(&self, name: &str) -> Option<PollStatus> {
        let running = self.running.lock().expect("pollers lock");
        running
            .get(name)
            .map(|r| r.status.lock().expect("status lock").clone())
    }

    /// Asks poller `name` to poll now (after the poll it is in, if any). False if no such
    /// poller runs.
    pub fn poll_now(&self, name: &str) -> bool {
        let running = self.running.lock().expect("pollers lock");
        match running.get(name) {
            Some(r) => {
                r.poke.notify_one();
                true
            }
            None => false,
        }
    }

    /// Starts, reconfigures and stops poller tasks to match the configuration in force.
    fn sync(&self, master: &Arc<Master>) {
        let state = master.state();
        let wanted: BTreeMap<&str, &ChangeSource> = state
            .config
            .change_sources
            .iter()
            .filter(|c| matches!(c.kind, ChangeSourceKind::GitPoller { .. }))
            .map(|c| (c.name.as_str(), c))
            .collect();
        let mut running = self.running.lock().expect("pollers lock");
        running.retain(|name, r| {
            let keep = wanted.contains_key(name.as_str()) && !r.task.is_finished();
            if !keep {
                // Stopped at once, so that a source removed and added again never has two
                // tasks in its repository: a transaction in flight rolls back, a git command
                // is killed, and the next task of that name removes the locks it left.
                r.task.abort();
                tracing::info!(source = %name, "git poller stopped");
            }
            keep
        });
        for (name, source) in wanted {
            if let Some(r) = running.get(name) {
                r.config.send_if_modified(|c| {
                    let changed = c != source;
                    if changed {
                        tracing::info!(source = %name, "git poller reconfigured");
                        *c = source.clone();
                    }
                    changed
                });
                continue;
            }
            let (config, receiver) = watch::channel(source.clone());
            let status = Arc::new(Mutex::new(PollStatus::default()));
            let poke = Arc::new(Notify::new());
            let task = tokio::spawn(run(
                master.clone(),
                state.config.dir.clone(),
                receiver,
                status.clone(),
                poke.clone(),
            ));
            tracing::info!(source = %name, "git poller started");
            running.insert(
                name.to_owned(),
                Running {
                    config,
                    status,
                    poke,
                    task,
                },
            );
        }
    }

    fn stop_all(&self) {
        let mut running = self.running.lock().expect("pollers lock");
        for (_, r) in std::mem::take(&mut *running) {
            r.task.abort();
        }
    }
}

/// Stops the pollers when dropped (when [`Master::run`] returns).
#[derive(Debug)]
pub struct Supervisor {
    master: Arc<Master>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.task.abort();
        self.master.pollers.stop_all();
    }
}

/// Starts the pollers of the configuration in force, and follows its reloads.
pub fn start(master: &Arc<Master>) -> Supervisor {
    let m = master.clone();
    let task = tokio::spawn(async move {
        loop {
            m.pollers.sync(&m);
            m.pollers.reconfigured.notified().await;
        }
    });
    Supervisor {
        master: master.clone(),
        task,
    }
}

/// How long to wait after `failures` polls failed in a row.
pub fn retry_delay(interval: Duration, failures: u32) -> Duration {
    let first = interval.min(FIRST_RETRY);
    let doubled = first.saturating_mul(1 << failures.saturating_sub(1).min(20));
    doubled.min(interval.max(MAX_RETRY))
}

/// One source's task: polls at start, then every interval (sooner when poked or
/// reconfigured), backing off after failures; stops when its configuration is dropped.
async fn run(
    master: Arc<Master>,
    config_dir: PathBuf,
    mut config: watch::Receiver<ChangeSource>,
    status: Arc<Mutex<PollStatus>>,
    poke: Arc<Notify>,
) {
    let mut cleaned = false;
    loop {
        let source = config.borrow_and_update().clone();
        let ChangeSourceKind::GitPoller { interval, .. } = &source.kind else {
            return;
        };
        let interval = *interval;
        let repo = config_dir
            .join(WORK_DIR)
            .join(format!("{}.git", source.name));
        if !cleaned {
            remove_stale_locks(&repo);
            cleaned = true;
        }
        let poller = Poller {
            source: &source,
            config_dir: &config_dir,
            repo: &repo,
            ssh: batch_ssh(&config_dir).await,
        };
        let result = poller.poll(&master).await;
        let now = now_ms();
        let delay = {
            let mut s = status.lock().expect("status lock");
            s.last_poll_at = Some(now);
            let delay = match &result {
                Ok(added) => {
                    s.last_success_at = Some(now);
                    s.last_error = None;
                    s.failures = 0;
                    s.changes += *added as u64;
                    interval
                }
                Err(error) => {
                    s.failures = s.failures.saturating_add(1);
                    s.last_error = Some(redact(&format!("{error:#}")));
                    s.last_error_at = Some(now);
                    retry_delay(interval, s.failures)
                }
            };
            s.next_poll_at = Some(now + delay.as_millis() as i64);
            if let Err(error) = &result {
                tracing::warn!(
                    source = %source.name,
                    failures = s.failures,
                    retry_in = ?delay,
                    error = redact(&format!("{error:#}")),
                    "git poll failed"
                );
            }
            delay
        };
        master.metrics.poll_finished(&source.name, result.is_ok());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = poke.notified() => {}
            changed = config.changed() => if changed.is_err() {
                return;
            },
        }
    }
}

/// Removes lock files a git process killed mid-write (the master killed during a fetch) left
/// in a working repository, which would make every later fetch fail. Only this master's task
/// for the source uses the directory, and it has not started a git command yet.
fn remove_stale_locks(repo: &Path) {
    fn walk(dir: &Path, depth: u32) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() && depth < 8 && entry.file_name() != "objects" {
                walk(&path, depth + 1);
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "lock") {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::warn!(path = %path.display(), "removed a stale git lock file")
                    }
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "cannot remove a stale git lock file")
                    }
                }
            }
        }
    }
    walk(repo, 0);
}

/// One poll of one source.
struct Poller<'a> {
    source: &'a ChangeSource,
    config_dir: &'a Path,
    repo: &'a Path,
    /// `GIT_SSH_COMMAND`, when ssh must be told not to ask anything (see [`batch_ssh`]).
    ssh: Option<&'static str>,
}

/// ssh in batch mode: an unknown host key or a passphrase fails at once with ssh's message,
/// instead of waiting at a terminal prompt (where a poll would hang until its timeout). Only
/// when nothing else says how to run ssh (`GIT_SSH_COMMAND`, `GIT_SSH`, `core.sshCommand`).
async fn batch_ssh(config_dir: &Path) -> Option<&'static str> {
    if std::env::var_os("GIT_SSH_COMMAND").is_some() || std::env::var_os("GIT_SSH").is_some() {
        return None;
    }
    let configured = tokio::process::Command::new("git")
        .args(["config", "--get", "core.sshCommand"])
        .current_dir(config_dir)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), configured).await {
        Ok(Ok(out)) if !out.stdout.trim_ascii().is_empty() => None,
        _ => Some("ssh -o BatchMode=yes"),
    }
}

/// A commit read from the working repository.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Commit {
    author: String,
    committer: String,
    when_s: i64,
    comments: String,
    files: Vec<String>,
}

impl Poller<'_> {
    fn repourl(&self) -> &str {
        match &self.source.kind {
            ChangeSourceKind::GitPoller { repourl, .. } => repourl,
            ChangeSourceKind::Webhook { .. } => "",
        }
    }

    fn branches(&self) -> Option<&Globs> {
        match &self.source.kind {
            ChangeSourceKind::GitPoller { branches, .. } => branches.as_ref(),
            ChangeSourceKind::Webhook { .. } => None,
        }
    }

    /// Runs git on the working repository (from the configuration's directory, so that a
    /// relative local path is taken as the configuration file's neighbour). Its stdout, or an
    /// error with what it said on stderr.
    async fn git<S: AsRef<OsStr>>(&self, args: &[S]) -> anyhow::Result<Vec<u8>> {
        let mut cmd = tokio::process::Command::new("git");
        cmd.arg("--git-dir")
            .arg(self.repo)
            .args(args)
            .current_dir(self.config_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .process_group(0)
            // Never ask a person for a password: there is none to ask.
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "true")
            .env("LC_ALL", "C");
        if let Some(ssh) = self.ssh {
            cmd.env("GIT_SSH_COMMAND", ssh);
        }
        // A master started from a git hook inherits variables that would point git elsewhere.
        for var in [
            "GIT_DIR",
            "GIT_WORK_TREE",
            "GIT_INDEX_FILE",
            "GIT_OBJECT_DIRECTORY",
            "GIT_ALTERNATE_OBJECT_DIRECTORIES",
            "GIT_COMMON_DIR",
            "GIT_NAMESPACE",
            "GIT_CEILING_DIRECTORIES",
        ] {
            cmd.env_remove(var);
        }
        let what = args
            .first()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .unwrap_or_default();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot run git {what} (is git installed?)"))?;
        let pid = child.id();
        let output = match tokio::time::timeout(GIT_TIMEOUT, child.wait_with_output()).await {
            Ok(output) => output.with_context(|| format!("git {what}"))?,
            Err(_) => {
                if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                    // SAFETY: kill(2) on the process group of a child we started.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
                bail!("git {what} took longer than {GIT_TIMEOUT:?} and was stopped");
            }
        };
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let stderr = stderr.trim();
            let mut said: String = stderr.chars().take(2000).collect();
            if said.len() < stderr.len() {
                said.push_str(" ...");
            }
            bail!("git {what} failed ({}): {said}", output.status);
        }
        Ok(output.stdout)
    }

    /// The remote's followed branches and their heads, as `ls-remote` reports them.
    async fn remote_branches(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let url = self.repourl();
        let mut wanted = BTreeMap::new();
        match self.branches() {
            Some(globs) => {
                let out = self.git(&["ls-remote", "--heads", "--", url]).await?;
                for (rev, name) in ls_remote_lines(&out) {
                    if let Some(branch) = name.strip_prefix("refs/heads/")
                        && globs.is_match(branch)
                    {
                        wanted.insert(branch.to_owned(), rev.to_owned());
                    }
                }
            }
            None => {
                let out = self
                    .git(&["ls-remote", "--symref", "--", url, "HEAD", "refs/heads/*"])
                    .await?;
                wanted = default_branch(&out)?;
            }
        }
        wanted.retain(|branch, _| {
            let ok = branch.len() <= crate::changes::MAX_FIELD
                && !branch.starts_with('-')
                && !branch.contains(['\0', '\n']);
            if !ok {
                tracing::warn!(source = %self.source.name, branch = %branch.chars().take(80).collect::<String>(), "git poller skips a branch whose name cannot be a change's branch");
            }
            ok
        });
        Ok(wanted)
    }

    /// The tracking refs: branch to commit.
    async fn tracked(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let out = self
            .git(&[
                "for-each-ref",
                "--format=%(objectname) %(refname)",
                TRACKING,
            ])
            .await?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| {
                let (rev, name) = l.split_once(' ')?;
                Some((name.strip_prefix(TRACKING)?.to_owned(), rev.to_owned()))
            })
            .collect())
    }

    /// Brings the tracking refs to the remote's `branches`: fetches those that moved (most
    /// polls fetch nothing) and drops those of branches no longer followed. The heads as
    /// fetched (a branch may have moved since it was listed).
    async fn fetch(
        &self,
        branches: &BTreeMap<String, String>,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let tracked = self.tracked().await?;
        let moved: Vec<&String> = branches
            .iter()
            .filter(|(b, rev)| tracked.get(*b) != Some(rev))
            .map(|(b, _)| b)
            .collect();
        if !moved.is_empty() {
            let mut args: Vec<String> = vec![
                "fetch".into(),
                "--quiet".into(),
                "--no-tags".into(),
                "--no-write-fetch-head".into(),
                "--".into(),
                self.repourl().to_owned(),
            ];
            args.extend(
                moved
                    .iter()
                    .map(|b| format!("+refs/heads/{b}:{TRACKING}{b}")),
            );
            self.git(&args).await?;
        }
        for gone in tracked.keys().filter(|b| !branches.contains_key(*b)) {
            self.git(&["update-ref", "-d", &format!("{TRACKING}{gone}")])
                .await?;
        }
        let tracked = if moved.is_empty() {
            tracked
        } else {
            self.tracked().await?
        };
        branches
            .keys()
            .map(|b| match tracked.get(b) {
                Some(rev) => Ok((b.clone(), rev.clone())),
                None => Err(anyhow::anyhow!(
                    "git fetch brought no head for branch {b:?}"
                )),
            })
            .collect()
    }

    /// Whether the working repository has commit `rev`.
    async fn has_commit(&self, rev: &str) -> bool {
        self.git(&["cat-file", "-e", &format!("{rev}^{{commit}}")])
            .await
            .is_ok()
    }

    /// The commits on `head`'s first-parent line not reachable from `known`, oldest first,
    /// at most [`MAX_CHANGES_PER_BRANCH`] (the newest), and whether there were more.
    async fn new_commits(
        &self,
        head: &str,
        known: &BTreeSet<String>,
    ) -> anyhow::Result<(Vec<String>, bool)> {
        let mut args = vec![
            "rev-list".to_owned(),
            "--first-parent".to_owned(),
            "--ignore-missing".to_owned(),
            format!("--max-count={}", MAX_CHANGES_PER_BRANCH + 1),
            head.to_owned(),
            "--not".to_owned(),
        ];
        args.extend(known.iter().cloned());
        args.push("--".to_owned());
        let out = self.git(&args).await?;
        let mut revs: Vec<String> = String::from_utf8_lossy(&out)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let more = revs.len() > MAX_CHANGES_PER_BRANCH;
        revs.truncate(MAX_CHANGES_PER_BRANCH);
        revs.reverse();
        Ok((revs, more))
    }

    /// What a change needs from commit `rev`.
    async fn commit(&self, rev: &str) -> anyhow::Result<Commit> {
        let out = self
            .git(&[
                "log",
                "-n1",
                "--no-show-signature",
                "--format=%an <%ae>%x00%cn <%ce>%x00%ct%x00%P%x00%B",
                rev,
                "--",
            ])
            .await?;
        let text = String::from_utf8_lossy(&out);
        let mut parts = text.splitn(5, '\0');
        let mut next = || parts.next().unwrap_or_default();
        let (author, committer, when, parents, body) = (next(), next(), next(), next(), next());
        let when_s = when.trim().parse::<i64>().unwrap_or(0);
        let first_parent = parents.split_whitespace().next();
        let files = match first_parent {
            Some(parent) => {
                self.git(&[
                    "diff-tree",
                    "-r",
                    "-z",
                    "--name-only",
                    "--no-renames",
                    parent,
                    rev,
                ])
                .await?
            }
            None => {
                self.git(&[
                    "diff-tree",
                    "--root",
                    "-r",
                    "-z",
                    "--name-only",
                    "--no-commit-id",
                    rev,
                ])
                .await?
            }
        };
        let files = files
            .split(|b| *b == 0)
            .filter(|f| !f.is_empty())
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect();
        Ok(Commit {
            author: author.to_owned(),
            committer: committer.to_owned(),
            when_s,
            comments: body.trim_end().to_owned(),
            files,
        })
    }

    /// The change for commit `rev` on `branch`, shaped to pass `changes::validate` whatever
    /// the commit holds (over-long fields are cut with a marker, not refused: the commit
    /// happened, and its build must not be lost).
    fn change(&self, branch: &str, rev: &str, c: Commit) -> NewChange {
        let limits = |s: String, max: usize| -> String { cut(&s.replace('\0', ""), max) };
        let mut files = c.files;
        if files.len() > crate::changes::MAX_FILES {
            files.truncate(crate::changes::MAX_FILES);
        }
        files.retain(|f| f.len() <= 4096 && !f.contains('\0'));
        let mut key = format!("git-poller:{}:{branch}:{rev}", self.source.name);
        if key.len() > crate::changes::MAX_FIELD {
            use sha2::Digest;
            let digest = hex::encode(sha2::Sha256::digest(branch.as_bytes()));
            key = format!("git-poller:{}:{digest}:{rev}", self.source.name);
        }
        let author = limits(c.author, crate::changes::MAX_FIELD);
        NewChange {
            author: if author.trim().is_empty() {
                "unknown".into()
            } else {
                author
            },
            committer: Some(limits(c.committer, crate::changes::MAX_FIELD)),
            comments: limits(c.comments, crate::changes::MAX_COMMENTS),
            branch: Some(branch.to_owned()),
            revision: Some(rev.to_owned()),
            revlink: None,
            when_ms: Some(c.when_s.saturating_mul(1000).clamp(0, 253_402_300_799_000)),
            category: self.source.category.clone(),
            repository: self.repourl().to_owned(),
            codebase: String::new(),
            project: self.source.project.clone(),
            files,
            properties: Default::default(),
            source: self.source.name.clone(),
            source_key: Some(key),
            trusted: Some(true),
        }
    }

    /// One poll: fetch, work out the new commits, record them with the heads. The number of
    /// changes recorded.
    async fn poll(&self, master: &Master) -> anyhow::Result<usize> {
        let name = &self.source.name;
        if !self.repo.join("HEAD").exists() {
            std::fs::create_dir_all(self.repo).with_context(|| {
                format!(
                    "cannot create the working repository {}",
                    self.repo.display()
                )
            })?;
            self.git(&["init", "--quiet", "--bare"]).await?;
        }
        let remote = self.remote_branches().await?;
        let heads = if remote.is_empty() {
            BTreeMap::new()
        } else {
            self.fetch(&remote).await?
        };
        let mut conn = master.db.pool().acquire().await?;
        let state = db::poller_state(&mut conn, name).await?;
        drop(conn);
        let repourl = self.repourl();
        let previous = state
            .as_ref()
            .filter(|s| s.repourl == repourl)
            .map(|s| &s.heads);
        if previous == Some(&heads) {
            return Ok(0);
        }
        let mut changes = Vec::new();
        // As Buildbot does, a source with no heads recorded (its first poll, or a repository
        // or branch selection that had none) records them without changes.
        if let Some(previous) = previous.filter(|p| !p.is_empty()) {
            // As Buildbot does: what any followed branch had is not new, and neither is what
            // a branch handled earlier in this poll has.
            let mut known: BTreeSet<String> = previous.values().cloned().collect();
            for (branch, head) in &heads {
                if previous.get(branch) == Some(head) {
                    continue;
                }
                if let Some(old) = previous.get(branch)
                    && !self.has_commit(old).await
                {
                    // The working repository was lost or pruned: without the old head, the
                    // whole history would look new. Try to fetch it by id; else record the
                    // head without changes.
                    let _ = self
                        .git(&[
                            "fetch",
                            "--quiet",
                            "--no-tags",
                            "--no-write-fetch-head",
                            "--",
                            repourl,
                            old,
                        ])
                        .await;
                    if !self.has_commit(old).await {
                        tracing::warn!(source = %name, %branch, old = %old, new = %head, "the last recorded head of the branch is no longer in the repository; recording the new head without changes");
                        known.insert(head.clone());
                        continue;
                    }
                }
                let (revs, more) = self.new_commits(head, &known).await?;
                if more {
                    tracing::warn!(source = %name, %branch, reported = revs.len(), "more new commits than one poll reports; only the newest are changes");
                }
                for rev in revs {
                    let commit = self.commit(&rev).await?;
                    changes.push(self.change(branch, &rev, commit));
                }
                known.insert(head.clone());
            }
        } else {
            tracing::info!(source = %name, branches = heads.len(), "no heads were recorded before: recorded them without changes");
        }
        for change in &changes {
            crate::changes::validate(change)
                .with_context(|| format!("commit {:?}", change.revision))?;
        }
        let now = now_ms();
        let mut tx = master.db.begin().await?;
        master.db.serialize_appends(&mut tx).await?;
        let read = state.as_ref().map(|s| s.generation);
        if !db::record_poller_heads(&mut tx, name, read, repourl, &heads, now).await? {
            tx.rollback().await?;
            tracing::debug!(source = %name, "another poll recorded first; nothing recorded");
            return Ok(0);
        }
        let mut added = 0;
        for change in &changes {
            if db::insert_change(&mut tx, change, now).await?.is_some() {
                added += 1;
            }
        }
        tx.commit().await?;
        if added > 0 {
            tracing::info!(source = %name, changes = added, "git poller recorded changes");
            master.wake_schedulers();
        }
        Ok(added)
    }
}

/// `text` with the password of every URL in it replaced (`https://user:***@host/...`), for
/// messages and the API: a `repourl` may carry credentials, and git's errors may repeat it.
pub fn redact(text: &str) -> String {
    static USERINFO: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*):[^@/\s]*@")
            .expect("a valid regex")
    });
    USERINFO.replace_all(text, "$1:***@").into_owned()
}

/// The remote's default branch and its head, from `git ls-remote --symref URL HEAD
/// refs/heads/*`: the branch HEAD names or, as Buildbot does when HEAD is detached, the one
/// branch at HEAD's commit. Nothing for an empty repository.
fn default_branch(out: &[u8]) -> anyhow::Result<BTreeMap<String, String>> {
    let text = String::from_utf8_lossy(out);
    let symref = text.lines().find_map(|l| {
        l.strip_prefix("ref: ")?
            .strip_suffix("\tHEAD")?
            .strip_prefix("refs/heads/")
    });
    let lines = ls_remote_lines(out);
    let head = lines
        .iter()
        .find(|(_, name)| *name == "HEAD")
        .map(|(rev, _)| *rev);
    let branches: Vec<(&str, &str)> = lines
        .iter()
        .filter_map(|(rev, name)| Some((name.strip_prefix("refs/heads/")?, *rev)))
        .collect();
    let names = || {
        branches
            .iter()
            .map(|(b, _)| *b)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let branch = match (symref, head) {
        (Some(branch), Some(_)) => branch,
        (None, Some(rev)) => {
            let at: Vec<&str> = branches
                .iter()
                .filter(|(_, r)| *r == rev)
                .map(|(b, _)| *b)
                .collect();
            match at.as_slice() {
                [one] => *one,
                _ => bail!(
                    "the remote's HEAD is not a branch, so it has no default branch to follow (its branches: {}); set branches = [\"...\"]",
                    names()
                ),
            }
        }
        (_, None) if branches.is_empty() => return Ok(BTreeMap::new()),
        (_, None) => bail!(
            "the remote's HEAD names no branch that exists (its branches: {}); set branches = [\"...\"]",
            names()
        ),
    };
    let rev = branches
        .iter()
        .find(|(b, _)| *b == branch)
        .map(|(_, r)| *r)
        .or(head)
        .unwrap_or_default();
    Ok(BTreeMap::from([(branch.to_owned(), rev.to_owned())]))
}

/// The `(revision, ref)` pairs of `git ls-remote` output.
fn ls_remote_lines(out: &[u8]) -> Vec<(&str, &str)> {
    std::str::from_utf8(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(rev, _)| rev.len() >= 40 && rev.chars().all(|c| c.is_ascii_hexdigit()))
        .collect()
}

/// `s` cut to at most `max` bytes at a character boundary, with a marker when cut.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    const MARK: &str = " [...]";
    let mut end = max.saturating_sub(MARK.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_the_interval_or_five_seconds() {
        let s = Duration::from_secs;
        assert_eq!(retry_delay(s(1), 1), s(1));
        assert_eq!(retry_delay(s(1), 2), s(2));
        assert_eq!(retry_delay(s(1), 4), s(8));
        assert_eq!(retry_delay(s(1), 40), s(300));
        assert_eq!(retry_delay(s(600), 1), s(5));
        assert_eq!(retry_delay(s(600), 3), s(20));
        assert_eq!(retry_delay(s(600), 30), s(600));
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary_with_a_marker() {
        assert_eq!(cut("short", 10), "short");
        let cut = cut(&"é".repeat(20), 12);
        assert!(cut.len() <= 12, "{cut}");
        assert!(cut.ends_with(" [...]"), "{cut}");
    }

    #[test]
    fn the_default_branch_is_the_one_head_names() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let out = |lines: &[String]| lines.join("\n").into_bytes();
        let named = out(&[
            "ref: refs/heads/trunk\tHEAD".into(),
            format!("{a}\tHEAD"),
            format!("{b}\trefs/heads/main"),
            format!("{a}\trefs/heads/trunk"),
        ]);
        assert_eq!(
            default_branch(&named).unwrap(),
            BTreeMap::from([("trunk".to_owned(), a.clone())])
        );
        // A detached HEAD: the one branch at its commit, as Buildbot does.
        let detached = out(&[format!("{a}\tHEAD"), format!("{a}\trefs/heads/main")]);
        assert_eq!(
            default_branch(&detached).unwrap(),
            BTreeMap::from([("main".to_owned(), a.clone())])
        );
        let ambiguous = out(&[
            format!("{a}\tHEAD"),
            format!("{a}\trefs/heads/main"),
            format!("{a}\trefs/heads/dev"),
        ]);
        assert_eq!(
            default_branch(&ambiguous).unwrap_err().to_string(),
            "the remote's HEAD is not a branch, so it has no default branch to follow (its branches: main, dev); set branches = [\"...\"]"
        );
        let dangling = out(&[format!("{b}\trefs/heads/main")]);
        assert_eq!(
            default_branch(&dangling).unwrap_err().to_string(),
            "the remote's HEAD names no branch that exists (its branches: main); set branches = [\"...\"]"
        );
        assert!(default_branch(b"").unwrap().is_empty());
    }

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact("fatal: unable to access 'https://ci:s3cr3t@git.example.org/app.git/': 403"),
            "fatal: unable to access 'https://ci:***@git.example.org/app.git/': 403"
        );
        assert_eq!(
            redact("https://ci@host/x ssh://git@host/y /srv/z"),
            "https://ci@host/x ssh://git@host/y /srv/z"
        );
    }

    #[test]
    fn ls_remote_lines_are_revision_and_ref() {
        let out = b"ref: refs/heads/main\tHEAD\n0123456789012345678901234567890123456789\tHEAD\n0123456789012345678901234567890123456789\trefs/heads/main\n";
        assert_eq!(
            ls_remote_lines(out),
            vec![
                ("0123456789012345678901234567890123456789", "HEAD"),
                (
                    "0123456789012345678901234567890123456789",
                    "refs/heads/main"
                ),
            ]
        );
    }
}
