//! Kiln's standard steps and log observers, compiled from the guest crates beside this one
//! (`steps/<name>/`) by `build.rs` and embedded in the binaries, so a fresh master or worker
//! needs no upload. With the `fixtures` feature, the test fixtures of `steps/fixtures/` too.

/// Guest components embedded at build time: (package name, path of the built file).
const GUESTS: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// What a built-in component is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A build step (the `step` world).
    Step,
    /// A log observer (the `log-observer` world).
    Observer,
}

/// A step or observer shipped inside the binaries.
#[derive(Debug, Clone, Copy)]
pub struct Builtin {
    /// The name builders and `kiln step run` use.
    pub name: &'static str,
    /// Step or observer.
    pub kind: Kind,
    /// One line saying what it does.
    pub description: &'static str,
    /// The component's bytes.
    pub wasm: &'static [u8],
    /// Arguments this built-in fixes (a JSON object), merged into the user's: several built-ins
    /// share one component (`file-upload` and `file-download` are `file-transfer` with a mode).
    pub preset: &'static str,
    /// Observers attached whenever this step runs, as (built-in observer, key of the step's
    /// arguments whose value becomes the observer's arguments).
    pub observers: &'static [(&'static str, &'static str)],
}

macro_rules! guest {
    ($package:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/", $package, ".wasm"))
    };
}

const fn observer(name: &'static str, description: &'static str, wasm: &'static [u8]) -> Builtin {
    Builtin {
        name,
        kind: Kind::Observer,
        description,
        wasm,
        preset: "",
        observers: &[],
    }
}

const fn step(
    name: &'static str,
    description: &'static str,
    wasm: &'static [u8],
    preset: &'static str,
    observers: &'static [(&'static str, &'static str)],
) -> Builtin {
    Builtin {
        name,
        kind: Kind::Step,
        description,
        wasm,
        preset,
        observers,
    }
}

/// Every built-in step and observer.
pub const BUILTINS: &[Builtin] = &[
    step(
        "shell",
        "run a command (argv, or a string for a granted shell); decode its exit code",
        guest!("shell"),
        "",
        &[],
    ),
    step(
        "compile",
        "shell, with the warnings observer (its arguments under \"warnings\")",
        guest!("shell"),
        "",
        &[("warnings", "warnings")],
    ),
    step(
        "test",
        "shell, with the test-results observer (arguments under \"results\") and JUnit XML files",
        guest!("shell"),
        "",
        &[("test-results", "results")],
    ),
    step(
        "git",
        "clone or update a git repository; sets got_revision",
        guest!("git"),
        "",
        &[],
    ),
    step(
        "trigger",
        "start builds on triggerable schedulers, optionally waiting; locally, says what it would trigger",
        guest!("trigger"),
        "",
        &[],
    ),
    step(
        "set-property",
        "set build properties from values",
        guest!("set-property"),
        r#"{"mode":"value"}"#,
        &[],
    ),
    step(
        "set-property-from-command",
        "set a property from a command's output (stripped, or a regex capture)",
        guest!("set-property"),
        r#"{"mode":"command"}"#,
        &[],
    ),
    step(
        "file-upload",
        "copy a workdir file to the file store, with checksums",
        guest!("file-transfer"),
        r#"{"mode":"file-upload"}"#,
        &[],
    ),
    step(
        "directory-upload",
        "copy a workdir directory to the file store as a tar stream",
        guest!("file-transfer"),
        r#"{"mode":"directory-upload"}"#,
        &[],
    ),
    step(
        "file-download",
        "copy a file of the file store into the workdir",
        guest!("file-transfer"),
        r#"{"mode":"file-download"}"#,
        &[],
    ),
    observer(
        "line-counter",
        "counts output lines: the \"output\" progress metric (for ETAs) and a \"lines\" statistic",
        guest!("line-counter"),
    ),
    observer(
        "warnings",
        "compiler warnings (gcc/clang, rustc/cargo, MSVC): a \"warnings\" statistic and log",
        guest!("warnings"),
    ),
    observer(
        "test-results",
        "test results (libtest, pytest, Go, TAP): tests_passed/failed/skipped and a \"failures\" log",
        guest!("test-results"),
    ),
    observer(
        "regex",
        "configurable regular expressions to statistics, properties and a verdict",
        guest!("regex-observer"),
    ),
];

/// The built-in with this name.
pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

impl Builtin {
    /// The step's arguments with this built-in's preset merged in. The user's arguments must be
    /// a JSON object (or null) and may not set a preset key.
    pub fn args(&self, user: &serde_json::Value) -> Result<serde_json::Value, String> {
        let mut args = match user {
            serde_json::Value::Null => serde_json::Map::new(),
            serde_json::Value::Object(map) => map.clone(),
            other => {
                return Err(format!(
                    "the arguments of {} must be a JSON object, not {other}",
                    self.name
                ));
            }
        };
        if !self.preset.is_empty() {
            let preset: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(self.preset).expect("presets are JSON objects");
            for (key, value) in preset {
                if args.contains_key(&key) {
                    return Err(format!(
                        "argument {key:?} is set by the built-in step {}; leave it out",
                        self.name
                    ));
                }
                args.insert(key, value);
            }
        }
        Ok(serde_json::Value::Object(args))
    }

    /// The observers this step brings: (built-in observer, its arguments from the step's).
    pub fn default_observers(
        &self,
        args: &serde_json::Value,
    ) -> Vec<(&'static Builtin, serde_json::Value)> {
        self.observers
            .iter()
            .map(|(name, key)| {
                let observer = find(name).expect("default observers are built in");
                (
                    observer,
                    args.get(*key).cloned().unwrap_or(serde_json::Value::Null),
                )
            })
            .collect()
    }
}

/// The path of a guest built by `build.rs` (standard or, with `fixtures`, a fixture).
pub fn guest_path(package: &str) -> Option<&'static str> {
    GUESTS
        .iter()
        .find(|(p, _)| *p == package)
        .map(|(_, path)| *path)
}

/// Test fixtures (with the `fixtures` feature): components that probe the sandbox and the
/// contract.
#[cfg(feature = "fixtures")]
pub mod fixtures {
    /// A step that does what its `action` argument says.
    pub const PROBE_STEP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe-step.wasm"));
    /// An observer that counts lines per channel, line by line.
    pub const COUNT_OBSERVER: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/count-observer.wasm"));
    /// A farm policy whose answers follow from its inputs, and which loops, exhausts memory,
    /// panics or snoops on the host when a builder is named so.
    pub const POLICY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/policy-fixture.wasm"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_components_with_unique_names() {
        let mut names: Vec<_> = BUILTINS.iter().map(|b| b.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), BUILTINS.len());
        for b in BUILTINS {
            // Component binaries start with the wasm magic and the component layer (0x0d 0 1 0).
            assert_eq!(
                &b.wasm[..8],
                b"\0asm\x0d\0\x01\0",
                "{} is not a component",
                b.name
            );
        }
        for b in BUILTINS {
            for (name, _) in b.observers {
                assert_eq!(
                    find(name).map(|o| o.kind),
                    Some(Kind::Observer),
                    "{}",
                    b.name
                );
            }
            assert!(b.args(&serde_json::Value::Null).is_ok());
        }
    }

    #[test]
    fn presets_merge_and_cannot_be_overridden() {
        let up = find("file-upload").unwrap();
        let args = up.args(&serde_json::json!({"source": "a"})).unwrap();
        assert_eq!(
            args,
            serde_json::json!({"source": "a", "mode": "file-upload"})
        );
        assert_eq!(
            up.args(&serde_json::json!({"mode": "file-download"}))
                .unwrap_err(),
            "argument \"mode\" is set by the built-in step file-upload; leave it out"
        );
        assert_eq!(
            up.args(&serde_json::json!([1])).unwrap_err(),
            "the arguments of file-upload must be a JSON object, not [1]"
        );
        let compile = find("compile").unwrap();
        let obs = compile.default_observers(
            &serde_json::json!({"command": "make", "warnings": {"max_warnings": 3}}),
        );
        assert_eq!(obs.len(), 1);
        assert_eq!(
            (obs[0].0.name, &obs[0].1),
            ("warnings", &serde_json::json!({"max_warnings": 3}))
        );
    }
}
