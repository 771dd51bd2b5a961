//! The step context: arguments, batched logs, commands and artifacts.

use std::ops::Deref;

use serde::de::DeserializeOwned;

use crate::step_world::kiln::step::context as host;
use crate::step_world::kiln::step::logs as host_logs;
use crate::{Channel, Error, Report, Value};

/// Bytes of log text gathered before one host call writes them. Batching keeps the cost of a
/// line near the cost of copying it; the host splits the text into lines again.
const LOG_BATCH_BYTES: usize = 32 * 1024;

/// What a step function receives: its arguments, its logs, the programs it may run, the file
/// store, and (through [`Deref`] to [`Report`]) properties, statistics, URLs and the summary.
///
/// Log lines are buffered and sent in batches; they are flushed before every command runs and
/// when the step returns, so the log keeps the order in which things happened.
#[derive(Debug)]
pub struct StepContext {
    report: Report,
    /// Pending log text: (log name, channel, text).
    pending: Vec<(String, Channel, String)>,
    pending_bytes: usize,
}

impl Deref for StepContext {
    type Target = Report;

    fn deref(&self) -> &Report {
        &self.report
    }
}

impl StepContext {
    pub(crate) fn new() -> Self {
        StepContext {
            report: Report::new(),
            pending: Vec::new(),
            pending_bytes: 0,
        }
    }

    /// The step's arguments, parsed into your own type.
    pub fn args<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_str(&host::args())
            .map_err(|e| Error::msg(format!("bad step arguments: {e}")))
    }

    /// The step's arguments as a JSON value.
    pub fn args_json(&self) -> Value {
        serde_json::from_str(&host::args()).unwrap_or(Value::Null)
    }

    /// Writes a line to the `stdio` log's stdout channel.
    pub fn stdout(&mut self, line: &str) {
        self.write_line("stdio", Channel::Stdout, line);
    }

    /// Writes a line to the `stdio` log's stderr channel.
    pub fn stderr(&mut self, line: &str) {
        self.write_line("stdio", Channel::Stderr, line);
    }

    /// Writes a line to the `stdio` log's header channel (Kiln's own remarks about the step).
    pub fn header(&mut self, line: &str) {
        self.write_line("stdio", Channel::Header, line);
    }

    /// A writer for another named log, such as "warnings".
    pub fn log(&mut self, name: &str) -> LogWriter<'_> {
        LogWriter {
            ctx: self,
            name: name.to_owned(),
        }
    }

    /// Writes one line (a trailing newline is added) to a log on a channel.
    pub fn write_line(&mut self, log: &str, channel: Channel, line: &str) {
        let same = matches!(self.pending.last(), Some((l, c, _)) if l == log && *c == channel);
        if !same {
            self.pending.push((log.to_owned(), channel, String::new()));
        }
        let text = &mut self.pending.last_mut().expect("pushed above").2;
        text.push_str(line);
        text.push('\n');
        self.pending_bytes += line.len() + 1;
        if self.pending_bytes >= LOG_BATCH_BYTES {
            self.flush();
        }
    }

    /// Sends buffered log lines to the host now.
    pub fn flush(&mut self) {
        for (log, channel, text) in self.pending.drain(..) {
            // A write is refused only for an invalid log name, which write_line's callers chose;
            // there is nowhere better to report it than the stdio log itself.
            if let Err(e) = host_logs::write_log(&log, channel, &text) {
                let note = format!(
                    "could not write to log {log:?}: {}\n",
                    crate::describe_host_error(&e)
                );
                let _ = host_logs::write_log("stdio", Channel::Header, &note);
            }
        }
        self.pending_bytes = 0;
    }

    /// Starts describing a command to run. `argv[0]` must be a program the grant allows.
    pub fn command<I, S>(&mut self, argv: I) -> Command<'_>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Command {
            ctx: self,
            spec: host::Command {
                argv: argv.into_iter().map(Into::into).collect(),
                cwd: None,
                env: Vec::new(),
                timeout_ms: None,
                log: None,
                quiet: false,
                capture_stdout: 0,
                stdin: None,
                logfiles: Vec::new(),
            },
        }
    }

    /// Copies a regular file of the workdir (a relative path) into the farm's file store.
    pub fn upload(&mut self, path: &str, name: &str) -> Result<Artifact, Error> {
        self.flush();
        host::upload_artifact(path, name)
            .map(Artifact::from)
            .map_err(Error::from)
    }

    /// Packs a directory of the workdir (a relative path) as a tar stream into the file store.
    /// Symlinks are stored as links, never followed.
    pub fn upload_directory(&mut self, path: &str, name: &str) -> Result<Artifact, Error> {
        self.flush();
        host::upload_directory(path, name)
            .map(Artifact::from)
            .map_err(Error::from)
    }

    /// Asks the farm to start builds on triggerable schedulers, with properties (name, value),
    /// waiting for them if `wait`. Run locally, nothing starts and no builds come back.
    pub fn trigger(
        &mut self,
        schedulers: &[String],
        properties: &[(String, Value)],
        wait: bool,
    ) -> Result<Vec<TriggeredBuild>, Error> {
        self.flush();
        let request = host::TriggerRequest {
            schedulers: schedulers.to_vec(),
            properties: properties
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            wait,
        };
        let builds = host::trigger(&request).map_err(Error::from)?;
        Ok(builds
            .into_iter()
            .map(|b| TriggeredBuild {
                scheduler: b.scheduler,
                builder: b.builder,
                outcome: b.outcome,
                url: b.url,
            })
            .collect())
    }

    /// Copies a file of the farm's file store into the workdir at a relative path.
    pub fn download(&mut self, name: &str, path: &str) -> Result<Artifact, Error> {
        self.flush();
        host::download_artifact(name, path)
            .map(Artifact::from)
            .map_err(Error::from)
    }
}

impl Drop for StepContext {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A build started by [`StepContext::trigger`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggeredBuild {
    /// The scheduler that started it.
    pub scheduler: String,
    /// Its builder.
    pub builder: String,
    /// Its result, if the trigger waited.
    pub outcome: Option<crate::Outcome>,
    /// A link to it.
    pub url: Option<String>,
}

/// Writes lines to one named log; see [`StepContext::log`].
#[derive(Debug)]
pub struct LogWriter<'a> {
    ctx: &'a mut StepContext,
    name: String,
}

impl LogWriter<'_> {
    /// Writes a line on the stdout channel of this log.
    pub fn line(&mut self, line: &str) -> &mut Self {
        self.ctx.write_line(&self.name, Channel::Stdout, line);
        self
    }
}

/// A command being described; call [`Command::run`] to run it.
#[derive(Debug)]
pub struct Command<'a> {
    ctx: &'a mut StepContext,
    spec: host::Command,
}

impl Command<'_> {
    /// Runs in this directory, relative to the workdir.
    pub fn cwd(mut self, dir: &str) -> Self {
        self.spec.cwd = Some(dir.to_owned());
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.spec.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Kills the command (and its process group) after this long.
    pub fn timeout(mut self, limit: std::time::Duration) -> Self {
        self.spec.timeout_ms = Some(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Streams output into this log instead of `stdio`.
    pub fn log(mut self, name: &str) -> Self {
        self.spec.log = Some(name.to_owned());
        self
    }

    /// Keeps the output out of the logs.
    pub fn quiet(mut self) -> Self {
        self.spec.quiet = true;
        self
    }

    /// Returns up to `max_bytes` of standard output in [`CommandResult::stdout`].
    pub fn capture_stdout(mut self, max_bytes: u32) -> Self {
        self.spec.capture_stdout = max_bytes;
        self
    }

    /// Follows a file under the workdir (which may not exist yet) into a log while the command
    /// runs, as Buildbot's `logfiles`.
    pub fn logfile(mut self, log: &str, path: &str) -> Self {
        self.spec.logfiles.push((log.to_owned(), path.to_owned()));
        self
    }

    /// Feeds this text to the command's standard input.
    pub fn stdin(mut self, text: &str) -> Self {
        self.spec.stdin = Some(text.to_owned());
        self
    }

    /// Runs the command to completion. `Err` means it could not start (for example, the
    /// program is not granted); a command that ran and failed is an `Ok` whose
    /// [`CommandResult::success`] is false.
    pub fn run(self) -> Result<CommandResult, Error> {
        self.ctx.flush();
        let done = host::run_command(&self.spec)?;
        Ok(CommandResult {
            exit: match done.exit {
                host::Exit::Code(c) => Exit::Code(c),
                host::Exit::Signal(s) => Exit::Signal(s),
                host::Exit::TimedOut => Exit::TimedOut,
                host::Exit::Cancelled => Exit::Cancelled,
            },
            stdout: done.stdout,
            stdout_truncated: done.stdout_truncated,
            elapsed: std::time::Duration::from_millis(done.elapsed_ms),
        })
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// Kiln killed it at its timeout or the step's deadline.
    TimedOut,
    /// Kiln killed it because the step was cancelled.
    Cancelled,
}

/// The result of a command that ran.
#[derive(Debug, Clone)]
pub struct CommandResult {
    /// How it ended.
    pub exit: Exit,
    /// Captured standard output, if asked for with [`Command::capture_stdout`].
    pub stdout: String,
    /// True if standard output was cut at the capture limit.
    pub stdout_truncated: bool,
    /// How long it ran.
    pub elapsed: std::time::Duration,
}

impl CommandResult {
    /// True if the command exited with status 0.
    pub fn success(&self) -> bool {
        self.exit == Exit::Code(0)
    }

    /// The exit status code, if the command exited by itself.
    pub fn code(&self) -> Option<i32> {
        match self.exit {
            Exit::Code(c) => Some(c),
            _ => None,
        }
    }

    /// "exit code 2", "killed by signal 9", "timed out", "cancelled".
    pub fn describe(&self) -> String {
        match self.exit {
            Exit::Code(c) => format!("exit code {c}"),
            Exit::Signal(s) => format!("killed by signal {s}"),
            Exit::TimedOut => "timed out".to_owned(),
            Exit::Cancelled => "cancelled".to_owned(),
        }
    }
}

/// A file in the farm's file store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// The name it is stored under.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// SHA-1, 40 lowercase hex digits.
    pub sha1: String,
    /// SHA-256, 64 lowercase hex digits.
    pub sha256: String,
}

impl From<host::Artifact> for Artifact {
    fn from(a: host::Artifact) -> Self {
        Artifact {
            name: a.name,
            size: a.size,
            sha1: a.sha1,
            sha256: a.sha256,
        }
    }
}

/// A command as step arguments give it: an argv list, or a string for a shell. Deserializes
/// from either JSON form (`["make", "-j4"]` or `"make -j4 && make check"`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(
    untagged,
    expecting = "a command: a list of strings such as [\"make\", \"-j4\"], or one string for the shell"
)]
pub enum CommandLine {
    /// The program and its arguments, run directly.
    Argv(Vec<String>),
    /// A string run by a shell (`sh -c STRING` by default); the shell must be granted.
    Shell(String),
}

impl CommandLine {
    /// The argv to run, using `shell` for the string form. Empty commands are refused.
    pub fn argv(&self, shell: &str) -> Result<Vec<String>, Error> {
        match self {
            CommandLine::Argv(argv) if argv.is_empty() || argv[0].is_empty() => Err(Error::msg(
                "command is empty: give a program and its arguments",
            )),
            CommandLine::Argv(argv) => Ok(argv.clone()),
            CommandLine::Shell(s) if s.trim().is_empty() => {
                Err(Error::msg("command is an empty string"))
            }
            CommandLine::Shell(s) => Ok(vec![shell.to_owned(), "-c".to_owned(), s.clone()]),
        }
    }

    /// A short description for summaries: the program name, or the first word of the string.
    pub fn describe(&self) -> String {
        let first = match self {
            CommandLine::Argv(argv) => argv.first().map(String::as_str),
            CommandLine::Shell(s) => s.split_whitespace().next(),
        };
        first.unwrap_or("command").to_owned()
    }
}
