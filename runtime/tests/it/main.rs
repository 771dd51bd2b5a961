//! Integration tests of the runtime: fixture guests built from source (steps/fixtures) probe each
//! rule of the sandbox, and each test asserts the exact result and message.

mod build;
mod harness;
mod limits;
mod logs;
mod policy;
mod resources;
mod sandbox;
mod steps;
mod trigger;
