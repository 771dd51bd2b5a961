//! The master's configuration: a file using every feature resolves as documented, the example
//! a user starts from loads, and each kind of mistake gets its exact message.

use std::path::Path;
use std::time::Duration;

use kiln_config::{
    self as config, CollapseRequests, Config, ForceParameterKind, Forge, HookChoice, Lookup,
    ModuleRef, ModuleSource, ModuleVersion, NextWorker, PolicyRef, ReportMode, ReporterKind,
    SchedulerKind, SecretValue, WorkerAuth, WorkerSelector,
};
use kiln_protocol::build::{Condition, HideIf};
use serde_json::json;

/// Every problem of a configuration that must not load, one string each.
fn errors(text: &str) -> Vec<String> {
    match config::parse(text, Path::new("kiln.toml")) {
        Ok(_) => panic!("the configuration loaded"),
        Err(e) => e.to_string().lines().map(str::to_owned).collect(),
    }
}

/// The single problem of a configuration.
fn error(text: &str) -> String {
    let all = errors(text);
    assert_eq!(all.len(), 1, "{all:#?}");
    all.into_iter().next().unwrap()
}

fn warnings(c: &Config) -> Vec<String> {
    c.warnings.iter().map(ToString::to_string).collect()
}

const WORKERS: &str = r#"
[[workers]]
name = "w1"
token = "s3cret"
arch = "x86_64"
os = "linux"
[[workers]]
name = "w2"
token_hash = "sha256:1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"
sandbox = true
"#;

/// A configuration of the workers above and `rest`.
fn with_workers(rest: &str) -> String {
    format!("{WORKERS}\n{rest}")
}

const STEP: &str = "[[builders.steps]]\nmodule = \"shell\"\nargs = { command = [\"true\"] }\n";

/// A farm using every feature of the file.
const FULL: &str = r#"
[master]
name = "m1"
database = "db/kiln.sqlite"
listen = "0.0.0.0:9000"
url = "https://ci.example.org"
title = "Full"
heartbeat = "5s"

[properties]
project = "full"
when = 1979-05-27T07:32:00Z
nested = { a = [1, 2.5, true] }

[secrets]
directory = "secrets"
env_prefix = "FULL_"

[hooks]
collapse_requests = "never"
prioritize_builders = "module:prio@1.2.0"
next_build = "policy:hooks/next.wasm"
next_worker = "random"
can_start_build = "module:gate@latest"

[[workers]]
name = "w1"
token = "s3cret"
arch = "x86_64"
os = "linux"
tags = ["big", "ssd"]
max_builds = 3
properties = { rack = 4 }

[[workers]]
name = "w2"
token_hash = "sha256:1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"
arch = "aarch64"
os = "linux"

[[workers]]
name = "sb"
token = "t"
arch = "x86_64"
os = "linux"
sandbox = true

[[builders]]
name = "linux"
description = "Linux"
requires = { arch = "x86_64", tags = ["big"] }
allow_sandbox_workers = true
priority = 5
tags = ["t1"]
properties = { level = "high" }
[builders.grant]
programs = ["git", "/usr/bin/cargo"]
ro_dirs = ["/usr/local/cargo"]
env = { CARGO_TERM_COLOR = "never" }
network = true
step_timeout = "45m"
memory_mib = 1024
[[builders.steps]]
module = "git"
name = "checkout"
args = { repourl = "https://example.org/r.git" }
halt_on_failure = true
[[builders.steps]]
module = "compile"
args = { command = ["cargo", "build"], env = { TOKEN = "%(secret:tok)s" } }
observers = ["line-counter", { module = "regex", args = { patterns = [{ regex = "^error", statistic = "errors" }] }, log = "stdio" }, "lint@2.0"]
timeout = "10m"
flunk_on_failure = false
warn_on_failure = true
flunk_on_warnings = true
warn_on_warnings = false
always_run = true
do_step_if = { any = [{ property = "branch", in = ["main", "dev"] }, { not = { property = "skip", exists = true } }] }
hide_step_if = ["SKIPPED", "SUCCESS"]
[[builders.steps]]
module = "my-step@latest"
hide_step_if = true
[[builders.steps]]
module = "trigger"
args = { schedulers = ["later", "%(prop:also)s"] }

[[builders]]
name = "untrusted"
trusted = false
collapse = false
workdir = "u"
workers = ["sb"]
[[builders.steps]]
module = "shell"
name = "run"
args = { command = "make" }

[[builders]]
name = "anywhere"
[[builders.steps]]
module = "shell"
args = { command = ["true"] }

[[matrix]]
name = "t-{os}-{rust}"
axes = { os = ["linux", "bsd"], rust = ["stable", "nightly"] }
exclude = [{ os = "bsd" , rust = "nightly" }]
include = [{ os = "linux", rust = "beta" }]
[matrix.builder]
description = "{rust} on {os}"
requires = { os = "{os}" }
workdir = "m-{os}-{rust}"
properties = { toolchain = "{rust}", os = "explicit" }
[matrix.builder.grant]
step_timeout = "20m"
[[matrix.builder.steps]]
module = "shell"
args = { command = ["cargo", "+{rust}", "test"], script = "echo ${HOME} {{rust}} {x y}" }
observers = [{ module = "regex", args = { patterns = [{ regex = "{rust}", statistic = "n" }] } }]
timeout = "5m"
do_step_if = { property = "os", equals = "{os}" }
hide_step_if = ["SKIPPED"]
[[matrix.builder.steps]]
module = "shell"
name = "second"

[[schedulers]]
name = "main"
type = "single-branch"
branch = "main"
builders = ["linux", "t-*"]
properties = { from = "main" }
reason = "push to %(prop:branch)s"
repository = "https://example.org/r.git"
project = "p"
codebase = "c"
category = "cat"
tree_stable_timer = "30s"
file_is_important = ["src/**", "!src/**/*.md"]
only_important = true
policy = "module:filter@1"

[[schedulers]]
name = "branches"
type = "any-branch"
branches = ["release/*"]
builders = ["linux"]

[[schedulers]]
name = "hourly"
type = "periodic"
interval = "1h"
only_if_changed = true
builders = ["anywhere"]

[[schedulers]]
name = "nightly"
type = "nightly"
cron = "0 3 * * 1-5"
timezone = "Europe/Paris"
branch = "main"
builders = ["t-linux-stable"]

[[schedulers]]
name = "force"
type = "force"
builders = ["linux"]
parameters = [
  { name = "version", type = "string", label = "Version", default = "1.0", regex = "^\\d+\\.\\d+$", required = true },
  { name = "jobs", type = "int", default = 4 },
  { name = "clean", type = "bool", default = true },
  { name = "profile", type = "choice", choices = ["debug", "release"], default = "release" },
]

[[schedulers]]
name = "later"
type = "triggerable"
builders = ["anywhere"]

[[schedulers]]
name = "after"
type = "dependent"
upstream = "main"
builders = ["anywhere"]

[[schedulers]]
name = "try"
type = "try"
users = ["alice"]
builders = ["linux", "untrusted"]

[[change_sources]]
name = "poll"
type = "git-poller"
repourl = "https://example.org/r.git"
branches = ["main", "release/*"]
interval = "60s"
project = "p"

[[change_sources]]
name = "gh"
type = "github"
secret = "%(secret:hook)s"

[[change_sources]]
name = "gl"
type = "gitlab"
secret = "plain-hook-secret"

[[change_sources]]
name = "gt"
type = "gitea"
secret = "x"

[[change_sources]]
name = "any"
type = "generic"
secret = "y"
category = "misc"

[[reporters]]
name = "hook"
type = "http"
url = "https://hooks.example.org/kiln"
secret = "%(secret:http)s"
mode = "failing"

[[reporters]]
name = "gh"
type = "github-status"
token = "%(secret:gh)s"
builders = ["t-*"]

[[reporters]]
name = "gl"
type = "gitlab-status"
token = "plain-token"
context = "ci/%(prop:buildername)s"

[[reporters]]
name = "gt"
type = "gitea-status"
token = "%(secret:gt)s"
base_url = "https://gitea.example.org"

[[reporters]]
name = "mail"
type = "email"
relay = "smtp.example.org:587"
from = "kiln@example.org"
to = ["a@example.org"]
lookup = "example.org"
mode = "problem"
smtp_user = "kiln"
smtp_password = "%(secret:smtp)s"
"#;

fn load_full() -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("hooks")).unwrap();
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("hooks/next.wasm"), b"").unwrap();
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, FULL).unwrap();
    let c = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    (dir, c)
}

#[test]
fn a_full_config_resolves_every_feature() {
    let (dir, c) = load_full();
    let d = dir.path();
    assert_eq!(c.path, d.join("kiln.toml"));
    assert_eq!(c.dir, d);
    assert_eq!(
        warnings(&c),
        [format!(
            "{}: matrix[0].builder.requires: builder \"t-bsd-stable\": no defined worker has os \"bsd\"; its builds will wait until such a worker is added",
            d.join("kiln.toml").display()
        )]
    );
    assert_eq!(
        c.summary().to_string(),
        "3 workers, 7 builders (4 from matrices), 8 schedulers, 5 change sources, 5 reporters, 1 warning"
    );

    // [master], [properties], [secrets], [hooks]
    assert_eq!(c.master.name, "m1");
    assert_eq!(
        c.master.database.as_str(),
        format!("sqlite://{}/db/kiln.sqlite?mode=rwc", d.display())
    );
    assert_eq!(c.master.listen, "0.0.0.0:9000".parse().unwrap());
    assert_eq!(c.master.url, "https://ci.example.org/");
    assert_eq!(c.master.title, "Full");
    assert_eq!(c.master.heartbeat, Duration::from_secs(5));
    assert_eq!(c.properties["when"], json!("1979-05-27T07:32:00Z"));
    assert_eq!(c.properties["nested"], json!({"a": [1, 2.5, true]}));
    assert_eq!(
        c.secrets.directory.as_deref(),
        Some(d.join("secrets").as_path())
    );
    assert_eq!(c.secrets.env_var("a-b").as_deref(), Some("FULL_A_B"));
    assert_eq!(
        c.hooks.collapse_requests,
        HookChoice::Builtin(CollapseRequests::Never)
    );
    assert_eq!(
        c.hooks.prioritize_builders,
        HookChoice::Policy(PolicyRef::Uploaded {
            name: "prio".into(),
            version: ModuleVersion::Exact("1.2.0".into())
        })
    );
    assert_eq!(
        c.hooks.next_build,
        HookChoice::Policy(PolicyRef::File(d.join("hooks/next.wasm")))
    );
    assert_eq!(c.hooks.next_worker, HookChoice::Builtin(NextWorker::Random));
    assert_eq!(
        c.hooks.can_start_build,
        HookChoice::Policy(PolicyRef::Uploaded {
            name: "gate".into(),
            version: ModuleVersion::Latest
        })
    );

    // Workers.
    let w1 = c.worker("w1").unwrap();
    assert!(w1.auth.verify("s3cret"));
    assert_eq!(w1.max_builds, 3);
    assert_eq!(w1.properties["rack"], json!(4));
    let w2 = c.worker("w2").unwrap();
    assert!(matches!(w2.auth, WorkerAuth::TokenHash(_)));
    assert!(w2.auth.verify("s3cret"));
    assert_eq!(w2.max_builds, 1);
    assert!(!w2.sandbox);
    assert!(c.worker("sb").unwrap().sandbox);

    // A trusted builder with requirements, a grant and every step option.
    let linux = c.builder("linux").unwrap();
    assert!(
        matches!(&linux.workers, WorkerSelector::Requires(r) if r.arch.as_deref() == Some("x86_64"))
    );
    let eligible: Vec<&str> = c.workers_for(linux).map(|w| w.name.as_str()).collect();
    assert_eq!(eligible, ["w1"]);
    assert!(linux.trusted && linux.collapse && linux.allow_sandbox_workers);
    assert_eq!(linux.priority, 5);
    assert_eq!(linux.workdir, "linux");
    assert_eq!(linux.grant.programs, ["git", "/usr/bin/cargo"]);
    assert_eq!(linux.grant.ro_dirs, [Path::new("/usr/local/cargo")]);
    assert!(linux.grant.network);
    assert_eq!(linux.grant.step_timeout, Duration::from_secs(45 * 60));
    assert_eq!(linux.grant.memory_mib, 1024);
    let names: Vec<&str> = linux.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["checkout", "compile", "my-step", "trigger"]);
    let checkout = &linux.steps[0];
    assert_eq!(checkout.module, ModuleSource::Builtin("git"));
    assert!(checkout.options.halt_on_failure && checkout.options.flunk_on_failure);
    assert_eq!(checkout.timeout, Duration::from_secs(45 * 60));
    let compile = &linux.steps[1];
    assert_eq!(compile.timeout, Duration::from_secs(600));
    assert_eq!(compile.args["env"]["TOKEN"], "%(secret:tok)s");
    assert_eq!(compile.observers.len(), 3);
    assert_eq!(
        compile.observers[0].module,
        ModuleSource::Builtin("line-counter")
    );
    assert_eq!(compile.observers[0].args, serde_json::Value::Null);
    assert_eq!(compile.observers[1].module, ModuleSource::Builtin("regex"));
    assert_eq!(
        compile.observers[1].args["patterns"][0]["statistic"],
        "errors"
    );
    assert_eq!(compile.observers[1].log, "stdio");
    assert_eq!(
        compile.observers[2].module,
        ModuleSource::Uploaded(ModuleRef {
            name: "lint".into(),
            version: ModuleVersion::Exact("2.0".into())
        })
    );
    let o = &compile.options;
    assert!(!o.halt_on_failure && !o.flunk_on_failure && o.warn_on_failure);
    assert!(o.flunk_on_warnings && !o.warn_on_warnings && o.always_run);
    assert!(matches!(&o.do_step_if, Some(Condition::Any { any }) if any.len() == 2));
    assert_eq!(
        o.hide_step_if,
        Some(HideIf::Results(vec![
            kiln_protocol::Outcome::Skipped,
            kiln_protocol::Outcome::Success
        ]))
    );
    assert_eq!(
        linux.steps[2].module,
        ModuleSource::Uploaded(ModuleRef {
            name: "my-step".into(),
            version: ModuleVersion::Latest
        })
    );
    assert_eq!(
        linux.steps[2].options.hide_step_if,
        Some(HideIf::Condition(Condition::Bool(true)))
    );

    let untrusted = c.builder("untrusted").unwrap();
    assert!(!untrusted.trusted && !untrusted.collapse);
    assert_eq!(untrusted.workdir, "u");
    assert_eq!(untrusted.workers, WorkerSelector::Named(vec!["sb".into()]));
    assert_eq!(untrusted.grant.step_timeout, config::DEFAULT_STEP_TIMEOUT);
    assert_eq!(untrusted.grant.memory_mib, config::DEFAULT_MEMORY_MIB);
    let anywhere = c.builder("anywhere").unwrap();
    assert_eq!(anywhere.workers, WorkerSelector::Any);
    let eligible: Vec<&str> = c.workers_for(anywhere).map(|w| w.name.as_str()).collect();
    assert_eq!(eligible, ["w1", "w2"], "not the sandbox worker");

    // The matrix: axes in name order (os, rust), minus the excluded, plus the included.
    let generated: Vec<&str> = c
        .builders
        .iter()
        .filter(|b| b.matrix.is_some())
        .map(|b| b.name.as_str())
        .collect();
    assert_eq!(
        generated,
        [
            "t-linux-stable",
            "t-linux-nightly",
            "t-bsd-stable",
            "t-linux-beta"
        ]
    );
    let t = c.builder("t-bsd-stable").unwrap();
    assert_eq!(t.description.as_deref(), Some("stable on bsd"));
    assert!(matches!(&t.workers, WorkerSelector::Requires(r) if r.os.as_deref() == Some("bsd")));
    assert_eq!(t.workdir, "m-bsd-stable");
    assert_eq!(
        t.steps[0].args,
        json!({"command": ["cargo", "+stable", "test"], "script": "echo ${HOME} {rust} {x y}"})
    );
    assert_eq!(t.steps[0].timeout, Duration::from_secs(300));
    assert_eq!(t.steps[1].timeout, Duration::from_secs(1200));
    assert_eq!(
        t.steps[0].observers[0].args,
        json!({"patterns": [{"regex": "stable", "statistic": "n"}]})
    );
    assert_eq!(
        t.steps[0].options.do_step_if,
        Some(serde_json::from_value(json!({"property": "os", "equals": "bsd"})).unwrap())
    );
    assert_eq!(
        t.steps[0].options.hide_step_if,
        Some(HideIf::Results(vec![kiln_protocol::Outcome::Skipped]))
    );
    assert_eq!(t.properties["toolchain"], "stable");
    assert_eq!(t.properties["rust"], "stable");
    assert_eq!(
        t.properties["os"], "explicit",
        "the template's own property wins"
    );
    let cell = t.matrix.as_ref().unwrap();
    assert_eq!(cell.matrix, "t-{os}-{rust}");
    assert_eq!(cell.values["os"], "bsd");

    // Schedulers.
    let main = c.scheduler("main").unwrap();
    assert_eq!(
        main.builders,
        [
            "linux",
            "t-linux-stable",
            "t-linux-nightly",
            "t-bsd-stable",
            "t-linux-beta"
        ]
    );
    assert_eq!(main.reason.as_deref(), Some("push to %(prop:branch)s"));
    assert_eq!(main.properties["from"], "main");
    let SchedulerKind::SingleBranch { branch, filter } = &main.kind else {
        panic!("{:?}", main.kind)
    };
    assert_eq!(branch, "main");
    assert_eq!(filter.codebase.as_deref(), Some("c"));
    assert_eq!(filter.tree_stable_timer, Duration::from_secs(30));
    let important = filter.file_is_important.as_ref().unwrap();
    assert!(important.is_important("src/main.rs"));
    assert!(!important.is_important("src/doc/x.md"));
    assert!(filter.only_important);
    assert_eq!(
        filter.policy,
        Some(PolicyRef::Uploaded {
            name: "filter".into(),
            version: ModuleVersion::Exact("1".into())
        })
    );
    let SchedulerKind::AnyBranch { branches, .. } = &c.scheduler("branches").unwrap().kind else {
        panic!()
    };
    assert!(branches.as_ref().unwrap().is_match("release/1.0"));
    assert_eq!(
        c.scheduler("hourly").unwrap().kind,
        SchedulerKind::Periodic {
            interval: Duration::from_secs(3600),
            only_if_changed: true
        }
    );
    let SchedulerKind::Nightly { cron, branch, .. } = &c.scheduler("nightly").unwrap().kind else {
        panic!()
    };
    assert_eq!(branch.as_deref(), Some("main"));
    assert_eq!(cron.timezone, chrono_tz::Europe::Paris);
    assert_eq!(
        cron.next_after("2025-01-03T12:00:00Z".parse().unwrap())
            .unwrap()
            .to_rfc3339(),
        "2025-01-06T02:00:00+00:00"
    );
    let SchedulerKind::Force { parameters } = &c.scheduler("force").unwrap().kind else {
        panic!()
    };
    assert_eq!(parameters.len(), 4);
    assert_eq!(parameters[0].label, "Version");
    assert!(parameters[0].required);
    assert_eq!(
        parameters[0].kind,
        ForceParameterKind::String {
            default: Some("1.0".into()),
            regex: Some(r"^\d+\.\d+$".into())
        }
    );
    assert_eq!(parameters[1].label, "jobs");
    assert_eq!(
        parameters[1].kind,
        ForceParameterKind::Int { default: Some(4) }
    );
    assert_eq!(
        parameters[2].kind,
        ForceParameterKind::Bool { default: true }
    );
    assert_eq!(
        parameters[3].kind,
        ForceParameterKind::Choice {
            choices: vec!["debug".into(), "release".into()],
            default: Some("release".into())
        }
    );
    assert_eq!(
        c.scheduler("later").unwrap().kind,
        SchedulerKind::Triggerable
    );
    assert_eq!(
        c.scheduler("after").unwrap().kind,
        SchedulerKind::Dependent {
            upstream: "main".into()
        }
    );
    assert_eq!(
        c.scheduler("try").unwrap().kind,
        SchedulerKind::Try {
            users: Some(vec!["alice".into()])
        }
    );

    // Change sources and reporters.
    let poll = c.change_source("poll").unwrap();
    assert_eq!(poll.project, "p");
    let config::ChangeSourceKind::GitPoller {
        interval, branches, ..
    } = &poll.kind
    else {
        panic!()
    };
    assert_eq!(*interval, Duration::from_secs(60));
    assert!(branches.as_ref().unwrap().is_match("release/2"));
    assert_eq!(
        c.change_source("gh").unwrap().kind,
        config::ChangeSourceKind::Webhook {
            forge: Forge::GitHub,
            secret: Some(SecretValue::Named("hook".into()))
        }
    );
    assert_eq!(
        c.change_source("any").unwrap().category.as_deref(),
        Some("misc")
    );
    assert!(matches!(
        c.reporter("hook").unwrap().kind,
        ReporterKind::Http {
            mode: ReportMode::Failing,
            ..
        }
    ));
    assert_eq!(
        c.reporter("gh").unwrap().builders.as_deref(),
        Some(&generated.iter().map(|s| s.to_string()).collect::<Vec<_>>()[..])
    );
    let ReporterKind::CommitStatus {
        base_url,
        context,
        token,
        ..
    } = &c.reporter("gh").unwrap().kind
    else {
        panic!()
    };
    assert_eq!(base_url, "https://api.github.com");
    assert_eq!(context, config::DEFAULT_STATUS_CONTEXT);
    assert_eq!(*token, SecretValue::Named("gh".into()));
    let ReporterKind::Email {
        to,
        lookup,
        mode,
        smtp_auth,
        ..
    } = &c.reporter("mail").unwrap().kind
    else {
        panic!()
    };
    assert_eq!(to, &["a@example.org"]);
    assert_eq!(lookup, &Some(Lookup::Domain("example.org".into())));
    assert_eq!(*mode, ReportMode::Problem);
    assert_eq!(
        smtp_auth,
        &Some(("kiln".to_owned(), SecretValue::Named("smtp".into())))
    );
}

#[test]
fn secrets_never_show_in_debug_output() {
    let (_dir, c) = load_full();
    let debug = format!("{c:?}");
    for secret in ["s3cret", "plain-hook-secret", "plain-token"] {
        assert!(!debug.contains(secret), "{secret} in {debug}");
    }
    assert!(debug.contains("Token(<redacted>)"));
}

#[test]
fn the_example_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("kiln.example.toml");
    let c = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.summary().to_string(),
        "3 workers, 7 builders (4 from matrices), 6 schedulers, 2 change sources, 2 reporters, 1 warning"
    );
    assert_eq!(
        warnings(&c),
        [format!(
            "{}: secrets.directory: {} is not a directory (yet); secrets will be looked up in it when builds need them",
            path.display(),
            path.with_file_name("secrets").display()
        )]
    );
    let names: Vec<&str> = c.builders.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "linux",
            "pull-requests",
            "deploy",
            "test-x86_64-stable",
            "test-x86_64-nightly",
            "test-aarch64-stable",
            "test-x86_64-beta"
        ]
    );
    for b in &c.builders {
        assert!(
            c.workers_for(b).next().is_some(),
            "{} has no worker",
            b.name
        );
    }
}

#[test]
fn toml_mistakes_give_line_column_and_key() {
    assert_eq!(
        error("[master]\nname = \"m1\"\nlisten = 8010\n"),
        "kiln.toml:3:10: master.listen: invalid type: integer `8010`, expected a string"
    );
    assert_eq!(
        error(&with_workers(
            "[[builders]]\nname = \"b\"\nwokers = [\"w1\"]\n"
        )),
        "kiln.toml:14:1: builders.\"b\".wokers: unknown field `wokers`, expected one of `name`, `description`, `workers`, `requires`, `trusted`, `allow_sandbox_workers`, `collapse`, `priority`, `workdir`, `tags`, `properties`, `grant`, `steps`"
    );
    assert_eq!(
        error(
            "[[builders]]\nname = \"b\"\n[[builders.steps]]\nmodule = \"shell\"\nhalt_on_failur = true\n"
        ),
        "kiln.toml:5:1: builders.\"b\".steps[0].halt_on_failur: unknown field `halt_on_failur`, expected one of `module`, `name`, `args`, `observers`, `timeout`, `halt_on_failure`, `flunk_on_failure`, `warn_on_failure`, `flunk_on_warnings`, `warn_on_warnings`, `always_run`, `do_step_if`, `hide_step_if`"
    );
    assert_eq!(
        error(
            "[[builders]]\nname = \"b\"\n[[builders.steps]]\nmodule = \"shell\"\nobservers = [{ modul = \"x\" }]\n"
        ),
        "kiln.toml:5:16: builders.\"b\".steps[0].observers[0].modul: unknown field `modul`, expected one of `module`, `args`, `log`"
    );
    assert_eq!(
        error("[master]\nheartbeat = 10\n"),
        "kiln.toml:2:13: master.heartbeat: invalid type: integer `10`, expected a duration with its unit, such as \"30s\", \"10m\" or \"1h\""
    );
    assert_eq!(
        error("[workers]\nname = 1"),
        "kiln.toml:1:1: workers: invalid type: map, expected a sequence"
    );
    assert_eq!(
        error("[master\nname = 1"),
        "kiln.toml:1:8: unclosed table, expected `]`"
    );
}

#[test]
fn a_missing_file_says_so() {
    let e = config::load(Path::new("/nonexistent/kiln.toml")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "/nonexistent/kiln.toml: cannot read the configuration: No such file or directory (os error 2)"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = with_workers(&format!(
        r#"
[[builders]]
name = "linux"
workers = ["w1", "w9"]
{STEP}
[[builders]]
name = "linux"
{STEP}
[[schedulers]]
name = "s"
type = "single-branch"
branch = "main"
builders = ["linux", "mac"]
"#
    ));
    assert_eq!(
        errors(&text),
        [
            "kiln.toml: builders[1].name: builder \"linux\" is already defined by builders[0]; names must be unique",
            "kiln.toml: builders.\"linux\".workers: names worker \"w9\", which is not defined (defined: w1, w2)",
            "kiln.toml: schedulers.\"s\".builders: names builder \"mac\", which is not defined (defined: linux)",
        ]
    );
}

#[test]
fn worker_mistakes() {
    let cases = [
        (
            "[[workers]]\nname = \"w\"\ntoken = \"a\"\ntoken_hash = \"sha256:00\"",
            "kiln.toml: workers.\"w\": gives both token and token_hash; keep one (token_hash keeps the token out of this file)",
        ),
        (
            "[[workers]]\nname = \"w\"",
            "kiln.toml: workers.\"w\": has no token; add token = \"...\" or token_hash = \"sha256:...\" (the SHA-256 of the token the worker presents with --token)",
        ),
        (
            "[[workers]]\nname = \"w\"\ntoken_hash = \"sha256:ABC\"",
            "kiln.toml: workers.\"w\".token_hash: \"sha256:ABC\" is not \"sha256:\" and 64 lowercase hex digits; compute it with `printf %s \"$TOKEN\" | sha256sum`",
        ),
        (
            "[[workers]]\nname = \"w\"\ntoken = \"t\"\nmax_builds = 0",
            "kiln.toml: workers.\"w\".max_builds: is 0; give at least 1 (the number of builds the worker runs at once)",
        ),
        (
            "[[workers]]\nname = \"w x\"\ntoken = \"t\"",
            "kiln.toml: workers[0].name: \"w x\" is not a valid name; use 1 to 100 letters, digits, '-', '_' and '.', not starting with '-' or '.'",
        ),
        (
            "[[workers]]\nname = \"w\"\ntoken = \"t\"\n[[workers]]\nname = \"w\"\ntoken = \"u\"",
            "kiln.toml: workers[1].name: worker \"w\" is already defined by workers[0]; names must be unique",
        ),
        (
            "[[workers]]\nname = \"w\"\ntoken = \"t\"\nproperties = { \"\" = 1 }",
            "kiln.toml: workers.\"w\".properties.\"\": property name is empty",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(error(text), expected, "{text}");
    }
}

#[test]
fn builder_mistakes() {
    let b = |body: &str| with_workers(&format!("[[builders]]\nname = \"b\"\n{body}"));
    let cases = [
        (
            b(&format!("workers = [\"w9\"]\n{STEP}")),
            "kiln.toml: builders.\"b\".workers: names worker \"w9\", which is not defined (defined: w1, w2)",
        ),
        (
            b(&format!("workers = []\n{STEP}")),
            "kiln.toml: builders.\"b\".workers: is empty; name at least one worker, or leave workers out to let any worker build",
        ),
        (
            b(&format!(
                "workers = [\"w1\"]\nrequires = {{ os = \"linux\" }}\n{STEP}"
            )),
            "kiln.toml: builders.\"b\": gives both workers and requires; keep one (worker names, or the capabilities a worker needs)",
        ),
        (
            b(&format!("workers = [\"w1\"]\ntrusted = false\n{STEP}")),
            "kiln.toml: builders.\"b\".workers: names worker \"w1\", which is not a sandbox worker; untrusted builds run only on sandbox workers (set sandbox = true on a worker started with --sandbox)",
        ),
        (
            b(&format!("workers = [\"w2\"]\n{STEP}")),
            "kiln.toml: builders.\"b\".workers: names worker \"w2\", which is a sandbox worker; set allow_sandbox_workers = true to let this trusted builder use it",
        ),
        (
            b(&format!(
                "trusted = false\n[builders.grant]\nnetwork = true\n{STEP}"
            )),
            "kiln.toml: builders.\"b\".grant.network: an untrusted builder's commands cannot use the network; remove network, or set trusted = true",
        ),
        (
            b(
                "trusted = false\n[[builders.steps]]\nmodule = \"shell\"\nargs = { command = [\"deploy\", \"--key=%(secret:deploy)s\"] }\n",
            ),
            "kiln.toml: builders.\"b\".steps[0].args: an untrusted builder cannot use secrets (\"%(secret:deploy)s\"); remove it, or set trusted = true",
        ),
        (
            b(
                "trusted = false\n[[builders.steps]]\nmodule = \"shell\"\nargs = { command = [\"x\"] }\nobservers = [{ module = \"regex\", args = { k = \"%(secret:s)s\" } }]\n",
            ),
            "kiln.toml: builders.\"b\".steps[0].observers[0].args: an untrusted builder cannot use secrets (\"%(secret:s)s\"); remove it, or set trusted = true",
        ),
        (
            b(""),
            "kiln.toml: builders.\"b\".steps: the builder has no steps; add at least one [[builders.steps]]",
        ),
        (
            b(&format!("[builders.grant]\nmemory_mib = 5000\n{STEP}")),
            "kiln.toml: builders.\"b\".grant.memory_mib: 5000 is out of range; give 1 to 4096 (a wasm32 guest cannot use more than 4 GiB)",
        ),
        (
            b(&format!("[builders.grant]\nmemory_mib = 0\n{STEP}")),
            "kiln.toml: builders.\"b\".grant.memory_mib: 0 is out of range; give 1 to 4096 (a wasm32 guest cannot use more than 4 GiB)",
        ),
        (
            b(&format!("workdir = \"../etc\"\n{STEP}")),
            "kiln.toml: builders.\"b\".workdir: \"../etc\" is not a single directory name; give a name without '/' or control characters (not \".\" or \"..\")",
        ),
        (
            b(&format!("[builders.grant]\nstep_timeout = \"0s\"\n{STEP}")),
            "kiln.toml: builders.\"b\".grant.step_timeout: \"0s\" is zero; give a positive duration",
        ),
        (
            b(&format!(
                "[builders.grant]\nstep_timeout = \"an hour\"\n{STEP}"
            )),
            "kiln.toml: builders.\"b\".grant.step_timeout: \"an hour\" is not a duration (expected number at 0); write a number and a unit, such as \"30s\", \"10m\" or \"1h 30m\"",
        ),
        (
            b(&format!(
                "[builders.grant]\nprograms = [\"bin/sh\"]\n{STEP}"
            )),
            "kiln.toml: builders.\"b\".grant.programs: \"bin/sh\": give a program name (looked up on PATH) or an absolute path",
        ),
        (
            b("[[builders.steps]]\nmodule = \"shel\"\n"),
            "kiln.toml: builders.\"b\".steps[0].module: \"shel\" is not a built-in step (built-in steps: shell, compile, test, git, trigger, set-property, set-property-from-command, file-upload, directory-upload, file-download); for an uploaded module write NAME@VERSION or NAME@latest",
        ),
        (
            b("[[builders.steps]]\nmodule = \"warnings\"\n"),
            "kiln.toml: builders.\"b\".steps[0].module: \"warnings\" is a log observer, not a step; list it in a step's observers (built-in steps: shell, compile, test, git, trigger, set-property, set-property-from-command, file-upload, directory-upload, file-download)",
        ),
        (
            b("[[builders.steps]]\nmodule = \"lint@\"\n"),
            "kiln.toml: builders.\"b\".steps[0].module: \"lint@\": the version after '@' is \"latest\" or 1 to 64 letters, digits, '.', '-', '+' and '_' (as \"1.2.0\")",
        ),
        (
            b("[[builders.steps]]\nmodule = \"shell\"\nobservers = [\"warning\"]\n"),
            "kiln.toml: builders.\"b\".steps[0].observers[0]: \"warning\" is not a built-in log observer (built-in log observers: line-counter, warnings, test-results, regex); for an uploaded module write NAME@VERSION or NAME@latest",
        ),
        (
            b(
                "[[builders.steps]]\nmodule = \"shell\"\nobservers = [{ module = \"git\", log = \"stdio\" }]\n",
            ),
            "kiln.toml: builders.\"b\".steps[0].observers[0].module: \"git\" is a step, not a log observer; use it as a step's module (built-in log observers: line-counter, warnings, test-results, regex)",
        ),
        (
            b(
                "[[builders.steps]]\nmodule = \"file-upload\"\nargs = { source = \"a\", mode = \"file-download\" }\n",
            ),
            "kiln.toml: builders.\"b\".steps[0].args: argument \"mode\" is set by the built-in step file-upload; leave it out",
        ),
        (
            b(&format!("{STEP}{STEP}")),
            "kiln.toml: builders.\"b\".steps[1].name: step name \"shell\" is already used by steps[0]; give each step its own name = \"...\"",
        ),
        (
            b("[[builders.steps]]\nmodule = \"shell\"\ntimeout = \"10\"\n"),
            "kiln.toml: builders.\"b\".steps[0].timeout: \"10\" has no unit; write \"10s\" for seconds (or m, h, d)",
        ),
        (
            b(
                "[[builders.steps]]\nmodule = \"shell\"\ndo_step_if = { property = \"x\", equals = 1, exists = true }\n",
            ),
            "kiln.toml: builders.\"b\".steps[0].do_step_if: the test of property \"x\" needs exactly one of equals, in and exists",
        ),
        (
            b("[[builders.steps]]\nmodule = \"trigger\"\nargs = { schedulers = [\"nope\"] }\n"),
            "kiln.toml: builders.\"b\".steps[0].args.schedulers: names scheduler \"nope\", which is not a triggerable scheduler (triggerable: none)",
        ),
        (
            "[[builders]]\ndescription = \"x\"\n".to_owned(),
            "kiln.toml: builders[0]: has no name; add name = \"...\"",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(error(&text), expected, "{text}");
    }
    // Both grant path mistakes are reported.
    assert_eq!(
        errors(&b(&format!(
            "[builders.grant]\nro_dirs = [\"usr/lib\", \"/a/../b\"]\n{STEP}"
        ))),
        [
            "kiln.toml: builders.\"b\".grant.ro_dirs: \"usr/lib\" is not an absolute path without \"..\"; give the full path, as \"/usr/local/cargo\"",
            "kiln.toml: builders.\"b\".grant.ro_dirs: \"/a/../b\" is not an absolute path without \"..\"; give the full path, as \"/usr/local/cargo\"",
        ]
    );
}

#[test]
fn builders_no_worker_can_run_are_warnings() {
    let c = config::parse(
        &with_workers(&format!(
            "[[builders]]\nname = \"arm\"\nrequires = {{ arch = \"aarch64\", tags = [\"big\"] }}\n{STEP}\n[[builders]]\nname = \"u\"\ntrusted = false\nrequires = {{ os = \"linux\" }}\n{STEP}"
        )),
        Path::new("kiln.toml"),
    )
    .unwrap();
    assert_eq!(
        warnings(&c),
        [
            "kiln.toml: builders.\"arm\".requires: no defined worker has arch \"aarch64\", tags \"big\"; its builds will wait until such a worker is added",
            "kiln.toml: builders.\"u\": untrusted, and no worker it may use is a sandbox worker; its builds will wait (set sandbox = true on a worker started with --sandbox)",
        ]
    );
    let c = config::parse(
        &format!("[[builders]]\nname = \"b\"\n{STEP}"),
        Path::new("kiln.toml"),
    )
    .unwrap();
    assert_eq!(
        warnings(&c),
        [
            "kiln.toml: builders.\"b\": no worker is defined, so its builds will wait; add a [[workers]] entry"
        ]
    );
}

#[test]
fn matrix_mistakes() {
    let m = |head: &str, builder: &str| {
        with_workers(&format!(
            "[[matrix]]\n{head}\n[matrix.builder]\n{builder}\n[[matrix.builder.steps]]\nmodule = \"shell\"\nargs = {{ command = [\"echo\", \"{{os}}\"] }}\n"
        ))
    };
    let axes = "axes = { os = [\"linux\", \"bsd\"], cc = [\"gcc\"] }";
    let cases = [
        (
            m(&format!("name = \"t-{{os}}\"\n{axes}"), ""),
            "kiln.toml: matrix[0].name: \"t-{os}\" does not use axis \"cc\"; the name must use every axis ({cc}, {os}) so that each builder's name is different",
        ),
        (
            m(&format!("name = \"t-{{os}}-{{cc}}-{{arch}}\"\n{axes}"), ""),
            "kiln.toml: matrix[0].name: {arch} names no axis (axes: cc, os); write {{arch}} for a literal {arch}",
        ),
        (
            m(
                &format!("name = \"t-{{os}}-{{cc}}\"\n{axes}"),
                "workdir = \"w-{osx}\"",
            ),
            "kiln.toml: matrix[0].builder.workdir: {osx} names no axis (axes: cc, os); write {{osx}} for a literal {osx}",
        ),
        (
            m(
                &format!("name = \"t-{{os}}-{{cc}}\"\n{axes}"),
                "name = \"x\"",
            ),
            "kiln.toml: matrix[0].builder.name: remove it; the matrix's name template names its builders",
        ),
        (
            m(
                &format!("name = \"t-{{os}}-{{cc}}\"\n{axes}\nexclude = [{{ os = \"osx\" }}]"),
                "",
            ),
            "kiln.toml: matrix[0].exclude[0]: \"osx\" is not a value of axis \"os\" (linux, bsd)",
        ),
        (
            m(
                &format!("name = \"t-{{os}}-{{cc}}\"\n{axes}\ninclude = [{{ os = \"osx\" }}]"),
                "",
            ),
            "kiln.toml: matrix[0].include[0]: gives no value for axis \"cc\"; an included combination gives every axis",
        ),
        (
            m("name = \"t-{os}\"\naxes = { os = [] }", ""),
            "kiln.toml: matrix[0].axes.os: has no values; give at least one",
        ),
        (
            m("name = \"t-{os}\"\naxes = { os = [\"a b\"] }", ""),
            "kiln.toml: matrix[0].name: \"t-a b\" is not a valid name; use 1 to 100 letters, digits, '-', '_' and '.', not starting with '-' or '.'",
        ),
        (
            format!(
                "[[builders]]\nname = \"t-linux\"\n{STEP}\n{}",
                m("name = \"t-{os}\"\naxes = { os = [\"linux\"] }", "")
            ),
            "kiln.toml: matrix[0].name: generates builder \"t-linux\", which is already defined by builders[0]; names must be unique",
        ),
        (
            m(
                "name = \"t-{os}\"\naxes = { os = [\"linux\", \"bsd\"] }",
                "workers = [\"w-{os}\"]",
            ),
            "kiln.toml: matrix[0].builder.workers: names worker \"w-linux\", which is not defined (defined: w1, w2)",
        ),
    ];
    for (text, expected) in cases {
        let all = errors(&text);
        assert_eq!(all[0], expected, "{text}");
    }
    // The unused-axis rule, and a generated builder's own problem, once per builder.
    assert_eq!(
        errors(&m(
            "name = \"t-{os}\"\naxes = { os = [\"linux\", \"bsd\"] }",
            "workers = [\"w-{os}\"]"
        )),
        [
            "kiln.toml: matrix[0].builder.workers: names worker \"w-linux\", which is not defined (defined: w1, w2)",
            "kiln.toml: matrix[0].builder.workers: names worker \"w-bsd\", which is not defined (defined: w1, w2)",
        ]
    );
    let all_excluded = config::parse(
        &m(
            "name = \"t-{os}\"\naxes = { os = [\"linux\"] }\nexclude = [{ os = \"linux\" }]",
            "",
        ),
        Path::new("kiln.toml"),
    )
    .unwrap();
    assert_eq!(
        warnings(&all_excluded),
        ["kiln.toml: matrix[0]: every combination is excluded, so the matrix generates no builder"]
    );
}

#[test]
fn scheduler_mistakes() {
    let s = |body: &str| {
        with_workers(&format!(
            "[[builders]]\nname = \"linux\"\n{STEP}\n[[builders]]\nname = \"test-a\"\n{STEP}\n[[schedulers]]\nname = \"s\"\n{body}"
        ))
    };
    let cases = [
        (
            s("type = \"single-branch\"\nbranch = \"main\""),
            "kiln.toml: schedulers.\"s\": has no builders; add builders = [...] with the builders it starts (defined: linux, test-a)",
        ),
        (
            s("type = \"single-branch\"\nbranch = \"main\"\nbuilders = []"),
            "kiln.toml: schedulers.\"s\".builders: is empty; name at least one builder (defined: linux, test-a)",
        ),
        (
            s("type = \"single-branch\"\nbranch = \"main\"\nbuilders = [\"mac-*\"]"),
            "kiln.toml: schedulers.\"s\".builders: the glob \"mac-*\" matches no builder (defined: linux, test-a)",
        ),
        (
            s("type = \"single-branch\"\nbuilders = [\"linux\"]"),
            "kiln.toml: schedulers.\"s\": a single-branch scheduler needs branch = \"...\" (use any-branch for several branches)",
        ),
        (
            s("type = \"cron\"\nbuilders = [\"linux\"]"),
            "kiln.toml: schedulers.\"s\".type: \"cron\" is not a scheduler type; give one of single-branch, any-branch, periodic, nightly, force, triggerable, dependent, try",
        ),
        (
            s("type = \"periodic\"\ninterval = \"1h\"\nbranch = \"main\"\nbuilders = [\"linux\"]"),
            "kiln.toml: schedulers.\"s\".branch: does not apply to a periodic scheduler (its own fields: interval, only_if_changed)",
        ),
        (
            s("type = \"periodic\"\ninterval = \"0s\"\nbuilders = [\"linux\"]"),
            "kiln.toml: schedulers.\"s\".interval: \"0s\" is too short; give at least 1s",
        ),
        (
            s("type = \"periodic\"\nbuilders = [\"linux\"]"),
            "kiln.toml: schedulers.\"s\": a periodic scheduler needs interval = \"...\", as \"1h\"",
        ),
        (
            s("type = \"nightly\"\ncron = \"0 3 * *\"\nbuilders = [\"linux\"]"),
            "kiln.toml: schedulers.\"s\".cron: \"0 3 * *\" is not a cron expression (Invalid pattern: Pattern must have 5 fields when seconds are disallowed.); write five fields: minute hour day-of-month month day-of-week, as \"0 3 * * 1-5\"",
        ),
        (
            s(
                "type = \"nightly\"\ncron = \"0 3 * * *\"\ntimezone = \"Europe/Pariss\"\nbuilders = [\"linux\"]",
            ),
            "kiln.toml: schedulers.\"s\".timezone: \"Europe/Pariss\" is not a time zone; give an IANA name, as \"Europe/Paris\" or \"UTC\"",
        ),
        (
            s("type = \"any-branch\"\nbranches = [\"release/[\"]\nbuilders = [\"linux\"]"),
            "kiln.toml: schedulers.\"s\".branches: \"release/[\" is not a valid glob: unclosed character class; missing ']'",
        ),
        (
            s(
                "type = \"single-branch\"\nbranch = \"main\"\nfile_is_important = [\"src/{a\"]\nbuilders = [\"linux\"]",
            ),
            "kiln.toml: schedulers.\"s\".file_is_important: \"src/{a\" is not a valid glob: unclosed alternate group; missing '}' (maybe escape '{' with '[{]'?)",
        ),
        (
            s(
                "type = \"single-branch\"\nbranch = \"main\"\nonly_important = true\nbuilders = [\"linux\"]",
            ),
            "kiln.toml: schedulers.\"s\".only_important: needs file_is_important, which says which files are important",
        ),
        (
            s(
                "type = \"single-branch\"\nbranch = \"main\"\npolicy = \"filter.wasm\"\nbuilders = [\"linux\"]",
            ),
            "kiln.toml: schedulers.\"s\".policy: \"filter.wasm\": write \"module:NAME@VERSION\" or \"policy:PATH.wasm\"",
        ),
        (
            s(
                "type = \"force\"\nbuilders = [\"linux\"]\nparameters = [{ name = \"v\", type = \"string\", regex = \"(a\" }]",
            ),
            "kiln.toml: schedulers.\"s\".parameters[0].regex: \"(a\" is not a valid regular expression: unclosed group",
        ),
        (
            s(
                "type = \"force\"\nbuilders = [\"linux\"]\nparameters = [{ name = \"v\", type = \"choice\", choices = [] }]",
            ),
            "kiln.toml: schedulers.\"s\".parameters[0]: a choice parameter needs choices = [...], at least one",
        ),
        (
            s(
                "type = \"force\"\nbuilders = [\"linux\"]\nparameters = [{ name = \"v\", type = \"choice\", choices = [\"a\"], default = \"b\" }]",
            ),
            "kiln.toml: schedulers.\"s\".parameters[0].default: \"b\" is not one of the choices (a)",
        ),
        (
            s(
                "type = \"force\"\nbuilders = [\"linux\"]\nparameters = [{ name = \"v\", type = \"int\", default = \"4\" }]",
            ),
            "kiln.toml: schedulers.\"s\".parameters[0].default: \"4\" is not an integer, the type of this parameter",
        ),
        (
            s(
                "type = \"force\"\nbuilders = [\"linux\"]\nparameters = [{ name = \"v\", type = \"bool\", regex = \"x\" }]",
            ),
            "kiln.toml: schedulers.\"s\".parameters[0].regex: only a string parameter has a regex (this one is \"bool\")",
        ),
        (
            s(
                "type = \"force\"\nbuilders = [\"linux\"]\nparameters = [{ name = \"v\", type = \"float\" }]",
            ),
            "kiln.toml: schedulers.\"s\".parameters[0].type: \"float\" is not a parameter type; give one of string, int, bool, choice",
        ),
        (
            s(
                "type = \"force\"\nbuilders = [\"linux\"]\nparameters = [{ name = \"reason\", type = \"string\" }]",
            ),
            "kiln.toml: schedulers.\"s\".parameters[0].name: \"reason\" is always asked for; choose another name",
        ),
        (
            s("type = \"dependent\"\nupstream = \"nope\"\nbuilders = [\"linux\"]"),
            "kiln.toml: schedulers.\"s\".upstream: names scheduler \"nope\", which is not defined (defined: none)",
        ),
        (
            s("type = \"dependent\"\nbuilders = [\"linux\"]"),
            "kiln.toml: schedulers.\"s\": a dependent scheduler needs upstream = \"...\", the scheduler whose builds it follows",
        ),
        (
            s(
                "type = \"try\"\nbuilders = [\"linux\"]\n[[schedulers]]\nname = \"s\"\ntype = \"try\"\nbuilders = [\"linux\"]",
            ),
            "kiln.toml: schedulers[1].name: scheduler \"s\" is already defined by schedulers[0]; names must be unique",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(error(&text), expected, "{text}");
    }
    // A cycle of dependents is reported once, wherever it is entered.
    let cycle = s(
        "type = \"dependent\"\nupstream = \"b\"\nbuilders = [\"linux\"]\n[[schedulers]]\nname = \"b\"\ntype = \"dependent\"\nupstream = \"c\"\nbuilders = [\"linux\"]\n[[schedulers]]\nname = \"c\"\ntype = \"dependent\"\nupstream = \"s\"\nbuilders = [\"linux\"]\n[[schedulers]]\nname = \"d\"\ntype = \"dependent\"\nupstream = \"d\"\nbuilders = [\"linux\"]",
    );
    assert_eq!(
        errors(&cycle),
        [
            "kiln.toml: schedulers.\"s\".upstream: dependent schedulers form a cycle (s -> b -> c -> s), so none of them would ever build; make one depend on a scheduler that is not dependent",
            "kiln.toml: schedulers.\"d\".upstream: dependent schedulers form a cycle (d -> d), so none of them would ever build; make one depend on a scheduler that is not dependent",
        ]
    );
}

#[test]
fn master_hook_and_secret_mistakes() {
    let cases = [
        (
            "[master]\nlisten = \"localhost:8010\"",
            "kiln.toml: master.listen: \"localhost:8010\" is not an address and port; give an IP address and port, as \"127.0.0.1:8010\", \"0.0.0.0:8010\" or \"[::]:8010\"",
        ),
        (
            "[master]\ndatabase = \"mysql://db/kiln\"",
            "kiln.toml: master.database: \"mysql://db/kiln\" is not a supported database; give a file path (SQLite), \"sqlite:PATH\" or \"postgres://USER:PASSWORD@HOST/DATABASE\"",
        ),
        (
            "[master]\nurl = \"ci.example.org\"",
            "kiln.toml: master.url: \"ci.example.org\" is not an http:// or https:// URL with a host",
        ),
        (
            "[master]\nheartbeat = \"0s\"",
            "kiln.toml: master.heartbeat: \"0s\" is too short; give at least 1s",
        ),
        (
            "[hooks]\nnext_worker = \"fastest\"",
            "kiln.toml: hooks.next_worker: \"fastest\" is not a choice; give \"least-busy\", \"random\", or a policy component (\"module:NAME@VERSION\" or \"policy:PATH.wasm\")",
        ),
        (
            "[hooks]\ncollapse_requests = \"module:x\"",
            "kiln.toml: hooks.collapse_requests: \"x\" is not NAME@VERSION",
        ),
        (
            "[hooks]\ncan_start_build = \"policy:gate.wasm\"",
            "kiln.toml: hooks.can_start_build: /gate.wasm: no such file; build the policy component or fix the path (relative to the configuration's directory)",
        ),
        (
            "[secrets]\nenv_prefix = \"KILN-\"",
            "kiln.toml: secrets.env_prefix: \"KILN-\" is not an environment variable prefix; use letters, digits and '_', as \"KILN_SECRET_\"",
        ),
    ];
    for (text, expected) in cases {
        // `kiln.toml` names no directory: relative paths resolve against the working one.
        let expected = expected.replace(
            " /gate.wasm",
            &format!(
                " {}",
                std::env::current_dir().unwrap().join("gate.wasm").display()
            ),
        );
        assert_eq!(error(text), expected, "{text}");
    }
}

#[test]
fn change_source_and_reporter_mistakes() {
    let with_builder =
        |rest: &str| with_workers(&format!("[[builders]]\nname = \"linux\"\n{STEP}\n{rest}"));
    let cases = [
        (
            "[[change_sources]]\nname = \"c\"\ntype = \"svn-poller\"",
            "kiln.toml: change_sources.\"c\".type: \"svn-poller\" is not a change source type; give one of git-poller, github, gitlab, gitea, generic",
        ),
        (
            "[[change_sources]]\nname = \"c\"\ntype = \"git-poller\"",
            "kiln.toml: change_sources.\"c\": a git-poller needs repourl = \"...\", the repository to poll",
        ),
        (
            "[[change_sources]]\nname = \"c\"\ntype = \"git-poller\"\nrepourl = \"r\"\ninterval = \"0s\"",
            "kiln.toml: change_sources.\"c\".interval: \"0s\" is too short; give at least 1s",
        ),
        (
            "[[change_sources]]\nname = \"c\"\ntype = \"github\"\nrepourl = \"r\"\nsecret = \"s\"",
            "kiln.toml: change_sources.\"c\".repourl: does not apply to a github change source (its fields: secret, project, category)",
        ),
        (
            "[[change_sources]]\nname = \"c\"\ntype = \"github\"\nsecret = \"%(secret:a b)s\"",
            "kiln.toml: change_sources.\"c\".secret: secret name \"a b\": use 1 to 100 letters, digits, '_', '-' and '.', not starting with '.'",
        ),
        (
            "[[reporters]]\nname = \"r\"\ntype = \"irc\"",
            "kiln.toml: reporters.\"r\".type: \"irc\" is not a reporter type; give one of http, github-status, gitlab-status, gitea-status, email",
        ),
        (
            "[[reporters]]\nname = \"r\"\ntype = \"http\"",
            "kiln.toml: reporters.\"r\": an http reporter needs url = \"https://...\"",
        ),
        (
            "[[reporters]]\nname = \"r\"\ntype = \"http\"\nurl = \"https://x\"\nmode = \"sometimes\"",
            "kiln.toml: reporters.\"r\".mode: \"sometimes\" is not a mode; give \"all\", \"failing\" or \"problem\"",
        ),
        (
            "[[reporters]]\nname = \"r\"\ntype = \"github-status\"",
            "kiln.toml: reporters.\"r\": a github-status reporter needs token = \"%(secret:NAME)s\", an API token",
        ),
        (
            "[[reporters]]\nname = \"r\"\ntype = \"gitea-status\"\ntoken = \"t\"",
            "kiln.toml: reporters.\"r\": a gitea-status reporter needs base_url = \"https://...\", the forge's address",
        ),
        (
            "[[reporters]]\nname = \"r\"\ntype = \"email\"\nrelay = \"smtp\"\nfrom = \"kiln\"\nto = [\"a@b\"]",
            "kiln.toml: reporters.\"r\".from: \"kiln\" is not a mail address (user@domain)",
        ),
        (
            "[[reporters]]\nname = \"r\"\ntype = \"email\"\nrelay = \"smtp\"\nfrom = \"k@b\"",
            "kiln.toml: reporters.\"r\": an email reporter needs to = [...] or lookup = \"DOMAIN\" (or both), or it mails no one",
        ),
        (
            "[[reporters]]\nname = \"r\"\ntype = \"email\"\nrelay = \"smtp\"\nfrom = \"k@b\"\nlookup = \"b\"\ntoken = \"t\"",
            "kiln.toml: reporters.\"r\".token: does not apply to an email reporter (its fields: relay, from, to, lookup, mode, smtp_user, smtp_password, builders, buildsets)",
        ),
        (
            "[[reporters]]\nname = \"r\"\ntype = \"email\"\nrelay = \"smtp\"\nfrom = \"k@b\"\nlookup = \"jane@example.org\"",
            "kiln.toml: reporters.\"r\".lookup: \"jane@example.org\": give a mail domain, as \"example.org\", or a table of authors to addresses, as { \"jane\" = \"jane@example.org\" }",
        ),
        (
            "[[reporters]]\nname = \"r\"\ntype = \"email\"\nrelay = \"smtp\"\nfrom = \"k@b\"\nlookup = {}",
            "kiln.toml: reporters.\"r\".lookup: the table names no author; map each to an address, as { \"jane\" = \"jane@example.org\" }, or give a mail domain",
        ),
        (
            "[[reporters]]\nname = \"r\"\ntype = \"email\"\nrelay = \"smtp\"\nfrom = \"k@b\"\nlookup = { jane = \"jane\" }",
            "kiln.toml: reporters.\"r\".lookup.\"jane\": \"jane\" is not a mail address (user@domain)",
        ),
        (
            "[[reporters]]\nname = \"r\"\ntype = \"email\"\nrelay = \"smtp\"\nfrom = \"k@b\"\nlookup = { \" \" = \"a@b\" }",
            "kiln.toml: reporters.\"r\".lookup.\" \": an empty author; give an author's name, address or user name",
        ),
        (
            "[[reporters]]\nname = \"r\"\ntype = \"email\"\nrelay = \"smtp\"\nfrom = \"k@b\"\nlookup = { jane = \"a@b\", Jane = \"c@d\" }",
            "kiln.toml: reporters.\"r\".lookup.\"jane\": names the same author as \"Jane\" (authors are matched ignoring case); keep one",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(error(&with_builder(text)), expected, "{text}");
    }
    // A lookup of the wrong type is a TOML error at its line and column.
    assert_eq!(
        error(&with_builder(
            "[[reporters]]\nname = \"r\"\ntype = \"email\"\nrelay = \"smtp\"\nfrom = \"k@b\"\nlookup = [\"example.org\"]"
        )),
        "kiln.toml:23:10: reporters.\"r\".lookup: invalid type: sequence, expected a mail domain, such as \"example.org\", or a table of authors to addresses, such as { \"jane\" = \"jane@example.org\" }"
    );
    assert_eq!(
        error(&with_builder(
            "[[reporters]]\nname = \"r\"\ntype = \"email\"\nrelay = \"smtp\"\nfrom = \"k@b\"\nlookup = { jane = 3 }"
        )),
        "kiln.toml:23:19: reporters.\"r\".lookup.jane: invalid type: integer `3`, expected a string"
    );
    // The table form: authors by identifier, address or user, in lower case.
    let c = config::parse(
        &with_builder(
            "[[reporters]]\nname = \"r\"\ntype = \"email\"\nrelay = \"smtp\"\nfrom = \"k@b\"\n[reporters.lookup]\nJane = \"jane@corp.example\"\n\"Bob <bob@laptop>\" = \"bob@corp.example\"",
        ),
        Path::new("kiln.toml"),
    )
    .unwrap();
    let ReporterKind::Email { lookup, .. } = &c.reporter("r").unwrap().kind else {
        panic!()
    };
    assert_eq!(
        lookup,
        &Some(Lookup::Map(
            [
                ("jane".to_owned(), "jane@corp.example".to_owned()),
                ("bob <bob@laptop>".to_owned(), "bob@corp.example".to_owned()),
            ]
            .into()
        ))
    );
    assert_eq!(
        error(&with_builder(
            "[[reporters]]\nname = \"r\"\ntype = \"http\"\nurl = \"https://x\"\nbuilders = [\"mac\"]"
        )),
        "kiln.toml: reporters.\"r\".builders: names builder \"mac\", which is not defined (defined: linux)"
    );
    let c = config::parse(
        &with_builder("[[change_sources]]\nname = \"c\"\ntype = \"generic\""),
        Path::new("kiln.toml"),
    )
    .unwrap();
    assert_eq!(
        warnings(&c),
        [
            "kiln.toml: change_sources.\"c\": the webhook has no secret, so anyone who can reach the master can post changes; set secret = \"%(secret:NAME)s\""
        ]
    );
}

#[test]
fn diff_lists_what_a_reload_changes() {
    let (dir, old) = load_full();
    let changed = FULL
        .replace("max_builds = 3", "max_builds = 4")
        .replace("name = \"anywhere\"", "name = \"everywhere\"")
        .replace("builders = [\"anywhere\"]", "builders = [\"everywhere\"]")
        .replace("listen = \"0.0.0.0:9000\"", "listen = \"0.0.0.0:9001\"")
        .replace("title = \"Full\"", "title = \"Fuller\"")
        .replace("include = [{ os = \"linux\", rust = \"beta\" }]", "");
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, changed).unwrap();
    let new = config::load(&path).unwrap();
    let diff = old.diff(&new);
    assert_eq!(diff.workers.changed, ["w1"]);
    assert_eq!(diff.builders.added, ["everywhere"]);
    assert_eq!(diff.builders.removed, ["anywhere", "t-linux-beta"]);
    assert_eq!(diff.needs_restart(), ["listen"]);
    assert_eq!(
        diff.to_string(),
        "workers: changed w1\n\
         builders: added everywhere; removed anywhere, t-linux-beta\n\
         schedulers: changed main, hourly, later, after\n\
         reporters: changed gh\n\
         master: changed listen, title (needs a restart: listen)"
    );
    assert!(old.diff(&old).is_empty());
    assert_eq!(old.diff(&old).to_string(), "no changes");
}
