//! Observers at work: each in its own store and instance beside the step, fed the lines of its
//! log in batches, with its own limits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::Store;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::WasiCtxBuilder;

use crate::Outcome;
use crate::bindings::HostError;
use crate::bindings::WitChannel;
use crate::bindings::observer::LogObserver;
use crate::bindings::step::kiln::step::logs::Host as LogsHost;
use crate::bindings::step::kiln::step::types::Chunk;
use crate::engine::ObserverComponent;
use crate::host::context::check_log_name;
use crate::host::{Limiter, ObserverState, ReportState, describe_error, limit_store};
use crate::logs::{Channel, StepEvents};
use crate::redact::Redactor;
use crate::run::CancelToken;
use kiln_protocol::props::Properties;

/// Bytes of lines gathered before an observer is called. Large batches keep the per-call cost
/// negligible next to the cost of the lines themselves.
const OBSERVER_BATCH_BYTES: usize = 256 * 1024;

/// Most bytes of log text an observer may write between two of its calls returning; its lines
/// are moved into the step's logs after every call.
const OBSERVER_LOG_BYTES: usize = 4 << 20;

/// The `logs` interface for an observer: lines it writes wait here until the runtime moves them
/// into the step's logs. An observer may not write the log it observes.
pub(crate) struct ObserverLogs {
    observed: String,
    pending: Vec<(String, Channel, String)>,
    bytes: usize,
}

impl LogsHost for ObserverLogs {
    fn write_log(
        &mut self,
        log: String,
        channel: WitChannel,
        text: String,
    ) -> wasmtime::Result<Result<(), HostError>> {
        if let Err(e) = check_log_name(&log) {
            return Ok(Err(e));
        }
        if log == self.observed {
            return Ok(Err(HostError::Denied(format!(
                "an observer cannot write to {log:?}, the log it observes"
            ))));
        }
        if self.bytes + text.len() > OBSERVER_LOG_BYTES {
            return Ok(Err(HostError::TooLarge(format!(
                "an observer may write at most {OBSERVER_LOG_BYTES} bytes of logs per batch of lines it is given"
            ))));
        }
        self.bytes += text.len();
        let channel = channel.into();
        match self.pending.last_mut() {
            Some((l, c, t)) if *l == log && *c == channel => t.push_str(&text),
            _ => self.pending.push((log, channel, text)),
        }
        Ok(Ok(()))
    }
}

/// An observer during a step run.
pub(crate) struct ObserverRun {
    pub name: String,
    log: String,
    store: Store<ObserverState>,
    instance: LogObserver,
    batch: Vec<Chunk>,
    batch_bytes: usize,
    /// Set when the observer trapped; it is not called again.
    pub failed: Option<String>,
}

/// What an observer left behind.
pub(crate) struct ObserverEnd {
    pub name: String,
    pub verdict: Option<Outcome>,
    pub report: ReportState,
    pub logs: Vec<(String, Channel, String)>,
    pub failed: Option<String>,
    /// The most linear memory the observer held at once, in bytes.
    pub memory_peak: u64,
}

/// What starting an observer needs.
pub(crate) struct ObserverStart<'a> {
    pub engine: &'a wasmtime::Engine,
    pub component: &'a ObserverComponent,
    pub name: &'a str,
    pub log: &'a str,
    pub args: &'a serde_json::Value,
    pub base: Arc<Properties>,
    pub redactor: Arc<Redactor>,
    pub events: Arc<dyn StepEvents>,
    pub memory_bytes: usize,
    pub max_property_bytes: usize,
    pub deadline: Instant,
    pub limit: Duration,
    pub cancel: CancelToken,
}

impl ObserverRun {
    /// Instantiates the observer and calls its `init`.
    pub fn start(s: ObserverStart<'_>) -> Result<Self, String> {
        let state = ObserverState {
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
            limiter: Limiter::new(s.memory_bytes),
            report: ReportState::new(s.base, s.redactor, s.events, s.max_property_bytes),
            logs: ObserverLogs {
                observed: s.log.to_owned(),
                pending: Vec::new(),
                bytes: 0,
            },
        };
        let mut store = Store::new(s.engine, state);
        limit_store(
            &mut store,
            |st| &mut st.limiter,
            s.deadline,
            s.limit,
            s.cancel,
        );
        let instance = s
            .component
            .pre
            .instantiate(&mut store)
            .map_err(|e| describe_error(&e, &store.data().limiter).1)?;
        let init = instance
            .kiln_step_observer()
            .call_init(&mut store, &s.args.to_string());
        match init {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(format!("refused its arguments: {message}")),
            Err(e) => return Err(describe_error(&e, &store.data().limiter).1),
        }
        Ok(ObserverRun {
            name: s.name.to_owned(),
            log: s.log.to_owned(),
            store,
            instance,
            batch: Vec::new(),
            batch_bytes: 0,
            failed: None,
        })
    }

    /// Adds lines of a log; calls the observer when the batch is full.
    pub fn push(&mut self, log: &str, channel: Channel, text: &str) {
        if log != self.log || self.failed.is_some() {
            return;
        }
        let channel = channel.into();
        match self.batch.last_mut() {
            Some(last) if last.channel == channel => last.text.push_str(text),
            _ => self.batch.push(Chunk {
                channel,
                text: text.to_owned(),
            }),
        }
        self.batch_bytes += text.len();
        if self.batch_bytes >= OBSERVER_BATCH_BYTES {
            self.flush();
        }
    }

    /// Calls the observer with what is batched.
    pub fn flush(&mut self) {
        if self.batch.is_empty() || self.failed.is_some() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        if let Err(e) = self
            .instance
            .kiln_step_observer()
            .call_lines(&mut self.store, &batch)
        {
            self.failed = Some(describe_error(&e, &self.store.data().limiter).1);
        }
    }

    /// Takes the lines the observer wrote to other logs.
    pub fn take_logs(&mut self) -> Vec<(String, Channel, String)> {
        let logs = &mut self.store.data_mut().logs;
        logs.bytes = 0;
        std::mem::take(&mut logs.pending)
    }

    /// Flushes, calls `finish`, and hands back what the observer reported.
    pub fn finish(mut self) -> ObserverEnd {
        self.flush();
        let mut verdict = None;
        if self.failed.is_none() {
            match self
                .instance
                .kiln_step_observer()
                .call_finish(&mut self.store)
            {
                Ok(v) => verdict = v.map(Outcome::from),
                Err(e) => self.failed = Some(describe_error(&e, &self.store.data().limiter).1),
            }
        }
        let data = self.store.into_data();
        ObserverEnd {
            name: self.name,
            verdict,
            report: data.report,
            logs: data.logs.pending,
            failed: self.failed,
            memory_peak: data.limiter.memory_peak(),
        }
    }
}
