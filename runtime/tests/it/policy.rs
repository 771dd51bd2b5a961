//! Farm policies: every hook of the `policy-fixture` guest, each field across the boundary, the
//! deadline, the memory cap, a panic, an empty sandbox, and loading the wrong kind of component.

use std::time::{Duration, Instant};

use runtime::policy::{
    BuilderInfo, ChangeInfo, ChangeVerdict, Hook, PolicyError, PolicyFailure, PolicyLimits,
    RequestInfo, WorkerInfo,
};
use runtime::{Loaded, PolicyComponent};
use serde_json::{Value, json};

use crate::harness::runtime;

fn policy() -> PolicyComponent {
    runtime()
        .load_policy(steps::fixtures::POLICY, "policy-fixture")
        .unwrap()
}

fn request(id: u64, properties: Value) -> RequestInfo {
    RequestInfo {
        id,
        builder: "linux".into(),
        submitted_at: 1_700_000_000_000 + id as i64,
        properties: properties.as_object().cloned().unwrap_or_default(),
        ..Default::default()
    }
}

fn worker(name: &str, running_builds: u32, max_builds: u32) -> WorkerInfo {
    WorkerInfo {
        name: name.into(),
        running_builds,
        max_builds,
        ..Default::default()
    }
}

fn builder(name: &str) -> BuilderInfo {
    BuilderInfo {
        name: name.into(),
        ..Default::default()
    }
}

fn change(author: &str, files: &[&str]) -> ChangeInfo {
    ChangeInfo {
        id: 1,
        author: author.into(),
        repository: "https://example.org/repo.git".into(),
        files: files.iter().map(|f| f.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn a_policy_loads_as_a_policy() {
    let loaded = runtime().load(steps::fixtures::POLICY, "policy").unwrap();
    assert!(matches!(loaded, Loaded::Policy(_)));
    assert_eq!(loaded.kind(), "policy");
    let p = policy();
    assert_eq!(p.digest(), loaded.digest());
    assert_eq!(p.limits(), PolicyLimits::default());
    assert_eq!(p.limits().deadline, Duration::from_millis(100));
    assert_eq!(p.limits().memory_bytes, 64 << 20);
}

#[test]
fn collapse_requests_follows_the_collapse_key() {
    let p = policy();
    let a = request(1, json!({"collapse_key": "x"}));
    let b = request(2, json!({"collapse_key": "x"}));
    let c = request(3, json!({"collapse_key": "y"}));
    let none = request(4, json!({}));
    assert_eq!(p.collapse_requests("linux", &b, &a), Ok(Some(true)));
    assert_eq!(p.collapse_requests("linux", &c, &a), Ok(Some(false)));
    assert_eq!(p.collapse_requests("linux", &none, &a), Ok(None));
}

#[test]
fn prioritize_builders_sorts_names_descending() {
    let p = policy();
    let builders = [builder("b"), builder("c"), builder("a")];
    assert_eq!(
        p.prioritize_builders(&builders),
        Ok(Some(vec!["c".into(), "b".into(), "a".into()]))
    );
    assert_eq!(p.prioritize_builders(&[]), Ok(None));
}

#[test]
fn next_build_takes_the_highest_id_or_the_oldest_for_a_fifo_worker() {
    let p = policy();
    let mut requests = vec![
        request(5, json!({})),
        request(9, json!({})),
        request(7, json!({})),
    ];
    requests[1].submitted_at = 1; // 9 is the oldest
    requests[0].submitted_at = 2;
    assert_eq!(p.next_build("linux", None, &requests), Ok(Some(9)));
    let mut fifo = worker("w", 0, 1);
    fifo.tags = vec!["fifo".into()];
    requests[1].submitted_at = 10;
    assert_eq!(p.next_build("linux", Some(&fifo), &requests), Ok(Some(5)));
    assert_eq!(p.next_build("linux", Some(&fifo), &[]), Ok(None));
}

#[test]
fn next_worker_picks_the_last_name_with_room() {
    let p = policy();
    let workers = [worker("w1", 0, 1), worker("w3", 2, 2), worker("w2", 1, 2)];
    assert_eq!(
        p.next_worker("linux", &workers, &request(1, json!({}))),
        Ok(Some("w2".into()))
    );
    assert_eq!(
        p.next_worker("linux", &[], &request(1, json!({}))),
        Ok(None)
    );
}

#[test]
fn can_start_build_follows_the_block_property() {
    let p = policy();
    let w = worker("w1", 0, 1);
    let blocked = request(1, json!({"block": true}));
    let allowed = request(2, json!({"block": false}));
    let unsaid = request(3, json!({"other": 1}));
    assert_eq!(p.can_start_build("linux", &w, &blocked), Ok(Some(false)));
    assert_eq!(p.can_start_build("linux", &w, &allowed), Ok(Some(true)));
    assert_eq!(p.can_start_build("linux", &w, &unsaid), Ok(None));
}

#[test]
fn change_filter_ignores_bots_and_values_rust() {
    let p = policy();
    assert_eq!(
        p.change_filter("main", &change("bot", &["src/lib.rs"])),
        Ok(Some(ChangeVerdict::Ignore))
    );
    assert_eq!(
        p.change_filter("main", &change("ada", &["README.md", "src/lib.rs"])),
        Ok(Some(ChangeVerdict::Important))
    );
    assert_eq!(
        p.change_filter("main", &change("ada", &["README.md"])),
        Ok(Some(ChangeVerdict::Unimportant))
    );
    assert_eq!(
        p.change_filter("indifferent", &change("ada", &["a.rs"])),
        Ok(None)
    );
}

#[test]
fn every_field_crosses_the_boundary_intact() {
    let p = policy();
    let req = RequestInfo {
        id: u64::MAX,
        builder: "linux-ünïcode".into(),
        priority: -3,
        submitted_at: -1,
        reason: "forced by ada".into(),
        branch: Some("main".into()),
        repository: None,
        codebase: "app".into(),
        has_patch: true,
        properties: json!({"n": 1.5, "s": "x", "l": [1, null], "o": {"k": true}})
            .as_object()
            .cloned()
            .unwrap(),
    };
    let w = WorkerInfo {
        name: "w1".into(),
        arch: Some("x86_64".into()),
        os: None,
        tags: vec!["a".into(), "b".into()],
        sandbox: true,
        running_builds: 1,
        max_builds: u32::MAX,
    };
    let answer = p
        .next_worker("echo", std::slice::from_ref(&w), &req)
        .unwrap()
        .unwrap();
    let echoed: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        echoed,
        json!({"request": serde_json::to_value(&req).unwrap(), "workers": [serde_json::to_value(&w).unwrap()]})
    );

    let b = BuilderInfo {
        name: "echo".into(),
        priority: i32::MIN,
        oldest_request_at: Some(i64::MAX),
        queued: 7,
        tags: vec!["release".into()],
    };
    let answer = p
        .prioritize_builders(std::slice::from_ref(&b))
        .unwrap()
        .unwrap();
    let echoed: Vec<Value> = answer
        .iter()
        .map(|a| serde_json::from_str(a).unwrap())
        .collect();
    assert_eq!(echoed, vec![serde_json::to_value(&b).unwrap()]);
}

#[test]
fn an_infinite_loop_hits_the_deadline_quickly() {
    let p = policy();
    let started = Instant::now();
    let err = p
        .next_worker("loop", &[worker("w1", 0, 1)], &request(1, json!({})))
        .unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(
        err,
        PolicyError {
            hook: Hook::NextWorker,
            failure: PolicyFailure::Deadline(Duration::from_millis(100)),
        }
    );
    assert_eq!(
        err.to_string(),
        "policy hook next-worker ran past its deadline of 100 ms; a hook must answer at once, without waiting or looping"
    );
    assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");

    // The deadline is configurable, and the policy answers normally afterwards.
    let quick = p.clone().with_limits(PolicyLimits {
        deadline: Duration::from_millis(30),
        ..PolicyLimits::default()
    });
    let started = Instant::now();
    let err = quick
        .change_filter("loop", &change("ada", &[]))
        .unwrap_err();
    assert_eq!(
        err.failure,
        PolicyFailure::Deadline(Duration::from_millis(30))
    );
    assert_eq!(err.hook, Hook::ChangeFilter);
    assert!(started.elapsed() < Duration::from_millis(300));
    assert_eq!(
        p.next_worker("linux", &[worker("w1", 0, 1)], &request(1, json!({}))),
        Ok(Some("w1".into()))
    );
}

#[test]
fn the_deadline_holds_after_the_runtime_is_gone() {
    // The policy keeps the epoch ticker alive: without it, a loop would never be stopped.
    let rt = runtime::Runtime::new(runtime::RuntimeConfig::default()).unwrap();
    let p = rt.load_policy(steps::fixtures::POLICY, "policy").unwrap();
    drop(rt);
    let started = Instant::now();
    let err = p.next_build("loop", None, &[]).unwrap_err();
    assert_eq!(
        err.failure,
        PolicyFailure::Deadline(Duration::from_millis(100))
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn a_memory_bomb_hits_the_memory_cap() {
    let p = policy();
    let err = p
        .collapse_requests("oom", &request(2, json!({})), &request(1, json!({})))
        .unwrap_err();
    assert_eq!(err.hook, Hook::CollapseRequests);
    match err.failure {
        PolicyFailure::Memory {
            limit_bytes,
            asked_bytes,
        } => {
            assert_eq!(limit_bytes, 64 << 20);
            assert!(asked_bytes > limit_bytes);
        }
        other => panic!("expected the memory cap, got {other:?}"),
    }
    assert!(
        err.to_string().starts_with(
            "policy hook collapse-requests exceeded the memory limit of 64 MiB (it asked for "
        ),
        "{err}"
    );

    let small = p.with_limits(PolicyLimits {
        memory_bytes: 8 << 20,
        ..PolicyLimits::default()
    });
    let err = small.can_start_build("oom", &worker("w", 0, 1), &request(1, json!({})));
    assert!(
        matches!(
            err,
            Err(PolicyError {
                hook: Hook::CanStartBuild,
                failure: PolicyFailure::Memory {
                    limit_bytes: 0x80_0000,
                    ..
                }
            })
        ),
        "{err:?}"
    );
}

#[test]
fn a_panic_is_reported_with_its_message() {
    let p = policy();
    let err = p.prioritize_builders(&[builder("panic")]).unwrap_err();
    assert_eq!(err.hook, Hook::PrioritizeBuilders);
    let PolicyFailure::Panic(message) = &err.failure else {
        panic!("expected a panic, got {:?}", err.failure);
    };
    assert!(
        message.ends_with(": the policy panicked on purpose"),
        "{message}"
    );
    assert!(
        err.to_string().starts_with(
            "policy hook prioritize-builders panicked at steps/fixtures/policy-fixture/src/lib.rs:"
        ),
        "{err}"
    );
}

#[test]
fn a_policy_sees_no_files_environment_or_arguments() {
    let p = policy();
    let answer = p
        .next_worker("snoop", &[], &request(1, json!({})))
        .unwrap()
        .unwrap();
    let seen: Value = serde_json::from_str(&answer).unwrap();
    let text = |key: &str| seen[key].as_str().unwrap_or_default().to_owned();
    assert!(text("root").starts_with("error: "), "{seen}");
    assert!(text("passwd").starts_with("error: "), "{seen}");
    assert_eq!(seen["env"], json!([]), "{seen}");
    assert_eq!(seen["args"], json!([]), "{seen}");
    // With no preopens there is no initial directory; wasi-libc starts at "/", not the host's.
    assert_eq!(seen["cwd"], json!("/"), "{seen}");
}

#[test]
fn other_components_are_refused_as_policies() {
    let err = runtime()
        .load_policy(steps::fixtures::PROBE_STEP, "probe.wasm")
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "probe.wasm is a step, not a policy; a policy exports `kiln:step/policy@0.1.0` (world `farm-policy`, \
         guest_sdk::policy!)"
    );
    let err = runtime()
        .load_policy(steps::fixtures::COUNT_OBSERVER, "count.wasm")
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("count.wasm is an observer, not a policy;"),
        "{err}"
    );
}

#[test]
fn concurrent_calls_are_independent() {
    let p = policy();
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let p = p.clone();
            std::thread::spawn(move || {
                let name = if i == 0 { "loop" } else { "linux" };
                let requests = [request(i, json!({})), request(i + 10, json!({}))];
                p.next_build(name, None, &requests)
            })
        })
        .collect();
    let answers: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(matches!(
        answers[0],
        Err(PolicyError {
            failure: PolicyFailure::Deadline(_),
            ..
        })
    ));
    for (i, answer) in answers.iter().enumerate().skip(1) {
        assert_eq!(*answer, Ok(Some(i as u64 + 10)));
    }
}
