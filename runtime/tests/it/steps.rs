//! Properties, reports, artifacts and loading.

use runtime::{Loaded, Outcome, ReportEvent, Url};
use serde_json::json;

use crate::harness::{Farm, runtime};

#[test]
fn a_property_set_by_one_step_is_read_by_the_next() {
    let mut farm = Farm::new();
    let (first, _) =
        farm.run(json!({"action": "set-prop", "name": "got_revision", "value": "abc123"}));
    assert_eq!(first.result, Outcome::Success);
    assert_eq!(first.properties["got_revision"], json!("abc123"));
    for (name, value) in first.properties {
        farm.properties.set(name, value, "Step probe");
    }
    let (second, rec) = farm.run(json!({"action": "get-prop", "name": "got_revision"}));
    assert_eq!(second.summary.as_deref(), Some("got_revision=\"abc123\""));
    assert_eq!(rec.text("stdio", runtime::Channel::Stdout), "\"abc123\"\n");
    // And through interpolation of the next step's arguments.
    let (third, _) = farm.run(json!({"action": "echo-args", "text": "rev %(prop:got_revision)s"}));
    assert_eq!(third.summary.as_deref(), Some("rev abc123"));
}

#[test]
fn bad_property_names_are_refused() {
    let farm = Farm::new();
    let (out, _) = farm.run(json!({"action": "set-prop", "name": "", "value": 1}));
    assert_eq!(out.result, Outcome::Failure);
    assert_eq!(
        out.message.as_deref(),
        Some("invalid: property name is empty")
    );
}

#[test]
fn reports_stream_live_and_land_in_the_outcome() {
    let farm = Farm::new();
    let (out, rec) = farm.run(json!({"action": "report"}));
    assert_eq!(out.statistics["answer"], 42.0);
    assert_eq!(out.statistics["count"], 3.0);
    assert_eq!(out.progress["output"], 7);
    assert_eq!(
        out.urls,
        vec![Url {
            name: "docs".into(),
            url: "https://example.org/docs".into()
        }]
    );
    assert_eq!(out.summary.as_deref(), Some("reported"));
    let reports = rec.reports.lock().unwrap();
    assert_eq!(reports.len(), 6);
    assert_eq!(
        reports[5],
        ReportEvent::Summary {
            text: "reported".into()
        }
    );
}

#[test]
fn artifacts_round_trip_with_checksums() {
    let farm = Farm::new();
    std::fs::write(farm.path("app.tar"), "payload\n").unwrap();
    let (out, _) = farm.run(json!({"action": "upload", "path": "app.tar", "name": "dist/app.tar"}));
    assert_eq!(out.result, Outcome::Success, "{:?}", out.message);
    assert_eq!(
        out.summary.as_deref(),
        Some("uploaded dist/app.tar (8 bytes, sha1 997e49bbf4ad5ee847d0e77aa30648c70c71323c)")
    );
    assert_eq!(
        std::fs::read_to_string(farm.store.path().join("dist/app.tar")).unwrap(),
        "payload\n"
    );

    let (out, _) =
        farm.run(json!({"action": "download", "name": "dist/app.tar", "path": "copy/app.tar"}));
    assert_eq!(
        out.summary.as_deref(),
        Some("downloaded dist/app.tar (8 bytes)")
    );
    assert_eq!(
        std::fs::read_to_string(farm.path("copy/app.tar")).unwrap(),
        "payload\n"
    );
}

#[test]
fn artifacts_never_follow_symlinks_or_leave_the_workdir() {
    let farm = Farm::new();
    std::os::unix::fs::symlink("/etc/passwd", farm.path("passwd")).unwrap();
    let (out, _) = farm.run(json!({"action": "upload", "path": "passwd", "name": "p"}));
    assert_eq!(
        out.message.as_deref(),
        Some("not found: passwd is or passes through a symlink, which Kiln never follows")
    );
    let (out, _) = farm.run(json!({"action": "upload", "path": "/etc/passwd", "name": "p"}));
    assert_eq!(
        out.message.as_deref(),
        Some("invalid: path \"/etc/passwd\" is absolute; paths are relative to the workdir")
    );
    let (out, _) = farm.run(json!({"action": "upload", "path": "x", "name": "../p"}));
    assert!(
        out.message
            .unwrap()
            .starts_with("invalid: artifact name \"../p\" is not valid")
    );
    let (out, _) = farm.run(json!({"action": "download", "name": "missing", "path": "x"}));
    assert_eq!(
        out.message.as_deref(),
        Some("not found: no artifact named \"missing\"")
    );

    // A download onto a symlink replaces the link instead of writing through it.
    std::fs::write(farm.store.path().join("f"), "new").unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("target"), "old").unwrap();
    std::os::unix::fs::symlink(outside.path().join("target"), farm.path("dl")).unwrap();
    let (out, _) = farm.run(json!({"action": "download", "name": "f", "path": "dl"}));
    assert_eq!(out.result, Outcome::Success);
    assert_eq!(
        std::fs::read_to_string(outside.path().join("target")).unwrap(),
        "old"
    );
    assert_eq!(std::fs::read_to_string(farm.path("dl")).unwrap(), "new");
}

#[test]
fn artifact_size_is_limited() {
    let mut farm = Farm::new();
    farm.grant.limits.max_artifact_bytes = 4;
    std::fs::write(farm.path("big"), "12345").unwrap();
    let (out, _) = farm.run(json!({"action": "upload", "path": "big", "name": "big"}));
    assert_eq!(
        out.message.as_deref(),
        Some("too large: big is larger than the 4-byte limit")
    );
}

#[test]
fn loading_tells_what_is_wrong() {
    let rt = runtime();
    let err = |bytes: &[u8]| {
        rt.load(bytes, "x.wasm")
            .err()
            .map(|e| e.to_string())
            .unwrap()
    };
    assert_eq!(
        err(b"hello world"),
        "x.wasm is not a WebAssembly file (it does not start with \\0asm); give the .wasm file cargo built"
    );
    assert!(
        err(b"\0asm\x01\0\0\0").starts_with("x.wasm is a core WebAssembly module, not a component")
    );
    assert!(err(b"\0asm\x0d\0\x01\0garbage").starts_with("x.wasm is not a valid component: "));
    let missing = rt
        .load_file(std::path::Path::new("/nonexistent/step.wasm"))
        .err()
        .unwrap();
    assert_eq!(
        missing.to_string(),
        "cannot read /nonexistent/step.wasm: No such file or directory (os error 2)"
    );
    // An empty component exports nothing.
    assert_eq!(
        err(b"\0asm\x0d\0\x01\0"),
        "x.wasm is not a Kiln step, observer or policy: it exports nothing; a step exports `run` (world `step`, \
         guest_sdk::step!), an observer exports `kiln:step/observer@0.1.0` (world `log-observer`, guest_sdk::observer!) \
         and a policy exports `kiln:step/policy@0.1.0` (world `farm-policy`, guest_sdk::policy!)"
    );
}

#[test]
fn components_load_as_their_world_and_are_cached() {
    let rt = runtime();
    let a = rt.load(steps::fixtures::PROBE_STEP, "probe").unwrap();
    assert!(matches!(a, Loaded::Step(_)));
    let b = rt.load(steps::fixtures::COUNT_OBSERVER, "count").unwrap();
    assert!(matches!(b, Loaded::Observer(_)));
    let again = rt.load(steps::fixtures::PROBE_STEP, "probe").unwrap();
    assert_eq!(again.digest(), a.digest());
}

#[test]
fn compiled_components_come_from_the_disk_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("c");
    let new_runtime = || {
        runtime::Runtime::new(runtime::RuntimeConfig {
            cache_dir: Some(cache.clone()),
        })
        .unwrap()
    };
    let first = new_runtime();
    let probe = first
        .load(steps::fixtures::PROBE_STEP, "probe")
        .unwrap()
        .digest();
    let counter = first
        .load(steps::fixtures::COUNT_OBSERVER, "count")
        .unwrap()
        .digest();
    let file_of = |digest: runtime::ModuleDigest| {
        std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&digest.to_string())
            })
            .expect("a cache file named by the SHA-256 of the bytes")
    };
    let (probe_file, counter_file) = (file_of(probe), file_of(counter));
    assert!(probe_file.to_string_lossy().ends_with(".cwasm"));

    // Put the observer's compiled code under the step's key: a new runtime loading the step's
    // bytes gets an observer, so it used the cache rather than compiling.
    std::fs::copy(&counter_file, &probe_file).unwrap();
    assert!(matches!(
        new_runtime()
            .load(steps::fixtures::PROBE_STEP, "probe")
            .unwrap(),
        Loaded::Observer(_)
    ));

    // A damaged entry is discarded and rebuilt.
    std::fs::write(&probe_file, b"garbage").unwrap();
    assert!(matches!(
        new_runtime()
            .load(steps::fixtures::PROBE_STEP, "probe")
            .unwrap(),
        Loaded::Step(_)
    ));
    assert!(std::fs::metadata(&probe_file).unwrap().len() > 1000);

    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // A cache directory others can write is refused: its contents run without validation.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = runtime::Runtime::new(runtime::RuntimeConfig {
        cache_dir: Some(cache.clone()),
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "component cache {}: writable by group or others; run chmod 700 on it",
            cache.display()
        )
    );
}

#[test]
fn directories_upload_as_tar_streams_without_following_symlinks() {
    let farm = Farm::new();
    std::fs::create_dir_all(farm.path("dist/docs")).unwrap();
    std::fs::write(farm.path("dist/app"), "binary").unwrap();
    std::fs::write(farm.path("dist/docs/README"), "read me").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", farm.path("dist/passwd")).unwrap();
    let (out, rec) = farm.run(json!({"action": "upload-dir", "path": "dist", "name": "dist.tar"}));
    assert_eq!(out.result, Outcome::Success, "{:?}", out.message);
    assert!(
        rec.all("stdio")
            .contains("uploaded directory dist as artifact dist.tar (4 entries, ")
    );
    let stream = std::fs::read(farm.store.path().join("dist.tar")).unwrap();
    let mut names: Vec<String> = tar::Archive::new(&stream[..])
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            format!(
                "{} {} {:?}",
                e.path().unwrap().display(),
                e.header().size().unwrap(),
                e.header().entry_type()
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "app 6 Regular",
            "docs 0 Directory",
            "docs/README 7 Regular",
            "passwd 0 Symlink"
        ]
    );

    let mut small = Farm::new();
    small.grant.limits.max_artifact_bytes = 1000;
    std::fs::create_dir(small.path("d")).unwrap();
    std::fs::write(small.path("d/big"), vec![b'x'; 5000]).unwrap();
    let (out, _) = small.run(json!({"action": "upload-dir", "path": "d", "name": "d.tar"}));
    assert_eq!(
        out.message.as_deref(),
        Some("too large: the tar stream of d is larger than the 1000-byte limit")
    );
    let (out, _) = small.run(json!({"action": "upload-dir", "path": "nope", "name": "d.tar"}));
    assert_eq!(
        out.message.as_deref(),
        Some("not found: nope does not exist")
    );
}
