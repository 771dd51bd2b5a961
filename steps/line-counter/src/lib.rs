//! The line counter: counts the lines of a log and reports them as the "output" progress metric,
//! which the master compares with earlier builds to estimate when a step will finish. It works on
//! whole batches (counting newlines) rather than line by line, so it keeps up with any command.

use guest_sdk::prelude::*;

struct LineCounter {
    lines: u64,
}

impl LineObserver for LineCounter {
    fn new(_args: &Value) -> Result<Self, Error> {
        Ok(LineCounter { lines: 0 })
    }

    fn chunk(&mut self, channel: Channel, text: &str, _report: &Report) {
        if channel != Channel::Header {
            self.lines += memchr::memchr_iter(b'\n', text.as_bytes()).count() as u64;
        }
    }

    fn batch_done(&mut self, report: &Report) {
        report.set_progress("output", self.lines);
    }

    fn finished(&mut self, report: &Report) -> Option<Outcome> {
        report.set_progress("output", self.lines);
        report.set_statistic("lines", self.lines as f64);
        None
    }
}

guest_sdk::observer!(LineCounter);
