//! Users and changes: the one way changes are stored, de-duplicated by source key.

use super::*;

/// The user with this identifier ("Name <email>"), created on first sight.
pub async fn ensure_user(conn: &mut AnyConnection, identifier: &str) -> Result<UserId> {
    let email = identifier
        .rsplit_once('<')
        .and_then(|(_, rest)| rest.strip_suffix('>'))
        .filter(|e| e.contains('@'))
        .map(str::to_owned);
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO users (identifier, email) VALUES ($1, $2)
         ON CONFLICT (identifier) DO UPDATE SET identifier = excluded.identifier
         RETURNING id",
    )
    .bind(identifier)
    .bind(email)
    .fetch_one(conn)
    .await?;
    Ok(UserId(id))
}

/// Stores a change with its files, properties and author. Returns `None` when a change with
/// the same `source_key` exists (a redelivery). The caller holds
/// [`super::Db::serialize_appends`].
pub async fn insert_change(
    conn: &mut AnyConnection,
    change: &NewChange,
    now: i64,
) -> Result<Option<ChangeId>> {
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO changes (author, committer, comments, branch, revision, revlink, when_at,
                              category, repository, codebase, project, source, source_key,
                              trusted, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
         ON CONFLICT (source_key) DO NOTHING
         RETURNING id",
    )
    .bind(&change.author)
    .bind(&change.committer)
    .bind(&change.comments)
    .bind(&change.branch)
    .bind(&change.revision)
    .bind(&change.revlink)
    .bind(change.when_ms.unwrap_or(now))
    .bind(&change.category)
    .bind(&change.repository)
    .bind(&change.codebase)
    .bind(&change.project)
    .bind(&change.source)
    .bind(&change.source_key)
    .bind(flag(change.trusted.unwrap_or(true)))
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(id) = id else { return Ok(None) };
    for file in &change.files {
        sqlx::query("INSERT INTO change_files (change_id, filename) VALUES ($1, $2)")
            .bind(id)
            .bind(file)
            .execute(&mut *conn)
            .await?;
    }
    for (name, value) in &change.properties {
        sqlx::query(
            "INSERT INTO change_properties (change_id, name, value, source)
             VALUES ($1, $2, $3, 'Change')",
        )
        .bind(id)
        .bind(name)
        .bind(json_text(value))
        .execute(&mut *conn)
        .await?;
    }
    let user = ensure_user(conn, &change.author).await?;
    sqlx::query("INSERT INTO change_users (change_id, user_id) VALUES ($1, $2)")
        .bind(id)
        .bind(user.0)
        .execute(&mut *conn)
        .await?;
    Ok(Some(ChangeId(id)))
}

const CHANGE_COLUMNS: &str = "id, author, committer, comments, branch, revision, revlink, \
    when_at, category, repository, codebase, project, source, trusted";

async fn change_from_row(conn: &mut AnyConnection, r: &AnyRow) -> Result<Change> {
    let id: i64 = r.try_get("id")?;
    let files: Vec<String> =
        sqlx::query_scalar("SELECT filename FROM change_files WHERE change_id = $1")
            .bind(id)
            .fetch_all(&mut *conn)
            .await?;
    let props = sqlx::query("SELECT name, value FROM change_properties WHERE change_id = $1")
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
    let mut properties = serde_json::Map::new();
    for p in &props {
        properties.insert(
            p.try_get("name")?,
            parse_json(&p.try_get::<String, _>("value")?, "value")?,
        );
    }
    Ok(Change {
        id: ChangeId(id),
        author: r.try_get("author")?,
        committer: r.try_get("committer")?,
        comments: r.try_get("comments")?,
        branch: r.try_get("branch")?,
        revision: r.try_get("revision")?,
        revlink: r.try_get("revlink")?,
        when_ms: r.try_get("when_at")?,
        category: r.try_get("category")?,
        repository: r.try_get("repository")?,
        codebase: r.try_get("codebase")?,
        project: r.try_get("project")?,
        files,
        properties,
        source: r.try_get("source")?,
        trusted: r.try_get::<i64, _>("trusted")? != 0,
    })
}

/// Changes with ids above `after`, oldest first, at most `limit`.
pub async fn changes_after(
    conn: &mut AnyConnection,
    after: ChangeId,
    limit: i64,
) -> Result<Vec<Change>> {
    let rows = sqlx::query(&format!(
        "SELECT {CHANGE_COLUMNS} FROM changes WHERE id > $1 ORDER BY id LIMIT $2"
    ))
    .bind(after.0)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let mut changes = Vec::with_capacity(rows.len());
    for r in &rows {
        changes.push(change_from_row(conn, r).await?);
    }
    Ok(changes)
}

/// One change.
pub async fn get_change(conn: &mut AnyConnection, id: ChangeId) -> Result<Option<Change>> {
    let row = sqlx::query(&format!(
        "SELECT {CHANGE_COLUMNS} FROM changes WHERE id = $1"
    ))
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) => Ok(Some(change_from_row(conn, &r).await?)),
        None => Ok(None),
    }
}

/// The highest change id (0 when there is none).
pub async fn last_change_id(conn: &mut AnyConnection) -> Result<ChangeId> {
    let id: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM changes")
        .fetch_one(conn)
        .await?;
    Ok(ChangeId(id.unwrap_or(0)))
}

/// The number of changes stored.
pub async fn count_changes(conn: &mut AnyConnection) -> Result<i64> {
    sqlx::query_scalar("SELECT COUNT(*) FROM changes")
        .fetch_one(conn)
        .await
}

/// The blamelist of a buildset: the distinct authors of its source stamps' changes.
pub async fn blamelist(conn: &mut AnyConnection, buildset: BuildsetId) -> Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT DISTINCT u.identifier FROM buildset_sourcestamps bs
         JOIN sourcestamp_changes sc ON sc.sourcestamp_id = bs.sourcestamp_id
         JOIN change_users cu ON cu.change_id = sc.change_id
         JOIN users u ON u.id = cu.user_id
         WHERE bs.buildset_id = $1
         ORDER BY u.identifier",
    )
    .bind(buildset.0)
    .fetch_all(conn)
    .await
}
