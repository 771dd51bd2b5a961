//! Every query the master runs, as functions over a connection (a pooled connection or a
//! transaction: `&mut *tx`), one module per subject. Placeholders are `$N`, which both SQLite
//! and PostgreSQL accept.

mod builds;
mod buildsets;
mod changes;
mod events;
mod files;
mod masters;
mod schedulers;
mod workers;

pub use builds::*;
pub use buildsets::*;
pub use changes::*;
pub use events::*;
pub use files::*;
pub use masters::*;
pub use schedulers::*;
pub use workers::*;

use std::collections::BTreeMap;

use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::model::*;

type Result<T> = std::result::Result<T, sqlx::Error>;

fn json_text(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// A stored JSON value. Kiln writes these columns itself, so text that does not parse is
/// damage (or another program's write), and an error naming the column, never `null`.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(text: &str, column: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: format!("the stored JSON does not parse: {e}").into(),
    })
}

fn sourced_properties(rows: &[AnyRow]) -> Result<Vec<SourcedProperty>> {
    rows.iter()
        .map(|r| {
            Ok(SourcedProperty {
                name: r.try_get("name")?,
                value: parse_json(&r.try_get::<String, _>("value")?, "value")?,
                source: r.try_get("source")?,
            })
        })
        .collect()
}

fn flag(b: bool) -> i64 {
    i64::from(b)
}
