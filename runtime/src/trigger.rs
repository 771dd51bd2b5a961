//! Triggering builds from a step (Buildbot's Trigger): the runtime hands the request to a
//! [`Triggers`] implementation, which on a worker asks the master; run locally,
//! [`LocalTriggers`] starts nothing and says so.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::run::CancelToken;
use kiln_protocol::outcome::Outcome;

/// What a step asked to trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerRequest {
    /// Triggerable schedulers to fire.
    pub schedulers: Vec<String>,
    /// Properties for the triggered builds.
    pub properties: BTreeMap<String, serde_json::Value>,
    /// Whether to wait for the builds to finish.
    pub wait: bool,
}

/// A build a trigger started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggeredBuild {
    /// The scheduler that started it.
    pub scheduler: String,
    /// Its builder.
    pub builder: String,
    /// Its result, when the request waited.
    pub result: Option<Outcome>,
    /// A link to it.
    pub url: Option<String>,
}

/// What came of a trigger request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TriggerResponse {
    /// The builds started.
    pub builds: Vec<TriggeredBuild>,
    /// A remark for the step's log (for example, that nothing was started locally).
    pub note: Option<String>,
}

/// Starts builds for trigger requests.
pub trait Triggers: Send + Sync {
    /// Fires the schedulers, waiting for the builds if asked (and until `cancel` fires).
    fn trigger(
        &self,
        request: &TriggerRequest,
        cancel: &CancelToken,
    ) -> Result<TriggerResponse, String>;
}

/// Triggers outside a farm: nothing is started; the step's log says what would have been.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalTriggers;

impl Triggers for LocalTriggers {
    fn trigger(
        &self,
        request: &TriggerRequest,
        _cancel: &CancelToken,
    ) -> Result<TriggerResponse, String> {
        Ok(TriggerResponse {
            builds: Vec::new(),
            note: Some(format!(
                "run locally: nothing was started; on a farm this would fire {}",
                request.schedulers.join(", ")
            )),
        })
    }
}
