//! Changes, schedulers, buildsets and claims, on a real database (SQLite and PostgreSQL), with
//! the scheduler clock driven by the test.

use std::sync::Arc;

use kiln_config as config;
use kiln_db as db;
use kiln_db::model::*;
use master::requests::{self, FreeWorker};
use master::schedulers::{self, ForceRequest, Pass, RequestError, TriggerRequest, TryRequest};
use master::server::Master;
use serde_json::json;

use kiln_testkit::db::TestDb;
use kiln_testkit::on_both_databases;

on_both_databases!(
    single_branch_waits_for_the_tree_to_be_stable,
    without_a_timer_every_change_builds_and_the_queue_collapses,
    any_branch_builds_each_matching_branch,
    periodic_fires_at_once_then_every_interval_and_never_twice,
    nightly_follows_cron_in_its_time_zone,
    force_checks_typed_parameters,
    dependent_follows_successful_upstream_buildsets,
    trigger_and_try_make_buildsets,
    claims_route_trusted_and_untrusted_work,
    a_scheduler_runs_on_one_master_at_a_time,
    a_policy_filters_changes_and_steers_dispatch,
    reload_keeps_queued_work_and_refuses_bad_config,
    policy_hooks_decide_and_a_failing_hook_falls_back,
    timers_survive_a_restart,
);

const BASE: &str = r#"
[master]
name = "m1"
heartbeat = "1s"

[[workers]]
name = "w1"
token = "t1"

[[workers]]
name = "w2"
token = "t2"
max_builds = 2

[[workers]]
name = "sandbox"
token = "t3"
sandbox = true

[[builders]]
name = "linux"
[[builders.steps]]
module = "shell"
args = { command = ["true"] }

[[builders]]
name = "mac"
collapse = false
priority = 5
[[builders.steps]]
module = "shell"
args = { command = ["true"] }

[[builders]]
name = "forks"
trusted = false
[[builders.steps]]
module = "shell"
args = { command = ["true"] }
"#;

struct Farm {
    master: Arc<Master>,
    dir: tempfile::TempDir,
    _db: TestDb,
}

async fn farm(t: TestDb, schedulers: &str) -> Farm {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, format!("{BASE}\n{schedulers}")).unwrap();
    let policy = dir.path().join("policy.wasm");
    std::fs::write(&policy, steps::fixtures::POLICY).unwrap();
    let cfg = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let master = Master::start(cfg, Some(&t.url)).await.unwrap();
    Farm {
        master,
        dir,
        _db: t,
    }
}

impl Farm {
    async fn change(&self, author: &str, branch: &str, files: &[&str]) -> ChangeId {
        let c = NewChange {
            author: author.into(),
            branch: Some(branch.into()),
            revision: Some(format!("rev-{author}-{branch}")),
            repository: "https://example.org/app.git".into(),
            files: files.iter().map(|f| f.to_string()).collect(),
            source: "test".into(),
            ..Default::default()
        };
        self.master.add_change(&c).await.unwrap().unwrap().unwrap()
    }

    async fn pass(&self, now: i64) -> Pass {
        self.master
            .with_env(async |env| schedulers::run_pass(env, now).await.unwrap())
            .await
    }

    async fn conn(&self) -> sqlx::pool::PoolConnection<sqlx::Any> {
        self.master.db.pool().acquire().await.unwrap()
    }

    async fn buildsets(&self, scheduler: &str) -> Vec<Buildset> {
        db::buildsets_of(&mut *self.conn().await, scheduler)
            .await
            .unwrap()
    }

    async fn changes_of(&self, bs: BuildsetId) -> Vec<ChangeId> {
        db::buildset_sourcestamps(&mut *self.conn().await, bs)
            .await
            .unwrap()[0]
            .changes
            .clone()
    }

    /// One claim pass over `workers`.
    async fn claim(&self, workers: &mut [FreeWorker]) -> Vec<requests::Assignment> {
        let state = self.master.state();
        requests::claim_for_workers(
            &self.master.db,
            self.master.id,
            &state.builders,
            workers,
            &mut Default::default(),
            &state.hooks,
            T0,
        )
        .await
        .unwrap()
    }

    async fn queued(&self, builder: &str) -> Vec<QueuedRequest> {
        db::queued_requests(&mut *self.conn().await, Some(builder), 1000, 0)
            .await
            .unwrap()
    }
}

const T0: i64 = 1_800_000_000_000;

async fn single_branch_waits_for_the_tree_to_be_stable(t: TestDb) {
    let f = farm(
        t,
        r#"
[[schedulers]]
name = "main"
type = "single-branch"
branch = "main"
tree_stable_timer = "30s"
file_is_important = ["src/**"]
builders = ["linux", "mac"]
properties = { tier = "gate" }
"#,
    )
    .await;
    // The first pass only marks where the scheduler starts reading.
    f.pass(T0).await;
    let a = f.change("Ada <ada@x.org>", "main", &["src/a.rs"]).await;
    let b = f
        .change("Bob <bob@x.org>", "main", &["docs/readme.md"])
        .await;
    let _c = f.change("Cy", "dev", &["src/c.rs"]).await;
    let p = f.pass(T0).await;
    assert_eq!(p.changes_seen, 3);
    assert!(p.buildsets.is_empty());
    assert_eq!(p.next_timer_ms, Some(T0 + 30_000));
    assert!(f.pass(T0 + 10_000).await.buildsets.is_empty());
    // An important change restarts the timer; an unimportant one does not.
    let d = f.change("Dee <dee@x.org>", "main", &["src/d.rs"]).await;
    f.pass(T0 + 20_000).await;
    let _e = f.change("Eve", "main", &["docs/x.md"]).await;
    f.pass(T0 + 25_000).await;
    assert!(f.pass(T0 + 49_000).await.buildsets.is_empty());
    let p = f.pass(T0 + 50_000).await;
    assert_eq!(p.buildsets.len(), 1, "{p:?}");
    let bs = p.buildsets[0].1;
    let changes = f.changes_of(bs).await;
    assert_eq!(&changes[..3], &[a, b, d]);
    assert_eq!(
        changes.len(),
        4,
        "the unimportant change after d rides along"
    );
    let mut c = f.conn().await;
    let stamps = db::buildset_sourcestamps(&mut c, bs).await.unwrap();
    assert_eq!(stamps[0].branch.as_deref(), Some("main"));
    assert_eq!(stamps[0].revision.as_deref(), Some("rev-Eve-main"));
    let props = db::buildset_properties(&mut c, bs).await.unwrap();
    assert!(
        props
            .iter()
            .any(|p| p.name == "tier" && p.value == json!("gate") && p.source == "Scheduler main")
    );
    assert_eq!(
        db::blamelist(&mut c, bs).await.unwrap(),
        vec![
            "Ada <ada@x.org>",
            "Bob <bob@x.org>",
            "Dee <dee@x.org>",
            "Eve"
        ]
    );
    assert_eq!(db::buildset_requests(&mut c, bs).await.unwrap().len(), 2);
    assert!(f.pass(T0 + 90_000).await.buildsets.is_empty(), "fired once");
    let bs = &f.buildsets("main").await[0];
    assert_eq!(
        bs.reason,
        "The SingleBranchScheduler 'main' triggered this build"
    );
}

async fn without_a_timer_every_change_builds_and_the_queue_collapses(t: TestDb) {
    let f = farm(
        t,
        r#"
[[schedulers]]
name = "main"
type = "single-branch"
branch = "main"
builders = ["linux", "mac"]
"#,
    )
    .await;
    f.pass(T0).await;
    for who in ["a", "b", "c"] {
        f.change(who, "main", &["x"]).await;
    }
    let p = f.pass(T0).await;
    assert_eq!(p.buildsets.len(), 3);
    // linux collapses: only the newest request is left, the older two were absorbed by it.
    let linux = f.queued("linux").await;
    assert_eq!(linux.len(), 1);
    assert_eq!(linux[0].buildset, p.buildsets[2].1);
    // mac does not collapse.
    assert_eq!(f.queued("mac").await.len(), 3);
    // Each new request absorbed the one queued before it.
    let mut c = f.conn().await;
    let mut linux_requests = Vec::new();
    for (_, bs) in &p.buildsets {
        let reqs = db::buildset_requests(&mut c, *bs).await.unwrap();
        linux_requests.push(reqs.iter().find(|r| r.1 == "linux").unwrap().0);
    }
    for pair in linux_requests.windows(2) {
        let (_, complete, results, into) = db::get_request(&mut c, pair[0]).await.unwrap().unwrap();
        assert!(complete);
        assert_eq!(results, Some(Results::Skipped));
        assert_eq!(into, Some(pair[1]));
    }
    assert_eq!(linux_requests[2], linux[0].id);
    // The first two buildsets are complete (SKIPPED on linux), but wait for mac.
    assert!(
        !db::get_buildset(&mut c, p.buildsets[0].1)
            .await
            .unwrap()
            .unwrap()
            .complete
    );
}

async fn any_branch_builds_each_matching_branch(t: TestDb) {
    let f = farm(
        t,
        r#"
[[schedulers]]
name = "releases"
type = "any-branch"
branches = ["release/*"]
tree_stable_timer = "5s"
builders = ["mac"]
"#,
    )
    .await;
    f.pass(T0).await;
    let r1 = f.change("a", "release/1", &["x"]).await;
    let r2 = f.change("b", "release/2", &["x"]).await;
    f.change("c", "main", &["x"]).await;
    f.pass(T0).await;
    let p = f.pass(T0 + 5_000).await;
    assert_eq!(p.buildsets.len(), 2);
    let mut got = vec![
        f.changes_of(p.buildsets[0].1).await,
        f.changes_of(p.buildsets[1].1).await,
    ];
    got.sort();
    assert_eq!(got, vec![vec![r1], vec![r2]]);
}

async fn periodic_fires_at_once_then_every_interval_and_never_twice(t: TestDb) {
    let f = farm(
        t,
        r#"
[[schedulers]]
name = "hourly"
type = "periodic"
interval = "1h"
builders = ["mac"]

[[schedulers]]
name = "if-changed"
type = "periodic"
interval = "1h"
only_if_changed = true
builders = ["mac"]
"#,
    )
    .await;
    let hour = 3_600_000;
    let p = f.pass(T0).await;
    assert_eq!(p.buildsets.len(), 1, "{p:?}");
    assert_eq!(p.next_timer_ms, Some(T0 + hour));
    assert!(f.pass(T0 + hour - 1).await.buildsets.is_empty());
    assert_eq!(f.pass(T0 + hour).await.buildsets.len(), 1);
    // Down for five hours: one build, not five, then back on the hour.
    let p = f.pass(T0 + 6 * hour + 7).await;
    assert_eq!(p.buildsets.len(), 1);
    assert!(f.pass(T0 + 6 * hour + 8).await.buildsets.is_empty());
    assert_eq!(f.buildsets("hourly").await.len(), 3);
    assert!(
        f.buildsets("if-changed").await.is_empty(),
        "nothing changed"
    );
    f.change("a", "main", &["x"]).await;
    let p = f.pass(T0 + 7 * hour + 7).await;
    assert_eq!(
        p.buildsets.iter().filter(|b| b.0 == "if-changed").count(),
        1
    );
    let ids: Vec<Option<String>> = f
        .buildsets("hourly")
        .await
        .into_iter()
        .map(|b| b.external_id)
        .collect();
    assert_eq!(ids[0], Some(format!("timer:{T0}")));
}

async fn nightly_follows_cron_in_its_time_zone(t: TestDb) {
    let f = farm(
        t,
        r#"
[[schedulers]]
name = "nightly"
type = "nightly"
cron = "0 3 * * *"
timezone = "Europe/Paris"
branch = "main"
builders = ["mac"]
"#,
    )
    .await;
    // 2026-01-15 12:00 UTC; 03:00 in Paris (UTC+1 in winter) is 02:00 UTC the next day.
    let noon = 1_768_478_400_000;
    let next = 1_768_528_800_000;
    let p = f.pass(noon).await;
    assert!(
        p.buildsets.is_empty(),
        "a nightly scheduler waits for its first time"
    );
    assert_eq!(p.next_timer_ms, Some(next));
    assert!(f.pass(next - 1).await.buildsets.is_empty());
    let p = f.pass(next).await;
    assert_eq!(p.buildsets.len(), 1);
    assert_eq!(p.next_timer_ms, Some(next + 86_400_000));
    let mut c = f.conn().await;
    let stamps = db::buildset_sourcestamps(&mut c, p.buildsets[0].1)
        .await
        .unwrap();
    assert_eq!(stamps[0].branch.as_deref(), Some("main"));
}

async fn force_checks_typed_parameters(t: TestDb) {
    let f = farm(
        t,
        r#"
[[schedulers]]
name = "force"
type = "force"
builders = ["linux", "mac"]
parameters = [
  { name = "version", type = "string", regex = "[0-9]+\\.[0-9]+", required = true },
  { name = "jobs", type = "int", default = 4 },
  { name = "clean", type = "bool" },
  { name = "target", type = "choice", choices = ["debug", "release"], default = "debug" },
  { name = "revision", type = "string" },
]
"#,
    )
    .await;
    let force = |req: ForceRequest| {
        let m = f.master.clone();
        async move {
            m.with_env(async |env| schedulers::force(env, "force", &req, T0).await.unwrap())
                .await
        }
    };
    let ok = force(ForceRequest {
        builders: vec!["mac".into()],
        reason: "release candidate".into(),
        owner: "ada".into(),
        branch: Some("main".into()),
        parameters: json!({"version": "1.2", "jobs": "8", "clean": true, "revision": "abc"})
            .as_object()
            .unwrap()
            .clone(),
        priority: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(ok.requests.len(), 1);
    assert_eq!(ok.requests[0].1, "mac");
    let mut c = f.conn().await;
    let props = db::buildset_properties(&mut c, ok.buildset).await.unwrap();
    let get = |n: &str| props.iter().find(|p| p.name == n).map(|p| p.value.clone());
    assert_eq!(get("version"), Some(json!("1.2")));
    assert_eq!(get("jobs"), Some(json!(8)));
    assert_eq!(get("clean"), Some(json!(true)));
    assert_eq!(get("target"), Some(json!("debug")));
    assert_eq!(get("owner"), Some(json!("ada")));
    assert_eq!(
        props.iter().find(|p| p.name == "version").unwrap().source,
        "Force Build Form"
    );
    let bs = db::get_buildset(&mut c, ok.buildset)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bs.reason, "A build was forced by 'ada': release candidate");
    assert_eq!(f.queued("mac").await[0].priority, 3);
    // A parameter named after a source stamp field fills it.
    let stamps = db::buildset_sourcestamps(&mut c, ok.buildset)
        .await
        .unwrap();
    assert_eq!(stamps[0].revision.as_deref(), Some("abc"));
    assert_eq!(stamps[0].branch.as_deref(), Some("main"));

    let err = |params: serde_json::Value, builders: Vec<String>| {
        force(ForceRequest {
            builders,
            parameters: params.as_object().unwrap().clone(),
            ..Default::default()
        })
    };
    let cases = [
        (json!({}), vec![], "parameter \"version\" is required"),
        (
            json!({"version": "x"}),
            vec![],
            "parameter \"version\": \"x\" does not match ^(?:[0-9]+\\.[0-9]+)$",
        ),
        (
            json!({"version": "1.0", "jobs": "many"}),
            vec![],
            "parameter \"jobs\": \"many\" is not an integer",
        ),
        (
            json!({"version": "1.0", "clean": "maybe"}),
            vec![],
            "parameter \"clean\": \"maybe\" is not true or false",
        ),
        (
            json!({"version": "1.0", "target": "fast"}),
            vec![],
            "parameter \"target\": \"fast\" is not one of debug, release",
        ),
        (
            json!({"version": "1.0", "colour": 1}),
            vec![],
            "parameter \"colour\" is not one of scheduler \"force\"'s (version, jobs, clean, target, revision)",
        ),
        (
            json!({"version": "1.0"}),
            vec!["forks".to_string()],
            "builder \"forks\" is not one of scheduler \"force\"'s builders (linux, mac)",
        ),
    ];
    for (params, builders, expected) in cases {
        assert_eq!(
            err(params, builders).await.unwrap_err(),
            RequestError::Invalid(expected.into())
        );
    }
    let missing = f
        .master
        .with_env(async |env| {
            schedulers::force(env, "nope", &ForceRequest::default(), T0)
                .await
                .unwrap()
        })
        .await;
    assert_eq!(
        missing.unwrap_err().to_string(),
        "there is no force scheduler \"nope\" (defined: force)"
    );
}

async fn finish(f: &Farm, bs: BuildsetId, results: Results) {
    let mut c = f.conn().await;
    let reqs = db::buildset_requests(&mut c, bs).await.unwrap();
    drop(c);
    let mut tx = f.master.db.begin().await.unwrap();
    let mut done = Vec::new();
    for (r, ..) in &reqs {
        assert!(
            db::claim_request(&mut tx, *r, f.master.id, T0)
                .await
                .unwrap()
        );
        done.push((*r, results, None));
    }
    let completed = requests::finish_requests(&f.master.db, &mut tx, f.master.id, &done, T0)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(completed, vec![(bs, results)]);
}

async fn dependent_follows_successful_upstream_buildsets(t: TestDb) {
    let f = farm(
        t,
        r#"
[[schedulers]]
name = "force"
type = "force"
builders = ["linux", "mac"]

[[schedulers]]
name = "after"
type = "dependent"
upstream = "force"
builders = ["mac"]
"#,
    )
    .await;
    f.pass(T0).await;
    let forced = |branch: &str| {
        let m = f.master.clone();
        let req = ForceRequest {
            branch: Some(branch.into()),
            ..Default::default()
        };
        async move {
            m.with_env(async |env| {
                schedulers::force(env, "force", &req, T0)
                    .await
                    .unwrap()
                    .unwrap()
            })
            .await
        }
    };
    let good = forced("good").await;
    let bad = forced("bad").await;
    finish(&f, good.buildset, Results::Success).await;
    finish(&f, bad.buildset, Results::Failure).await;
    let mut c = f.conn().await;
    let bs = db::get_buildset(&mut c, bad.buildset)
        .await
        .unwrap()
        .unwrap();
    assert!(bs.first_failure_ms.is_some());
    let events = db::events_after(&mut c, 0, 100).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        vec![
            "buildset.complete",
            "buildset.first_failure",
            "buildset.complete"
        ]
    );
    let p = f.pass(T0 + 1).await;
    assert_eq!(p.buildsets.len(), 1);
    let stamps = db::buildset_sourcestamps(&mut c, p.buildsets[0].1)
        .await
        .unwrap();
    assert_eq!(stamps[0].branch.as_deref(), Some("good"));
    assert!(f.pass(T0 + 2).await.buildsets.is_empty());
}

async fn trigger_and_try_make_buildsets(t: TestDb) {
    let f = farm(
        t,
        r#"
[[schedulers]]
name = "deploy"
type = "triggerable"
builders = ["mac"]

[[schedulers]]
name = "try"
type = "try"
builders = ["linux", "mac"]
users = ["ada"]
"#,
    )
    .await;
    let stamp = SourceStamp {
        repository: "https://example.org/app.git".into(),
        branch: Some("main".into()),
        revision: Some("abc".into()),
        ..Default::default()
    };
    let trig = TriggerRequest {
        sourcestamps: vec![stamp.clone()],
        properties: json!({"version": "1.2"}).as_object().unwrap().clone(),
        parent_build: None,
        trusted: false,
    };
    let s = f
        .master
        .with_env(async |env| {
            schedulers::trigger(env, "deploy", &trig, T0)
                .await
                .unwrap()
                .unwrap()
        })
        .await;
    let mut c = f.conn().await;
    let bs = db::get_buildset(&mut c, s.buildset).await.unwrap().unwrap();
    assert!(!bs.trusted, "an untrusted build triggers untrusted builds");
    let props = db::buildset_properties(&mut c, s.buildset).await.unwrap();
    assert!(
        props
            .iter()
            .any(|p| p.name == "version" && p.source == "Trigger")
    );

    let mut try_stamp = stamp.clone();
    try_stamp.patch = Some(Patch {
        level: 1,
        body: b"diff --git a/x b/x\n".to_vec(),
        author: Some("ada".into()),
        comment: None,
        subdir: None,
    });
    let tr = TryRequest {
        who: "ada".into(),
        builders: vec!["linux".into()],
        sourcestamp: try_stamp.clone(),
        comment: "does this build?".into(),
        ..Default::default()
    };
    let s = f
        .master
        .with_env(async |env| {
            schedulers::try_build(env, "try", &tr, T0)
                .await
                .unwrap()
                .unwrap()
        })
        .await;
    let stamps = db::buildset_sourcestamps(&mut c, s.buildset).await.unwrap();
    assert_eq!(
        stamps[0].patch.as_ref().unwrap().body,
        b"diff --git a/x b/x\n"
    );
    let bs = db::get_buildset(&mut c, s.buildset).await.unwrap().unwrap();
    assert_eq!(bs.reason, "'try' job by user ada: does this build?");
    let refused = |tr: TryRequest| {
        let m = f.master.clone();
        async move {
            m.with_env(async |env| schedulers::try_build(env, "try", &tr, T0).await.unwrap())
                .await
                .unwrap_err()
                .to_string()
        }
    };
    assert_eq!(
        refused(TryRequest {
            who: "mallory".into(),
            ..tr.clone()
        })
        .await,
        "user \"mallory\" may not send try builds to \"try\""
    );
    assert_eq!(
        refused(TryRequest {
            sourcestamp: stamp.clone(),
            ..tr.clone()
        })
        .await,
        "a try build needs a patch (the diff of the working tree)"
    );
}

fn worker(name: &str, sandbox: bool, max: u32) -> FreeWorker {
    FreeWorker {
        name: name.into(),
        arch: None,
        os: None,
        tags: vec![],
        sandbox,
        running_builds: 0,
        max_builds: max,
    }
}

async fn claims_route_trusted_and_untrusted_work(t: TestDb) {
    let f = farm(
        t,
        r#"
[[schedulers]]
name = "force"
type = "force"
builders = ["linux", "mac", "forks"]
"#,
    )
    .await;
    for priority in [0, 0, 9] {
        let req = ForceRequest {
            priority,
            builders: vec!["mac".into()],
            ..Default::default()
        };
        f.master
            .with_env(async |env| {
                schedulers::force(env, "force", &req, T0)
                    .await
                    .unwrap()
                    .unwrap()
            })
            .await;
    }
    let req = ForceRequest {
        builders: vec!["forks".into(), "linux".into()],
        ..Default::default()
    };
    f.master
        .with_env(async |env| {
            schedulers::force(env, "force", &req, T0)
                .await
                .unwrap()
                .unwrap()
        })
        .await;
    let mac_queue = f.queued("mac").await;
    let mut workers = vec![
        worker("w1", false, 1),
        worker("w2", false, 2),
        worker("sandbox", true, 1),
    ];
    let got = f.claim(&mut workers).await;
    // mac has the higher builder priority, so it goes first: its urgent request first, on the
    // least busy workers, one mac build per worker (a worker runs one build of a builder at a
    // time); the untrusted "forks" request only on the sandbox worker; w2's second slot
    // goes to linux.
    let summary: Vec<(String, String)> = got
        .iter()
        .map(|a| (a.builder.clone(), a.worker.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("mac".to_string(), "w1".to_string()),
            ("mac".to_string(), "w2".to_string()),
            ("forks".to_string(), "sandbox".to_string()),
            ("linux".to_string(), "w2".to_string()),
        ]
    );
    assert_eq!(got[0].request, mac_queue[0].id);
    assert_eq!(mac_queue[0].priority, 9);
    // One mac request is left queued: each worker already runs a mac build.
    assert_eq!(f.queued("mac").await.len(), 1);
    assert!(f.queued("linux").await.is_empty());
    let mut c = f.conn().await;
    for a in &got {
        assert_eq!(
            db::claimed_by(&mut c, a.request).await.unwrap(),
            Some(f.master.id)
        );
    }
}

async fn a_scheduler_runs_on_one_master_at_a_time(t: TestDb) {
    let url = t.url.clone();
    let f = farm(
        t,
        r#"
[[schedulers]]
name = "main"
type = "single-branch"
branch = "main"
builders = ["mac"]
"#,
    )
    .await;
    let mut cfg = config::load(&f.dir.path().join("kiln.toml")).unwrap();
    cfg.master.name = "m2".into();
    let second = Master::start(cfg, Some(&url)).await.unwrap();
    f.pass(T0).await;
    second
        .with_env(async |env| schedulers::run_pass(env, T0).await.unwrap())
        .await;
    for who in ["a", "b", "c", "d"] {
        f.change(who, "main", &["x"]).await;
        let (p1, p2) = tokio::join!(
            f.pass(T0),
            second.with_env(async |env| schedulers::run_pass(env, T0).await.unwrap())
        );
        assert!(
            p2.buildsets.is_empty() && p2.changes_seen == 0,
            "m2 does not run it"
        );
        assert_eq!(p1.buildsets.len(), 1);
    }
    assert_eq!(f.buildsets("main").await.len(), 4);
    // m1 stops beating; m2 takes its scheduler over and goes on from where it stopped.
    let mut c = f.conn().await;
    db::heartbeat(&mut c, f.master.id, 0).await.unwrap();
    second.heartbeat().await.unwrap();
    f.change("e", "main", &["x"]).await;
    let p = second
        .with_env(async |env| schedulers::run_pass(env, T0).await.unwrap())
        .await;
    assert_eq!(p.buildsets.len(), 1);
    assert_eq!(f.buildsets("main").await.len(), 5);
}

async fn a_policy_filters_changes_and_steers_dispatch(t: TestDb) {
    let f = farm(
        t,
        r#"
[hooks]
next_worker = "policy:policy.wasm"

[[schedulers]]
name = "main"
type = "single-branch"
branch = "main"
builders = ["mac"]
policy = "policy:policy.wasm"
"#,
    )
    .await;
    f.pass(T0).await;
    f.change("bot", "main", &["src/a.rs"]).await;
    let docs = f.change("ada", "main", &["README.md"]).await;
    let code = f.change("ada", "main", &["src/lib.rs"]).await;
    let p = f.pass(T0).await;
    // The fixture ignores the bot, holds docs as unimportant, builds .rs changes.
    assert_eq!(p.buildsets.len(), 1);
    assert_eq!(f.changes_of(p.buildsets[0].1).await, vec![docs, code]);
    // Its next-worker hook picks the worker whose name sorts last.
    let mut workers = vec![worker("w1", false, 1), worker("w2", false, 1)];
    let state = f.master.state();
    let got = f.claim(&mut workers).await;
    assert_eq!(got[0].worker, "w2");
    assert_eq!(state.hooks.failures(), 0);
}

async fn reload_keeps_queued_work_and_refuses_bad_config(t: TestDb) {
    let f = farm(
        t,
        r#"
[[schedulers]]
name = "force"
type = "force"
builders = ["linux", "mac"]
"#,
    )
    .await;
    let req = ForceRequest::default();
    f.master
        .with_env(async |env| {
            schedulers::force(env, "force", &req, T0)
                .await
                .unwrap()
                .unwrap()
        })
        .await;
    let path = f.dir.path().join("kiln.toml");
    std::fs::write(
        &path,
        format!(
            "{}\n[[schedulers]]\nname = \"force\"\ntype = \"force\"\nbuilders = [\"linux\"]\n",
            BASE.replace(
                "name = \"mac\"\ncollapse = false",
                "name = \"mac2\"\ncollapse = false"
            )
        ),
    )
    .unwrap();
    let diff = f.master.reload().await.unwrap();
    assert_eq!(diff.builders.added, vec!["mac2".to_string()]);
    assert_eq!(diff.builders.removed, vec!["mac".to_string()]);
    assert!(f.master.state().config.builder("mac2").is_some());
    // mac's request stays queued (mac may come back); it is not offered to workers now.
    assert_eq!(f.queued("mac").await.len(), 1);
    let mut workers = vec![worker("w1", false, 4)];
    let got = f.claim(&mut workers).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].builder, "linux");

    std::fs::write(&path, "[[builders]]\nname = 3\n").unwrap();
    let err = f.master.reload().await.unwrap_err().to_string();
    assert!(err.contains("kiln.toml"), "{err}");
    assert!(
        f.master.state().config.builder("mac2").is_some(),
        "the old config stays"
    );
}

async fn force_with(f: &Farm, builders: &[&str], params: serde_json::Value) -> BuildRequestId {
    let req = ForceRequest {
        builders: builders.iter().map(|b| b.to_string()).collect(),
        parameters: params.as_object().unwrap().clone(),
        ..Default::default()
    };
    let s = f
        .master
        .with_env(async |env| {
            schedulers::force(env, "force", &req, T0)
                .await
                .unwrap()
                .unwrap()
        })
        .await;
    s.requests[0].0
}

async fn policy_hooks_decide_and_a_failing_hook_falls_back(t: TestDb) {
    let f = farm(
        t,
        r#"
[hooks]
collapse_requests = "policy:policy.wasm"
prioritize_builders = "policy:policy.wasm"
next_build = "policy:policy.wasm"
can_start_build = "policy:policy.wasm"

[[builders]]
name = "panic"
[[builders.steps]]
module = "shell"
args = { command = ["true"] }

[[schedulers]]
name = "force"
type = "force"
builders = ["linux", "panic"]
parameters = [{ name = "collapse_key", type = "string" }, { name = "block", type = "bool" }]
"#,
    )
    .await;
    // The fixture collapses requests with equal "collapse_key" properties only.
    let a = force_with(&f, &["linux"], json!({"collapse_key": "x"})).await;
    let b = force_with(&f, &["linux"], json!({"collapse_key": "y"})).await;
    let c = force_with(&f, &["linux"], json!({"collapse_key": "x"})).await;
    let d = force_with(&f, &["linux"], json!({"block": true})).await;
    let e = force_with(&f, &["panic"], json!({})).await;
    let g = force_with(&f, &["panic"], json!({})).await;
    let mut conn = f.conn().await;
    let (_, done, _, into) = db::get_request(&mut conn, a).await.unwrap().unwrap();
    assert!(done);
    assert_eq!(into, Some(c));
    // On "panic" the collapse hook traps, so Kiln's own rule merges the identical requests.
    let (_, done, _, into) = db::get_request(&mut conn, e).await.unwrap().unwrap();
    assert!(done);
    assert_eq!(into, Some(g));
    drop(conn);
    let queued: Vec<BuildRequestId> = f.queued("linux").await.iter().map(|r| r.id).collect();
    assert_eq!(queued, vec![b, c, d]);

    let mut workers = vec![worker("w1", false, 1), worker("w2", false, 2)];
    let state = f.master.state();
    let got = f.claim(&mut workers).await;
    // next-build takes the newest first; can-start-build holds the blocked one back; on
    // "panic" the hooks trap, and the defaults (oldest first) decide.
    let order: Vec<(BuildRequestId, &str)> =
        got.iter().map(|a| (a.request, a.worker.as_str())).collect();
    assert_eq!(order, vec![(c, "w1"), (b, "w2"), (g, "w2")]);
    assert!(state.hooks.failures() >= 3, "{}", state.hooks.failures());
    assert_eq!(
        f.queued("linux").await.len(),
        1,
        "the blocked request waits"
    );
}

async fn timers_survive_a_restart(t: TestDb) {
    let url = t.url.clone();
    let f = farm(
        t,
        r#"
[[schedulers]]
name = "main"
type = "single-branch"
branch = "main"
tree_stable_timer = "30s"
builders = ["linux"]
"#,
    )
    .await;
    f.pass(T0).await;
    let a = f.change("ada", "main", &["x"]).await;
    assert_eq!(f.pass(T0).await.next_timer_ms, Some(T0 + 30_000));
    // The master goes away; a new process with the same name takes over the same database.
    let cfg = config::load(&f.dir.path().join("kiln.toml")).unwrap();
    let again = Master::start(cfg, Some(&url)).await.unwrap();
    assert_eq!(again.id, f.master.id);
    let pass = |now| {
        let m = again.clone();
        async move {
            m.with_env(async |env| schedulers::run_pass(env, now).await.unwrap())
                .await
        }
    };
    let p = pass(T0 + 29_000).await;
    assert!(p.buildsets.is_empty());
    assert_eq!(
        p.next_timer_ms,
        Some(T0 + 30_000),
        "the timer was remembered"
    );
    let p = pass(T0 + 30_000).await;
    assert_eq!(p.buildsets.len(), 1);
    assert_eq!(f.changes_of(p.buildsets[0].1).await, vec![a]);
}
