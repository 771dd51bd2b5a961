//! The `report` interface: properties, progress, statistics, URLs and the summary, shared by
//! steps and observers.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::bindings::HostError;
use crate::bindings::step::kiln::step::report::Host;
use crate::host::HostLimit;
use crate::logs::{ReportEvent, StepEvents};
use crate::redact::Redactor;
use kiln_protocol::outcome::Url;
use kiln_protocol::props::{Properties, check_property_name};

/// Longest summary kept, in bytes; longer ones are cut.
const MAX_SUMMARY: usize = 1024;
/// Most URLs one run may add.
const MAX_URLS: usize = 100;
/// Most distinct statistics, progress metrics or properties one run may report.
pub const MAX_NAMES: usize = 1000;
/// Longest statistic, metric or URL name.
const MAX_NAME: usize = 256;
/// Longest URL.
const MAX_URL: usize = 4096;
/// Most remarks about refused reports kept for the log.
const MAX_NOTES: usize = 20;

/// What one guest instance reported, plus what it can read.
pub(crate) struct ReportState {
    pub base: Arc<Properties>,
    pub properties: BTreeMap<String, Value>,
    pub statistics: BTreeMap<String, f64>,
    pub progress: BTreeMap<String, u64>,
    pub urls: Vec<Url>,
    pub summary: Option<String>,
    /// Remarks about refused reports, written to the stdio log's header at the end.
    pub notes: Vec<String>,
    redactor: Arc<Redactor>,
    events: Arc<dyn StepEvents>,
    max_property_bytes: usize,
}

impl ReportState {
    pub fn new(
        base: Arc<Properties>,
        redactor: Arc<Redactor>,
        events: Arc<dyn StepEvents>,
        max_property_bytes: usize,
    ) -> Self {
        ReportState {
            base,
            properties: BTreeMap::new(),
            statistics: BTreeMap::new(),
            progress: BTreeMap::new(),
            urls: Vec::new(),
            summary: None,
            notes: Vec::new(),
            redactor,
            events,
            max_property_bytes,
        }
    }

    fn check_name(&mut self, what: &str, name: &str, known: bool, count: usize) -> bool {
        let problem =
            if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
                Some(format!(
                    "{what} name {name:?} must be 1-{MAX_NAME} bytes without control characters"
                ))
            } else if !known && count >= MAX_NAMES {
                Some(format!(
                    "more than {MAX_NAMES} {what}s; {name:?} was ignored"
                ))
            } else {
                None
            };
        match problem {
            Some(p) => {
                self.note(p);
                false
            }
            None => true,
        }
    }

    /// Records a remark for the log, keeping at most [`MAX_NOTES`].
    fn note(&mut self, text: String) {
        if self.notes.len() < MAX_NOTES {
            self.notes.push(text);
        }
    }
}

impl Host for ReportState {
    fn get_property(&mut self, name: String) -> wasmtime::Result<Option<String>> {
        let value = self.properties.get(&name).or_else(|| self.base.get(&name));
        Ok(value.map(Value::to_string))
    }

    fn property_names(&mut self) -> wasmtime::Result<Vec<String>> {
        let mut names: Vec<String> = self.base.names().map(str::to_owned).collect();
        names.extend(self.properties.keys().cloned());
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn set_property(
        &mut self,
        name: String,
        json: String,
    ) -> wasmtime::Result<Result<(), HostError>> {
        if let Err(e) = check_property_name(&name) {
            return Ok(Err(HostError::Invalid(e)));
        }
        if json.len() > self.max_property_bytes {
            return Ok(Err(HostError::TooLarge(format!(
                "property {name:?} is {} bytes of JSON; the limit is {}",
                json.len(),
                self.max_property_bytes
            ))));
        }
        let mut value: Value = match serde_json::from_str(&json) {
            Ok(v) => v,
            Err(e) => {
                return Ok(Err(HostError::Invalid(format!(
                    "property {name:?}: invalid JSON: {e}"
                ))));
            }
        };
        if !self.properties.contains_key(&name) && self.properties.len() >= MAX_NAMES {
            return Ok(Err(HostError::TooLarge(format!(
                "more than {MAX_NAMES} properties"
            ))));
        }
        self.redactor.redact_json(&mut value);
        self.events.report(&ReportEvent::Property {
            name: name.clone(),
            value: value.clone(),
        });
        self.properties.insert(name, value);
        Ok(Ok(()))
    }

    fn set_progress(&mut self, metric: String, value: u64) -> wasmtime::Result<()> {
        if self.check_name(
            "progress metric",
            &metric,
            self.progress.contains_key(&metric),
            self.progress.len(),
        ) {
            self.events.report(&ReportEvent::Progress {
                metric: metric.clone(),
                value,
            });
            self.progress.insert(metric, value);
        }
        Ok(())
    }

    fn set_statistic(&mut self, name: String, value: f64) -> wasmtime::Result<()> {
        if self.check_name(
            "statistic",
            &name,
            self.statistics.contains_key(&name),
            self.statistics.len(),
        ) {
            self.events.report(&ReportEvent::Statistic {
                name: name.clone(),
                value,
            });
            self.statistics.insert(name, value);
        }
        Ok(())
    }

    fn add_statistic(&mut self, name: String, delta: f64) -> wasmtime::Result<()> {
        let value = self.statistics.get(&name).copied().unwrap_or(0.0) + delta;
        self.set_statistic(name, value)
    }

    fn add_url(&mut self, name: String, url: String) -> wasmtime::Result<()> {
        if !self.check_name("URL", &name, false, 0) {
            return Ok(());
        }
        // Only web links: a javascript: or data: URL shown in the UI would run script.
        let web = url.starts_with("https://") || url.starts_with("http://");
        if !web || url.len() > MAX_URL || url.chars().any(char::is_control) {
            self.notes.push(format!(
                "URL {name:?} was ignored: only http(s) links of at most {MAX_URL} bytes are shown"
            ));
            return Ok(());
        }
        if self.urls.len() >= MAX_URLS {
            return Err(wasmtime::Error::new(HostLimit(format!(
                "the step added more than {MAX_URLS} URLs"
            ))));
        }
        let url = Url {
            name: self.redactor.redact(&name).into_owned(),
            url: self.redactor.redact(&url).into_owned(),
        };
        self.events.report(&ReportEvent::Url(url.clone()));
        self.urls.push(url);
        Ok(())
    }

    fn set_summary(&mut self, text: String) -> wasmtime::Result<()> {
        let line: String = text
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .collect();
        let mut line = self.redactor.redact(&line).into_owned();
        if line.len() > MAX_SUMMARY {
            let mut cut = MAX_SUMMARY;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        self.events
            .report(&ReportEvent::Summary { text: line.clone() });
        self.summary = Some(line);
        Ok(())
    }
}
