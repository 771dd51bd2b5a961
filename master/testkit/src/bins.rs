//! The workspace's binaries, for the tests and benchmarks of a package that does not build
//! them. Cargo gives a test `CARGO_BIN_EXE_<name>` only for its own package's binaries; the
//! farm tests (in `kiln-cli`, which owns `kiln`) also run `kiln-worker`, which `cargo test
//! --workspace` builds beside `kiln` in the target directory (and `cargo build -p kiln-worker`,
//! `--release` for the benchmarks).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// What `kiln-worker` is built from.
pub const WORKER_SOURCES: &[&str] = &["runtime", "steps", "guest-sdk", "wit"];

/// What `kiln` is checked against: nothing, since only kiln-cli's own tests run it, and cargo
/// builds a package's binaries afresh for its tests.
pub const KILN_SOURCES: &[&str] = &[];

/// The workspace's root (this crate is `master/testkit`).
fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// The path of workspace binary `name`, from the directory of the running test executable
/// (`target/<profile>/deps/..`, or `target/<profile>` for a bench run by `cargo bench`).
/// `sources` are the workspace folders it is built from (`runtime`, `steps`, ...).
///
/// Panics, naming the command to run, if it has not been built, or if a source file is newer
/// than it (the binary of an earlier build, which would test old code): a setup error, and
/// the test cannot mean anything with it.
pub fn workspace_bin(name: &str, sources: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running test");
    let mut dir = exe.parent().expect("the test's directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let release = dir.ends_with("release");
    let build = format!(
        "cargo build{} -p {name}",
        if release { " --release" } else { "" }
    );
    let path = dir.join(name);
    let built = modified(&path).unwrap_or_else(|| {
        panic!(
            "{} is not built; run `{build}` (`cargo test --workspace` builds it)",
            path.display()
        )
    });
    let root = workspace_root();
    if let Some(newer) = sources
        .iter()
        .find_map(|s| newer_source(&root.join(s), built))
    {
        panic!(
            "{} is older than {}, so it would run old code; run `{build}`",
            path.display(),
            newer.display()
        );
    }
    path
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).ok()?.modified().ok()
}

/// A Rust, WIT or manifest file below `dir` written after `than`, if any. Tests, benches,
/// other binaries (`src/bin`), test fixtures and target directories are not the binary's
/// sources: a change there does not rebuild it, so it must not make it look stale.
fn newer_source(dir: &Path, than: SystemTime) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            if !matches!(
                entry.file_name().to_str(),
                Some("target" | "tests" | "benches" | "bin" | "fixtures")
            ) && let Some(found) = newer_source(&path, than)
            {
                return Some(found);
            }
        } else if path
            .extension()
            .is_some_and(|e| e == "rs" || e == "wit" || e == "toml")
            && modified(&path).is_some_and(|m| m > than)
        {
            return Some(path);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn touch(path: &Path, at: SystemTime) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let f = std::fs::File::create(path).unwrap();
        f.set_modified(at).unwrap();
    }

    #[test]
    fn a_source_newer_than_the_binary_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let built = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let later = built + Duration::from_secs(5);
        touch(&dir.path().join("src/lib.rs"), built);
        touch(&dir.path().join("README.md"), later);
        touch(&dir.path().join("target/debug/x.rs"), later);
        touch(&dir.path().join("tests/it/main.rs"), later);
        touch(&dir.path().join("src/bin/kiln-confine.rs"), later);
        touch(&dir.path().join("fixtures/probe-step/src/lib.rs"), later);
        assert_eq!(newer_source(dir.path(), built), None);
        touch(&dir.path().join("worker/src/job.rs"), later);
        assert_eq!(
            newer_source(dir.path(), built),
            Some(dir.path().join("worker/src/job.rs"))
        );
    }
}
