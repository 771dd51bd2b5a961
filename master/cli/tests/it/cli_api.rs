//! The `kiln` command line as an API client, run as a real process against a real master and
//! worker: `force --wait` following builds live, `builds`, `status`, `workers`, `sendchange`,
//! `step upload|list|delete`, tokens from the environment and the client config file, TLS,
//! and what a user is told when the master refuses or cannot be reached.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::farm::Farm;
use crate::{stderr, stdout};

const FARM: &str = r#"
[[workers]]
name = "w1"
token = "t-w1"

[[builders]]
name = "ok"
workers = ["w1"]
grant = { programs = ["sh"] }
[[builders.steps]]
module = "shell"
name = "greet"
args = { command = ["sh", "-c", "echo hello; echo oops >&2; sleep 0.5; echo bye"] }
[[builders.steps]]
module = "shell"
name = "again"
args = { command = ["sh", "-c", "echo second step"] }

[[builders]]
name = "bad"
workers = ["w1"]
grant = { programs = ["sh"] }
[[builders.steps]]
module = "shell"
name = "fail"
args = { command = ["sh", "-c", "echo about to fail; exit 3"] }

[[schedulers]]
name = "force"
type = "force"
builders = ["ok", "bad"]
parameters = [{ name = "jobs", type = "int", default = 1 }]
"#;

/// Runs `kiln` against the farm's master (`KILN_MASTER`), with `token` in `KILN_TOKEN` if
/// given and a client config directory of the farm's own (empty unless a test writes it).
fn kiln(farm: &Farm, args: &[&str], token: Option<&str>) -> Output {
    kiln_with(farm, args, |c| {
        if let Some(t) = token {
            c.env("KILN_TOKEN", t);
        }
    })
}

fn kiln_with(farm: &Farm, args: &[&str], setup: impl FnOnce(&mut Command)) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(args)
        .current_dir(farm.path())
        .env("KILN_MASTER", farm.url())
        .env("XDG_CONFIG_HOME", farm.path().join("config"))
        .env_remove("KILN_TOKEN")
        .env_remove("KILN_CA_CERT")
        .env_remove("KILN_CONFIG");
    setup(&mut c);
    c.output().unwrap()
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

#[test]
fn force_wait_follows_builds_live_and_the_farm_is_listed() {
    let mut farm = Farm::new(FARM);
    farm.start_master();
    farm.start_worker("w1", &[]);
    let force = farm.make_token("ci", "force");
    let reader = farm.make_token("viewer", "read");

    // Forcing needs a token: the advice says where the CLI looks and how to make one.
    let out = kiln(&farm, &["force", "ok"], None);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with("kiln: error: forcing a build needs an API token with the force role"),
        "{err}"
    );
    assert!(err.contains("(401 Unauthorized)\n"), "{err}");
    assert!(
        err.contains("kiln: this needs an API token: set KILN_TOKEN, give --token-file FILE, or put `token = \"kiln_...\"` in "),
        "{err}"
    );
    assert!(err.contains("kiln token create NAME --role ROLE"), "{err}");
    // A read-only token is refused for what it lacks.
    let out = kiln(&farm, &["force", "ok"], Some(&reader));
    assert_eq!(code(&out), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("forcing a build needs the force role; token \"viewer\" has the read role (403 Forbidden)"),
        "{err}"
    );
    assert!(
        err.contains("the token from KILN_TOKEN lacks that role"),
        "{err}"
    );
    // A worker's password in KILN_TOKEN is not sent; the user is told why.
    let out = kiln(&farm, &["force", "ok"], Some("t-w1"));
    assert_eq!(code(&out), Some(2));
    let err = stderr(&out);
    assert!(
        err.starts_with("kiln: warning: KILN_TOKEN is not an API token"),
        "{err}"
    );
    assert!(err.contains("(401 Unauthorized)"), "{err}");
    // A builder no force scheduler has: the ones that can be forced.
    let out = kiln(&farm, &["force", "nope"], Some(&force));
    assert_eq!(code(&out), Some(2));
    assert_eq!(
        stderr(&out),
        "kiln: error: no force scheduler builds \"nope\"; the builders one can force are: bad, ok\n"
    );

    // A succeeding build, followed live: banners, both channels, the table; exit 0.
    let out = kiln(
        &farm,
        &[
            "force", "ok", "--wait", "--prop", "jobs=4", "--reason", "cli",
        ],
        Some(&force),
    );
    let text = stdout(&out);
    assert_eq!(code(&out), Some(0), "{text}{}{}", stderr(&out), farm.logs());
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("request ") && lines[0].contains(" queued for ok (buildset "),
        "{text}"
    );
    let build = lines
        .iter()
        .find(|l| l.starts_with("==> build ok #1 on w1: "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        build.contains(&format!("{}/#/builds/", farm.url())),
        "{text}"
    );
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| *l == needle)
            .unwrap_or_else(|| panic!("no line {needle:?} in:\n{text}"))
    };
    assert!(at("==> step 1: greet") < at("[out] hello"), "{text}");
    assert!(at("[out] hello") < at("[out] bye"), "{text}");
    assert!(at("[err] oops") > at("==> step 1: greet"), "{text}");
    assert!(at("[out] bye") < at("==> step 2: again"), "{text}");
    assert!(at("==> step 2: again") < at("[out] second step"), "{text}");
    assert_eq!(
        text.matches("[out] hello\n").count(),
        1,
        "each line printed once: {text}"
    );
    assert!(
        text.contains("\nSTEP   RESULT   ELAPSED  SUMMARY\ngreet  SUCCESS  "),
        "{text}"
    );
    assert!(text.contains("\nresult:     SUCCESS\n"), "{text}");
    // The live event stream carried it: no fallback to polling was needed.
    assert!(!stderr(&out).contains("event stream"), "{}", stderr(&out));
    // The typed parameter reached the build.
    let (_, builds) = farm.api("GET", "/api/v2/builds?builder=ok", "");
    let id = builds["builds"][0]["buildid"].as_i64().unwrap();
    assert_eq!(farm.build(id)["properties"]["jobs"][0], 4);

    // A failing build: its log, the FAILURE, exit 1.
    let out = kiln(&farm, &["force", "bad", "--wait"], Some(&force));
    let text = stdout(&out);
    assert_eq!(code(&out), Some(1), "{text}{}", stderr(&out));
    assert!(text.contains("==> step 1: fail\n"), "{text}");
    assert!(text.contains("[out] about to fail\n"), "{text}");
    assert!(text.contains("\nresult:     FAILURE\n"), "{text}");
    // A bad parameter is the master's to refuse, with its reason: exit 2.
    let out = kiln(&farm, &["force", "ok", "--prop", "jobs=many"], Some(&force));
    assert_eq!(code(&out), Some(2));
    assert_eq!(
        stderr(&out),
        "kiln: error: parameter \"jobs\": \"many\" is not an integer (400 Bad Request)\n"
    );

    // kiln builds: newest first, filtered, as JSON; a bad limit is the master's refusal.
    let out = kiln(&farm, &["builds"], None);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let rows: Vec<&str> = text.lines().collect();
    assert!(
        rows[0].starts_with("BUILD  BUILDER  NUMBER  WORKER  STARTED"),
        "{text}"
    );
    assert_eq!(rows.len(), 3, "{text}");
    assert!(
        rows[1].contains(" bad ") && rows[1].ends_with(" FAILURE"),
        "{text}"
    );
    assert!(
        rows[2].contains(" ok ") && rows[2].ends_with(" SUCCESS"),
        "{text}"
    );
    let out = kiln(&farm, &["builds", "--builder", "ok", "--json"], None);
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1, "{json}");
    assert_eq!(json[0]["builder"], "ok");
    let out = kiln(&farm, &["builds", "--limit", "0"], None);
    assert_eq!(code(&out), Some(2));
    assert_eq!(
        stderr(&out),
        "kiln: error: listing builds: limit=0: give 1 to 10000 (400 Bad Request)\n"
    );
    let out = kiln(&farm, &["builds", "--builder", "nope"], None);
    assert_eq!(code(&out), Some(2));
    assert_eq!(
        stderr(&out),
        "kiln: error: no builder \"nope\" (404 Not Found)\n"
    );

    // kiln status: who the caller is, the queue, builders with their last build, workers.
    let out = kiln(&farm, &["status"], Some(&force));
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!(
            "master   {} (token \"ci\", force role)\nqueue    0 requests waiting\nworkers  1 of 1 connected\n",
            farm.url()
        )),
        "{text}"
    );
    assert!(
        text.contains("\nBUILDER  STATE  PENDING  RUNNING  LAST BUILD\n"),
        "{text}"
    );
    assert!(
        text.contains("\nbad      idle   0        0        #1 FAILURE, "),
        "{text}"
    );
    assert!(
        text.contains("\nok       idle   0        0        #1 SUCCESS, "),
        "{text}"
    );
    assert!(text.contains("\nw1      idle   plain "), "{text}");

    // kiln workers, as a table and as JSON.
    let out = kiln(&farm, &["workers"], None);
    let text = stdout(&out);
    assert!(text.starts_with("WORKER  STATE  MODE   PLATFORM"), "{text}");
    assert!(text.contains("\nw1      idle   plain  "), "{text}");
    assert!(text.contains(" ok"), "health: {text}");
    let out = kiln(&farm, &["workers", "--json"], None);
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json[0]["name"], "w1");
    assert_eq!(json[0]["connected"], true);

    // With the worker gone, a forced build waits; without --wait the request is printed.
    farm.kill_worker("w1");
    farm.wait_until("the worker to be gone", Duration::from_secs(20), || {
        farm.api("GET", "/api/v2/workers/w1", "").1["connected"] == false
    });
    let out = kiln(&farm, &["force", "ok"], Some(&force));
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).ends_with(&format!(
            " queued for ok (buildset 3): {}/#/builds?builder=ok\n",
            farm.url()
        )),
        "{}",
        stdout(&out)
    );
    let out = kiln(&farm, &["status"], None);
    let text = stdout(&out);
    assert!(
        text.contains("queue    1 request waiting\nworkers  0 of 1 connected\n"),
        "{text}"
    );
    assert!(text.contains("\nok       waiting  1 "), "{text}");
    assert!(text.contains("\nw1      offline  "), "{text}");
}

#[test]
fn modules_are_uploaded_listed_and_deleted_and_changes_sent() {
    let mut farm = Farm::new(FARM);
    farm.start_master();
    let uploader = farm.make_token("publisher", "upload");
    let admin = farm.token.clone().unwrap();

    // A real component: its kind and digests, as the master answers.
    let probe = steps::guest_path("probe-step").unwrap();
    let bytes = std::fs::read(probe).unwrap();
    let out = kiln(
        &farm,
        &[
            "step",
            "upload",
            probe,
            "--name",
            "probe",
            "--version",
            "1.0",
        ],
        Some(&uploader),
    );
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("uploaded probe@1.0: a step component\nkind:     step\nsha1:     "),
        "{text}"
    );
    use sha2::Digest;
    let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
    assert!(text.contains(&format!("\nsha256:   {sha256}\n")), "{text}");
    assert!(
        text.contains(&format!(" ({} bytes)\n", bytes.len())),
        "{text}"
    );
    assert!(
        text.ends_with("use it:   module = \"probe@1.0\" in a [[builders.steps]] entry\n"),
        "{text}"
    );
    // Again: nothing changes.
    let out = kiln(
        &farm,
        &[
            "step",
            "upload",
            probe,
            "--name",
            "probe",
            "--version",
            "1.0",
        ],
        Some(&uploader),
    );
    assert!(
        stdout(&out).starts_with("probe@1.0 was uploaded before with the same content"),
        "{}",
        stdout(&out)
    );
    // Junk: the master's refusal, exit 2.
    std::fs::write(farm.path().join("junk.wasm"), b"this is no component").unwrap();
    let out = kiln(
        &farm,
        &["step", "upload", "junk.wasm", "--name", "junk"],
        Some(&uploader),
    );
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with("kiln: error: the master refused junk.wasm: "),
        "{err}"
    );
    assert!(err.ends_with(" (400 Bad Request)\n"), "{err}");
    assert!(err.contains("junk"), "{err}");
    // A file that is not there is Kiln's to say.
    let out = kiln(
        &farm,
        &["step", "upload", "gone.wasm", "--name", "x"],
        Some(&uploader),
    );
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).starts_with("kiln: error: gone.wasm: cannot read it: "),
        "{}",
        stderr(&out)
    );

    // Listing: the built-ins, then (asked for) what the master holds.
    let out = kiln(&farm, &["step", "list", "--remote"], None);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("\nshell "), "{text}");
    assert!(
        text.contains(&format!(
            "\nuploaded to {}:\nNAME   VERSION  KIND  SIZE",
            farm.url()
        )),
        "{text}"
    );
    assert!(text.contains("\nprobe  1.0      step  "), "{text}");
    assert!(text.contains(&sha256[..12]), "{text}");

    // Deleting needs the admin role.
    let out = kiln(&farm, &["step", "delete", "probe", "1.0"], Some(&uploader));
    assert_eq!(code(&out), Some(2));
    assert!(stderr(&out).contains("(403 Forbidden)"), "{}", stderr(&out));
    let out = kiln(&farm, &["step", "delete", "probe", "1.0"], Some(&admin));
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "deleted probe@1.0\n");
    let out = kiln(&farm, &["step", "delete", "probe", "1.0"], Some(&admin));
    assert_eq!(code(&out), Some(2));
    assert_eq!(
        stderr(&out),
        "kiln: error: no module probe@1.0 has been uploaded (404 Not Found)\n"
    );

    // The client config file names the master and holds the token; then `step list`
    // includes the master's modules unasked.
    let config = farm.path().join("config/kiln");
    std::fs::create_dir_all(&config).unwrap();
    let file = config.join("client.toml");
    std::fs::write(
        &file,
        format!("master = \"{}\"\ntoken = \"{uploader}\"\n", farm.url()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let from_file = |args: &[&str]| {
        kiln_with(&farm, args, |c| {
            c.env_remove("KILN_MASTER");
        })
    };
    let out = from_file(&["step", "list"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("\nno modules uploaded to {}\n", farm.url())),
        "{}",
        stdout(&out)
    );
    assert_eq!(stderr(&out), "");
    let out = from_file(&["status"]);
    assert!(
        stdout(&out).contains("(token \"publisher\", upload role)"),
        "{}",
        stdout(&out)
    );
    // A readable token file is pointed out.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = from_file(&["workers"]);
    assert_eq!(code(&out), Some(0));
    assert!(
        stderr(&out).contains("holds an API token and other users can read it; chmod 600 it"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&file, "master = \"x\"\ntokn = \"y\"\n").unwrap();
    let out = from_file(&["workers"]);
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).contains("client.toml: unknown field `tokn`"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_file(&file).unwrap();

    // sendchange goes through the API: a token is needed, and the change is the master's.
    let send = [
        "sendchange",
        "--who",
        "Ada <ada@x.org>",
        "--branch",
        "main",
        "-m",
        "fix it",
        "--property",
        "ticket=42",
        "src/lib.rs",
    ];
    let out = kiln(&farm, &send, None);
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).starts_with("kiln: error: sending a change needs an API token"),
        "{}",
        stderr(&out)
    );
    let out = kiln(&farm, &send, Some(&admin));
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "change 1 recorded\n");
    let (_, change) = farm.api("GET", "/api/v2/changes/1", "");
    assert_eq!(change["author"], "Ada <ada@x.org>");
    assert_eq!(change["comments"], "fix it");
    assert_eq!(change["source"], "sendchange");
    assert_eq!(change["files"], serde_json::json!(["src/lib.rs"]));
    // --token-file: a file holding the token.
    std::fs::write(farm.path().join("token"), format!("{admin}\n")).unwrap();
    let out = kiln(
        &farm,
        &["sendchange", "--who", "bob", "--token-file", "token"],
        None,
    );
    assert_eq!(stdout(&out), "change 2 recorded\n", "{}", stderr(&out));
    // --direct writes into the farm's database, as before the API.
    let out = kiln(&farm, &["sendchange", "--direct", "--who", "cy"], None);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "change 3 recorded\n");

    // A master that is not there: which URL, and that it may not be running; exit 1.
    farm.kill_master();
    let out = kiln(&farm, &["status"], None);
    assert_eq!(code(&out), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "kiln: error: cannot reach the master at {}: ",
            farm.url()
        )),
        "{err}"
    );
    assert!(err.contains("is the master running there?"), "{err}");
}

#[test]
fn a_tls_master_is_reached_with_its_ca() {
    let mut farm = Farm::with_tls(FARM);
    farm.start_master();
    let ca = farm.path().join("ca.pem");
    let out = kiln(&farm, &["workers"], None);
    assert_eq!(code(&out), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("not signed by an authority this client trusts: give --ca-cert"),
        "{err}"
    );
    let out = kiln(&farm, &["workers", "--ca-cert", ca.to_str().unwrap()], None);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("\nw1 "), "{}", stdout(&out));
    // KILN_CA_CERT, as the worker takes it.
    let out = kiln_with(&farm, &["workers"], |c| {
        c.env("KILN_CA_CERT", &ca);
    });
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let out = kiln(&farm, &["workers", "--ca-cert", "kiln.toml"], None);
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).contains("--ca-cert kiln.toml: no certificate found"),
        "{}",
        stderr(&out)
    );
}
