//! Host implementations of the WIT interfaces, one module per interface, over the per-run state
//! of a store: [`StepState`] for a step, [`ObserverState`] for an observer, [`PolicyState`] for a
//! policy (which imports no Kiln interface, so it has no module here).

mod command;
mod context;
pub(crate) mod observers;
mod output;
pub(crate) mod report;
mod usage;

use std::time::{Duration, Instant};

use wasmtime::component::{HasData, Linker, ResourceTable};
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::step::kiln::step::{
    context as wit_context, logs as wit_logs, report as wit_report, types as wit_types,
};
use crate::run::CancelToken;

pub(crate) use context::ContextState;
pub(crate) use observers::{ObserverLogs, ObserverRun};
pub(crate) use output::GuestOutput;
pub(crate) use report::ReportState;

/// The data of a step's store.
pub(crate) struct StepState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limiter: Limiter,
    pub report: ReportState,
    pub ctx: ContextState,
}

/// The data of an observer's store: no files, no commands, only reporting.
pub(crate) struct ObserverState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limiter: Limiter,
    pub report: ReportState,
    pub logs: ObserverLogs,
}

/// The data of a policy's store: an empty WASI (no files, environment, arguments or network;
/// stderr goes to a small buffer the caller keeps for error messages) and the memory limit.
pub(crate) struct PolicyState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limiter: Limiter,
}

impl WasiView for StepState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiView for ObserverState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiView for PolicyState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

struct ReportData;
impl HasData for ReportData {
    type Data<'a> = &'a mut ReportState;
}

struct ContextData;
impl HasData for ContextData {
    type Data<'a> = &'a mut ContextState;
}

struct ObserverLogData;
impl HasData for ObserverLogData {
    type Data<'a> = &'a mut ObserverLogs;
}

impl wit_types::Host for ReportState {}

pub(crate) fn add_step_imports(linker: &mut Linker<StepState>) -> wasmtime::Result<()> {
    wit_types::add_to_linker::<StepState, ReportData>(linker, |s| &mut s.report)?;
    wit_report::add_to_linker::<StepState, ReportData>(linker, |s| &mut s.report)?;
    wit_logs::add_to_linker::<StepState, ContextData>(linker, |s| &mut s.ctx)?;
    wit_context::add_to_linker::<StepState, ContextData>(linker, |s| &mut s.ctx)?;
    Ok(())
}

pub(crate) fn add_observer_imports(linker: &mut Linker<ObserverState>) -> wasmtime::Result<()> {
    wit_types::add_to_linker::<ObserverState, ReportData>(linker, |s| &mut s.report)?;
    wit_report::add_to_linker::<ObserverState, ReportData>(linker, |s| &mut s.report)?;
    wit_logs::add_to_linker::<ObserverState, ObserverLogData>(linker, |s| &mut s.logs)?;
    Ok(())
}

/// Why a guest was stopped from outside: the reasons an epoch check ends a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Interrupt {
    #[error("the step's deadline of {} passed", crate::run::human_duration(*.0))]
    Deadline(Duration),
    #[error("the step was cancelled")]
    Cancelled,
}

/// A host call broke a limit of the contract; the guest traps with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct HostLimit(pub String);

/// Memory and table limits of one store, remembering which limit was hit and the most linear
/// memory the store's guest held at once.
pub(crate) struct Limiter {
    memory_bytes: usize,
    pub memory_exceeded: Option<usize>,
    /// Linear memory of all the store's memories now, in bytes.
    memory_now: usize,
    /// The most `memory_now` has been.
    memory_peak: usize,
    /// The growth last allowed and the peak before it, restored if the growth then failed.
    undo: (usize, usize),
}

/// Most table elements a guest may have; tables hold function references, so real guests stay
/// far below this.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl Limiter {
    pub fn new(memory_bytes: usize) -> Self {
        Limiter {
            memory_bytes,
            memory_exceeded: None,
            memory_now: 0,
            memory_peak: 0,
            undo: (0, 0),
        }
    }

    /// The most linear memory the store's guest held at once, in bytes: its memories'
    /// sizes as created and grown (the limit applies to each memory; a component usually has
    /// one).
    pub fn memory_peak(&self) -> u64 {
        self.memory_peak as u64
    }
}

/// "the memory limit of 64 MiB was exceeded (the guest asked for 65 MiB)".
pub(crate) fn memory_message(limit: usize, asked: usize) -> String {
    format!(
        "the memory limit of {} MiB was exceeded (the guest asked for {} MiB)",
        limit >> 20,
        asked.div_ceil(1 << 20)
    )
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.memory_exceeded = Some(desired);
            return Err(wasmtime::Error::new(HostLimit(memory_message(
                self.memory_bytes,
                desired,
            ))));
        }
        // Called with `current` 0 when a memory is created, so this counts every memory whole.
        let growth = desired.saturating_sub(current);
        self.undo = (growth, self.memory_peak);
        self.memory_now += growth;
        self.memory_peak = self.memory_peak.max(self.memory_now);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        let (growth, peak) = std::mem::take(&mut self.undo);
        self.memory_now -= growth;
        self.memory_peak = peak;
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::new(HostLimit(format!(
                "the table limit of {MAX_TABLE_ELEMENTS} elements was exceeded"
            ))));
        }
        Ok(true)
    }
}

/// Puts a store under the run's limits: memory, and a deadline and cancellation checked on
/// every epoch tick.
pub(crate) fn limit_store<T: 'static>(
    store: &mut Store<T>,
    limiter: fn(&mut T) -> &mut Limiter,
    deadline: Instant,
    limit: Duration,
    cancel: CancelToken,
) {
    store.limiter(move |s| limiter(s) as &mut dyn wasmtime::ResourceLimiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if cancel.is_cancelled() {
            return Err(wasmtime::Error::new(Interrupt::Cancelled));
        }
        if Instant::now() >= deadline {
            return Err(wasmtime::Error::new(Interrupt::Deadline(limit)));
        }
        Ok(UpdateDeadline::Continue(1))
    });
}

/// Why a guest call ended in an error, for whoever called it to word.
#[derive(Debug)]
pub(crate) enum Stopped {
    /// The run was cancelled.
    Cancelled,
    /// The deadline of this length passed.
    Deadline(Duration),
    /// The guest asked for more memory than its limit: (limit, asked), in bytes.
    Memory(usize, usize),
    /// A host call or another limit refused the guest; the message says which.
    Limit(String),
    /// The guest trapped (a panic, with `panic = "abort"`, is an `unreachable` trap).
    Trap(wasmtime::Trap),
    /// Anything else, such as a failed instantiation: the error's whole chain.
    Failed(String),
}

/// Classifies the error of a guest call, using what the store's limiter saw.
pub(crate) fn why_stopped(error: &wasmtime::Error, limiter: &Limiter) -> Stopped {
    if let Some(i) = error.downcast_ref::<Interrupt>() {
        return match i {
            Interrupt::Cancelled => Stopped::Cancelled,
            Interrupt::Deadline(limit) => Stopped::Deadline(*limit),
        };
    }
    // Exceeding the memory limit always ends the call, so the limiter's record is the cause.
    if let Some(asked) = limiter.memory_exceeded {
        return Stopped::Memory(limiter.memory_bytes, asked);
    }
    if let Some(limit) = error.downcast_ref::<HostLimit>() {
        return Stopped::Limit(limit.0.clone());
    }
    if let Some(trap) = error.downcast_ref::<wasmtime::Trap>() {
        return Stopped::Trap(*trap);
    }
    Stopped::Failed(format!("{error:#}"))
}

/// Turns the error of a guest call into the step's result and the message naming the cause.
pub(crate) fn describe_error(
    error: &wasmtime::Error,
    limiter: &Limiter,
) -> (crate::Outcome, String) {
    match why_stopped(error, limiter) {
        Stopped::Cancelled => (crate::Outcome::Cancelled, Interrupt::Cancelled.to_string()),
        Stopped::Deadline(limit) => (
            crate::Outcome::Exception,
            Interrupt::Deadline(limit).to_string(),
        ),
        Stopped::Memory(limit, asked) => (crate::Outcome::Exception, memory_message(limit, asked)),
        Stopped::Limit(message) => (crate::Outcome::Exception, message),
        Stopped::Trap(trap) => (
            crate::Outcome::Exception,
            format!("the guest trapped: {trap}"),
        ),
        Stopped::Failed(message) => (
            crate::Outcome::Exception,
            format!("the guest failed: {message}"),
        ),
    }
}
