//! Builds the guest components from source for `wasm32-wasip2` with a nested `cargo build`, and
//! copies them into OUT_DIR for `include_bytes!`. No `.wasm` file is ever committed: `cargo
//! build` or `cargo test` alone produces everything.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Standard guests shipped inside the binaries.
const STANDARD: &[&str] = &[
    "line-counter",
    "warnings",
    "test-results",
    "regex-observer",
    "shell",
    "set-property",
    "file-transfer",
    "git",
    "trigger",
];
/// Test fixtures, built only with the `fixtures` feature.
const FIXTURES: &[&str] = &["probe-step", "count-observer", "policy-fixture"];
const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("steps/ has a parent")
        .to_path_buf();
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let fixtures = std::env::var_os("CARGO_FEATURE_FIXTURES").is_some();

    for watched in ["wit", "guest-sdk", "steps", "Cargo.lock", "Cargo.toml"] {
        println!("cargo::rerun-if-changed={}", root.join(watched).display());
    }

    let mut packages: Vec<&str> = STANDARD.to_vec();
    if fixtures {
        packages.extend_from_slice(FIXTURES);
    }
    ensure_target();

    // A target dir of its own: the outer cargo holds a lock on its own, and every profile and
    // `cargo clippy` share these builds.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .args(["--target", TARGET, "--profile", "guest", "--locked"])
        .arg("--target-dir")
        .arg(&target_dir);
    for p in &packages {
        cmd.args(["-p", p]);
    }
    // The outer build's settings are for the host, not for the guests.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("run cargo to build the guest components");
    assert!(
        status.success(),
        "building the guest components failed (see the errors above)"
    );

    let mut listing = String::new();
    for p in &packages {
        let built = target_dir
            .join(TARGET)
            .join("guest")
            .join(format!("{}.wasm", p.replace('-', "_")));
        let dest = out_dir.join(format!("{p}.wasm"));
        std::fs::copy(&built, &dest)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", built.display(), dest.display()));
        listing.push_str(&format!("({p:?}, {:?}),\n", dest.display().to_string()));
    }
    std::fs::write(out_dir.join("guests.rs"), format!("&[\n{listing}]\n"))
        .expect("write guests.rs");
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name} for build scripts"))
}

/// Makes sure the wasm target's standard library is installed. rustup installs it from
/// rust-toolchain.toml when it installs the toolchain, but not when the toolchain was already
/// there; add it then, or say exactly what to run.
fn ensure_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let libdir = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if libdir.as_deref().is_some_and(Path::is_dir) {
        return;
    }
    let added = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        added,
        "the {TARGET} target is not installed and `rustup target add {TARGET}` failed; install it and build again"
    );
}
