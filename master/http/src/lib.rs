//! The master's HTTP API, modeled on Buildbot's `/api/v2` so its users feel at home. Every
//! answer is JSON (errors too: `{"error": "..."}`, including axum's own rejections), reads are
//! filtered, ordered and paged in SQL (`db::views`), and actions check the caller's role.
//!
//! - `read`: the collections and items (builders, builds, logs, requests, ...).
//! - `control`: actions (force, stop, cancel, rebuild, priority, workers, reconfig).
//! - `modules`: step module upload, listing and deletion.
//! - `events`: the live event stream (Server-Sent Events).
//! - `openapi`: the OpenAPI document of all of the above.
//! - `change_sources`: the change sources and how their polls went.
//! - `reporters`: the reporters and how their deliveries went.

pub mod auth;
pub mod change_hooks;
mod change_sources;
mod control;
mod events;
pub mod filecache;
mod modules;
mod openapi;
mod read;
mod reporters;
pub mod tls;
pub mod ui;
pub mod workers;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::auth::{AuthError, Caller, Role, Tickets};
use anyhow::Context;
use kiln_db as db;
use kiln_db::model::now_ms;
use master::server::Master;

/// Largest request body accepted, but for module uploads.
const MAX_BODY: usize = 4 << 20;

/// Largest step module accepted.
pub const MAX_MODULE: usize = 64 << 20;

/// An API error: a status and a message a person can act on.
#[derive(Debug)]
pub enum ApiError {
    /// The request is wrong; the message says how.
    BadRequest(String),
    /// The request needs credentials it does not carry (or carries bad ones).
    Unauthorized(String),
    /// The caller's role does not allow this.
    Forbidden(String),
    /// No such thing.
    NotFound(String),
    /// The thing is not in a state that allows this (a started request cannot be cancelled).
    Conflict(String),
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

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::CrossSite | AuthError::UnknownHost(_) => ApiError::Forbidden(e.to_string()),
            AuthError::Malformed | AuthError::Unknown | AuthError::BadTicket => {
                ApiError::Unauthorized(e.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "API request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "an internal error occurred; the master's log has the details".to_string(),
                )
            }
        };
        let mut response = (status, Json(json!({ "error": message }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"kiln\""),
            );
        }
        response
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

impl Caller {
    /// Refuses the request unless the caller's role includes `needed`.
    pub fn require(&self, needed: Role, what: &str) -> Result<(), ApiError> {
        if self.may(needed) {
            return Ok(());
        }
        Err(match &self.name {
            None => ApiError::Unauthorized(format!(
                "{what} needs an API token with the {needed} role: send `Authorization: Bearer TOKEN` (make one with `kiln token create NAME --role {needed}`)"
            )),
            Some(name) => ApiError::Forbidden(format!(
                "{what} needs the {needed} role; token {name:?} has the {} role",
                self.role.map_or("none", Role::name)
            )),
        })
    }
}

/// Who is asking: the token's name and role, or the anonymous role. Refuses a bad token, and
/// an anonymous action that a browser says comes from another site.
async fn caller(
    m: &Master,
    tickets: &Tickets,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &header::HeaderMap,
) -> Result<Caller, ApiError> {
    // Most requests carry no ticket: their query is not parsed for one.
    let ticket = (uri.query().is_some_and(|q| q.contains("ticket=")))
        .then(|| axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri).ok())
        .flatten()
        .and_then(|q| q.0.into_iter().find(|(k, _)| k == "ticket"))
        .map(|(_, v)| v);
    if let Some(ticket) = ticket
        && auth::bearer(headers)?.is_none()
    {
        if *method != Method::GET || !auth::ticket_opens(uri.path()) {
            return Err(AuthError::BadTicket.into());
        }
        return Ok(tickets.redeem(&ticket).ok_or(AuthError::BadTicket)?);
    }
    match auth::bearer(headers)? {
        Some(token) => {
            let mut conn = m.db.pool().acquire().await?;
            let (name, role) = db::token_by_hash(&mut conn, &auth::token_hash(token))
                .await?
                .ok_or(AuthError::Unknown)?;
            Ok(Caller {
                name: Some(name),
                // A role name the database holds that this master does not know gives nothing.
                role: Role::parse(&role).ok(),
            })
        }
        None => {
            let state = m.state();
            auth::check_host(headers, &state.config.master.url)?;
            auth::check_same_site(method, headers)?;
            Ok(Caller {
                name: None,
                role: m.state().config.master.anonymous,
            })
        }
    }
}

/// Resolves the caller of every API request (reads need the read role) and makes every
/// error an answer in JSON, whoever produced it.
async fn api_layer(
    State((m, tickets)): State<(Arc<Master>, Arc<Tickets>)>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    if path.starts_with("/api/") || path == "/metrics" {
        match caller(&m, &tickets, &method, request.uri(), request.headers()).await {
            Ok(c) => {
                if matches!(method, Method::GET | Method::HEAD)
                    && let Err(e) = c.require(Role::Read, "reading the API")
                {
                    return e.into_response();
                }
                request.extensions_mut().insert(c);
            }
            Err(e) => return e.into_response(),
        }
    }
    let response = next.run(request).await;
    json_errors(response, &method, &path).await
}

/// Gives error answers that are not JSON (axum's rejections of a bad path or query, a body
/// over the limit, a method a route lacks) the API's JSON shape and a useful message.
async fn json_errors(response: Response, method: &Method, path: &str) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let allow = response
        .headers()
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => format!(
            "{method} is not allowed on {path}{}",
            allow.map_or(String::new(), |a| format!("; use {a}"))
        ),
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "the request body is too large: {path} takes at most {} MiB",
            if path.starts_with("/api/v2/stepmodules") {
                MAX_MODULE
            } else {
                MAX_BODY
            } >> 20
        ),
        StatusCode::NOT_FOUND if text.is_empty() => {
            format!(
                "no such page or API endpoint: {path} (the API is described at /api/v2/openapi.json)"
            )
        }
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_lowercase(),
        _ => text,
    };
    let mut response = (status, Json(json!({ "error": message }))).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            response.headers_mut().insert(name.clone(), value.clone());
        }
    }
    response
}

/// Binds the master's `listen` address and serves the API, the worker endpoint and the file
/// cache there (HTTPS when `[master] tls_cert` is set). Returns the bound address and scheme.
pub async fn serve(
    master: &std::sync::Arc<Master>,
) -> anyhow::Result<(std::net::SocketAddr, &'static str)> {
    let (listen, tls) = {
        let state = master.state();
        (state.config.master.listen, state.config.master.tls.clone())
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} ([master] listen)"))?;
    let addr = listener.local_addr()?;
    master.set_address(addr);
    let app = router(master.clone());
    let tls = match &tls {
        Some(files) => Some(
            crate::tls::server_config(files)
                .map_err(|(setting, e)| anyhow::anyhow!("[master] {setting}: {e}"))?,
        ),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let server = match tls {
        Some(config) => {
            let listener = crate::tls::TlsListener::new(listener, config)?;
            tokio::spawn(async move { axum::serve(listener, app).await })
        }
        None => {
            use axum::serve::ListenerExt;
            // Small messages (a job, an acknowledgement) must not wait for Nagle's algorithm
            // and a delayed ACK: that is 40 ms per round trip.
            let listener = listener.tap_io(|tcp| {
                if let Err(error) = tcp.set_nodelay(true) {
                    tracing::debug!(%error, "cannot set TCP_NODELAY");
                }
            });
            tokio::spawn(async move { axum::serve(listener, app).await })
        }
    };
    tokio::spawn(async move {
        if let Ok(Err(error)) = server.await {
            tracing::error!(%error, "the HTTP server stopped");
        }
    });
    Ok((addr, scheme))
}

/// The API's routes.
pub fn router(master: Arc<Master>) -> Router {
    // Stream tickets are this router's: a ticket is good on the master that issued it.
    let tickets = Arc::new(Tickets::default());
    Router::new()
        .merge(read::routes())
        .merge(control::routes())
        .merge(modules::routes())
        .merge(change_sources::routes())
        .merge(reporters::routes())
        .merge(crate::ui::router())
        .merge(crate::change_hooks::routes())
        .route("/api/v2/events", get(events::stream))
        .route("/api/v2/openapi.json", get(openapi::document))
        .route("/api/v2/auth", get(whoami))
        .route("/api/v2/auth/ticket", axum::routing::post(ticket))
        .route("/metrics", get(metrics))
        .route(kiln_protocol::CONNECT_PATH, get(crate::workers::connect))
        .route(crate::filecache::ROUTE, get(crate::filecache::serve))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::Extension(tickets.clone()))
        .layer(axum::middleware::from_fn_with_state(
            (master.clone(), tickets),
            api_layer,
        ))
        .with_state(master)
}

/// `GET /api/v2/auth`: who the caller is and what they may do.
async fn whoami(axum::Extension(c): axum::Extension<Caller>) -> Json<Value> {
    Json(json!({
        "name": c.name,
        "role": c.role.map_or("none", Role::name),
        "anonymous": c.name.is_none(),
    }))
}

/// `POST /api/v2/auth/ticket`: a short-lived ticket that opens the event stream and raw logs
/// as the caller (for a browser, which cannot send a token with those).
async fn ticket(
    axum::Extension(tickets): axum::Extension<Arc<Tickets>>,
    axum::Extension(c): axum::Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    c.require(Role::Read, "asking for a stream ticket")?;
    let ticket = tickets.issue(&c);
    Ok(Json(json!({
        "ticket": ticket,
        "expires_in": auth::TICKET_LIFETIME.as_secs(),
    })))
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not a valid request: {e}")))
}

/// Every configured worker: connection, builds, health, latent state.
pub(crate) async fn worker_list(m: &Master) -> Result<Vec<Value>, ApiError> {
    let connected = master::workers::describe(m);
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
                "info": live.map(|c| json!({
                    "arch": c["arch"], "os": c["os"], "tags": c["tags"], "max_builds": c["max_builds"],
                })),
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
    let now = now_ms();
    let mut workers = workers;
    for w in &mut workers {
        w["state"] = worker_state(w, now).into();
    }
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
