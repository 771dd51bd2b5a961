//! What reporters say about a build or a buildset, read from the database when a delivery is
//! attempted: the API's own views (so a webhook receiver sees the fields `GET /api/v2/builds/ID`
//! shows), the properties, source stamps, changes and blamelist.

use serde_json::{Map, Value, json};
use sqlx::AnyConnection;

use kiln_db::model::{BuildId, BuildsetId, SourceStamp};
use kiln_db::{self as db, Listing, views};

/// A build as reporters see it.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The `builds` view row (`buildid`, `builder`, `number`, `results`, ...).
    pub build: Value,
    /// Its properties, name to value.
    pub properties: Map<String, Value>,
    /// Its buildset's source stamps.
    pub sourcestamps: Vec<SourceStamp>,
    /// Its buildset's changes (the `changes` view rows).
    pub changes: Vec<Value>,
    /// Who made those changes.
    pub blamelist: Vec<String>,
    /// Its buildset id.
    pub buildset: i64,
}

/// A buildset as reporters see it.
#[derive(Debug, Clone)]
pub struct BuildsetReport {
    /// The `buildsets` view row.
    pub buildset: Value,
    /// Its builds so far (the `builds` view rows).
    pub builds: Vec<Value>,
    /// Its source stamps.
    pub sourcestamps: Vec<SourceStamp>,
    /// Its changes.
    pub changes: Vec<Value>,
    /// Who made them.
    pub blamelist: Vec<String>,
}

/// The web UI's page of a build: `[master] url` + `#/builds/ID`.
pub fn build_url(master_url: &str, build: i64) -> String {
    format!("{}/#/builds/{build}", master_url.trim_end_matches('/'))
}

/// The web UI's page of a buildset.
pub fn buildset_url(master_url: &str, buildset: i64) -> String {
    format!(
        "{}/#/buildsets/{buildset}",
        master_url.trim_end_matches('/')
    )
}

async fn changes_of(
    conn: &mut AnyConnection,
    buildset: i64,
) -> Result<(Vec<Value>, Vec<String>), sqlx::Error> {
    let ids = db::buildset_change_ids(&mut *conn, buildset).await?;
    let changes = if ids.is_empty() {
        Vec::new()
    } else {
        let pairs: Vec<(String, String)> = ids
            .iter()
            .map(|i| ("changeid".to_owned(), i.to_string()))
            .collect();
        match Listing::parse(&views::CHANGES, &pairs, views::MAX_LIMIT, &[]) {
            Ok(listing) => listing.fetch(&mut *conn).await?.0,
            Err(_) => Vec::new(),
        }
    };
    let blamelist = if changes.is_empty() {
        Vec::new()
    } else {
        db::blamelist(&mut *conn, BuildsetId(buildset)).await?
    };
    Ok((changes, blamelist))
}

/// Reads build `id`; `None` if there is no such build.
pub async fn read_build(
    conn: &mut AnyConnection,
    id: i64,
) -> Result<Option<BuildReport>, sqlx::Error> {
    let Some(build) = views::get(&mut *conn, &views::BUILDS, id).await? else {
        return Ok(None);
    };
    let properties = db::build_properties(&mut *conn, BuildId(id))
        .await?
        .into_iter()
        .map(|p| (p.name, p.value))
        .collect();
    let request = build["buildrequestid"].as_i64().unwrap_or_default();
    let buildset = views::get(&mut *conn, &views::BUILDREQUESTS, request)
        .await?
        .and_then(|r| r["buildsetid"].as_i64())
        .unwrap_or_default();
    let sourcestamps = db::buildset_sourcestamps(&mut *conn, BuildsetId(buildset)).await?;
    let (changes, blamelist) = changes_of(conn, buildset).await?;
    Ok(Some(BuildReport {
        build,
        properties,
        sourcestamps,
        changes,
        blamelist,
        buildset,
    }))
}

/// Reads buildset `id`; `None` if there is no such buildset.
pub async fn read_buildset(
    conn: &mut AnyConnection,
    id: i64,
) -> Result<Option<BuildsetReport>, sqlx::Error> {
    let Some(buildset) = views::get(&mut *conn, &views::BUILDSETS, id).await? else {
        return Ok(None);
    };
    let requests = match Listing::parse(&views::BUILDREQUESTS, &[], views::MAX_LIMIT, &[]) {
        Ok(l) => l.with("buildsetid", id).fetch(&mut *conn).await?.0,
        Err(_) => Vec::new(),
    };
    let mut builds = Vec::new();
    for r in &requests {
        if let Some(request) = r["buildrequestid"].as_i64()
            && let Ok(l) = Listing::parse(&views::BUILDS, &[], views::MAX_LIMIT, &[])
        {
            builds.extend(l.with("buildrequestid", request).fetch(&mut *conn).await?.0);
        }
    }
    let sourcestamps = db::buildset_sourcestamps(&mut *conn, BuildsetId(id)).await?;
    let (changes, blamelist) = changes_of(conn, id).await?;
    Ok(Some(BuildsetReport {
        buildset,
        builds,
        sourcestamps,
        changes,
        blamelist,
    }))
}

fn stamps_json(stamps: &[SourceStamp]) -> Value {
    stamps
        .iter()
        .map(|s| {
            json!({
                "codebase": s.codebase,
                "repository": s.repository,
                "branch": s.branch,
                "revision": s.revision,
                "project": s.project,
                "patched": s.patch.is_some(),
            })
        })
        .collect()
}

/// The JSON an `http` reporter posts about a build.
pub fn build_json(event: &str, r: &BuildReport, master_url: &str) -> Value {
    let id = r.build["buildid"].as_i64().unwrap_or_default();
    let mut build = r.build.clone();
    build["url"] = json!(build_url(master_url, id));
    json!({
        "event": event,
        "build": build,
        "properties": r.properties,
        "buildsetid": r.buildset,
        "sourcestamps": stamps_json(&r.sourcestamps),
        "changes": r.changes,
        "blamelist": r.blamelist,
    })
}

/// The JSON an `http` reporter posts about a buildset.
pub fn buildset_json(event: &str, r: &BuildsetReport, master_url: &str) -> Value {
    let id = r.buildset["buildsetid"].as_i64().unwrap_or_default();
    let mut buildset = r.buildset.clone();
    buildset["url"] = json!(buildset_url(master_url, id));
    let builds: Vec<Value> = r
        .builds
        .iter()
        .map(|b| {
            let mut b = b.clone();
            let id = b["buildid"].as_i64().unwrap_or_default();
            b["url"] = json!(build_url(master_url, id));
            b
        })
        .collect();
    json!({
        "event": event,
        "buildset": buildset,
        "builds": builds,
        "sourcestamps": stamps_json(&r.sourcestamps),
        "changes": r.changes,
        "blamelist": r.blamelist,
    })
}
