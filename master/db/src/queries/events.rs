//! Events: the durable feed dependent schedulers and reporters follow.

use super::*;

/// Something that happened, for consumers that read the feed through a watermark.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Event {
    /// Position in the feed.
    pub id: i64,
    /// What happened: "buildset.complete", "buildset.first_failure", ...
    pub kind: String,
    /// The id of what it happened to.
    #[sqlx(rename = "subject_id")]
    pub subject: i64,
    /// Details.
    #[sqlx(try_from = "StoredJson")]
    pub payload: Value,
    /// When (ms).
    #[sqlx(rename = "created_at")]
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
    sqlx::query_as(
        "SELECT id, kind, subject_id, payload, created_at FROM events
         WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// The newest event's id (0 when there is none).
pub async fn last_event_id(conn: &mut AnyConnection) -> Result<i64> {
    let id: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM events")
        .fetch_one(conn)
        .await?;
    Ok(id.unwrap_or(0))
}
