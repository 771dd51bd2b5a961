//! The git poller against real repositories and a real `kiln master`: commits become changes
//! one by one, branch globs, merges and force-pushes as Buildbot reports them, state kept
//! across a SIGKILL, an unreachable repository reported and recovered from, reconfiguration
//! and polling on demand. The poller's database state runs on SQLite and PostgreSQL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::farm::Farm;
use crate::git_step::git;
use kiln_testkit::db::TestDb;
use kiln_testkit::on_both_databases;

const WAIT: Duration = Duration::from_secs(30);

/// A git-poller source named `repo` over `url`, polled every second.
fn source(url: &Path, branches: Option<&str>) -> String {
    format!(
        "[[change_sources]]\nname = \"repo\"\ntype = \"git-poller\"\nrepourl = \"{}\"\ninterval = \"1s\"\nproject = \"proj\"\ncategory = \"cat\"\n{}\n",
        url.display(),
        branches.map_or(String::new(), |b| format!("branches = {b}\n"))
    )
}

/// An upstream repository with one commit on main.
fn upstream(farm: &Farm) -> PathBuf {
    let repo = farm.path().join("upstream");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    commit(&repo, "README", "one\n", "first");
    repo
}

/// Writes `file` and commits it as Ada (author) and Bob (committer); the new revision.
fn commit(repo: &Path, file: &str, text: &str, message: &str) -> String {
    let path = repo.join(file);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    git(repo, &["add", file]);
    git(
        repo,
        &[
            "-c",
            "user.name=Bob Committer",
            "-c",
            "user.email=bob@example.org",
            "commit",
            "-q",
            "--author",
            "Ada Lovelace <ada@example.org>",
            "-m",
            message,
        ],
    );
    git(repo, &["rev-parse", "HEAD"])
}

/// The poller `repo` as the API shows it.
fn status(farm: &Farm) -> Value {
    let (code, body) = farm.api("GET", "/api/v2/changesources/repo", "");
    assert_eq!(code, 200, "{body}");
    body["changesources"][0].clone()
}

/// Changes from the poller, oldest first.
fn changes(farm: &Farm) -> Vec<Value> {
    let (code, body) = farm.api("GET", "/api/v2/changes?source=repo&order=changeid", "");
    assert_eq!(code, 200, "{body}");
    body["changes"].as_array().cloned().unwrap_or_default()
}

/// Waits until the poller has recorded `branch` at `rev`.
fn wait_for_head(farm: &Farm, branch: &str, rev: &str) {
    farm.wait_until(&format!("head {branch} at {rev}"), WAIT, || {
        status(farm)["heads"][branch] == rev
    });
}

fn wait_for_changes(farm: &Farm, n: usize) -> Vec<Value> {
    farm.wait_until(&format!("{n} changes"), WAIT, || changes(farm).len() >= n);
    // One more poll must not add any.
    let polls = status(farm)["last_poll_at"].as_i64();
    farm.wait_until("another poll", WAIT, || {
        status(farm)["last_poll_at"].as_i64() > polls
    });
    let all = changes(farm);
    assert_eq!(all.len(), n, "{all:#?}");
    all
}

fn revisions(changes: &[Value]) -> Vec<&str> {
    changes
        .iter()
        .map(|c| c["revision"].as_str().unwrap())
        .collect()
}

fn files(c: &Value) -> Vec<&str> {
    let mut f: Vec<&str> = c["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    f.sort();
    f
}

#[test]
fn each_new_commit_becomes_one_change_and_merges_and_force_pushes_are_not_floods() {
    let mut farm = Farm::new("");
    let repo = upstream(&farm);
    let first = git(&repo, &["rev-parse", "HEAD"]);
    std::fs::write(
        farm.path().join("kiln.toml"),
        std::fs::read_to_string(farm.path().join("kiln.toml")).unwrap() + &source(&repo, None),
    )
    .unwrap();
    farm.start_master();

    // The first poll records the head without reporting the history.
    wait_for_head(&farm, "main", &first);
    let s = status(&farm);
    assert_eq!(s["type"], "git-poller", "{s}");
    assert_eq!(s["last_error"], Value::Null, "{s}");
    assert!(s["last_success_at"].as_i64().is_some(), "{s}");
    assert!(changes(&farm).is_empty());
    assert!(farm.path().join("gitpoller-work/repo.git/HEAD").exists());

    // Two commits: two changes, oldest first, with what the commits say.
    let a = commit(&repo, "src/a.rs", "fn a() {}\n", "add a\n\nwith a body");
    let b = commit(&repo, "docs/b.md", "# b\n", "add b");
    let all = wait_for_changes(&farm, 2);
    assert_eq!(revisions(&all), [a.as_str(), b.as_str()]);
    let c = &all[0];
    assert_eq!(c["author"], "Ada Lovelace <ada@example.org>");
    assert_eq!(c["committer"], "Bob Committer <bob@example.org>");
    assert_eq!(c["comments"], "add a\n\nwith a body");
    assert_eq!(c["branch"], "main");
    assert_eq!(c["repository"], repo.display().to_string());
    assert_eq!(c["project"], "proj");
    assert_eq!(c["category"], "cat");
    assert_eq!(files(c), ["src/a.rs"]);
    let when = git(&repo, &["log", "-1", "--format=%ct", &a]);
    assert_eq!(
        c["when_timestamp"].as_i64(),
        Some(when.parse::<i64>().unwrap() * 1000)
    );
    assert_eq!(files(&all[1]), ["docs/b.md"]);

    // A merge is one change (its first-parent line), listing what it brought in.
    git(&repo, &["checkout", "-qb", "topic"]);
    commit(&repo, "t1", "1\n", "topic one");
    commit(&repo, "t2", "2\n", "topic two");
    git(&repo, &["checkout", "-q", "main"]);
    git(
        &repo,
        &[
            "-c",
            "user.name=Bob Committer",
            "-c",
            "user.email=bob@example.org",
            "merge",
            "-q",
            "--no-ff",
            "-m",
            "merge topic",
            "topic",
        ],
    );
    let merge = git(&repo, &["rev-parse", "HEAD"]);
    let all = wait_for_changes(&farm, 3);
    assert_eq!(all[2]["revision"], merge.as_str());
    assert_eq!(all[2]["comments"], "merge topic");
    assert_eq!(files(&all[2]), ["t1", "t2"]);

    // A rewritten branch reports the new commits, not the history behind them.
    git(&repo, &["reset", "-q", "--hard", &b]);
    let rewritten = commit(&repo, "src/a.rs", "fn a() { 1 }\n", "rewrite");
    let all = wait_for_changes(&farm, 4);
    assert_eq!(all[3]["revision"], rewritten.as_str());
    assert_eq!(files(&all[3]), ["src/a.rs"]);

    let metrics = farm.metrics();
    assert!(
        metrics.contains("kiln_change_source_polls_total{source=\"repo\",result=\"ok\"}"),
        "{metrics}"
    );
}

#[test]
fn branch_globs_pick_the_branches_and_a_new_branch_reports_only_its_own_commits() {
    let mut farm = Farm::new("");
    let repo = upstream(&farm);
    git(&repo, &["branch", "release/1"]);
    git(&repo, &["branch", "feature/x"]);
    let main = git(&repo, &["rev-parse", "HEAD"]);
    std::fs::write(
        farm.path().join("kiln.toml"),
        std::fs::read_to_string(farm.path().join("kiln.toml")).unwrap()
            + &source(&repo, Some("[\"main\", \"release/*\"]")),
    )
    .unwrap();
    farm.start_master();
    wait_for_head(&farm, "release/1", &main);
    let heads = status(&farm)["heads"].clone();
    assert_eq!(
        heads.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["main", "release/1"],
        "{heads}"
    );

    // A branch the globs do not take is not followed.
    git(&repo, &["checkout", "-q", "feature/x"]);
    commit(&repo, "x", "x\n", "on feature");
    git(&repo, &["checkout", "-q", "release/1"]);
    let fix = commit(&repo, "fix", "fix\n", "fix on release");
    let all = wait_for_changes(&farm, 1);
    assert_eq!(all[0]["revision"], fix.as_str());
    assert_eq!(all[0]["branch"], "release/1");

    // New branches: one made from a followed head reports nothing; one with a commit of its
    // own reports that commit only.
    git(&repo, &["checkout", "-q", "main"]);
    git(&repo, &["branch", "release/3"]);
    git(&repo, &["checkout", "-qb", "release/2"]);
    let own = commit(&repo, "two", "2\n", "release two");
    let all = wait_for_changes(&farm, 2);
    assert_eq!(all[1]["revision"], own.as_str());
    assert_eq!(all[1]["branch"], "release/2");
    let heads = status(&farm)["heads"].clone();
    assert_eq!(heads["release/3"], main.as_str(), "{heads}");
    assert_eq!(heads["feature/x"], Value::Null, "{heads}");

    // A deleted branch is forgotten.
    git(&repo, &["branch", "-q", "-D", "release/3"]);
    farm.wait_until("release/3 forgotten", WAIT, || {
        status(&farm)["heads"]["release/3"].is_null()
    });
}

#[test]
fn a_restarted_master_neither_repeats_changes_nor_misses_commits_made_while_it_was_down() {
    let mut farm = Farm::new("");
    let repo = upstream(&farm);
    std::fs::write(
        farm.path().join("kiln.toml"),
        std::fs::read_to_string(farm.path().join("kiln.toml")).unwrap() + &source(&repo, None),
    )
    .unwrap();
    farm.start_master();
    wait_for_head(&farm, "main", &git(&repo, &["rev-parse", "HEAD"]));
    let one = commit(&repo, "a", "a\n", "one");
    wait_for_changes(&farm, 1);

    farm.kill_master();
    // As a git killed with the master mid-fetch would leave it: a lock on the branch's ref.
    let lock = farm
        .path()
        .join("gitpoller-work/repo.git/refs/kiln/heads/main.lock");
    std::fs::write(&lock, "").unwrap();
    let two = commit(&repo, "b", "b\n", "two");
    let three = commit(&repo, "c", "c\n", "three");
    farm.start_master();
    let all = wait_for_changes(&farm, 3);
    assert_eq!(
        revisions(&all),
        [one.as_str(), two.as_str(), three.as_str()]
    );
    assert!(!lock.exists());

    // Again, with nothing new: nothing is reported twice.
    farm.kill_master();
    farm.start_master();
    farm.wait_until("a poll after the restart", WAIT, || {
        status(&farm)["last_success_at"].as_i64().is_some()
    });
    wait_for_changes(&farm, 3);
}

#[test]
fn an_unreachable_repository_is_reported_and_polled_again_until_it_is_back() {
    let mut farm = Farm::new("");
    let repo = upstream(&farm);
    std::fs::write(
        farm.path().join("kiln.toml"),
        std::fs::read_to_string(farm.path().join("kiln.toml")).unwrap() + &source(&repo, None),
    )
    .unwrap();
    farm.start_master();
    wait_for_head(&farm, "main", &git(&repo, &["rev-parse", "HEAD"]));

    let away = farm.path().join("away");
    std::fs::rename(&repo, &away).unwrap();
    farm.wait_until("a failed poll", WAIT, || {
        status(&farm)["failures"].as_u64() >= Some(2)
    });
    let s = status(&farm);
    let error = s["last_error"].as_str().unwrap();
    assert!(error.starts_with("git ls-remote failed"), "{error}");
    assert!(
        error.contains("does not appear to be a git repository"),
        "{error}"
    );
    assert!(s["last_error_at"].as_i64().is_some(), "{s}");
    let metrics = farm.metrics();
    assert!(
        metrics.contains("kiln_change_source_polls_total{source=\"repo\",result=\"error\"}"),
        "{metrics}"
    );
    let log = std::fs::read_to_string(farm.path().join("master.log")).unwrap();
    assert!(log.contains("git poll failed"), "{log}");
    // The master serves on.
    let (code, _) = farm.api("GET", "/api/v2/builders", "");
    assert_eq!(code, 200);

    // Back, with a commit made meanwhile: the poller recovers and reports it.
    let meanwhile = commit(&away, "d", "d\n", "made while away");
    std::fs::rename(&away, &repo).unwrap();
    let all = wait_for_changes(&farm, 1);
    assert_eq!(all[0]["revision"], meanwhile.as_str());
    let s = status(&farm);
    assert_eq!(s["last_error"], Value::Null, "{s}");
    assert_eq!(s["failures"], 0, "{s}");
}

#[test]
fn a_reload_starts_and_stops_pollers_and_a_poll_can_be_asked_for() {
    let mut farm = Farm::new("");
    let repo = upstream(&farm);
    let config = farm.path().join("kiln.toml");
    let base = std::fs::read_to_string(&config).unwrap();
    farm.start_master();
    let (code, body) = farm.api("GET", "/api/v2/changesources", "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["meta"]["total"], 0, "{body}");

    // Added by a reload, polling hourly: a poll on demand picks up a commit at once.
    let hourly = source(&repo, None).replace("interval = \"1s\"", "interval = \"1h\"");
    std::fs::write(&config, base.clone() + &hourly).unwrap();
    let (code, body) = farm.api("POST", "/api/v2/control/reconfig", "");
    assert_eq!(code, 200, "{body}");
    wait_for_head(&farm, "main", &git(&repo, &["rev-parse", "HEAD"]));
    let rev = commit(&repo, "a", "a\n", "one");
    std::thread::sleep(Duration::from_millis(300));
    assert!(changes(&farm).is_empty());
    let (code, body) = farm.api("POST", "/api/v2/changesources/repo/poll", "");
    assert_eq!(code, 200, "{body}");
    farm.wait_until("the asked-for poll", WAIT, || changes(&farm).len() == 1);
    assert_eq!(changes(&farm)[0]["revision"], rev.as_str());

    // Polling needs the force role; unknown sources are named.
    let reader = farm.make_token("reader", "read");
    let (code, body) = farm.request(
        "POST",
        "/api/v2/changesources/repo/poll",
        &format!("Authorization: Bearer {reader}\r\n"),
        "",
    );
    assert_eq!(code, 403, "{body}");
    let (code, body) = farm.api("POST", "/api/v2/changesources/nope/poll", "");
    assert_eq!(code, 404, "{body}");
    assert_eq!(
        body["error"],
        "there is no change source \"nope\" (defined: repo)"
    );

    // Removed by a reload.
    std::fs::write(&config, base).unwrap();
    let (code, body) = farm.api("POST", "/api/v2/control/reconfig", "");
    assert_eq!(code, 200, "{body}");
    let (_, body) = farm.api("GET", "/api/v2/changesources", "");
    assert_eq!(body["meta"]["total"], 0, "{body}");
    let (code, _) = farm.api("POST", "/api/v2/changesources/repo/poll", "");
    assert_eq!(code, 404);
}

async fn poller_state_is_recorded_once_per_generation(t: TestDb) {
    use kiln_db as db;
    use std::collections::BTreeMap;
    let heads = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(b, r)| (b.to_string(), r.to_string()))
            .collect()
    };
    let mut conn = t.db.pool().acquire().await.unwrap();
    assert_eq!(db::poller_state(&mut conn, "repo").await.unwrap(), None);
    let first = heads(&[("main", "aaaa"), ("dev", "bbbb")]);
    assert!(
        db::record_poller_heads(&mut conn, "repo", None, "/r", &first, 10)
            .await
            .unwrap()
    );
    // A second first poll (another master's) records nothing.
    assert!(
        !db::record_poller_heads(&mut conn, "repo", None, "/r", &heads(&[]), 11)
            .await
            .unwrap()
    );
    let s = db::poller_state(&mut conn, "repo").await.unwrap().unwrap();
    assert_eq!((s.generation, s.updated_ms, &s.heads), (1, 10, &first));
    let second = heads(&[("main", "cccc")]);
    assert!(
        db::record_poller_heads(&mut conn, "repo", Some(1), "/r2", &second, 12)
            .await
            .unwrap()
    );
    assert!(
        !db::record_poller_heads(&mut conn, "repo", Some(1), "/r2", &first, 13)
            .await
            .unwrap()
    );
    let s = db::poller_state(&mut conn, "repo").await.unwrap().unwrap();
    assert_eq!(s.generation, 2);
    assert_eq!(s.repourl, "/r2");
    assert_eq!(s.heads, second);
    assert_eq!(db::poller_state(&mut conn, "other").await.unwrap(), None);
}

on_both_databases!(poller_state_is_recorded_once_per_generation);
