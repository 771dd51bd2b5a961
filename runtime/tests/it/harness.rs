//! A small harness: one runtime per test binary, a fresh workdir and file store per test, and a
//! recorder of everything the step streamed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use runtime::{
    CancelToken, Channel, DirStore, Grant, Loaded, ObserverComponent, ObserverSpec, Properties,
    ReportEvent, Runtime, RuntimeConfig, StepComponent, StepEvents, StepOutcome, StepRun,
};
use serde_json::Value;

pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<(Runtime, tempfile::TempDir)> = OnceLock::new();
    &RUNTIME
        .get_or_init(|| {
            let cache = tempfile::tempdir().unwrap();
            let rt = Runtime::new(RuntimeConfig {
                cache_dir: Some(cache.path().join("components")),
            })
            .unwrap();
            (rt, cache)
        })
        .0
}

pub fn probe() -> StepComponent {
    match runtime()
        .load(steps::fixtures::PROBE_STEP, "probe-step")
        .unwrap()
    {
        Loaded::Step(s) => s,
        _ => panic!("probe-step is a step"),
    }
}

pub fn observer(bytes: &[u8], name: &str) -> ObserverComponent {
    match runtime().load(bytes, name).unwrap() {
        Loaded::Observer(o) => o,
        _ => panic!("{name} is an observer"),
    }
}

pub fn counter() -> ObserverComponent {
    observer(steps::fixtures::COUNT_OBSERVER, "count-observer")
}

/// Everything a run streamed.
#[derive(Default)]
pub struct Recorder {
    pub lines: Mutex<Vec<(String, Channel, String)>>,
    pub reports: Mutex<Vec<ReportEvent>>,
}

impl StepEvents for Recorder {
    fn log(&self, log: &str, channel: Channel, text: &str) {
        self.lines
            .lock()
            .unwrap()
            .push((log.to_owned(), channel, text.to_owned()));
    }
    fn report(&self, event: &ReportEvent) {
        self.reports.lock().unwrap().push(event.clone());
    }
}

impl Recorder {
    /// The text of one log and channel.
    pub fn text(&self, log: &str, channel: Channel) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(l, c, _)| l == log && *c == channel)
            .map(|(_, _, t)| t.as_str())
            .collect()
    }

    /// All of a log, every channel, in order.
    pub fn all(&self, log: &str) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(l, _, _)| l == log)
            .map(|(_, _, t)| t.as_str())
            .collect()
    }
}

/// A workdir, a file store and a grant for one test.
pub struct Farm {
    pub workdir: tempfile::TempDir,
    pub store: tempfile::TempDir,
    pub grant: Grant,
    pub properties: Properties,
    pub observers: Vec<ObserverSpec>,
    pub cancel: CancelToken,
}

impl Farm {
    pub fn new() -> Self {
        let workdir = tempfile::tempdir().unwrap();
        let store = tempfile::tempdir().unwrap();
        let mut grant = Grant::new(
            workdir.path(),
            Arc::new(DirStore::new(store.path()).unwrap()),
        );
        grant.limits.deadline = Duration::from_secs(60);
        grant.limits.memory_bytes = 128 << 20;
        Farm {
            workdir,
            store,
            grant,
            properties: Properties::new(),
            observers: Vec::new(),
            cancel: CancelToken::new(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.workdir.path().join(rel)
    }

    pub fn allow(&mut self, programs: &[&str]) -> &mut Self {
        self.grant
            .programs
            .extend(programs.iter().map(|p| p.to_string()));
        self
    }

    pub fn observe(&mut self, component: ObserverComponent, name: &str, args: Value) -> &mut Self {
        self.observers.push(ObserverSpec {
            component,
            name: name.into(),
            args,
            log: "stdio".into(),
        });
        self
    }

    pub fn run(&self, args: Value) -> (StepOutcome, Arc<Recorder>) {
        self.run_with(&probe(), args)
    }

    pub fn run_with(&self, step: &StepComponent, args: Value) -> (StepOutcome, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let outcome = runtime().run_step(StepRun {
            step,
            args: &args,
            properties: &self.properties,
            observers: &self.observers,
            grant: &self.grant,
            events: rec.clone(),
            cancel: self.cancel.clone(),
        });
        (outcome, rec)
    }
}

/// The `kiln-confine` helper built with this package.
pub fn helper() -> runtime::Helper {
    runtime::Helper::dedicated(Path::new(env!("CARGO_BIN_EXE_kiln-confine")))
}
