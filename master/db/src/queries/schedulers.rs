//! Schedulers: claims, durable state, held changes and timers.

use super::*;

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
    text.map(|t| parse_json(&t, "value")).transpose()
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
            out.push((
                name,
                parse_json(&r.try_get::<String, _>("value")?, "value")?,
            ));
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
