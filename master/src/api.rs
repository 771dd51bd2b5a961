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
use crate::model::{NewChange, now_ms};
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
    let requests = db::queued_requests(&mut conn, None, 1000).await?;
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
        Ok(s) => Ok(Json(json!({
            "buildsetid": s.buildset,
            "buildrequests": s.requests.iter().map(|(id, b)| json!({"buildrequestid": id, "builder": b})).collect::<Vec<_>>(),
        }))),
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
