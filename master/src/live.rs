//! Live updates: what this master sees happen (builds and steps starting and finishing, log
//! lines, requests queued and completed, workers coming and going) goes out on a broadcast
//! bus, which the HTTP layer streams to browsers and `kiln force --wait` as Server-Sent Events.
//! Nothing is built for the bus when nobody listens, so a farm without browsers open pays
//! nothing.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::broadcast;

use crate::server::Master;

/// How many events the bus holds for a slow client.
const BUS_CAPACITY: usize = 4096;

/// One thing that happened.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    /// `build`, `step`, `log`, `request` or `worker`.
    pub kind: &'static str,
    /// The log, for `log` events (clients subscribe to logs one by one).
    pub log: Option<i64>,
    /// What the client gets.
    pub data: Arc<Value>,
}

/// The bus.
#[derive(Debug)]
pub struct Live {
    sender: broadcast::Sender<LiveEvent>,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            sender: broadcast::channel(BUS_CAPACITY).0,
        }
    }
}

impl Live {
    /// Whether anyone listens (build the event only then).
    pub fn wanted(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    /// Sends an event of `kind` made by `data`, if anyone listens.
    pub fn send(&self, kind: &'static str, data: impl FnOnce() -> Value) {
        if self.wanted() {
            let _ = self.sender.send(LiveEvent {
                kind,
                log: None,
                data: Arc::new(data()),
            });
        }
    }

    /// Sends lines of a log, if anyone listens.
    pub fn send_log(&self, log: i64, data: impl FnOnce() -> Value) {
        if self.wanted() {
            let _ = self.sender.send(LiveEvent {
                kind: "log",
                log: Some(log),
                data: Arc::new(data()),
            });
        }
    }

    /// A new listener: every event sent from now on, or `Lagged` for those it fell behind on.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.sender.subscribe()
    }
}

/// The data of a `log` event: lines appended to a log from line `offset`.
pub fn log_event(log: i64, offset: i64, text: &str) -> Value {
    let lines: Vec<Value> = text
        .lines()
        .map(|l| kiln_db::views::split_channel(l, true))
        .collect();
    serde_json::json!({"logid": log, "offset": offset, "lines": lines})
}

/// Sends `step` events for steps and `build` and `request` events for builds, read fresh
/// from the database, if anyone listens. Failures are logged: live updates are a courtesy.
pub async fn publish(m: &Master, steps: &[i64], builds: &[i64]) {
    if !m.live.wanted() || (steps.is_empty() && builds.is_empty()) {
        return;
    }
    let result: Result<(), sqlx::Error> = async {
        let mut conn = m.db.pool().acquire().await?;
        let mut steps = steps.to_vec();
        steps.sort_unstable();
        steps.dedup();
        if !steps.is_empty() {
            let pairs: Vec<(String, String)> = steps
                .iter()
                .map(|id| ("stepid".to_owned(), id.to_string()))
                .collect();
            if let Ok(listing) =
                kiln_db::Listing::parse(&kiln_db::views::STEPS, &pairs, 10_000, &[])
            {
                for mut step in listing.fetch(&mut conn).await?.0 {
                    kiln_db::views::cpu_in_seconds(&mut step);
                    m.live.send("step", || step);
                }
            }
        }
        for &id in builds {
            if let Some(build) = kiln_db::views::get(&mut conn, &kiln_db::views::BUILDS, id).await?
            {
                let request = build["buildrequestid"].as_i64().unwrap_or_default();
                m.live.send("build", || build);
                if let Some(r) =
                    kiln_db::views::get(&mut conn, &kiln_db::views::BUILDREQUESTS, request).await?
                {
                    m.live.send("request", || r);
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(%error, "cannot read what to send to live update listeners");
    }
}

/// Sends a `request` event for each request of new buildsets (a scheduler's), if anyone
/// listens.
pub async fn publish_buildsets(m: &Master, buildsets: &[i64]) {
    if !m.live.wanted() || buildsets.is_empty() {
        return;
    }
    let pairs: Vec<(String, String)> = buildsets
        .iter()
        .map(|id| ("buildsetid".to_owned(), id.to_string()))
        .collect();
    let result: Result<(), sqlx::Error> = async {
        let mut conn = m.db.pool().acquire().await?;
        if let Ok(listing) =
            kiln_db::Listing::parse(&kiln_db::views::BUILDREQUESTS, &pairs, 10_000, &[])
        {
            for r in listing.fetch(&mut conn).await?.0 {
                m.live.send("request", || r);
            }
        }
        Ok(())
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(%error, "cannot read what to send to live update listeners");
    }
}
