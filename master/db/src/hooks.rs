//! Queries of the webhook change sources: the deliveries they accepted, whose unique
//! `(source, delivery)` key decides whether a delivery is new or a redelivery.

use sqlx::AnyConnection;

use crate::model::{ChangeId, StoredJson};

type Result<T> = std::result::Result<T, sqlx::Error>;

/// One delivery of a webhook, as the forge named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookDelivery {
    /// The change source's name.
    pub source: String,
    /// The forge's delivery id.
    pub delivery: String,
    /// The forge's event name (`push`, `Merge Request Hook`, ...).
    pub event: String,
}

/// A delivery recorded earlier.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RecordedDelivery {
    /// When it was received (ms).
    #[sqlx(rename = "received_at")]
    pub received_ms: i64,
    /// The changes it recorded.
    #[sqlx(rename = "change_ids", try_from = "StoredJson")]
    pub changes: Vec<ChangeId>,
}

/// Records a delivery in the caller's transaction. `None` if the source already recorded a
/// delivery with this id: the unique key decides, so two masters receiving the same
/// redelivery at once record it once.
pub async fn insert_delivery(
    conn: &mut AnyConnection,
    d: &HookDelivery,
    now: i64,
) -> Result<Option<i64>> {
    sqlx::query_scalar(
        "INSERT INTO webhook_deliveries (source, delivery, event, received_at)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (source, delivery) DO NOTHING
         RETURNING id",
    )
    .bind(&d.source)
    .bind(&d.delivery)
    .bind(&d.event)
    .bind(now)
    .fetch_optional(conn)
    .await
}

/// Notes the changes a delivery recorded (in the transaction that recorded both).
pub async fn set_delivery_changes(
    conn: &mut AnyConnection,
    id: i64,
    changes: &[ChangeId],
) -> Result<()> {
    let ids = serde_json::to_string(changes).unwrap_or_else(|_| "[]".into());
    sqlx::query("UPDATE webhook_deliveries SET change_ids = $1 WHERE id = $2")
        .bind(ids)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// A delivery a source recorded, if it did.
pub async fn get_delivery(
    conn: &mut AnyConnection,
    source: &str,
    delivery: &str,
) -> Result<Option<RecordedDelivery>> {
    sqlx::query_as(
        "SELECT received_at, change_ids FROM webhook_deliveries
         WHERE source = $1 AND delivery = $2",
    )
    .bind(source)
    .bind(delivery)
    .fetch_optional(conn)
    .await
}

/// How many deliveries a source recorded (for tests and diagnostics).
pub async fn count_deliveries(conn: &mut AnyConnection, source: &str) -> Result<i64> {
    sqlx::query_scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE source = $1")
        .bind(source)
        .fetch_one(conn)
        .await
}
