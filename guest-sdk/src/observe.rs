//! Log observers: the [`LineObserver`] trait and the glue the [`observer!`](crate::observer)
//! macro exports.

use std::cell::RefCell;

use crate::{__Chunk as Chunk, Channel, Error, Outcome, Report, Value};

/// Watches a log line by line, as Buildbot's `LogLineObserver`.
///
/// The runtime feeds lines in large batches; the default [`LineObserver::chunk`] splits each
/// batch into lines and calls [`out_line`](LineObserver::out_line),
/// [`err_line`](LineObserver::err_line) or [`header_line`](LineObserver::header_line). Report
/// progress and statistics sparingly (per batch, or in [`finished`](LineObserver::finished)):
/// each report is a host call.
pub trait LineObserver: Sized + 'static {
    /// Creates the observer from its arguments (JSON, `null` when none were given).
    fn new(args: &Value) -> Result<Self, Error>;

    /// A line of standard output (without its newline).
    fn out_line(&mut self, _line: &str, _report: &Report) {}

    /// A line of standard error.
    fn err_line(&mut self, _line: &str, _report: &Report) {}

    /// A header line written by Kiln (the command line, its exit status).
    fn header_line(&mut self, _line: &str, _report: &Report) {}

    /// A run of complete lines on one channel, each ending in "\n". Override it to work on
    /// whole batches at once (for example, counting newlines); the default dispatches each line.
    fn chunk(&mut self, channel: Channel, text: &str, report: &Report) {
        let each: fn(&mut Self, &str, &Report) = match channel {
            Channel::Stdout => Self::out_line,
            Channel::Stderr => Self::err_line,
            Channel::Header => Self::header_line,
        };
        for line in text.split_terminator('\n') {
            each(self, line, report);
        }
    }

    /// Called after each batch of chunks; a good place to report progress.
    fn batch_done(&mut self, _report: &Report) {}

    /// Called after the last line. Returning an outcome makes the step's result the worse of the
    /// step's own and this one.
    fn finished(&mut self, _report: &Report) -> Option<Outcome> {
        None
    }
}

thread_local! {
    /// The observer instance of this component (components are single-threaded).
    static STATE: RefCell<Option<Box<dyn std::any::Any>>> = const { RefCell::new(None) };
}

fn with_observer<O: LineObserver, R>(f: impl FnOnce(&mut O) -> R) -> Option<R> {
    STATE.with(|cell| {
        let mut state = cell.borrow_mut();
        state.as_mut()?.downcast_mut::<O>().map(f)
    })
}

#[doc(hidden)]
pub fn __observer_init<O: LineObserver>(args: &str) -> Result<(), String> {
    let args: Value = if args.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(args).map_err(|e| format!("bad observer arguments: {e}"))?
    };
    let observer = O::new(&args).map_err(|e| e.to_string())?;
    STATE.with(|cell| *cell.borrow_mut() = Some(Box::new(observer)));
    Ok(())
}

#[doc(hidden)]
pub fn __observer_lines<O: LineObserver>(batch: Vec<Chunk>) {
    let report = Report::new();
    with_observer::<O, _>(|o| {
        for chunk in &batch {
            o.chunk(chunk.channel, &chunk.text, &report);
        }
        o.batch_done(&report);
    });
}

#[doc(hidden)]
pub fn __observer_finish<O: LineObserver>() -> Option<Outcome> {
    let report = Report::new();
    with_observer::<O, _>(|o| o.finished(&report)).flatten()
}
