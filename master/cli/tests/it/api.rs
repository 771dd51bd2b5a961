//! The REST API against a real master and real workers: reads with filters, ordering and
//! pages; a whole build page in one request; tokens and roles; actions on requests, builds and
//! workers; step module upload and deletion; live events; the OpenAPI document.

use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::farm::{Farm, SUCCESS, slow, workers};

const BUILDERS: &str = r#"
[[builders]]
name = "alpha"
collapse = false
grant = { programs = ["sh"] }
[[builders.steps]]
module = "shell"
name = "talk"
args = { command = ["sh", "-c", "echo out; printf '\\033[31mred\\033[0m <b>bold</b>\\n'; echo err >&2"] }

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
"#;

fn get(farm: &Farm, path: &str) -> Value {
    let (status, body) = farm.api("GET", path, "");
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// The status and JSON error of a request that must fail.
fn error(farm: &Farm, method: &str, path: &str, body: &str) -> (u16, String) {
    let (status, answer) = farm.api(method, path, body);
    assert!(status >= 400, "{method} {path}: {status} {answer}");
    let message = answer["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{method} {path}: not a JSON error: {answer}"))
        .to_owned();
    (status, message)
}

fn force_on(farm: &Farm, builder: &str) -> i64 {
    farm.force("force", json!({"builders": [builder], "parameters": {}}))
}

#[test]
fn reads_filter_order_and_page_in_one_request_per_page() {
    let mut farm = Farm::new(&format!("{}{BUILDERS}", workers(&["w1"], false)));
    farm.start_master();
    farm.start_worker("w1", &[]);
    let mut requests: Vec<i64> = (0..3).map(|_| force_on(&farm, "alpha")).collect();
    requests.push(force_on(&farm, "beta"));
    for r in &requests {
        farm.finished_build(*r, 0, Duration::from_secs(60));
    }

    // Filters, ordering, pages and totals.
    let alpha = get(&farm, "/api/v2/builds?builder=alpha");
    assert_eq!(alpha["meta"]["total"], 3, "{alpha:#}");
    let page = get(
        &farm,
        "/api/v2/builds?builder=alpha&order=number&limit=1&offset=1",
    );
    assert_eq!(page["builds"].as_array().unwrap().len(), 1);
    assert_eq!(page["builds"][0]["number"], 2);
    assert_eq!(page["meta"]["total"], 3, "the total ignores the page");
    let failed = get(&farm, "/api/v2/builds?results=FAILURE");
    assert_eq!(failed["meta"]["total"], 1);
    assert_eq!(failed["builds"][0]["builder"], "beta");
    let ok = get(&farm, "/api/v2/builds?results__lt=2&builder__contains=ALP");
    assert_eq!(ok["meta"]["total"], 3, "{ok:#}");
    let later = get(
        &farm,
        "/api/v2/builds?builder=alpha&number__gt=1&order=-number",
    );
    assert_eq!(later["builds"][0]["number"], 3);
    assert_eq!(later["meta"]["total"], 2);
    let either = get(
        &farm,
        "/api/v2/builds?builder=alpha&builder=beta&complete=true",
    );
    assert_eq!(either["meta"]["total"], 4);

    // Bad queries and paths get JSON errors that say what to give.
    let (status, e) = error(&farm, "GET", "/api/v2/builds?colour=red", "");
    assert_eq!(status, 400);
    assert!(e.contains("their fields are: buildid"), "{e}");
    let (status, e) = error(&farm, "GET", "/api/v2/builds?number=two", "");
    assert_eq!(status, 400);
    assert!(e.contains("whole number"), "{e}");
    let (status, e) = error(&farm, "GET", "/api/v2/builds/abc", "");
    assert_eq!(status, 400, "{e}");
    let (status, e) = error(&farm, "GET", "/api/v2/nothing", "");
    assert_eq!(status, 404);
    assert!(e.contains("openapi.json"), "{e}");
    let (status, e) = error(&farm, "DELETE", "/api/v2/builds", "");
    assert_eq!(status, 405);
    assert!(e.contains("DELETE is not allowed"), "{e}");
    let (status, _) = error(&farm, "GET", "/api/v2/builds/999999", "");
    assert_eq!(status, 404);

    // A build page in one request: steps, logs, properties, buildset, changes.
    let build = farm.finished_build(requests[0], 0, Duration::from_secs(5));
    assert_eq!(build["results"], SUCCESS);
    assert_eq!(build["builder"], "alpha");
    assert_eq!(build["properties"]["owner"][0], "farm", "{build:#}");
    assert!(
        build["buildset"]["reason"]
            .as_str()
            .unwrap()
            .contains("forced"),
        "{build:#}"
    );
    assert_eq!(build["changes"], json!([]));
    let step = &build["steps"][0];
    assert_eq!(step["name"], "talk");
    let log = step["logs"][0]["logid"].as_i64().unwrap();
    assert_eq!(step["logs"][0]["name"], "stdio");

    // Log contents by line range, with the channel of each line and the text untouched.
    let all = get(&farm, &format!("/api/v2/logs/{log}/contents"));
    let lines = all["lines"].as_array().unwrap();
    assert!(
        lines.contains(&json!(["o", "out"])),
        "stdout is channel o: {all:#}"
    );
    assert!(lines.contains(&json!(["e", "err"])), "{all:#}");
    assert!(
        lines.contains(&json!(["o", "\u{1b}[31mred\u{1b}[0m <b>bold</b>"])),
        "{all:#}"
    );
    let n = all["num_lines"].as_i64().unwrap();
    let last = get(
        &farm,
        &format!("/api/v2/logs/{log}/contents?offset={}&limit=1", n - 1),
    );
    assert_eq!(last["lines"].as_array().unwrap().len(), 1);
    assert_eq!(last["lines"][0], lines[(n - 1) as usize]);
    let (status, e) = error(
        &farm,
        "GET",
        &format!("/api/v2/logs/{log}/contents?limit=0"),
        "",
    );
    assert_eq!(status, 400, "{e}");
    assert!(farm.log_text(log).contains("out\n"));

    // Builders carry their counts and last build.
    let builders = get(&farm, "/api/v2/builders");
    assert_eq!(builders["meta"]["total"], 2);
    let beta = &builders["builders"][1];
    assert_eq!(beta["name"], "beta");
    assert_eq!(beta["last_build"]["results"], "FAILURE", "{builders:#}");
    assert_eq!(beta["pending"], 0);
    assert_eq!(beta["steps"], json!(["fail"]));
    assert_eq!(
        get(&farm, "/api/v2/builders/alpha")["steps"],
        json!(["talk"])
    );
    assert_eq!(
        get(&farm, "/api/v2/builders/alpha/builds?limit=2")["meta"]["total"],
        3
    );
    assert_eq!(error(&farm, "GET", "/api/v2/builders/gamma", "").0, 404);

    // Buildsets, source stamps, requests, changes, schedulers, masters, workers.
    let bs = build["buildset"]["buildsetid"].as_i64().unwrap();
    let buildset = get(&farm, &format!("/api/v2/buildsets/{bs}"));
    assert_eq!(buildset["buildrequests"][0]["builder"], "alpha");
    assert_eq!(buildset["sourcestamps"].as_array().unwrap().len(), 1);
    assert_eq!(
        get(&farm, "/api/v2/buildrequests?complete=true")["meta"]["total"],
        4
    );
    let (status, change) = farm.api(
        "POST",
        "/api/v2/changes",
        r#"{"author": "Ada <ada@example.org>", "branch": "main", "revision": "abc123", "files": ["src/a.rs", "README"], "comments": "Fix it"}"#,
    );
    assert_eq!(status, 200, "{change}");
    let changes = get(&farm, "/api/v2/changes?author__contains=ada");
    assert_eq!(changes["meta"]["total"], 1);
    assert_eq!(
        changes["changes"][0]["files"],
        json!(["README", "src/a.rs"])
    );
    assert_eq!(
        get(&farm, "/api/v2/schedulers")["schedulers"][0]["type"],
        "force"
    );
    let force = get(&farm, "/api/v2/forceschedulers/force");
    assert_eq!(force["builders"], json!(["alpha", "beta"]));
    assert_eq!(get(&farm, "/api/v2/masters")["masters"][0]["name"], "farm");
    let w1 = get(&farm, "/api/v2/workers/w1");
    assert_eq!(w1["connected"], true);
    assert!(w1["info"]["arch"].is_string(), "{w1:#}");
    assert_eq!(w1["state"], "idle", "{w1:#}");

    // Every read the OpenAPI document lists answers (those without path parameters).
    let doc = get(&farm, "/api/v2/openapi.json");
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if ops.get("get").is_some() && !path.contains('{') && path != "/api/v2/events" {
            let (status, body) = farm.api("GET", path, "");
            assert_eq!(status, 200, "GET {path}: {body}");
        }
    }
}

#[test]
fn actions_need_a_token_whose_role_allows_them() {
    let mut farm = Farm::new(&format!("{}{BUILDERS}", workers(&["w1"], false)));
    farm.start_master();
    let reader = farm.make_token("reader", "read");
    let ci = farm.make_token("ci", "force");
    let force = |headers: &str| {
        farm.request(
            "POST",
            "/api/v2/forceschedulers/force",
            headers,
            r#"{"builders": ["alpha"], "parameters": {}}"#,
        )
    };
    let bearer = |t: &str| format!("Authorization: Bearer {t}\r\n");

    // Reading is anonymous; acting is not.
    let (status, body) = farm.request("GET", "/api/v2/builds", "", "");
    assert_eq!(status, 200, "{body}");
    let (status, body) = force("");
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("kiln token create"),
        "{body}"
    );
    let (status, body) = force(&bearer(&reader));
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("token \"reader\" has the read role"),
        "{body}"
    );
    let (status, body) = force(&bearer(&ci));
    assert_eq!(status, 200, "{body}");
    let (_, me) = farm.request("GET", "/api/v2/auth", &bearer(&ci), "");
    assert_eq!(
        me,
        json!({"name": "ci", "role": "force", "anonymous": false})
    );

    // Bad and revoked tokens are refused, not taken as anonymous.
    let (status, body) = force("Authorization: Bearer nope\r\n");
    assert_eq!(status, 401, "{body}");
    let unknown = format!("kiln_{}", "0".repeat(64));
    let (status, _) = farm.request("GET", "/api/v2/builds", &bearer(&unknown), "");
    assert_eq!(status, 401);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["token", "revoke", "ci"])
        .current_dir(farm.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let (status, _) = force(&bearer(&ci));
    assert_eq!(status, 401, "a revoked token is refused");

    // Reading can be closed to anonymous callers; acting can be opened to them, but not to
    // pages of other sites.
    let config = std::fs::read_to_string(farm.path().join("kiln.toml")).unwrap();
    std::fs::write(
        farm.path().join("kiln.toml"),
        config.replacen("[master]\n", "[master]\nanonymous = \"none\"\n", 1),
    )
    .unwrap();
    let (status, body) = farm.api("POST", "/api/v2/control/reconfig", "");
    assert_eq!(status, 200, "{body}");
    let (status, _) = farm.request("GET", "/api/v2/builds", "", "");
    assert_eq!(status, 401);
    let (status, _) = farm.request("GET", "/api/v2/builds", &bearer(&reader), "");
    assert_eq!(status, 200);
    // A browser's event stream and raw log links carry no token: a token buys a ticket that
    // opens those (and only those) for a minute.
    let (status, _) = farm.request("POST", "/api/v2/auth/ticket", "", "");
    assert_eq!(status, 401, "no ticket without a token");
    let (status, body) = farm.request("POST", "/api/v2/auth/ticket", &bearer(&reader), "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 60);
    let ticket = body["ticket"].as_str().unwrap().to_owned();
    let (status, body) = farm.request("GET", "/api/v2/logs/999/raw", "", "");
    assert_eq!(status, 401, "{body}");
    let (status, body) = farm.request(
        "GET",
        &format!("/api/v2/logs/999/raw?ticket={ticket}"),
        "",
        "",
    );
    assert_eq!(status, 404, "the ticket let the request through: {body}");
    for (method, path) in [
        ("GET", format!("/api/v2/builds?ticket={ticket}")),
        ("GET", format!("/api/v2/logs/999?ticket={ticket}")),
        ("POST", format!("/api/v2/control/reconfig?ticket={ticket}")),
        ("GET", "/api/v2/logs/999/raw?ticket=kilnt_0123".to_owned()),
    ] {
        let (status, body) = farm.request(method, &path, "", "");
        assert_eq!(status, 401, "{method} {path}: {body}");
        assert!(body["error"].as_str().unwrap().contains("ticket"), "{body}");
    }
    std::fs::write(
        farm.path().join("kiln.toml"),
        config.replacen("[master]\n", "[master]\nanonymous = \"force\"\n", 1),
    )
    .unwrap();
    let (status, body) = farm.api("POST", "/api/v2/control/reconfig", "");
    assert_eq!(status, 200, "{body}");
    let (status, body) = force("");
    assert_eq!(status, 200, "{body}");
    let (status, body) = force("Origin: http://127.0.0.1\r\n");
    assert_eq!(status, 200, "the master's own page: {body}");
    let (status, body) = force("Origin: http://evil.example\r\n");
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("cross-site"));
    let (status, _) = force("Sec-Fetch-Site: cross-site\r\n");
    assert_eq!(status, 403);
    // A page of another site whose name was made to resolve here (DNS rebinding) sends its own
    // name as Host: refused without a token, for reads too.
    let (status, body) = farm.request(
        "GET",
        "/api/v2/builds",
        "Host: rebound.evil.example\r\n",
        "",
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("Host header"),
        "{body}"
    );
    let (status, _) = farm.request(
        "GET",
        "/api/v2/builds",
        &format!("Host: rebound.evil.example\r\n{}", bearer(&reader)),
        "",
    );
    assert_eq!(status, 200, "a token is never sent by a rebinding page");
    // Admin actions stay admin.
    let (status, _) = farm.request("POST", "/api/v2/control/reconfig", "", "");
    assert_eq!(status, 401);
    // A body over the limit is refused in JSON.
    let big = format!("{{\"reason\": \"{}\"}}", "x".repeat(5 << 20));
    let (status, body) = farm.api("POST", "/api/v2/forceschedulers/force", &big);
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("at most 4 MiB"));
}

#[test]
fn pending_requests_are_estimated_reprioritised_and_cancelled_and_builds_rebuilt() {
    let mut farm = Farm::new(&format!("{}{}", workers(&["w1"], false), slow("1")));
    farm.start_master();
    farm.start_worker("w1", &[]);
    // One build gives the builder a typical duration.
    let first = farm.force("force", json!({"parameters": {}}));
    let done = farm.finished_build(first, 0, Duration::from_secs(60));
    assert_eq!(done["results"], SUCCESS);
    farm.kill_worker("w1");
    farm.wait_until("w1 to be gone", Duration::from_secs(10), || {
        get(&farm, "/api/v2/workers/w1")["connected"] == false
    });

    let a = farm.force("force", json!({"parameters": {}}));
    let b = farm.force("force", json!({"parameters": {}}));
    let queue = get(
        &farm,
        "/api/v2/buildrequests?complete=false&order=buildrequestid",
    );
    let items = queue["buildrequests"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{queue:#}");
    let start_a = items[0]["estimated_start_at"].as_i64().unwrap();
    let finish_a = items[0]["estimated_finish_at"].as_i64().unwrap();
    let start_b = items[1]["estimated_start_at"].as_i64().unwrap();
    assert!(finish_a > start_a && start_b >= finish_a, "{queue:#}");

    // The later request jumps the queue.
    let (status, body) = farm.api(
        "POST",
        &format!("/api/v2/buildrequests/{b}/priority"),
        r#"{"priority": 5}"#,
    );
    assert_eq!(status, 200, "{body}");
    let queue = get(&farm, "/api/v2/buildrequests?complete=false");
    let of = |id: i64| {
        queue["buildrequests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["buildrequestid"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(of(b)["priority"], 5);
    assert!(
        of(b)["estimated_start_at"].as_i64() < of(a)["estimated_start_at"].as_i64(),
        "{queue:#}"
    );
    let (status, e) = error(
        &farm,
        "POST",
        &format!("/api/v2/buildrequests/{b}/priority"),
        r#"{"priority": "high"}"#,
    );
    assert_eq!(status, 400, "{e}");

    // Cancelling completes the request (and its buildset) CANCELLED; twice is a conflict.
    let (status, body) = farm.api("POST", &format!("/api/v2/buildrequests/{a}/cancel"), "");
    assert_eq!(status, 200, "{body}");
    let cancelled = get(&farm, &format!("/api/v2/buildrequests/{a}"));
    assert_eq!(cancelled["results"], "CANCELLED");
    assert_eq!(cancelled["complete"], true);
    let buildset = get(
        &farm,
        &format!("/api/v2/buildsets/{}", cancelled["buildsetid"]),
    );
    assert_eq!(buildset["complete"], true);
    assert_eq!(buildset["results"], "CANCELLED");
    let (status, e) = error(
        &farm,
        "POST",
        &format!("/api/v2/buildrequests/{a}/cancel"),
        "",
    );
    assert_eq!(status, 409);
    assert!(e.contains("complete already"), "{e}");
    assert_eq!(
        error(&farm, "POST", "/api/v2/buildrequests/424242/cancel", "").0,
        404
    );

    // A paused worker takes nothing; unpaused, it takes the queue.
    let (status, body) = farm.api("POST", "/api/v2/workers/w1/pause", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(&farm, "/api/v2/workers/w1")["paused"], true);
    farm.start_worker("w1", &[]);
    farm.wait_until("w1 to connect", Duration::from_secs(30), || {
        get(&farm, "/api/v2/workers/w1")["connected"] == true
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(farm.builds_of(b).is_empty(), "a paused worker took a build");
    let (status, _) = farm.api("POST", "/api/v2/workers/w1/unpause", "");
    assert_eq!(status, 200);
    let built = farm.finished_build(b, 0, Duration::from_secs(60));
    assert_eq!(built["results"], SUCCESS);
    let (status, e) = error(
        &farm,
        "POST",
        &format!("/api/v2/buildrequests/{b}/cancel"),
        "",
    );
    assert_eq!(status, 409, "{e}");

    // A rebuild builds the same thing again on the same builder.
    let (status, body) = farm.api(
        "POST",
        &format!("/api/v2/builds/{}/rebuild", done["buildid"]),
        "",
    );
    assert_eq!(status, 200, "{body}");
    let again = body["buildrequests"][0]["buildrequestid"].as_i64().unwrap();
    let rebuilt = farm.finished_build(again, 0, Duration::from_secs(60));
    assert_eq!(rebuilt["results"], SUCCESS);
    assert_eq!(rebuilt["builder"], done["builder"]);
    assert!(
        rebuilt["buildset"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("Rebuild of slow #1"),
        "{rebuilt:#}"
    );
    assert_eq!(rebuilt["properties"]["owner"][0], "farm");

    // Asked to stop, the worker finishes and leaves.
    let (status, body) = farm.api("POST", "/api/v2/workers/w1/stop", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(farm.wait_worker("w1", Duration::from_secs(30)), Some(0));
    assert_eq!(
        error(&farm, "POST", "/api/v2/workers/w1/stop", "").0,
        404,
        "not connected any more"
    );
}

const ETA_BUILDER: &str = r#"
[[builders]]
name = "eta"
collapse = false
grant = { programs = ["sh"] }
[[builders.steps]]
module = "shell"
name = "work"
args = { command = ["sh", "-c", "seq 1 %(prop:lines)s; sleep %(prop:pause)s"] }
observers = ["line-counter"]

[[schedulers]]
name = "force"
type = "force"
builders = ["eta"]
parameters = [{ name = "lines", type = "int", default = 100 }, { name = "pause", type = "int", default = 0 }]
"#;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn running_builds_are_estimated_from_their_steps_progress_against_the_last_good_build() {
    let config = workers(&["w1"], false).replace("max_builds = 2", "max_builds = 1");
    let mut farm = Farm::new(&format!("{config}{ETA_BUILDER}"));
    farm.start_master();
    farm.start_worker("w1", &[]);
    // The last good build: 12,000 lines, then two seconds.
    let first = farm.force("force", json!({"parameters": {"lines": 12000, "pause": 2}}));
    let done = farm.finished_build(first, 0, Duration::from_secs(60));
    assert_eq!(done["results"], SUCCESS, "{done:#}");
    let work = &done["steps"][0];
    assert_eq!(work["progress"], json!({"output": 12000}), "{done:#}");
    // Its raw log comes in pages from the database, and whole.
    let raw = farm.log_text(work["logs"][0]["logid"].as_i64().unwrap());
    let numbers: Vec<&str> = raw.lines().filter(|l| l.parse::<u32>().is_ok()).collect();
    let expected: Vec<String> = (1..=12000).map(|n| n.to_string()).collect();
    assert!(
        numbers == expected,
        "the raw log has {} of seq's lines",
        numbers.len()
    );
    assert!(raw.starts_with("$ sh -c"), "the header line first");
    let took = work["complete_at"].as_i64().unwrap() - work["started_at"].as_i64().unwrap();
    assert!(took >= 2_000, "{work:#}");

    // This one writes half as many lines, then hangs: by time alone it would be overdue,
    // by its progress it is half done.
    let second = farm.force("force", json!({"parameters": {"lines": 6000, "pause": 60}}));
    farm.wait_until(
        "the second build to report progress",
        Duration::from_secs(30),
        || {
            farm.builds_of(second).first().is_some_and(|b| {
                farm.build(b["buildid"].as_i64().unwrap())["steps"][0]["progress"]
                    == json!({"output": 6000})
            })
        },
    );
    let running = farm.builds_of(second)[0]["buildid"].as_i64().unwrap();
    let started = farm.build(running)["steps"][0]["started_at"]
        .as_i64()
        .unwrap();
    while now_ms() < started + took + 500 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let third = farm.force("force", json!({"parameters": {}}));
    let before = now_ms();
    let page = get(&farm, &format!("/api/v2/builds/{running}"));
    let queue = get(&farm, &format!("/api/v2/buildrequests/{third}"));
    let after = now_ms();
    let half = took / 2;
    let finish = page["estimated_finish_at"]
        .as_i64()
        .expect("a running build's estimate");
    assert!(
        finish - after <= half + 50 && finish - before >= half - 50,
        "estimated to finish {} ms from now; half the last build's step is {half} ms",
        finish - before
    );
    let start = queue["estimated_start_at"].as_i64().unwrap();
    assert!(
        start - after <= half + 50 && start - before >= half - 50,
        "the queued request starts {} ms from now; expected about {half}: {queue:#}",
        start - before
    );
    assert!(queue["estimated_finish_at"].as_i64().unwrap() > start);
    let done = get(&farm, &format!("/api/v2/builds/{}", done["buildid"]));
    assert_eq!(
        done["estimated_finish_at"],
        Value::Null,
        "a finished build has no estimate"
    );

    let (status, body) = farm.api("POST", &format!("/api/v2/builds/{running}/stop"), "");
    assert_eq!(status, 200, "{body}");
    let (status, body) = farm.api("POST", &format!("/api/v2/buildrequests/{third}/cancel"), "");
    assert!(status == 200 || status == 409, "{status} {body}");
}

/// Uploads a module with raw bytes; (status, JSON answer).
fn upload(farm: &Farm, token: &str, query: &str, bytes: &[u8]) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", farm.port)).unwrap();
    write!(
        s,
        "POST /api/v2/stepmodules?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/wasm\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        bytes.len()
    )
    .unwrap();
    s.write_all(bytes).unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response);
    let status = text[9..12].parse().unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn step_modules_are_checked_stored_used_without_a_restart_and_kept_while_used() {
    let mut farm = Farm::new(&format!(
        r#"{}
[[builders]]
name = "probe"
[[builders.steps]]
module = "probe@latest"
args = {{ action = "echo-args", text = "hello from an upload" }}

[[schedulers]]
name = "force"
type = "force"
builders = ["probe"]
"#,
        workers(&["w1"], false)
    ));
    farm.start_master();
    farm.start_worker("w1", &[]);
    let uploader = farm.make_token("uploader", "upload");
    let ci = farm.make_token("ci", "force");
    let probe = std::fs::read(steps::guest_path("probe-step").unwrap()).unwrap();

    // Before the upload a build cannot run, and says why.
    let early = farm.force("force", json!({"parameters": {}}));
    let b = farm.finished_build(early, 0, Duration::from_secs(60));
    assert_eq!(b["results"], "EXCEPTION");
    assert!(
        b["state_string"]
            .as_str()
            .unwrap()
            .contains("has not been uploaded"),
        "{b:#}"
    );

    // Roles, and what is refused.
    assert_eq!(upload(&farm, &ci, "name=probe&version=1.0", &probe).0, 403);
    let (status, body) = upload(&farm, &uploader, "name=probe&version=1.0", b"not wasm");
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a WebAssembly file"),
        "{body}"
    );
    // The probe step with one import renamed: refused, naming it.
    let rogue = rename_import(&probe, b"kiln:step/report@", b"kiln:step/xeport@");
    let (status, body) = upload(&farm, &uploader, "name=rogue", &rogue);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("kiln:step/xeport@0.1.0"),
        "{body}"
    );
    // Bigger than other requests may be, and still checked as a module.
    let (status, body) = upload(&farm, &uploader, "name=big", &vec![0u8; 5 << 20]);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a WebAssembly file")
    );
    let (status, body) = upload(&farm, &uploader, "name=bad%20name", &probe);
    assert_eq!(status, 400, "{body}");
    let (status, body) = upload(&farm, &uploader, "version=1", &probe);
    assert_eq!(status, 400, "{body}");

    // Stored by SHA-1 and SHA-256, with its kind.
    let (status, body) = upload(&farm, &uploader, "name=probe&version=1.0", &probe);
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["kind"], "step");
    assert_eq!(body["size"], probe.len());
    assert_eq!(body["sha1"].as_str().unwrap().len(), 40);
    let (status, body) = upload(&farm, &uploader, "name=probe&version=1.0", &probe);
    assert_eq!(status, 200, "the same bytes again: {body}");
    assert_eq!(body["created"], false);
    let counter = steps::fixtures::COUNT_OBSERVER;
    let (status, body) = upload(&farm, &uploader, "name=probe&version=1.0", counter);
    assert_eq!(status, 409, "{body}");
    let (status, body) = upload(&farm, &uploader, "name=counter", counter);
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["kind"], "observer");
    let counter_version = body["version"].as_str().unwrap().to_owned();
    assert_eq!(counter_version.len(), 12, "named by its SHA-256");

    // The builder uses it from its next build: no restart, no reload.
    let late = farm.force("force", json!({"parameters": {}}));
    let b = farm.finished_build(late, 0, Duration::from_secs(60));
    assert_eq!(b["results"], SUCCESS, "{b:#}{}", farm.logs());

    // Listed with where it is used; what is used cannot be deleted.
    let list = get(&farm, "/api/v2/stepmodules");
    assert_eq!(list["meta"]["total"], 2);
    let probe_item = &get(&farm, "/api/v2/stepmodules/probe/1.0");
    assert_eq!(probe_item["in_use"], true);
    assert!(
        probe_item["used_by"][0]
            .as_str()
            .unwrap()
            .starts_with("builder probe step"),
        "{probe_item:#}"
    );
    let (status, e) = error(&farm, "DELETE", "/api/v2/stepmodules/probe/1.0", "");
    assert_eq!(status, 409);
    assert!(e.contains("in use by builder probe"), "{e}");
    let (status, _) = farm.request(
        "DELETE",
        &format!("/api/v2/stepmodules/counter/{counter_version}"),
        &format!("Authorization: Bearer {uploader}\r\n"),
        "",
    );
    assert_eq!(status, 403, "deleting takes the admin role");
    let (status, body) = farm.api(
        "DELETE",
        &format!("/api/v2/stepmodules/counter/{counter_version}"),
        "",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(&farm, "/api/v2/stepmodules")["meta"]["total"], 1);
    assert_eq!(
        error(&farm, "GET", "/api/v2/stepmodules/counter", "").0,
        404
    );
}

/// The bytes with every occurrence of `from` replaced by `to` (same length).
fn rename_import(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = bytes.to_vec();
    let mut i = 0;
    let mut found = false;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            found = true;
            i += from.len();
        } else {
            i += 1;
        }
    }
    assert!(found);
    out
}

/// Reads Server-Sent Events from a connection until `done` says so (or the time runs out);
/// returns (event, data) pairs.
fn read_events(
    farm: &Farm,
    query: &str,
    within: Duration,
    mut done: impl FnMut(&[(String, Value)]) -> bool,
    mut meanwhile: impl FnMut(),
) -> Vec<(String, Value)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", farm.port)).unwrap();
    write!(
        s,
        "GET /api/v2/events{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut reader = BufReader::new(s);
    let mut events = Vec::new();
    let mut name = String::new();
    let start = Instant::now();
    let mut primed = false;
    let mut headers_done = false;
    let mut line = String::new();
    while start.elapsed() < within && !done(&events) {
        // A timeout keeps what was read of a line; the next read goes on with it.
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) if line.ends_with('\n') => {
                let l = line.trim_end();
                // The blank line after the headers: the master has subscribed this stream.
                headers_done |= l.is_empty();
                if let Some(n) = l.strip_prefix("event:") {
                    name = n.trim().to_owned();
                } else if let Some(d) = l.strip_prefix("data:") {
                    events.push((name.clone(), serde_json::from_str(d.trim()).unwrap()));
                }
                line.clear();
            }
            Ok(_) => {}
            Err(_) if !primed && headers_done && line.is_empty() => {
                // The stream is open and quiet: act.
                primed = true;
                meanwhile();
            }
            Err(_) => {}
        }
    }
    events
}

#[test]
fn live_events_stream_builds_steps_requests_and_log_lines() {
    let mut farm = Farm::new(&format!("{}{}", workers(&["w1"], false), slow("2")));
    farm.start_master();
    farm.start_worker("w1", &[]);
    farm.wait_until("w1 to connect", Duration::from_secs(30), || {
        get(&farm, "/api/v2/workers/w1")["connected"] == true
    });
    // Builds, steps and requests.
    let events = read_events(
        &farm,
        "",
        Duration::from_secs(60),
        |e| e.iter().any(|(k, d)| k == "build" && d["complete"] == true),
        || {
            farm.force("force", json!({"parameters": {}}));
        },
    );
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert!(kinds.contains(&"request"), "{events:?}");
    assert!(kinds.contains(&"step"), "{events:?}");
    let started = events
        .iter()
        .find(|(k, d)| k == "build" && d["complete"] == false)
        .expect("a build started event");
    assert_eq!(started.1["builder"], "slow");
    let step_done = events
        .iter()
        .find(|(k, d)| k == "step" && d["results"] == SUCCESS);
    assert!(step_done.is_some(), "{events:?}");

    // Log lines of a running build, as they come.
    let request = farm.force("force", json!({"parameters": {}}));
    let mut log = None;
    farm.wait_until("the step's log", Duration::from_secs(30), || {
        let Some(b) = farm.builds_of(request).first().cloned() else {
            return false;
        };
        let build = farm.build(b["buildid"].as_i64().unwrap());
        log = build["steps"][0]["logs"][0]["logid"].as_i64();
        log.is_some()
    });
    let log = log.unwrap();
    let events = read_events(
        &farm,
        &format!("?logs={log}&kinds=log"),
        Duration::from_secs(30),
        |e| {
            e.iter().any(|(_, d)| {
                d["lines"]
                    .as_array()
                    .is_some_and(|l| l.contains(&json!(["o", "finished"])))
            })
        },
        || {},
    );
    assert!(
        events.iter().all(|(k, d)| k == "log" && d["logid"] == log),
        "{events:?}"
    );
    let finished = events
        .iter()
        .find(|(_, d)| {
            d["lines"]
                .as_array()
                .unwrap()
                .contains(&json!(["o", "finished"]))
        })
        .unwrap();
    assert!(finished.1["offset"].as_i64().unwrap() >= 1, "{events:?}");
    let (status, e) = error(&farm, "GET", "/api/v2/events?kinds=weather", "");
    assert_eq!(status, 400);
    assert!(e.contains("build, step, request, worker, log"), "{e}");
}
