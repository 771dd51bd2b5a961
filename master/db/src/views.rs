//! The API's read models: each collection is one `SELECT` with named, typed columns, which
//! [`Listing`] filters, orders and pages in SQL (never in memory), so a page of the web UI is one
//! query however many builds the database holds.
//!
//! A query string speaks Buildbot's dialect: `field=value` (repeated: any of them),
//! `field__ne`, `__lt`, `__le`, `__gt`, `__ge`, `__contains` (case-insensitive), the value
//! `null` for a missing value, `order=field` / `order=-field` (repeatable), `limit` and
//! `offset`. Unknown fields are refused by name, with the list of fields the collection has.

use serde_json::{Map, Value};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

/// A column's type, which decides how values are parsed, compared and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An integer (ids, times in ms, results).
    Int,
    /// Text.
    Text,
    /// A 0/1 flag, shown as a JSON boolean.
    Bool,
    /// JSON stored as text, shown parsed; filterable with `__contains` only.
    Json,
    /// A result, stored as Buildbot's code (0 SUCCESS to 6 CANCELLED), shown by name;
    /// filters take either (`results=FAILURE`, `results__lt=2`).
    Results,
}

/// A collection of the API.
#[derive(Debug)]
pub struct View {
    /// Its name in answers (`builds`).
    pub name: &'static str,
    /// The `SELECT` whose columns are the fields.
    pub sql: &'static str,
    /// The fields, in the order answers show them.
    pub columns: &'static [(&'static str, Kind)],
    /// The field that identifies one item (`buildid`).
    pub key: &'static str,
    /// The order when none is asked for: a field, `-` in front for descending.
    pub default_order: &'static str,
}

impl View {
    fn kind(&self, field: &str) -> Option<Kind> {
        self.columns
            .iter()
            .find(|(name, _)| *name == field)
            .map(|(_, k)| *k)
    }

    fn fields(&self) -> String {
        self.columns
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A comparison a filter makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Contains,
}

impl Op {
    fn parse(suffix: &str) -> Option<Op> {
        Some(match suffix {
            "eq" => Op::Eq,
            "ne" => Op::Ne,
            "lt" => Op::Lt,
            "le" => Op::Le,
            "gt" => Op::Gt,
            "ge" => Op::Ge,
            "contains" => Op::Contains,
            _ => return None,
        })
    }

    fn sql(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "<>",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Contains => "LIKE",
        }
    }
}

/// A bound value.
#[derive(Debug, Clone, PartialEq)]
enum Bound {
    Int(i64),
    Text(String),
    Null,
}

#[derive(Debug, Clone, PartialEq)]
struct Filter {
    field: &'static str,
    op: Op,
    values: Vec<Bound>,
}

/// A parsed query over a [`View`]: filters, order and page.
#[derive(Debug, Clone)]
pub struct Listing {
    view: &'static View,
    filters: Vec<Filter>,
    order: Vec<(&'static str, bool)>,
    /// How many items at most.
    pub limit: i64,
    /// How many to skip.
    pub offset: i64,
}

/// The largest page.
pub const MAX_LIMIT: i64 = 10_000;

impl Listing {
    /// Parses query pairs (`?a=1&b__lt=2`) against a view; `extra` names parameters the caller
    /// handles itself, which are skipped here. The message of an error says what to give.
    pub fn parse(
        view: &'static View,
        pairs: &[(String, String)],
        default_limit: i64,
        extra: &[&str],
    ) -> Result<Listing, String> {
        let mut listing = Listing {
            view,
            filters: Vec::new(),
            order: Vec::new(),
            limit: default_limit,
            offset: 0,
        };
        for (key, value) in pairs {
            match key.as_str() {
                "limit" => {
                    listing.limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| format!("limit={value}: give 1 to {MAX_LIMIT}"))?;
                }
                "offset" => {
                    listing.offset = value
                        .parse()
                        .ok()
                        .filter(|n: &i64| *n >= 0)
                        .ok_or_else(|| format!("offset={value}: give a number from 0"))?;
                }
                "order" => {
                    for part in value.split(',').filter(|p| !p.is_empty()) {
                        let (field, desc) = match part.strip_prefix('-') {
                            Some(f) => (f, true),
                            None => (part, false),
                        };
                        let field = listing.field(field, "order")?;
                        listing.order.push((field, desc));
                    }
                }
                k if extra.contains(&k) => {}
                k => {
                    let (field, op) = match k.rsplit_once("__") {
                        Some((f, suffix)) => (
                            f,
                            Op::parse(suffix).ok_or_else(|| {
                                format!(
                                    "{k}: the comparisons are __eq, __ne, __lt, __le, __gt, __ge and __contains"
                                )
                            })?,
                        ),
                        None => (k, Op::Eq),
                    };
                    let field = listing.field(field, "filter")?;
                    let kind = view.kind(field).unwrap_or(Kind::Text);
                    let bound =
                        bound(kind, op, value).map_err(|why| format!("{k}={value}: {why}"))?;
                    // A field given twice with `=` matches any of the values, as in Buildbot.
                    match listing
                        .filters
                        .iter_mut()
                        .find(|f| f.field == field && f.op == op && op == Op::Eq)
                    {
                        Some(f) => f.values.push(bound),
                        None => listing.filters.push(Filter {
                            field,
                            op,
                            values: vec![bound],
                        }),
                    }
                }
            }
        }
        Ok(listing)
    }

    fn field(&self, name: &str, what: &str) -> Result<&'static str, String> {
        self.view
            .columns
            .iter()
            .map(|(n, _)| *n)
            .find(|n| *n == name)
            .ok_or_else(|| {
                format!(
                    "cannot {what} {} by {name:?}; their fields are: {}",
                    self.view.name,
                    self.view.fields()
                )
            })
    }

    /// Adds `field = value` (for a path such as `/builders/3/builds`).
    pub fn with(mut self, field: &'static str, value: i64) -> Listing {
        self.filters.push(Filter {
            field,
            op: Op::Eq,
            values: vec![Bound::Int(value)],
        });
        self
    }

    fn where_clause(&self, binds: &mut Vec<Bound>) -> String {
        let mut clauses = Vec::new();
        for f in &self.filters {
            let mut alternatives = Vec::new();
            // Several values of one field: one IN list (an OR chain of a thousand would pass
            // SQLite's expression depth limit).
            let listed: Vec<&Bound> = f.values.iter().filter(|v| **v != Bound::Null).collect();
            if f.op == Op::Eq && listed.len() > 1 {
                let mut places = Vec::new();
                for v in listed {
                    binds.push(v.clone());
                    places.push(format!("${}", binds.len()));
                }
                alternatives.push(format!("v.{} IN ({})", f.field, places.join(", ")));
                if f.values.contains(&Bound::Null) {
                    alternatives.push(format!("v.{} IS NULL", f.field));
                }
                clauses.push(format!("({})", alternatives.join(" OR ")));
                continue;
            }
            for v in &f.values {
                alternatives.push(match (v, f.op) {
                    (Bound::Null, Op::Ne) => format!("v.{} IS NOT NULL", f.field),
                    (Bound::Null, _) => format!("v.{} IS NULL", f.field),
                    (v, Op::Contains) => {
                        binds.push(v.clone());
                        format!(
                            "LOWER(CAST(v.{} AS TEXT)) LIKE LOWER(${}) ESCAPE '\\'",
                            f.field,
                            binds.len()
                        )
                    }
                    (v, op) => {
                        binds.push(v.clone());
                        format!("v.{} {} ${}", f.field, op.sql(), binds.len())
                    }
                });
            }
            clauses.push(format!("({})", alternatives.join(" OR ")));
        }
        if clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", clauses.join(" AND "))
        }
    }

    /// Runs the listing: one page of items as JSON objects, and how many match in all.
    pub async fn fetch(&self, conn: &mut AnyConnection) -> Result<(Vec<Value>, i64), sqlx::Error> {
        let mut binds = Vec::new();
        let filter = self.where_clause(&mut binds);
        let mut order: Vec<String> = self
            .order
            .iter()
            .map(|(f, desc)| format!("v.{f}{}", if *desc { " DESC" } else { "" }))
            .collect();
        if order.is_empty() {
            let o = self.view.default_order;
            order.push(match o.strip_prefix('-') {
                Some(f) => format!("v.{f} DESC"),
                None => format!("v.{o}"),
            });
        }
        // The key last, so pages are stable when the asked order has ties.
        order.push(format!("v.{}", self.view.key));
        let page = format!(
            "SELECT * FROM ({}) v{filter} ORDER BY {} LIMIT {} OFFSET {}",
            self.view.sql,
            order.join(", "),
            self.limit,
            self.offset
        );
        let rows = bind_all(sqlx::query(&page), &binds)
            .fetch_all(&mut *conn)
            .await?;
        let items = rows
            .iter()
            .map(|r| row_json(self.view, r))
            .collect::<Result<Vec<_>, _>>()?;
        // A short first page is the whole answer; otherwise count.
        let total = if self.offset == 0 && (items.len() as i64) < self.limit {
            items.len() as i64
        } else {
            let count = format!("SELECT COUNT(*) FROM ({}) v{filter}", self.view.sql);
            bind_all(sqlx::query(&count), &binds)
                .fetch_one(&mut *conn)
                .await?
                .try_get::<i64, _>(0)?
        };
        Ok((items, total))
    }
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    binds: &[Bound],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for b in binds {
        q = match b {
            Bound::Int(i) => q.bind(*i),
            Bound::Text(s) => q.bind(s.clone()),
            // Never bound: a null is written as IS NULL.
            Bound::Null => q,
        };
    }
    q
}

fn bound(kind: Kind, op: Op, value: &str) -> Result<Bound, String> {
    if value == "null" && matches!(op, Op::Eq | Op::Ne) {
        return Ok(Bound::Null);
    }
    if op == Op::Contains && kind == Kind::Results {
        // Results are stored as codes: a text search would silently match nothing.
        return Err("results are compared, not searched: give =, __ne, __lt, __le, __gt or __ge with a result name".into());
    }
    if op == Op::Contains {
        // LIKE's own characters match themselves.
        let escaped = value
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        return Ok(Bound::Text(format!("%{escaped}%")));
    }
    match kind {
        Kind::Results => crate::model::Results::ALL
            .iter()
            .position(|r| r.as_str().eq_ignore_ascii_case(value))
            .map(|i| Bound::Int(i as i64))
            .or_else(|| value.parse().ok().map(Bound::Int))
            .ok_or_else(|| {
                "give a result: SUCCESS, WARNINGS, FAILURE, SKIPPED, EXCEPTION, RETRY, CANCELLED (or 0 to 6)".to_string()
            }),
        Kind::Int => value
            .parse()
            .map(Bound::Int)
            .map_err(|_| "give a whole number (or null)".to_string()),
        Kind::Bool => match value {
            "true" | "1" => Ok(Bound::Int(1)),
            "false" | "0" => Ok(Bound::Int(0)),
            _ => Err("give true or false".into()),
        },
        Kind::Text => Ok(Bound::Text(value.to_owned())),
        Kind::Json => Err("only __contains filters this field".into()),
    }
}

/// One row as a JSON object of the view's fields.
pub fn row_json(view: &View, r: &AnyRow) -> Result<Value, sqlx::Error> {
    let mut item = Map::new();
    for (name, kind) in view.columns {
        let value = match kind {
            Kind::Int => r
                .try_get::<Option<i64>, _>(*name)?
                .map_or(Value::Null, Value::from),
            Kind::Results => r
                .try_get::<Option<i64>, _>(*name)?
                .and_then(crate::model::results_from_code)
                .map_or(Value::Null, |o| Value::from(o.as_str())),
            Kind::Bool => r
                .try_get::<Option<i64>, _>(*name)?
                .map_or(Value::Null, |v| Value::Bool(v != 0)),
            Kind::Text => r
                .try_get::<Option<String>, _>(*name)?
                .map_or(Value::Null, Value::from),
            Kind::Json => match r.try_get::<Option<String>, _>(*name)? {
                Some(t) => crate::queries::parse_json(&t, name)?,
                None => Value::Null,
            },
        };
        item.insert((*name).to_owned(), value);
    }
    Ok(Value::Object(item))
}

/// Fetches one item by its key.
pub async fn get(
    conn: &mut AnyConnection,
    view: &'static View,
    key: i64,
) -> Result<Option<Value>, sqlx::Error> {
    let sql = format!("SELECT * FROM ({}) v WHERE v.{} = $1", view.sql, view.key);
    let row = sqlx::query(&sql).bind(key).fetch_optional(conn).await?;
    row.map(|r| row_json(view, &r)).transpose()
}

use Kind::{Bool, Int, Json, Results, Text};

/// Builders of the configuration in force, with their queue and running builds.
pub static BUILDERS: View = View {
    name: "builders",
    sql: "SELECT bl.id AS builderid, bl.name AS name, bl.description AS description,
                 bl.tags AS tags,
                 (SELECT COUNT(*) FROM buildrequests r
                   WHERE r.builder_id = bl.id AND r.complete = 0
                     AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                 ) AS pending,
                 (SELECT COUNT(*) FROM builds b
                   WHERE b.builder_id = bl.id AND b.complete_at IS NULL) AS running,
                 (SELECT b.id FROM builds b WHERE b.builder_id = bl.id
                   ORDER BY b.number DESC LIMIT 1) AS last_buildid
          FROM builders bl WHERE bl.active = 1",
    columns: &[
        ("builderid", Int),
        ("name", Text),
        ("description", Text),
        ("tags", Json),
        ("pending", Int),
        ("running", Int),
        ("last_buildid", Int),
    ],
    key: "builderid",
    default_order: "name",
};

/// Builds, with their builder's and worker's names.
pub static BUILDS: View = View {
    name: "builds",
    sql: "SELECT b.id AS buildid, b.builder_id AS builderid, bl.name AS builder,
                 b.number AS number, b.request_id AS buildrequestid, w.name AS worker,
                 b.master_id AS masterid, b.started_at AS started_at,
                 b.complete_at AS complete_at,
                 CAST(CASE WHEN b.complete_at IS NULL THEN 0 ELSE 1 END AS BIGINT) AS complete,
                 b.state_string AS state_string, b.results AS results
          FROM builds b JOIN builders bl ON bl.id = b.builder_id
          LEFT JOIN workers w ON w.id = b.worker_id",
    columns: &[
        ("buildid", Int),
        ("builderid", Int),
        ("builder", Text),
        ("number", Int),
        ("buildrequestid", Int),
        ("worker", Text),
        ("masterid", Int),
        ("started_at", Int),
        ("complete_at", Int),
        ("complete", Bool),
        ("state_string", Text),
        ("results", Results),
    ],
    key: "buildid",
    default_order: "-buildid",
};

/// Steps, with their build.
pub static STEPS: View = View {
    name: "steps",
    sql: "SELECT id AS stepid, build_id AS buildid, number, name, started_at, complete_at,
                 state_string, results, hidden, urls, statistics, cpu_ms, peak_rss_bytes,
                 guest_memory_bytes, observer_memory_bytes, progress
          FROM steps",
    columns: &[
        ("stepid", Int),
        ("buildid", Int),
        ("number", Int),
        ("name", Text),
        ("started_at", Int),
        ("complete_at", Int),
        ("state_string", Text),
        ("results", Results),
        ("hidden", Bool),
        ("urls", Json),
        ("statistics", Json),
        ("cpu_ms", Int),
        ("peak_rss_bytes", Int),
        ("guest_memory_bytes", Int),
        ("observer_memory_bytes", Int),
        ("progress", Json),
    ],
    key: "stepid",
    default_order: "number",
};

/// Logs, with their step and build.
pub static LOGS: View = View {
    name: "logs",
    sql: "SELECT l.id AS logid, l.step_id AS stepid, s.build_id AS buildid,
                 s.number AS step_number, l.name AS name, l.slug AS slug, l.kind AS type,
                 l.num_lines AS num_lines, l.num_bytes AS num_bytes, l.complete AS complete
          FROM logs l JOIN steps s ON s.id = l.step_id",
    columns: &[
        ("logid", Int),
        ("stepid", Int),
        ("buildid", Int),
        ("step_number", Int),
        ("name", Text),
        ("slug", Text),
        ("type", Text),
        ("num_lines", Int),
        ("num_bytes", Int),
        ("complete", Bool),
    ],
    key: "logid",
    default_order: "logid",
};

/// Build requests, with their builder, buildset reason and claim.
pub static BUILDREQUESTS: View = View {
    name: "buildrequests",
    sql: "SELECT r.id AS buildrequestid, r.buildset_id AS buildsetid, r.builder_id AS builderid,
                 bl.name AS builder, r.priority AS priority, r.submitted_at AS submitted_at,
                 CAST(CASE WHEN c.request_id IS NULL THEN 0 ELSE 1 END AS BIGINT) AS claimed,
                 c.master_id AS claimed_by_masterid, c.claimed_at AS claimed_at,
                 r.complete AS complete, r.complete_at AS complete_at, r.results AS results,
                 r.collapsed_into AS collapsed_into, bs.reason AS reason,
                 bs.trusted AS trusted
          FROM buildrequests r JOIN builders bl ON bl.id = r.builder_id
          JOIN buildsets bs ON bs.id = r.buildset_id
          LEFT JOIN buildrequest_claims c ON c.request_id = r.id",
    columns: &[
        ("buildrequestid", Int),
        ("buildsetid", Int),
        ("builderid", Int),
        ("builder", Text),
        ("priority", Int),
        ("submitted_at", Int),
        ("claimed", Bool),
        ("claimed_by_masterid", Int),
        ("claimed_at", Int),
        ("complete", Bool),
        ("complete_at", Int),
        ("results", Results),
        ("collapsed_into", Int),
        ("reason", Text),
        ("trusted", Bool),
    ],
    key: "buildrequestid",
    default_order: "-buildrequestid",
};

/// Buildsets.
pub static BUILDSETS: View = View {
    name: "buildsets",
    sql: "SELECT id AS buildsetid, scheduler, reason, external_id, submitted_at, trusted,
                 parent_build_id AS parent_buildid, complete, complete_at, results
          FROM buildsets",
    columns: &[
        ("buildsetid", Int),
        ("scheduler", Text),
        ("reason", Text),
        ("external_id", Text),
        ("submitted_at", Int),
        ("trusted", Bool),
        ("parent_buildid", Int),
        ("complete", Bool),
        ("complete_at", Int),
        ("results", Results),
    ],
    key: "buildsetid",
    default_order: "-buildsetid",
};

/// Changes.
pub static CHANGES: View = View {
    name: "changes",
    sql: "SELECT id AS changeid, author, committer, comments, branch, revision, revlink,
                 when_at AS when_timestamp, category, repository, codebase, project, source,
                 trusted, created_at
          FROM changes",
    columns: &[
        ("changeid", Int),
        ("author", Text),
        ("committer", Text),
        ("comments", Text),
        ("branch", Text),
        ("revision", Text),
        ("revlink", Text),
        ("when_timestamp", Int),
        ("category", Text),
        ("repository", Text),
        ("codebase", Text),
        ("project", Text),
        ("source", Text),
        ("trusted", Bool),
        ("created_at", Int),
    ],
    key: "changeid",
    default_order: "-changeid",
};

/// Source stamps.
pub static SOURCESTAMPS: View = View {
    name: "sourcestamps",
    sql: "SELECT id AS ssid, codebase, repository, branch, revision, project,
                 patch_id AS patchid, created_at
          FROM sourcestamps",
    columns: &[
        ("ssid", Int),
        ("codebase", Text),
        ("repository", Text),
        ("branch", Text),
        ("revision", Text),
        ("project", Text),
        ("patchid", Int),
        ("created_at", Int),
    ],
    key: "ssid",
    default_order: "-ssid",
};

/// Uploaded step, observer and policy modules.
pub static STEPMODULES: View = View {
    name: "stepmodules",
    sql: "SELECT id AS moduleid, name, version, kind, sha1, sha256, size, uploaded_at
          FROM step_modules",
    columns: &[
        ("moduleid", Int),
        ("name", Text),
        ("version", Text),
        ("kind", Text),
        ("sha1", Text),
        ("sha256", Text),
        ("size", Int),
        ("uploaded_at", Int),
    ],
    key: "moduleid",
    default_order: "name",
};

/// Masters sharing the database.
pub static MASTERS: View = View {
    name: "masters",
    sql: "SELECT id AS masterid, name, active, last_active FROM masters",
    columns: &[
        ("masterid", Int),
        ("name", Text),
        ("active", Bool),
        ("last_active", Int),
    ],
    key: "masterid",
    default_order: "masterid",
};

/// Shows a step's CPU time in seconds, as `cpu_seconds` (null: it did not run, or its
/// worker did not say), in place of the stored milliseconds.
pub fn cpu_in_seconds(step: &mut Value) {
    let cpu_ms = step.as_object_mut().and_then(|s| s.remove("cpu_ms"));
    step["cpu_seconds"] = cpu_ms
        .and_then(|ms| ms.as_i64())
        .map_or(Value::Null, |ms| serde_json::json!(ms as f64 / 1000.0));
}

/// `[channel, text]` of a stored line: stream logs tag each line with its channel (o, e, h).
pub fn split_channel(line: &str, stream: bool) -> Value {
    match line.chars().next() {
        Some(c @ ('o' | 'e' | 'h')) if stream => serde_json::json!([c.to_string(), &line[1..]]),
        _ => serde_json::json!(["o", line]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &str) -> Vec<(String, String)> {
        q.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    #[test]
    fn filters_orders_and_pages_become_sql() {
        let l = Listing::parse(
            &BUILDS,
            &pairs("builder=a&builder=b&results__lt=2&complete_at=null&order=-number&limit=5&offset=10"),
            100,
            &[],
        )
        .unwrap();
        let mut binds = Vec::new();
        assert_eq!(
            l.where_clause(&mut binds),
            " WHERE (v.builder IN ($1, $2)) AND (v.results < $3) AND (v.complete_at IS NULL)"
        );
        assert_eq!(
            binds,
            vec![
                Bound::Text("a".into()),
                Bound::Text("b".into()),
                Bound::Int(2)
            ]
        );
        assert_eq!(l.order, vec![("number", true)]);
        assert_eq!((l.limit, l.offset), (5, 10));
    }

    #[test]
    fn bad_queries_say_what_to_give() {
        let err = |q: &str| Listing::parse(&BUILDS, &pairs(q), 100, &[]).unwrap_err();
        assert!(
            err("colour=red").contains("their fields are: buildid"),
            "{}",
            err("colour=red")
        );
        assert!(err("number=abc").contains("whole number"));
        assert!(err("number__near=3").contains("__contains"));
        assert!(err("limit=0").contains("1 to 10000"));
        assert!(err("offset=-1").contains("from 0"));
        assert!(err("order=-nope").contains("cannot order builds by \"nope\""));
        assert!(err("complete=maybe").contains("true or false"));
        assert!(err("results__contains=FAIL").contains("compared, not searched"));
        assert!(err("results=BROKEN").contains("give a result"));
        assert!(Listing::parse(&BUILDS, &pairs("wait=1"), 100, &["wait"]).is_ok());
    }

    #[test]
    fn contains_escapes_like_wildcards() {
        assert_eq!(
            bound(Kind::Text, Op::Contains, "50%_a\\").unwrap(),
            Bound::Text("%50\\%\\_a\\\\%".into())
        );
    }
}
