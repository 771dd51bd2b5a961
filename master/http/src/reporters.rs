//! `GET /api/v2/reporters`: the reporters in force with their deliveries counted by state and
//! their latest failures (what went wrong, how many attempts, when the next is due);
//! `GET /api/v2/reporters/{name}/deliveries?state=S&limit=N`: one reporter's deliveries,
//! newest first.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::{ApiError, ApiResult};
use kiln_config::{Forge, Reporter, ReporterKind};
use kiln_db as db;
use master::server::Master;

/// Failures listed with each reporter.
const RECENT_FAILURES: i64 = 10;

/// The states a delivery can be in.
const STATES: &[&str] = &["pending", "delivered", "failed", "skipped", "superseded"];

/// The routes of this module.
pub fn routes() -> Router<Arc<Master>> {
    Router::new()
        .route("/api/v2/reporters", get(list))
        .route("/api/v2/reporters/{name}/deliveries", get(deliveries))
}

/// The `type` a reporter has in `kiln.toml`.
fn type_name(r: &Reporter) -> &'static str {
    match &r.kind {
        ReporterKind::Http { .. } => "http",
        ReporterKind::Email { .. } => "email",
        ReporterKind::CommitStatus { forge, .. } => match forge {
            Forge::GitLab => "gitlab-status",
            Forge::Gitea => "gitea-status",
            Forge::GitHub | Forge::Generic => "github-status",
        },
    }
}

async fn list(State(m): State<Arc<Master>>) -> ApiResult {
    let state = m.state();
    let mut conn = m.db.pool().acquire().await?;
    let mut counts: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    for (reporter, st, n) in db::delivery_counts(&mut conn).await? {
        counts.entry(reporter).or_default().insert(st, json!(n));
    }
    let mut out = Vec::with_capacity(state.config.reporters.len());
    for r in &state.config.reporters {
        let mut c = counts.remove(&r.name).unwrap_or_default();
        for s in STATES {
            c.entry(s.to_string()).or_insert(json!(0));
        }
        let failures =
            db::recent_deliveries(&mut conn, Some(&r.name), Some("failed"), RECENT_FAILURES)
                .await?;
        // Pending deliveries that have failed at least once: being retried.
        let retrying: Vec<db::DeliveryRow> =
            db::recent_deliveries(&mut conn, Some(&r.name), Some("pending"), RECENT_FAILURES)
                .await?
                .into_iter()
                .filter(|d| d.last_error.is_some())
                .collect();
        out.push(json!({
            "name": r.name,
            "type": type_name(r),
            "builders": r.builders,
            "buildsets": r.buildsets,
            "deliveries": c,
            "recent_failures": failures,
            "retrying": retrying,
        }));
    }
    Ok(Json(
        json!({"reporters": out, "meta": {"total": out.len()}}),
    ))
}

async fn deliveries(
    State(m): State<Arc<Master>>,
    Path(name): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> ApiResult {
    if !m.state().config.reporters.iter().any(|r| r.name == name) {
        return Err(ApiError::NotFound(format!("no reporter is named {name:?}")));
    }
    let state = q.get("state").map(String::as_str);
    if let Some(s) = state
        && !STATES.contains(&s)
    {
        return Err(ApiError::BadRequest(format!(
            "state {s:?} is not a delivery state; give one of {}",
            STATES.join(", ")
        )));
    }
    let limit = match q.get("limit") {
        None => 100,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| ApiError::BadRequest(format!("limit {l:?}: give 1 to 1000")))?,
    };
    let mut conn = m.db.pool().acquire().await?;
    let rows = db::recent_deliveries(&mut conn, Some(&name), state, limit).await?;
    Ok(Json(
        json!({"deliveries": rows, "meta": {"total": rows.len()}}),
    ))
}
