//! What git pollers remember between polls (migration 0007): for each poller, the repository
//! its heads came from, a generation advanced by every recorded poll, and the head of each
//! branch it follows. A poll records its heads and its changes in one transaction, and only if
//! the generation is still the one it read.

use std::collections::BTreeMap;

use sqlx::{AnyConnection, Row};

type Result<T> = std::result::Result<T, sqlx::Error>;

/// A poller's recorded state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollerState {
    /// The repository the heads came from (a changed `repourl` starts over).
    pub repourl: String,
    /// Advanced by every recorded poll.
    pub generation: i64,
    /// When the state was last recorded (ms).
    pub updated_ms: i64,
    /// Branch name to the revision its head was at.
    pub heads: BTreeMap<String, String>,
}

/// The state of poller `source`, if it has recorded one.
pub async fn poller_state(conn: &mut AnyConnection, source: &str) -> Result<Option<PollerState>> {
    let Some(row) =
        sqlx::query("SELECT repourl, generation, updated_at FROM poller_sources WHERE source = $1")
            .bind(source)
            .fetch_optional(&mut *conn)
            .await?
    else {
        return Ok(None);
    };
    let heads = sqlx::query("SELECT branch, revision FROM poller_heads WHERE source = $1")
        .bind(source)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("branch")?, r.try_get("revision")?)))
        .collect::<Result<BTreeMap<String, String>>>()?;
    Ok(Some(PollerState {
        repourl: row.try_get("repourl")?,
        generation: row.try_get("generation")?,
        updated_ms: row.try_get("updated_at")?,
        heads,
    }))
}

/// Records poller `source`'s heads, replacing what it had, if its generation is still
/// `read_generation` (`None`: it had no state). Returns false, changing nothing, when another
/// poll recorded first; the caller then rolls back its transaction.
pub async fn record_poller_heads(
    conn: &mut AnyConnection,
    source: &str,
    read_generation: Option<i64>,
    repourl: &str,
    heads: &BTreeMap<String, String>,
    now: i64,
) -> Result<bool> {
    let done = match read_generation {
        None => {
            sqlx::query(
                "INSERT INTO poller_sources (source, repourl, generation, updated_at)
                 VALUES ($1, $2, 1, $3) ON CONFLICT (source) DO NOTHING",
            )
            .bind(source)
            .bind(repourl)
            .bind(now)
            .execute(&mut *conn)
            .await?
        }
        Some(g) => {
            sqlx::query(
                "UPDATE poller_sources SET repourl = $1, generation = generation + 1,
                        updated_at = $2
                 WHERE source = $3 AND generation = $4",
            )
            .bind(repourl)
            .bind(now)
            .bind(source)
            .bind(g)
            .execute(&mut *conn)
            .await?
        }
    };
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    sqlx::query("DELETE FROM poller_heads WHERE source = $1")
        .bind(source)
        .execute(&mut *conn)
        .await?;
    for (branch, revision) in heads {
        sqlx::query("INSERT INTO poller_heads (source, branch, revision) VALUES ($1, $2, $3)")
            .bind(source)
            .bind(branch)
            .bind(revision)
            .execute(&mut *conn)
            .await?;
    }
    Ok(true)
}
