//! Forge webhooks against a real master over real HTTP on 127.0.0.1: deliveries of each
//! forge's documented payloads (`payloads/`), signed as each forge signs them; bad and missing
//! signatures, replays, malformed, oversized and misdirected deliveries, none of which store
//! anything; and a pull request from a fork, which builds only on a sandbox worker.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::{Value, json};

use crate::farm::{Farm, SUCCESS, workers};

const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const GITLAB_TOKEN: &str = "gitlab-token-7";
const GITEA_SECRET: &str = "gitea secret";
const GENERIC_SECRET: &str = "generic-secret";

/// The change sources every test here configures.
fn sources() -> String {
    format!(
        r#"
[[change_sources]]
name = "github"
type = "github"
secret = "{GITHUB_SECRET}"

[[change_sources]]
name = "gitlab"
type = "gitlab"
secret = "{GITLAB_TOKEN}"

[[change_sources]]
name = "gitea"
type = "gitea"
secret = "{GITEA_SECRET}"
project = "hooks"
category = "gitea-push"

[[change_sources]]
name = "kiln"
type = "generic"
secret = "{GENERIC_SECRET}"

[[change_sources]]
name = "open"
type = "generic"
"#
    )
}

fn payload(path: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/../tests/payloads/{path}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// The hex HMAC-SHA256 of `body`, computed here independently of the master's code.
fn hmac(secret: &str, body: &[u8]) -> String {
    use sha2::Digest;
    let mut key = [0u8; 64];
    if secret.len() > 64 {
        key[..32].copy_from_slice(&sha2::Sha256::digest(secret.as_bytes()));
    } else {
        key[..secret.len()].copy_from_slice(secret.as_bytes());
    }
    let pad = |byte: u8| key.iter().map(|k| k ^ byte).collect::<Vec<u8>>();
    let mut inner = sha2::Sha256::new();
    inner.update(pad(0x36));
    inner.update(body);
    let mut outer = sha2::Sha256::new();
    outer.update(pad(0x5c));
    outer.update(inner.finalize());
    hex::encode(outer.finalize())
}

/// A raw HTTP/1.1 POST: the status and the JSON answer (or the text as a JSON string).
fn post(farm: &Farm, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", farm.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    head += "\r\n";
    s.write_all(head.as_bytes()).unwrap();
    // A refused body may not be read to its end; the answer is what matters.
    let _ = s.write_all(body);
    let mut response = Vec::new();
    let _ = s.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    assert!(text.len() > 12, "no answer to POST {path}: {text:?}");
    let status = text[9..12].parse().unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap_or(("", ""));
    let body = body.trim();
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.into())),
    )
}

const JSON: (&str, &str) = ("Content-Type", "application/json");

/// A GitHub delivery, signed as GitHub signs it.
fn github(farm: &Farm, event: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
    let signature = format!("sha256={}", hmac(GITHUB_SECRET, body));
    post(
        farm,
        "/change_hook/github",
        &[
            JSON,
            ("X-GitHub-Event", event),
            ("X-GitHub-Delivery", delivery),
            ("X-Hub-Signature-256", &signature),
            ("User-Agent", "GitHub-Hookshot/044aadd"),
        ],
        body,
    )
}

fn gitlab(farm: &Farm, event: &str, uuid: &str, body: &[u8]) -> (u16, Value) {
    post(
        farm,
        "/change_hook/gitlab",
        &[
            JSON,
            ("X-Gitlab-Event", event),
            ("X-Gitlab-Event-UUID", uuid),
            ("X-Gitlab-Token", GITLAB_TOKEN),
        ],
        body,
    )
}

/// A Forgejo delivery: Forgejo sends its own headers and Gitea's.
fn forgejo(farm: &Farm, event: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
    let signature = hmac(GITEA_SECRET, body);
    post(
        farm,
        "/change_hook/gitea",
        &[
            JSON,
            ("X-Forgejo-Event", event),
            ("X-Forgejo-Delivery", delivery),
            ("X-Forgejo-Signature", &signature),
            ("X-Gitea-Event", event),
            ("X-Gitea-Delivery", delivery),
            ("X-Gitea-Signature", &signature),
        ],
        body,
    )
}

fn gitea(farm: &Farm, event: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
    let signature = hmac(GITEA_SECRET, body);
    post(
        farm,
        "/change_hook/gitea",
        &[
            JSON,
            ("X-Gitea-Event", event),
            ("X-Gitea-Delivery", delivery),
            ("X-Gitea-Signature", &signature),
        ],
        body,
    )
}

fn generic(farm: &Farm, delivery: &str, body: &[u8]) -> (u16, Value) {
    let signature = format!("sha256={}", hmac(GENERIC_SECRET, body));
    post(
        farm,
        "/change_hook/kiln",
        &[
            JSON,
            ("X-Kiln-Delivery", delivery),
            ("X-Kiln-Signature-256", &signature),
        ],
        body,
    )
}

/// Every change the master stored, oldest first.
fn changes(farm: &Farm) -> Vec<Value> {
    let (status, body) = farm.api("GET", "/api/v2/changes?order=changeid", "");
    assert_eq!(status, 200, "{body}");
    body["changes"].as_array().cloned().unwrap_or_default()
}

fn accepted(answer: (u16, Value)) -> Vec<i64> {
    let (status, body) = answer;
    assert_eq!(status, 200, "{body}");
    body["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("no changes in {body}"))
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

fn master_only() -> Farm {
    let mut farm = Farm::new(&sources());
    farm.start_master();
    farm
}

#[test]
fn each_forges_deliveries_become_changes() {
    let farm = master_only();

    // GitHub: ping is answered; a push; a pull request.
    let (status, body) = github(&farm, "ping", "d-ping", &payload("github/ping.json"));
    assert_eq!(status, 200, "{body}");
    assert!(
        body["ignored"].as_str().unwrap().starts_with("ping"),
        "{body}"
    );
    let push = accepted(github(
        &farm,
        "push",
        "d-push",
        &payload("github/push.json"),
    ));
    assert_eq!(push.len(), 1);
    let pr = accepted(github(
        &farm,
        "pull_request",
        "d-pr",
        &payload("github/pull_request-opened.json"),
    ));
    // A deleted tag builds nothing, and says so.
    let (status, body) = github(
        &farm,
        "push",
        "d-deleted",
        &payload("github/push-tag-deleted.json"),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["ignored"],
        "the push deleted refs/tags/simple-tag; nothing to build"
    );

    // GitLab: a push of two commits, a tag, a merge request.
    let gl_push = accepted(gitlab(
        &farm,
        "Push Hook",
        "u-1",
        &payload("gitlab/push.json"),
    ));
    assert_eq!(gl_push.len(), 2);
    accepted(gitlab(
        &farm,
        "Tag Push Hook",
        "u-2",
        &payload("gitlab/tag_push.json"),
    ));
    accepted(gitlab(
        &farm,
        "Merge Request Hook",
        "u-3",
        &payload("gitlab/merge_request.json"),
    ));

    // Gitea and Forgejo, on one source.
    accepted(gitea(&farm, "push", "g-1", &payload("gitea/push.json")));
    accepted(forgejo(
        &farm,
        "pull_request",
        "f-1",
        &payload("gitea/pull_request-synchronized.json"),
    ));

    // Kiln's own JSON.
    let body = json!({
        "author": "Ada <ada@example.org>", "branch": "main", "revision": "1a2b3c",
        "files": ["src/frob.rs"], "comments": "fix the frobnicator",
        "repository": "https://git.example.org/frob.git", "project": "frob",
        "properties": {"ticket": 7}
    });
    accepted(generic(&farm, "k-1", body.to_string().as_bytes()));

    let all = changes(&farm);
    let find = |source: &str, revision: &str| {
        all.iter()
            .find(|c| c["source"] == source && c["revision"] == revision)
            .unwrap_or_else(|| panic!("no {source} change of {revision} in {all:#?}"))
            .clone()
    };
    assert_eq!(all.len(), 9, "{all:#?}");

    let c = find("github", "6113728f27ae82c7b1a177c8d03f9e96e0adf246");
    assert_eq!(c["changeid"], push[0]);
    assert_eq!(
        c["author"],
        "Codertocat <21031067+Codertocat@users.noreply.github.com>"
    );
    assert_eq!(c["branch"], "master");
    assert_eq!(c["comments"], "Initial commit");
    assert_eq!(
        c["repository"],
        "https://github.com/Codertocat/Hello-World.git"
    );
    assert_eq!(c["project"], "Codertocat/Hello-World");
    assert_eq!(c["category"], "push");
    assert_eq!(c["files"], json!(["README.md"]));
    assert_eq!(c["when_timestamp"], 1_557_933_565_000i64);
    assert_eq!(c["trusted"], true);

    let c = find("github", "ec26c3e57ca3a959ca5aad62de7213c562f8c821");
    assert_eq!(c["changeid"], pr[0]);
    assert_eq!(c["branch"], "refs/pull/2/head");
    assert_eq!(c["category"], "pull");
    assert_eq!(
        c["revlink"],
        "https://github.com/Codertocat/Hello-World/pull/2"
    );
    assert_eq!(c["trusted"], true, "a pull request within the repository");

    let c = find("gitlab", "b6568db1bc1dcd7f8b4d5a946b0b91f9dacd7327");
    assert_eq!(c["author"], "Jordi Mallach <jordi@softcatala.org>");
    assert_eq!(
        c["files"],
        json!(["CHANGELOG", "app/controller/application.rb"])
    );
    assert_eq!(c["project"], "mike/diaspora");
    let c = find("gitlab", "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7");
    assert_eq!(c["branch"], "v1.0.0");
    assert_eq!(c["category"], "tag");
    let c = find("gitlab", "da1560886d4f094c3e6c9ef40349f7d38b5d27d7");
    assert!(
        c["branch"] == "master" || c["branch"] == "refs/merge-requests/1/head",
        "{c}"
    );
    assert_eq!(
        all.iter()
            .filter(|c| c["branch"] == "refs/merge-requests/1/head")
            .count(),
        1
    );

    let c = find("gitea", "bffeb74224043ba2feb48d137756c8a9331c449a");
    assert_eq!(c["author"], "Gitea <someone@gitea.io>");
    assert_eq!(c["branch"], "develop");
    assert_eq!(c["project"], "hooks", "the source's project");
    assert_eq!(c["category"], "gitea-push", "the source's category");
    let c = find("gitea", "788ed8d02d3b7fcfcf6386dbcbca696aa1d4dc25");
    assert_eq!(c["branch"], "refs/pull/2/head");
    assert_eq!(c["trusted"], true);

    let c = find("kiln", "1a2b3c");
    assert_eq!(c["author"], "Ada <ada@example.org>");
    assert_eq!(c["files"], json!(["src/frob.rs"]));
    assert_eq!(c["project"], "frob");

    // What Prometheus scrapes counts them.
    let metrics = farm.metrics();
    for line in [
        "kiln_webhook_deliveries_total{source=\"github\",outcome=\"accepted\"} 2",
        "kiln_webhook_deliveries_total{source=\"github\",outcome=\"ignored\"} 2",
        "kiln_webhook_deliveries_total{source=\"gitlab\",outcome=\"accepted\"} 3",
        "kiln_webhook_deliveries_total{source=\"gitea\",outcome=\"accepted\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
}

#[test]
fn a_replayed_delivery_is_answered_and_stored_once() {
    let farm = master_only();
    let body = payload("gitlab/push.json");
    let first = accepted(gitlab(&farm, "Push Hook", "uuid-1", &body));
    let (status, again) = gitlab(&farm, "Push Hook", "uuid-1", &body);
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["already_received"], true, "{again}");
    assert_eq!(again["changes"], json!(first));
    assert_eq!(changes(&farm).len(), 2);
    // Several at once: the database's unique key lets one in.
    let farm_ref = &farm;
    let body = payload("github/push.json");
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..4)
            .map(|_| s.spawn(|| github(farm_ref, "push", "same-delivery", &body)))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}"
    );
    assert_eq!(
        answers
            .iter()
            .filter(|(_, a)| a["already_received"] != true)
            .count(),
        1,
        "{answers:?}"
    );
    assert_eq!(changes(&farm).len(), 3);
    // The same body under a new delivery id is a new delivery (a forge's own resend of an
    // event keeps its id; a new id is a new event).
    accepted(github(&farm, "push", "other-delivery", &body));
    assert_eq!(changes(&farm).len(), 4);
    let metrics = farm.metrics();
    assert!(
        metrics
            .contains("kiln_webhook_deliveries_total{source=\"github\",outcome=\"duplicate\"} 3"),
        "{metrics}"
    );
}

/// A refused delivery: the path, its headers (beside the content type), the status and part
/// of the message.
type Refusal<'a> = (&'a str, Vec<(&'a str, String)>, u16, &'a str);

#[test]
fn unsigned_and_badly_signed_deliveries_are_refused_and_store_nothing() {
    let farm = master_only();
    let body = payload("github/push.json");
    let cases: Vec<Refusal> = vec![
        (
            "/change_hook/github",
            vec![("X-GitHub-Event", "push".into())],
            401,
            "carries no X-Hub-Signature-256 header",
        ),
        (
            "/change_hook/github",
            vec![
                ("X-GitHub-Event", "push".into()),
                (
                    "X-Hub-Signature-256",
                    format!("sha256={}", hmac("wrong", &body)),
                ),
            ],
            403,
            "does not match this change source's secret",
        ),
        (
            "/change_hook/github",
            vec![
                ("X-GitHub-Event", "push".into()),
                // The old SHA-1 form is not accepted in place of SHA-256.
                (
                    "X-Hub-Signature-256",
                    format!("sha1={}", hmac(GITHUB_SECRET, &body)),
                ),
            ],
            403,
            "must be sha256= and 64 hex digits",
        ),
        (
            "/change_hook/gitlab",
            vec![("X-Gitlab-Event", "Push Hook".into())],
            401,
            "carries no X-Gitlab-Token header",
        ),
        (
            "/change_hook/gitlab",
            vec![
                ("X-Gitlab-Event", "Push Hook".into()),
                ("X-Gitlab-Token", format!("{GITLAB_TOKEN}x")),
            ],
            403,
            "X-Gitlab-Token header does not match",
        ),
        (
            "/change_hook/gitea",
            vec![("X-Gitea-Event", "push".into())],
            401,
            "X-Gitea-Signature or X-Forgejo-Signature",
        ),
        (
            "/change_hook/gitea",
            vec![
                ("X-Forgejo-Event", "push".into()),
                ("X-Forgejo-Signature", hmac(GITEA_SECRET, b"another body")),
            ],
            403,
            "X-Forgejo-Signature header does not match",
        ),
        (
            "/change_hook/kiln",
            vec![(
                "X-Kiln-Signature-256",
                format!("sha256={}", hmac(GITHUB_SECRET, &body)),
            )],
            403,
            "does not match",
        ),
    ];
    for (path, extra, status, message) in cases {
        let mut headers: Vec<(&str, &str)> = vec![JSON];
        headers.extend(extra.iter().map(|(n, v)| (*n, v.as_str())));
        let (got, answer) = post(&farm, path, &headers, &body);
        assert_eq!(got, status, "{path} {extra:?}: {answer}");
        let error = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{answer}"));
        assert!(
            error.contains(message),
            "{path}: {error:?} lacks {message:?}"
        );
    }
    assert!(changes(&farm).is_empty());
    let metrics = farm.metrics();
    assert!(
        metrics
            .contains("kiln_webhook_deliveries_total{source=\"github\",outcome=\"forbidden\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "kiln_webhook_deliveries_total{source=\"gitlab\",outcome=\"unauthorized\"} 1"
        ),
        "{metrics}"
    );
    // An API token is no substitute for the secret.
    let token = farm.token.clone().unwrap();
    let (status, _) = post(
        &farm,
        "/change_hook/github",
        &[
            JSON,
            ("X-GitHub-Event", "push"),
            ("Authorization", &format!("Bearer {token}")),
        ],
        &body,
    );
    assert_eq!(status, 401);
    // A source without a secret takes unsigned deliveries.
    accepted(post(
        &farm,
        "/change_hook/open",
        &[JSON],
        br#"{"author": "anyone", "branch": "main"}"#,
    ));
    assert_eq!(changes(&farm).len(), 1);
}

#[test]
fn bad_deliveries_get_a_clear_json_error_and_the_master_carries_on() {
    let farm = master_only();
    let signed = |body: &[u8]| format!("sha256={}", hmac(GITHUB_SECRET, body));
    let check = |(status, answer): (u16, Value), want: u16, message: &str| {
        assert_eq!(status, want, "{answer}");
        let error = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("not a JSON error: {answer}"));
        assert!(error.contains(message), "{error:?} lacks {message:?}");
    };
    // Malformed JSON, correctly signed.
    let bad = b"{\"ref\": \"refs/heads/main\", ";
    check(
        post(
            &farm,
            "/change_hook/github",
            &[
                JSON,
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", &signed(bad)),
            ],
            bad,
        ),
        400,
        "the delivery's body is not valid JSON",
    );
    // JSON that is not a push.
    let odd = b"{\"zen\": 1}";
    check(
        post(
            &farm,
            "/change_hook/github",
            &[
                JSON,
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", &signed(odd)),
            ],
            odd,
        ),
        400,
        "the push payload has no ref",
    );
    // A form-encoded delivery (GitHub's other content type).
    let body = payload("github/push.json");
    check(
        post(
            &farm,
            "/change_hook/github",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", &signed(&body)),
            ],
            &body,
        ),
        415,
        "set the webhook's content type to application/json",
    );
    // No event header; an event Kiln does not handle.
    check(
        post(
            &farm,
            "/change_hook/github",
            &[JSON, ("X-Hub-Signature-256", &signed(&body))],
            &body,
        ),
        400,
        "has no X-GitHub-Event header",
    );
    check(
        github(&farm, "issues", "d-issues", &body),
        400,
        "event \"issues\" is not one Kiln handles",
    );
    // Too large: refused whole, answered (not reset).
    let huge = vec![b' '; kiln_http::change_hooks::MAX_BODY + 1];
    check(
        post(
            &farm,
            "/change_hook/github",
            &[JSON, ("X-GitHub-Event", "push")],
            &huge,
        ),
        413,
        "larger than 8 MiB",
    );
    // A change that fails validation refuses the whole delivery.
    let generic_bad = json!([{"author": "a", "branch": "main"}, {"author": ""}]).to_string();
    check(
        generic(&farm, "k-bad", generic_bad.as_bytes()),
        400,
        "change refused: change 2 of 2: it has no author",
    );
    // Misdirected: no such source, a poller's name, the wrong method.
    check(
        post(&farm, "/change_hook/nope", &[JSON], b"{}"),
        404,
        "no webhook change source is named \"nope\" (there are: github, gitlab, gitea, kiln, open)",
    );
    let (status, answer) = farm.request("GET", "/change_hook/github", "", "");
    assert_eq!(status, 405, "{answer}");
    assert_eq!(answer["error"], "GET is not allowed on /change_hook/github");
    // Nothing was stored, and the master still works.
    assert!(changes(&farm).is_empty());
    accepted(github(&farm, "push", "d-ok", &body));
    assert_eq!(changes(&farm).len(), 1);
    let metrics = farm.metrics();
    for line in [
        "kiln_webhook_deliveries_total{source=\"github\",outcome=\"bad_request\"} 5",
        "kiln_webhook_deliveries_total{source=\"github\",outcome=\"too_large\"} 1",
        "kiln_webhook_deliveries_total{source=\"\",outcome=\"unknown_source\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
}

#[test]
fn a_pull_request_from_a_fork_builds_only_on_a_sandbox_worker() {
    let mut farm = Farm::new(&format!(
        r#"{}{}{}
[[builders]]
name = "app"
workdir = "app"
grant = {{ programs = ["sh"], network = true }}
[[builders.steps]]
module = "shell"
args = {{ command = ["sh", "-c", "echo built %(prop:head_sha)s"] }}

[[schedulers]]
name = "pulls"
type = "any-branch"
branches = ["refs/pull/**"]
builders = ["app"]
"#,
        workers(&["w1"], false),
        workers(&["box"], true),
        sources()
    ));
    farm.start_master();
    farm.start_worker("w1", &[]);

    // A fork's pull request: its buildset is untrusted, and no plain worker takes it.
    let fork = accepted(github(
        &farm,
        "pull_request",
        "fork-1",
        &payload("github/pull_request-fork.json"),
    ));
    let change = changes(&farm)
        .into_iter()
        .find(|c| c["changeid"] == fork[0])
        .unwrap();
    assert_eq!(change["trusted"], false, "{change}");
    let request = |trusted: bool| -> i64 {
        let mut found = 0;
        farm.wait_until(
            "the pull request's build request",
            Duration::from_secs(30),
            || {
                let (_, sets) = farm.api("GET", "/api/v2/buildsets", "");
                let Some(set) = sets["buildsets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|b| b["trusted"] == trusted)
                else {
                    return false;
                };
                let id = set["buildsetid"].as_i64().unwrap();
                let (_, reqs) =
                    farm.api("GET", &format!("/api/v2/buildrequests?buildsetid={id}"), "");
                match reqs["buildrequests"][0]["buildrequestid"].as_i64() {
                    Some(r) => {
                        found = r;
                        true
                    }
                    None => false,
                }
            },
        );
        found
    };
    let untrusted = request(false);

    // A pull request within the repository is trusted and builds on the plain worker.
    accepted(github(
        &farm,
        "pull_request",
        "same-1",
        &payload("github/pull_request-opened.json"),
    ));
    let trusted = request(true);
    let build = farm.finished_build(trusted, 0, Duration::from_secs(60));
    assert_eq!(build["results"], SUCCESS, "{build:#}{}", farm.logs());
    assert_eq!(build["worker"], "w1");
    // Meanwhile the fork's request waited: a plain worker never runs it.
    assert!(
        farm.builds_of(untrusted).is_empty(),
        "an untrusted build ran on a plain worker: {:#?}",
        farm.builds_of(untrusted)
    );
    let (_, queue) = farm.api("GET", "/api/v2/buildrequests?complete=false", "");
    assert_eq!(
        queue["buildrequests"].as_array().unwrap().len(),
        1,
        "{queue:#}"
    );

    // A sandbox worker takes it, confined.
    farm.start_worker("box", &["--sandbox"]);
    let build = farm.finished_build(untrusted, 0, Duration::from_secs(60));
    assert_eq!(build["results"], SUCCESS, "{build:#}{}", farm.logs());
    assert_eq!(build["worker"], "box");
    let log = build["steps"][0]["logs"][0]["logid"].as_i64().unwrap();
    let text = farm.log_text(log);
    assert!(
        text.contains("built ec26c3e57ca3a959ca5aad62de7213c562f8c821"),
        "{text}"
    );
    assert_eq!(farm.builds_of(untrusted).len(), 1);
}

mod database {
    //! `changes::add_delivery` and `db/hooks.rs` on SQLite and on a real PostgreSQL.

    use kiln_db::model::NewChange;
    use kiln_db::{self as db, HookDelivery};
    use master::changes::{Delivered, add_delivery};

    use kiln_testkit::db::TestDb;
    use kiln_testkit::on_both_databases;

    on_both_databases!(a_delivery_and_its_changes_are_stored_once);

    fn change(author: &str, revision: &str) -> NewChange {
        NewChange {
            author: author.into(),
            revision: Some(revision.into()),
            branch: Some("main".into()),
            source: "github".into(),
            trusted: Some(false),
            ..Default::default()
        }
    }

    async fn a_delivery_and_its_changes_are_stored_once(t: TestDb) {
        let d = HookDelivery {
            source: "github".into(),
            delivery: "72d3162e-cc78-11e3-81ab-4c9367dc0958".into(),
            event: "push".into(),
        };
        let changes = [change("a", "1"), change("b", "2")];
        let Delivered::Added(ids) = add_delivery(&t.db, Some(&d), &changes)
            .await
            .unwrap()
            .unwrap()
        else {
            panic!("not added")
        };
        assert_eq!(ids.len(), 2);
        // Again: nothing stored, and the answer names what the first delivery stored.
        let again = add_delivery(&t.db, Some(&d), &changes)
            .await
            .unwrap()
            .unwrap();
        let Delivered::AlreadyReceived { changes: seen, .. } = again else {
            panic!("stored twice: {again:?}")
        };
        assert_eq!(seen, ids);
        // The same delivery id at another source is another delivery.
        let other = HookDelivery {
            source: "gitea".into(),
            ..d.clone()
        };
        let Delivered::Added(more) = add_delivery(&t.db, Some(&other), &changes[..1])
            .await
            .unwrap()
            .unwrap()
        else {
            panic!("not added")
        };
        assert_eq!(more.len(), 1);
        // A delivery with a change that fails validation stores nothing, not even its id.
        let bad = HookDelivery {
            delivery: "bad".into(),
            ..d.clone()
        };
        let refused = add_delivery(&t.db, Some(&bad), &[change("c", "3"), change("", "4")])
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(
            refused.to_string(),
            "change refused: change 2 of 2: it has no author; give who made it (\"Name <email>\")"
        );
        let mut conn = t.db.pool().acquire().await.unwrap();
        assert_eq!(db::count_deliveries(&mut conn, "github").await.unwrap(), 1);
        assert_eq!(
            db::get_delivery(&mut conn, "github", "bad").await.unwrap(),
            None
        );
        let stored = db::changes_after(&mut conn, kiln_db::model::ChangeId(0), 100)
            .await
            .unwrap();
        assert_eq!(stored.len(), 3);
        assert!(stored.iter().all(|c| !c.trusted), "the mark is kept");
        // Without a delivery id there is nothing to de-duplicate by.
        add_delivery(&t.db, None, &changes[..1])
            .await
            .unwrap()
            .unwrap();
        let stored = db::changes_after(&mut conn, kiln_db::model::ChangeId(0), 100)
            .await
            .unwrap();
        assert_eq!(stored.len(), 4);
    }
}
