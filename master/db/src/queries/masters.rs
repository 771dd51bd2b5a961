//! Masters: registration, heartbeats, and what a dead master held.

use super::*;

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
