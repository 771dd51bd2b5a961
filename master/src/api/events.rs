//! Live updates: what this master sees happen (builds and steps starting and finishing, log
//! lines, requests queued and completed, workers coming and going) goes out on a broadcast
//! bus, and `GET /api/v2/events` streams it as Server-Sent Events. Nothing is built for the
//! bus when nobody listens, so a farm without browsers open pays nothing.
//!
//! A client that falls behind by more than the bus holds gets a `lagged` event and should
//! reload what it shows; a reconnecting `EventSource` does the same.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde_json::Value;
use tokio::sync::broadcast;

use super::ApiError;
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

    fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.sender.subscribe()
    }
}

/// Query of `GET /api/v2/events`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Logs whose lines to stream, comma-separated ids.
    #[serde(default)]
    logs: Option<String>,
    /// Kinds of event to stream, comma-separated (default: all but `log`).
    #[serde(default)]
    kinds: Option<String>,
    /// A stream ticket, read by the API's auth layer (`POST /api/v2/auth/ticket`).
    #[serde(default)]
    #[allow(dead_code)]
    ticket: Option<String>,
}

const KINDS: &[&str] = &["build", "step", "request", "worker", "log"];

/// `GET /api/v2/events`.
pub async fn stream(
    State(m): State<Arc<Master>>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::BadRequest(format!(
            "{}; the parameters are logs=ID,ID and kinds={}",
            e.body_text(),
            KINDS.join(",")
        ))
    })?;
    let logs: Vec<i64> = match &q.logs {
        None => Vec::new(),
        Some(text) => text
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse().map_err(|_| {
                    ApiError::BadRequest(format!("logs={text}: give log ids separated by commas"))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let kinds: Vec<&'static str> = match &q.kinds {
        None => KINDS.to_vec(),
        Some(text) => text
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|k| {
                KINDS
                    .iter()
                    .copied()
                    .find(|known| *known == k)
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "kinds={text}: {k:?} is not a kind of event; the kinds are {}",
                            KINDS.join(", ")
                        ))
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    let receiver = m.live.subscribe();
    let events = futures_util::stream::unfold(receiver, move |mut rx| {
        let logs = logs.clone();
        let kinds = kinds.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(e) => {
                        let wanted = match e.log {
                            Some(log) => logs.contains(&log),
                            None => kinds.contains(&e.kind),
                        };
                        if wanted {
                            let event = Event::default().event(e.kind).data(e.data.to_string());
                            return Some((Ok(event), rx));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let event = Event::default()
                            .event("lagged")
                            .data(format!("{{\"missed\":{n}}}"));
                        return Some((Ok(event), rx));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The data of a `log` event: lines appended to a log from line `offset`.
pub fn log_event(log: i64, offset: i64, text: &str) -> Value {
    let lines: Vec<Value> = text
        .lines()
        .map(|l| super::read::split_channel(l, true))
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
                crate::db::Listing::parse(&crate::db::views::STEPS, &pairs, 10_000, &[])
            {
                for mut step in listing.fetch(&mut conn).await?.0 {
                    super::read::cpu_in_seconds(&mut step);
                    m.live.send("step", || step);
                }
            }
        }
        for &id in builds {
            if let Some(build) =
                crate::db::views::get(&mut conn, &crate::db::views::BUILDS, id).await?
            {
                let request = build["buildrequestid"].as_i64().unwrap_or_default();
                m.live.send("build", || build);
                if let Some(r) =
                    crate::db::views::get(&mut conn, &crate::db::views::BUILDREQUESTS, request)
                        .await?
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
            crate::db::Listing::parse(&crate::db::views::BUILDREQUESTS, &pairs, 10_000, &[])
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
