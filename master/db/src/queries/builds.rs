//! Builds, steps and logs: starting and advancing builds, steps, log chunks.

use super::*;

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
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RunningBuild {
    /// The build.
    pub id: BuildId,
    /// Its cookie.
    pub cookie: String,
    /// Its request.
    #[sqlx(rename = "request_id")]
    pub request: BuildRequestId,
    /// Its builder.
    pub builder: String,
    /// Its worker's name.
    pub worker: Option<String>,
    /// The master that dispatched it.
    #[sqlx(rename = "master_id")]
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
    sqlx::query_as(
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
    .await
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
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct BuildRow {
    /// Id.
    pub id: BuildId,
    /// Builder name.
    pub builder: String,
    /// Number within the builder.
    pub number: i64,
    /// Its request.
    #[sqlx(rename = "request_id")]
    pub request: BuildRequestId,
    /// Worker name.
    pub worker: Option<String>,
    /// Started (ms).
    pub started_at: i64,
    /// Finished (ms).
    pub complete_at: Option<i64>,
    /// One line of state.
    #[sqlx(rename = "state_string")]
    pub state: String,
    /// Result, when finished.
    #[sqlx(try_from = "ResultsCode")]
    pub results: Option<Results>,
}

const BUILD_SELECT: &str = "SELECT b.id, bl.name AS builder, b.number, b.request_id,
        w.name AS worker, b.started_at, b.complete_at, b.state_string, b.results
     FROM builds b
     JOIN builders bl ON bl.id = b.builder_id
     LEFT JOIN workers w ON w.id = b.worker_id";

/// Builds, newest first, optionally of one request.
pub async fn builds(
    conn: &mut AnyConnection,
    request: Option<BuildRequestId>,
    limit: i64,
) -> Result<Vec<BuildRow>> {
    sqlx::query_as(&format!(
        "{BUILD_SELECT} WHERE ($1 < 0 OR b.request_id = $1) ORDER BY b.id DESC LIMIT $2"
    ))
    .bind(request.map_or(-1, |r| r.0))
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// One build.
pub async fn get_build(conn: &mut AnyConnection, id: BuildId) -> Result<Option<BuildRow>> {
    sqlx::query_as(&format!("{BUILD_SELECT} WHERE b.id = $1"))
        .bind(id.0)
        .fetch_optional(conn)
        .await
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
