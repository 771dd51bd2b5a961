//! `kiln try` from a real local clone against a real master and worker: the uncommitted (and
//! unpushed) changes of the checkout are built as a patch on the revision it is based on, so
//! a test that fails on the upstream passes with the patch; what a try may not do is refused
//! with a message.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::farm::{Farm, workers};
use crate::git_step::git;

fn config(upstream: &Path) -> String {
    format!(
        r#"{workers}
[[builders]]
name = "check"
grant = {{ programs = ["git", "sh"] }}
[[builders.steps]]
module = "git"
args = {{ repourl = "{repo}", mode = "full", method = "clobber" }}
halt_on_failure = true
[[builders.steps]]
module = "shell"
name = "test"
args = {{ command = ["sh", "test.sh"] }}

[[builders]]
name = "check2"
grant = {{ programs = ["git", "sh"] }}
[[builders.steps]]
module = "git"
args = {{ repourl = "{repo}" }}
[[builders.steps]]
module = "shell"
name = "test"
args = {{ command = ["sh", "test.sh"] }}

[[builders]]
name = "other"
grant = {{ programs = ["sh"] }}
[[builders.steps]]
module = "shell"
args = {{ command = ["true"] }}

[[schedulers]]
name = "try"
type = "try"
builders = ["check", "check2"]
users = ["dev"]

[[schedulers]]
name = "try-other"
type = "try"
builders = ["other"]
"#,
        workers = workers(&["w1"], false),
        repo = upstream.display()
    )
}

/// `kiln try ARGS` in `dir` against the farm, as token `token`.
fn kiln_try(farm: &Farm, dir: &Path, token: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("try")
        .args(args)
        .current_dir(dir)
        .env("KILN_MASTER", farm.url())
        .env("KILN_TOKEN", token)
        .env("XDG_CONFIG_HOME", farm.path().join("config"))
        .env_remove("KILN_CONFIG")
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The try buildset the command printed.
fn buildset(o: &Output) -> i64 {
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("try buildset "))
        .unwrap_or_else(|| panic!("{}", out(o)));
    line["try buildset ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_try_builds_the_local_changes_on_their_base_and_the_failing_test_passes() {
    let root = tempfile::tempdir().unwrap();
    let upstream = root.path().join("upstream");
    std::fs::create_dir(&upstream).unwrap();
    git(&upstream, &["init", "-q"]);
    std::fs::write(upstream.join("value.txt"), "broken\n").unwrap();
    std::fs::write(
        upstream.join("test.sh"),
        "grep -qx fixed value.txt || { echo 'value.txt is not fixed'; exit 1; }\n\
         if [ -f check.sh ]; then sh check.sh; fi\n",
    )
    .unwrap();
    git(&upstream, &["add", "."]);
    git(&upstream, &["commit", "-qm", "a failing test"]);
    let base = git(&upstream, &["rev-parse", "HEAD"]);

    let mut farm = Farm::new(&config(&upstream));
    farm.start_master();
    farm.start_worker("w1", &[]);
    let dev = farm.make_token("dev", "force");

    let local = root.path().join("local");
    git(
        root.path(),
        &["clone", "-q", upstream.to_str().unwrap(), "local"],
    );

    // Nothing changed yet: nothing to try.
    let o = kiln_try(&farm, &local, &dev, &["-b", "check"]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(
        out(&o).contains("nothing to try: the working tree does not differ from"),
        "{}",
        out(&o)
    );

    // An unpushed commit, a staged change and untracked files (one binary, one text in
    // Latin-1, which makes the whole patch git binary patches): without --untracked they are
    // missing and the check fails; upstream moves on meanwhile (the base stays).
    std::fs::write(local.join("value.txt"), "fixed\n").unwrap();
    git(&local, &["commit", "-qam", "fix the value"]);
    std::fs::write(
        local.join("check.sh"),
        "test -f notes.md && grep -q caf latin1.txt && od -An -tx1 data.bin | grep -q '00 ff 0d'\n",
    )
    .unwrap();
    git(&local, &["add", "check.sh"]);
    std::fs::write(local.join("notes.md"), "# notes\n").unwrap();
    std::fs::write(local.join("latin1.txt"), b"caf\xe9\n").unwrap();
    std::fs::write(local.join("data.bin"), [0u8, 0xff, 0x0d, 0x0a, 0]).unwrap();
    std::fs::write(upstream.join("later.txt"), "later\n").unwrap();
    git(&upstream, &["add", "later.txt"]);
    git(&upstream, &["commit", "-qm", "later upstream"]);
    let status_before = git(&local, &["status", "--porcelain"]);

    let dry = kiln_try(&farm, &local, &dev, &["--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", out(&dry));
    let text = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(
        text.starts_with(&format!("base:       {base}\nbranch:     main\n")),
        "{text}"
    );
    assert!(
        text.contains("+fixed\n")
            && text.contains("+test -f notes.md")
            && !text.contains("b/data.bin"),
        "{text}"
    );
    let dry = kiln_try(&farm, &local, &dev, &["--dry-run", "--untracked"]);
    let text = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(text.contains("GIT binary patch"), "{text}");
    assert!(
        text.contains("b/latin1.txt") && text.contains("b/data.bin"),
        "{text}"
    );

    let o = kiln_try(
        &farm,
        &local,
        &dev,
        &["--wait", "-b", "check", "-m", "half of it"],
    );
    assert_eq!(o.status.code(), Some(1), "{}{}", out(&o), farm.logs());
    assert!(out(&o).contains("[hdr] applied the patch"), "{}", out(&o));

    let o = kiln_try(
        &farm,
        &local,
        &dev,
        &[
            "--wait",
            "--untracked",
            "--builder",
            "check",
            "--builder",
            "check2",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}{}", out(&o), farm.logs());
    // Both builds were followed, one after the other.
    let text = out(&o);
    let (one, two) = (
        text.find("== check (request "),
        text.find("== check2 (request "),
    );
    assert!(one.is_some() && one < two, "{text}");
    // The real index and the working tree are as they were.
    assert_eq!(git(&local, &["status", "--porcelain"]), status_before);

    // The buildset is the patch on the base, from the token's owner.
    let (code, bs) = farm.api("GET", &format!("/api/v2/buildsets/{}", buildset(&o)), "");
    assert_eq!(code, 200, "{bs}");
    let text = bs.to_string();
    assert!(text.contains(&base), "{bs:#}");
    assert_eq!(bs["scheduler"], "try", "{bs:#}");
    assert!(
        bs["reason"]
            .as_str()
            .unwrap()
            .starts_with("'try' job by user dev"),
        "{bs:#}"
    );
    let (_, builds) = farm.api(
        "GET",
        "/api/v2/builds?builder=check&order=-number&limit=1",
        "",
    );
    let build = farm.build(builds["builds"][0]["buildid"].as_i64().unwrap());
    assert_eq!(build["results"], "SUCCESS", "{build:#}");
    assert_eq!(build["properties"]["owner"][0], "dev", "{build:#}");
    assert_eq!(
        build["properties"]["revision"][0],
        base.as_str(),
        "{build:#}"
    );
}

#[test]
fn what_a_try_may_not_do_is_refused_with_the_reason() {
    let root = tempfile::tempdir().unwrap();
    let upstream = root.path().join("upstream");
    std::fs::create_dir(&upstream).unwrap();
    git(&upstream, &["init", "-q"]);
    std::fs::write(upstream.join("test.sh"), "true\n").unwrap();
    git(&upstream, &["add", "."]);
    git(&upstream, &["commit", "-qm", "one"]);
    let base = git(&upstream, &["rev-parse", "HEAD"]);
    let mut farm = Farm::new(&config(&upstream));
    farm.start_master();
    let dev = farm.make_token("dev", "force");
    let eve = farm.make_token("eve", "force");
    let reader = farm.make_token("reader", "read");
    let local = root.path().join("local");
    git(
        root.path(),
        &["clone", "-q", upstream.to_str().unwrap(), "local"],
    );
    std::fs::write(local.join("test.sh"), "false\n").unwrap();

    let refused = |token: &str, args: &[&str], code: i32, message: &str| {
        let o = kiln_try(&farm, &local, token, args);
        assert_eq!(o.status.code(), Some(code), "{}", out(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(message),
            "{}",
            out(&o)
        );
    };
    refused(
        &dev,
        &["--builder", "nope"],
        2,
        "no try scheduler builds nope; the builders one can try on are: check, check2, other",
    );
    refused(
        &dev,
        &[],
        2,
        "several try schedulers could take this (try, try-other); pick one with --scheduler NAME",
    );
    refused(
        &dev,
        &["--builder", "other"],
        2,
        "builder \"other\" has no git step to apply the patch to",
    );
    refused(
        &dev,
        &["--scheduler", "nope"],
        2,
        "there is no try scheduler \"nope\" (defined: try, try-other)",
    );
    refused(
        &eve,
        &["-b", "check"],
        2,
        "user \"eve\" may not send try builds to \"try\"",
    );
    refused(&reader, &["-b", "check"], 2, "needs the force role");
    refused(
        &dev,
        &["--baserev", "0000000000000000000000000000000000000000"],
        2,
        "--baserev 0000000000000000000000000000000000000000: no such commit in this checkout",
    );
    git(&local, &["checkout", "-q", "-b", "detached-from-upstream"]);
    refused(
        &dev,
        &["-b", "check"],
        2,
        "the current branch has no upstream to try against",
    );
    git(&local, &["checkout", "-q", "main"]);

    // The master checks the request itself.
    let bad = |body: Value, status: u16, message: &str| {
        let (code, answer) = farm.request(
            "POST",
            "/api/v2/tryschedulers/try",
            &format!("Authorization: Bearer {dev}\r\n"),
            &body.to_string(),
        );
        assert_eq!(code, status, "{answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(message),
            "{answer}"
        );
    };
    bad(
        json!({"baserev": "main", "patch": "x"}),
        400,
        "baserev \"main\" is not a full commit id",
    );
    bad(
        json!({"baserev": base, "patch": ""}),
        400,
        "the patch is empty",
    );
    bad(
        json!({"baserev": base, "patch": "x", "builders": ["other"]}),
        400,
        "builder \"other\" is not one of scheduler \"try\"'s builders (check, check2)",
    );
    bad(
        json!({"baserev": base, "patch": "x".repeat(3 << 20)}),
        400,
        "the patch is 3145728 bytes; the limit is 2 MiB",
    );
    bad(
        json!({"baserev": base, "patch": "x".repeat(5 << 20)}),
        413,
        "too large",
    );
    bad(
        json!({"baserev": base, "patch": "x", "extra": 1}),
        400,
        "unknown field `extra`",
    );
    let (code, answer) = farm.request(
        "POST",
        "/api/v2/tryschedulers/nope",
        &format!("Authorization: Bearer {dev}\r\n"),
        &json!({"baserev": base, "patch": "x"}).to_string(),
    );
    assert_eq!(code, 404, "{answer}");
    assert_eq!(
        answer["error"],
        "there is no try scheduler \"nope\" (defined: try, try-other)"
    );
}
