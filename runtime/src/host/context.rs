//! The `context` interface: arguments, logs and artifacts (commands are in `command.rs`).

use std::os::fd::OwnedFd;
use std::time::Instant;

use crate::artifacts::{Artifact, StoreError, check_name};
use crate::bindings::step::kiln::step::context::{
    Artifact as WitArtifact, Command, CommandResult, Host, TriggerRequest as WitTriggerRequest,
    TriggeredBuild as WitTriggeredBuild,
};
use crate::bindings::step::kiln::step::logs;
use crate::bindings::{HostError, WitChannel};
use crate::files;
use crate::grant::Grant;
use crate::host::usage::CommandTotals;
use crate::host::{GuestOutput, HostLimit, ObserverRun};
use crate::logs::{Channel, Logs};
use crate::run::CancelToken;

/// Longest log name.
const MAX_LOG_NAME: usize = 64;

/// What the context interface works on during one step run.
pub(crate) struct ContextState {
    pub args_json: String,
    pub grant: Grant,
    pub workdir: OwnedFd,
    pub logs: Logs,
    pub observers: Vec<ObserverRun>,
    pub cancel: CancelToken,
    pub deadline: Instant,
    pub guest_stdout: GuestOutput,
    pub guest_stderr: GuestOutput,
    /// Sandbox mode's private temporary directory for commands (TMPDIR).
    pub tmpdir: Option<tempfile::TempDir>,
    /// What the commands run so far used.
    pub usage: CommandTotals,
}

impl ContextState {
    /// Appends to a log, feeding the observers of that log.
    /// Then writes what the observers wrote to their own logs; those lines are not fed to
    /// observers, so observers cannot feed each other in a loop.
    pub fn write(&mut self, log: &str, channel: Channel, bytes: &[u8]) {
        let observers = &mut self.observers;
        self.logs
            .write(log, channel, bytes, &mut |l, c, t| feed(observers, l, c, t));
        self.drain_observer_logs();
    }

    /// Moves lines observers wrote into the step's logs.
    pub fn drain_observer_logs(&mut self) {
        for o in &mut self.observers {
            for (log, channel, text) in o.take_logs() {
                self.logs
                    .write(&log, channel, text.as_bytes(), &mut |_, _, _| {});
            }
        }
    }

    /// Moves what the guest printed with `println!`/`eprintln!` into the stdio log.
    pub fn drain_guest_output(&mut self) {
        for (out, channel) in [
            (self.guest_stdout.clone(), Channel::Stdout),
            (self.guest_stderr.clone(), Channel::Stderr),
        ] {
            let (bytes, dropped) = out.take();
            if !bytes.is_empty() {
                self.write("stdio", channel, &bytes);
            }
            if dropped > 0 {
                let note = format!(
                    "\nkiln: {dropped} bytes the step printed were dropped (write logs through the context instead)\n"
                );
                self.write("stdio", Channel::Header, note.as_bytes());
            }
        }
    }

    /// Ends the logs and lets the observers see the last lines.
    pub fn finish_logs(&mut self) {
        let observers = &mut self.observers;
        self.logs.finish(&mut |l, c, t| feed(observers, l, c, t));
    }

    pub fn header(&mut self, text: &str) {
        let mut line = String::with_capacity(text.len() + 1);
        line.push_str(text);
        line.push('\n');
        self.write("stdio", Channel::Header, line.as_bytes());
    }
}

/// Gives lines of `log` to every observer watching it.
pub(crate) fn feed(observers: &mut [ObserverRun], log: &str, channel: Channel, text: &str) {
    for o in observers.iter_mut() {
        o.push(log, channel, text);
    }
}

pub(crate) fn check_log_name(name: &str) -> Result<(), HostError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_LOG_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" ._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(HostError::Invalid(format!(
            "log name {name:?} must be 1-{MAX_LOG_NAME} letters, digits, spaces, '.', '_' or '-'"
        )))
    }
}

fn store_error(e: StoreError) -> HostError {
    match e {
        StoreError::BadName(_) => HostError::Invalid(e.to_string()),
        StoreError::NotFound(_) => HostError::NotFound(e.to_string()),
        StoreError::TooLarge { .. } => HostError::TooLarge(e.to_string()),
        StoreError::Io(_) => HostError::Io(e.to_string()),
    }
}

fn to_wit(a: Artifact) -> WitArtifact {
    WitArtifact {
        name: a.name,
        size: a.size,
        sha1: a.sha1,
        sha256: a.sha256,
    }
}

impl logs::Host for ContextState {
    fn write_log(
        &mut self,
        log: String,
        channel: WitChannel,
        text: String,
    ) -> wasmtime::Result<Result<(), HostError>> {
        if text.len() > self.grant.limits.max_call_bytes {
            return Err(wasmtime::Error::new(HostLimit(format!(
                "write-log was given {} bytes at once; the limit is {} (the SDK batches lines for you)",
                text.len(),
                self.grant.limits.max_call_bytes
            ))));
        }
        if let Err(e) = check_log_name(&log) {
            return Ok(Err(e));
        }
        if !self.logs.can_open(&log) {
            return Ok(Err(HostError::TooLarge(format!(
                "a step may have at most {} logs",
                self.grant.limits.logs.max_logs
            ))));
        }
        self.drain_guest_output();
        self.write(&log, channel.into(), text.as_bytes());
        Ok(Ok(()))
    }
}

impl Host for ContextState {
    fn args(&mut self) -> wasmtime::Result<String> {
        Ok(self.args_json.clone())
    }

    fn run_command(
        &mut self,
        command: Command,
    ) -> wasmtime::Result<Result<CommandResult, HostError>> {
        self.drain_guest_output();
        Ok(self.run(command))
    }

    fn upload_artifact(
        &mut self,
        path: String,
        name: String,
    ) -> wasmtime::Result<Result<WitArtifact, HostError>> {
        self.drain_guest_output();
        let result = (|| {
            check_name(&name).map_err(store_error)?;
            let rel = files::check_relative(&path).map_err(HostError::Invalid)?;
            let mut file = files::open_read(&self.workdir, rel).map_err(HostError::NotFound)?;
            let limit = self.grant.limits.max_artifact_bytes;
            self.grant
                .artifacts
                .put(&name, &mut file, limit)
                .map_err(store_error)
        })();
        if let Ok(a) = &result {
            self.header(&format!(
                "uploaded {path} as artifact {} ({} bytes, sha256 {})",
                a.name, a.size, a.sha256
            ));
        }
        Ok(result.map(to_wit))
    }

    fn upload_directory(
        &mut self,
        path: String,
        name: String,
    ) -> wasmtime::Result<Result<WitArtifact, HostError>> {
        self.drain_guest_output();
        let result = (|| {
            check_name(&name).map_err(store_error)?;
            let rel = files::check_relative(&path).map_err(HostError::Invalid)?;
            let limit = self.grant.limits.max_artifact_bytes;
            let mut tmp =
                tempfile::tempfile().map_err(|e| HostError::Io(format!("temporary file: {e}")))?;
            let mut capped = Capped {
                inner: &mut tmp,
                left: limit,
            };
            let entries = files::pack_directory(&self.workdir, rel, &mut capped).map_err(|e| {
                if capped.left == 0 {
                    HostError::TooLarge(format!(
                        "the tar stream of {path} is larger than the {limit}-byte limit"
                    ))
                } else {
                    HostError::NotFound(e)
                }
            })?;
            std::io::Seek::rewind(&mut tmp).map_err(|e| HostError::Io(e.to_string()))?;
            let artifact = self
                .grant
                .artifacts
                .put(&name, &mut tmp, limit)
                .map_err(store_error)?;
            Ok((artifact, entries))
        })();
        Ok(result.map(|(a, entries)| {
            self.header(&format!(
                "uploaded directory {path} as artifact {} ({entries} entries, {} bytes of tar, sha256 {})",
                a.name, a.size, a.sha256
            ));
            to_wit(a)
        }))
    }

    fn trigger(
        &mut self,
        request: WitTriggerRequest,
    ) -> wasmtime::Result<Result<Vec<WitTriggeredBuild>, HostError>> {
        self.drain_guest_output();
        let result = (|| {
            if request.schedulers.is_empty() {
                return Err(HostError::Invalid(
                    "name at least one scheduler to trigger".into(),
                ));
            }
            if request.schedulers.len() > 100 {
                return Err(HostError::TooLarge(
                    "a step may trigger at most 100 schedulers".into(),
                ));
            }
            for s in &request.schedulers {
                if s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) {
                    return Err(HostError::Invalid(format!(
                        "scheduler name {s:?} is not valid"
                    )));
                }
            }
            let mut properties = std::collections::BTreeMap::new();
            for (name, json) in &request.properties {
                kiln_protocol::props::check_property_name(name).map_err(HostError::Invalid)?;
                if json.len() > self.grant.limits.max_property_bytes {
                    return Err(HostError::TooLarge(format!(
                        "property {name:?} is too large to pass on"
                    )));
                }
                let mut value: serde_json::Value = serde_json::from_str(json).map_err(|e| {
                    HostError::Invalid(format!("property {name:?}: invalid JSON: {e}"))
                })?;
                // Secrets never leave the runtime: the triggered builds get their own grants.
                self.logs.redactor().redact_json(&mut value);
                properties.insert(name.clone(), value);
            }
            let request = crate::trigger::TriggerRequest {
                schedulers: request.schedulers,
                properties,
                wait: request.wait,
            };
            let shown = serde_json::to_value(&request.properties).unwrap_or_default();
            self.header(&format!(
                "triggering {}{} with properties {shown}",
                request.schedulers.join(", "),
                if request.wait {
                    ", waiting for the builds"
                } else {
                    ""
                }
            ));
            let response = self
                .grant
                .triggers
                .trigger(&request, &self.cancel)
                .map_err(HostError::Io)?;
            if let Some(note) = &response.note {
                self.header(note);
            }
            Ok(response.builds)
        })();
        Ok(result.map(|builds| {
            builds
                .into_iter()
                .map(|b| WitTriggeredBuild {
                    scheduler: b.scheduler,
                    builder: b.builder,
                    outcome: b.result.map(Into::into),
                    url: b.url,
                })
                .collect()
        }))
    }

    fn download_artifact(
        &mut self,
        name: String,
        path: String,
    ) -> wasmtime::Result<Result<WitArtifact, HostError>> {
        self.drain_guest_output();
        let result = (|| {
            let rel = files::check_relative(&path).map_err(HostError::Invalid)?;
            let (mut src, size) = self.grant.artifacts.get(&name).map_err(store_error)?;
            let limit = self.grant.limits.max_artifact_bytes;
            if size > limit {
                return Err(HostError::TooLarge(format!(
                    "artifact {name:?} is {size} bytes; the limit is {limit}"
                )));
            }
            let (size, sha1, sha256) = files::write_replacing(&self.workdir, rel, |file| {
                crate::artifacts::copy_hashing(&mut src, file, limit, &name)
                    .map_err(|e| e.to_string())
            })
            .map_err(HostError::Io)?;
            Ok(Artifact {
                name: name.clone(),
                size,
                sha1,
                sha256,
            })
        })();
        if let Ok(a) = &result {
            self.header(&format!(
                "downloaded artifact {} to {path} ({} bytes)",
                a.name, a.size
            ));
        }
        Ok(result.map(to_wit))
    }
}

/// A writer that refuses to go past a byte limit.
struct Capped<'a> {
    inner: &'a mut std::fs::File,
    left: u64,
}

impl std::io::Write for Capped<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            self.left = 0;
            return Err(std::io::Error::other("size limit reached"));
        }
        let n = self.inner.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
