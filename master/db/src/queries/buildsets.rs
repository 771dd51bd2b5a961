//! Buildsets and build requests: submitting (with collapsing), queues, claims and completion.

use super::*;

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
            value: parse_json(&r.try_get::<String, _>("prop_value")?, "prop_value")?,
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
