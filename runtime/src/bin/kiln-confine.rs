//! The confinement helper as a binary of its own, for embedders (and tests) whose own binary
//! cannot re-execute itself: `kiln-confine POLICY-JSON PROGRAM ARGV0 [ARGS...]`.

fn main() {
    runtime::confine::helper_main(std::env::args_os().skip(1).collect());
}
