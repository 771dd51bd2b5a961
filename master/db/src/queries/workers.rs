//! Builders and workers: the configured ones recorded, and the builds running on workers.

use super::*;

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

// Workers' state and health

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
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct WorkerHealth {
    /// `ok` or `failed`.
    pub health: String,
    /// Failures in a row.
    pub failure_count: i64,
    /// No builds before this time (ms), if quarantined.
    pub quarantine_until: Option<i64>,
    /// Why, for people.
    pub notes: String,
    /// Paused by an administrator (stored as 0 or 1).
    #[sqlx(try_from = "i64")]
    pub paused: Flag,
}

/// Every worker's health, by name.
pub async fn worker_health(conn: &mut AnyConnection) -> Result<BTreeMap<String, WorkerHealth>> {
    /// A worker's row: its name and health.
    #[derive(sqlx::FromRow)]
    struct Row {
        name: String,
        #[sqlx(flatten)]
        health: WorkerHealth,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT name, health, failure_count, quarantine_until, notes, paused FROM workers",
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.name, r.health)).collect())
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
