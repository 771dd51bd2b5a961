//! Reporters: telling the outside world about builds and buildsets (`[[reporters]]`).
//!
//! Nothing here runs in a build's path. What a reporter owes is a row of
//! `reporter_deliveries` (`db/reporters.rs`): a build's rows are queued in the transaction
//! that starts or ends the build ([`queue_build`], only for the reporters that want it), a
//! buildset's by this module's task as it follows the `events` feed (`buildset.first_failure`,
//! `buildset.complete`) with a durable mark. The same task drains the queue: it claims due
//! deliveries, reads what to say from the database, sends it (`http.rs`, `status.rs`,
//! `email.rs`) at most [`CONCURRENCY`] at a time, and records the outcome: delivered, retried
//! after an exponential backoff, failed after [`MAX_ATTEMPTS`] or at once when the receiver
//! refused it for good (a 4xx), or skipped (a failure that is not new to a `problem` reporter).
//! Failures are visible at `GET /api/v2/reporters` and counted in
//! `kiln_reporter_deliveries_total{reporter,outcome}`.

pub mod email;
pub mod http;
pub mod payload;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::secrets::SecretLookup as _;
use crate::server::Master;
use kiln_config::{ReportMode, Reporter, ReporterKind, SecretValue};
use kiln_db::model::{Results, now_ms};
use kiln_db::{self as db, DueDelivery};

/// Deliveries sent at once; more wait for a free slot (a slow receiver holds only its own).
pub const CONCURRENCY: usize = 8;

/// Attempts before a delivery is given up as failed: with [`backoff`] that is about an hour
/// and a half of trying.
pub const MAX_ATTEMPTS: i64 = 12;

/// The wait after the first failed attempt; it doubles with each failure.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);

/// The longest wait between attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(30 * 60);

/// How long a claimed attempt may take before another master (or this one, after a restart)
/// may try the delivery again. Longer than any sender's own timeout.
const LEASE: Duration = Duration::from_secs(5 * 60);

/// Timeout of one HTTP request or SMTP conversation.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the queue and the events feed are read when nothing wakes the task (work queued
/// by other masters, retries coming due are computed exactly).
const IDLE_POLL: Duration = Duration::from_secs(5);

/// The name of the reporters' mark over the `events` feed.
const EVENTS_MARK: &str = "buildsets";

/// What a delivery is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A build was dispatched (commit statuses go `pending`).
    BuildStarted,
    /// A build ended.
    BuildFinished,
    /// A build of a buildset failed first.
    BuildsetFirstFailure,
    /// Every request of a buildset completed.
    BuildsetComplete,
}

impl Event {
    /// As stored and sent (`X-Kiln-Event`, the JSON's `event`).
    pub fn as_str(self) -> &'static str {
        match self {
            Event::BuildStarted => "build.started",
            Event::BuildFinished => "build.finished",
            Event::BuildsetFirstFailure => "buildset.first_failure",
            Event::BuildsetComplete => "buildset.complete",
        }
    }

    /// Parses a stored event name.
    pub fn parse(s: &str) -> Option<Event> {
        [
            Event::BuildStarted,
            Event::BuildFinished,
            Event::BuildsetFirstFailure,
            Event::BuildsetComplete,
        ]
        .into_iter()
        .find(|e| e.as_str() == s)
    }
}

/// Whether a result is a failure, for `failing` and `problem` reporters.
pub fn is_failing(r: Results) -> bool {
    matches!(r, Results::Failure | Results::Exception)
}

/// Whether reporter `r` wants `event` about a build of `builder` that ended `result` (none
/// for a start). A `problem` reporter takes every failure here; whether it is new is decided
/// when it is delivered, off the message loop.
pub fn wants_build(r: &Reporter, event: Event, builder: &str, result: Option<Results>) -> bool {
    if r.builders
        .as_ref()
        .is_some_and(|b| !b.iter().any(|n| n == builder))
    {
        return false;
    }
    let mode = match &r.kind {
        ReporterKind::CommitStatus { .. } => {
            return matches!(event, Event::BuildStarted | Event::BuildFinished);
        }
        ReporterKind::Http { mode, .. } | ReporterKind::Email { mode, .. } => *mode,
    };
    match event {
        Event::BuildFinished => mode == ReportMode::All || result.is_some_and(is_failing),
        _ => false,
    }
}

/// Whether reporter `r` wants `event` about a buildset of `builders` that is `failing`.
pub fn wants_buildset(r: &Reporter, event: Event, builders: &[String], failing: bool) -> bool {
    if !r.buildsets {
        return false;
    }
    if let Some(filter) = &r.builders
        && !builders.iter().any(|b| filter.contains(b))
    {
        return false;
    }
    match &r.kind {
        ReporterKind::CommitStatus { .. } => false,
        ReporterKind::Http { mode, .. } | ReporterKind::Email { mode, .. } => match event {
            Event::BuildsetFirstFailure => true,
            Event::BuildsetComplete => *mode == ReportMode::All || failing,
            _ => false,
        },
    }
}

/// Queues, in the transaction that started or ended build `build` of `builder`, a delivery
/// for each reporter that wants it. Costs nothing when no reporter does.
pub async fn queue_build(
    tx: &mut db::Tx,
    reporters: &[Reporter],
    builder: &str,
    build: i64,
    event: Event,
    result: Option<Results>,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let mut queued = false;
    for r in reporters
        .iter()
        .filter(|r| wants_build(r, event, builder, result))
    {
        db::queue_delivery(&mut *tx, &r.name, event.as_str(), build, now).await?;
        queued = true;
    }
    Ok(queued)
}

/// The wait before attempt `attempts + 1`, after `attempts` failed.
pub fn backoff(attempts: i64) -> Duration {
    let doublings = attempts.saturating_sub(1).clamp(0, 30) as u32;
    FIRST_RETRY
        .saturating_mul(1u32 << doublings.min(20))
        .min(MAX_RETRY)
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DeliveryError {
    /// What went wrong, for the API and the log.
    pub message: String,
    /// Retrying cannot help (the receiver refused it for good, or the configuration is wrong).
    pub permanent: bool,
}

impl DeliveryError {
    /// An error worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        DeliveryError {
            message: message.into(),
            permanent: false,
        }
    }

    /// An error no retry can mend.
    pub fn permanent(message: impl Into<String>) -> Self {
        DeliveryError {
            message: message.into(),
            permanent: true,
        }
    }

    /// A request that got no answer.
    pub fn unreachable(url: &str, e: &reqwest::Error) -> Self {
        let what = if e.is_timeout() {
            "timed out".to_owned()
        } else {
            // The source chain says why (refused, DNS, TLS), the top level only "error
            // sending request".
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                msg = format!("{msg}: {s}");
                source = s.source();
            }
            msg
        };
        DeliveryError::transient(format!("POST {}: {what}", kiln_db::redact_url(url)))
    }
}

/// Turns an HTTP answer into the outcome of an attempt: 2xx delivered; 408, 429 and 5xx
/// retried; any other status refused for good. The start of the body goes in the message.
pub async fn check_status(url: &str, response: reqwest::Response) -> Result<(), DeliveryError> {
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    let body: String = body.trim().chars().take(200).collect();
    let message = format!(
        "POST {} answered {status}{}{body}",
        kiln_db::redact_url(url),
        if body.is_empty() { "" } else { ": " }
    );
    let retry = status.is_server_error()
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
    Err(DeliveryError {
        message,
        permanent: !retry,
    })
}

/// The reporters' shared state in the master: a wake-up for the task.
#[derive(Debug, Default)]
pub struct Reporters {
    wake: Notify,
}

impl Reporters {
    /// Tells the task that deliveries were queued or buildset events appended.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// The running reporter task; dropping it stops the task (a delivery in flight is tried again
/// when its lease ends).
pub struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the reporter task of `master`.
pub fn start(master: &Arc<Master>) -> Task {
    let m = master.clone();
    Task(tokio::spawn(async move { run(m).await }))
}

/// What one attempt came to.
#[derive(Debug)]
enum Attempt {
    Delivered,
    Skipped(String),
    Failed(DeliveryError),
}

async fn run(m: Arc<Master>) {
    let client = match reqwest::Client::builder()
        .timeout(SEND_TIMEOUT)
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(error = %error, "reporters cannot start: no HTTP client");
            return;
        }
    };
    let mut inflight: JoinSet<()> = JoinSet::new();
    let mut busy: std::collections::HashSet<i64> = Default::default();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<i64>();
    loop {
        if !m.state().config.reporters.is_empty()
            && let Err(error) = follow_buildsets(&m).await
        {
            tracing::warn!(
                error = format!("{error:#}"),
                "reporters: reading buildset events failed"
            );
        }
        let mut wait = IDLE_POLL;
        match fill(&m, &client, &mut inflight, &mut busy, &done_tx).await {
            Ok(Some(next)) => {
                let until = Duration::from_millis((next - now_ms()).max(0) as u64);
                wait = wait.min(until.max(Duration::from_millis(10)));
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "reporters: reading the delivery queue failed"
                );
            }
        }
        tokio::select! {
            _ = m.reporters.wake.notified() => {}
            Some(id) = done_rx.recv() => { busy.remove(&id); }
            _ = tokio::time::sleep(wait) => {}
        }
        while let Ok(id) = done_rx.try_recv() {
            busy.remove(&id);
        }
        while inflight.try_join_next().is_some() {}
    }
}

/// Claims and starts due deliveries while there are free slots. Returns when the next pending
/// delivery is due, to sleep until then.
async fn fill(
    m: &Arc<Master>,
    client: &reqwest::Client,
    inflight: &mut JoinSet<()>,
    busy: &mut std::collections::HashSet<i64>,
    done: &tokio::sync::mpsc::UnboundedSender<i64>,
) -> anyhow::Result<Option<i64>> {
    let mut conn = m.db.pool().acquire().await?;
    let now = now_ms();
    let free = CONCURRENCY.saturating_sub(busy.len());
    if free > 0 {
        let due = db::due_deliveries(&mut conn, now, (free + busy.len()) as i64).await?;
        let due: Vec<DueDelivery> = due.into_iter().filter(|d| !busy.contains(&d.id)).collect();
        for d in due.into_iter().take(free) {
            if !db::claim_delivery(&mut conn, &d, now + LEASE.as_millis() as i64).await? {
                continue;
            }
            busy.insert(d.id);
            let (m, client, done) = (m.clone(), client.clone(), done.clone());
            inflight.spawn(async move {
                let id = d.id;
                attempt(&m, &client, d).await;
                let _ = done.send(id);
            });
        }
    }
    Ok(db::next_due(&mut conn).await?)
}

/// Makes one attempt of a claimed delivery and records what came of it.
async fn attempt(m: &Master, client: &reqwest::Client, d: DueDelivery) {
    let attempts = d.attempts + 1;
    let outcome = match send(m, client, &d).await {
        Ok(a) => a,
        Err(e) => Attempt::Failed(DeliveryError::transient(format!("{e:#}"))),
    };
    let now = now_ms();
    let (label, result) = match &outcome {
        Attempt::Delivered => {
            tracing::info!(reporter = %d.reporter, delivery = d.id, event = %d.event, subject = d.subject, attempts, "report delivered");
            ("delivered", record(m, d.id, "delivered", None, now).await)
        }
        Attempt::Skipped(why) => {
            tracing::debug!(reporter = %d.reporter, delivery = d.id, reason = %why, "report skipped");
            ("skipped", record(m, d.id, "skipped", Some(why), now).await)
        }
        Attempt::Failed(e) if e.permanent || attempts >= MAX_ATTEMPTS => {
            tracing::warn!(reporter = %d.reporter, delivery = d.id, event = %d.event, subject = d.subject, attempts, error = %e.message, "report failed; not retried");
            (
                "failed",
                record(m, d.id, "failed", Some(&e.message), now).await,
            )
        }
        Attempt::Failed(e) => {
            let wait = backoff(attempts);
            tracing::warn!(reporter = %d.reporter, delivery = d.id, event = %d.event, subject = d.subject, attempts, retry_in_ms = wait.as_millis() as u64, error = %e.message, "report failed; will retry");
            let result = async {
                let mut conn = m.db.pool().acquire().await?;
                db::retry_delivery(&mut conn, d.id, &e.message, now + wait.as_millis() as i64).await
            }
            .await;
            ("retried", result)
        }
    };
    m.metrics.reporter_delivery(&d.reporter, label);
    if let Err(error) = result {
        // The lease runs out and the delivery is tried again.
        tracing::error!(reporter = %d.reporter, delivery = d.id, error = %error, "cannot record a report's outcome");
    }
}

async fn record(
    m: &Master,
    id: i64,
    state: &str,
    error: Option<&str>,
    now: i64,
) -> Result<(), sqlx::Error> {
    let mut conn = m.db.pool().acquire().await?;
    db::end_delivery(&mut conn, id, state, error, now).await
}

/// Resolves a configured secret.
fn secret(m: &Master, value: &SecretValue) -> Result<String, DeliveryError> {
    match value {
        SecretValue::Plain(s) => Ok(s.expose().to_owned()),
        SecretValue::Named(name) => {
            m.state().config.secrets.get(name).map_err(|e| {
                DeliveryError::transient(format!("secret {name:?} cannot be read: {e}"))
            })
        }
    }
}

/// Reads what to say and says it.
async fn send(m: &Master, client: &reqwest::Client, d: &DueDelivery) -> anyhow::Result<Attempt> {
    let state = m.state();
    let Some(reporter) = state.config.reporters.iter().find(|r| r.name == d.reporter) else {
        return Ok(Attempt::Failed(DeliveryError::permanent(format!(
            "reporter {:?} is no longer configured",
            d.reporter
        ))));
    };
    let Some(event) = Event::parse(&d.event) else {
        return Ok(Attempt::Failed(DeliveryError::permanent(format!(
            "unknown event {:?}",
            d.event
        ))));
    };
    let master_url = state.config.master.url.clone();
    let mut conn = m.db.pool().acquire().await?;
    let is_build = matches!(event, Event::BuildStarted | Event::BuildFinished);
    let outcome = if is_build {
        let Some(build) = payload::read_build(&mut conn, d.subject).await? else {
            return Ok(Attempt::Failed(DeliveryError::permanent(format!(
                "build {} does not exist",
                d.subject
            ))));
        };
        let mode = match &reporter.kind {
            ReporterKind::Http { mode, .. } | ReporterKind::Email { mode, .. } => Some(*mode),
            ReporterKind::CommitStatus { .. } => None,
        };
        if mode == Some(ReportMode::Problem) && event == Event::BuildFinished {
            let previous = db::previous_build_results(&mut conn, d.subject).await?;
            if previous.is_some_and(is_failing) {
                return Ok(Attempt::Skipped(
                    "the builder's previous build failed too, so this failure is not new"
                        .to_owned(),
                ));
            }
        }
        if matches!(reporter.kind, ReporterKind::CommitStatus { .. })
            && event == Event::BuildFinished
        {
            db::supersede_earlier(&mut conn, &reporter.name, d.subject, d.id, now_ms()).await?;
        }
        drop(conn);
        match &reporter.kind {
            ReporterKind::Http { url, secret: s, .. } => {
                let body =
                    serde_json::to_vec(&payload::build_json(event.as_str(), &build, &master_url))?;
                let s = s.as_ref().map(|s| secret(m, s)).transpose();
                match s {
                    Ok(s) => {
                        http::post(client, url, s.as_deref(), event.as_str(), d.id, body).await
                    }
                    Err(e) => Err(e),
                }
            }
            ReporterKind::CommitStatus {
                forge,
                base_url,
                token,
                context,
            } => match secret(m, token) {
                Ok(token) => {
                    return Ok(status::post(
                        client,
                        &status::Target {
                            forge: *forge,
                            base_url,
                            token: &token,
                            context,
                        },
                        event,
                        &build,
                        &master_url,
                    )
                    .await
                    .map_or_else(Attempt::Failed, |sent| match sent {
                        status::Sent::Posted => Attempt::Delivered,
                        status::Sent::Nothing(why) => Attempt::Skipped(why),
                    }));
                }
                Err(e) => Err(e),
            },
            ReporterKind::Email { .. } => {
                let mail = email::Mail::for_build(
                    reporter,
                    &build,
                    &master_url,
                    &state.config.master.title,
                );
                email::send(m, reporter, mail).await
            }
        }
    } else {
        let Some(buildset) = payload::read_buildset(&mut conn, d.subject).await? else {
            return Ok(Attempt::Failed(DeliveryError::permanent(format!(
                "buildset {} does not exist",
                d.subject
            ))));
        };
        drop(conn);
        match &reporter.kind {
            ReporterKind::Http { url, secret: s, .. } => {
                let body = serde_json::to_vec(&payload::buildset_json(
                    event.as_str(),
                    &buildset,
                    &master_url,
                ))?;
                let s = s.as_ref().map(|s| secret(m, s)).transpose();
                match s {
                    Ok(s) => {
                        http::post(client, url, s.as_deref(), event.as_str(), d.id, body).await
                    }
                    Err(e) => Err(e),
                }
            }
            ReporterKind::Email { .. } => {
                let mail = email::Mail::for_buildset(
                    reporter,
                    event,
                    &buildset,
                    &master_url,
                    &state.config.master.title,
                );
                email::send(m, reporter, mail).await
            }
            ReporterKind::CommitStatus { .. } => {
                return Ok(Attempt::Skipped("commit statuses are per build".to_owned()));
            }
        }
    };
    Ok(match outcome {
        Ok(()) => Attempt::Delivered,
        Err(e) => Attempt::Failed(e),
    })
}

/// Reads buildset events after the reporters' mark and queues a delivery for each reporter
/// that wants one, moving the mark in the same transaction (so each event is queued once, by
/// one master).
async fn follow_buildsets(m: &Master) -> anyhow::Result<()> {
    let state = m.state();
    {
        let mut conn = m.db.pool().acquire().await?;
        if db::reporter_mark(&mut conn, EVENTS_MARK).await?.is_none() {
            db::start_reporter_mark(&mut conn, EVENTS_MARK).await?;
        }
    }
    loop {
        let mut tx = m.db.begin().await?;
        let Some(mark) = db::reporter_mark(&mut tx, EVENTS_MARK).await? else {
            return Ok(());
        };
        let events = db::events_after(&mut tx, mark, 200).await?;
        let Some(last) = events.last().map(|e| e.id) else {
            return Ok(());
        };
        let now = now_ms();
        let mut queued = 0;
        for e in &events {
            let event = match e.kind.as_str() {
                "buildset.first_failure" => Event::BuildsetFirstFailure,
                "buildset.complete" => Event::BuildsetComplete,
                _ => continue,
            };
            let failing = e.payload["results"]
                .as_i64()
                .and_then(kiln_db::model::results_from_code)
                .or_else(|| serde_json::from_value(e.payload["results"].clone()).ok())
                .is_some_and(is_failing);
            let builders = db::buildset_builders(&mut tx, e.subject).await?;
            for r in &state.config.reporters {
                if wants_buildset(
                    r,
                    event,
                    &builders,
                    failing || event == Event::BuildsetFirstFailure,
                ) {
                    db::queue_delivery(&mut tx, &r.name, event.as_str(), e.subject, now).await?;
                    queued += 1;
                }
            }
        }
        if !db::advance_reporter_mark(&mut tx, EVENTS_MARK, mark, last).await? {
            // Another master read these events first.
            return Ok(());
        }
        tx.commit().await?;
        if queued > 0 {
            tracing::debug!(queued, "reporters: buildset deliveries queued");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(30), MAX_RETRY);
        assert_eq!(backoff(i64::MAX), MAX_RETRY);
    }

    #[test]
    fn events_round_trip() {
        for e in [
            Event::BuildStarted,
            Event::BuildFinished,
            Event::BuildsetFirstFailure,
            Event::BuildsetComplete,
        ] {
            assert_eq!(Event::parse(e.as_str()), Some(e));
        }
        assert_eq!(Event::parse("build.exploded"), None);
    }
}
