//! Step modules: upload, list, show, delete.
//!
//! An upload is checked the way a worker would load it: a component of the step, observer or
//! policy world of the contract this master speaks, importing nothing the contract does not
//! provide (an unknown import is refused by name). It is stored under its SHA-1 (refusing
//! SHA-1 collision patterns) with its SHA-256, and builders naming it (`NAME@VERSION` or
//! `NAME@latest`) use it from their next build, without a restart. A version that the
//! configuration in force uses cannot be deleted, so a queued build never loses its module.

use std::sync::Arc;

use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::auth::{Caller, Role};
use crate::read::{Pairs, listing};
use crate::{ApiError, ApiResult, MAX_MODULE};
use kiln_config::{Config, ModuleRef, ModuleSource, ModuleVersion, PolicyRef};
use kiln_db::model::now_ms;
use kiln_db::{self as db, views};
use master::server::Master;

/// The routes of this module.
pub fn routes() -> Router<Arc<Master>> {
    Router::new()
        .route(
            "/api/v2/stepmodules",
            get(list)
                .post(upload)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_MODULE)),
        )
        .route("/api/v2/stepmodules/{name}", get(versions))
        .route(
            "/api/v2/stepmodules/{name}/{version}",
            get(show).delete(delete),
        )
}

/// Where the configuration uses uploaded modules: (module reference, where), for messages
/// and `used_by`.
fn uses(config: &Config) -> Vec<(ModuleRef, String)> {
    let mut out = Vec::new();
    for b in &config.builders {
        for s in &b.steps {
            if let ModuleSource::Uploaded(r) = &s.module {
                out.push((r.clone(), format!("builder {} step {}", b.name, s.name)));
            }
            for o in &s.observers {
                if let ModuleSource::Uploaded(r) = &o.module {
                    out.push((
                        r.clone(),
                        format!("builder {} step {} (observer)", b.name, s.name),
                    ));
                }
            }
        }
    }
    for r in master::server::policy_refs(config) {
        if let PolicyRef::Uploaded { name, version } = r {
            out.push((
                ModuleRef {
                    name,
                    version: version.clone(),
                },
                "a policy hook or change filter".into(),
            ));
        }
    }
    out
}

/// Where the configuration uses this version (`latest` is the newest upload of the name).
fn used_by(uses: &[(ModuleRef, String)], name: &str, version: &str, latest: &str) -> Vec<String> {
    uses.iter()
        .filter(|(r, _)| {
            r.name == name
                && match &r.version {
                    ModuleVersion::Exact(v) => v == version,
                    ModuleVersion::Latest => version == latest,
                }
        })
        .map(|(_, at)| at.clone())
        .collect()
}

/// The newest upload of each name, as `@latest` resolves it.
async fn latest(conn: &mut sqlx::AnyConnection, name: &str) -> Result<String, ApiError> {
    Ok(db::step_modules(conn, Some(name))
        .await?
        .first()
        .map(|m| m.version.clone())
        .unwrap_or_default())
}

/// Adds `used_by`, `in_use` and `latest` to module items: one read of the newest version of
/// each name on the page, however many versions it shows.
async fn with_uses(
    m: &Master,
    conn: &mut sqlx::AnyConnection,
    items: &mut [Value],
) -> Result<(), ApiError> {
    let uses = uses(&m.state().config);
    let mut latest_of: std::collections::BTreeMap<String, String> = Default::default();
    for item in items.iter() {
        let name = item["name"].as_str().unwrap_or_default();
        if !latest_of.contains_key(name) {
            latest_of.insert(name.to_owned(), latest(conn, name).await?);
        }
    }
    for item in items.iter_mut() {
        let name = item["name"].as_str().unwrap_or_default().to_owned();
        let version = item["version"].as_str().unwrap_or_default().to_owned();
        let latest = latest_of.get(&name).map(String::as_str).unwrap_or_default();
        let by = used_by(&uses, &name, &version, latest);
        item["in_use"] = Value::Bool(!by.is_empty());
        item["used_by"] = json!(by);
        item["latest"] = Value::Bool(version == latest);
    }
    Ok(())
}

async fn list(State(m): State<Arc<Master>>, Query(q): Pairs) -> ApiResult {
    let listing = listing(&views::STEPMODULES, &q, 100)?;
    let mut conn = m.db.pool().acquire().await?;
    let (mut items, total) = listing.fetch(&mut conn).await?;
    with_uses(&m, &mut conn, &mut items).await?;
    Ok(Json(
        json!({"stepmodules": items, "meta": {"total": total}}),
    ))
}

async fn versions(State(m): State<Arc<Master>>, Path(name): Path<String>) -> ApiResult {
    let mut conn = m.db.pool().acquire().await?;
    let (mut items, total) = db::Listing::parse(
        &views::STEPMODULES,
        &[
            ("name".into(), name.clone()),
            ("order".into(), "-uploaded_at".into()),
        ],
        views::MAX_LIMIT,
        &[],
    )
    .map_err(ApiError::BadRequest)?
    .fetch(&mut conn)
    .await?;
    if items.is_empty() {
        return Err(ApiError::NotFound(format!(
            "no module {name:?} has been uploaded"
        )));
    }
    with_uses(&m, &mut conn, &mut items).await?;
    Ok(Json(
        json!({"stepmodules": items, "meta": {"total": total}}),
    ))
}

async fn find(
    conn: &mut sqlx::AnyConnection,
    name: &str,
    version: &str,
) -> Result<Value, ApiError> {
    let (mut items, _) = db::Listing::parse(
        &views::STEPMODULES,
        &[
            ("name".into(), name.to_owned()),
            ("version".into(), version.to_owned()),
        ],
        1,
        &[],
    )
    .map_err(ApiError::BadRequest)?
    .fetch(conn)
    .await?;
    items
        .pop()
        .ok_or_else(|| ApiError::NotFound(format!("no module {name}@{version} has been uploaded")))
}

async fn show(
    State(m): State<Arc<Master>>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult {
    let mut conn = m.db.pool().acquire().await?;
    let mut items = vec![find(&mut conn, &name, &version).await?];
    with_uses(&m, &mut conn, &mut items).await?;
    Ok(Json(items.pop().unwrap_or_default()))
}

/// Query of an upload.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    name: String,
    #[serde(default)]
    version: Option<String>,
}

/// `POST /api/v2/stepmodules?name=NAME[&version=V]`, the body being the `.wasm` file. Without
/// a version, the first 12 hex digits of the SHA-256 name it. Uploading the same bytes again
/// under the same name and version is harmless; other bytes under a taken version are refused.
async fn upload(
    State(m): State<Arc<Master>>,
    Extension(c): Extension<Caller>,
    query: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    c.require(Role::Upload, "uploading a step module")?;
    let Query(q) = query.map_err(|e| {
        ApiError::BadRequest(format!(
            "{}; give ?name=NAME and optionally &version=VERSION, with the .wasm file as the body",
            e.body_text()
        ))
    })?;
    if body.is_empty() {
        return Err(ApiError::BadRequest(
            "the body is empty; send the .wasm file as the request body".into(),
        ));
    }
    let digests =
        master::filecache::digests(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let version = q
        .version
        .clone()
        .unwrap_or_else(|| digests.sha256[..12].to_owned());
    let module =
        ModuleRef::parse(&format!("{}@{version}", q.name)).map_err(ApiError::BadRequest)?;
    if module.version == ModuleVersion::Latest {
        return Err(ApiError::BadRequest(
            "\"latest\" is not a version one can upload; it names the newest upload".into(),
        ));
    }
    // Loading compiles the component: CPU work, off the async threads.
    let runtime = m.runtime().clone();
    let label = module.to_string();
    let bytes = body.clone();
    let kind = tokio::task::spawn_blocking(move || runtime.load(&bytes, &label).map(|l| l.kind()))
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("checking a module: {e}")))?
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let now = now_ms();
    let mut tx = m.db.begin().await?;
    let stored = master::filecache::store(&mut tx, &body, now)
        .await?
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let row = db::StepModule {
        name: q.name.clone(),
        version: version.clone(),
        kind: kind.to_owned(),
        sha1: stored.sha1.clone(),
        sha256: stored.sha256.clone(),
        size: stored.size as i64,
        uploaded_ms: now,
    };
    let created = db::insert_step_module(&mut tx, &row).await?;
    if !created {
        let existing = find(&mut tx, &q.name, &version).await?;
        tx.rollback().await?;
        if existing["sha256"] == stored.sha256.as_str() {
            return Ok((StatusCode::OK, Json(with_created(existing, false))).into_response());
        }
        return Err(ApiError::Conflict(format!(
            "{}@{version} exists with other content (SHA-256 {}); upload this one under a new version",
            q.name,
            existing["sha256"].as_str().unwrap_or("?")
        )));
    }
    let item = find(&mut tx, &q.name, &version).await?;
    tx.commit().await?;
    tracing::info!(module = %q.name, %version, kind, sha1 = %stored.sha1, size = stored.size, by = %c.label(), "step module uploaded");
    Ok((StatusCode::CREATED, Json(with_created(item, true))).into_response())
}

fn with_created(mut item: Value, created: bool) -> Value {
    item["created"] = Value::Bool(created);
    item
}

/// Deletes a version that the configuration does not use; its bytes go when no other version
/// shares them.
async fn delete(
    State(m): State<Arc<Master>>,
    Extension(c): Extension<Caller>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult {
    c.require(Role::Admin, "deleting a step module")?;
    let mut tx = m.db.begin().await?;
    find(&mut tx, &name, &version).await?;
    let latest = latest(&mut tx, &name).await?;
    let by = used_by(&uses(&m.state().config), &name, &version, &latest);
    if !by.is_empty() {
        tx.rollback().await?;
        return Err(ApiError::Conflict(format!(
            "{name}@{version} is in use by {}; change the configuration (and reload) first",
            by.join(", ")
        )));
    }
    db::delete_step_module(&mut tx, &name, &version).await?;
    tx.commit().await?;
    tracing::info!(module = %name, %version, by = %c.label(), "step module deleted");
    Ok(Json(
        json!({"deleted": true, "name": name, "version": version}),
    ))
}
