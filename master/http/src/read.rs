//! The API's collections and items. A collection answers `{"<name>": [...], "meta":
//! {"total": N}}` and takes the query dialect of [`db::views`]; an item is one object. A page
//! of the web UI needs one of these requests: a builder list carries each builder's last
//! build, a build carries its steps, logs, properties, buildset and changes.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use sqlx::AnyConnection;

use crate::{ApiError, ApiResult, worker_list};
use kiln_config::{self as config, SchedulerKind};
use kiln_db::model::now_ms;
use kiln_db::{self as db, Listing, View, views};
use master::server::Master;

/// The routes of this module.
pub fn routes() -> Router<Arc<Master>> {
    Router::new()
        .route("/api/v2/masters", get(masters))
        .route("/api/v2/builders", get(builders))
        .route("/api/v2/builders/{builder}", get(builder))
        .route("/api/v2/builders/{builder}/builds", get(builder_builds))
        .route("/api/v2/builds", get(builds))
        .route("/api/v2/builds/{id}", get(build))
        .route("/api/v2/logs/{id}", get(log))
        .route("/api/v2/logs/{id}/contents", get(log_contents))
        .route("/api/v2/logs/{id}/raw", get(log_raw))
        .route("/api/v2/buildrequests", get(buildrequests))
        .route("/api/v2/buildrequests/{id}", get(buildrequest))
        .route("/api/v2/buildsets", get(buildsets))
        .route("/api/v2/buildsets/{id}", get(buildset))
        .route("/api/v2/changes", get(changes))
        .route("/api/v2/changes/{id}", get(change))
        .route("/api/v2/sourcestamps", get(sourcestamps))
        .route("/api/v2/sourcestamps/{id}", get(sourcestamp))
        .route("/api/v2/schedulers", get(schedulers))
        .route("/api/v2/forceschedulers", get(forceschedulers))
        .route("/api/v2/forceschedulers/{name}", get(forcescheduler))
        .route("/api/v2/workers", get(workers))
        .route("/api/v2/workers/{name}", get(worker))
}

/// Query pairs, in order (a field may repeat).
pub(super) type Pairs = Query<Vec<(String, String)>>;

/// Parses a listing; a bad query is a 400 that says what to give.
pub(super) fn listing(
    view: &'static View,
    pairs: &[(String, String)],
    default_limit: i64,
) -> Result<Listing, ApiError> {
    Listing::parse(view, pairs, default_limit, &[]).map_err(ApiError::BadRequest)
}

fn answer(view: &View, items: Vec<Value>, total: i64) -> Json<Value> {
    Json(json!({ view.name: items, "meta": {"total": total} }))
}

/// A whole collection handler: parse, fetch, answer.
async fn collection(m: &Master, view: &'static View, pairs: &[(String, String)]) -> ApiResult {
    let listing = listing(view, pairs, 100)?;
    let mut conn = m.db.pool().acquire().await?;
    let (items, total) = listing.fetch(&mut conn).await?;
    Ok(answer(view, items, total))
}

/// One item by key, or a 404 naming it.
pub(super) async fn item(conn: &mut AnyConnection, view: &'static View, id: i64) -> ApiResult {
    views::get(conn, view, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no {} {id}", view.name.trim_end_matches('s'))))
}

/// Items whose `field` is one of `ids`, in one query.
async fn by_ids(
    conn: &mut AnyConnection,
    view: &'static View,
    field: &str,
    ids: &[i64],
) -> Result<Vec<Value>, ApiError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let pairs: Vec<(String, String)> = ids
        .iter()
        .map(|i| (field.to_owned(), i.to_string()))
        .collect();
    let listing =
        Listing::parse(view, &pairs, views::MAX_LIMIT, &[]).map_err(ApiError::BadRequest)?;
    Ok(listing.fetch(conn).await?.0)
}

async fn masters(State(m): State<Arc<Master>>, Query(q): Pairs) -> ApiResult {
    collection(&m, &views::MASTERS, &q).await
}

/// Replaces each builder's `last_buildid` with its `last_build`.
async fn with_last_builds(conn: &mut AnyConnection, items: &mut [Value]) -> Result<(), ApiError> {
    let ids: Vec<i64> = items
        .iter()
        .filter_map(|b| b["last_buildid"].as_i64())
        .collect();
    let last = by_ids(conn, &views::BUILDS, "buildid", &ids).await?;
    for b in items.iter_mut() {
        let found = b["last_buildid"]
            .as_i64()
            .and_then(|id| last.iter().find(|l| l["buildid"] == id))
            .cloned();
        if let Some(o) = b.as_object_mut() {
            o.remove("last_buildid");
            o.insert("last_build".into(), found.unwrap_or(Value::Null));
        }
    }
    Ok(())
}

async fn builders(State(m): State<Arc<Master>>, Query(q): Pairs) -> ApiResult {
    let listing = listing(&views::BUILDERS, &q, 1000)?;
    let mut conn = m.db.pool().acquire().await?;
    let (mut items, total) = listing.fetch(&mut conn).await?;
    with_last_builds(&mut conn, &mut items).await?;
    with_steps(&m, &mut items);
    Ok(answer(&views::BUILDERS, items, total))
}

/// Adds each builder's step names, from the configuration in force (what a progress display
/// counts against).
fn with_steps(m: &Master, items: &mut [Value]) {
    let state = m.state();
    for item in items.iter_mut() {
        let steps: Vec<&str> = state
            .config
            .builders
            .iter()
            .find(|b| item["name"] == b.name.as_str())
            .map(|b| b.steps.iter().map(|s| s.name.as_str()).collect())
            .unwrap_or_default();
        item["steps"] = json!(steps);
    }
}

/// A builder by id or name.
async fn builder_id(conn: &mut AnyConnection, builder: &str) -> Result<Value, ApiError> {
    let field = if builder.parse::<i64>().is_ok() {
        "builderid"
    } else {
        "name"
    };
    let listing = Listing::parse(
        &views::BUILDERS,
        &[(field.to_owned(), builder.to_owned())],
        1,
        &[],
    )
    .map_err(ApiError::BadRequest)?;
    let (mut items, _) = listing.fetch(conn).await?;
    with_last_builds(conn, &mut items).await?;
    items
        .pop()
        .ok_or_else(|| ApiError::NotFound(format!("no builder {builder:?}")))
}

async fn builder(State(m): State<Arc<Master>>, Path(builder): Path<String>) -> ApiResult {
    let mut conn = m.db.pool().acquire().await?;
    let mut items = vec![builder_id(&mut conn, &builder).await?];
    with_steps(&m, &mut items);
    Ok(Json(items.pop().unwrap_or_default()))
}

async fn builder_builds(
    State(m): State<Arc<Master>>,
    Path(builder): Path<String>,
    Query(q): Pairs,
) -> ApiResult {
    let mut conn = m.db.pool().acquire().await?;
    let b = builder_id(&mut conn, &builder).await?;
    let id = b["builderid"].as_i64().unwrap_or_default();
    let listing = listing(&views::BUILDS, &q, 100)?.with("builderid", id);
    let (items, total) = listing.fetch(&mut conn).await?;
    Ok(answer(&views::BUILDS, items, total))
}

async fn builds(State(m): State<Arc<Master>>, Query(q): Pairs) -> ApiResult {
    collection(&m, &views::BUILDS, &q).await
}

/// A build with its steps, their logs, its properties, buildset and changes: one request for
/// a build page.
async fn build(State(m): State<Arc<Master>>, Path(id): Path<i64>) -> ApiResult {
    let mut conn = m.db.pool().acquire().await?;
    let Json(mut b) = item(&mut conn, &views::BUILDS, id).await?;
    let (mut steps, _) = Listing::parse(&views::STEPS, &[], views::MAX_LIMIT, &[])
        .map_err(ApiError::BadRequest)?
        .with("buildid", id)
        .fetch(&mut conn)
        .await?;
    let (logs, _) = Listing::parse(&views::LOGS, &[], views::MAX_LIMIT, &[])
        .map_err(ApiError::BadRequest)?
        .with("buildid", id)
        .fetch(&mut conn)
        .await?;
    for step in &mut steps {
        views::cpu_in_seconds(step);
        let own: Vec<Value> = logs
            .iter()
            .filter(|l| l["stepid"] == step["stepid"])
            .cloned()
            .collect();
        step["logs"] = Value::Array(own);
    }
    let properties: serde_json::Map<String, Value> =
        db::build_properties(&mut conn, kiln_db::model::BuildId(id))
            .await?
            .into_iter()
            .map(|p| (p.name, json!([p.value, p.source])))
            .collect();
    let request = b["buildrequestid"].as_i64().unwrap_or_default();
    let buildset = match views::get(&mut conn, &views::BUILDREQUESTS, request).await? {
        Some(r) => {
            views::get(
                &mut conn,
                &views::BUILDSETS,
                r["buildsetid"].as_i64().unwrap_or_default(),
            )
            .await?
        }
        None => None,
    };
    let changes = match buildset.as_ref().and_then(|bs| bs["buildsetid"].as_i64()) {
        Some(bs) => {
            let ids = db::buildset_change_ids(&mut conn, bs).await?;
            let changes = by_ids(&mut conn, &views::CHANGES, "changeid", &ids).await?;
            with_files(&mut conn, changes).await?
        }
        None => Vec::new(),
    };
    b["estimated_finish_at"] = Value::Null;
    if b["complete"] == false
        && let Some(builder) = b["builderid"].as_i64()
    {
        let expected = db::expected_steps(&mut conn, builder).await?;
        let timings: Vec<db::StepTiming> = steps.iter().map(|s| timing(id, s)).collect();
        let now = now_ms();
        if let Some(left) = remaining_ms(&expected, &timings, now) {
            b["estimated_finish_at"] = (now + left).into();
        }
    }
    b["steps"] = Value::Array(steps);
    b["properties"] = Value::Object(properties);
    b["buildset"] = buildset.unwrap_or(Value::Null);
    b["changes"] = Value::Array(changes);
    Ok(Json(b))
}

/// A step of the build page as [`remaining_ms`] reads it.
fn timing(build: i64, step: &Value) -> db::StepTiming {
    db::StepTiming {
        build,
        number: step["number"].as_i64().unwrap_or_default(),
        name: step["name"].as_str().unwrap_or_default().to_owned(),
        started_at: step["started_at"].as_i64(),
        complete_at: step["complete_at"].as_i64(),
        progress: serde_json::from_value(step["progress"].clone()).unwrap_or_default(),
    }
}

async fn log(State(m): State<Arc<Master>>, Path(id): Path<i64>) -> ApiResult {
    let mut conn = m.db.pool().acquire().await?;
    item(&mut conn, &views::LOGS, id).await
}

/// Query of `GET /api/v2/logs/{id}/contents`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ContentsQuery {
    offset: Option<i64>,
    limit: Option<i64>,
}

/// The most lines one request returns.
const MAX_LINES: i64 = 10_000;

/// Lines of a log: `[[channel, text], ...]` from line `offset` (0-based), at most `limit`.
async fn log_contents(
    State(m): State<Arc<Master>>,
    Path(id): Path<i64>,
    query: Result<Query<ContentsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = query.map_err(|e| {
        ApiError::BadRequest(format!(
            "{}; the parameters are offset (first line, from 0) and limit (1 to {MAX_LINES})",
            e.body_text()
        ))
    })?;
    let offset = q.offset.unwrap_or(0);
    let limit = q.limit.unwrap_or(1000);
    if offset < 0 || !(1..=MAX_LINES).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "offset={offset}, limit={limit}: give an offset from 0 and a limit of 1 to {MAX_LINES}"
        )));
    }
    let mut conn = m.db.pool().acquire().await?;
    let Json(log) = item(&mut conn, &views::LOGS, id).await?;
    let lines = db::log_lines(&mut conn, id, offset, offset.saturating_add(limit - 1)).await?;
    let stream = log["type"] == "s";
    let lines: Vec<Value> = lines
        .iter()
        .map(|l| views::split_channel(l, stream))
        .collect();
    Ok(Json(json!({
        "logid": id,
        "offset": offset,
        "lines": lines,
        "num_lines": log["num_lines"],
        "complete": log["complete"],
    })))
}

/// Lines read from the database per piece of a raw download.
const RAW_PAGE: i64 = 5_000;

/// A log's text: one line per line, without the channel tags. Streamed a page of lines at a
/// time, so a log of any length costs the master one page of memory.
async fn log_raw(State(m): State<Arc<Master>>, Path(id): Path<i64>) -> Result<Response, ApiError> {
    let mut conn = m.db.pool().acquire().await?;
    let Json(log) = item(&mut conn, &views::LOGS, id).await?;
    drop(conn);
    let tagged = log["type"] == "s";
    let pool = m.db.pool().clone();
    let pages = futures_util::stream::unfold(Some(0i64), move |next| {
        let pool = pool.clone();
        async move {
            let first = next?;
            let page = async {
                let mut conn = pool.acquire().await?;
                db::log_lines(&mut conn, id, first, first + RAW_PAGE - 1).await
            };
            match page.await {
                Ok(lines) if lines.is_empty() => None,
                Ok(lines) => {
                    let more = (lines.len() as i64 == RAW_PAGE).then_some(first + RAW_PAGE);
                    let mut out = String::new();
                    for line in &lines {
                        out.push_str(if tagged {
                            line.get(1..).unwrap_or_default()
                        } else {
                            line
                        });
                        out.push('\n');
                    }
                    Some((Ok::<_, sqlx::Error>(out), more))
                }
                // The download ends short and the client sees the connection fail, rather
                // than a log that looks complete.
                Err(e) => {
                    tracing::error!(log = id, error = %e, "reading a log for a raw download");
                    Some((Err(e), None))
                }
            }
        }
    });
    let file = format!(
        "attachment; filename=\"build{}-step{}-{}.txt\"",
        log["buildid"],
        log["step_number"],
        log["slug"].as_str().unwrap_or("log")
    );
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_owned(),
            ),
            (axum::http::header::CONTENT_DISPOSITION, file),
        ],
        axum::body::Body::from_stream(pages),
    )
        .into_response())
}

async fn buildrequests(State(m): State<Arc<Master>>, Query(q): Pairs) -> ApiResult {
    let listing = listing(&views::BUILDREQUESTS, &q, 100)?;
    let mut conn = m.db.pool().acquire().await?;
    let (mut items, total) = listing.fetch(&mut conn).await?;
    estimate(&m, &mut conn, &mut items).await?;
    Ok(answer(&views::BUILDREQUESTS, items, total))
}

async fn buildrequest(State(m): State<Arc<Master>>, Path(id): Path<i64>) -> ApiResult {
    let mut conn = m.db.pool().acquire().await?;
    let Json(r) = item(&mut conn, &views::BUILDREQUESTS, id).await?;
    let mut items = vec![r];
    estimate(&m, &mut conn, &mut items).await?;
    Ok(Json(items.pop().unwrap_or_default()))
}

/// How many builds of a builder can run at once: its connected, undrained workers that it
/// accepts (selection and trust), each for up to its `max_builds`; at least one, so a builder
/// whose workers are away still gets an estimate for when one returns.
fn slots(m: &Master, builder: &str) -> usize {
    let state = m.state();
    let Some(b) = state.config.builders.iter().find(|b| b.name == builder) else {
        return 1;
    };
    master::workers::describe(m)
        .iter()
        .filter(|w| w["draining"] != true)
        .filter_map(|w| {
            let name = w["name"].as_str()?;
            let worker = state.config.workers.iter().find(|c| c.name == name)?;
            b.accepts(worker)
                .then(|| w["max_builds"].as_u64().unwrap_or(1).max(1) as usize)
        })
        .sum::<usize>()
        .max(1)
}

/// How much longer (ms) a running build will take, Buildbot's way: each step it has yet to
/// finish is expected to take as long as the same step of the builder's last good build
/// (`expected`); the step running now has done the share of that its progress metrics have
/// reached of that step's final ones (their mean, capped at all), else the share of time it
/// has run. `None` when there is nothing to go by.
pub(crate) fn remaining_ms(
    expected: &[db::StepTiming],
    running: &[db::StepTiming],
    now: i64,
) -> Option<i64> {
    if expected.is_empty() {
        return None;
    }
    let mut left = 0;
    for e in expected {
        let (Some(start), Some(end)) = (e.started_at, e.complete_at) else {
            continue;
        };
        let took = (end - start).max(0);
        let actual = running
            .iter()
            .find(|r| r.number == e.number && r.name == e.name)
            .or_else(|| running.iter().find(|r| r.name == e.name));
        left += match actual {
            None => took,
            Some(r) if r.complete_at.is_some() => 0,
            Some(r) => {
                let shares: Vec<f64> = e
                    .progress
                    .iter()
                    .filter(|&(_, &whole)| whole > 0)
                    .filter_map(|(metric, &whole)| {
                        r.progress.get(metric).map(|&v| v as f64 / whole as f64)
                    })
                    .collect();
                if shares.is_empty() {
                    let ran = now - r.started_at.unwrap_or(now);
                    (took - ran).max(0)
                } else {
                    let done = (shares.iter().sum::<f64>() / shares.len() as f64).clamp(0.0, 1.0);
                    (took as f64 * (1.0 - done)).round() as i64
                }
            }
        };
    }
    Some(left)
}

/// Fills `estimated_start_at` and `estimated_finish_at` of pending requests: each builder's
/// queue is played forward in start order over its slots. A running build frees its slot
/// when [`remaining_ms`] says (from its steps' progress against the builder's last good
/// build), else when a build as long as the builder's recent ones would; a queued build
/// takes as long as the builder's recent builds did.
async fn estimate(
    m: &Master,
    conn: &mut AnyConnection,
    items: &mut [Value],
) -> Result<(), ApiError> {
    for r in items.iter_mut() {
        r["estimated_start_at"] = Value::Null;
        r["estimated_finish_at"] = Value::Null;
    }
    let builders: Vec<(i64, String)> = {
        let mut b: Vec<(i64, String)> = items
            .iter()
            .filter(|r| r["complete"] == false && r["claimed"] == false)
            .filter_map(|r| Some((r["builderid"].as_i64()?, r["builder"].as_str()?.to_owned())))
            .collect();
        b.sort();
        b.dedup();
        b
    };
    if builders.is_empty() {
        return Ok(());
    }
    let at: std::collections::HashMap<i64, usize> = items
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((r["buildrequestid"].as_i64()?, i)))
        .collect();
    let now = now_ms();
    for (builder_id, builder) in builders {
        let queue = db::pending_in_start_order(conn, builder_id).await?;
        let builds = db::running_builds_of(conn, builder_id).await?;
        let expected = db::expected_steps(conn, builder_id).await?;
        let running = if builds.is_empty() {
            Vec::new()
        } else {
            db::running_steps(conn, builder_id).await?
        };
        let mean = db::typical_duration(conn, builder_id, 10).await?;
        let took = mean.or_else(|| {
            let first = expected.iter().filter_map(|s| s.started_at).min()?;
            let last = expected.iter().filter_map(|s| s.complete_at).max()?;
            Some((last - first).max(0))
        });
        let Some(took) = took else {
            continue;
        };
        let mut free: Vec<i64> = builds
            .iter()
            .map(|&(id, started)| {
                let steps: Vec<db::StepTiming> =
                    running.iter().filter(|s| s.build == id).cloned().collect();
                match remaining_ms(&expected, &steps, now) {
                    Some(left) => now + left,
                    None => (started + mean.unwrap_or(0)).max(now),
                }
            })
            .collect();
        free.resize(free.len().max(slots(m, &builder)), now);
        for id in &queue {
            let (slot, start) = free
                .iter()
                .copied()
                .enumerate()
                .min_by_key(|(_, t)| *t)
                .unwrap_or((0, now));
            let finish = start + took;
            free[slot] = finish;
            if let Some(item) = at.get(id).map(|&i| &mut items[i]) {
                item["estimated_start_at"] = start.into();
                item["estimated_finish_at"] = finish.into();
            }
        }
    }
    Ok(())
}

async fn buildsets(State(m): State<Arc<Master>>, Query(q): Pairs) -> ApiResult {
    collection(&m, &views::BUILDSETS, &q).await
}

/// A buildset with its source stamps, properties and requests.
async fn buildset(State(m): State<Arc<Master>>, Path(id): Path<i64>) -> ApiResult {
    let mut conn = m.db.pool().acquire().await?;
    let Json(mut bs) = item(&mut conn, &views::BUILDSETS, id).await?;
    let ss = db::buildset_sourcestamp_ids(&mut conn, id).await?;
    bs["sourcestamps"] = Value::Array(by_ids(&mut conn, &views::SOURCESTAMPS, "ssid", &ss).await?);
    let props: serde_json::Map<String, Value> =
        db::buildset_properties(&mut conn, kiln_db::model::BuildsetId(id))
            .await?
            .into_iter()
            .map(|p| (p.name, json!([p.value, p.source])))
            .collect();
    bs["properties"] = Value::Object(props);
    let (requests, _) = Listing::parse(&views::BUILDREQUESTS, &[], views::MAX_LIMIT, &[])
        .map_err(ApiError::BadRequest)?
        .with("buildsetid", id)
        .fetch(&mut conn)
        .await?;
    bs["buildrequests"] = Value::Array(requests);
    Ok(Json(bs))
}

/// Adds each change's `files`.
async fn with_files(
    conn: &mut AnyConnection,
    mut changes: Vec<Value>,
) -> Result<Vec<Value>, ApiError> {
    let ids: Vec<i64> = changes
        .iter()
        .filter_map(|c| c["changeid"].as_i64())
        .collect();
    let files = db::change_files(conn, &ids).await?;
    for c in &mut changes {
        let id = c["changeid"].as_i64();
        c["files"] = files
            .iter()
            .filter(|(change, _)| Some(*change) == id)
            .map(|(_, f)| Value::from(f.as_str()))
            .collect();
    }
    Ok(changes)
}

async fn changes(State(m): State<Arc<Master>>, Query(q): Pairs) -> ApiResult {
    let listing = listing(&views::CHANGES, &q, 100)?;
    let mut conn = m.db.pool().acquire().await?;
    let (items, total) = listing.fetch(&mut conn).await?;
    let items = with_files(&mut conn, items).await?;
    Ok(answer(&views::CHANGES, items, total))
}

async fn change(State(m): State<Arc<Master>>, Path(id): Path<i64>) -> ApiResult {
    let mut conn = m.db.pool().acquire().await?;
    let Json(c) = item(&mut conn, &views::CHANGES, id).await?;
    Ok(Json(
        with_files(&mut conn, vec![c])
            .await?
            .pop()
            .unwrap_or_default(),
    ))
}

async fn sourcestamps(State(m): State<Arc<Master>>, Query(q): Pairs) -> ApiResult {
    collection(&m, &views::SOURCESTAMPS, &q).await
}

async fn sourcestamp(State(m): State<Arc<Master>>, Path(id): Path<i64>) -> ApiResult {
    let mut conn = m.db.pool().acquire().await?;
    item(&mut conn, &views::SOURCESTAMPS, id).await
}

/// Schedulers of the configuration in force.
async fn schedulers(State(m): State<Arc<Master>>) -> ApiResult {
    let state = m.state();
    let items: Vec<Value> = state
        .config
        .schedulers
        .iter()
        .map(|s| json!({"name": s.name, "type": s.kind.type_name(), "builders": s.builders}))
        .collect();
    Ok(Json(
        json!({"schedulers": items, "meta": {"total": items.len()}}),
    ))
}

/// A force scheduler as the web UI's form needs it.
fn force_json(s: &config::Scheduler) -> Option<Value> {
    let SchedulerKind::Force { parameters, .. } = &s.kind else {
        return None;
    };
    let parameters: Vec<Value> = parameters
        .iter()
        .map(|p| {
            let mut v = json!({"name": p.name, "label": p.label, "required": p.required});
            match &p.kind {
                config::ForceParameterKind::String { default, regex } => {
                    v["type"] = "string".into();
                    v["default"] = json!(default);
                    v["regex"] = json!(regex);
                }
                config::ForceParameterKind::Int { default } => {
                    v["type"] = "int".into();
                    v["default"] = json!(default);
                }
                config::ForceParameterKind::Bool { default } => {
                    v["type"] = "bool".into();
                    v["default"] = json!(default);
                }
                config::ForceParameterKind::Choice { choices, default } => {
                    v["type"] = "choice".into();
                    v["default"] = json!(default);
                    v["choices"] = json!(choices);
                }
            }
            v
        })
        .collect();
    Some(json!({
        "name": s.name,
        "label": s.name,
        "builders": s.builders,
        "parameters": parameters,
    }))
}

async fn forceschedulers(State(m): State<Arc<Master>>) -> ApiResult {
    let state = m.state();
    let items: Vec<Value> = state
        .config
        .schedulers
        .iter()
        .filter_map(force_json)
        .collect();
    Ok(Json(
        json!({"forceschedulers": items, "meta": {"total": items.len()}}),
    ))
}

async fn forcescheduler(State(m): State<Arc<Master>>, Path(name): Path<String>) -> ApiResult {
    let state = m.state();
    state
        .config
        .schedulers
        .iter()
        .filter(|s| s.name == name)
        .find_map(force_json)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no force scheduler {name:?}")))
}

/// Configured workers with their connection and health.
async fn workers(State(m): State<Arc<Master>>) -> ApiResult {
    let workers = worker_list(&m).await?;
    Ok(Json(
        json!({"workers": workers, "meta": {"total": workers.len()}}),
    ))
}

async fn worker(State(m): State<Arc<Master>>, Path(name): Path<String>) -> ApiResult {
    worker_list(&m)
        .await?
        .into_iter()
        .find(|w| w["name"] == name.as_str())
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no worker {name:?} in the configuration")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(
        number: i64,
        span: (Option<i64>, Option<i64>),
        progress: &[(&str, u64)],
    ) -> db::StepTiming {
        db::StepTiming {
            build: 1,
            number,
            name: format!("s{number}"),
            started_at: span.0,
            complete_at: span.1,
            progress: progress
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
        }
    }

    /// The last good build: three steps of 1 s, 4 s and 2 s; the second wrote 100 lines.
    fn expected() -> Vec<db::StepTiming> {
        vec![
            step(0, (Some(0), Some(1_000)), &[]),
            step(1, (Some(1_000), Some(5_000)), &[("output", 100)]),
            step(2, (Some(5_000), Some(7_000)), &[]),
        ]
    }

    #[test]
    fn a_running_step_is_as_far_along_as_its_progress_says() {
        let now = 100_000;
        // Half its lines written: half its 4 s left, then the last step's 2 s.
        let running = [
            step(0, (Some(now - 9_000), Some(now - 8_000)), &[]),
            step(1, (Some(now - 8_000), None), &[("output", 50)]),
        ];
        assert_eq!(
            remaining_ms(&expected(), &running, now),
            Some(2_000 + 2_000)
        );
        // Progress past the last build's is done, not negative.
        let running = [step(1, (Some(now - 10), None), &[("output", 500)])];
        assert_eq!(
            remaining_ms(&expected(), &running, now),
            Some(1_000 + 2_000)
        );
    }

    #[test]
    fn without_progress_a_running_step_goes_by_time() {
        let now = 100_000;
        let running = [step(0, (Some(now - 250), None), &[])];
        assert_eq!(
            remaining_ms(&expected(), &running, now),
            Some(750 + 4_000 + 2_000)
        );
        // An overrun step has nothing left, not less than nothing.
        let running = [step(0, (Some(now - 5_000), None), &[])];
        assert_eq!(remaining_ms(&expected(), &running, now), Some(6_000));
        // A metric the last build did not report is no evidence.
        let running = [step(0, (Some(now - 250), None), &[("tests", 3)])];
        assert_eq!(remaining_ms(&expected(), &running, now), Some(6_750));
    }

    #[test]
    fn a_build_that_has_not_started_a_step_has_all_of_them_left_and_none_without_history() {
        assert_eq!(remaining_ms(&expected(), &[], 0), Some(7_000));
        assert_eq!(remaining_ms(&[], &[step(0, (Some(0), None), &[])], 5), None);
    }
}
