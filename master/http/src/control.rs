//! The API's actions. Each checks the caller's role first, validates its body, and answers
//! with what it did; an action that cannot apply (cancelling a request that has started)
//! says why and what to do instead.

use std::sync::Arc;

use axum::extract::{Extension, Path, State};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::auth::{Caller, Role};
use crate::{ApiError, ApiResult, parse_body};
use kiln_db as db;
use kiln_db::model::{BuildId, BuildRequestId, NewChange, Results, now_ms};
use master::requests::Submitted;
use master::schedulers::{self, ForceRequest, RequestError};
use master::server::Master;

/// The routes of this module.
pub fn routes() -> Router<Arc<Master>> {
    Router::new()
        .route("/api/v2/changes", post(add_change))
        .route("/api/v2/forceschedulers/{name}", post(force))
        .route("/api/v2/tryschedulers/{name}", post(try_build))
        .route("/api/v2/control/reconfig", post(reconfig))
        .route("/api/v2/builds/{id}/stop", post(stop_build))
        .route("/api/v2/builds/{id}/steps/{number}/stop", post(stop_step))
        .route("/api/v2/builds/{id}/rebuild", post(rebuild))
        .route("/api/v2/buildrequests/{id}/cancel", post(cancel_request))
        .route("/api/v2/buildrequests/{id}/priority", post(set_priority))
        .route("/api/v2/workers/{name}/pause", post(pause_worker))
        .route("/api/v2/workers/{name}/unpause", post(unpause_worker))
        .route("/api/v2/workers/{name}/stop", post(stop_worker))
}

async fn add_change(
    State(m): State<Arc<Master>>,
    Extension(c): Extension<Caller>,
    body: axum::body::Bytes,
) -> ApiResult {
    c.require(Role::Force, "sending a change")?;
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

/// The answer to a request that made a buildset.
async fn submitted(m: &Master, s: &Submitted) -> Json<Value> {
    m.wake_dispatch();
    master::live::publish_buildsets(m, &[s.buildset.0]).await;
    Json(json!({
        "buildsetid": s.buildset,
        "buildrequests": s.requests.iter().map(|(id, b)| json!({"buildrequestid": id, "builder": b})).collect::<Vec<_>>(),
    }))
}

fn refused(e: RequestError) -> ApiError {
    match e {
        RequestError::NoScheduler(msg) => ApiError::NotFound(msg),
        RequestError::Invalid(msg) => ApiError::BadRequest(msg),
    }
}

async fn force(
    State(m): State<Arc<Master>>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    c.require(Role::Force, "forcing a build")?;
    let mut request: ForceRequest = parse_body(&body)?;
    if request.owner.is_empty()
        && let Some(name) = &c.name
    {
        request.owner = name.clone();
    }
    let result = m
        .with_env(async |env| schedulers::force(env, &name, &request, now_ms()).await)
        .await?;
    Ok(submitted(&m, &result.map_err(refused)?).await)
}

/// A try build (`kiln try`): the patch on its base, through a try scheduler, for the caller
/// (a scheduler's `users` names the tokens it takes).
async fn try_build(
    State(m): State<Arc<Master>>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    c.require(Role::Force, "sending a try build")?;
    let body: kiln_protocol::api::TryBody = parse_body(&body)?;
    let who = c.name.clone().unwrap_or_else(|| "anonymous".into());
    let request = schedulers::try_request(body, &who).map_err(ApiError::BadRequest)?;
    master::schedulers::check_builders(&m.state().config, &name, &request.builders)
        .map_err(ApiError::BadRequest)?;
    let result = m
        .with_env(async |env| schedulers::try_build(env, &name, &request, now_ms()).await)
        .await?;
    Ok(submitted(&m, &result.map_err(refused)?).await)
}

async fn rebuild(
    State(m): State<Arc<Master>>,
    Extension(c): Extension<Caller>,
    Path(id): Path<i64>,
) -> ApiResult {
    c.require(Role::Force, "rebuilding")?;
    let owner = c.name.clone().unwrap_or_else(|| "anonymous".into());
    let result = m
        .with_env(async |env| schedulers::rebuild(env, BuildId(id), &owner, now_ms()).await)
        .await?;
    Ok(submitted(&m, &result.map_err(refused)?).await)
}

async fn reconfig(State(m): State<Arc<Master>>, Extension(c): Extension<Caller>) -> ApiResult {
    c.require(Role::Admin, "reloading the configuration")?;
    match m.reload().await {
        Ok(diff) => Ok(Json(json!({"reloaded": true, "changes": diff.to_string()}))),
        Err(e) => Err(ApiError::BadRequest(format!(
            "the configuration was not reloaded; the old one stays: {e:#}"
        ))),
    }
}

/// Body of the stop actions.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StopRequest {
    #[serde(default)]
    reason: Option<String>,
}

/// The reason in a stop request's body (which may be empty).
fn stop_reason(body: &[u8], c: &Caller) -> Result<String, ApiError> {
    let request: StopRequest = if body.is_empty() {
        StopRequest::default()
    } else {
        parse_body(body)?
    };
    Ok(request
        .reason
        .unwrap_or_else(|| format!("stopped through the API by {}", c.label())))
}

async fn stop_build(
    State(m): State<Arc<Master>>,
    Extension(c): Extension<Caller>,
    Path(id): Path<i64>,
    body: axum::body::Bytes,
) -> ApiResult {
    c.require(Role::Force, "stopping a build")?;
    let reason = stop_reason(&body, &c)?;
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
    Extension(c): Extension<Caller>,
    Path((id, number)): Path<(i64, u32)>,
    body: axum::body::Bytes,
) -> ApiResult {
    c.require(Role::Force, "stopping a step")?;
    let reason = stop_reason(&body, &c)?;
    if m.stop_step(id, number, &reason) {
        Ok(Json(json!({"stopping": true})))
    } else {
        Err(ApiError::NotFound(format!(
            "build {id} is not running on a worker of this master"
        )))
    }
}

/// What stands in the way of changing a request that is not pending.
async fn not_pending(m: &Master, id: BuildRequestId, complete: bool) -> Result<ApiError, ApiError> {
    if complete {
        return Ok(ApiError::Conflict(format!(
            "build request {id} is complete already"
        )));
    }
    let mut conn = m.db.pool().acquire().await?;
    let build = db::builds(&mut conn, Some(id), 1).await?.pop();
    Ok(ApiError::Conflict(match build {
        Some(b) => format!(
            "build request {id} has started as build {}; stop the build instead (POST /api/v2/builds/{}/stop)",
            b.id, b.id
        ),
        None => format!("build request {id} is being started; stop its build instead"),
    }))
}

/// Cancels a pending request: it completes CANCELLED, and its buildset completes if it was
/// the last. A request that has started cannot be cancelled; its build can be stopped.
async fn cancel_request(
    State(m): State<Arc<Master>>,
    Extension(c): Extension<Caller>,
    Path(id): Path<i64>,
) -> ApiResult {
    c.require(Role::Force, "cancelling a build request")?;
    let id = BuildRequestId(id);
    let now = now_ms();
    let mut tx = m.db.begin().await?;
    let Some((_, complete, ..)) = db::get_request(&mut tx, id).await? else {
        return Err(ApiError::NotFound(format!("no build request {id}")));
    };
    // Claiming it is what keeps a dispatcher from starting it meanwhile, on any master.
    if complete || !db::claim_request(&mut tx, id, m.id, now).await? {
        tx.rollback().await?;
        return Err(not_pending(&m, id, complete).await?);
    }
    let completed = master::requests::finish_requests(
        &m.db,
        &mut tx,
        m.id,
        &[(id, Results::Cancelled, None)],
        now,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(request = %id, by = %c.label(), "build request cancelled");
    if !completed.is_empty() {
        m.wake_schedulers();
    }
    publish_request(&m, id).await;
    Ok(Json(json!({"cancelled": true})))
}

/// Sends a request as it is now to live update listeners.
async fn publish_request(m: &Master, id: BuildRequestId) {
    if !m.live.wanted() {
        return;
    }
    if let Ok(mut conn) = m.db.pool().acquire().await
        && let Ok(Some(r)) = db::views::get(&mut conn, &db::views::BUILDREQUESTS, id.0).await
    {
        m.live.send("request", || r);
    }
}

/// Body of `POST /api/v2/buildrequests/{id}/priority`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PriorityRequest {
    priority: i64,
}

async fn set_priority(
    State(m): State<Arc<Master>>,
    Extension(c): Extension<Caller>,
    Path(id): Path<i64>,
    body: axum::body::Bytes,
) -> ApiResult {
    c.require(Role::Force, "setting a build request's priority")?;
    let PriorityRequest { priority } = parse_body(&body)?;
    let id = BuildRequestId(id);
    let mut conn = m.db.pool().acquire().await?;
    let Some((_, complete, ..)) = db::get_request(&mut conn, id).await? else {
        return Err(ApiError::NotFound(format!("no build request {id}")));
    };
    if !db::set_request_priority(&mut conn, id, priority).await? {
        drop(conn);
        return Err(not_pending(&m, id, complete).await?);
    }
    m.wake_dispatch();
    publish_request(&m, id).await;
    Ok(Json(json!({"buildrequestid": id, "priority": priority})))
}

async fn set_paused(m: &Master, c: &Caller, name: &str, paused: bool) -> ApiResult {
    c.require(
        Role::Admin,
        if paused {
            "pausing a worker"
        } else {
            "unpausing a worker"
        },
    )?;
    let mut conn = m.db.pool().acquire().await?;
    if !db::set_worker_paused(&mut conn, name, paused).await? {
        return Err(ApiError::NotFound(format!("no worker {name:?}")));
    }
    drop(conn);
    m.forget_worker_health();
    if !paused {
        m.wake_dispatch();
    }
    tracing::info!(worker = %name, paused, by = %c.label(), "worker pause changed");
    m.live
        .send("worker", || json!({"name": name, "paused": paused}));
    Ok(Json(json!({"name": name, "paused": paused})))
}

async fn pause_worker(
    State(m): State<Arc<Master>>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult {
    set_paused(&m, &c, &name, true).await
}

async fn unpause_worker(
    State(m): State<Arc<Master>>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult {
    set_paused(&m, &c, &name, false).await
}

/// Asks a connected worker to shut down gracefully: it takes no new builds, finishes those
/// it runs, and exits.
async fn stop_worker(
    State(m): State<Arc<Master>>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult {
    c.require(Role::Admin, "stopping a worker")?;
    if !m.shutdown_worker(&name) {
        return Err(ApiError::NotFound(format!(
            "worker {name:?} is not connected to this master"
        )));
    }
    tracing::info!(worker = %name, by = %c.label(), "worker asked to shut down gracefully");
    Ok(Json(json!({"name": name, "stopping": true})))
}
