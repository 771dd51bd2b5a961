//! Reporters against real receivers on 127.0.0.1: an HTTP receiver checking the webhook's
//! signature, a failing one showing retries and the failure in the API while builds go on,
//! receivers standing in for GitHub's, GitLab's and Gitea's status APIs, and a real SMTP
//! server (Python's aiosmtpd) receiving the exact message.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::farm::{Farm, workers};

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A small HTTP server: records every request and answers 200, or 500 while `failing`.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
    failing: Arc<AtomicBool>,
}

impl Receiver {
    fn start(failing: bool) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(AtomicBool::new(failing));
        let (g, f) = (got.clone(), failing.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or_default().to_owned();
                let path = parts.next().unwrap_or_default().to_owned();
                let mut headers = BTreeMap::new();
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                }
                let len: usize = headers
                    .get("content-length")
                    .map_or(0, |l| l.parse().unwrap());
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                g.lock().unwrap().push(Received {
                    method,
                    path,
                    headers,
                    body,
                });
                let (status, text) = if f.load(Ordering::SeqCst) {
                    ("500 Internal Server Error", "down for maintenance")
                } else {
                    ("200 OK", "{}")
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        Receiver { port, got, failing }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

const BUILDERS: &str = r#"
[[builders]]
name = "alpha"
grant = { programs = ["sh"] }
[[builders.steps]]
module = "shell"
name = "ok"
args = { command = ["sh", "-c", "echo fine"] }

[[builders]]
name = "beta"
grant = { programs = ["sh"] }
[[builders.steps]]
module = "shell"
name = "fail"
args = { command = ["sh", "-c", "exit 3"] }

[[schedulers]]
name = "force"
type = "force"
builders = ["alpha", "beta"]

[[schedulers]]
name = "changes"
type = "any-branch"
builders = ["alpha", "beta"]
"#;

fn force_on(farm: &Farm, builder: &str) -> i64 {
    farm.force("force", json!({"builders": [builder], "parameters": {}}))
}

fn reporters(farm: &Farm) -> Value {
    let (status, body) = farm.api("GET", "/api/v2/reporters", "");
    assert_eq!(status, 200, "{body}");
    body
}

fn reporter<'a>(all: &'a Value, name: &str) -> &'a Value {
    all["reporters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no reporter {name} in {all:#}"))
}

#[test]
fn webhooks_are_signed_and_retried_while_builds_go_on() {
    let good = Receiver::start(false);
    let flaky = Receiver::start(true);
    // Nothing listens here: each attempt is refused, and retried.
    let gone = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gone_url = format!("http://127.0.0.1:{gone}/missing");
    let mut farm = Farm::new(&format!(
        r#"{}{BUILDERS}
[[reporters]]
name = "hook"
type = "http"
url = "{}"
secret = "s3cret"
buildsets = true

[[reporters]]
name = "flaky"
type = "http"
url = "{}"
mode = "failing"

[[reporters]]
name = "gone"
type = "http"
url = "{}"
builders = ["alpha"]
"#,
        workers(&["w1"], false),
        good.url("/hook"),
        flaky.url("/flaky"),
        gone_url,
    ));
    farm.start_master();
    farm.start_worker("w1", &[]);
    let alpha = force_on(&farm, "alpha");
    let a = farm.finished_build(alpha, 0, Duration::from_secs(60));
    let beta = force_on(&farm, "beta");
    let b = farm.finished_build(beta, 0, Duration::from_secs(60));

    // Every build and buildset event reaches the good receiver, signed.
    farm.wait_until("five signed deliveries", Duration::from_secs(30), || {
        good.got().len() >= 5
    });
    let got = good.got();
    let mut events = Vec::new();
    for r in &got {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/hook");
        assert_eq!(r.headers["content-type"], "application/json");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(&r.body);
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(r.headers["x-kiln-signature-256"], expected, "signature");
        let body = r.json();
        assert_eq!(body["event"], r.headers["x-kiln-event"].as_str());
        events.push(body);
    }
    let kinds: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            let who = match e["event"].as_str().unwrap() {
                "build.finished" => e["build"]["builder"].as_str().unwrap().to_owned(),
                _ => e["builds"][0]["builder"].as_str().unwrap().to_owned(),
            };
            (e["event"].as_str().unwrap().to_owned(), who)
        })
        .collect();
    for want in [
        ("build.finished", "alpha"),
        ("buildset.complete", "alpha"),
        ("build.finished", "beta"),
        ("buildset.first_failure", "beta"),
        ("buildset.complete", "beta"),
    ] {
        assert!(
            kinds.contains(&(want.0.to_owned(), want.1.to_owned())),
            "{want:?} not in {kinds:?}"
        );
    }
    let finished = events
        .iter()
        .find(|e| e["event"] == "build.finished" && e["build"]["builder"] == "beta")
        .unwrap();
    assert_eq!(finished["build"]["buildid"], b["buildid"]);
    assert_eq!(finished["build"]["results"], "FAILURE");
    assert_eq!(
        finished["build"]["url"],
        format!("http://127.0.0.1:{}/#/builds/{}", farm.port, b["buildid"])
    );
    assert_eq!(finished["properties"]["buildername"], "beta");

    // The failing receiver: only beta's failure is for it; it is retried, and the API shows
    // why, while builds keep running.
    farm.wait_until("a retried delivery", Duration::from_secs(30), || {
        reporter(&reporters(&farm), "flaky")["retrying"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    });
    let all = reporters(&farm);
    let retrying = &reporter(&all, "flaky")["retrying"][0];
    assert_eq!(retrying["event"], "build.finished");
    assert_eq!(retrying["subject"], b["buildid"]);
    assert!(
        retrying["last_error"]
            .as_str()
            .unwrap()
            .contains("answered 500 Internal Server Error: down for maintenance"),
        "{retrying:#}"
    );
    let again = force_on(&farm, "alpha");
    farm.finished_build(again, 0, Duration::from_secs(60));
    flaky.failing.store(false, Ordering::SeqCst);
    farm.wait_until("the retry to succeed", Duration::from_secs(30), || {
        reporter(&reporters(&farm), "flaky")["deliveries"]["delivered"] == 1
    });
    let tries = flaky.got();
    assert!(tries.len() >= 2, "{tries:?}");
    assert!(
        tries
            .iter()
            .all(|r| r.json()["build"]["buildid"] == b["buildid"])
    );
    let rows = farm.api("GET", "/api/v2/reporters/flaky/deliveries", "").1;
    assert_eq!(rows["deliveries"][0]["state"], "delivered");
    assert_eq!(rows["deliveries"][0]["attempts"], tries.len());

    // A receiver that is not there: retried, and visible in the API.
    farm.wait_until(
        "a failure of the gone reporter",
        Duration::from_secs(30),
        || {
            let r = reporter(&reporters(&farm), "gone").clone();
            r["retrying"].as_array().is_some_and(|x| !x.is_empty())
        },
    );
    let gone_now = reporters(&farm);
    let err = reporter(&gone_now, "gone")["retrying"][0]["last_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(err.starts_with(&format!("POST {gone_url}:")), "{err}");
    assert_eq!(
        reporter(&gone_now, "gone")["retrying"][0]["event"],
        "build.finished"
    );
    assert!(a["buildid"].is_i64());

    let (status, body) = farm.api("GET", "/api/v2/reporters/nope/deliveries", "");
    assert_eq!(status, 404, "{body}");
    let (status, body) = farm.api("GET", "/api/v2/reporters/flaky/deliveries?state=lost", "");
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("give one of pending")
    );
    let metrics = farm.metrics();
    assert!(
        metrics.contains(r#"kiln_reporter_deliveries_total{reporter="flaky",outcome="retried"}"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"kiln_reporter_deliveries_total{reporter="flaky",outcome="delivered"} 1"#),
        "{metrics}"
    );
}

fn add_change(farm: &Farm, author: &str, revision: &str) {
    let (status, body) = farm.api(
        "POST",
        "/api/v2/changes",
        &json!({
            "author": author,
            "comments": "break the build\n\nlonger text",
            "branch": "main",
            "revision": revision,
            "repository": "https://github.com/kiln/farm.git",
        })
        .to_string(),
    );
    assert_eq!(status, 200, "{body}");
}

#[test]
fn commit_statuses_go_to_each_forge_at_its_documented_path() {
    let forge = Receiver::start(false);
    let mut farm = Farm::new(&format!(
        r#"{}{BUILDERS}
[[reporters]]
name = "gh"
type = "github-status"
base_url = "{}"
token = "ghtoken"
builders = ["alpha"]

[[reporters]]
name = "gl"
type = "gitlab-status"
base_url = "{}"
token = "gltoken"
builders = ["alpha"]
context = "ci/%(prop:buildername)s"

[[reporters]]
name = "gt"
type = "gitea-status"
base_url = "{}"
token = "gttoken"
builders = ["alpha"]
"#,
        workers(&["w1"], false),
        forge.url("/gh"),
        forge.url("/gl/"),
        forge.url("/gt"),
    ));
    farm.start_master();
    farm.start_worker("w1", &[]);
    let sha = "0123456789abcdef0123456789abcdef01234567";
    add_change(&farm, "Jane Doe <jane@laptop.local>", sha);
    farm.wait_until("six statuses", Duration::from_secs(60), || {
        forge.got().len() >= 6
    });
    std::thread::sleep(Duration::from_millis(300));
    let got = forge.got();
    assert_eq!(got.len(), 6, "{got:#?}");
    let (_, builds) = farm.api("GET", "/api/v2/builds?builder=alpha", "");
    let build = builds["builds"][0]["buildid"].as_i64().unwrap();
    let target = format!("http://127.0.0.1:{}/#/builds/{build}", farm.port);
    let of = |prefix: &str| -> Vec<Received> {
        got.iter()
            .filter(|r| r.path.starts_with(prefix))
            .cloned()
            .collect()
    };
    let gh = of("/gh/");
    assert_eq!(gh.len(), 2);
    for (r, state, desc) in [
        (&gh[0], "pending", "Build alpha #1 started"),
        (&gh[1], "success", "Build alpha #1: SUCCESS"),
    ] {
        assert_eq!(r.path, format!("/gh/repos/kiln/farm/statuses/{sha}"));
        assert_eq!(r.headers["authorization"], "Bearer ghtoken");
        assert_eq!(
            r.json(),
            json!({"state": state, "target_url": target, "description": desc, "context": "kiln/alpha"})
        );
    }
    let gl = of("/gl/");
    assert_eq!(gl.len(), 2);
    for (r, state) in [(&gl[0], "pending"), (&gl[1], "success")] {
        assert_eq!(
            r.path,
            format!("/gl/api/v4/projects/kiln%2Ffarm/statuses/{sha}")
        );
        assert_eq!(r.headers["private-token"], "gltoken");
        assert_eq!(r.json()["state"], state);
        assert_eq!(r.json()["name"], "ci/alpha");
        assert_eq!(r.json()["target_url"], target.as_str());
    }
    let gt = of("/gt/");
    assert_eq!(gt.len(), 2);
    for (r, state) in [(&gt[0], "pending"), (&gt[1], "success")] {
        assert_eq!(r.path, format!("/gt/api/v1/repos/kiln/farm/statuses/{sha}"));
        assert_eq!(r.headers["authorization"], "token gttoken");
        assert_eq!(r.json()["state"], state);
        assert_eq!(r.json()["context"], "kiln/alpha");
    }
    let all = reporters(&farm);
    assert_eq!(reporter(&all, "gl")["type"], "gitlab-status");
    assert_eq!(reporter(&all, "gl")["deliveries"]["delivered"], 2);
}

/// A real SMTP server: Python's aiosmtpd, writing each message it receives as one JSON line.
const SMTP_SERVER: &str = r#"
import asyncio, email, email.policy, json, sys
from aiosmtpd.controller import Controller

class Save:
    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with open(sys.argv[2], "a") as f:
            f.write(json.dumps({
                "mail_from": envelope.mail_from,
                "rcpt_tos": envelope.rcpt_tos,
                "from": msg["From"], "to": msg["To"], "subject": msg["Subject"],
                "content_type": msg.get_content_type(),
                # SMTP's line ends, and the end of DATA, are not the message's.
                "body": msg.get_content().replace("\r\n", "\n").rstrip("\n"),
            }) + "\n")
        return "250 OK"

c = Controller(Save(), hostname="127.0.0.1", port=int(sys.argv[1]))
c.start()
print("ready", flush=True)
sys.stdin.read()
"#;

/// The Python that has aiosmtpd: Debian's (`.ci/run` installs python3-aiosmtpd), else the
/// first on PATH.
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

#[test]
fn email_reaches_a_real_smtp_server_with_the_exact_message() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("smtpd.py");
    let out = dir.path().join("mail.jsonl");
    std::fs::write(&script, SMTP_SERVER).unwrap();
    let mut smtpd = std::process::Command::new(python())
        .arg(&script)
        .arg(port.to_string())
        .arg(&out)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut ready = String::new();
    BufReader::new(smtpd.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(
        ready.trim(),
        "ready",
        "aiosmtpd did not start (.ci/run installs python3-aiosmtpd)"
    );

    let mut farm = Farm::new(&format!(
        r#"{}{BUILDERS}
[[reporters]]
name = "mail"
type = "email"
relay = "127.0.0.1:{port}"
from = "kiln@example.org"
to = ["team@example.org"]
lookup = "example.org"
mode = "failing"

[[reporters]]
name = "mapped"
type = "email"
relay = "127.0.0.1:{port}"
from = "kiln@example.org"
lookup = {{ "jane@laptop.local" = "jane.doe@corp.example", "bob" = "bob@corp.example" }}
mode = "failing"
"#,
        workers(&["w1"], false),
    ));
    farm.start_master();
    farm.start_worker("w1", &[]);
    let sha = "89abcdef0123456789abcdef0123456789abcdef";
    add_change(&farm, "Jane Doe <jane@laptop.local>", sha);
    farm.wait_until("two mails", Duration::from_secs(60), || {
        std::fs::read_to_string(&out).is_ok_and(|s| s.lines().count() >= 2)
    });
    // alpha succeeded: a failing reporter says nothing of it.
    std::thread::sleep(Duration::from_millis(500));
    let text = std::fs::read_to_string(&out).unwrap();
    let mut mails: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(mails.len(), 2, "{text}");
    // The table's reporter mails Jane at the address it maps hers to, and no one else.
    mails.sort_by_key(|m| m["rcpt_tos"].as_array().unwrap().len());
    let mapped = mails.remove(0);
    let (_, builds) = farm.api("GET", "/api/v2/builds?builder=beta", "");
    let build = builds["builds"][0]["buildid"].as_i64().unwrap();
    let expected_body = format!(
        "Build beta #1 ended FAILURE\n\nBuild: http://127.0.0.1:{port_m}/#/builds/{build}\nWorker: w1\nSource: https://github.com/kiln/farm.git main at {sha}\nBlamelist: Jane Doe <jane@laptop.local>\n\nChanges:\n- {sha} by Jane Doe <jane@laptop.local>: break the build",
        port_m = farm.port
    );
    assert_eq!(
        mails[0],
        json!({
            "mail_from": "kiln@example.org",
            "rcpt_tos": ["team@example.org", "jane@example.org"],
            "from": "kiln@example.org",
            "to": "team@example.org, jane@example.org",
            "subject": "Kiln: beta #1 FAILURE",
            "content_type": "text/plain",
            "body": expected_body,
        })
    );
    assert_eq!(
        mapped,
        json!({
            "mail_from": "kiln@example.org",
            "rcpt_tos": ["jane.doe@corp.example"],
            "from": "kiln@example.org",
            "to": "jane.doe@corp.example",
            "subject": "Kiln: beta #1 FAILURE",
            "content_type": "text/plain",
            "body": expected_body,
        })
    );
    let _ = smtpd.kill();
    let _ = smtpd.wait();
}

mod database {
    //! The delivery queue (`db/reporters.rs`, migration 0009) and what a delivery reads
    //! (`reporters::payload`) on SQLite and on a real PostgreSQL: queueing in a transaction,
    //! claims by compare-and-set across two masters' pools, retries with their due time,
    //! success and failure, superseded statuses, the listing `GET /api/v2/reporters` shows, the
    //! previous result a `problem` reporter asks for, and the mark over the events feed.

    use kiln_db::model::*;
    use kiln_db::{self as db, Db, DeliveryRow, DueDelivery};
    use master::reporters::payload;
    use serde_json::json;

    use kiln_testkit::db::TestDb;
    use kiln_testkit::on_both_databases;

    on_both_databases!(the_delivery_queue_claims_retries_and_lists);

    async fn conn(db: &Db) -> sqlx::pool::PoolConnection<sqlx::Any> {
        db.pool().acquire().await.unwrap()
    }

    async fn queue(db: &Db, reporter: &str, event: &str, subject: i64, now: i64) {
        let mut tx = db.begin().await.unwrap();
        db::queue_delivery(&mut tx, reporter, event, subject, now)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    /// Builds of builder "alpha", one per result, in order; and their buildset.
    async fn builds(db: &Db, results: &[Results]) -> (i64, Vec<i64>) {
        let mut tx = db.begin().await.unwrap();
        db.serialize_appends(&mut tx).await.unwrap();
        let change = db::insert_change(
            &mut tx,
            &NewChange {
                author: "Jane Doe <jane@laptop.local>".into(),
                comments: "break the build".into(),
                branch: Some("main".into()),
                revision: Some("abc123".into()),
                repository: "https://example.org/kiln.git".into(),
                source: "test".into(),
                ..Default::default()
            },
            1,
        )
        .await
        .unwrap()
        .unwrap();
        tx.commit().await.unwrap();
        let mut c = conn(db).await;
        let ids = db::sync_builders(&mut c, &[("alpha".into(), String::new(), vec![])])
            .await
            .unwrap();
        let m = db::register_master(&mut c, "m", 1).await.unwrap();
        let bs = NewBuildset {
            scheduler: "s".into(),
            reason: "a change".into(),
            external_id: None,
            sourcestamps: vec![SourceStamp {
                repository: "https://example.org/kiln.git".into(),
                branch: Some("main".into()),
                revision: Some("abc123".into()),
                changes: vec![change],
                ..Default::default()
            }],
            properties: vec![],
            builders: results.iter().map(|_| ("alpha".to_string(), 0)).collect(),
            trusted: true,
            parent_build: None,
        };
        let (set, requests) = db::insert_buildset(&mut c, &bs, &ids, 2)
            .await
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        for ((request, _), r) in requests.iter().zip(results) {
            assert!(db::claim_request(&mut c, *request, m, 3).await.unwrap());
            let (build, _) = db::insert_build(&mut c, *request, None, m, "k", 4)
                .await
                .unwrap();
            assert!(
                db::finish_build(&mut c, build, *r, "done", 5)
                    .await
                    .unwrap()
            );
            out.push(build.0);
        }
        (set.0, out)
    }

    async fn the_delivery_queue_claims_retries_and_lists(t: TestDb) {
        let db = &t.db;
        let other = Db::connect(&t.url).await.unwrap();
        let (set, b) = builds(
            db,
            &[
                Results::Success,
                Results::Retry,
                Results::Failure,
                Results::Failure,
            ],
        )
        .await;
        let mut c = conn(db).await;

        // Queued with the event, due at once, oldest first; nothing is due before it was queued.
        queue(db, "hook", "build.finished", b[0], 1_000).await;
        queue(db, "gh", "build.started", b[2], 1_000).await;
        queue(db, "gh", "build.finished", b[2], 1_001).await;
        queue(db, "hook", "buildset.complete", set, 1_002).await;
        assert!(
            db::due_deliveries(&mut c, 999, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(db::next_due(&mut c).await.unwrap(), Some(1_000));
        let due = db::due_deliveries(&mut c, 1_001, 10).await.unwrap();
        assert_eq!(
            due.iter()
                .map(|d| (d.reporter.as_str(), d.event.as_str(), d.subject))
                .collect::<Vec<_>>(),
            vec![
                ("hook", "build.finished", b[0]),
                ("gh", "build.started", b[2]),
                ("gh", "build.finished", b[2]),
            ]
        );
        assert!(due.iter().all(|d| d.attempts == 0));
        assert_eq!(db::due_deliveries(&mut c, 5_000, 2).await.unwrap().len(), 2);

        // Two masters claim the same deliveries at once: each goes to exactly one.
        let all = db::due_deliveries(&mut c, 5_000, 10).await.unwrap();
        assert_eq!(all.len(), 4);
        let race = |db: Db, due: Vec<DueDelivery>| async move {
            let mut won = Vec::new();
            for d in due {
                let mut c = db.pool().acquire().await.unwrap();
                if db::claim_delivery(&mut c, &d, 9_000).await.unwrap() {
                    won.push(d.id);
                }
            }
            won
        };
        let mut reversed = all.clone();
        reversed.reverse();
        let (w1, w2) = tokio::join!(
            tokio::spawn(race(db.clone(), all.clone())),
            tokio::spawn(race(other.clone(), reversed))
        );
        let (w1, w2) = (w1.unwrap(), w2.unwrap());
        assert_eq!(w1.len() + w2.len(), 4, "{w1:?} {w2:?}");
        assert!(w1.iter().all(|d| !w2.contains(d)));
        // A claim counts the attempt and leases the delivery until 9000.
        assert!(
            db::due_deliveries(&mut c, 8_999, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(db::next_due(&mut c).await.unwrap(), Some(9_000));
        assert!(
            !db::claim_delivery(&mut c, &all[0], 20_000).await.unwrap(),
            "a stale due time claims nothing"
        );

        // The hook's build delivery fails and is retried at 10_000; the status's start is
        // delivered; the buildset's fails for good.
        let (hook, started, finished, buildset) = (&all[0], &all[1], &all[2], &all[3]);
        db::retry_delivery(&mut c, hook.id, "POST http://x: answered 500", 10_000)
            .await
            .unwrap();
        db::end_delivery(&mut c, started.id, "delivered", None, 6_000)
            .await
            .unwrap();
        db::end_delivery(
            &mut c,
            buildset.id,
            "failed",
            Some("POST http://x: answered 404 Not Found"),
            6_001,
        )
        .await
        .unwrap();
        // A failed delivery is not retried, even if asked to.
        db::retry_delivery(&mut c, buildset.id, "late", 10_000)
            .await
            .unwrap();
        let due = db::due_deliveries(&mut c, 10_000, 10).await.unwrap();
        assert_eq!(
            due.iter().map(|d| (d.id, d.attempts)).collect::<Vec<_>>(),
            vec![(hook.id, 1), (finished.id, 1)]
        );
        assert!(db::claim_delivery(&mut c, &due[0], 20_000).await.unwrap());
        db::end_delivery(&mut c, hook.id, "delivered", None, 10_500)
            .await
            .unwrap();

        // An earlier pending status is superseded by the build's final one; buildset
        // deliveries and other reporters' are untouched.
        queue(db, "gh", "build.started", b[3], 11_000).await;
        queue(db, "gh", "build.finished", b[3], 11_001).await;
        let newest = db::recent_deliveries(&mut c, Some("gh"), None, 1)
            .await
            .unwrap()[0]
            .id;
        assert_eq!(
            db::supersede_earlier(&mut c, "gh", b[3], newest, 11_002)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            db::supersede_earlier(&mut c, "gh", b[3], newest, 11_003)
                .await
                .unwrap(),
            0
        );

        // What the API lists: counts by reporter and state, and rows filtered, newest first.
        let mut counts = db::delivery_counts(&mut c).await.unwrap();
        counts.sort();
        assert_eq!(
            counts,
            vec![
                ("gh".to_string(), "delivered".to_string(), 1),
                ("gh".to_string(), "pending".to_string(), 2),
                ("gh".to_string(), "superseded".to_string(), 1),
                ("hook".to_string(), "delivered".to_string(), 1),
                ("hook".to_string(), "failed".to_string(), 1),
            ]
        );
        let failed = db::recent_deliveries(&mut c, Some("hook"), Some("failed"), 10)
            .await
            .unwrap();
        assert_eq!(
            failed,
            vec![DeliveryRow {
                id: buildset.id,
                reporter: "hook".into(),
                event: "buildset.complete".into(),
                subject: set,
                state: "failed".into(),
                attempts: 1,
                next_attempt_at: None,
                last_error: Some("POST http://x: answered 404 Not Found".into()),
                created_at: 1_002,
                finished_at: Some(6_001),
            }]
        );
        let delivered = db::recent_deliveries(&mut c, Some("hook"), Some("delivered"), 10)
            .await
            .unwrap();
        assert_eq!(delivered[0].attempts, 2);
        assert_eq!(delivered[0].finished_at, Some(10_500));
        assert_eq!(
            delivered[0].last_error.as_deref(),
            None,
            "a delivery clears the last attempt's error"
        );
        let pending = db::recent_deliveries(&mut c, None, Some("pending"), 10)
            .await
            .unwrap();
        assert_eq!(
            pending
                .iter()
                .map(|d| (d.id, d.next_attempt_at))
                .collect::<Vec<_>>(),
            vec![(newest, Some(11_001)), (finished.id, Some(9_000))]
        );
        let everything = db::recent_deliveries(&mut c, None, None, 100)
            .await
            .unwrap();
        assert_eq!(everything.len(), 6);
        assert!(everything.windows(2).all(|w| w[0].id > w[1].id));
        assert_eq!(
            db::recent_deliveries(&mut c, Some("gh"), None, 2)
                .await
                .unwrap()
                .len(),
            2
        );
        assert!(
            db::recent_deliveries(&mut c, Some("nobody"), None, 10)
                .await
                .unwrap()
                .is_empty()
        );

        // A problem reporter's question: the builder's previous verdict, skipping RETRY.
        assert_eq!(
            db::previous_build_results(&mut c, b[0]).await.unwrap(),
            None
        );
        assert_eq!(
            db::previous_build_results(&mut c, b[2]).await.unwrap(),
            Some(Results::Success)
        );
        assert_eq!(
            db::previous_build_results(&mut c, b[3]).await.unwrap(),
            Some(Results::Failure)
        );

        // The mark over the events feed starts at its end, once, and moves by compare-and-set.
        assert_eq!(db::reporter_mark(&mut c, "buildsets").await.unwrap(), None);
        db::start_reporter_mark(&mut c, "buildsets").await.unwrap();
        assert_eq!(
            db::reporter_mark(&mut c, "buildsets").await.unwrap(),
            Some(0)
        );
        let mut tx = db.begin().await.unwrap();
        db.serialize_appends(&mut tx).await.unwrap();
        let event = db::insert_event(&mut tx, "buildset.complete", set, &json!({}), 12_000)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        db::start_reporter_mark(&mut c, "buildsets").await.unwrap();
        db::start_reporter_mark(&mut c, "other").await.unwrap();
        assert_eq!(
            db::reporter_mark(&mut c, "buildsets").await.unwrap(),
            Some(0)
        );
        assert_eq!(
            db::reporter_mark(&mut c, "other").await.unwrap(),
            Some(event)
        );
        assert!(
            db::advance_reporter_mark(&mut c, "buildsets", 0, event)
                .await
                .unwrap()
        );
        assert!(
            !db::advance_reporter_mark(&mut c, "buildsets", 0, event)
                .await
                .unwrap(),
            "another master moved it first"
        );
        assert_eq!(
            db::buildset_builders(&mut c, set).await.unwrap(),
            vec!["alpha"]
        );

        // What a delivery says, read from the API's views.
        let build = payload::read_build(&mut c, b[2]).await.unwrap().unwrap();
        assert_eq!(build.build["builder"], "alpha");
        assert_eq!(build.build["results"], "FAILURE");
        assert_eq!(build.buildset, set);
        assert_eq!(build.blamelist, vec!["Jane Doe <jane@laptop.local>"]);
        assert_eq!(build.changes[0]["revision"], "abc123");
        assert!(
            payload::read_build(&mut c, 999_999)
                .await
                .unwrap()
                .is_none()
        );
        let bs = payload::read_buildset(&mut c, set).await.unwrap().unwrap();
        assert_eq!(bs.builds.len(), 4);
        assert_eq!(bs.sourcestamps[0].revision.as_deref(), Some("abc123"));
        assert!(
            payload::read_buildset(&mut c, 999_999)
                .await
                .unwrap()
                .is_none()
        );
    }
}
