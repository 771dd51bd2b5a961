//! The trigger host call: requests reach the farm's `Triggers` intact, and the trigger step
//! takes the results of the builds it waited for.

use std::sync::{Arc, Mutex};

use runtime::{
    CancelToken, Loaded, Outcome, TriggerRequest, TriggerResponse, TriggeredBuild, Triggers,
};
use serde_json::json;

use crate::harness::{Farm, runtime};

/// A farm side that starts one build per scheduler with a fixed result.
struct Farmside {
    seen: Mutex<Vec<TriggerRequest>>,
    result: Outcome,
}

impl Triggers for Farmside {
    fn trigger(
        &self,
        request: &TriggerRequest,
        _cancel: &CancelToken,
    ) -> Result<TriggerResponse, String> {
        self.seen.lock().unwrap().push(request.clone());
        let builds = request
            .schedulers
            .iter()
            .map(|s| TriggeredBuild {
                scheduler: s.clone(),
                builder: format!("{s}-builder"),
                result: request.wait.then_some(self.result),
                url: Some(format!("https://farm.example/builds/{s}")),
            })
            .collect();
        Ok(TriggerResponse { builds, note: None })
    }
}

fn trigger_step() -> runtime::StepComponent {
    let b = steps::find("trigger").unwrap();
    let Loaded::Step(s) = runtime().load(b.wasm, b.name).unwrap() else {
        panic!("trigger is a step")
    };
    s
}

#[test]
fn the_trigger_step_waits_and_takes_the_worst_result() {
    let mut farm = Farm::new();
    farm.properties.set("branch", json!("main"), "Change");
    farm.grant
        .secrets
        .insert("token".into(), "s3cr3t-value".into());
    let side = Arc::new(Farmside {
        seen: Mutex::new(Vec::new()),
        result: Outcome::Failure,
    });
    farm.grant.triggers = side.clone();
    let args = json!({"schedulers": ["a", "b"], "wait_for_finish": true, "copy_properties": ["branch"],
                      "set_properties": {"token": "%(secret:token)s"}});
    let (out, rec) = farm.run_with(&trigger_step(), args);
    assert_eq!(out.result, Outcome::Failure);
    assert_eq!(out.summary.as_deref(), Some("triggered 2 builds on a, b"));
    assert_eq!(out.urls.len(), 2);
    assert_eq!(out.urls[0].url, "https://farm.example/builds/a");
    let seen = side.seen.lock().unwrap();
    assert_eq!(seen[0].schedulers, ["a", "b"]);
    assert!(seen[0].wait);
    assert_eq!(seen[0].properties["branch"], json!("main"));
    // Secrets never leave the runtime, not even towards the farm.
    assert_eq!(seen[0].properties["token"], json!("<secret:token>"));
    assert!(rec.all("stdio").contains("<secret:token>") && !rec.all("stdio").contains("s3cr3t"));

    let side = Arc::new(Farmside {
        seen: Mutex::new(Vec::new()),
        result: Outcome::Success,
    });
    farm.grant.triggers = side;
    let (out, _) = farm.run_with(&trigger_step(), json!({"schedulers": ["a"]}));
    assert_eq!(
        out.result,
        Outcome::Success,
        "not waiting, the builds' results do not count"
    );
}
