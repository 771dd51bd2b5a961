//! The reporters' delivery queue (migration 0009): one row per notification a reporter owes,
//! queued in the transaction of the event (or, for buildsets, by the reporter task as it follows
//! the `events` feed), claimed with a compare-and-set on `next_attempt_at`, and ended
//! `delivered`, `failed`, `skipped` or `superseded`.

use sqlx::{AnyConnection, Row};

use crate::model::Results;

type Result<T> = std::result::Result<T, sqlx::Error>;

/// A delivery waiting for its (next) attempt.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DueDelivery {
    /// Id, also sent to receivers that can use it (`X-Kiln-Delivery`).
    pub id: i64,
    /// The reporter's name.
    pub reporter: String,
    /// `build.started`, `build.finished`, `buildset.first_failure`, `buildset.complete`.
    pub event: String,
    /// The build or buildset.
    #[sqlx(rename = "subject_id")]
    pub subject: i64,
    /// Attempts made so far.
    pub attempts: i64,
    /// When it became due (ms); the claim compares against it.
    pub next_attempt_at: i64,
}

/// A delivery as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeliveryRow {
    /// Id.
    pub id: i64,
    /// The reporter's name.
    pub reporter: String,
    /// What happened.
    pub event: String,
    /// The build or buildset id.
    pub subject: i64,
    /// `pending`, `delivered`, `failed`, `skipped`, `superseded`.
    pub state: String,
    /// Attempts made.
    pub attempts: i64,
    /// When the next attempt is due (ms), while pending.
    pub next_attempt_at: Option<i64>,
    /// Why the last attempt failed (or why it was skipped).
    pub last_error: Option<String>,
    /// Queued (ms).
    pub created_at: i64,
    /// Ended (ms).
    pub finished_at: Option<i64>,
}

/// Queues a delivery of `event` about `subject` for `reporter`, due now.
pub async fn queue_delivery(
    conn: &mut AnyConnection,
    reporter: &str,
    event: &str,
    subject: i64,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO reporter_deliveries (reporter, event, subject_id, next_attempt_at, created_at)
         VALUES ($1, $2, $3, $4, $4)",
    )
    .bind(reporter)
    .bind(event)
    .bind(subject)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Pending deliveries due at `now`, oldest first.
pub async fn due_deliveries(
    conn: &mut AnyConnection,
    now: i64,
    limit: i64,
) -> Result<Vec<DueDelivery>> {
    sqlx::query_as(
        "SELECT id, reporter, event, subject_id, attempts, next_attempt_at FROM reporter_deliveries
         WHERE state = 'pending' AND next_attempt_at <= $1 ORDER BY id LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// When the next pending delivery is due, if any.
pub async fn next_due(conn: &mut AnyConnection) -> Result<Option<i64>> {
    sqlx::query_scalar(
        "SELECT MIN(next_attempt_at) FROM reporter_deliveries WHERE state = 'pending'",
    )
    .fetch_one(conn)
    .await
}

/// Claims a due delivery for one attempt: counts the attempt and pushes its due time to
/// `lease_until`, so a master that dies mid-attempt leaves it to be tried again then. False if
/// another master claimed it first.
pub async fn claim_delivery(
    conn: &mut AnyConnection,
    d: &DueDelivery,
    lease_until: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE reporter_deliveries SET attempts = attempts + 1, next_attempt_at = $1
         WHERE id = $2 AND state = 'pending' AND next_attempt_at = $3",
    )
    .bind(lease_until)
    .bind(d.id)
    .bind(d.next_attempt_at)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Ends a delivery: `delivered`, `failed`, `skipped` or `superseded`, with why.
pub async fn end_delivery(
    conn: &mut AnyConnection,
    id: i64,
    state: &str,
    error: Option<&str>,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE reporter_deliveries SET state = $1, last_error = $2, finished_at = $3
         WHERE id = $4",
    )
    .bind(state)
    .bind(error)
    .bind(now)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a failed attempt and when to try again.
pub async fn retry_delivery(
    conn: &mut AnyConnection,
    id: i64,
    error: &str,
    next_attempt_at: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE reporter_deliveries SET last_error = $1, next_attempt_at = $2
         WHERE id = $3 AND state = 'pending'",
    )
    .bind(error)
    .bind(next_attempt_at)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Ends as `superseded` the pending deliveries of `reporter` about `subject` queued before
/// `id` (a commit status still pending when the build's final one goes out).
pub async fn supersede_earlier(
    conn: &mut AnyConnection,
    reporter: &str,
    subject: i64,
    id: i64,
    now: i64,
) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE reporter_deliveries SET state = 'superseded', finished_at = $1
         WHERE reporter = $2 AND subject_id = $3 AND id < $4 AND state = 'pending'
           AND event LIKE 'build.%'",
    )
    .bind(now)
    .bind(reporter)
    .bind(subject)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Counts of deliveries by reporter and state.
pub async fn delivery_counts(conn: &mut AnyConnection) -> Result<Vec<(String, String, i64)>> {
    let rows = sqlx::query(
        "SELECT reporter, state, COUNT(*) AS n FROM reporter_deliveries GROUP BY reporter, state",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("reporter")?, r.try_get("state")?, r.try_get("n")?)))
        .collect()
}

/// The latest deliveries, newest first: of one reporter if given, in one state if given.
pub async fn recent_deliveries(
    conn: &mut AnyConnection,
    reporter: Option<&str>,
    state: Option<&str>,
    limit: i64,
) -> Result<Vec<DeliveryRow>> {
    // Only placeholders vary: PostgreSQL cannot type a parameter compared with NULL alone.
    let mut sql = String::from(
        "SELECT id, reporter, event, subject_id, state, attempts, next_attempt_at, last_error,
                created_at, finished_at
         FROM reporter_deliveries WHERE 1 = 1",
    );
    let mut n = 0;
    for (column, value) in [("reporter", reporter), ("state", state)] {
        if value.is_some() {
            n += 1;
            sql.push_str(&format!(" AND {column} = ${n}"));
        }
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", n + 1));
    let mut query = sqlx::query(&sql);
    for value in [reporter, state].into_iter().flatten() {
        query = query.bind(value);
    }
    let rows = query.bind(limit).fetch_all(conn).await?;
    rows.iter()
        .map(|r| {
            let state: String = r.try_get("state")?;
            let next: i64 = r.try_get("next_attempt_at")?;
            Ok(DeliveryRow {
                id: r.try_get("id")?,
                reporter: r.try_get("reporter")?,
                event: r.try_get("event")?,
                subject: r.try_get("subject_id")?,
                next_attempt_at: (state == "pending").then_some(next),
                state,
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                created_at: r.try_get("created_at")?,
                finished_at: r.try_get("finished_at")?,
            })
        })
        .collect()
}

/// The result of the builder's build before `build` that ended other than RETRY (which is
/// an attempt, not a verdict): `None` if it has none.
pub async fn previous_build_results(
    conn: &mut AnyConnection,
    build: i64,
) -> Result<Option<Results>> {
    let code: Option<i64> = sqlx::query_scalar(
        "SELECT p.results FROM builds b
         JOIN builds p ON p.builder_id = b.builder_id AND p.number < b.number
         WHERE b.id = $1 AND p.results IS NOT NULL AND p.results <> $2
         ORDER BY p.number DESC LIMIT 1",
    )
    .bind(build)
    .bind(i64::from(Results::Retry.code()))
    .fetch_optional(conn)
    .await?
    .flatten();
    Ok(code.and_then(crate::model::results_from_code))
}

/// How far the reporter task has read the `events` feed, if it has started.
pub async fn reporter_mark(conn: &mut AnyConnection, name: &str) -> Result<Option<i64>> {
    sqlx::query_scalar("SELECT event_id FROM reporter_marks WHERE name = $1")
        .bind(name)
        .fetch_optional(conn)
        .await
}

/// Starts the mark at the end of the feed (what happened before reporters ran is not
/// reported), unless a master did already.
pub async fn start_reporter_mark(conn: &mut AnyConnection, name: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO reporter_marks (name, event_id)
         SELECT $1, COALESCE(MAX(id), 0) FROM events WHERE 1 = 1
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves the mark from `from` to `to`. False if another master moved it first.
pub async fn advance_reporter_mark(
    conn: &mut AnyConnection,
    name: &str,
    from: i64,
    to: i64,
) -> Result<bool> {
    let done =
        sqlx::query("UPDATE reporter_marks SET event_id = $1 WHERE name = $2 AND event_id = $3")
            .bind(to)
            .bind(name)
            .bind(from)
            .execute(conn)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// The builder names of a buildset's requests.
pub async fn buildset_builders(conn: &mut AnyConnection, buildset: i64) -> Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT DISTINCT bl.name FROM buildrequests r JOIN builders bl ON bl.id = r.builder_id
         WHERE r.buildset_id = $1",
    )
    .bind(buildset)
    .fetch_all(conn)
    .await
}
