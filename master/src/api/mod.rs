//! The master's HTTP API, modeled on Buildbot's `/api/v2`: for now the parts the master's
//! brain needs from outside (its masters and queue, forcing a build, recording a change,
//! reloading the configuration). Every endpoint answers JSON; errors are one type that picks
//! the status code and never shows internals.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::db;
use crate::model::{BuildId, NewChange, now_ms};
use crate::schedulers::{self, ForceRequest, RequestError};
use crate::server::Master;

/// Largest request body accepted.
const MAX_BODY: usize = 4 << 20;

/// An API error: a status and a message a person can act on.
#[derive(Debug)]
pub enum ApiError {
    /// The request is wrong; the message says how.
    BadRequest(String),
    /// No such thing.
    NotFound(String),
    /// Something failed inside the master; logged, not shown.
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(e)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "API request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "an internal error occurred; the master's log has the details".to_string(),
                )
            }
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// The API's routes.
pub fn router(master: Arc<Master>) -> Router {
    Router::new()
        .route("/api/v2/masters", get(masters))
        .route("/api/v2/buildrequests", get(queue))
        .route("/api/v2/changes", post(add_change))
        .route("/api/v2/forceschedulers/{name}", post(force))
        .route("/api/v2/control/reconfig", post(reconfig))
        .route("/api/v2/workers", get(workers))
        .route("/metrics", get(metrics))
        .route("/api/v2/builds", get(builds))
        .route("/api/v2/builds/{id}", get(build))
        .route("/api/v2/builds/{id}/stop", post(stop_build))
        .route("/api/v2/builds/{id}/steps/{number}/stop", post(stop_step))
        .route("/api/v2/logs/{id}/raw", get(log_raw))
        .route(
            runtime::protocol::CONNECT_PATH,
            get(crate::workers::connect),
        )
        .route(crate::filecache::ROUTE, get(crate::filecache::serve))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(master)
}

async fn masters(State(m): State<Arc<Master>>) -> ApiResult {
    let mut conn = m.db.pool().acquire().await?;
    let masters: Vec<Value> = db::masters(&mut conn)
        .await?
        .into_iter()
        .map(|(id, name, active, last_active)| {
            json!({"masterid": id, "name": name, "active": active, "last_active": last_active})
        })
        .collect();
    Ok(Json(
        json!({"masters": masters, "meta": {"total": masters.len()}}),
    ))
}

async fn queue(State(m): State<Arc<Master>>) -> ApiResult {
    let mut conn = m.db.pool().acquire().await?;
    let requests = db::queued_requests(&mut conn, None, 1000, 0).await?;
    let total = requests.len();
    Ok(Json(
        json!({"buildrequests": requests, "meta": {"total": total}}),
    ))
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not a valid request: {e}")))
}

async fn add_change(State(m): State<Arc<Master>>, body: axum::body::Bytes) -> ApiResult {
    let mut change: NewChange = parse_body(&body)?;
    if change.source.is_empty() {
        change.source = "api".into();
    }
    match m.add_change(&change).await? {
        Ok(Some(id)) => Ok(Json(json!({"changeid": id}))),
        Ok(None) => Ok(Json(json!({"changeid": null, "duplicate": true}))),
        Err(e) => Err(ApiError::BadRequest(e.to_string())),
    }
}

async fn force(
    State(m): State<Arc<Master>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let request: ForceRequest = parse_body(&body)?;
    let result = m
        .with_env(async |env| schedulers::force(env, &name, &request, now_ms()).await)
        .await?;
    match result {
        Ok(s) => {
            m.wake_dispatch();
            Ok(Json(json!({
                "buildsetid": s.buildset,
                "buildrequests": s.requests.iter().map(|(id, b)| json!({"buildrequestid": id, "builder": b})).collect::<Vec<_>>(),
            })))
        }
        Err(RequestError::NoScheduler(msg)) => Err(ApiError::NotFound(msg)),
        Err(RequestError::Invalid(msg)) => Err(ApiError::BadRequest(msg)),
    }
}

async fn reconfig(State(m): State<Arc<Master>>) -> ApiResult {
    match m.reload().await {
        Ok(diff) => Ok(Json(json!({"reloaded": true, "changes": diff.to_string()}))),
        Err(e) => Err(ApiError::BadRequest(format!(
            "the configuration was not reloaded; the old one stays: {e:#}"
        ))),
    }
}

/// Configured workers with their connection and health.
async fn workers(State(m): State<Arc<Master>>) -> ApiResult {
    let workers = worker_list(&m).await?;
    Ok(Json(
        json!({"workers": workers, "meta": {"total": workers.len()}}),
    ))
}

/// Every configured worker: connection, builds, health, latent state.
async fn worker_list(m: &Master) -> Result<Vec<Value>, ApiError> {
    let connected = crate::workers::describe(m);
    let mut conn = m.db.pool().acquire().await?;
    let health = db::worker_health(&mut conn).await?;
    let latent = m.latent_states();
    let workers: Vec<Value> = m
        .state()
        .config
        .workers
        .iter()
        .map(|w| {
            let live = connected.iter().find(|c| c["name"] == w.name.as_str());
            let h = health.get(&w.name);
            json!({
                "name": w.name,
                "connected": live.is_some(),
                "sandbox": w.sandbox,
                "builds": live.map(|c| c["builds"].clone()).unwrap_or(json!([])),
                "draining": live.map(|c| c["draining"].clone()).unwrap_or(json!(false)),
                "health": h.map(|h| h.health.clone()),
                "failure_count": h.map(|h| h.failure_count),
                "quarantine_until": h.and_then(|h| h.quarantine_until),
                "notes": h.map(|h| h.notes.clone()),
                "paused": h.map(|h| h.paused),
                "latent": w.latent.as_ref().map(|_| {
                    latent
                        .iter()
                        .find(|(n, _)| n == &w.name)
                        .map_or("stopped", |(_, s)| *s)
                }),
            })
        })
        .collect();
    Ok(workers)
}

/// A worker's state for the `kiln_workers` gauge, from its [`worker_list`] entry.
fn worker_state(w: &Value, now: i64) -> &'static str {
    if w["paused"] == true {
        "paused"
    } else if w["quarantine_until"]
        .as_i64()
        .is_some_and(|until| until > now)
    {
        "quarantined"
    } else if w["connected"] != true {
        "offline"
    } else if w["draining"] == true {
        "draining"
    } else if w["builds"].as_array().is_some_and(|b| !b.is_empty()) {
        "busy"
    } else {
        "idle"
    }
}

/// `GET /metrics`: Prometheus (OpenMetrics) text.
async fn metrics(State(m): State<Arc<Master>>) -> Result<Response, ApiError> {
    let now = now_ms();
    let mut conn = m.db.pool().acquire().await?;
    let waiting = db::queue_summary(&mut conn).await?;
    drop(conn);
    let queue: Vec<(String, i64, f64)> = m
        .state()
        .config
        .builders
        .iter()
        .map(|b| {
            let (depth, oldest) = waiting
                .iter()
                .find(|(name, ..)| *name == b.name)
                .map_or((0, 0.0), |(_, n, oldest)| {
                    (*n, (now - oldest).max(0) as f64 / 1000.0)
                });
            (b.name.clone(), depth, oldest)
        })
        .collect();
    let workers = worker_list(&m).await?;
    let states: Vec<&str> = workers.iter().map(|w| worker_state(w, now)).collect();
    let text = m
        .metrics
        .encode(&queue, &states)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("encoding metrics: {e}")))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

fn build_json(b: &db::BuildRow) -> Value {
    json!({
        "buildid": b.id, "builder": b.builder, "number": b.number,
        "buildrequestid": b.request, "worker": b.worker, "started_at": b.started_at,
        "complete_at": b.complete_at, "complete": b.complete_at.is_some(),
        "state_string": b.state, "results": b.results,
    })
}

/// Query of `GET /api/v2/builds`.
#[derive(Debug, serde::Deserialize)]
struct BuildsQuery {
    buildrequestid: Option<i64>,
    limit: Option<i64>,
}

async fn builds(
    State(m): State<Arc<Master>>,
    axum::extract::Query(q): axum::extract::Query<BuildsQuery>,
) -> ApiResult {
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit={limit}: give 1 to 10000"
        )));
    }
    let mut conn = m.db.pool().acquire().await?;
    let rows = db::builds(
        &mut conn,
        q.buildrequestid.map(crate::model::BuildRequestId),
        limit,
    )
    .await?;
    let builds: Vec<Value> = rows.iter().map(build_json).collect();
    Ok(Json(
        json!({"builds": builds, "meta": {"total": builds.len()}}),
    ))
}

/// A build with its steps, their logs, and its properties: one request for a build page.
async fn build(State(m): State<Arc<Master>>, Path(id): Path<i64>) -> ApiResult {
    let mut conn = m.db.pool().acquire().await?;
    let row = db::get_build(&mut conn, BuildId(id))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no build {id}")))?;
    let mut steps = Vec::new();
    for (step_id, number, name, results, state) in db::build_steps(&mut conn, row.id).await? {
        let logs: Vec<Value> = db::step_logs(&mut conn, step_id)
            .await?
            .into_iter()
            .map(|(log_id, name, lines)| json!({"logid": log_id, "name": name, "num_lines": lines}))
            .collect();
        steps.push(json!({
            "stepid": step_id, "number": number, "name": name, "results": results,
            "state_string": state, "logs": logs,
        }));
    }
    let properties: serde_json::Map<String, Value> = db::build_properties(&mut conn, row.id)
        .await?
        .into_iter()
        .map(|p| (p.name, json!([p.value, p.source])))
        .collect();
    let mut b = build_json(&row);
    b["steps"] = Value::Array(steps);
    b["properties"] = Value::Object(properties);
    Ok(Json(b))
}

/// Body of `POST /api/v2/builds/{id}/stop`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StopRequest {
    #[serde(default)]
    reason: Option<String>,
}

/// The reason in a stop request's body (which may be empty).
fn stop_reason(body: &[u8]) -> Result<String, ApiError> {
    let request: StopRequest = if body.is_empty() {
        StopRequest::default()
    } else {
        parse_body(body)?
    };
    Ok(request
        .reason
        .unwrap_or_else(|| "stopped through the API".into()))
}

async fn stop_build(
    State(m): State<Arc<Master>>,
    Path(id): Path<i64>,
    body: axum::body::Bytes,
) -> ApiResult {
    let reason = stop_reason(&body)?;
    if m.stop_build(id, &reason) {
        Ok(Json(json!({"stopping": true})))
    } else {
        Err(ApiError::NotFound(format!(
            "build {id} is not running on a worker of this master"
        )))
    }
}

async fn stop_step(
    State(m): State<Arc<Master>>,
    Path((id, number)): Path<(i64, u32)>,
    body: axum::body::Bytes,
) -> ApiResult {
    let reason = stop_reason(&body)?;
    if m.stop_step(id, number, &reason) {
        Ok(Json(json!({"stopping": true})))
    } else {
        Err(ApiError::NotFound(format!(
            "build {id} is not running on a worker of this master"
        )))
    }
}

/// A log's text: one line per line, without the channel tags.
async fn log_raw(State(m): State<Arc<Master>>, Path(id): Path<i64>) -> Result<String, ApiError> {
    let mut conn = m.db.pool().acquire().await?;
    let lines = db::log_lines(&mut conn, id, 0, i64::MAX).await?;
    let mut out = String::new();
    for line in lines {
        // Stream logs tag each line with its channel (o, e, h).
        out.push_str(line.get(1..).unwrap_or_default());
        out.push('\n');
    }
    Ok(out)
}
