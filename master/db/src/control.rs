//! Queries behind the API's actions and its tokens: what a person does to the farm, as
//! opposed to what the farm does by itself (in `queries`).

use sqlx::{AnyConnection, Row};

use crate::model::*;

type Result<T> = std::result::Result<T, sqlx::Error>;

/// A stored API token (its secret is not kept).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenRow {
    /// Its name.
    pub name: String,
    /// Its role's name.
    pub role: String,
    /// When it was made (ms).
    #[sqlx(rename = "created_at")]
    pub created_ms: i64,
}

/// Stores a token's hash under a name. False if the name is taken.
pub async fn insert_token(
    conn: &mut AnyConnection,
    name: &str,
    role: &str,
    sha256: &str,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO api_tokens (name, role, sha256, created_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(role)
    .bind(sha256)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The (name, role) of the token with this hash.
pub async fn token_by_hash(
    conn: &mut AnyConnection,
    sha256: &str,
) -> Result<Option<(String, String)>> {
    let row = sqlx::query("SELECT name, role FROM api_tokens WHERE sha256 = $1")
        .bind(sha256)
        .fetch_optional(conn)
        .await?;
    row.map(|r| Ok((r.try_get("name")?, r.try_get("role")?)))
        .transpose()
}

/// Every token, by name.
pub async fn tokens(conn: &mut AnyConnection) -> Result<Vec<TokenRow>> {
    sqlx::query_as("SELECT name, role, created_at FROM api_tokens ORDER BY name")
        .fetch_all(conn)
        .await
}

/// Deletes a token. False if there was none of that name.
pub async fn delete_token(conn: &mut AnyConnection, name: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM api_tokens WHERE name = $1")
        .bind(name)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Sets a pending request's priority. False if it is complete or claimed (started).
pub async fn set_request_priority(
    conn: &mut AnyConnection,
    request: BuildRequestId,
    priority: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE buildrequests SET priority = $1
         WHERE id = $2 AND complete = 0
           AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = $2)",
    )
    .bind(priority)
    .bind(request.0)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Deletes a module version, and its file if no other module version has the same bytes.
/// False if there was no such version.
pub async fn delete_step_module(
    conn: &mut AnyConnection,
    name: &str,
    version: &str,
) -> Result<bool> {
    let sha1: Option<String> = sqlx::query_scalar(
        "DELETE FROM step_modules WHERE name = $1 AND version = $2 RETURNING sha1",
    )
    .bind(name)
    .bind(version)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(sha1) = sha1 else { return Ok(false) };
    sqlx::query(
        "DELETE FROM files WHERE sha1 = $1
           AND NOT EXISTS (SELECT 1 FROM step_modules WHERE sha1 = $1)",
    )
    .bind(sha1)
    .execute(conn)
    .await?;
    Ok(true)
}

/// Pauses or unpauses a worker (a paused worker gets no new builds). False if unknown.
pub async fn set_worker_paused(conn: &mut AnyConnection, name: &str, paused: bool) -> Result<bool> {
    let done = sqlx::query("UPDATE workers SET paused = $1 WHERE name = $2")
        .bind(i64::from(paused))
        .bind(name)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// The files of changes, by change, for a page of changes.
pub async fn change_files(conn: &mut AnyConnection, changes: &[i64]) -> Result<Vec<(i64, String)>> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let list = changes
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let rows = sqlx::query(&format!(
        "SELECT change_id, filename FROM change_files WHERE change_id IN ({list})
         ORDER BY change_id, filename"
    ))
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("change_id")?, r.try_get("filename")?)))
        .collect()
}

/// The ids of the changes a buildset's source stamps include.
pub async fn buildset_change_ids(conn: &mut AnyConnection, buildset: i64) -> Result<Vec<i64>> {
    sqlx::query_scalar(
        "SELECT sc.change_id FROM buildset_sourcestamps bs
         JOIN sourcestamp_changes sc ON sc.sourcestamp_id = bs.sourcestamp_id
         WHERE bs.buildset_id = $1 ORDER BY sc.change_id",
    )
    .bind(buildset)
    .fetch_all(conn)
    .await
}

/// The ids of a buildset's source stamps.
pub async fn buildset_sourcestamp_ids(conn: &mut AnyConnection, buildset: i64) -> Result<Vec<i64>> {
    sqlx::query_scalar(
        "SELECT sourcestamp_id FROM buildset_sourcestamps WHERE buildset_id = $1
         ORDER BY sourcestamp_id",
    )
    .bind(buildset)
    .fetch_all(conn)
    .await
}

/// Mean duration (ms) of a builder's last `n` finished builds that did not end in
/// EXCEPTION, RETRY or CANCELLED: what estimates of start and finish times go by. Reads those
/// builds only, newest first along the builder's (builder, number) index.
pub async fn typical_duration(
    conn: &mut AnyConnection,
    builder_id: i64,
    n: i64,
) -> Result<Option<i64>> {
    sqlx::query_scalar(
        "SELECT CAST(AVG(took) AS BIGINT) FROM
           (SELECT complete_at - started_at AS took FROM builds
            WHERE builder_id = $1 AND complete_at IS NOT NULL AND results IN (0, 1, 2)
            ORDER BY number DESC LIMIT $2) recent",
    )
    .bind(builder_id)
    .bind(n)
    .fetch_one(conn)
    .await
}

/// One step's timing and progress: of a running build, or of the build a builder's running
/// builds are measured against.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StepTiming {
    /// The build it belongs to.
    #[sqlx(rename = "build_id")]
    pub build: i64,
    /// Its number in the build.
    pub number: i64,
    /// Its name.
    pub name: String,
    /// When it started (ms), if it has.
    pub started_at: Option<i64>,
    /// When it ended (ms), if it has.
    pub complete_at: Option<i64>,
    /// Its progress metrics, at their last value (written only by the master, from a map of
    /// counters).
    #[sqlx(try_from = "StoredJson")]
    pub progress: std::collections::BTreeMap<String, u64>,
}

/// The steps of a builder's most recent build that ended SUCCESS or WARNINGS: what its
/// running builds are expected to do (Buildbot's expectations). Empty when it has none.
pub async fn expected_steps(conn: &mut AnyConnection, builder_id: i64) -> Result<Vec<StepTiming>> {
    sqlx::query_as(
        "SELECT build_id, number, name, started_at, complete_at, progress FROM steps
         WHERE build_id = (SELECT id FROM builds
                           WHERE builder_id = $1 AND complete_at IS NOT NULL
                             AND results IN (0, 1)
                           ORDER BY number DESC LIMIT 1)
         ORDER BY number",
    )
    .bind(builder_id)
    .fetch_all(conn)
    .await
}

/// The steps of a builder's running builds, by build and number.
pub async fn running_steps(conn: &mut AnyConnection, builder_id: i64) -> Result<Vec<StepTiming>> {
    sqlx::query_as(
        "SELECT s.build_id, s.number, s.name, s.started_at, s.complete_at, s.progress
         FROM steps s JOIN builds b ON b.id = s.build_id
         WHERE b.builder_id = $1 AND b.complete_at IS NULL
         ORDER BY s.build_id, s.number",
    )
    .bind(builder_id)
    .fetch_all(conn)
    .await
}

/// A builder's running builds: (id, started at ms), by the index of incomplete builds.
pub async fn running_builds_of(
    conn: &mut AnyConnection,
    builder_id: i64,
) -> Result<Vec<(i64, i64)>> {
    sqlx::query_as(
        "SELECT id, started_at FROM builds WHERE complete_at IS NULL AND builder_id = $1
         ORDER BY id",
    )
    .bind(builder_id)
    .fetch_all(conn)
    .await
}

/// A builder's unclaimed pending requests in the order they will start (ids), along the
/// builder's start-order index.
pub async fn pending_in_start_order(conn: &mut AnyConnection, builder_id: i64) -> Result<Vec<i64>> {
    sqlx::query_scalar(
        "SELECT r.id FROM buildrequests r
         WHERE r.builder_id = $1 AND r.complete = 0
           AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
         ORDER BY r.priority DESC, r.submitted_at, r.id",
    )
    .bind(builder_id)
    .fetch_all(conn)
    .await
}
