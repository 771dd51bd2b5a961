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
}

/// Every built-in step and observer.
pub const BUILTINS: &[Builtin] = &[Builtin {
    name: "line-counter",
    kind: Kind::Observer,
    description: "counts output lines: the \"output\" progress metric (for ETAs) and a \"lines\" statistic",
    wasm: include_bytes!(concat!(env!("OUT_DIR"), "/line-counter.wasm")),
}];

/// The built-in with this name.
pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

/// The path of a guest built by `build.rs` (standard or, with `fixtures`, a fixture).
pub fn guest_path(package: &str) -> Option<&'static str> {
    GUESTS
        .iter()
        .find(|(p, _)| *p == package)
        .map(|(_, path)| *path)
}

/// Test fixtures (with the `fixtures` feature): components that probe the sandbox.
#[cfg(feature = "fixtures")]
pub mod fixtures {
    /// A step that does what its `action` argument says.
    pub const PROBE_STEP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe-step.wasm"));
    /// An observer that counts lines per channel, line by line.
    pub const COUNT_OBSERVER: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/count-observer.wasm"));
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
            assert!(guest_path(b.name).is_some());
        }
    }
}
