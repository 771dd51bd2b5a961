//! `GET /api/v2/events`: the master's live bus ([`master::live`]) as Server-Sent Events.
//!
//! A client that falls behind by more than the bus holds gets a `lagged` event and should
//! reload what it shows; a reconnecting `EventSource` does the same.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use master::server::Master;
use tokio::sync::broadcast;

use crate::ApiError;

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
