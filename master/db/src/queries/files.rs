//! Files and step modules: content stored by SHA-1, modules by name and version.

use super::*;

/// Stores content by SHA-1 (the caller verified the digests). Returns false if it was there.
pub async fn insert_file(
    conn: &mut AnyConnection,
    sha1: &str,
    sha256: &str,
    content: &[u8],
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO files (sha1, sha256, size, content, created_at) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (sha1) DO NOTHING",
    )
    .bind(sha1)
    .bind(sha256)
    .bind(content.len() as i64)
    .bind(content.to_vec())
    .bind(now)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A stored file: (sha256, content).
pub async fn get_file(conn: &mut AnyConnection, sha1: &str) -> Result<Option<(String, Vec<u8>)>> {
    let row = sqlx::query("SELECT sha256, content FROM files WHERE sha1 = $1")
        .bind(sha1)
        .fetch_optional(conn)
        .await?;
    row.map(|r| Ok((r.try_get("sha256")?, r.try_get("content")?)))
        .transpose()
}

/// A registered step module.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StepModule {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// "step", "observer" or "policy".
    pub kind: String,
    /// SHA-1 of the bytes (the file cache's name).
    pub sha1: String,
    /// SHA-256 of the bytes (what workers verify).
    pub sha256: String,
    /// Size in bytes.
    pub size: i64,
    /// When (ms).
    #[sqlx(rename = "uploaded_at")]
    pub uploaded_ms: i64,
}

/// Registers a module version. False if that name and version exist.
pub async fn insert_step_module(conn: &mut AnyConnection, m: &StepModule) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO step_modules (name, version, kind, sha1, sha256, size, uploaded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (name, version) DO NOTHING",
    )
    .bind(&m.name)
    .bind(&m.version)
    .bind(&m.kind)
    .bind(&m.sha1)
    .bind(&m.sha256)
    .bind(m.size)
    .bind(m.uploaded_ms)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Every version of a module, newest upload first (`name` None: every module).
pub async fn step_modules(conn: &mut AnyConnection, name: Option<&str>) -> Result<Vec<StepModule>> {
    sqlx::query_as(
        "SELECT name, version, kind, sha1, sha256, size, uploaded_at FROM step_modules
         WHERE $1 IS NULL OR name = $1 ORDER BY name, uploaded_at DESC, id DESC",
    )
    .bind(name)
    .fetch_all(conn)
    .await
}
