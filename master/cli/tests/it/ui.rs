//! The web UI in a real headless Chromium (Debian's `chromium`) against a real farm: every page
//! loads without an error and shows the farm, a build forced through the UI's form streams its
//! log in live, log content is shown as text and never runs, and the page is served with its
//! security and caching headers. A screenshot of each page is kept in `target/ui-screenshots/`
//! for review.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::farm::Farm;
use kiln_testkit::cdp::Browser;

/// The farm of every UI test: a worker w1 (w2 is configured but never connects), builders that
/// succeed, fail, take their time, print hostile text, and wait for w2, and a force scheduler
/// with a parameter of each type, and a reporter whose receiver is not there (port 1 of
/// 127.0.0.1, where nothing listens), so its deliveries fail and are retried. Anonymous users
/// may force (as in the demo); pausing workers needs an admin token.
const FARM: &str = r#"
[[workers]]
name = "w1"
token = "t-w1"
max_builds = 4

[[workers]]
name = "w2"
token = "t-w2"

[[builders]]
name = "app"
description = "builds and tests the app"
tags = ["linux", "fast"]
grant = { programs = ["sh"] }
[[builders.steps]]
module = "shell"
name = "compile"
args = { command = ["sh", "-c", "echo compiling; echo 'note: 2 files' >&2"] }
[[builders.steps]]
module = "shell"
name = "test"
args = { command = ["sh", "-c", "echo 3 passed"] }

[[builders]]
name = "broken"
tags = ["linux"]
grant = { programs = ["sh"] }
[[builders.steps]]
module = "shell"
name = "compile"
args = { command = ["sh", "-c", "echo 'main.c:3: error: expected ;' >&2; exit 1"] }

[[builders]]
name = "slow"
collapse = false
grant = { programs = ["sh"] }
[[builders.steps]]
module = "shell"
name = "ticks"
args = { command = ["sh", "-c", "echo tick 1; echo tick 2; until [ -e ../../go ]; do sleep 0.05; done; echo tick 3; until [ -e ../../end ]; do sleep 0.05; done; echo tick 4"] }

[[builders]]
name = "hostile"
grant = { programs = ["sh"] }
[[builders.steps]]
module = "shell"
name = "print"
args = { command = ["sh", "-c", '''echo '<img src=x onerror="window.__xss=1">'; echo '<script>window.__xss=2</script>' >&2; printf '\033[1;31mred bold\033[0m plain \033[42mgreen bg\033[0m\033[2K\n'; printf '\033]0;a title\007after osc \033[38;5;208morange\033[0m\n'; echo '&amp; &lt;b&gt;' '''] }

[[builders]]
name = "waiting"
workers = ["w2"]
grant = { programs = ["sh"] }
[[builders.steps]]
module = "shell"
name = "never"
args = { command = ["sh", "-c", "true"] }

[[schedulers]]
name = "force"
type = "force"
builders = ["app", "broken", "slow", "hostile", "waiting"]
parameters = [
    { name = "branch", label = "Branch", type = "string", default = "main", regex = "[a-z0-9_./<>-]+" },
    { name = "target", label = "Target", type = "string", regex = "[a-z]+" },
    { name = "jobs", label = "Parallel jobs", type = "int", default = 2 },
    { name = "clean", label = "Clean build", type = "bool" },
    { name = "flavour", label = "Flavour", type = "choice", choices = ["debug", "release"], default = "debug", required = true },
]

[[reporters]]
name = "hook-down"
type = "http"
url = "http://127.0.0.1:1/hook"
buildsets = true
"#;

/// A farm running the configuration above, anonymous users allowed to force, with w1.
fn farm() -> Farm {
    let mut farm = Farm::new(FARM);
    let config = farm.path().join("kiln.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("[master]\n", "[master]\nanonymous = \"force\"\n", 1),
    )
    .unwrap();
    farm.start_master();
    farm.start_worker("w1", &[]);
    farm
}

/// Forces `builder` through the API; the request's id.
fn force(farm: &Farm, builder: &str, reason: &str) -> i64 {
    farm.force(
        "force",
        json!({"builders": [builder], "reason": reason, "parameters": {"flavour": "debug"}}),
    )
}

/// A new admin token, made with `kiln token create` in the farm's directory.
fn admin_token(farm: &Farm) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["token", "create", "ui-test", "--role", "admin"])
        .current_dir(farm.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kiln token create: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .split_whitespace()
        .find(|w| w.starts_with("kiln_"))
        .unwrap_or_else(|| panic!("no token in {stdout}"))
        .to_owned()
}

/// `target/ui-screenshots/`, where the screenshots are kept for review.
fn screenshots() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"),
            PathBuf::from,
        )
        .join("ui-screenshots")
}

/// Saves a screenshot of the page and says where.
fn shoot(browser: &mut Browser, name: &str) {
    let path = screenshots().join(format!("{name}.png"));
    browser.screenshot(&path);
    println!("screenshot: {}", path.display());
}

/// Fails if the page reported an error (an exception, a console error, a failed load, a
/// Content-Security-Policy violation).
fn assert_no_errors(browser: &mut Browser, page: &str) {
    let errors = browser.take_errors();
    assert!(
        errors.is_empty(),
        "{page}: the page reported errors: {errors:#?}"
    );
}

/// Moves to a route of the app, as a click on a link does.
fn go(browser: &mut Browser, route: &str) {
    browser.eval(&format!("location.hash = {}", json!(route)));
}

/// A JavaScript string literal.
fn js(text: &str) -> String {
    json!(text).to_string()
}

/// The text of the elements matching `selector`, one string each.
fn texts(browser: &mut Browser, selector: &str) -> Vec<String> {
    let value = browser.eval(&format!(
        "[...document.querySelectorAll({})].map(e => e.textContent)",
        js(selector)
    ));
    serde_json::from_value(value).unwrap()
}

/// Clicks the first element matching `selector` whose text contains `text`.
fn click(browser: &mut Browser, selector: &str, text: &str) {
    let clicked = browser.eval(&format!(
        "(() => {{ const e = [...document.querySelectorAll({})].find(e => e.textContent.includes({})); if (!e) return false; e.click(); return true; }})()",
        js(selector),
        js(text)
    ));
    assert_eq!(clicked, true, "nothing to click: {selector} with {text:?}");
}

/// Waits until an element matching `selector` contains `text`.
fn wait_text(browser: &mut Browser, selector: &str, text: &str) {
    browser.wait_for(
        &format!("{selector} to show {text:?}"),
        &format!(
            "[...document.querySelectorAll({})].some(e => e.textContent.includes({}))",
            js(selector),
            js(text)
        ),
        Duration::from_secs(30),
    );
}

#[test]
fn every_page_loads_without_errors_and_shows_the_farm() {
    let farm = farm();
    let app = force(&farm, "app", "nightly check");
    let broken = force(&farm, "broken", "a change broke it");
    let app_build = farm.finished_build(app, 0, Duration::from_secs(60));
    farm.finished_build(broken, 0, Duration::from_secs(60));
    let app_id = app_build["buildid"].as_i64().unwrap();
    // A request no connected worker can take stays in the queue.
    let waiting = force(&farm, "waiting", "waits for w2");

    let mut browser = Browser::launch();
    browser.navigate(&format!("{}/#/builders", farm.url()));

    // Builders: each with its tags, state and last build.
    wait_text(&mut browser, "table.builders", "broken");
    wait_text(&mut browser, "table.builders tr", "1 pending");
    let rows = texts(&mut browser, "table.builders tbody tr");
    let row = |name: &str| {
        rows.iter()
            .find(|r| r.starts_with(name))
            .cloned()
            .unwrap_or_default()
    };
    assert!(row("app").contains("builds and tests the app"), "{rows:#?}");
    assert!(
        row("app").contains("linux") && row("app").contains("fast"),
        "{rows:#?}"
    );
    assert!(
        row("app").contains("#1") && row("app").contains("idle"),
        "{rows:#?}"
    );
    assert!(row("slow").contains("no builds yet"), "{rows:#?}");
    let last = browser.eval("[...document.querySelectorAll('table.builders tbody tr')].map(r => r.querySelector('.build-link .badge')?.className ?? '')");
    assert!(
        last.to_string().contains("r-success") && last.to_string().contains("r-failure"),
        "{last}"
    );
    assert_no_errors(&mut browser, "builders");
    shoot(&mut browser, "builders");

    // The grid: a box per build, in its result's colour.
    go(&mut browser, "#/grid");
    wait_text(&mut browser, "table.grid", "broken");
    let boxes =
        browser.eval("[...document.querySelectorAll('table.grid a.box')].map(b => b.className)");
    assert_eq!(boxes.as_array().unwrap().len(), 2, "{boxes}");
    assert!(boxes.to_string().contains("r-failure"), "{boxes}");
    assert_no_errors(&mut browser, "grid");
    shoot(&mut browser, "grid");

    // Builds, a page at a time, with the total.
    go(&mut browser, "#/builds");
    wait_text(&mut browser, "table.builds", "app #1");
    wait_text(&mut browser, "nav.pager", "1–2 of 2");
    // One builder's builds, from its link on the builders page.
    go(&mut browser, "#/builds?builder=broken");
    wait_text(&mut browser, "main h1", "Builds of broken");
    assert_eq!(
        texts(&mut browser, "table.builds tbody td:first-child"),
        ["#1"]
    );
    assert_no_errors(&mut browser, "builds");

    // A build: steps with results, summaries and durations, properties, logs.
    go(&mut browser, &format!("#/builds/{app_id}"));
    wait_text(&mut browser, "table.steps", "test");
    let steps = texts(&mut browser, "table.steps tr.step td.name");
    assert_eq!(steps, ["compile", "test"]);
    // Summaries as the API gives them.
    let summaries: Vec<&str> = app_build["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state_string"].as_str().unwrap())
        .collect();
    assert_eq!(texts(&mut browser, "table.steps td.summary"), summaries);
    assert_eq!(
        texts(&mut browser, "table.steps td .badge"),
        ["success", "success"]
    );
    assert!(texts(&mut browser, "h1").concat().contains("app #1"));
    wait_text(&mut browser, "table.properties", "flavour");
    wait_text(&mut browser, "dl.facts", "nightly check");
    // Resource figures show when the worker reported them.
    let figures = texts(&mut browser, "tr.step:first-child td.details .figure").concat();
    let step = &app_build["steps"][0];
    for (field, label) in [
        ("cpu_seconds", "CPU"),
        ("peak_rss_bytes", "RSS"),
        ("guest_memory_bytes", "guest"),
    ] {
        assert_eq!(
            figures.contains(label),
            !step[field].is_null(),
            "{field}: {figures} {step}"
        );
    }
    click(&mut browser, "button.log-toggle", "stdio");
    wait_text(&mut browser, ".log-lines .ch-o", "compiling");
    wait_text(&mut browser, ".log-lines .ch-e", "note: 2 files");
    assert_no_errors(&mut browser, "build");
    shoot(&mut browser, "build");
    // Rebuild: the page follows the new request to its build.
    click(&mut browser, ".heading button", "Rebuild");
    wait_text(&mut browser, "h1", "app #2");
    wait_text(&mut browser, "h1 .badge", "success");
    assert_no_errors(&mut browser, "rebuilt build");

    // The queue: the waiting request, with its estimates and a cancel button that works.
    go(&mut browser, "#/queue");
    wait_text(&mut browser, "table.queue", &format!("#{waiting}"));
    wait_text(&mut browser, "table.queue", "waits for w2");
    assert_no_errors(&mut browser, "queue");
    shoot(&mut browser, "queue");
    click(&mut browser, "table.queue button", "Cancel");
    wait_text(&mut browser, "main", "Nothing is waiting");
    assert_no_errors(&mut browser, "queue after cancelling");

    // Workers: w1 idle and healthy, w2 offline; pausing needs an admin token.
    go(&mut browser, "#/workers");
    wait_text(&mut browser, "table.workers", "w2");
    let rows = texts(&mut browser, "table.workers tbody tr");
    assert!(
        rows[0].starts_with("w1") && rows[0].contains("idle") && rows[0].contains("ok"),
        "{rows:#?}"
    );
    assert!(
        rows[1].starts_with("w2") && rows[1].contains("offline"),
        "{rows:#?}"
    );
    wait_text(&mut browser, "#role", "anonymous · force");
    click(&mut browser, "table.workers button", "Pause");
    wait_text(
        &mut browser,
        "table.workers .error",
        "needs an API token with the admin role",
    );
    let errors = browser.take_errors();
    assert!(
        errors.len() == 1 && errors[0].contains("401 (Unauthorized)"),
        "{errors:#?}"
    );
    let token = admin_token(&farm);
    browser.eval(&format!(
        "document.getElementById('token').value = {}; document.querySelector('#auth button[type=submit]').click()",
        js(&token)
    ));
    wait_text(&mut browser, "#role", "ui-test · admin");
    assert_eq!(
        browser.eval("localStorage.getItem('kiln.token')"),
        json!(token)
    );
    // The page loads again with the token: w1 has its button back.
    let w1 = "table.workers tbody tr:first-child";
    wait_text(&mut browser, &format!("{w1} button"), "Pause");
    click(&mut browser, &format!("{w1} button"), "Pause");
    wait_text(&mut browser, w1, "paused");
    let (_, workers) = farm.api("GET", "/api/v2/workers", "");
    assert_eq!(workers["workers"][0]["paused"], true, "{workers:#}");
    assert_eq!(workers["workers"][1]["paused"], false, "{workers:#}");
    shoot(&mut browser, "workers");
    click(&mut browser, &format!("{w1} button"), "Unpause");
    wait_text(&mut browser, w1, "idle");
    assert_no_errors(&mut browser, "workers");

    // The force form, made from the scheduler's parameters.
    go(&mut browser, "#/force");
    wait_text(&mut browser, "form.force", "Parallel jobs");
    let fields = browser.eval(
        "Object.fromEntries([...document.querySelectorAll('form.force [name]')].filter(e => e.name !== 'builder').map(e => [e.name, {tag: e.tagName, type: e.type, value: e.type === 'checkbox' ? e.checked : e.value, required: e.required, pattern: e.getAttribute('pattern')}]))",
    );
    // A regex the browser reads differently (here, unescaped `/` and `-` in a class, which
    // HTML's `v` mode refuses) is left to the master to check.
    assert_eq!(
        fields["branch"],
        json!({"tag": "INPUT", "type": "text", "value": "main", "required": false, "pattern": null})
    );
    assert_eq!(
        fields["target"],
        json!({"tag": "INPUT", "type": "text", "value": "", "required": false, "pattern": "[a-z]+"})
    );
    assert_eq!(
        fields["jobs"],
        json!({"tag": "INPUT", "type": "number", "value": "2", "required": false, "pattern": null})
    );
    assert_eq!(
        fields["clean"],
        json!({"tag": "INPUT", "type": "checkbox", "value": false, "required": false, "pattern": null})
    );
    assert_eq!(
        fields["flavour"],
        json!({"tag": "SELECT", "type": "select-one", "value": "debug", "required": true, "pattern": null})
    );
    assert_eq!(texts(&mut browser, "fieldset.builders label").len(), 5);
    assert_no_errors(&mut browser, "force");
    shoot(&mut browser, "force");

    // Step modules: one uploaded.
    go(&mut browser, "#/modules");
    wait_text(&mut browser, "main", "No modules have been uploaded");
    let wasm = std::fs::read(steps::guest_path("probe-step").unwrap()).unwrap();
    let (status, _, body) = request(
        &farm,
        "POST",
        "/api/v2/stepmodules?name=probe&version=1.0",
        &format!("Authorization: Bearer {token}\r\nContent-Type: application/wasm\r\n"),
        &wasm,
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    go(&mut browser, "#/builders");
    go(&mut browser, "#/modules");
    wait_text(&mut browser, "table.modules", "probe");
    let row = texts(&mut browser, "table.modules tbody tr").concat();
    assert!(
        row.contains("1.0") && row.contains("step") && row.contains("latest"),
        "{row}"
    );
    assert_no_errors(&mut browser, "modules");
    shoot(&mut browser, "modules");

    // Reporters: the one whose receiver is not there, its deliveries by state, and its
    // failures with the error, the attempts and the next retry.
    go(&mut browser, "#/reporters");
    wait_text(&mut browser, "table.reporters", "hook-down");
    let row = texts(&mut browser, "table.reporters tbody tr").concat();
    assert!(
        row.contains("http") && row.contains("all") && row.contains("buildsets"),
        "{row}"
    );
    wait_text(&mut browser, "table.failures", "retrying");
    wait_text(&mut browser, ".heading", "1 of 1 failing");
    let failures = texts(&mut browser, "table.failures tbody tr");
    let first = failures
        .iter()
        .find(|r| r.contains(&format!("build {app_id}")))
        .unwrap_or_else(|| panic!("no failure of build {app_id}: {failures:#?}"));
    assert!(
        first.starts_with("hook-down") && first.contains("build.finished"),
        "{first}"
    );
    let errors = texts(&mut browser, "table.failures td.delivery-error");
    assert!(
        errors
            .iter()
            .all(|e| e.starts_with("POST http://127.0.0.1:1/hook: ") && e.contains("refused")),
        "{errors:#?}"
    );
    // Each is retried: attempts counted, the next one due at a time shown.
    let next = browser.eval(
        "[...document.querySelectorAll('table.failures tbody tr.retrying')].map(r => [r.cells[4].textContent, r.cells[6].querySelector('time')?.dataset.at])",
    );
    let next = next.as_array().unwrap();
    assert!(!next.is_empty());
    for n in next {
        assert!(
            n[0].as_str().unwrap().parse::<u32>().unwrap() >= 1,
            "{next:?}"
        );
        assert!(
            n[1].as_str().is_some_and(|at| at.parse::<i64>().is_ok()),
            "{next:?}"
        );
    }
    // The links lead to the builds.
    let link = browser.eval(&format!(
        "document.querySelector('table.failures a[href=\"#/builds/{app_id}\"]') !== null"
    ));
    assert_eq!(link, true);
    let (_, api) = farm.api("GET", "/api/v2/reporters", "");
    assert!(
        api["reporters"][0]["deliveries"]["pending"]
            .as_i64()
            .unwrap()
            >= 1,
        "{api:#}"
    );
    assert_no_errors(&mut browser, "reporters");
    shoot(&mut browser, "reporters");

    // The builders again, with the live indicator on.
    go(&mut browser, "#/builders");
    wait_text(&mut browser, "#live", "live");
    assert_no_errors(&mut browser, "builders again");
}

#[test]
fn a_build_forced_through_the_form_streams_its_log_live() {
    let farm = farm();
    let mut browser = Browser::launch();
    browser.navigate(&format!("{}/#/force", farm.url()));
    wait_text(&mut browser, "form.force", "Parallel jobs");
    browser.eval(
        "(() => {
            for (const box of document.querySelectorAll('form.force input[name=builder]')) box.checked = box.value === 'slow';
            document.querySelector('form.force input[name=reason]').value = 'from the form';
            document.querySelector('form.force input[name=jobs]').value = '8';
            document.querySelector('form.force input[name=clean]').checked = true;
            document.querySelector('form.force select[name=flavour]').value = 'release';
            document.querySelector('form.force button[type=submit]').click();
        })()",
    );
    // The page follows the request to its build, and the log arrives line by line: the step
    // prints two lines, then waits for the test before each of the next two.
    browser.wait_for(
        "the build page",
        "/^#\\/builds\\/\\d+$/.test(location.hash)",
        Duration::from_secs(30),
    );
    wait_text(&mut browser, ".log-lines", "tick 2");
    assert_eq!(texts(&mut browser, "h1 .badge"), ["running"]);
    assert_eq!(texts(&mut browser, "tr.step .badge"), ["running"]);
    std::fs::write(farm.path().join("go"), "").unwrap();
    wait_text(&mut browser, ".log-lines", "tick 3");
    assert_eq!(texts(&mut browser, "h1 .badge"), ["running"]);
    wait_text(&mut browser, "section.log header", "· live");
    shoot(&mut browser, "build-live");
    std::fs::write(farm.path().join("end"), "").unwrap();
    wait_text(&mut browser, ".log-lines", "tick 4");
    wait_text(&mut browser, "h1 .badge", "success");
    wait_text(&mut browser, "tr.step .badge", "success");
    // Each line once, in order, whatever overlapped between the fetch and the events.
    let lines: Vec<String> = texts(&mut browser, ".log-lines .ch-o");
    assert_eq!(lines, ["tick 1", "tick 2", "tick 3", "tick 4"]);
    let id: i64 = browser
        .eval("Number(location.hash.split('/')[2])")
        .as_i64()
        .unwrap();
    let build = farm.build(id);
    assert_eq!(build["results"], "SUCCESS");
    assert_eq!(build["properties"]["jobs"][0], 8, "{build:#}");
    assert_eq!(build["properties"]["clean"][0], true, "{build:#}");
    assert_eq!(build["properties"]["flavour"][0], "release", "{build:#}");
    wait_text(&mut browser, "table.properties", "release");
    wait_text(&mut browser, "dl.facts", "from the form");
    assert_no_errors(&mut browser, "build");
    shoot(&mut browser, "build-done");
}

#[test]
fn log_content_is_shown_as_text_and_never_runs() {
    let farm = farm();
    let request = farm.force(
        "force",
        json!({
            "builders": ["hostile"],
            "reason": "<i onmouseover=alert(1)>reason</i>",
            "parameters": {"branch": "<b>main</b>", "flavour": "debug"},
        }),
    );
    let build = farm.finished_build(request, 0, Duration::from_secs(60));
    let mut browser = Browser::launch();
    browser.navigate(&format!("{}/#/builds/{}", farm.url(), build["buildid"]));
    wait_text(&mut browser, "table.steps", "print");
    click(&mut browser, "button.log-toggle", "stdio");
    wait_text(&mut browser, ".log-lines", "after osc");
    let lines = texts(&mut browser, ".log-lines .line");
    // The markup shows as it was printed, on the channel it was printed on.
    assert!(
        lines
            .iter()
            .any(|l| l == "<img src=x onerror=\"window.__xss=1\">"),
        "{lines:#?}"
    );
    assert_eq!(
        texts(&mut browser, ".log-lines .ch-e"),
        ["<script>window.__xss=2</script>"]
    );
    assert!(lines.iter().any(|l| l == "&amp; &lt;b&gt;"), "{lines:#?}");
    // Kiln's header line (the command, markup and all) is dimmed, and text too.
    let header = texts(&mut browser, ".log-lines .ch-h").concat();
    assert!(
        header.contains("$ sh -c") && header.contains("<img src=x"),
        "{header}"
    );
    // Nothing ran and no element came from the log, the properties or the reason.
    assert_eq!(browser.eval("window.__xss === undefined"), true);
    assert_eq!(
        browser.eval("document.querySelectorAll('main img, main script, main b, main i').length"),
        0
    );
    wait_text(&mut browser, "table.properties", "<b>main</b>");
    wait_text(
        &mut browser,
        "dl.facts",
        "<i onmouseover=alert(1)>reason</i>",
    );
    // ANSI colours became styled spans; every escape sequence is gone.
    assert_eq!(
        texts(&mut browser, ".log-lines span.a-bold.a-fg1"),
        ["red bold"]
    );
    assert_eq!(texts(&mut browser, ".log-lines span.a-bg2"), ["green bg"]);
    assert!(
        lines.iter().any(|l| l == "red bold plain green bg"),
        "{lines:#?}"
    );
    assert!(lines.iter().any(|l| l == "after osc orange"), "{lines:#?}");
    assert_eq!(
        browser.eval("[...document.querySelectorAll('.log-lines span')].find(s => s.textContent === 'orange')?.style.color"),
        "rgb(255, 135, 0)"
    );
    assert!(!lines.concat().contains('\u{1b}'), "{lines:#?}");
    // A URL from the master (a step's link, a change's revlink) is a link only if it is http(s)
    // or one of the UI's own routes.
    let urls = browser.eval(
        "import(document.querySelector('script[type=module]').src.replace('app.js', 'dom.js'))
            .then(m => ['javascript:alert(1)', ' JavaScript:alert(1)', 'data:text/html,<b>x</b>',
                        'https://ci.example/x?a=1', '#/builds/1'].map(m.safeUrl))",
    );
    assert_eq!(
        urls,
        json!(["#", "#", "#", "https://ci.example/x?a=1", "#/builds/1"])
    );
    assert_no_errors(&mut browser, "hostile build");
    shoot(&mut browser, "build-hostile");
}

#[test]
fn where_anonymous_users_may_not_read_a_pasted_token_opens_the_pages() {
    let mut farm = Farm::new(FARM);
    let config = farm.path().join("kiln.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("[master]\n", "[master]\nanonymous = \"none\"\n", 1),
    )
    .unwrap();
    farm.start_master();
    let mut browser = Browser::launch();
    browser.navigate(&format!("{}/#/builders", farm.url()));
    wait_text(&mut browser, "#role", "token needed");
    wait_text(&mut browser, "main .error", "HTTP 401");
    let token = admin_token(&farm);
    browser.eval(&format!(
        "document.getElementById('token').value = {}; document.querySelector('#auth button[type=submit]').click()",
        js(&token)
    ));
    wait_text(&mut browser, "#role", "ui-test · admin");
    wait_text(&mut browser, "table.builders", "hostile");
    // The event stream cannot carry the token; it carries a ticket the token bought.
    wait_text(&mut browser, "#live", "live");
    farm.start_worker("w1", &[]);
    let request = force(&farm, "slow", "streamed with a ticket");
    farm.wait_until("the build to start", Duration::from_secs(30), || {
        !farm.builds_of(request).is_empty()
    });
    let build = farm.builds_of(request)[0]["buildid"].as_i64().unwrap();
    go(&mut browser, &format!("#/builds/{build}"));
    wait_text(&mut browser, ".log-lines", "tick 2");
    std::fs::write(farm.path().join("go"), "").unwrap();
    wait_text(&mut browser, ".log-lines", "tick 3");
    wait_text(&mut browser, "section.log header", "· live");
    std::fs::write(farm.path().join("end"), "").unwrap();
    wait_text(&mut browser, ".log-lines", "tick 4");
    wait_text(&mut browser, "h1 .badge", "success");
    let lines: Vec<String> = texts(&mut browser, ".log-lines .ch-o");
    assert_eq!(lines, ["tick 1", "tick 2", "tick 3", "tick 4"]);
    // The next build of the builder is expected to end when the last one's steps say.
    std::fs::remove_file(farm.path().join("go")).unwrap();
    std::fs::remove_file(farm.path().join("end")).unwrap();
    let again = force(&farm, "slow", "estimated");
    farm.wait_until("the second build to start", Duration::from_secs(30), || {
        !farm.builds_of(again).is_empty()
    });
    let second = farm.builds_of(again)[0]["buildid"].as_i64().unwrap();
    go(&mut browser, &format!("#/builds/{second}"));
    wait_text(&mut browser, ".log-lines", "tick 2");
    wait_text(&mut browser, "dl.facts", "expected");
    std::fs::write(farm.path().join("go"), "").unwrap();
    std::fs::write(farm.path().join("end"), "").unwrap();
    wait_text(&mut browser, "h1 .badge", "success");
    // Only the requests made before the token was pasted were refused.
    let errors = browser.take_errors();
    assert!(
        errors.iter().all(|e| e.contains("401 (Unauthorized)")),
        "{errors:#?}"
    );
    shoot(&mut browser, "build-with-token");
}

/// A GET over a plain socket: status, headers (lowercase names) and body.
fn get(farm: &Farm, path: &str, extra: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    request(farm, "GET", path, extra, b"")
}

/// A request over a plain socket, with extra header lines and a body of any bytes.
fn request(
    farm: &Farm,
    method: &str,
    path: &str,
    extra: &str,
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", farm.port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(response[..split].to_vec()).unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, response[split + 4..].to_vec())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

#[test]
fn the_ui_is_served_with_a_strict_policy_and_cached_by_version() {
    let mut farm = Farm::new(FARM);
    farm.start_master();
    let (status, headers, body) = get(&farm, "/", "");
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&headers, "cache-control"), "no-cache");
    let policy = header(&headers, "content-security-policy");
    for directive in [
        "default-src 'self'",
        "script-src 'self';",
        "require-trusted-types-for 'script'",
        "object-src 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{policy}");
    }
    assert!(!policy.contains("unsafe"), "{policy}");
    assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
    let page = String::from_utf8(body).unwrap();
    // No inline script: no script element without a src, no event handler attribute.
    assert!(!page.contains("<script>"), "{page}");
    for after in page.split(" on").skip(1) {
        let name: String = after
            .chars()
            .take_while(char::is_ascii_alphabetic)
            .collect();
        assert!(
            !after[name.len()..].starts_with('='),
            "an inline handler in the page: on{name}"
        );
    }
    // The page names its assets by version.
    let app = page
        .split("src=\"")
        .find_map(|s| s.split('"').next().filter(|p| p.ends_with("/app.js")))
        .unwrap()
        .to_owned();
    // Unchanged: 304.
    let etag = header(&headers, "etag").to_owned();
    let (status, _, body) = get(&farm, "/", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!((status, body.len()), (304, 0));
    // Assets: cached for good, with their content type.
    let (status, headers, body) = get(&farm, &format!("/{app}"), "");
    assert_eq!(status, 200, "{app}");
    assert_eq!(
        header(&headers, "content-type"),
        "text/javascript; charset=utf-8"
    );
    assert_eq!(
        header(&headers, "cache-control"),
        "public, max-age=31536000, immutable"
    );
    assert!(
        String::from_utf8(body)
            .unwrap()
            .starts_with("// The Kiln web UI")
    );
    let css = app.replace("app.js", "style.css");
    let (status, headers, _) = get(&farm, &format!("/{css}"), "");
    assert_eq!(
        (status, header(&headers, "content-type")),
        (200, "text/css; charset=utf-8")
    );
    // Another version's asset, or no such file: not found, and not to be kept.
    let (status, headers, _) = get(&farm, "/ui/000000000000/app.js", "");
    assert_eq!(
        (status, header(&headers, "cache-control")),
        (404, "no-store")
    );
    let (status, _, _) = get(&farm, &format!("/{}", app.replace("app.js", "nope.js")), "");
    assert_eq!(status, 404);
    let (_, value): (u16, Value) = farm.api("GET", "/api/v2/builders", "");
    assert!(value["builders"].is_array(), "{value}");
}
