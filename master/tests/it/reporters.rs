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
"#,
        workers(&["w1"], false),
    ));
    farm.start_master();
    farm.start_worker("w1", &[]);
    let sha = "89abcdef0123456789abcdef0123456789abcdef";
    add_change(&farm, "Jane Doe <jane@laptop.local>", sha);
    farm.wait_until("a mail", Duration::from_secs(60), || {
        std::fs::read_to_string(&out).is_ok_and(|s| !s.is_empty())
    });
    // alpha succeeded: a failing reporter says nothing of it.
    std::thread::sleep(Duration::from_millis(500));
    let text = std::fs::read_to_string(&out).unwrap();
    let mails: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(mails.len(), 1, "{text}");
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
    let _ = smtpd.kill();
    let _ = smtpd.wait();
}
