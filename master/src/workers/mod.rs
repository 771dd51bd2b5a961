//! Workers as the master sees them: their connections (`/workers/connect`, a WebSocket
//! speaking [`runtime::protocol`]), the builds leased to them, dispatch, and recovery.
//!
//! - **Connections.** A worker says hello with its name, token and capabilities; the master
//!   checks them against `[[workers]]` and answers welcome (adopting the builds the worker
//!   says it runs, when the database agrees) or refused. A newer connection under the same
//!   name replaces an older one.
//! - **Leases.** Each dispatched build is leased to one worker under a fresh cookie. A message
//!   about a build is applied only if the lease (in memory) and the build row (in the
//!   database, in the same transaction as the message's effects) agree on worker, cookie and
//!   sequence number; anything else is refused and logged. Messages are applied in batches,
//!   one transaction per batch, and acknowledged after the commit.
//! - **Dispatch.** Free workers (connected, not draining, paused or quarantined, with room)
//!   go to [`crate::requests::plan_for_workers`]; one transaction then claims the planned
//!   requests and records their builds, and each becomes a lease and a job composed by the
//!   builder's [`JobBehaviour`].
//! - **Recovery.** A worker silent or disconnected for three heartbeats is lost: its builds end
//!   RETRY and their requests are queued again. Every heartbeat the master scans: each worker
//!   says what it runs, and a leased build the worker forgot is retried (Launchpad's
//!   `scanActiveBuilders`). Running builds nobody holds (after a master restart) are adopted
//!   when their worker reconnects, or retried when it does not.
//! - **Health.** Rejected jobs, lost builds and builds the worker could not start count as
//!   failures; three in a row quarantine the worker with exponential backoff; a build it runs
//!   properly makes it healthy again.

mod apply;
mod connection;
mod dispatch;
mod health;
mod recovery;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use kiln_protocol::{
    BuildEvent, BuildRef, Capabilities, PROTOCOL_VERSION, Running, ToMaster, ToWorker,
};
use runtime::Outcome;
use runtime::policy::WorkerInfo;
use serde_json::json;
use tokio::sync::mpsc;

use crate::jobs::{self, IdleBehaviour, JobBehaviour, JobContext, RequestFate};
use crate::requests::Assignment;
use crate::server::{Master, State as MasterState};
use kiln_config as config;
use kiln_db as db;
use kiln_db::model::*;

pub use connection::{Frame, serve};
pub use health::{QUARANTINE_AFTER, quarantine_ms};

/// A worker's connection.
struct Conn {
    pub(super) id: u64,
    pub(super) tx: mpsc::UnboundedSender<ToWorker>,
    pub(super) info: WorkerInfo,
    pub(super) worker_id: WorkerId,
    pub(super) draining: bool,
    /// The scan sent and not yet answered: its number and when it was sent.
    pub(super) scan: Option<(u64, Instant)>,
}

/// A build leased to a worker.
#[derive(Debug, Clone)]
struct Lease {
    pub(super) worker: String,
    pub(super) worker_id: WorkerId,
    pub(super) cookie: String,
    pub(super) kind: &'static str,
    pub(super) builder: String,
    pub(super) request: BuildRequestId,
    pub(super) last_seq: u64,
    /// Step number to (step id, name).
    pub(super) steps: HashMap<u32, (i64, String)>,
    /// (step number, log name) to log id.
    pub(super) logs: HashMap<(u32, String), i64>,
    /// Steps this master recorded starting (so their logs are known to be new).
    pub(super) fresh: HashSet<u32>,
    /// Running steps' progress metrics at their last value, by step number.
    pub(super) progress: HashMap<u32, std::collections::BTreeMap<String, u64>>,
    pub(super) dispatched: Instant,
    /// When its worker's connection went away.
    pub(super) orphaned: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    pub(super) conns: HashMap<String, Conn>,
    pub(super) leases: HashMap<i64, Lease>,
    /// Running builds in the database that nobody holds, and since when.
    pub(super) unheld: HashMap<i64, Instant>,
    /// Builds that ended here lately (id to cookie, and when): a worker's scan answer may
    /// still list one whose end it has sent, and that is no stray build.
    pub(super) ended: HashMap<i64, (String, Instant)>,
    /// Workers known to have no failures recorded (so a good build costs no query).
    pub(super) healthy: HashSet<String>,
    /// Every worker's health as last read, and when (dispatch rereads it after a second, or
    /// after a failure is recorded).
    pub(super) health: Option<(
        Instant,
        std::collections::BTreeMap<String, db::WorkerHealth>,
    )>,
}

/// The master's workers.
#[derive(Default)]
pub struct Workers {
    inner: Mutex<Inner>,
    next_conn: AtomicU64,
    next_scan: AtomicU64,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").finish_non_exhaustive()
    }
}

impl Workers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Names of connected workers.
    pub fn connected(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().conns.keys().cloned().collect();
        names.sort();
        names
    }

    /// Builds leased now, by worker: (build id, worker).
    pub fn leases(&self) -> Vec<(i64, String)> {
        let mut l: Vec<(i64, String)> = self
            .lock()
            .leases
            .iter()
            .map(|(id, l)| (*id, l.worker.clone()))
            .collect();
        l.sort();
        l
    }
}

impl Master {
    /// Asks the worker running build `id` to stop its step `step` (it ends CANCELLED, which
    /// halts the build unless later steps are `always_run`). False if no worker of this
    /// master runs the build.
    pub fn stop_step(&self, id: i64, step: u32, reason: &str) -> bool {
        let lease = self.workers.lock().leases.get(&id).cloned();
        lease.is_some_and(|l| {
            self.send_to(
                &l.worker,
                ToWorker::StopStep {
                    build: BuildRef {
                        id,
                        cookie: l.cookie,
                    },
                    step,
                    reason: reason.to_owned(),
                },
            )
        })
    }

    /// Asks the worker running build `id` to stop it. False if no worker of this master runs
    /// it.
    pub fn stop_build(&self, id: i64, reason: &str) -> bool {
        let lease = self.workers.lock().leases.get(&id).cloned();
        lease.is_some_and(|l| {
            self.send_to(
                &l.worker,
                ToWorker::Stop {
                    build: BuildRef {
                        id,
                        cookie: l.cookie,
                    },
                    reason: reason.to_owned(),
                },
            )
        })
    }
}

/// A fresh build cookie: 128 random bits in hex.
fn new_cookie() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

/// What the API shows of a connected worker.
pub fn describe(master: &Master) -> Vec<serde_json::Value> {
    let inner = master.workers.lock();
    let mut out: Vec<serde_json::Value> = inner
        .conns
        .iter()
        .map(|(name, c)| {
            let builds: Vec<i64> = inner
                .leases
                .iter()
                .filter(|(_, l)| &l.worker == name)
                .map(|(id, _)| *id)
                .collect();
            json!({
                "name": name,
                "connected": true,
                "sandbox": c.info.sandbox,
                "arch": c.info.arch,
                "os": c.info.os,
                "tags": c.info.tags,
                "max_builds": c.info.max_builds,
                "draining": c.draining,
                "builds": builds,
            })
        })
        .collect();
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_fresh_and_hex() {
        let a = new_cookie();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_cookie());
    }
}
