//! `GET /api/v2/changesources`: the change sources of the configuration in force, and for git
//! pollers how their polls went (last poll, last error, failures in a row, the heads
//! recorded); `POST /api/v2/changesources/{name}/poll` asks a git poller to poll now, as
//! Buildbot's "force poll" does.

use std::sync::Arc;

use axum::extract::{Extension, Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::auth::{Caller, Role};
use crate::{ApiError, ApiResult};
use kiln_config::{ChangeSource, ChangeSourceKind, Forge};
use kiln_db as db;
use master::server::Master;

/// The routes of this module.
pub fn routes() -> Router<Arc<Master>> {
    Router::new()
        .route("/api/v2/changesources", get(list))
        .route("/api/v2/changesources/{name}", get(one))
        .route("/api/v2/changesources/{name}/poll", post(poll))
}

/// The `type` a source has in `kiln.toml`.
fn type_name(kind: &ChangeSourceKind) -> &'static str {
    match kind {
        ChangeSourceKind::GitPoller { .. } => "git-poller",
        ChangeSourceKind::Webhook { forge, .. } => match forge {
            Forge::GitHub => "github",
            Forge::GitLab => "gitlab",
            Forge::Gitea => "gitea",
            Forge::Generic => "generic",
        },
    }
}

/// One source as the API shows it (never its secret).
async fn describe(m: &Master, c: &ChangeSource) -> Result<Value, ApiError> {
    let mut v = json!({
        "name": c.name,
        "type": type_name(&c.kind),
        "project": c.project,
        "category": c.category,
    });
    if let ChangeSourceKind::GitPoller {
        repourl,
        branches,
        interval,
    } = &c.kind
    {
        let mut conn = m.db.pool().acquire().await?;
        let state = db::poller_state(&mut conn, &c.name).await?;
        let status = m.pollers.status(&c.name).unwrap_or_default();
        v["repourl"] = json!(master::poller::redact(repourl));
        v["branches"] = json!(branches.as_ref().map(|b| b.patterns()));
        v["interval"] = json!(interval.as_secs_f64());
        v["last_poll_at"] = json!(status.last_poll_at);
        v["last_success_at"] = json!(status.last_success_at);
        v["last_error"] = json!(status.last_error);
        v["last_error_at"] = json!(status.last_error_at);
        v["failures"] = json!(status.failures);
        v["next_poll_at"] = json!(status.next_poll_at);
        v["changes"] = json!(status.changes);
        // The heads recorded for this repository (none yet, or another repository's).
        v["heads"] = json!(
            state
                .filter(|s| &s.repourl == repourl)
                .map(|s| s.heads)
                .unwrap_or_default()
        );
    }
    Ok(v)
}

async fn list(State(m): State<Arc<Master>>) -> ApiResult {
    let state = m.state();
    let mut sources = Vec::with_capacity(state.config.change_sources.len());
    for c in &state.config.change_sources {
        sources.push(describe(&m, c).await?);
    }
    let total = sources.len();
    Ok(Json(
        json!({"changesources": sources, "meta": {"total": total}}),
    ))
}

fn not_found(m: &Master, name: &str) -> ApiError {
    let names: Vec<String> = m
        .state()
        .config
        .change_sources
        .iter()
        .map(|c| c.name.clone())
        .collect();
    ApiError::NotFound(format!(
        "there is no change source {name:?} (defined: {})",
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    ))
}

async fn one(State(m): State<Arc<Master>>, Path(name): Path<String>) -> ApiResult {
    let state = m.state();
    let c = state
        .config
        .change_source(&name)
        .ok_or_else(|| not_found(&m, &name))?;
    let source = describe(&m, c).await?;
    Ok(Json(json!({"changesources": [source]})))
}

/// Asks a git poller to poll now; the answer comes before the poll ends (watch
/// `GET /api/v2/changesources/{name}` for its `last_poll_at`).
async fn poll(
    State(m): State<Arc<Master>>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult {
    c.require(Role::Force, "polling a change source")?;
    let state = m.state();
    let source = state
        .config
        .change_source(&name)
        .ok_or_else(|| not_found(&m, &name))?;
    if !matches!(source.kind, ChangeSourceKind::GitPoller { .. }) {
        return Err(ApiError::BadRequest(format!(
            "change source {name:?} is a {} webhook; only git pollers poll",
            type_name(&source.kind)
        )));
    }
    if !m.pollers.poll_now(&name) {
        return Err(ApiError::Conflict(format!(
            "the git poller {name:?} is not running yet; try again in a moment"
        )));
    }
    tracing::info!(source = %name, by = %c.label(), "poll requested");
    Ok(Json(json!({"name": name, "polling": true})))
}
