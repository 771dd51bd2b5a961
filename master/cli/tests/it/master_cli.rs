//! `kiln master`, `kiln checkconfig`, `kiln sendchange` and `kiln force` as a user runs them:
//! real processes, the default SQLite database next to the configuration, signals. (The API
//! client commands against a farm with workers are in `cli_api.rs`.)

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_db::{self as db, Db};

const CONFIG: &str = r#"
[master]
name = "cli"
heartbeat = "1s"
# This test drives the API without a token.
anonymous = "admin"
# Tests run side by side: let the system pick a free port.
listen = "127.0.0.1:0"

[[workers]]
name = "w1"
token = "t"

[[builders]]
name = "linux"
[[builders.steps]]
module = "shell"
args = { command = ["true"] }

[[schedulers]]
name = "main"
type = "single-branch"
branch = "main"
builders = ["linux"]

[[schedulers]]
name = "force"
type = "force"
builders = ["linux"]
parameters = [{ name = "version", type = "string", required = true }]
"#;

fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env_remove("KILN_CONFIG")
        .env_remove("KILN_DATABASE_URL")
        .env_remove("KILN_MASTER")
        .env_remove("KILN_TOKEN")
        .env("XDG_CONFIG_HOME", dir.join("no-client-config"))
        .output()
        .unwrap()
}

/// Takes a master's stderr: its address, from the first line ("... API on http://ADDR/api/v2
/// ..."), and the rest as it is written.
fn master_stderr(
    child: &mut std::process::Child,
) -> (String, std::sync::Arc<std::sync::Mutex<String>>) {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first
        .split("API on http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("{first}"))
        .to_string();
    let rest = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = rest.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    (addr, rest)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn buildsets(db: &Db, scheduler: &str) -> usize {
    let mut c = db.pool().acquire().await.unwrap();
    db::buildsets_of(&mut c, scheduler).await.unwrap().len()
}

async fn wait_for(db: &Db, scheduler: &str, n: usize) {
    let start = Instant::now();
    while buildsets(db, scheduler).await < n {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no buildset from {scheduler}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[test]
fn checkconfig_reports_ok_or_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kiln.toml"), CONFIG).unwrap();
    let ok = kiln(dir.path(), &["checkconfig"]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    assert!(
        text(&ok.stdout).starts_with("kiln.toml: OK (1 worker, 1 builder"),
        "{}",
        text(&ok.stdout)
    );
    std::fs::write(
        dir.path().join("bad.toml"),
        CONFIG.replace(
            "builders = [\"linux\"]\n\n[[schedulers]]",
            "builders = [\"lnux\"]\n\n[[schedulers]]",
        ),
    )
    .unwrap();
    let bad = kiln(dir.path(), &["checkconfig", "--config", "bad.toml"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr)
            .contains("bad.toml: schedulers.\"main\".builders: names builder \"lnux\""),
        "{}",
        text(&bad.stderr)
    );
    let missing = kiln(dir.path(), &["checkconfig", "--config", "nope.toml"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        text(&missing.stderr).contains("nope.toml"),
        "{}",
        text(&missing.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_builds_changes_and_forces_and_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["master", "--poll", "0.05"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, master_log) = master_stderr(&mut child);
    let master = format!("http://{addr}");
    // The default database: kiln.sqlite next to the configuration.
    let db_path = dir.path().join("kiln.sqlite");
    let start = Instant::now();
    while !db_path.exists() {
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let db = Db::open(&format!("sqlite://{}?mode=rwc", db_path.display()))
        .await
        .unwrap();
    // Wait for the scheduler to start reading changes.
    let start = Instant::now();
    loop {
        let mut c = db.pool().acquire().await.unwrap();
        if db::get_state(&mut c, "main", "last_change")
            .await
            .unwrap()
            .is_some()
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let sent = kiln(
        dir.path(),
        &[
            "sendchange",
            "--master",
            &master,
            "--who",
            "Ada <ada@x.org>",
            "--branch",
            "main",
            "--revision",
            "abc123",
            "--property",
            "ticket=42",
            "-m",
            "fix it",
            "src/lib.rs",
        ],
    );
    assert_eq!(sent.status.code(), Some(0), "{}", text(&sent.stderr));
    assert_eq!(text(&sent.stdout), "change 1 recorded\n");
    wait_for(&db, "main", 1).await;

    // A builder, through the force scheduler that has it; no worker, so it stays queued.
    let forced = kiln(
        dir.path(),
        &[
            "force",
            "linux",
            "--master",
            &master,
            "--prop",
            "version=1.2",
            "--reason",
            "try it",
        ],
    );
    assert_eq!(forced.status.code(), Some(0), "{}", text(&forced.stderr));
    let out = text(&forced.stdout);
    assert!(out.starts_with("request "), "{out}");
    assert!(
        out.ends_with(&format!(
            " queued for linux (buildset 2): {master}/#/builds?builder=linux\n"
        )),
        "{out}"
    );
    // The older form, a force scheduler's name and --param, still forces all its builders.
    let forced = kiln(
        dir.path(),
        &[
            "force",
            "force",
            "--master",
            &master,
            "--param",
            "version=1.3",
        ],
    );
    assert_eq!(forced.status.code(), Some(0), "{}", text(&forced.stderr));
    assert!(
        text(&forced.stdout).contains(" queued for linux (buildset 3)"),
        "{}",
        text(&forced.stdout)
    );
    let refused = kiln(dir.path(), &["force", "linux", "--master", &master]);
    assert_eq!(refused.status.code(), Some(2));
    assert_eq!(
        text(&refused.stderr),
        "kiln: error: parameter \"version\" is required (400 Bad Request)\n"
    );
    let bad_change = kiln(
        dir.path(),
        &[
            "sendchange",
            "--master",
            &master,
            "--who",
            " ",
            "--branch",
            "main",
        ],
    );
    assert_eq!(bad_change.status.code(), Some(2));
    assert_eq!(
        text(&bad_change.stderr),
        "kiln: error: change refused: it has no author; give who made it (\"Name <email>\") (400 Bad Request)\n"
    );
    // Written into the database directly, the same change is refused the same way.
    let bad_change = kiln(
        dir.path(),
        &["sendchange", "--direct", "--who", " ", "--branch", "main"],
    );
    assert_eq!(bad_change.status.code(), Some(2));
    assert_eq!(
        text(&bad_change.stderr),
        "kiln: error: change refused: it has no author; give who made it (\"Name <email>\")\n"
    );

    // Reload with a new scheduler; it builds the next change on its branch.
    std::fs::write(
        &config,
        format!("{CONFIG}\n[[schedulers]]\nname = \"dev\"\ntype = \"single-branch\"\nbranch = \"dev\"\nbuilders = [\"linux\"]\n"),
    )
    .unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let start = Instant::now();
    loop {
        let mut c = db.pool().acquire().await.unwrap();
        if db::get_state(&mut c, "dev", "last_change")
            .await
            .unwrap()
            .is_some()
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the reload did not start \"dev\""
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = kiln(
        dir.path(),
        &[
            "sendchange",
            "--master",
            &master,
            "--who",
            "bob",
            "--branch",
            "dev",
        ],
    );
    assert_eq!(sent.status.code(), Some(0), "{}", text(&sent.stderr));
    wait_for(&db, "dev", 1).await;

    // A broken configuration is refused and the master goes on.
    std::fs::write(&config, "[[builders]]\nname = 1\n").unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the master died on a bad reload"
    );
    std::fs::write(&config, CONFIG).unwrap();
    // Written into the database directly: a running master picks it up on its next pass.
    let sent = kiln(
        dir.path(),
        &["sendchange", "--direct", "--who", "cy", "--branch", "main"],
    );
    assert_eq!(sent.status.code(), Some(0), "{}", text(&sent.stderr));
    wait_for(&db, "main", 2).await;

    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    // The reader thread has the rest once the pipe closes.
    let start = Instant::now();
    while !master_log.lock().unwrap().contains("NOT reloaded")
        && start.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stderr = master_log.lock().unwrap().clone();
    assert!(
        stderr.contains("kiln: configuration reloaded: schedulers +dev"),
        "{stderr}"
    );
    assert!(
        stderr.contains("kiln: configuration NOT reloaded; the old one stays:"),
        "{stderr}"
    );
    let mut c = db.pool().acquire().await.unwrap();
    let active: i64 = sqlx::query_scalar("SELECT active FROM masters WHERE name = 'cli'")
        .fetch_one(&mut *c)
        .await
        .unwrap();
    assert_eq!(active, 0, "a clean stop marks the master inactive");
}

/// One HTTP/1.1 request over a real socket; returns (status, JSON body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn the_api_forces_builds_records_changes_and_reloads() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    let with_listen = CONFIG.to_string();
    std::fs::write(&config, &with_listen).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["master"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first
        .split("API on http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("{first}"))
        .to_string();

    let (status, body) = http(
        &addr,
        "POST",
        "/api/v2/forceschedulers/force",
        r#"{"owner": "ada", "parameters": {"version": "2.0"}}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["buildrequests"][0]["builder"], "linux");
    let (status, body) = http(
        &addr,
        "POST",
        "/api/v2/forceschedulers/force",
        r#"{"parameters": {}}"#,
    );
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (400, "parameter \"version\" is required")
    );
    let (status, body) = http(&addr, "POST", "/api/v2/forceschedulers/nope", "{}");
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (404, "there is no force scheduler \"nope\" (defined: force)")
    );
    let (status, body) = http(&addr, "POST", "/api/v2/forceschedulers/force", "{not json");
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("the body is not a valid request: "),
        "{body}"
    );

    let (status, body) = http(
        &addr,
        "POST",
        "/api/v2/changes",
        r#"{"author": "ada", "branch": "main", "files": ["a.rs"]}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body["changeid"].as_i64().unwrap() >= 1);
    let (status, body) = http(&addr, "POST", "/api/v2/changes", r#"{"author": ""}"#);
    assert_eq!(status, 400);
    assert_eq!(
        body["error"],
        "change refused: it has no author; give who made it (\"Name <email>\")"
    );
    let (status, body) = http(&addr, "GET", "/api/v2/buildrequests?complete=false", "");
    assert_eq!(status, 200);
    assert!(body["meta"]["total"].as_u64().unwrap() >= 1, "{body}");

    // Reload through the API.
    std::fs::write(&config, format!("{with_listen}\n[[builders]]\nname = \"extra\"\n[[builders.steps]]\nmodule = \"shell\"\nargs = {{ command = [\"true\"] }}\n")).unwrap();
    let (status, body) = http(&addr, "POST", "/api/v2/control/reconfig", "");
    assert_eq!(status, 200, "{body}");
    assert!(
        body["changes"].as_str().unwrap().contains("extra"),
        "{body}"
    );
    std::fs::write(&config, "[[builders]]\nnome = 1\n").unwrap();
    let (status, body) = http(&addr, "POST", "/api/v2/control/reconfig", "");
    assert_eq!(status, 400);
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("the configuration was not reloaded; the old one stays: "),
        "{error}"
    );
    assert!(error.contains("nome"), "{error}");
    let (status, body) = http(&addr, "GET", "/api/v2/masters", "");
    assert_eq!(status, 200);
    assert_eq!(body["masters"][0]["name"], "cli");
    assert_eq!(body["masters"][0]["active"], true);

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_database_that_cannot_be_used_is_named_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kiln.toml"), CONFIG).unwrap();
    // A port nothing listens on: the error comes at once, with the reason.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://kiln:hunter2@127.0.0.1:{port}/kiln");
    let out = kiln(dir.path(), &["master", "--db", &url]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "kiln: error: cannot connect to the database at postgres://kiln:***@127.0.0.1:{port}/kiln: error communicating with database: Connection refused (os error 111)\n"
        ),
        "the password never shows"
    );
    let out = kiln(
        dir.path(),
        &[
            "sendchange",
            "--direct",
            "--who",
            "a",
            "--db",
            "mysql://db/kiln",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "kiln: error: database URL \"mysql://db/kiln\" is not supported: use a SQLite file (sqlite:///path/kiln.sqlite) or a PostgreSQL URL (postgres://user@host/dbname)\n"
    );
}
