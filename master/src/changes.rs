//! The one way changes enter Kiln. Every change source (forge webhooks, pollers,
//! `kiln sendchange`) hands a [`NewChange`] to [`add_change`], which validates it and stores it
//! durably; schedulers then read it from the database, so a change that was accepted is never
//! lost, whichever master or process accepted it.

use kiln_db::model::{ChangeId, NewChange, now_ms};
use kiln_db::{self as db, Db};

/// Longest author, branch, revision, repository, project, category or link accepted.
pub const MAX_FIELD: usize = 1024;
/// Longest commit message accepted (longer ones are refused, not cut, so nothing is silently
/// lost).
pub const MAX_COMMENTS: usize = 1 << 20;
/// Most files one change may list.
pub const MAX_FILES: usize = 100_000;
/// Largest total size of a change's properties, as JSON.
pub const MAX_PROPERTIES: usize = 1 << 20;

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("change refused: {0}")]
pub struct ChangeError(pub String);

/// Checks a change before it is stored.
pub fn validate(change: &NewChange) -> Result<(), ChangeError> {
    let bad = |m: String| Err(ChangeError(m));
    if change.author.trim().is_empty() {
        return bad("it has no author; give who made it (\"Name <email>\")".into());
    }
    if change.source.trim().is_empty() {
        return bad("it names no change source".into());
    }
    let fields = [
        ("author", Some(&change.author)),
        ("committer", change.committer.as_ref()),
        ("branch", change.branch.as_ref()),
        ("revision", change.revision.as_ref()),
        ("revlink", change.revlink.as_ref()),
        ("category", change.category.as_ref()),
        ("repository", Some(&change.repository)),
        ("codebase", Some(&change.codebase)),
        ("project", Some(&change.project)),
        ("source", Some(&change.source)),
        ("source_key", change.source_key.as_ref()),
    ];
    for (name, value) in fields {
        if let Some(v) = value {
            if v.len() > MAX_FIELD {
                return bad(format!(
                    "{name} is {} bytes; the limit is {MAX_FIELD}",
                    v.len()
                ));
            }
            if v.contains('\0') {
                return bad(format!("{name} contains a NUL character"));
            }
        }
    }
    if change.comments.len() > MAX_COMMENTS {
        return bad(format!(
            "the comments are {} bytes; the limit is {MAX_COMMENTS}",
            change.comments.len()
        ));
    }
    if change.comments.contains('\0') {
        return bad("the comments contain a NUL character".into());
    }
    if change.files.len() > MAX_FILES {
        return bad(format!(
            "it lists {} files; the limit is {MAX_FILES}",
            change.files.len()
        ));
    }
    for f in &change.files {
        if f.is_empty() || f.len() > 4096 || f.contains('\0') {
            return bad(format!(
                "file name {:?} is empty, longer than 4096 bytes or contains NUL",
                f.chars().take(80).collect::<String>()
            ));
        }
    }
    let props = serde_json::to_string(&change.properties).unwrap_or_default();
    if props.len() > MAX_PROPERTIES {
        return bad(format!(
            "its properties are {} bytes of JSON; the limit is {MAX_PROPERTIES}",
            props.len()
        ));
    }
    for name in change.properties.keys() {
        kiln_protocol::props::check_property_name(name)
            .map_err(|e| ChangeError(format!("property {name:?}: {e}")))?;
    }
    if let Some(when) = change.when_ms
        && !(0..=253_402_300_799_000).contains(&when)
    {
        return bad(format!("its time {when} ms is not between 1970 and 9999"));
    }
    Ok(())
}

/// Validates and stores a change. `Ok(None)` means it was a redelivery (its `source_key` was
/// seen before) and nothing was stored.
pub async fn add_change(
    db: &Db,
    change: &NewChange,
) -> anyhow::Result<Result<Option<ChangeId>, ChangeError>> {
    if let Err(e) = validate(change) {
        return Ok(Err(e));
    }
    let mut tx = db.begin().await?;
    db.serialize_appends(&mut tx).await?;
    let id = db::insert_change(&mut tx, change, now_ms()).await?;
    tx.commit().await?;
    match id {
        Some(id) => {
            tracing::info!(change = %id, source = %change.source, branch = ?change.branch, "change added")
        }
        None => {
            tracing::debug!(source = %change.source, key = ?change.source_key, "change redelivered; dropped")
        }
    }
    Ok(Ok(id))
}

/// What became of a webhook delivery's changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Stored now, with these ids.
    Added(Vec<ChangeId>),
    /// The delivery was recorded before (a redelivery): nothing was stored again. The changes
    /// the first delivery recorded, and when it came.
    AlreadyReceived {
        /// The changes it recorded then.
        changes: Vec<ChangeId>,
        /// When (ms).
        received_ms: i64,
    },
}

/// Validates and stores the changes of one webhook delivery, and the delivery itself (when
/// the forge names it), in one transaction: the delivery's unique key decides whether it is
/// new, so a redelivery stores nothing, and a delivery is never recorded without its changes.
/// A change that fails validation refuses the whole delivery, which then stores nothing.
pub async fn add_delivery(
    db: &Db,
    delivery: Option<&db::HookDelivery>,
    changes: &[NewChange],
) -> anyhow::Result<Result<Delivered, ChangeError>> {
    for (i, change) in changes.iter().enumerate() {
        if let Err(e) = validate(change) {
            return Ok(Err(if changes.len() > 1 {
                ChangeError(format!("change {} of {}: {}", i + 1, changes.len(), e.0))
            } else {
                e
            }));
        }
    }
    let now = now_ms();
    let mut tx = db.begin().await?;
    db.serialize_appends(&mut tx).await?;
    let row = match delivery {
        Some(d) => match db::insert_delivery(&mut tx, d, now).await? {
            Some(row) => Some(row),
            None => {
                tx.rollback().await?;
                let mut conn = db.pool().acquire().await?;
                let seen = db::get_delivery(&mut conn, &d.source, &d.delivery).await?;
                return Ok(Ok(Delivered::AlreadyReceived {
                    changes: seen.as_ref().map(|s| s.changes.clone()).unwrap_or_default(),
                    received_ms: seen.map_or(now, |s| s.received_ms),
                }));
            }
        },
        None => None,
    };
    let mut ids = Vec::with_capacity(changes.len());
    for change in changes {
        // A change whose `source_key` was seen before is a redelivery of that one change.
        if let Some(id) = db::insert_change(&mut tx, change, now).await? {
            ids.push(id);
        }
    }
    if let Some(row) = row {
        db::set_delivery_changes(&mut tx, row, &ids).await?;
    }
    tx.commit().await?;
    Ok(Ok(Delivered::Added(ids)))
}
