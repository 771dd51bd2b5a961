//! The only place host bindings are generated from `wit/`. Every host module imports from here.

/// The `step` world.
pub(crate) mod step {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "step",
        imports: { default: trappable },
    });
}

/// The `log-observer` world, sharing the `types` and `report` bindings of the step world so one
/// `report` host implementation serves both.
pub(crate) mod observer {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "log-observer",
        imports: { default: trappable },
        with: {
            "kiln:step/types": crate::bindings::step::kiln::step::types,
            "kiln:step/report": crate::bindings::step::kiln::step::report,
            "kiln:step/logs": crate::bindings::step::kiln::step::logs,
        },
    });
}

/// The `farm-policy` world. It imports nothing of Kiln's, so it shares nothing with the others.
pub(crate) mod policy {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "farm-policy",
    });
}

pub(crate) use step::kiln::step::types::{Channel as WitChannel, HostError, Outcome as WitOutcome};

impl From<WitOutcome> for crate::Outcome {
    fn from(o: WitOutcome) -> Self {
        match o {
            WitOutcome::Success => crate::Outcome::Success,
            WitOutcome::Warnings => crate::Outcome::Warnings,
            WitOutcome::Failure => crate::Outcome::Failure,
            WitOutcome::Skipped => crate::Outcome::Skipped,
            WitOutcome::Exception => crate::Outcome::Exception,
            WitOutcome::Retry => crate::Outcome::Retry,
            WitOutcome::Cancelled => crate::Outcome::Cancelled,
        }
    }
}

impl From<crate::Outcome> for WitOutcome {
    fn from(o: crate::Outcome) -> Self {
        match o {
            crate::Outcome::Success => WitOutcome::Success,
            crate::Outcome::Warnings => WitOutcome::Warnings,
            crate::Outcome::Failure => WitOutcome::Failure,
            crate::Outcome::Skipped => WitOutcome::Skipped,
            crate::Outcome::Exception => WitOutcome::Exception,
            crate::Outcome::Retry => WitOutcome::Retry,
            crate::Outcome::Cancelled => WitOutcome::Cancelled,
        }
    }
}

impl From<WitChannel> for crate::Channel {
    fn from(c: WitChannel) -> Self {
        match c {
            WitChannel::Stdout => crate::Channel::Stdout,
            WitChannel::Stderr => crate::Channel::Stderr,
            WitChannel::Header => crate::Channel::Header,
        }
    }
}

impl From<crate::Channel> for WitChannel {
    fn from(c: crate::Channel) -> Self {
        match c {
            crate::Channel::Stdout => WitChannel::Stdout,
            crate::Channel::Stderr => WitChannel::Stderr,
            crate::Channel::Header => WitChannel::Header,
        }
    }
}
