//! A real farm on 127.0.0.1: a `kiln master` process and `kiln-worker` processes, a real git
//! repository, SIGKILLs at awkward moments, and workers that lie.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_db::{self as db, Db};
use serde_json::{Value, json};

use crate::git_step::git;
pub(crate) use kiln_testkit::farm::{Farm, RETRY, SUCCESS, workers};

/// A repository with one commit.
fn repository(root: &Path) -> PathBuf {
    let repo = root.join("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    std::fs::write(repo.join("hello.sh"), "echo \"hello from the repo\"\n").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-qm", "first"]);
    repo
}

#[test]
fn a_build_runs_git_and_shell_steps_end_to_end_on_a_worker() {
    let mut farm = Farm::new(&format!(
        r#"{}
[[builders]]
name = "app"
grant = {{ programs = ["git", "sh"] }}
[[builders.steps]]
module = "git"
args = {{ repourl = "%(prop:repository)s", branch = "main" }}
halt_on_failure = true
[[builders.steps]]
module = "shell"
name = "run"
args = {{ command = ["sh", "-c", "sh hello.sh; echo to-stderr >&2"] }}

[[schedulers]]
name = "force"
type = "force"
builders = ["app"]
"#,
        workers(&["w1"], false)
    ));
    let repo = repository(farm.path());
    farm.start_master();
    farm.start_worker("w1", &[]);
    let request = farm.force(
        "force",
        json!({"parameters": {}, "repository": repo.display().to_string(), "branch": "main"}),
    );
    let build = farm.finished_build(request, 0, Duration::from_secs(60));
    assert_eq!(build["results"], SUCCESS, "{build:#}{}", farm.logs());
    assert_eq!(build["worker"], "w1");
    let steps = build["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{build:#}");
    assert_eq!(steps[0]["results"], SUCCESS);
    let log = steps[1]["logs"][0]["logid"].as_i64().unwrap();
    let text = farm.log_text(log);
    assert!(text.contains("hello from the repo\n"), "{text}");
    assert!(text.contains("to-stderr\n"), "{text}");
    // The git step's property reached the master, with its source.
    assert_eq!(
        build["properties"]["got_revision"][1], "Step git",
        "{build:#}"
    );
    // A limit out of range is a bad request, saying what to give.
    let (status, body) = farm.api("GET", "/api/v2/builds?limit=0", "");
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "limit=0: give 1 to 10000");
    // The request completed, and the worker is healthy and idle.
    let (_, workers) = farm.api("GET", "/api/v2/workers", "");
    assert_eq!(workers["workers"][0]["connected"], true);
    assert_eq!(workers["workers"][0]["health"], "ok");
    assert_eq!(workers["workers"][0]["builds"], json!([]));
}

const SLOW_BUILDER: &str = r#"
[[builders]]
name = "slow"
collapse = false
grant = { programs = ["sh"] }
[[builders.steps]]
module = "shell"
name = "slow"
args = { command = ["sh", "-c", "echo started; echo run >> ../../runs.txt; sleep ${SLEEP}; echo finished"] }

[[schedulers]]
name = "force"
type = "force"
builders = ["slow"]
"#;

pub(crate) fn slow(sleep: &str) -> String {
    SLOW_BUILDER.replace("${SLEEP}", sleep)
}

#[test]
fn a_worker_killed_mid_step_ends_its_build_retry_and_the_request_runs_elsewhere() {
    let mut farm = Farm::new(&format!("{}{}", workers(&["w1"], false), slow("3")));
    let config = std::fs::read_to_string(farm.path().join("kiln.toml")).unwrap();
    std::fs::write(
        farm.path().join("kiln.toml"),
        config.replace("max_builds = 2", "max_builds = 1")
            + &workers(&["w2"], false).replace("max_builds = 2", "max_builds = 1"),
    )
    .unwrap();
    farm.start_master();
    farm.start_worker("w1", &[]);
    let request = farm.force("force", json!({"parameters": {}}));
    // The step is running on w1.
    farm.wait_until("the step to start", Duration::from_secs(30), || {
        farm.builds_of(request).first().is_some_and(|b| {
            b["state_string"] == ""
                && farm.build(b["buildid"].as_i64().unwrap())["steps"]
                    .as_array()
                    .is_some_and(|s| !s.is_empty())
        })
    });
    let first = farm.builds_of(request)[0].clone();
    farm.kill_worker("w1");
    farm.start_worker("w2", &[]);
    // After three heartbeats the build ends RETRY and the request runs again, on w2.
    let retried = farm.finished_build(request, 0, Duration::from_secs(30));
    assert_eq!(retried["results"], RETRY, "{retried:#}");
    assert!(
        retried["state_string"]
            .as_str()
            .unwrap()
            .contains("worker w1 was lost"),
        "{retried:#}"
    );
    let second = farm.finished_build(request, 1, Duration::from_secs(60));
    assert_eq!(second["results"], SUCCESS, "{second:#}{}", farm.logs());
    assert_eq!(second["worker"], "w2");
    assert_eq!(second["number"], first["number"].as_i64().unwrap() + 1);
    // The old attempt's late reports are refused: w1 comes back, says it runs nothing the
    // master holds, and the first build stays RETRY.
    farm.start_worker("w1", &[]);
    std::thread::sleep(Duration::from_secs(1));
    let again = farm.build(first["buildid"].as_i64().unwrap());
    assert_eq!(again["results"], RETRY);
    let (_, workers) = farm.api("GET", "/api/v2/workers", "");
    assert_eq!(workers["workers"][0]["failure_count"], 1, "{workers:#}");
    let metrics = farm.metrics();
    let finished = |result: &str| {
        metric(
            &metrics,
            &format!("kiln_builds_finished_total{{builder=\"slow\",result=\"{result}\"}}"),
        )
    };
    assert_eq!((finished("RETRY"), finished("SUCCESS")), (1.0, 1.0));
    assert_eq!(
        metric(&metrics, "kiln_builds_started_total{builder=\"slow\"}"),
        2.0
    );
}

#[test]
fn a_master_killed_mid_build_loses_nothing_and_runs_nothing_twice() {
    let mut farm = Farm::new(&format!("{}{}", workers(&["w1", "w2"], false), slow("2")));
    farm.start_master();
    farm.start_worker("w1", &[]);
    farm.start_worker("w2", &[]);
    let requests: Vec<i64> = (0..2)
        .map(|_| farm.force("force", json!({"parameters": {}})))
        .collect();
    farm.wait_until("both builds to run", Duration::from_secs(30), || {
        std::fs::read_to_string(farm.path().join("runs.txt")).is_ok_and(|t| t.lines().count() == 2)
    });
    farm.kill_master();
    std::thread::sleep(Duration::from_millis(500));
    farm.start_master();
    for r in &requests {
        let b = farm.finished_build(*r, 0, Duration::from_secs(60));
        assert_eq!(b["results"], SUCCESS, "{b:#}{}", farm.logs());
        let log = b["steps"][0]["logs"][0]["logid"].as_i64().unwrap();
        let text = farm.log_text(log);
        assert_eq!(
            text.matches("started\n").count(),
            1,
            "lines applied twice? {text}"
        );
        assert!(text.contains("finished\n"), "{text}");
        assert_eq!(farm.builds_of(*r).len(), 1, "request {r} built twice");
    }
    let runs = std::fs::read_to_string(farm.path().join("runs.txt")).unwrap();
    assert_eq!(runs.lines().count(), 2, "a build ran twice");
}

#[test]
fn an_untrusted_build_with_only_trusted_workers_online_stays_queued() {
    let mut farm = Farm::new(&format!(
        r#"{}{}
[[builders]]
name = "pr"
trusted = false
workdir = "pr"
grant = {{ programs = ["sh"] }}
[[builders.steps]]
module = "shell"
args = {{ command = ["sh", "-c", "echo sandboxed"] }}

[[schedulers]]
name = "force-pr"
type = "force"
builders = ["pr"]
"#,
        workers(&["w1"], false),
        workers(&["box"], true)
    ));
    farm.start_master();
    farm.start_worker("w1", &[]);
    let request = farm.force("force-pr", json!({"parameters": {}}));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        farm.builds_of(request).is_empty(),
        "it ran on a trusted worker"
    );
    let (_, queue) = farm.api("GET", "/api/v2/buildrequests?complete=false", "");
    assert_eq!(
        queue["buildrequests"].as_array().unwrap().len(),
        1,
        "{queue:#}"
    );
    // What a Prometheus server scrapes says the same.
    let metrics = farm.metrics();
    assert_eq!(metric(&metrics, "kiln_queue_depth{builder=\"pr\"}"), 1.0);
    assert!(metric(&metrics, "kiln_queue_oldest_age_seconds{builder=\"pr\"}") >= 2.0);
    assert_eq!(metric(&metrics, "kiln_workers{state=\"idle\"}"), 1.0);
    assert_eq!(metric(&metrics, "kiln_workers{state=\"offline\"}"), 1.0);
    // A sandbox worker takes it, and wipes its workdir afterwards.
    farm.start_worker("box", &["--sandbox"]);
    let build = farm.finished_build(request, 0, Duration::from_secs(60));
    assert_eq!(build["results"], SUCCESS, "{build:#}{}", farm.logs());
    assert_eq!(build["worker"], "box");
    assert!(!farm.worker_dir("box").join("pr").exists());
    let metrics = farm.metrics();
    assert_eq!(metric(&metrics, "kiln_queue_depth{builder=\"pr\"}"), 0.0);
    assert_eq!(
        metric(&metrics, "kiln_builds_started_total{builder=\"pr\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "kiln_builds_finished_total{builder=\"pr\",result=\"SUCCESS\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "kiln_build_duration_seconds_count{builder=\"pr\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&metrics, "kiln_step_duration_seconds_count{builder=\"pr\"}"),
        1.0
    );
}

/// A sample's value in a scrape.
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {sample} in:\n{text}"))
}

#[test]
fn two_workers_racing_for_one_request_one_gets_it() {
    let mut farm = Farm::new(&format!("{}{}", workers(&["w1", "w2"], false), slow("0.2")));
    farm.start_master();
    farm.start_worker("w1", &[]);
    farm.start_worker("w2", &[]);
    farm.wait_until("both workers", Duration::from_secs(30), || {
        let (_, w) = farm.api("GET", "/api/v2/workers", "");
        w["workers"]
            .as_array()
            .is_some_and(|ws| ws.iter().all(|w| w["connected"] == true))
    });
    let request = farm.force("force", json!({"parameters": {}}));
    let build = farm.finished_build(request, 0, Duration::from_secs(30));
    assert_eq!(build["results"], SUCCESS);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(farm.builds_of(request).len(), 1);
    let runs = std::fs::read_to_string(farm.path().join("runs.txt")).unwrap();
    assert_eq!(runs.lines().count(), 1);
}

/// A worker that speaks the protocol by hand, to lie to the master.
mod liar {
    use futures_util::{SinkExt, StreamExt};
    use kiln_protocol::{BuildEvent, BuildRef, Capabilities, PROTOCOL_VERSION, ToMaster, ToWorker};
    use tokio_tungstenite::tungstenite::Message;

    pub(crate) type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    pub(crate) async fn connect(port: u16, name: &str, token: &str) -> (Ws, ToWorker) {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/workers/connect"))
                .await
                .unwrap();
        let hello = ToMaster::Hello {
            protocol: PROTOCOL_VERSION,
            name: name.into(),
            token: token.into(),
            capabilities: Capabilities {
                arch: std::env::consts::ARCH.into(),
                os: std::env::consts::OS.into(),
                max_builds: 1,
                ..Default::default()
            },
            running: vec![],
        };
        ws.send(Message::text(serde_json::to_string(&hello).unwrap()))
            .await
            .unwrap();
        let answer = next(&mut ws).await;
        (ws, answer)
    }

    pub(crate) async fn next(ws: &mut Ws) -> ToWorker {
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
                .await
                .expect("the master said nothing")
            {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
                Some(Ok(_)) => continue,
                other => panic!("connection ended: {other:?}"),
            }
        }
    }

    /// Build message `seq` about `build`, as a worker sends it.
    fn frame(build: &BuildRef, seq: u64, event: BuildEvent) -> Message {
        let m = ToMaster::Build {
            build: build.clone(),
            seq,
            event,
        };
        Message::text(serde_json::to_string(&m).unwrap())
    }

    /// Sends build message `seq` and returns the master's next answer (skipping scans).
    pub(crate) async fn send(
        ws: &mut Ws,
        build: &BuildRef,
        seq: u64,
        event: BuildEvent,
    ) -> ToWorker {
        ws.send(frame(build, seq, event)).await.unwrap();
        loop {
            match next(ws).await {
                ToWorker::Scan { .. } => continue,
                other => return other,
            }
        }
    }

    /// Connects as worker `name` (token `t-NAME`), forces a build on the `force` scheduler and
    /// waits for its Start: returns the connection, the request and the build it was given.
    pub(crate) async fn forced_build(farm: &super::Farm, name: &str) -> (Ws, i64, BuildRef) {
        let (mut ws, welcome) = connect(farm.port, name, &format!("t-{name}")).await;
        assert!(matches!(welcome, ToWorker::Welcome { .. }), "{welcome:?}");
        let (port, token) = (farm.port, farm.token.clone());
        let request = tokio::task::spawn_blocking(move || {
            super::Farm::attach(port, token).force("force", serde_json::json!({"parameters": {}}))
        })
        .await
        .unwrap();
        loop {
            match next(&mut ws).await {
                ToWorker::Start(job) => return (ws, request, job.build),
                ToWorker::Scan { .. } => continue,
                other => panic!("{other:?}"),
            }
        }
    }

    /// Sends build messages `first..` in one write (so that the master takes them as one
    /// batch) and waits for the last one's acknowledgement; returns the refusals on the way.
    pub(crate) async fn burst(
        ws: &mut Ws,
        build: &BuildRef,
        first: u64,
        events: Vec<BuildEvent>,
    ) -> Vec<String> {
        let last = first + events.len() as u64 - 1;
        for (seq, event) in (first..).zip(events) {
            ws.feed(frame(build, seq, event)).await.unwrap();
        }
        ws.flush().await.unwrap();
        let mut refusals = Vec::new();
        loop {
            match next(ws).await {
                ToWorker::Ack { seq, .. } if seq == last => return refusals,
                ToWorker::Error { message } => refusals.push(message),
                _ => continue,
            }
        }
    }

    /// Sends a step start about `build` and returns the master's answer (skipping scans).
    pub(crate) async fn report(ws: &mut Ws, build: BuildRef) -> ToWorker {
        let m = ToMaster::Build {
            build,
            seq: 1,
            event: BuildEvent::StepStarted {
                step: 0,
                name: "forged".into(),
            },
        };
        ws.send(Message::text(serde_json::to_string(&m).unwrap()))
            .await
            .unwrap();
        loop {
            match next(ws).await {
                ToWorker::Scan { .. } => continue,
                other => return other,
            }
        }
    }
}

/// Messages that arrive together are applied as one batch, whose new steps and logs are each
/// written once, whole: what is stored must be what one-by-one application would store, and
/// a message the database cannot take fails the batch, which is then applied one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_messages_is_stored_as_if_applied_one_by_one() {
    use kiln_protocol::BuildEvent;
    use runtime::{Channel, ReportEvent, StepOutcome, StepRecord};
    let mut farm = Farm::new(&format!("{}{}", workers(&["w1"], false), slow("1")));
    farm.start_master();
    let (mut ws, request, build) = liar::forced_build(&farm, "w1").await;
    let (port, token) = (farm.port, farm.token.clone());
    let api = move || Farm::attach(port, token.clone());
    let started = |step: u32, name: &str| BuildEvent::StepStarted {
        step,
        name: name.into(),
    };
    let log = |step: u32, log: &str, channel, text: &str| BuildEvent::Log {
        step,
        log: log.into(),
        channel,
        text: text.into(),
    };
    let report = |step: u32, report| BuildEvent::Report { step, report };
    let ended = |step: u32, name: &str, summary: &str| BuildEvent::StepFinished {
        step,
        record: Box::new(StepRecord {
            name: name.into(),
            ran: true,
            hidden: false,
            outcome: StepOutcome {
                result: runtime::Outcome::Warnings,
                summary: Some(summary.into()),
                message: None,
                properties: [("built".to_owned(), json!(name))].into(),
                statistics: [("warnings".to_owned(), 1.0)].into(),
                progress: [("files".to_owned(), 3)].into(),
                urls: Vec::new(),
                logs: Default::default(),
                elapsed: Duration::from_millis(5),
                resources: None,
            },
        }),
    };
    let summary = |text: &str| ReportEvent::Summary { text: text.into() };
    let progress = |value| ReportEvent::Progress {
        metric: "tests".into(),
        value,
    };
    // One burst: step 0 starts, logs, reports and ends; step 1 starts, logs and reports.
    let first = vec![
        started(0, "compile"),
        report(0, summary("compiling")),
        log(0, "stdio", Channel::Stdout, "a\nb\n"),
        log(0, "warnings", Channel::Stderr, "w\n"),
        log(0, "stdio", Channel::Stderr, "c\n"),
        started(1, "test"),
        report(1, summary("3 tests")),
        report(1, progress(3)),
        log(1, "stdio", Channel::Stdout, "t1\n"),
        ended(0, "compile", "1 warning"),
    ];
    let refusals = liar::burst(&mut ws, &build, 1, first).await;
    assert_eq!(refusals, Vec::<String>::new());
    let b = {
        let api = api();
        let id = build.id;
        tokio::task::spawn_blocking(move || api.build(id))
            .await
            .unwrap()
    };
    let steps = b["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{b:#}");
    assert_eq!(steps[0]["state_string"], "1 warning", "{b:#}");
    assert!(steps[0]["complete_at"].is_i64(), "{b:#}");
    assert_eq!(steps[0]["statistics"]["warnings"], 1.0, "{b:#}");
    assert_eq!(steps[1]["state_string"], "3 tests", "{b:#}");
    assert!(steps[1]["complete_at"].is_null(), "{b:#}");
    assert_eq!(steps[1]["progress"]["tests"], 3, "{b:#}");
    let logs = |step: &Value| -> Vec<(String, i64, bool)> {
        step["logs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["name"].as_str().unwrap().to_owned(),
                    l["num_lines"].as_i64().unwrap(),
                    l["complete"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        logs(&steps[0]),
        [("stdio".into(), 3, true), ("warnings".into(), 1, true)],
        "{b:#}"
    );
    assert_eq!(logs(&steps[1]), [("stdio".into(), 1, false)], "{b:#}");
    let stdio = steps[0]["logs"][0]["logid"].as_i64().unwrap();
    let test_log = steps[1]["logs"][0]["logid"].as_i64().unwrap();

    // A second burst: step 1's log goes on, a second start of step 1 cannot be stored (the
    // batch fails and is applied one by one, refusing that message alone), step 1 and the
    // build end.
    let second = vec![
        log(1, "stdio", Channel::Stdout, "t2\n"),
        report(1, progress(5)),
        started(1, "test"),
        log(1, "junit", Channel::Stdout, "<xml/>\n"),
        ended(1, "test", "3 passed"),
        BuildEvent::Finished {
            result: runtime::Outcome::Warnings,
            message: None,
            properties: Default::default(),
        },
    ];
    let refusals = liar::burst(&mut ws, &build, 11, second).await;
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(
        refusals[0].contains("message 13 could not be stored"),
        "{refusals:?}"
    );
    let b = {
        let api = api();
        tokio::task::spawn_blocking(move || api.finished_build(request, 0, Duration::from_secs(10)))
            .await
            .unwrap()
    };
    assert_eq!(b["results"], "WARNINGS", "{b:#}");
    let steps = b["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{b:#}");
    assert_eq!(steps[1]["state_string"], "3 passed", "{b:#}");
    assert_eq!(steps[1]["results"], "WARNINGS", "{b:#}");
    assert_eq!(steps[1]["progress"], json!({"files": 3}), "{b:#}");
    assert_eq!(
        b["properties"]["built"],
        json!(["test", "Step test"]),
        "{b:#}"
    );
    assert_eq!(
        logs(&steps[1]),
        [("stdio".into(), 2, true), ("junit".into(), 1, true)],
        "{b:#}"
    );
    let (stdio_text, test_text) = {
        let api = api();
        tokio::task::spawn_blocking(move || (api.log_text(stdio), api.log_text(test_log)))
            .await
            .unwrap()
    };
    assert_eq!(stdio_text, "a\nb\nc\n");
    assert_eq!(test_text, "t1\nt2\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_cookies_and_reports_about_other_workers_builds_are_refused() {
    use kiln_protocol::{BuildRef, ToWorker};
    let mut farm = Farm::new(&format!("{}{}", workers(&["w1", "w2"], false), slow("5")));
    farm.start_master();
    // A wrong token, an unknown name: refused for good, with the same answer.
    for (name, token) in [("w2", "wrong"), ("nobody", "t-w2")] {
        let (_, answer) = liar::connect(farm.port, name, token).await;
        assert_eq!(
            answer,
            ToWorker::Refused {
                reason: format!("unknown worker {name:?} or wrong token"),
                retry: false
            }
        );
    }
    farm.start_worker("w1", &[]);
    let request = farm.force("force", json!({"parameters": {}}));
    let db = farm.db().await;
    let (build, cookie) = {
        let start = Instant::now();
        loop {
            let mut conn = db.pool().acquire().await.unwrap();
            let running = db::running_builds(&mut conn, None, None).await.unwrap();
            if let Some(b) = running.into_iter().next() {
                break (b.id.0, b.cookie);
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{}", farm.logs());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    let (mut ws, welcome) = liar::connect(farm.port, "w2", "t-w2").await;
    assert!(matches!(welcome, ToWorker::Welcome { .. }), "{welcome:?}");
    // A forged cookie.
    let answer = liar::report(
        &mut ws,
        BuildRef {
            id: build,
            cookie: "0".repeat(32),
        },
    )
    .await;
    let ToWorker::Error { message } = answer else {
        panic!("{answer:?}")
    };
    assert!(
        message.contains(&format!("build {build} is not leased to worker w2")),
        "{message}"
    );
    // The right cookie, stolen, but the build is w1's.
    let answer = liar::report(
        &mut ws,
        BuildRef {
            id: build,
            cookie: cookie.clone(),
        },
    )
    .await;
    let ToWorker::Error { message } = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(
        message,
        format!(
            "build {build} is not leased to worker w2 (worker w2 has no job, so it cannot finish a build); message refused"
        )
    );
    // Nothing of it was recorded: the build's one step is w1's.
    let b = farm.build(build);
    assert!(
        b["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["name"] != "forged"),
        "{b:#}"
    );
    let done = farm.finished_build(request, 0, Duration::from_secs(30));
    assert_eq!(done["results"], SUCCESS, "{done:#}");
    drop(ws);
}

#[test]
fn a_corrupted_module_in_the_workers_cache_is_fetched_again() {
    use sha2::Digest;
    let mut farm = Farm::new(&format!(
        r#"{}
[[builders]]
name = "probe"
[[builders.steps]]
module = "probe@1"
args = {{ action = "echo-args", text = "from an uploaded module" }}

[[schedulers]]
name = "force"
type = "force"
builders = ["probe"]
"#,
        workers(&["w1"], false)
    ));
    // Upload the module the builder names.
    let bytes = std::fs::read(steps::guest_path("probe-step").unwrap()).unwrap();
    let sha1 = hex::encode(sha1_checked::Sha1::digest(&bytes));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!(
            "sqlite://{}?mode=rwc",
            farm.path().join("kiln.sqlite").display()
        );
        let db = Db::open(&url).await.unwrap();
        let mut conn = db.pool().acquire().await.unwrap();
        let d = master::filecache::store(&mut conn, &bytes, 1)
            .await
            .unwrap()
            .unwrap();
        db::insert_step_module(
            &mut conn,
            &db::StepModule {
                name: "probe".into(),
                version: "1".into(),
                kind: "step".into(),
                sha1: d.sha1.clone(),
                sha256: d.sha256.clone(),
                size: d.size as i64,
                uploaded_ms: 1,
            },
        )
        .await
        .unwrap();
    });
    farm.start_master();
    farm.start_worker("w1", &[]);
    let first = farm.force("force", json!({"parameters": {}}));
    let b = farm.finished_build(first, 0, Duration::from_secs(60));
    assert_eq!(b["results"], SUCCESS, "{b:#}{}", farm.logs());
    // Corrupt the cached copy, and make the worker load it again (a restart forgets what it
    // compiled).
    let cached = farm.worker_dir("w1").join(".filecache").join(&sha1);
    let mut damaged = std::fs::read(&cached).unwrap();
    damaged[100] ^= 0xff;
    std::fs::write(&cached, &damaged).unwrap();
    farm.kill_worker("w1");
    farm.start_worker("w1", &[]);
    let second = farm.force("force", json!({"parameters": {}}));
    let b = farm.finished_build(second, 0, Duration::from_secs(60));
    assert_eq!(b["results"], SUCCESS, "{b:#}{}", farm.logs());
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        bytes,
        "the cache was not repaired"
    );
}

/// A farm whose worker w1 runs a slow build of `sleep` seconds; and the build's request.
fn running_slow_build(sleep: &str) -> (Farm, i64) {
    let mut farm = Farm::new(&format!("{}{}", workers(&["w1"], false), slow(sleep)));
    farm.start_master();
    farm.start_worker("w1", &[]);
    let request = farm.force("force", json!({"parameters": {}}));
    farm.wait_until("the build to run", Duration::from_secs(30), || {
        farm.path().join("runs.txt").exists()
    });
    (farm, request)
}

#[test]
fn a_graceful_worker_shutdown_finishes_the_running_build_first() {
    let (mut farm, request) = running_slow_build("1");
    farm.signal_worker("w1", libc::SIGTERM);
    assert_eq!(
        farm.wait_worker("w1", Duration::from_secs(30)),
        Some(0),
        "{}",
        farm.logs()
    );
    let b = farm.finished_build(request, 0, Duration::from_secs(5));
    assert_eq!(b["results"], SUCCESS, "{b:#}");
    let log = b["steps"][0]["logs"][0]["logid"].as_i64().unwrap();
    assert!(farm.log_text(log).contains("finished\n"));
}

#[test]
fn a_latent_worker_starts_when_a_build_waits_and_stops_when_idle() {
    let mut farm = Farm::new(&format!(
        r#"[[workers]]
name = "lazy"
token = "t-lazy"
latent = {{ kind = "local", idle_timeout = "1s" }}
{}"#,
        slow("0.1")
    ));
    farm.start_master();
    let state = |farm: &Farm| {
        let (_, w) = farm.api("GET", "/api/v2/workers", "");
        w["workers"][0]["latent"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(state(&farm), "stopped");
    let request = farm.force("force", json!({"parameters": {}}));
    let b = farm.finished_build(request, 0, Duration::from_secs(60));
    assert_eq!(b["results"], SUCCESS, "{b:#}{}", farm.logs());
    assert_eq!(b["worker"], "lazy");
    // Idle for a second: stopped (the process exits), and started again for the next build.
    farm.wait_until("the idle worker to stop", Duration::from_secs(20), || {
        state(&farm) == "stopped"
    });
    let (_, w) = farm.api("GET", "/api/v2/workers", "");
    assert_eq!(w["workers"][0]["connected"], false, "{w:#}");
    let request = farm.force("force", json!({"parameters": {}}));
    let b = farm.finished_build(request, 0, Duration::from_secs(60));
    assert_eq!(b["results"], SUCCESS, "{b:#}");
    assert!(
        farm.worker_dir("lazy")
            .parent()
            .unwrap()
            .join("workers/lazy")
            .is_dir()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_the_worker_forgot_is_found_by_the_scan_and_retried() {
    use futures_util::SinkExt;
    use kiln_protocol::{ToMaster, ToWorker};
    let mut farm = Farm::new(&format!("{}{}", workers(&["w1"], false), slow("1")));
    farm.start_master();
    let (mut ws, welcome) = liar::connect(farm.port, "w1", "t-w1").await;
    assert!(matches!(welcome, ToWorker::Welcome { .. }), "{welcome:?}");
    let port = farm.port;
    let token = farm.token.clone();
    let request = tokio::task::spawn_blocking(move || {
        let f = Farm::attach(port, token.clone());
        f.force("force", json!({"parameters": {}}))
    })
    .await
    .unwrap();
    // The master sends the build; this worker takes it and then, asked what it runs, says
    // nothing.
    let mut first = None;
    let retried = loop {
        match liar::next(&mut ws).await {
            ToWorker::Start(job) if first.is_none() => first = Some(job.build.clone()),
            ToWorker::Start(job) => break job,
            ToWorker::Scan { scan } => {
                let status = ToMaster::Status {
                    scan: Some(scan),
                    running: vec![],
                };
                ws.send(tokio_tungstenite::tungstenite::Message::text(
                    serde_json::to_string(&status).unwrap(),
                ))
                .await
                .unwrap();
            }
            _ => {}
        }
    };
    let first = first.unwrap();
    assert_ne!(
        retried.build, first,
        "the retry is a new build with a new cookie"
    );
    let token = farm.token.clone();
    let builds =
        tokio::task::spawn_blocking(move || Farm::attach(port, token.clone()).builds_of(request))
            .await
            .unwrap();
    assert_eq!(builds[0]["buildid"], first.id);
    assert_eq!(builds[0]["results"], RETRY);
    assert_eq!(builds[0]["state_string"], "worker w1 forgot it");
    drop(ws);
    farm.kill_master();
}

#[test]
fn a_step_stopped_through_the_api_ends_cancelled_and_always_run_steps_still_run() {
    let mut farm = Farm::new(&format!(
        r#"{}
[[builders]]
name = "two"
grant = {{ programs = ["sh"] }}
[[builders.steps]]
module = "shell"
name = "long"
args = {{ command = ["sh", "-c", "touch ../../started; sleep 60"] }}
[[builders.steps]]
module = "shell"
name = "cleanup"
always_run = true
args = {{ command = ["sh", "-c", "echo cleaned"] }}

[[schedulers]]
name = "force"
type = "force"
builders = ["two"]
"#,
        workers(&["w1"], false)
    ));
    farm.start_master();
    farm.start_worker("w1", &[]);
    let request = farm.force("force", json!({"parameters": {}}));
    farm.wait_until("the step to run", Duration::from_secs(30), || {
        farm.path().join("started").exists()
    });
    let id = farm.builds_of(request)[0]["buildid"].as_i64().unwrap();
    let (status, body) = farm.api("POST", &format!("/api/v2/builds/{id}/steps/0/stop"), "");
    assert_eq!(status, 200, "{body}");
    let b = farm.finished_build(request, 0, Duration::from_secs(20));
    assert_eq!(b["results"], "CANCELLED", "{b:#}");
    assert_eq!(b["steps"][0]["results"], "CANCELLED", "{b:#}");
    assert_eq!(b["steps"][1]["results"], SUCCESS, "{b:#}");
}

#[test]
fn a_running_build_stopped_through_the_api_ends_cancelled() {
    let (farm, request) = running_slow_build("60");
    let id = farm.builds_of(request)[0]["buildid"].as_i64().unwrap();
    let (status, body) = farm.api(
        "POST",
        &format!("/api/v2/builds/{id}/stop"),
        r#"{"reason": "not needed"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let b = farm.finished_build(request, 0, Duration::from_secs(20));
    assert_eq!(b["results"], "CANCELLED", "{b:#}");
    let (status, _) = farm.api("POST", &format!("/api/v2/builds/{id}/stop"), "");
    assert_eq!(status, 404);
}

#[test]
fn a_second_signal_cancels_running_builds_reports_them_and_exits() {
    let (mut farm, request) = running_slow_build("60");
    farm.signal_worker("w1", libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    farm.signal_worker("w1", libc::SIGINT);
    assert_eq!(
        farm.wait_worker("w1", Duration::from_secs(20)),
        Some(0),
        "{}",
        farm.logs()
    );
    let b = farm.finished_build(request, 0, Duration::from_secs(5));
    assert_eq!(b["results"], "CANCELLED", "{b:#}");
}

#[test]
fn workers_and_clients_reach_a_tls_master_through_its_private_ca() {
    let mut farm = Farm::with_tls(&format!(
        r#"{}[[workers]]
name = "lazy"
token = "t-lazy"
latent = {{ kind = "local", idle_timeout = "60s" }}
{}"#,
        workers(&["w1"], false),
        slow("5")
    ));
    farm.start_master();
    // A client that connects and says nothing holds up no one's handshake.
    let _silent = std::net::TcpStream::connect(("127.0.0.1", farm.port)).unwrap();
    let (status, body) = farm.api("GET", "/api/v2/workers", "");
    assert_eq!(status, 200, "the API over HTTPS: {body}");
    // Plain HTTP on the TLS port gets no API.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", farm.port)).unwrap();
    write!(
        plain,
        "GET /api/v2/workers HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )
    .unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "plain HTTP was served on the TLS port"
    );

    // Without the CA the worker cannot trust the master, and says why.
    farm.start_worker("w1", &[]);
    farm.wait_until(
        "the worker to fail verification",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(farm.path().join("w1.log")).is_ok_and(|l| {
                l.contains("connection to the master lost") && l.contains("certificate")
            })
        },
    );
    farm.kill_worker("w1");
    let ca = farm.path().join("ca.pem");
    farm.start_worker("w1", &["--ca-cert", ca.to_str().unwrap()]);
    farm.wait_until("w1 to connect over TLS", Duration::from_secs(30), || {
        let (_, w) = farm.api("GET", "/api/v2/workers", "");
        w["workers"].as_array().is_some_and(|ws| {
            ws.iter()
                .any(|w| w["name"] == "w1" && w["connected"] == true)
        })
    });
    // Two builds at once: one runs on w1, the other starts the latent worker, which is given
    // the master's certificate to trust.
    let requests = [
        farm.force("force", json!({"parameters": {}})),
        farm.force("force", json!({"parameters": {}})),
    ];
    let mut ran_on = Vec::new();
    for r in requests {
        let b = farm.finished_build(r, 0, Duration::from_secs(60));
        assert_eq!(b["results"], SUCCESS, "{b:#}{}", farm.logs());
        ran_on.push(b["worker"].as_str().unwrap().to_owned());
    }
    ran_on.sort();
    assert_eq!(ran_on, ["lazy", "w1"], "{}", farm.logs());

    // A master killed outright takes its latent worker along.
    assert_eq!(children_running_in(farm.path()).len(), 1);
    farm.kill_master();
    farm.wait_until(
        "the latent worker to leave with its master",
        Duration::from_secs(20),
        || children_running_in(farm.path()).is_empty(),
    );
}

/// Latent `kiln-worker` processes whose workdir is under `dir`.
fn children_running_in(dir: &Path) -> Vec<u32> {
    let workdir = dir.join("workers");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.iter().any(|a| a.ends_with(b"kiln-worker"))
                    && args
                        .iter()
                        .any(|a| a.starts_with(workdir.as_os_str().as_encoded_bytes()))
            })
        })
        // A zombie is gone already; only its parent has not reaped it yet.
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, r)| !r.starts_with('Z'))
            })
        })
        .collect()
}

/// The master's checks on the build it leased to this very worker: the cookie, the order of
/// messages, messages after the end, and a message the database cannot take, which is
/// refused alone while the build goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_holders_bad_messages_are_refused_one_by_one_and_its_build_goes_on() {
    use kiln_protocol::{BuildEvent, BuildRef, ToWorker};
    let farm = Farm::new(&format!("{}{}", workers(&["w1"], false), slow("1")));
    let mut farm = farm;
    farm.start_master();
    let (mut ws, request, build) = liar::forced_build(&farm, "w1").await;
    let port = farm.port;
    let refused = |answer: ToWorker, what: &str| match answer {
        ToWorker::Error { message } => assert!(message.contains(what), "{message}"),
        other => panic!("expected a refusal ({what}), got {other:?}"),
    };
    let start = |name: &str| BuildEvent::StepStarted {
        step: 0,
        name: name.into(),
    };
    // The right build, the wrong cookie.
    let forged = BuildRef {
        id: build.id,
        cookie: "0".repeat(32),
    };
    refused(
        liar::send(&mut ws, &forged, 1, start("x")).await,
        "wrong or stale cookie",
    );
    // Out of order.
    refused(
        liar::send(&mut ws, &build, 2, start("x")).await,
        "does not follow",
    );
    // In order, but about a step that never started: acknowledged, refused, and skipped.
    let log = BuildEvent::Log {
        step: 7,
        log: "stdio".into(),
        channel: runtime::Channel::Stdout,
        text: "from nowhere\n".into(),
    };
    let answer = liar::send(&mut ws, &build, 1, log).await;
    assert_eq!(
        answer,
        ToWorker::Ack {
            build: build.clone(),
            seq: 1
        }
    );
    refused(liar::next(&mut ws).await, "could not be stored");
    // The stream goes on: a step, its end, the build's end.
    let answer = liar::send(&mut ws, &build, 2, start("real")).await;
    assert!(matches!(answer, ToWorker::Ack { seq: 2, .. }), "{answer:?}");
    let finished = BuildEvent::Finished {
        result: runtime::Outcome::Success,
        message: None,
        properties: Default::default(),
    };
    let answer = liar::send(&mut ws, &build, 3, finished.clone()).await;
    assert!(matches!(answer, ToWorker::Ack { seq: 3, .. }), "{answer:?}");
    // After the end, nothing more is taken.
    refused(
        liar::send(&mut ws, &build, 4, finished).await,
        "not leased to worker w1",
    );
    let token = farm.token.clone();
    let b = tokio::task::spawn_blocking(move || {
        Farm::attach(port, token.clone()).finished_build(request, 0, Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert_eq!(b["results"], SUCCESS, "{b:#}");
    assert_eq!(b["steps"].as_array().unwrap().len(), 1, "{b:#}");
    assert_eq!(b["steps"][0]["name"], "real", "{b:#}");
    let token = farm.token.clone();
    let metrics = tokio::task::spawn_blocking(move || Farm::attach(port, token.clone()).metrics())
        .await
        .unwrap();
    assert_eq!(metric(&metrics, "kiln_worker_messages_refused_total"), 4.0);
}
