//! The workspace's binaries, for the tests and benchmarks of a package that does not build
//! them. Cargo gives a test `CARGO_BIN_EXE_<name>` only for its own package's binaries; the
//! farm tests (in `kiln-cli`, which owns `kiln`) also run `kiln-worker`, which `cargo test
//! --workspace` and `cargo build` put beside `kiln` in the target directory.

use std::path::PathBuf;

/// The path of workspace binary `name`, from the directory of the running test executable
/// (`target/<profile>/deps/..`, or `target/<profile>` for a bench run by `cargo bench`).
///
/// Panics, naming the command to run, if it has not been built: a missing binary is a
/// setup error, and the test cannot mean anything without it.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running test");
    let mut dir = exe.parent().expect("the test's directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built; run `cargo build -p {name}` (or `cargo test --workspace`, which builds it)",
        path.display()
    );
    path
}
