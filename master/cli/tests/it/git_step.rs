//! The git step against real repositories made by the test: commits, a branch, a submodule.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::dir;
use crate::standard_steps::step;

pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Kiln Test",
            "-c",
            "user.email=test@kiln.invalid",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(["-c", "protocol.file.allow=always"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An upstream repository: two commits on main, one on branch "feature", a .gitignore for
/// *.o, and (optionally) a submodule.
struct Upstream {
    _root: tempfile::TempDir,
    path: PathBuf,
    first: String,
    main: String,
    feature: String,
}

fn upstream(with_submodule: bool) -> Upstream {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("repo");
    std::fs::create_dir(&path).unwrap();
    git(&path, &["init", "-q"]);
    std::fs::write(path.join("README"), "one\n").unwrap();
    std::fs::write(path.join(".gitignore"), "*.o\n").unwrap();
    git(&path, &["add", "."]);
    git(&path, &["commit", "-qm", "first"]);
    let first = git(&path, &["rev-parse", "HEAD"]);
    if with_submodule {
        let sub = root.path().join("lib");
        std::fs::create_dir(&sub).unwrap();
        git(&sub, &["init", "-q"]);
        std::fs::write(sub.join("lib.txt"), "from the submodule\n").unwrap();
        git(&sub, &["add", "."]);
        git(&sub, &["commit", "-qm", "lib"]);
        git(
            &path,
            &["submodule", "add", "-q", sub.to_str().unwrap(), "lib"],
        );
    }
    std::fs::write(path.join("README"), "two\n").unwrap();
    git(&path, &["commit", "-qam", "second"]);
    let main = git(&path, &["rev-parse", "HEAD"]);
    git(&path, &["checkout", "-qb", "feature"]);
    std::fs::write(path.join("FEATURE"), "f\n").unwrap();
    git(&path, &["add", "FEATURE"]);
    git(&path, &["commit", "-qm", "feature"]);
    let feature = git(&path, &["rev-parse", "HEAD"]);
    git(&path, &["checkout", "-q", "main"]);
    Upstream {
        _root: root,
        path,
        first,
        main,
        feature,
    }
}

const FLAGS: &[&str] = &["--allow-program", "git", "--allow-program", "cp"];

#[test]
fn incremental_clone_then_update_keeps_local_files() {
    let up = upstream(false);
    let d = dir();
    let url = up.path.to_str().unwrap();
    let (code, out, log) = step(
        "git",
        json!({"repourl": url, "branch": "main"}),
        FLAGS,
        &d.workdir,
    );
    assert_eq!(code, 0, "{log}");
    assert_eq!(out["properties"]["got_revision"], up.main);
    assert_eq!(
        out["properties"]["got_revision_short"]
            .as_str()
            .unwrap()
            .len(),
        7
    );
    assert_eq!(
        out["summary"],
        format!("checked out main {}", &up.main[..7])
    );
    assert_eq!(
        std::fs::read_to_string(d.workdir.join("README")).unwrap(),
        "two\n"
    );
    assert!(
        log.contains("[hdr] $ git clone --no-checkout --branch main -- "),
        "{log}"
    );

    // New upstream work, and a local build product: incremental keeps the product.
    std::fs::write(up.path.join("README"), "three\n").unwrap();
    git(&up.path, &["commit", "-qam", "third"]);
    let third = git(&up.path, &["rev-parse", "HEAD"]);
    std::fs::write(d.workdir.join("build.o"), "obj").unwrap();
    let (_, out, _) = step(
        "git",
        json!({"repourl": url, "branch": "main"}),
        FLAGS,
        &d.workdir,
    );
    assert_eq!(out["properties"]["got_revision"], third);
    assert_eq!(
        std::fs::read_to_string(d.workdir.join("README")).unwrap(),
        "three\n"
    );
    assert!(d.workdir.join("build.o").exists());
}

#[test]
fn branches_and_revisions_are_checked_out() {
    let up = upstream(false);
    let url = up.path.to_str().unwrap();
    let d = dir();
    let (_, out, _) = step(
        "git",
        json!({"repourl": url, "branch": "feature", "dest": "src"}),
        FLAGS,
        &d.workdir,
    );
    assert_eq!(out["properties"]["got_revision"], up.feature);
    assert!(d.workdir.join("src/FEATURE").exists());
    let (_, out, _) = step(
        "git",
        json!({"repourl": url, "revision": up.first, "dest": "src"}),
        FLAGS,
        &d.workdir,
    );
    assert_eq!(out["properties"]["got_revision"], up.first);
    assert_eq!(
        std::fs::read_to_string(d.workdir.join("src/README")).unwrap(),
        "one\n"
    );
    // Without them in the arguments, the build's source stamp decides, as in Buildbot.
    let rev = format!("revision={}", up.first);
    let flags = [FLAGS, &["--prop", "branch=feature", "--prop", &rev]].concat();
    let (_, out, _) = step(
        "git",
        json!({"repourl": url, "dest": "b"}),
        &flags,
        &d.workdir,
    );
    assert_eq!(out["properties"]["got_revision"], up.first, "{out:#}");
    let flags = [FLAGS, &["--prop", "branch=feature"]].concat();
    let (_, out, _) = step(
        "git",
        json!({"repourl": url, "dest": "c"}),
        &flags,
        &d.workdir,
    );
    assert_eq!(out["properties"]["got_revision"], up.feature, "{out:#}");
    // The arguments win; an unset (empty) property is no revision.
    let flags = [FLAGS, &["--prop", "revision="]].concat();
    let (_, out, _) = step(
        "git",
        json!({"repourl": url, "branch": "main", "dest": "d"}),
        &flags,
        &d.workdir,
    );
    assert_eq!(out["properties"]["got_revision"], up.main, "{out:#}");
    // A pull request's head is a ref outside refs/heads, as a forge's webhook names it.
    git(&up.path, &["update-ref", "refs/pull/7/head", &up.feature]);
    git(&up.path, &["branch", "-qD", "feature"]);
    let flags = [FLAGS, &["--prop", "branch=refs/pull/7/head"]].concat();
    let (_, out, log) = step(
        "git",
        json!({"repourl": url, "dest": "pr"}),
        &flags,
        &d.workdir,
    );
    assert_eq!(out["properties"]["got_revision"], up.feature, "{log}");
    assert!(d.workdir.join("pr/FEATURE").exists());
}

#[test]
fn full_mode_methods() {
    let up = upstream(false);
    let url = up.path.to_str().unwrap();
    let d = dir();
    let w = &d.workdir;
    step("git", json!({"repourl": url, "dest": "src"}), FLAGS, w);
    std::fs::write(w.join("src/untracked.txt"), "u").unwrap();
    std::fs::write(w.join("src/ignored.o"), "o").unwrap();

    let (_, out, _) = step(
        "git",
        json!({"repourl": url, "dest": "src", "mode": "full", "method": "clean"}),
        FLAGS,
        w,
    );
    assert_eq!(out["result"], "SUCCESS");
    assert!(
        !w.join("src/untracked.txt").exists() && w.join("src/ignored.o").exists(),
        "clean keeps ignored files"
    );

    let (_, out, _) = step(
        "git",
        json!({"repourl": url, "dest": "src", "mode": "full"}),
        FLAGS,
        w,
    );
    assert_eq!(out["result"], "SUCCESS");
    assert!(
        !w.join("src/ignored.o").exists(),
        "fresh (the default) removes ignored files too"
    );

    std::fs::write(w.join("src/.git/kiln-marker"), "m").unwrap();
    let (_, out, _) = step(
        "git",
        json!({"repourl": url, "dest": "src", "mode": "full", "method": "clobber"}),
        FLAGS,
        w,
    );
    assert_eq!(out["properties"]["got_revision"], up.main);
    assert!(
        !w.join("src/.git/kiln-marker").exists(),
        "clobber starts from a new clone"
    );

    let (_, out, log) = step(
        "git",
        json!({"repourl": url, "dest": "build", "mode": "full", "method": "copy"}),
        FLAGS,
        w,
    );
    assert_eq!(out["result"], "SUCCESS", "{log}");
    assert_eq!(
        std::fs::read_to_string(w.join("build/README")).unwrap(),
        "two\n"
    );
    assert!(w.join(".kiln-git-source/.git").exists());
}

#[test]
fn shallow_clones_have_the_asked_depth() {
    let up = upstream(false);
    let d = dir();
    let url = format!("file://{}", up.path.display());
    let (_, out, log) = step(
        "git",
        json!({"repourl": url, "branch": "main", "shallow": 1}),
        FLAGS,
        &d.workdir,
    );
    assert_eq!(out["result"], "SUCCESS", "{log}");
    assert_eq!(git(&d.workdir, &["rev-list", "--count", "HEAD"]), "1");
}

#[test]
fn submodules_are_checked_out() {
    let up = upstream(true);
    let d = dir();
    let url = up.path.to_str().unwrap();
    let args = json!({"repourl": url, "branch": "main", "submodules": true, "config": {"protocol.file.allow": "always"}});
    let (_, out, log) = step("git", args, FLAGS, &d.workdir);
    assert_eq!(out["result"], "SUCCESS", "{log}");
    assert_eq!(
        std::fs::read_to_string(d.workdir.join("lib/lib.txt")).unwrap(),
        "from the submodule\n"
    );
}

#[test]
fn patches_are_applied_for_try_builds() {
    let up = upstream(false);
    let url = up.path.to_str().unwrap();
    let patch =
        "diff --git a/README b/README\n--- a/README\n+++ b/README\n@@ -1 +1 @@\n-two\n+patched\n";
    let d = dir();
    let (_, out, log) = step(
        "git",
        json!({"repourl": url, "branch": "main", "patch": patch}),
        FLAGS,
        &d.workdir,
    );
    assert_eq!(out["result"], "SUCCESS", "{log}");
    assert_eq!(
        out["properties"]["got_revision"], up.main,
        "the base revision"
    );
    assert_eq!(
        std::fs::read_to_string(d.workdir.join("README")).unwrap(),
        "patched\n"
    );

    let d = dir();
    let bad = json!({"repourl": url, "branch": "main", "patch": {"body": patch.replace("-two", "-nope"), "level": 1}});
    let (_, out, _) = step("git", bad, FLAGS, &d.workdir);
    assert_eq!(out["result"], "FAILURE");
    assert_eq!(
        out["message"],
        "the patch does not apply: git apply exit code 1"
    );
}

#[test]
fn failures_say_what_went_wrong() {
    let up = upstream(false);
    let d = dir();
    std::fs::write(d.workdir.join("stray"), "x").unwrap();
    let (_, out, _) = step(
        "git",
        json!({"repourl": up.path.to_str().unwrap()}),
        FLAGS,
        &d.workdir,
    );
    assert_eq!(
        out["message"],
        ". exists and is not a git repository; use mode \"full\" with method \"clobber\" to replace it"
    );
    let d = dir();
    let (_, out, log) = step(
        "git",
        json!({"repourl": "/nonexistent/repo"}),
        FLAGS,
        &d.workdir,
    );
    assert_eq!(out["result"], "FAILURE");
    assert_eq!(out["message"], "git clone: exit code 128");
    assert!(
        log.contains("[err] fatal: repository '/nonexistent/repo' does not exist"),
        "{log}"
    );
    let (_, out, _) = step("git", json!({"repourl": "x"}), &[], &d.workdir);
    assert!(
        out["message"]
            .as_str()
            .unwrap()
            .starts_with("denied: program \"git\" is not granted")
    );
}
