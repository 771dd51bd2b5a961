//! The trigger step, as Buildbot's Trigger: asks the master to start builds on triggerable
//! schedulers, passing properties (set here, or copied from this build), optionally waiting for
//! them; waiting, its result is the worst of theirs. Run locally it reports what it would
//! trigger.

use std::collections::BTreeMap;

use guest_sdk::prelude::*;
use serde::Deserialize;

/// The step's arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    /// Triggerable schedulers to fire.
    schedulers: Vec<String>,
    /// Wait for the triggered builds and take their results.
    #[serde(default)]
    wait_for_finish: bool,
    /// Properties to give the triggered builds.
    #[serde(default)]
    set_properties: BTreeMap<String, Value>,
    /// Properties of this build to pass on.
    #[serde(default)]
    copy_properties: Vec<String>,
}

fn run(ctx: &mut StepContext) -> StepResult {
    let args: Args = ctx.args()?;
    if args.schedulers.is_empty() {
        return Err(Error::msg(
            "schedulers is empty: name at least one triggerable scheduler",
        ));
    }
    let mut properties: BTreeMap<String, Value> = BTreeMap::new();
    for name in &args.copy_properties {
        match ctx.property(name) {
            Some(v) => {
                properties.insert(name.clone(), v);
            }
            None => ctx.header(&format!(
                "copy_properties: {name} is not set; not passed on"
            )),
        }
    }
    properties.extend(args.set_properties);
    let properties: Vec<(String, Value)> = properties.into_iter().collect();
    let builds = ctx.trigger(&args.schedulers, &properties, args.wait_for_finish)?;
    let mut outcome = Outcome::Success;
    for b in &builds {
        if let Some(url) = &b.url {
            ctx.add_url(&format!("{} ({})", b.builder, b.scheduler), url);
        }
        if let Some(o) = b.outcome {
            if matches!(
                o,
                Outcome::Failure | Outcome::Exception | Outcome::Cancelled | Outcome::Retry
            ) {
                outcome = Outcome::Failure;
            } else if o == Outcome::Warnings && outcome == Outcome::Success {
                outcome = Outcome::Warnings;
            }
        }
    }
    let names = args.schedulers.join(", ");
    ctx.set_statistic("triggered", builds.len() as f64);
    ctx.set_summary(&if builds.is_empty() {
        format!("triggered {names}: no builds started")
    } else {
        format!("triggered {} builds on {names}", builds.len())
    });
    Ok(outcome)
}

guest_sdk::step!(run);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked() {
        let parse = |v: Value| serde_json::from_value::<Args>(v).map_err(|e| e.to_string());
        assert!(
            parse(serde_json::json!({"schedulers": ["nightly"], "wait_for_finish": true})).is_ok()
        );
        assert!(
            parse(serde_json::json!({}))
                .unwrap_err()
                .starts_with("missing field `schedulers`")
        );
        assert!(
            parse(serde_json::json!({"schedulers": "nightly"}))
                .unwrap_err()
                .starts_with("invalid type: string")
        );
        assert!(
            parse(serde_json::json!({"schedulers": [], "waitForFinish": true}))
                .unwrap_err()
                .starts_with("unknown field `waitForFinish`")
        );
    }
}
