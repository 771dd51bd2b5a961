//! The master-worker protocol: every message either side sends, in one place, versioned.
//!
//! A worker connects out to the master over a WebSocket (`/workers/connect`) and speaks JSON
//! text frames, one message per frame. The worker opens with [`ToMaster::Hello`] (its name,
//! token, capabilities and the builds it is running, so a reconnect can be reconciled); the
//! master answers [`ToWorker::Welcome`] or [`ToWorker::Refused`] and closes.
//!
//! Every message about a build carries its [`BuildRef`]: the build's id and the **cookie** the
//! master minted when it dispatched the build. The master refuses (and logs) a message whose
//! cookie is wrong or stale, or about a build not leased to the sending worker.
//!
//! Backpressure: a worker sends build messages in order and keeps at most
//! [`WINDOW`] of them unacknowledged; the master acknowledges applied messages with
//! [`ToWorker::Ack`]. A step whose log outruns the master therefore waits, and a message lost
//! with a connection is sent again after the reconnect (the master skips those it applied).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::build::{StepOptions, StepRecord};
use crate::logs::{Channel, ReportEvent};
use crate::outcome::Outcome;
use crate::props::Properties;

/// The protocol version this build speaks. A master refuses a worker of another version with a
/// message naming both. Version 2 added [`ToWorker::Shutdown`].
pub const PROTOCOL_VERSION: u32 = 2;

/// How many build messages a worker may have in flight before it waits for an acknowledgement.
pub const WINDOW: u64 = 256;

/// Largest message either side accepts, in bytes. Log text is sent in chunks well below it.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Largest log text a worker puts in one [`BuildEvent::Log`].
pub const LOG_CHUNK_BYTES: usize = 64 << 10;

/// The path of the worker endpoint on the master.
pub const CONNECT_PATH: &str = "/workers/connect";

/// The path prefix of the master's file cache: `/filecache/<sha1>`.
pub const FILECACHE_PATH: &str = "/filecache/";

/// A build as both sides name it: its id and the cookie of this attempt.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BuildRef {
    /// The build's id in the master's database.
    pub id: i64,
    /// The secret the master minted when it dispatched this attempt.
    pub cookie: String,
}

/// What a worker can do, as it advertises on connecting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// CPU architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// Operating system (`linux`).
    pub os: String,
    /// Free-form tags (`gpu`, `big`).
    pub tags: Vec<String>,
    /// Sandbox mode: every command confined, the workdir wiped after each build.
    pub sandbox: bool,
    /// The Landlock ABI the kernel enforces here (0: none).
    pub landlock_abi: u32,
    /// How many builds the worker runs at once.
    pub max_builds: u32,
    /// The worker's version.
    pub version: String,
}

/// A build the worker is running, and how far the master has acknowledged its messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// The build.
    pub build: BuildRef,
    /// The sequence number of the last message the master acknowledged (0: none).
    pub acked: u64,
}

/// Messages from a worker to the master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToMaster {
    /// The first message on a connection.
    Hello {
        /// [`PROTOCOL_VERSION`] of the worker.
        protocol: u32,
        /// The worker's name.
        name: String,
        /// The worker's token.
        token: String,
        /// What it can do.
        capabilities: Capabilities,
        /// What it is running (after a reconnect).
        running: Vec<Running>,
    },
    /// Sent every heartbeat interval; also answers [`ToWorker::Scan`] when `scan` is set.
    Status {
        /// The scan this answers, if any.
        scan: Option<u64>,
        /// What the worker is running.
        running: Vec<BuildRef>,
    },
    /// Something about a build, in order; `seq` counts from 1 per build.
    Build {
        /// The build.
        build: BuildRef,
        /// Sequence number within the build.
        seq: u64,
        /// What happened.
        event: BuildEvent,
    },
    /// The worker refuses a build it was sent (full, shutting down, a bad job).
    Reject {
        /// The build.
        build: BuildRef,
        /// Why, for a person.
        reason: String,
    },
    /// The worker is shutting down gracefully: send it nothing new.
    Draining,
}

/// What happened in a build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BuildEvent {
    /// A step started.
    StepStarted {
        /// Its index in the job's steps.
        step: u32,
        /// Its name.
        name: String,
    },
    /// Complete lines appended to a step's log.
    Log {
        /// The step's index.
        step: u32,
        /// The log's name (`stdio`, or one a step or observer opened).
        log: String,
        /// The channel.
        channel: Channel,
        /// Complete lines, each ending in `\n`.
        text: String,
    },
    /// A live report (summary, progress, statistics, URL, property).
    Report {
        /// The step's index.
        step: u32,
        /// The report.
        report: ReportEvent,
    },
    /// A step finished (or was skipped).
    StepFinished {
        /// Its index.
        step: u32,
        /// How it went (boxed: by far the largest event).
        record: Box<StepRecord>,
    },
    /// The build finished; nothing follows.
    Finished {
        /// The build's result.
        result: Outcome,
        /// Why, when the build could not run (a module that failed verification, say).
        message: Option<String>,
        /// The properties the steps set, with their sources.
        properties: Properties,
    },
}

/// Messages from the master to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// The worker is accepted.
    Welcome {
        /// The master's [`PROTOCOL_VERSION`].
        protocol: u32,
        /// How often to send [`ToMaster::Status`], in milliseconds.
        heartbeat_ms: u64,
        /// Builds from the Hello's `running` the master adopts, with the last sequence
        /// number it applied (the worker resends what follows).
        adopted: Vec<Running>,
        /// Builds from the Hello's `running` the master no longer wants: stop them.
        abandoned: Vec<BuildRef>,
    },
    /// The worker is not accepted; the master closes the connection.
    Refused {
        /// Why, for a person.
        reason: String,
        /// Whether trying again later may help (a second connection under the same name);
        /// false for a bad token or protocol version.
        retry: bool,
    },
    /// Run a build.
    Start(Box<Job>),
    /// Stop a build (its steps end CANCELLED).
    Stop {
        /// The build.
        build: BuildRef,
        /// Why.
        reason: String,
    },
    /// Stop one step of a build (it ends CANCELLED; the build goes on as its options say).
    StopStep {
        /// The build.
        build: BuildRef,
        /// The step's index.
        step: u32,
        /// Why.
        reason: String,
    },
    /// The master applied a build's messages up to `seq`.
    Ack {
        /// The build.
        build: BuildRef,
        /// The last sequence number applied.
        seq: u64,
    },
    /// Say what you are running (answered by a [`ToMaster::Status`] with this `scan`).
    Scan {
        /// The scan's number.
        scan: u64,
    },
    /// Shut down gracefully: take no new builds, finish and report the running ones, leave.
    Shutdown {
        /// Why, for the worker's log.
        reason: String,
    },
    /// A message of the worker's was refused; the worker logs it.
    Error {
        /// What was wrong.
        message: String,
    },
}

/// A build for a worker: everything it needs, with modules named by content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The build.
    pub build: BuildRef,
    /// The kind of job (see the master's job behaviours); `steps` for a builder's steps.
    pub kind: String,
    /// The builder.
    pub builder: String,
    /// The build's number within its builder.
    pub number: i64,
    /// The builder's workdir under the worker's base directory: one safe path component.
    pub workdir: String,
    /// The steps, in order.
    pub steps: Vec<StepSpec>,
    /// The build's starting properties, with their sources.
    pub properties: Properties,
    /// Secrets the steps use (never for untrusted builds).
    pub secrets: BTreeMap<String, String>,
    /// What the steps may use besides the workdir.
    pub grant: GrantSpec,
    /// Whether the build is trusted; an untrusted build runs only on a sandbox worker.
    pub trusted: bool,
}

/// A step of a [`Job`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSpec {
    /// Its name.
    pub name: String,
    /// The step's component.
    pub module: ModuleSpec,
    /// Its arguments (`%(prop:...)s` and `%(secret:...)s` rendered on the worker).
    pub args: Value,
    /// Its observers, in order.
    pub observers: Vec<ObserverSpecWire>,
    /// How its result affects the build.
    pub options: StepOptions,
    /// Its deadline, in milliseconds.
    pub timeout_ms: u64,
}

/// An observer of a [`StepSpec`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObserverSpecWire {
    /// Its name (for messages).
    pub name: String,
    /// Its component.
    pub module: ModuleSpec,
    /// Its arguments.
    pub args: Value,
    /// The log it watches.
    pub log: String,
}

/// A component, as a worker finds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum ModuleSpec {
    /// Built into every worker (`shell`, `git`, `line-counter`).
    Builtin {
        /// The built-in's name.
        name: String,
    },
    /// An uploaded module, fetched from the master's file cache.
    File {
        /// What the configuration calls it (`lint@1.2`), for messages.
        label: String,
        /// SHA-1 of the content (40 lowercase hex digits): its name in the cache.
        sha1: String,
        /// SHA-256 of the content, verified before use.
        sha256: String,
        /// Size in bytes, verified before use.
        size: u64,
    },
}

impl ModuleSpec {
    /// What to call it in messages.
    pub fn label(&self) -> &str {
        match self {
            ModuleSpec::Builtin { name } => name,
            ModuleSpec::File { label, .. } => label,
        }
    }
}

/// The grant of a [`Job`]'s steps, apart from the workdir, secrets and confinement (which
/// the worker decides).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GrantSpec {
    /// Programs the steps may run.
    pub programs: Vec<String>,
    /// Directories the steps may read.
    pub ro_dirs: Vec<std::path::PathBuf>,
    /// Environment of the steps and their commands.
    pub env: BTreeMap<String, String>,
    /// Whether commands may use the network.
    pub network: bool,
    /// Memory cap of a step and of each observer, in bytes.
    pub memory_bytes: u64,
}

/// Whether `s` names a file by SHA-1: exactly 40 lowercase hex digits.
pub fn is_sha1(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `s` is a SHA-256 in hex: exactly 64 lowercase hex digits.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `s` may name a directory under a worker's base directory: one path component of
/// letters, digits, `-`, `_` and `.`, not `.` or `..`.
pub fn is_safe_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(is_sha1("da39a3ee5e6b4b0d3255bfef95601890afd80709"));
        assert!(!is_sha1("DA39A3EE5E6B4B0D3255BFEF95601890AFD80709"));
        assert!(!is_sha1("da39a3ee5e6b4b0d3255bfef95601890afd8070"));
        assert!(!is_sha1("../../../../../../../../../../etc/passwd"));
        assert!(is_safe_component("linux-x86_64.debug"));
        assert!(!is_safe_component(".."));
        assert!(!is_safe_component("a/b"));
        assert!(!is_safe_component(""));
    }

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let m = ToMaster::Build {
            build: BuildRef {
                id: 7,
                cookie: "c".into(),
            },
            seq: 3,
            event: BuildEvent::Log {
                step: 0,
                log: "stdio".into(),
                channel: Channel::Stdout,
                text: "hello\n".into(),
            },
        };
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains(r#""type":"build""#), "{text}");
        assert!(text.contains(r#""kind":"log""#), "{text}");
        assert_eq!(serde_json::from_str::<ToMaster>(&text).unwrap(), m);
    }

    #[test]
    fn a_step_end_from_an_older_worker_has_no_resources() {
        let record = StepRecord {
            name: "compile".into(),
            ran: true,
            hidden: false,
            outcome: crate::StepOutcome {
                resources: Some(crate::StepResources {
                    commands: 2,
                    cpu_ms: 1500,
                    peak_rss_bytes: Some(200 << 20),
                    guest_memory_bytes: 2 << 20,
                    observer_memory_bytes: None,
                }),
                ..crate::StepOutcome::exception("m".into(), std::time::Duration::ZERO)
            },
        };
        let event = BuildEvent::StepFinished {
            step: 1,
            record: Box::new(record),
        };
        let mut json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["record"]["outcome"]["resources"]["cpu_ms"], 1500);
        assert_eq!(
            serde_json::from_value::<BuildEvent>(json.clone()).unwrap(),
            event
        );
        json["record"]["outcome"]
            .as_object_mut()
            .unwrap()
            .remove("resources");
        let BuildEvent::StepFinished { record, .. } = serde_json::from_value(json).unwrap() else {
            panic!("a step end")
        };
        assert_eq!(record.outcome.resources, None);
    }
}
