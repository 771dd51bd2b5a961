//! What a step's commands cost, as the kernel accounts it: CPU time and peak resident memory
//! from `wait4`, with the correction Linux needs for the memory figure.
//!
//! Linux charges a spawned child with the peak resident memory of the address space it
//! replaced at `exec`: with `posix_spawn` (a `vfork`), that is the worker's own. So a
//! `wait4` figure no larger than the worker's own peak may be the worker's, not the
//! command's. A figure above it is exact; below it, the command's own peak as last sampled
//! from `/proc/PID/status` is used instead (a lower bound: it misses what its children used
//! and growth after the last sample), and a command too short to be sampled is not measured.
//! An exact figure in every case needs a fresh process that forks the command and waits for
//! it (as Bazel's process-wrapper does); not done yet.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use rustix::process::Pid;

/// How often a running command's own peak memory is sampled (the first time after this long:
/// just after its `exec` it has barely touched any memory).
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// What a step's commands used, summed or maxed over the commands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CommandTotals {
    /// Commands run to their end.
    pub commands: u32,
    /// User plus system CPU time of the commands and the descendants they waited for.
    pub cpu: Duration,
    /// The largest peak resident memory of one command, in bytes, of those measured.
    pub peak_rss: Option<u64>,
}

impl CommandTotals {
    /// Adds one command's figures.
    pub fn add(&mut self, usage: &CommandUsage) {
        self.commands += 1;
        self.cpu += usage.cpu;
        self.peak_rss = self.peak_rss.max(usage.peak_rss);
    }
}

/// What one command used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CommandUsage {
    /// User plus system CPU time.
    pub cpu: Duration,
    /// Peak resident memory, in bytes (`None`: not measured).
    pub peak_rss: Option<u64>,
}

/// Follows one command's memory while it runs.
#[derive(Debug)]
pub(crate) struct RssWatch {
    pid: Pid,
    /// This process's own peak after the command started: the most its `wait4` figure can
    /// owe to the address space it replaced.
    inherited: u64,
    /// The command's own peak, as last sampled.
    seen: Option<u64>,
}

impl RssWatch {
    /// Starts following `pid`, which has been spawned (so its `exec` has happened).
    pub fn start(pid: Pid) -> Self {
        RssWatch {
            pid,
            inherited: peak_rss(None).unwrap_or(u64::MAX),
            seen: None,
        }
    }

    /// Reads the command's own peak now.
    pub fn sample(&mut self) {
        if let Some(now) = peak_rss(Some(self.pid)) {
            self.seen = self.seen.max(Some(now));
        }
    }

    /// The command's figures from its `wait4` usage.
    pub fn finish(&self, usage: &libc::rusage) -> CommandUsage {
        CommandUsage {
            cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
            peak_rss: self.peak(u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024),
        }
    }

    /// The command's peak, given the figure `wait4` reported.
    fn peak(&self, reported: u64) -> Option<u64> {
        if reported > self.inherited {
            Some(reported)
        } else {
            self.seen.map(|seen| seen.min(reported))
        }
    }
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
}

/// The peak resident memory of a process's current address space (`VmHWM`), in bytes; of
/// this process for `None`. `None` when it cannot be read (the process has exited).
fn peak_rss(pid: Option<Pid>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{}/status", pid.as_raw_nonzero()),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line["VmHWM:".len()..]
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Waits for the child `pid` to exit and returns its status with what it used.
pub(crate) fn wait_with_usage(pid: Pid) -> std::io::Result<(ExitStatus, libc::rusage)> {
    let mut status = 0;
    // SAFETY: an all-zero `rusage` is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: both pointers are to live locals of the types `wait4` writes.
        let r = unsafe { libc::wait4(pid.as_raw_nonzero().get(), &mut status, 0, &mut usage) };
        if r >= 0 {
            return Ok((ExitStatus::from_raw(status), usage));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_the_worker_may_have_caused_falls_back_to_the_sample() {
        let mut watch = RssWatch {
            pid: Pid::from_raw(1).unwrap(),
            inherited: 300 << 20,
            seen: Some(2 << 20),
        };
        assert_eq!(watch.peak(301 << 20), Some(301 << 20));
        assert_eq!(watch.peak(300 << 20), Some(2 << 20));
        assert_eq!(watch.peak(1 << 20), Some(1 << 20));
        // A command too short to be sampled is not measured, unless its figure is exact.
        watch.seen = None;
        assert_eq!(watch.peak(300 << 20), None);
        assert_eq!(watch.peak(301 << 20), Some(301 << 20));
    }

    #[test]
    fn own_peak_is_readable() {
        assert!(peak_rss(None).is_some_and(|b| b > 0));
    }
}
