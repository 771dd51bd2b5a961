//! Every query the master runs, as functions over a connection (a pooled connection or a
//! transaction: `&mut *tx`). Placeholders are `$N`, which both SQLite and PostgreSQL accept.

use std::collections::BTreeMap;

use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::model::*;

type Result<T> = std::result::Result<T, sqlx::Error>;

fn json_text(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

fn sourced_properties(rows: &[AnyRow]) -> Result<Vec<SourcedProperty>> {
    rows.iter()
        .map(|r| {
            Ok(SourcedProperty {
                name: r.try_get("name")?,
                value: parse_json(&r.try_get::<String, _>("value")?),
                source: r.try_get("source")?,
            })
        })
        .collect()
}

fn flag(b: bool) -> i64 {
    i64::from(b)
}

// ---------------------------------------------------------------------------------------------
// Masters

/// Registers (or re-activates) the master called `name` and returns its id.
pub async fn register_master(conn: &mut AnyConnection, name: &str, now: i64) -> Result<MasterId> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO masters (name, active, last_active) VALUES ($1, 1, $2)
         ON CONFLICT (name) DO UPDATE SET active = 1, last_active = $2
         RETURNING id",
    )
    .bind(name)
    .bind(now)
    .fetch_one(conn)
    .await?;
    Ok(MasterId(id))
}

/// Records that `master` is alive.
pub async fn heartbeat(conn: &mut AnyConnection, master: MasterId, now: i64) -> Result<()> {
    sqlx::query("UPDATE masters SET last_active = $1, active = 1 WHERE id = $2")
        .bind(now)
        .bind(master.0)
        .execute(conn)
        .await?;
    Ok(())
}

/// Marks a master inactive (a clean shutdown, or a reaped one).
pub async fn deactivate_master(conn: &mut AnyConnection, master: MasterId) -> Result<()> {
    sqlx::query("UPDATE masters SET active = 0 WHERE id = $1")
        .bind(master.0)
        .execute(conn)
        .await?;
    Ok(())
}

/// Every master that has used the database: (id, name, active, last heartbeat in ms).
pub async fn masters(conn: &mut AnyConnection) -> Result<Vec<(MasterId, String, bool, i64)>> {
    let rows = sqlx::query("SELECT id, name, active, last_active FROM masters ORDER BY id")
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                MasterId(r.try_get("id")?),
                r.try_get("name")?,
                r.try_get::<i64, _>("active")? != 0,
                r.try_get("last_active")?,
            ))
        })
        .collect()
}

/// Active masters whose heartbeat is older than `stale_before`.
pub async fn stale_masters(
    conn: &mut AnyConnection,
    stale_before: i64,
) -> Result<Vec<(MasterId, String)>> {
    let rows = sqlx::query("SELECT id, name FROM masters WHERE active = 1 AND last_active < $1")
        .bind(stale_before)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|r| Ok((MasterId(r.try_get("id")?), r.try_get("name")?)))
        .collect()
}

/// Releases what `master` held: claims of requests it never started a build for, and its
/// schedulers. Requests with a build in progress are left to the worker reconciliation.
/// Returns the requests released.
pub async fn release_master_claims(
    conn: &mut AnyConnection,
    master: MasterId,
) -> Result<Vec<BuildRequestId>> {
    let released: Vec<i64> = sqlx::query_scalar(
        "DELETE FROM buildrequest_claims
         WHERE master_id = $1
           AND EXISTS (SELECT 1 FROM buildrequests r
                       WHERE r.id = buildrequest_claims.request_id AND r.complete = 0)
           AND NOT EXISTS (SELECT 1 FROM builds b
                           WHERE b.request_id = buildrequest_claims.request_id
                             AND b.complete_at IS NULL)
         RETURNING request_id",
    )
    .bind(master.0)
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM scheduler_masters WHERE master_id = $1")
        .bind(master.0)
        .execute(conn)
        .await?;
    Ok(released.into_iter().map(BuildRequestId).collect())
}

// ---------------------------------------------------------------------------------------------
// Builders

/// Makes the builders table match the configuration: each named builder exists and is active,
/// every other one is inactive (its history stays). Returns name to id.
pub async fn sync_builders(
    conn: &mut AnyConnection,
    builders: &[(String, String, Vec<String>)],
) -> Result<BTreeMap<String, BuilderId>> {
    sqlx::query("UPDATE builders SET active = 0")
        .execute(&mut *conn)
        .await?;
    let mut ids = BTreeMap::new();
    for (name, description, tags) in builders {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO builders (name, description, tags, active) VALUES ($1, $2, $3, 1)
             ON CONFLICT (name) DO UPDATE SET description = $2, tags = $3, active = 1
             RETURNING id",
        )
        .bind(name)
        .bind(description)
        .bind(json_text(&Value::from(tags.clone())))
        .fetch_one(&mut *conn)
        .await?;
        ids.insert(name.clone(), BuilderId(id));
    }
    Ok(ids)
}

/// Every builder's id by name, active or not.
pub async fn builder_ids(conn: &mut AnyConnection) -> Result<BTreeMap<String, BuilderId>> {
    let rows = sqlx::query("SELECT id, name FROM builders")
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("name")?, BuilderId(r.try_get("id")?))))
        .collect()
}

/// The builder's id, creating an (inactive) row for a name the database has not seen.
pub async fn ensure_builder(conn: &mut AnyConnection, name: &str) -> Result<BuilderId> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO builders (name, active) VALUES ($1, 0)
         ON CONFLICT (name) DO UPDATE SET name = excluded.name
         RETURNING id",
    )
    .bind(name)
    .fetch_one(conn)
    .await?;
    Ok(BuilderId(id))
}

// ---------------------------------------------------------------------------------------------
// Workers

/// Makes sure every configured worker has a row. Returns name to id.
pub async fn sync_workers(
    conn: &mut AnyConnection,
    workers: &[(String, Value)],
) -> Result<BTreeMap<String, WorkerId>> {
    let mut ids = BTreeMap::new();
    for (name, info) in workers {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO workers (name, info) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET info = $2
             RETURNING id",
        )
        .bind(name)
        .bind(json_text(info))
        .fetch_one(&mut *conn)
        .await?;
        ids.insert(name.clone(), WorkerId(id));
    }
    Ok(ids)
}

// ---------------------------------------------------------------------------------------------
// Users and changes

/// The user with this identifier ("Name <email>"), created on first sight.
pub async fn ensure_user(conn: &mut AnyConnection, identifier: &str) -> Result<UserId> {
    let email = identifier
        .rsplit_once('<')
        .and_then(|(_, rest)| rest.strip_suffix('>'))
        .filter(|e| e.contains('@'))
        .map(str::to_owned);
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO users (identifier, email) VALUES ($1, $2)
         ON CONFLICT (identifier) DO UPDATE SET identifier = excluded.identifier
         RETURNING id",
    )
    .bind(identifier)
    .bind(email)
    .fetch_one(conn)
    .await?;
    Ok(UserId(id))
}

/// Stores a change with its files, properties and author. Returns `None` when a change with
/// the same `source_key` exists (a redelivery). The caller holds
/// [`super::Db::serialize_appends`].
pub async fn insert_change(
    conn: &mut AnyConnection,
    change: &NewChange,
    now: i64,
) -> Result<Option<ChangeId>> {
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO changes (author, committer, comments, branch, revision, revlink, when_at,
                              category, repository, codebase, project, source, source_key,
                              trusted, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
         ON CONFLICT (source_key) DO NOTHING
         RETURNING id",
    )
    .bind(&change.author)
    .bind(&change.committer)
    .bind(&change.comments)
    .bind(&change.branch)
    .bind(&change.revision)
    .bind(&change.revlink)
    .bind(change.when_ms.unwrap_or(now))
    .bind(&change.category)
    .bind(&change.repository)
    .bind(&change.codebase)
    .bind(&change.project)
    .bind(&change.source)
    .bind(&change.source_key)
    .bind(flag(change.trusted.unwrap_or(true)))
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(id) = id else { return Ok(None) };
    for file in &change.files {
        sqlx::query("INSERT INTO change_files (change_id, filename) VALUES ($1, $2)")
            .bind(id)
            .bind(file)
            .execute(&mut *conn)
            .await?;
    }
    for (name, value) in &change.properties {
        sqlx::query(
            "INSERT INTO change_properties (change_id, name, value, source)
             VALUES ($1, $2, $3, 'Change')",
        )
        .bind(id)
        .bind(name)
        .bind(json_text(value))
        .execute(&mut *conn)
        .await?;
    }
    let user = ensure_user(conn, &change.author).await?;
    sqlx::query("INSERT INTO change_users (change_id, user_id) VALUES ($1, $2)")
        .bind(id)
        .bind(user.0)
        .execute(&mut *conn)
        .await?;
    Ok(Some(ChangeId(id)))
}

const CHANGE_COLUMNS: &str = "id, author, committer, comments, branch, revision, revlink, \
    when_at, category, repository, codebase, project, source, trusted";

async fn change_from_row(conn: &mut AnyConnection, r: &AnyRow) -> Result<Change> {
    let id: i64 = r.try_get("id")?;
    let files: Vec<String> =
        sqlx::query_scalar("SELECT filename FROM change_files WHERE change_id = $1")
            .bind(id)
            .fetch_all(&mut *conn)
            .await?;
    let props = sqlx::query("SELECT name, value FROM change_properties WHERE change_id = $1")
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
    let mut properties = serde_json::Map::new();
    for p in &props {
        properties.insert(
            p.try_get("name")?,
            parse_json(&p.try_get::<String, _>("value")?),
        );
    }
    Ok(Change {
        id: ChangeId(id),
        author: r.try_get("author")?,
        committer: r.try_get("committer")?,
        comments: r.try_get("comments")?,
        branch: r.try_get("branch")?,
        revision: r.try_get("revision")?,
        revlink: r.try_get("revlink")?,
        when_ms: r.try_get("when_at")?,
        category: r.try_get("category")?,
        repository: r.try_get("repository")?,
        codebase: r.try_get("codebase")?,
        project: r.try_get("project")?,
        files,
        properties,
        source: r.try_get("source")?,
        trusted: r.try_get::<i64, _>("trusted")? != 0,
    })
}

/// Changes with ids above `after`, oldest first, at most `limit`.
pub async fn changes_after(
    conn: &mut AnyConnection,
    after: ChangeId,
    limit: i64,
) -> Result<Vec<Change>> {
    let rows = sqlx::query(&format!(
        "SELECT {CHANGE_COLUMNS} FROM changes WHERE id > $1 ORDER BY id LIMIT $2"
    ))
    .bind(after.0)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let mut changes = Vec::with_capacity(rows.len());
    for r in &rows {
        changes.push(change_from_row(conn, r).await?);
    }
    Ok(changes)
}

/// One change.
pub async fn get_change(conn: &mut AnyConnection, id: ChangeId) -> Result<Option<Change>> {
    let row = sqlx::query(&format!(
        "SELECT {CHANGE_COLUMNS} FROM changes WHERE id = $1"
    ))
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) => Ok(Some(change_from_row(conn, &r).await?)),
        None => Ok(None),
    }
}

/// The highest change id (0 when there is none).
pub async fn last_change_id(conn: &mut AnyConnection) -> Result<ChangeId> {
    let id: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM changes")
        .fetch_one(conn)
        .await?;
    Ok(ChangeId(id.unwrap_or(0)))
}

/// The number of changes stored.
pub async fn count_changes(conn: &mut AnyConnection) -> Result<i64> {
    sqlx::query_scalar("SELECT COUNT(*) FROM changes")
        .fetch_one(conn)
        .await
}

/// The blamelist of a buildset: the distinct authors of its source stamps' changes.
pub async fn blamelist(conn: &mut AnyConnection, buildset: BuildsetId) -> Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT DISTINCT u.identifier FROM buildset_sourcestamps bs
         JOIN sourcestamp_changes sc ON sc.sourcestamp_id = bs.sourcestamp_id
         JOIN change_users cu ON cu.change_id = sc.change_id
         JOIN users u ON u.id = cu.user_id
         WHERE bs.buildset_id = $1
         ORDER BY u.identifier",
    )
    .bind(buildset.0)
    .fetch_all(conn)
    .await
}

// ---------------------------------------------------------------------------------------------
// Buildsets and build requests

/// Creates a buildset with its source stamps, properties and one request per builder, in the
/// caller's transaction. Returns `None` when the scheduler already made a buildset with this
/// `external_id` (the timer or batch already fired).
pub async fn insert_buildset(
    conn: &mut AnyConnection,
    bs: &NewBuildset,
    builder_ids: &BTreeMap<String, BuilderId>,
    now: i64,
) -> Result<Option<(BuildsetId, Vec<(BuildRequestId, String)>)>> {
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO buildsets (scheduler, reason, external_id, submitted_at, trusted,
                                parent_build_id, collapse_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (scheduler, external_id) DO NOTHING
         RETURNING id",
    )
    .bind(&bs.scheduler)
    .bind(&bs.reason)
    .bind(&bs.external_id)
    .bind(now)
    .bind(flag(bs.trusted))
    .bind(bs.parent_build.map(|b| b.0))
    // Trusted and untrusted requests never collapse into each other: a fork's request must
    // not absorb (and so build untrusted) a trusted one, nor the reverse.
    .bind(
        crate::model::collapse_key(&bs.sourcestamps, &bs.properties).map(|key| {
            if bs.trusted {
                key
            } else {
                format!("untrusted:{key}")
            }
        }),
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(id) = id else { return Ok(None) };
    for ss in &bs.sourcestamps {
        let patch_id = match &ss.patch {
            Some(p) => Some(
                sqlx::query_scalar::<_, i64>(
                    "INSERT INTO patches (level, body, author, comment, subdir)
                     VALUES ($1, $2, $3, $4, $5) RETURNING id",
                )
                .bind(p.level)
                .bind(p.body.clone())
                .bind(&p.author)
                .bind(&p.comment)
                .bind(&p.subdir)
                .fetch_one(&mut *conn)
                .await?,
            ),
            None => None,
        };
        let ssid: i64 = sqlx::query_scalar(
            "INSERT INTO sourcestamps (codebase, repository, branch, revision, project, patch_id,
                                       created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        )
        .bind(&ss.codebase)
        .bind(&ss.repository)
        .bind(&ss.branch)
        .bind(&ss.revision)
        .bind(&ss.project)
        .bind(patch_id)
        .bind(now)
        .fetch_one(&mut *conn)
        .await?;
        for change in &ss.changes {
            sqlx::query(
                "INSERT INTO sourcestamp_changes (sourcestamp_id, change_id) VALUES ($1, $2)",
            )
            .bind(ssid)
            .bind(change.0)
            .execute(&mut *conn)
            .await?;
        }
        sqlx::query(
            "INSERT INTO buildset_sourcestamps (buildset_id, sourcestamp_id) VALUES ($1, $2)",
        )
        .bind(id)
        .bind(ssid)
        .execute(&mut *conn)
        .await?;
    }
    for p in &bs.properties {
        sqlx::query(
            "INSERT INTO buildset_properties (buildset_id, name, value, source)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (buildset_id, name) DO UPDATE SET value = $3, source = $4",
        )
        .bind(id)
        .bind(&p.name)
        .bind(json_text(&p.value))
        .bind(&p.source)
        .execute(&mut *conn)
        .await?;
    }
    let mut requests = Vec::with_capacity(bs.builders.len());
    for (builder, priority) in &bs.builders {
        let builder_id = match builder_ids.get(builder) {
            Some(id) => *id,
            None => ensure_builder(conn, builder).await?,
        };
        let brid: i64 = sqlx::query_scalar(
            "INSERT INTO buildrequests (buildset_id, builder_id, priority, submitted_at)
             VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(id)
        .bind(builder_id.0)
        .bind(*priority)
        .bind(now)
        .fetch_one(&mut *conn)
        .await?;
        requests.push((BuildRequestId(brid), builder.clone()));
    }
    Ok(Some((BuildsetId(id), requests)))
}

fn buildset_from_row(r: &AnyRow) -> Result<Buildset> {
    Ok(Buildset {
        id: BuildsetId(r.try_get("id")?),
        scheduler: r.try_get("scheduler")?,
        reason: r.try_get("reason")?,
        external_id: r.try_get("external_id")?,
        submitted_ms: r.try_get("submitted_at")?,
        trusted: r.try_get::<i64, _>("trusted")? != 0,
        complete: r.try_get::<i64, _>("complete")? != 0,
        results: r
            .try_get::<Option<i64>, _>("results")?
            .and_then(results_from_code),
        first_failure_ms: r.try_get("first_failure_at")?,
    })
}

const BUILDSET_COLUMNS: &str = "id, scheduler, reason, external_id, submitted_at, trusted, \
    complete, results, first_failure_at";

/// A buildset's collapse key (`None`: its requests never merge).
pub async fn buildset_collapse_key(
    conn: &mut AnyConnection,
    id: BuildsetId,
) -> Result<Option<String>> {
    let key: Option<Option<String>> =
        sqlx::query_scalar("SELECT collapse_key FROM buildsets WHERE id = $1")
            .bind(id.0)
            .fetch_optional(conn)
            .await?;
    Ok(key.flatten())
}

/// Queued requests on `builder`, older than `newer`, whose buildsets have collapse key `key`.
pub async fn collapsible_requests(
    conn: &mut AnyConnection,
    builder: &str,
    newer: BuildRequestId,
    key: &str,
) -> Result<Vec<BuildRequestId>> {
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT r.id FROM buildrequests r
         JOIN builders b ON b.id = r.builder_id
         JOIN buildsets s ON s.id = r.buildset_id
         LEFT JOIN buildrequest_claims c ON c.request_id = r.id
         WHERE b.name = $1 AND r.complete = 0 AND c.request_id IS NULL AND r.id < $2
           AND s.collapse_key = $3
         ORDER BY r.id",
    )
    .bind(builder)
    .bind(newer.0)
    .bind(key)
    .fetch_all(conn)
    .await?;
    Ok(ids.into_iter().map(BuildRequestId).collect())
}

/// One buildset.
pub async fn get_buildset(conn: &mut AnyConnection, id: BuildsetId) -> Result<Option<Buildset>> {
    let row = sqlx::query(&format!(
        "SELECT {BUILDSET_COLUMNS} FROM buildsets WHERE id = $1"
    ))
    .bind(id.0)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(buildset_from_row).transpose()
}

/// Buildsets made by `scheduler`, oldest first.
pub async fn buildsets_of(conn: &mut AnyConnection, scheduler: &str) -> Result<Vec<Buildset>> {
    let rows = sqlx::query(&format!(
        "SELECT {BUILDSET_COLUMNS} FROM buildsets WHERE scheduler = $1 ORDER BY id"
    ))
    .bind(scheduler)
    .fetch_all(conn)
    .await?;
    rows.iter().map(buildset_from_row).collect()
}

/// A buildset's properties, with their sources.
pub async fn buildset_properties(
    conn: &mut AnyConnection,
    id: BuildsetId,
) -> Result<Vec<SourcedProperty>> {
    let rows = sqlx::query(
        "SELECT name, value, source FROM buildset_properties WHERE buildset_id = $1 ORDER BY name",
    )
    .bind(id.0)
    .fetch_all(conn)
    .await?;
    sourced_properties(&rows)
}

/// A buildset with its properties, in one query (what starting one of its builds, a dispatch
/// policy and a rebuild read).
pub async fn buildset_with_properties(
    conn: &mut AnyConnection,
    id: BuildsetId,
) -> Result<Option<(Buildset, Vec<SourcedProperty>)>> {
    let rows = sqlx::query(&format!(
        "SELECT {BUILDSET_COLUMNS}, p.name AS prop_name, p.value AS prop_value,
                p.source AS prop_source
         FROM buildsets LEFT JOIN buildset_properties p ON p.buildset_id = buildsets.id
         WHERE buildsets.id = $1 ORDER BY p.name"
    ))
    .bind(id.0)
    .fetch_all(conn)
    .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let buildset = buildset_from_row(first)?;
    let mut properties = Vec::with_capacity(rows.len());
    for r in &rows {
        let Some(name) = r.try_get::<Option<String>, _>("prop_name")? else {
            continue;
        };
        properties.push(SourcedProperty {
            name,
            value: parse_json(&r.try_get::<String, _>("prop_value")?),
            source: r.try_get("prop_source")?,
        });
    }
    Ok(Some((buildset, properties)))
}

/// A buildset's source stamps with their patches and changes, in one query.
pub async fn buildset_sourcestamps(
    conn: &mut AnyConnection,
    id: BuildsetId,
) -> Result<Vec<SourceStamp>> {
    // One row per (stamp, change), or one per stamp without changes.
    let rows = sqlx::query(
        "SELECT s.id, s.codebase, s.repository, s.branch, s.revision, s.project,
                p.level, p.body, p.author, p.comment, p.subdir, p.id AS patch_id,
                c.change_id
         FROM buildset_sourcestamps bs
         JOIN sourcestamps s ON s.id = bs.sourcestamp_id
         LEFT JOIN patches p ON p.id = s.patch_id
         LEFT JOIN sourcestamp_changes c ON c.sourcestamp_id = s.id
         WHERE bs.buildset_id = $1
         ORDER BY s.codebase, s.id, c.change_id",
    )
    .bind(id.0)
    .fetch_all(&mut *conn)
    .await?;
    let mut stamps: Vec<SourceStamp> = Vec::with_capacity(rows.len());
    let mut last = None;
    for r in &rows {
        let ssid: i64 = r.try_get("id")?;
        let change = r.try_get::<Option<i64>, _>("change_id")?.map(ChangeId);
        // A further change of the stamp just read.
        if let (Some(stamp), true) = (stamps.last_mut(), last == Some(ssid)) {
            stamp.changes.extend(change);
            continue;
        }
        last = Some(ssid);
        let patch = match r.try_get::<Option<i64>, _>("patch_id")? {
            Some(_) => Some(Patch {
                level: r.try_get("level")?,
                body: r.try_get("body")?,
                author: r.try_get("author")?,
                comment: r.try_get("comment")?,
                subdir: r.try_get("subdir")?,
            }),
            None => None,
        };
        stamps.push(SourceStamp {
            codebase: r.try_get("codebase")?,
            repository: r.try_get("repository")?,
            branch: r.try_get("branch")?,
            revision: r.try_get("revision")?,
            project: r.try_get("project")?,
            patch,
            changes: change.into_iter().collect(),
        });
    }
    Ok(stamps)
}

fn queued_from_row(r: &AnyRow) -> Result<QueuedRequest> {
    Ok(QueuedRequest {
        id: BuildRequestId(r.try_get("id")?),
        buildset: BuildsetId(r.try_get("buildset_id")?),
        builder: r.try_get("builder")?,
        priority: r.try_get("priority")?,
        submitted_ms: r.try_get("submitted_at")?,
        trusted: r.try_get::<i64, _>("trusted")? != 0,
    })
}

const QUEUED_SELECT: &str = "SELECT r.id, r.buildset_id, b.name AS builder, r.priority,
        r.submitted_at, s.trusted
     FROM buildrequests r
     JOIN builders b ON b.id = r.builder_id
     JOIN buildsets s ON s.id = r.buildset_id
     LEFT JOIN buildrequest_claims c ON c.request_id = r.id
     WHERE r.complete = 0 AND c.request_id IS NULL";

/// Unclaimed requests, in Buildbot's default order: priority (highest first), then oldest.
/// `builder` narrows to one builder; `limit` and `offset` page through the queue.
pub async fn queued_requests(
    conn: &mut AnyConnection,
    builder: Option<&str>,
    limit: i64,
    offset: i64,
) -> Result<Vec<QueuedRequest>> {
    let rows =
        match builder {
            Some(b) => {
                sqlx::query(&format!(
                    "{QUEUED_SELECT} AND b.name = $1
                 ORDER BY r.priority DESC, r.submitted_at, r.id LIMIT $2 OFFSET $3"
                ))
                .bind(b)
                .bind(limit)
                .bind(offset)
                .fetch_all(conn)
                .await?
            }
            None => sqlx::query(&format!(
                "{QUEUED_SELECT} ORDER BY r.priority DESC, r.submitted_at, r.id LIMIT $1 OFFSET $2"
            ))
            .bind(limit)
            .bind(offset)
            .fetch_all(conn)
            .await?,
        };
    rows.iter().map(queued_from_row).collect()
}

/// Per builder: how many requests are queued (unclaimed) and when the oldest was submitted.
pub async fn queue_summary(conn: &mut AnyConnection) -> Result<Vec<(String, i64, i64)>> {
    let rows = sqlx::query(
        "SELECT b.name AS builder, COUNT(*) AS queued, MIN(r.submitted_at) AS oldest
         FROM buildrequests r
         JOIN builders b ON b.id = r.builder_id
         LEFT JOIN buildrequest_claims c ON c.request_id = r.id
         WHERE r.complete = 0 AND c.request_id IS NULL
         GROUP BY b.name ORDER BY b.name",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("builder")?,
                r.try_get("queued")?,
                r.try_get("oldest")?,
            ))
        })
        .collect()
}

/// Per builder with queued (unclaimed) requests: when its oldest was submitted. What a
/// dispatch pass orders builders by; unlike [`queue_summary`] it does not count the queue, so
/// it costs the same for ten queued requests as for a hundred thousand (each builder's walk
/// along `buildrequests_age` passes only its claimed requests, the builds running now).
pub async fn queue_heads(conn: &mut AnyConnection) -> Result<Vec<(String, i64)>> {
    let rows = sqlx::query(
        "SELECT name AS builder, oldest FROM (
           SELECT b.name,
             (SELECT r.submitted_at FROM buildrequests r
              WHERE r.builder_id = b.id AND r.complete = 0
                AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
              ORDER BY r.submitted_at LIMIT 1) AS oldest
           FROM builders b) heads
         WHERE oldest IS NOT NULL ORDER BY name",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("builder")?, r.try_get("oldest")?)))
        .collect()
}

/// One request (claimed or not, complete or not).
pub async fn get_request(
    conn: &mut AnyConnection,
    id: BuildRequestId,
) -> Result<Option<(QueuedRequest, bool, Option<Results>, Option<BuildRequestId>)>> {
    let row = sqlx::query(
        "SELECT r.id, r.buildset_id, b.name AS builder, r.priority, r.submitted_at, s.trusted,
                r.complete, r.results, r.collapsed_into
         FROM buildrequests r
         JOIN builders b ON b.id = r.builder_id
         JOIN buildsets s ON s.id = r.buildset_id
         WHERE r.id = $1",
    )
    .bind(id.0)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        Ok((
            queued_from_row(&r)?,
            r.try_get::<i64, _>("complete")? != 0,
            r.try_get::<Option<i64>, _>("results")?
                .and_then(results_from_code),
            r.try_get::<Option<i64>, _>("collapsed_into")?
                .map(BuildRequestId),
        ))
    })
    .transpose()
}

/// The requests of a buildset: (id, builder, complete, results).
pub async fn buildset_requests(
    conn: &mut AnyConnection,
    id: BuildsetId,
) -> Result<Vec<(BuildRequestId, String, bool, Option<Results>)>> {
    let rows = sqlx::query(
        "SELECT r.id, b.name, r.complete, r.results FROM buildrequests r
         JOIN builders b ON b.id = r.builder_id
         WHERE r.buildset_id = $1 ORDER BY r.id",
    )
    .bind(id.0)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                BuildRequestId(r.try_get("id")?),
                r.try_get("name")?,
                r.try_get::<i64, _>("complete")? != 0,
                r.try_get::<Option<i64>, _>("results")?
                    .and_then(results_from_code),
            ))
        })
        .collect()
}

/// Claims one request for `master`. True if this call claimed it; false if someone else
/// holds it or it is complete. The claims table's primary key decides.
pub async fn claim_request(
    conn: &mut AnyConnection,
    request: BuildRequestId,
    master: MasterId,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO buildrequest_claims (request_id, master_id, claimed_at)
         SELECT id, $2, $3 FROM buildrequests WHERE id = $1 AND complete = 0
         ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(request.0)
    .bind(master.0)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Returns claimed requests to the queue (a build that must be retried).
pub async fn unclaim_requests(
    conn: &mut AnyConnection,
    requests: &[BuildRequestId],
    master: MasterId,
) -> Result<u64> {
    let mut n = 0;
    for r in requests {
        n += sqlx::query(
            "DELETE FROM buildrequest_claims WHERE request_id = $1 AND master_id = $2
             AND EXISTS (SELECT 1 FROM buildrequests r
                         WHERE r.id = buildrequest_claims.request_id AND r.complete = 0)",
        )
        .bind(r.0)
        .bind(master.0)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    }
    Ok(n)
}

/// Which master holds the claim on a request.
pub async fn claimed_by(
    conn: &mut AnyConnection,
    request: BuildRequestId,
) -> Result<Option<MasterId>> {
    let id: Option<i64> =
        sqlx::query_scalar("SELECT master_id FROM buildrequest_claims WHERE request_id = $1")
            .bind(request.0)
            .fetch_optional(conn)
            .await?;
    Ok(id.map(MasterId))
}

/// Marks a claimed request complete (only if `master` holds its claim and it is not complete
/// already). `collapsed_into` records a request absorbed by a newer one. Returns the request's
/// buildset if this call completed it.
pub async fn complete_request(
    conn: &mut AnyConnection,
    request: BuildRequestId,
    master: MasterId,
    results: Results,
    collapsed_into: Option<BuildRequestId>,
    now: i64,
) -> Result<Option<BuildsetId>> {
    let buildset: Option<i64> = sqlx::query_scalar(
        "UPDATE buildrequests SET complete = 1, results = $1, complete_at = $2,
                collapsed_into = $3
         WHERE id = $4 AND complete = 0
           AND EXISTS (SELECT 1 FROM buildrequest_claims c
                       WHERE c.request_id = buildrequests.id AND c.master_id = $5)
         RETURNING buildset_id",
    )
    .bind(i64::from(results.code()))
    .bind(now)
    .bind(collapsed_into.map(|r| r.0))
    .bind(request.0)
    .bind(master.0)
    .fetch_optional(conn)
    .await?;
    Ok(buildset.map(BuildsetId))
}

/// Records the buildset's first failure, once. True if this call recorded it.
pub async fn mark_first_failure(
    conn: &mut AnyConnection,
    buildset: BuildsetId,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE buildsets SET first_failure_at = $1 WHERE id = $2 AND first_failure_at IS NULL",
    )
    .bind(now)
    .bind(buildset.0)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Completes the buildset if all its requests are complete; returns its result and scheduler
/// if this call completed it. One statement: it runs in the write transaction that ends every
/// build, where each statement holds the write lock a round trip longer.
pub async fn complete_buildset_if_done(
    conn: &mut AnyConnection,
    buildset: BuildsetId,
    now: i64,
) -> Result<Option<(Results, Option<String>)>> {
    // The result is the worst of the requests' (Buildbot's worst_status order, as
    // `Outcome::worst`), starting from SUCCESS. By rank: SKIPPED (code 3) is 0, SUCCESS,
    // WARNINGS and FAILURE (codes 0-2) are 1-3, and EXCEPTION, RETRY and CANCELLED (4-6) keep
    // their codes.
    let done = sqlx::query(
        "UPDATE buildsets SET complete = 1, complete_at = $1, results = (
           SELECT CASE WHEN worst < 4 THEN worst - 1 ELSE worst END FROM (
             SELECT CASE WHEN MAX(rank) IS NULL OR MAX(rank) < 1 THEN 1 ELSE MAX(rank) END
                    AS worst
             FROM (SELECT CASE WHEN results = 3 THEN 0 WHEN results < 3 THEN results + 1
                               ELSE results END AS rank
                   FROM buildrequests WHERE buildset_id = $2 AND results IS NOT NULL) ranks
           ) w)
         WHERE id = $2 AND complete = 0
           AND NOT EXISTS (SELECT 1 FROM buildrequests WHERE buildset_id = $2 AND complete = 0)
         RETURNING scheduler, results",
    )
    .bind(now)
    .bind(buildset.0)
    .fetch_optional(conn)
    .await?;
    done.map(|row| {
        let code: i64 = row.try_get("results")?;
        let results = results_from_code(code).ok_or_else(|| {
            sqlx::Error::Decode(format!("buildset {buildset}: result code {code}").into())
        })?;
        Ok((results, row.try_get("scheduler")?))
    })
    .transpose()
}

// ---------------------------------------------------------------------------------------------
// Events

/// Something that happened, for consumers that read the feed through a watermark.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Position in the feed.
    pub id: i64,
    /// What happened: "buildset.complete", "buildset.first_failure", ...
    pub kind: String,
    /// The id of what it happened to.
    pub subject: i64,
    /// Details.
    pub payload: Value,
    /// When (ms).
    pub created_ms: i64,
}

/// Appends an event. The caller holds [`super::Db::serialize_appends`].
pub async fn insert_event(
    conn: &mut AnyConnection,
    kind: &str,
    subject: i64,
    payload: &Value,
    now: i64,
) -> Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO events (kind, subject_id, payload, created_at) VALUES ($1, $2, $3, $4)
         RETURNING id",
    )
    .bind(kind)
    .bind(subject)
    .bind(json_text(payload))
    .bind(now)
    .fetch_one(conn)
    .await
}

/// Events after `after`, oldest first.
pub async fn events_after(conn: &mut AnyConnection, after: i64, limit: i64) -> Result<Vec<Event>> {
    let rows = sqlx::query(
        "SELECT id, kind, subject_id, payload, created_at FROM events
         WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Event {
                id: r.try_get("id")?,
                kind: r.try_get("kind")?,
                subject: r.try_get("subject_id")?,
                payload: parse_json(&r.try_get::<String, _>("payload")?),
                created_ms: r.try_get("created_at")?,
            })
        })
        .collect()
}

/// The newest event's id (0 when there is none).
pub async fn last_event_id(conn: &mut AnyConnection) -> Result<i64> {
    let id: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM events")
        .fetch_one(conn)
        .await?;
    Ok(id.unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// Schedulers

/// Claims `scheduler` for `master` unless another active master runs it. True if `master`
/// runs it now.
pub async fn claim_scheduler(
    conn: &mut AnyConnection,
    scheduler: &str,
    master: MasterId,
    now: i64,
) -> Result<bool> {
    const OWNER: &str = "SELECT master_id FROM scheduler_masters WHERE scheduler = $1";
    // Every pass asks; only an unowned scheduler costs a write (on SQLite, the write lock).
    let owner: Option<i64> = sqlx::query_scalar(OWNER)
        .bind(scheduler)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(id) = owner {
        return Ok(id == master.0);
    }
    sqlx::query(
        "INSERT INTO scheduler_masters (scheduler, master_id, claimed_at) VALUES ($1, $2, $3)
         ON CONFLICT (scheduler) DO NOTHING",
    )
    .bind(scheduler)
    .bind(master.0)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let owner: i64 = sqlx::query_scalar(OWNER)
        .bind(scheduler)
        .fetch_one(conn)
        .await?;
    Ok(owner == master.0)
}

/// Gives up `scheduler` (removed from the configuration).
pub async fn release_scheduler(
    conn: &mut AnyConnection,
    scheduler: &str,
    master: MasterId,
) -> Result<()> {
    sqlx::query("DELETE FROM scheduler_masters WHERE scheduler = $1 AND master_id = $2")
        .bind(scheduler)
        .bind(master.0)
        .execute(conn)
        .await?;
    Ok(())
}

/// A value of a scheduler's durable state.
pub async fn get_state(
    conn: &mut AnyConnection,
    scheduler: &str,
    name: &str,
) -> Result<Option<Value>> {
    let text: Option<String> =
        sqlx::query_scalar("SELECT value FROM scheduler_state WHERE scheduler = $1 AND name = $2")
            .bind(scheduler)
            .bind(name)
            .fetch_optional(conn)
            .await?;
    Ok(text.map(|t| parse_json(&t)))
}

/// Every state value of a scheduler whose name starts with `prefix`.
pub async fn state_with_prefix(
    conn: &mut AnyConnection,
    scheduler: &str,
    prefix: &str,
) -> Result<Vec<(String, Value)>> {
    let rows =
        sqlx::query("SELECT name, value FROM scheduler_state WHERE scheduler = $1 ORDER BY name")
            .bind(scheduler)
            .fetch_all(conn)
            .await?;
    let mut out = Vec::new();
    for r in &rows {
        let name: String = r.try_get("name")?;
        if name.starts_with(prefix) {
            out.push((name, parse_json(&r.try_get::<String, _>("value")?)));
        }
    }
    Ok(out)
}

/// Sets a state value.
pub async fn set_state(
    conn: &mut AnyConnection,
    scheduler: &str,
    name: &str,
    value: &Value,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO scheduler_state (scheduler, name, value) VALUES ($1, $2, $3)
         ON CONFLICT (scheduler, name) DO UPDATE SET value = $3",
    )
    .bind(scheduler)
    .bind(name)
    .bind(json_text(value))
    .execute(conn)
    .await?;
    Ok(())
}

/// Removes a state value.
pub async fn delete_state(conn: &mut AnyConnection, scheduler: &str, name: &str) -> Result<()> {
    sqlx::query("DELETE FROM scheduler_state WHERE scheduler = $1 AND name = $2")
        .bind(scheduler)
        .bind(name)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records that `scheduler` classified `change` (important or not) and is holding it for its
/// next buildset.
pub async fn classify_change(
    conn: &mut AnyConnection,
    scheduler: &str,
    change: ChangeId,
    important: bool,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO scheduler_changes (scheduler, change_id, important) VALUES ($1, $2, $3)
         ON CONFLICT (scheduler, change_id) DO NOTHING",
    )
    .bind(scheduler)
    .bind(change.0)
    .bind(flag(important))
    .execute(conn)
    .await?;
    Ok(())
}

/// The changes `scheduler` holds, oldest first, with their importance.
pub async fn classified_changes(
    conn: &mut AnyConnection,
    scheduler: &str,
) -> Result<Vec<(ChangeId, bool)>> {
    let rows = sqlx::query(
        "SELECT change_id, important FROM scheduler_changes WHERE scheduler = $1
         ORDER BY change_id",
    )
    .bind(scheduler)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                ChangeId(r.try_get("change_id")?),
                r.try_get::<i64, _>("important")? != 0,
            ))
        })
        .collect()
}

/// Forgets held changes (they went into a buildset).
pub async fn flush_classified(
    conn: &mut AnyConnection,
    scheduler: &str,
    changes: &[ChangeId],
) -> Result<()> {
    for c in changes {
        sqlx::query("DELETE FROM scheduler_changes WHERE scheduler = $1 AND change_id = $2")
            .bind(scheduler)
            .bind(c.0)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Files and step modules

/// Stores content by SHA-1 (the caller verified the digests). Returns false if it was there.
pub async fn insert_file(
    conn: &mut AnyConnection,
    sha1: &str,
    sha256: &str,
    content: &[u8],
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO files (sha1, sha256, size, content, created_at) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (sha1) DO NOTHING",
    )
    .bind(sha1)
    .bind(sha256)
    .bind(content.len() as i64)
    .bind(content.to_vec())
    .bind(now)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A stored file: (sha256, content).
pub async fn get_file(conn: &mut AnyConnection, sha1: &str) -> Result<Option<(String, Vec<u8>)>> {
    let row = sqlx::query("SELECT sha256, content FROM files WHERE sha1 = $1")
        .bind(sha1)
        .fetch_optional(conn)
        .await?;
    row.map(|r| Ok((r.try_get("sha256")?, r.try_get("content")?)))
        .transpose()
}

/// A registered step module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepModule {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// "step", "observer" or "policy".
    pub kind: String,
    /// SHA-1 of the bytes (the file cache's name).
    pub sha1: String,
    /// SHA-256 of the bytes (what workers verify).
    pub sha256: String,
    /// Size in bytes.
    pub size: i64,
    /// When (ms).
    pub uploaded_ms: i64,
}

/// Registers a module version. False if that name and version exist.
pub async fn insert_step_module(conn: &mut AnyConnection, m: &StepModule) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO step_modules (name, version, kind, sha1, sha256, size, uploaded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (name, version) DO NOTHING",
    )
    .bind(&m.name)
    .bind(&m.version)
    .bind(&m.kind)
    .bind(&m.sha1)
    .bind(&m.sha256)
    .bind(m.size)
    .bind(m.uploaded_ms)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Every version of a module, newest upload first (`name` None: every module).
pub async fn step_modules(conn: &mut AnyConnection, name: Option<&str>) -> Result<Vec<StepModule>> {
    let rows = sqlx::query(
        "SELECT name, version, kind, sha1, sha256, size, uploaded_at FROM step_modules
         WHERE $1 IS NULL OR name = $1 ORDER BY name, uploaded_at DESC, id DESC",
    )
    .bind(name)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(StepModule {
                name: r.try_get("name")?,
                version: r.try_get("version")?,
                kind: r.try_get("kind")?,
                sha1: r.try_get("sha1")?,
                sha256: r.try_get("sha256")?,
                size: r.try_get("size")?,
                uploaded_ms: r.try_get("uploaded_at")?,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Builds, steps and logs

/// Starts a build of a claimed request: allocates the builder's next build number (the
/// `(builder_id, number)` unique key settles races between masters). Returns (id, number).
pub async fn insert_build(
    conn: &mut AnyConnection,
    request: BuildRequestId,
    worker: Option<WorkerId>,
    master: MasterId,
    cookie: &str,
    now: i64,
) -> Result<(BuildId, i64)> {
    let row = sqlx::query(
        "INSERT INTO builds (builder_id, number, request_id, worker_id, master_id, cookie,
                             started_at)
         SELECT r.builder_id,
                COALESCE((SELECT MAX(number) FROM builds WHERE builder_id = r.builder_id), 0) + 1,
                r.id, $2, $3, $4, $5
         FROM buildrequests r WHERE r.id = $1
         RETURNING id, number",
    )
    .bind(request.0)
    .bind(worker.map(|w| w.0))
    .bind(master.0)
    .bind(cookie)
    .bind(now)
    .fetch_one(conn)
    .await?;
    Ok((BuildId(row.try_get("id")?), row.try_get("number")?))
}

/// Finishes a build.
pub async fn finish_build(
    conn: &mut AnyConnection,
    build: BuildId,
    results: Results,
    state: &str,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE builds SET complete_at = $1, results = $2, state_string = $3
         WHERE id = $4 AND complete_at IS NULL",
    )
    .bind(now)
    .bind(i64::from(results.code()))
    .bind(state)
    .bind(build.0)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Sets build properties (with sources), replacing earlier values.
pub async fn set_build_properties(
    conn: &mut AnyConnection,
    build: BuildId,
    properties: &[SourcedProperty],
) -> Result<()> {
    if properties.is_empty() {
        return Ok(());
    }
    // One statement per 100 properties; a name given twice keeps its last value (one
    // statement may not update a row twice).
    let mut last: BTreeMap<&str, &SourcedProperty> = BTreeMap::new();
    for p in properties {
        last.insert(&p.name, p);
    }
    let unique: Vec<&SourcedProperty> = last.into_values().collect();
    for chunk in unique.chunks(100) {
        let mut sql =
            String::from("INSERT INTO build_properties (build_id, name, value, source) VALUES ");
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            let n = 2 + 3 * i;
            sql.push_str(&format!("($1, ${n}, ${}, ${})", n + 1, n + 2));
        }
        sql.push_str(
            " ON CONFLICT (build_id, name) DO UPDATE SET value = excluded.value, source = excluded.source",
        );
        let mut q = sqlx::query(&sql).bind(build.0);
        for p in chunk {
            q = q.bind(&p.name).bind(json_text(&p.value)).bind(&p.source);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// A build's properties.
pub async fn build_properties(
    conn: &mut AnyConnection,
    build: BuildId,
) -> Result<Vec<SourcedProperty>> {
    let rows = sqlx::query(
        "SELECT name, value, source FROM build_properties WHERE build_id = $1 ORDER BY name",
    )
    .bind(build.0)
    .fetch_all(conn)
    .await?;
    sourced_properties(&rows)
}

/// A step's row as it is first written: started, with its summary and progress so far, and
/// ended too when its end is known (a step that starts and ends in one batch of its worker's
/// messages is written once, whole).
#[derive(Debug, Clone)]
pub struct NewStep<'a> {
    /// Its build.
    pub build: BuildId,
    /// Its number within the build.
    pub number: i64,
    /// Its name.
    pub name: &'a str,
    /// When it started (ms).
    pub started_at: i64,
    /// Its summary so far (a running step's; an ended one's is its end's).
    pub state: &'a str,
    /// Its progress metrics so far, as JSON (a running step's; an ended one's are its end's).
    pub progress: Option<&'a Value>,
    /// How and when (ms) it ended, if it has.
    pub end: Option<(StepEnd<'a>, i64)>,
}

impl<'a> NewStep<'a> {
    /// A step that has just started.
    pub fn started(build: BuildId, number: i64, name: &'a str, at: i64) -> NewStep<'a> {
        NewStep {
            build,
            number,
            name,
            started_at: at,
            state: "",
            progress: None,
            end: None,
        }
    }
}

/// Adds a step to a build. Returns its id.
pub async fn insert_step(conn: &mut AnyConnection, step: &NewStep<'_>) -> Result<i64> {
    let empty = Value::Object(Default::default());
    let end = step.end.as_ref().map(|(e, _)| e);
    let r = end.and_then(|e| e.resources);
    sqlx::query_scalar(
        "INSERT INTO steps (build_id, number, name, started_at, complete_at, results,
                            state_string, hidden, urls, statistics, cpu_ms, peak_rss_bytes,
                            guest_memory_bytes, observer_memory_bytes, progress)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
         RETURNING id",
    )
    .bind(step.build.0)
    .bind(step.number)
    .bind(step.name)
    .bind(step.started_at)
    .bind(step.end.as_ref().map(|(_, at)| *at))
    .bind(end.map(|e| i64::from(e.results.code())))
    .bind(end.map_or(step.state, |e| e.state))
    .bind(end.map_or(0, |e| flag(e.hidden)))
    .bind(end.map_or_else(|| "[]".into(), |e| json_text(e.urls)))
    .bind(end.map_or_else(|| "{}".into(), |e| json_text(e.statistics)))
    .bind(r.map(|r| figure(r.cpu_ms)))
    .bind(r.and_then(|r| r.peak_rss_bytes).map(figure))
    .bind(r.map(|r| figure(r.guest_memory_bytes)))
    .bind(r.and_then(|r| r.observer_memory_bytes).map(figure))
    .bind(json_text(
        end.map(|e| e.progress).or(step.progress).unwrap_or(&empty),
    ))
    .fetch_one(conn)
    .await
}

/// A measured figure as the database stores it.
fn figure(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Adds a log to a step with its first text (whole lines; may be empty), complete or not.
/// Returns its id.
pub async fn insert_log(
    conn: &mut AnyConnection,
    step: i64,
    name: &str,
    kind: &str,
    text: &str,
    complete: bool,
) -> Result<i64> {
    let slug: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let lines = text.lines().count() as i64;
    let id = sqlx::query_scalar(
        "INSERT INTO logs (step_id, name, slug, kind, num_lines, num_bytes, complete)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
    )
    .bind(step)
    .bind(name)
    .bind(slug)
    .bind(kind)
    .bind(lines)
    .bind(text.len() as i64)
    .bind(flag(complete))
    .fetch_one(&mut *conn)
    .await?;
    insert_chunk(conn, id, 0, lines, text).await?;
    Ok(id)
}

/// Chunks bigger than this are stored deflated: small ones would not shrink enough to pay for
/// decompression on every read.
const COMPRESS_ABOVE: usize = 256;

/// Appends whole lines to a log as one compressed chunk and returns the new line count.
pub async fn append_log(conn: &mut AnyConnection, log: i64, text: &str) -> Result<i64> {
    let lines = text.lines().count() as i64;
    if lines == 0 {
        return sqlx::query_scalar("SELECT num_lines FROM logs WHERE id = $1")
            .bind(log)
            .fetch_one(conn)
            .await;
    }
    let first: i64 = sqlx::query_scalar(
        "UPDATE logs SET num_lines = num_lines + $1, num_bytes = num_bytes + $2 WHERE id = $3
         RETURNING num_lines - $1",
    )
    .bind(lines)
    .bind(text.len() as i64)
    .bind(log)
    .fetch_one(&mut *conn)
    .await?;
    insert_chunk(conn, log, first, lines, text).await?;
    Ok(first + lines)
}

/// Stores `lines` whole lines of a log from line `first` as one chunk (none for no lines).
async fn insert_chunk(
    conn: &mut AnyConnection,
    log: i64,
    first: i64,
    lines: i64,
    text: &str,
) -> Result<()> {
    use std::io::Write;
    if lines == 0 {
        return Ok(());
    }
    let (compressed, content) = if text.len() > COMPRESS_ABOVE {
        let mut enc = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(text.len() / 4),
            flate2::Compression::fast(),
        );
        enc.write_all(text.as_bytes())
            .and_then(|_| enc.finish())
            .map(|body| (1i64, body))
            .map_err(|e| sqlx::Error::Encode(Box::new(e)))?
    } else {
        (0, text.as_bytes().to_vec())
    };
    sqlx::query(
        "INSERT INTO logchunks (log_id, first_line, last_line, compressed, content)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(log)
    .bind(first)
    .bind(first + lines - 1)
    .bind(compressed)
    .bind(content)
    .execute(conn)
    .await?;
    Ok(())
}

/// Lines `first..=last` of a log (0-based).
pub async fn log_lines(
    conn: &mut AnyConnection,
    log: i64,
    first: i64,
    last: i64,
) -> Result<Vec<String>> {
    use std::io::Read;
    let rows = sqlx::query(
        "SELECT first_line, compressed, content FROM logchunks
         WHERE log_id = $1 AND last_line >= $2 AND first_line <= $3 ORDER BY first_line",
    )
    .bind(log)
    .bind(first)
    .bind(last)
    .fetch_all(conn)
    .await?;
    let mut out = Vec::new();
    for r in &rows {
        let start: i64 = r.try_get("first_line")?;
        let content: Vec<u8> = r.try_get("content")?;
        let text = if r.try_get::<i64, _>("compressed")? == 1 {
            let mut s = String::new();
            flate2::read::DeflateDecoder::new(&content[..])
                .read_to_string(&mut s)
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            s
        } else {
            String::from_utf8_lossy(&content).into_owned()
        };
        for (i, line) in text.lines().enumerate() {
            let n = start + i as i64;
            if (first..=last).contains(&n) {
                out.push(line.to_owned());
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Workers and running builds

/// A worker's id by name (configured workers have rows).
pub async fn worker_id(conn: &mut AnyConnection, name: &str) -> Result<Option<WorkerId>> {
    let id: Option<i64> = sqlx::query_scalar("SELECT id FROM workers WHERE name = $1")
        .bind(name)
        .fetch_optional(conn)
        .await?;
    Ok(id.map(WorkerId))
}

/// Records a worker's connection state (`connected`, `offline`), what it advertised, and
/// which master it is connected to.
pub async fn set_worker_state(
    conn: &mut AnyConnection,
    name: &str,
    state: &str,
    master: Option<MasterId>,
    now: i64,
) -> Result<()> {
    sqlx::query("UPDATE workers SET state = $1, master_id = $2, last_seen = $3 WHERE name = $4")
        .bind(state)
        .bind(master.map(|m| m.0))
        .bind(now)
        .bind(name)
        .execute(conn)
        .await?;
    Ok(())
}

/// A worker's health as dispatch sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerHealth {
    /// `ok` or `failed`.
    pub health: String,
    /// Failures in a row.
    pub failure_count: i64,
    /// No builds before this time (ms), if quarantined.
    pub quarantine_until: Option<i64>,
    /// Why, for people.
    pub notes: String,
    /// Paused by an administrator.
    pub paused: bool,
}

/// Every worker's health, by name.
pub async fn worker_health(conn: &mut AnyConnection) -> Result<BTreeMap<String, WorkerHealth>> {
    let rows = sqlx::query(
        "SELECT name, health, failure_count, quarantine_until, notes, paused FROM workers",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("name")?,
                WorkerHealth {
                    health: r.try_get("health")?,
                    failure_count: r.try_get("failure_count")?,
                    quarantine_until: r.try_get("quarantine_until")?,
                    notes: r.try_get("notes")?,
                    paused: r.try_get::<i64, _>("paused")? != 0,
                },
            ))
        })
        .collect()
}

/// Records how a worker did. `failure: Some(note)` counts a failure in a row and, from
/// `threshold` failures on, quarantines the worker until `quarantine(failures)` ms from now;
/// `None` (a build it ran properly) makes it healthy again. Returns its new health.
pub async fn record_worker_outcome(
    conn: &mut AnyConnection,
    name: &str,
    failure: Option<&str>,
    threshold: i64,
    quarantine: impl Fn(i64) -> i64,
    now: i64,
) -> Result<Option<WorkerHealth>> {
    let Some(mut h) = worker_health_of(&mut *conn, name).await? else {
        return Ok(None);
    };
    match failure {
        None => {
            if h.failure_count == 0 && h.health == "ok" {
                return Ok(Some(h));
            }
            h.failure_count = 0;
            h.health = "ok".into();
            h.quarantine_until = None;
            h.notes = String::new();
        }
        Some(note) => {
            h.failure_count += 1;
            h.notes = note.to_owned();
            if h.failure_count >= threshold {
                h.health = "failed".into();
                h.quarantine_until = Some(now + quarantine(h.failure_count));
            }
        }
    }
    sqlx::query(
        "UPDATE workers SET health = $1, failure_count = $2, quarantine_until = $3, notes = $4
         WHERE name = $5",
    )
    .bind(&h.health)
    .bind(h.failure_count)
    .bind(h.quarantine_until)
    .bind(&h.notes)
    .bind(name)
    .execute(conn)
    .await?;
    Ok(Some(h))
}

async fn worker_health_of(conn: &mut AnyConnection, name: &str) -> Result<Option<WorkerHealth>> {
    Ok(worker_health(conn).await?.remove(name))
}

/// How a build ended, when the messages that [`advance_build`] records end it.
#[derive(Debug, Clone, Copy)]
pub struct BuildEnd<'a> {
    /// Its result.
    pub results: Results,
    /// Its final one line of state.
    pub state: &'a str,
    /// When (ms).
    pub at: i64,
}

/// Records that a build's messages `from..=to` are applied: true if the build is still
/// running on `worker` under `cookie` and `from` is its next number (the caller then applies
/// them in the same transaction); false refuses them. With `end`, the same statement ends the
/// build (a batch that ends a build writes its row once).
#[allow(clippy::too_many_arguments)]
pub async fn advance_build(
    conn: &mut AnyConnection,
    build: BuildId,
    cookie: &str,
    worker: WorkerId,
    from: i64,
    to: i64,
    end: Option<BuildEnd<'_>>,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE builds SET last_seq = $1, complete_at = COALESCE($6, complete_at),
                results = COALESCE($7, results), state_string = COALESCE($8, state_string)
         WHERE id = $2 AND cookie = $3 AND worker_id = $4 AND complete_at IS NULL
           AND last_seq = $5 - 1",
    )
    .bind(to)
    .bind(build.0)
    .bind(cookie)
    .bind(worker.0)
    .bind(from)
    .bind(end.map(|e| e.at))
    .bind(end.map(|e| i64::from(e.results.code())))
    .bind(end.map(|e| e.state))
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A running build as the master recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningBuild {
    /// The build.
    pub id: BuildId,
    /// Its cookie.
    pub cookie: String,
    /// Its request.
    pub request: BuildRequestId,
    /// Its builder.
    pub builder: String,
    /// Its worker's name.
    pub worker: Option<String>,
    /// The master that dispatched it.
    pub master: MasterId,
    /// The last message applied.
    pub last_seq: i64,
    /// When it started (ms).
    pub started_at: i64,
}

/// Running builds dispatched by `master` or by masters that are no longer active (`None`:
/// all running builds); `build` narrows to one.
pub async fn running_builds(
    conn: &mut AnyConnection,
    master: Option<MasterId>,
    build: Option<BuildId>,
) -> Result<Vec<RunningBuild>> {
    let rows = sqlx::query(
        "SELECT b.id, b.cookie, b.request_id, bl.name AS builder, w.name AS worker, b.master_id,
                b.last_seq, b.started_at
         FROM builds b
         JOIN builders bl ON bl.id = b.builder_id
         LEFT JOIN workers w ON w.id = b.worker_id
         JOIN masters m ON m.id = b.master_id
         WHERE b.complete_at IS NULL AND ($1 < 0 OR b.master_id = $1 OR m.active = 0)
           AND ($2 < 0 OR b.id = $2)
         ORDER BY b.id",
    )
    .bind(master.map_or(-1, |m| m.0))
    .bind(build.map_or(-1, |b| b.0))
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(RunningBuild {
                id: BuildId(r.try_get("id")?),
                cookie: r.try_get("cookie")?,
                request: BuildRequestId(r.try_get("request_id")?),
                builder: r.try_get("builder")?,
                worker: r.try_get("worker")?,
                master: MasterId(r.try_get("master_id")?),
                last_seq: r.try_get("last_seq")?,
                started_at: r.try_get("started_at")?,
            })
        })
        .collect()
}

/// Moves a running build (and its request's claim) to `master`: a worker reconnected to it.
pub async fn adopt_build(
    conn: &mut AnyConnection,
    build: BuildId,
    request: BuildRequestId,
    master: MasterId,
) -> Result<()> {
    sqlx::query("UPDATE builds SET master_id = $1 WHERE id = $2")
        .bind(master.0)
        .bind(build.0)
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE buildrequest_claims SET master_id = $1 WHERE request_id = $2")
        .bind(master.0)
        .bind(request.0)
        .execute(conn)
        .await?;
    Ok(())
}

/// A step's id by its build and number.
pub async fn step_id(conn: &mut AnyConnection, build: BuildId, number: i64) -> Result<Option<i64>> {
    sqlx::query_scalar("SELECT id FROM steps WHERE build_id = $1 AND number = $2")
        .bind(build.0)
        .bind(number)
        .fetch_optional(conn)
        .await
}

/// A log's id by its step and name.
pub async fn log_id(conn: &mut AnyConnection, step: i64, name: &str) -> Result<Option<i64>> {
    sqlx::query_scalar("SELECT id FROM logs WHERE step_id = $1 AND name = $2")
        .bind(step)
        .bind(name)
        .fetch_optional(conn)
        .await
}

/// Sets a running step's one-line state (its summary so far).
pub async fn set_step_state(conn: &mut AnyConnection, step: i64, state: &str) -> Result<()> {
    sqlx::query("UPDATE steps SET state_string = $1 WHERE id = $2")
        .bind(state)
        .bind(step)
        .execute(conn)
        .await?;
    Ok(())
}

/// Sets a running step's progress metrics (all of them, as JSON).
pub async fn set_step_progress(
    conn: &mut AnyConnection,
    step: i64,
    progress: &Value,
) -> Result<()> {
    sqlx::query("UPDATE steps SET progress = $1 WHERE id = $2")
        .bind(json_text(progress))
        .bind(step)
        .execute(conn)
        .await?;
    Ok(())
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq)]
pub struct StepEnd<'a> {
    /// Its result.
    pub results: Results,
    /// Its summary (or why it did not run).
    pub state: &'a str,
    /// Hidden in the UI.
    pub hidden: bool,
    /// Links, as JSON.
    pub urls: &'a Value,
    /// Statistics, as JSON.
    pub statistics: &'a Value,
    /// Progress metrics at their last value, as JSON.
    pub progress: &'a Value,
    /// What it used, as its worker measured it (`None`: it did not run, or the worker did not
    /// say).
    pub resources: Option<kiln_protocol::StepResources>,
}

/// Finishes a step and completes its logs.
pub async fn finish_step(
    conn: &mut AnyConnection,
    step: i64,
    end: &StepEnd<'_>,
    now: i64,
) -> Result<()> {
    let r = end.resources;
    sqlx::query(
        "UPDATE steps SET complete_at = $1, results = $2, state_string = $3, hidden = $4,
                urls = $5, statistics = $6, cpu_ms = $8, peak_rss_bytes = $9,
                guest_memory_bytes = $10, observer_memory_bytes = $11, progress = $12
         WHERE id = $7",
    )
    .bind(now)
    .bind(i64::from(end.results.code()))
    .bind(end.state)
    .bind(i64::from(end.hidden))
    .bind(json_text(end.urls))
    .bind(json_text(end.statistics))
    .bind(step)
    .bind(r.map(|r| figure(r.cpu_ms)))
    .bind(r.and_then(|r| r.peak_rss_bytes).map(figure))
    .bind(r.map(|r| figure(r.guest_memory_bytes)))
    .bind(r.and_then(|r| r.observer_memory_bytes).map(figure))
    .bind(json_text(end.progress))
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE logs SET complete = 1 WHERE step_id = $1")
        .bind(step)
        .execute(conn)
        .await?;
    Ok(())
}

/// A build as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildRow {
    /// Id.
    pub id: BuildId,
    /// Builder name.
    pub builder: String,
    /// Number within the builder.
    pub number: i64,
    /// Its request.
    pub request: BuildRequestId,
    /// Worker name.
    pub worker: Option<String>,
    /// Started (ms).
    pub started_at: i64,
    /// Finished (ms).
    pub complete_at: Option<i64>,
    /// One line of state.
    pub state: String,
    /// Result, when finished.
    pub results: Option<Results>,
}

const BUILD_SELECT: &str = "SELECT b.id, bl.name AS builder, b.number, b.request_id,
        w.name AS worker, b.started_at, b.complete_at, b.state_string, b.results
     FROM builds b
     JOIN builders bl ON bl.id = b.builder_id
     LEFT JOIN workers w ON w.id = b.worker_id";

fn build_from_row(r: &AnyRow) -> Result<BuildRow> {
    Ok(BuildRow {
        id: BuildId(r.try_get("id")?),
        builder: r.try_get("builder")?,
        number: r.try_get("number")?,
        request: BuildRequestId(r.try_get("request_id")?),
        worker: r.try_get("worker")?,
        started_at: r.try_get("started_at")?,
        complete_at: r.try_get("complete_at")?,
        state: r.try_get("state_string")?,
        results: r
            .try_get::<Option<i64>, _>("results")?
            .and_then(results_from_code),
    })
}

/// Builds, newest first, optionally of one request.
pub async fn builds(
    conn: &mut AnyConnection,
    request: Option<BuildRequestId>,
    limit: i64,
) -> Result<Vec<BuildRow>> {
    let rows = sqlx::query(&format!(
        "{BUILD_SELECT} WHERE ($1 < 0 OR b.request_id = $1) ORDER BY b.id DESC LIMIT $2"
    ))
    .bind(request.map_or(-1, |r| r.0))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter().map(build_from_row).collect()
}

/// One build.
pub async fn get_build(conn: &mut AnyConnection, id: BuildId) -> Result<Option<BuildRow>> {
    let row = sqlx::query(&format!("{BUILD_SELECT} WHERE b.id = $1"))
        .bind(id.0)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(build_from_row).transpose()
}

/// A build's steps: (id, number, name, results, state).
pub async fn build_steps(
    conn: &mut AnyConnection,
    build: BuildId,
) -> Result<Vec<(i64, i64, String, Option<Results>, String)>> {
    let rows = sqlx::query(
        "SELECT id, number, name, results, state_string FROM steps WHERE build_id = $1
         ORDER BY number",
    )
    .bind(build.0)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("id")?,
                r.try_get("number")?,
                r.try_get("name")?,
                r.try_get::<Option<i64>, _>("results")?
                    .and_then(results_from_code),
                r.try_get("state_string")?,
            ))
        })
        .collect()
}

/// A step's logs: (id, name, number of lines).
pub async fn step_logs(conn: &mut AnyConnection, step: i64) -> Result<Vec<(i64, String, i64)>> {
    let rows = sqlx::query("SELECT id, name, num_lines FROM logs WHERE step_id = $1 ORDER BY id")
        .bind(step)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("id")?,
                r.try_get("name")?,
                r.try_get("num_lines")?,
            ))
        })
        .collect()
}
