//! The two migration trees (`migrations/sqlite`, `migrations/postgres`) define one schema: the
//! same tables, columns, nullability, primary keys and indexes (by table, columns, uniqueness
//! and partiality; names differ where a dialect names a constraint's index itself). Each tree
//! is applied to a real database and read back from its catalogue, so a migration added to one
//! tree and forgotten in the other, or written differently, fails here.

use std::collections::{BTreeMap, BTreeSet};

use kiln_db::Db;
use kiln_testkit::pgtemp::TempPostgres;
use sqlx::Row;

/// A schema as both catalogues can describe it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Schema {
    /// Table -> column -> NOT NULL.
    columns: BTreeMap<String, BTreeMap<String, bool>>,
    /// Table -> its primary key's columns, in order.
    primary_keys: BTreeMap<String, Vec<String>>,
    /// (table, columns in order (`<expr>` for an expression), unique, partial), primary keys
    /// left out.
    indexes: BTreeSet<(String, Vec<String>, bool, bool)>,
}

/// Tables that are not the schema's: sqlx's own bookkeeping.
fn ours(table: &str) -> bool {
    table != "_sqlx_migrations" && !table.starts_with("sqlite_")
}

async fn sqlite_schema(db: &Db) -> Schema {
    let mut s = Schema::default();
    let rows = sqlx::query(
        "SELECT m.name AS t, p.name AS c, p.\"notnull\" AS nn, p.pk AS pk \
         FROM sqlite_master m JOIN pragma_table_info(m.name) p \
         WHERE m.type = 'table' ORDER BY m.name, p.pk, p.cid",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let mut keys: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
    for r in rows {
        let (t, c): (String, String) = (r.get("t"), r.get("c"));
        if !ours(&t) {
            continue;
        }
        let pk: i64 = r.get("pk");
        // SQLite lets a primary key column hold NULL unless declared NOT NULL; PostgreSQL
        // never does, and Kiln's ids are never NULL.
        let not_null = r.get::<i64, _>("nn") != 0 || pk > 0;
        s.columns
            .entry(t.clone())
            .or_default()
            .insert(c.clone(), not_null);
        if pk > 0 {
            keys.entry(t).or_default().push((pk, c));
        }
    }
    for (t, mut cols) in keys {
        cols.sort();
        s.primary_keys
            .insert(t, cols.into_iter().map(|(_, c)| c).collect());
    }
    let rows = sqlx::query(
        "SELECT m.name AS t, il.name AS i, il.\"unique\" AS u, il.origin AS o, il.partial AS p, \
                ii.seqno AS n, ii.name AS c \
         FROM sqlite_master m JOIN pragma_index_list(m.name) il JOIN pragma_index_xinfo(il.name) ii \
         WHERE m.type = 'table' AND ii.key = 1 ORDER BY m.name, il.name, ii.seqno",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let mut indexes: BTreeMap<(String, String), (Vec<String>, bool, bool)> = BTreeMap::new();
    for r in rows {
        let t: String = r.get("t");
        if !ours(&t) || r.get::<String, _>("o") == "pk" {
            continue;
        }
        let column: Option<String> = r.get("c");
        let entry = indexes.entry((t, r.get("i"))).or_insert_with(|| {
            (
                Vec::new(),
                r.get::<i64, _>("u") != 0,
                r.get::<i64, _>("p") != 0,
            )
        });
        entry.0.push(column.unwrap_or_else(|| "<expr>".into()));
    }
    s.indexes = indexes
        .into_iter()
        .map(|((t, _), (cols, unique, partial))| (t, cols, unique, partial))
        .collect();
    s
}

async fn postgres_schema(db: &Db) -> Schema {
    let mut s = Schema::default();
    let rows = sqlx::query(
        "SELECT table_name::text AS t, column_name::text AS c, is_nullable::text AS n \
         FROM information_schema.columns WHERE table_schema = 'public'",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    for r in rows {
        let t: String = r.get("t");
        if ours(&t) {
            let not_null = r.get::<String, _>("n") == "NO";
            s.columns.entry(t).or_default().insert(r.get("c"), not_null);
        }
    }
    let rows = sqlx::query(
        "SELECT t.relname::text AS t, i.relname::text AS i, ix.indisunique AS u, \
                ix.indisprimary AS pk, (ix.indpred IS NOT NULL) AS p, k.ord AS n, a.attname::text AS c \
         FROM pg_index ix \
         JOIN pg_class i ON i.oid = ix.indexrelid \
         JOIN pg_class t ON t.oid = ix.indrelid \
         JOIN pg_namespace ns ON ns.oid = t.relnamespace \
         CROSS JOIN LATERAL unnest(ix.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
         LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum \
         WHERE ns.nspname = 'public' ORDER BY t.relname, i.relname, k.ord",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let mut indexes: BTreeMap<(String, String), (Vec<String>, bool, bool)> = BTreeMap::new();
    for r in rows {
        let t: String = r.get("t");
        if !ours(&t) {
            continue;
        }
        let column: Option<String> = r.get("c");
        let column = column.unwrap_or_else(|| "<expr>".into());
        if r.get::<bool, _>("pk") {
            s.primary_keys.entry(t).or_default().push(column);
            continue;
        }
        let entry = indexes
            .entry((t, r.get("i")))
            .or_insert_with(|| (Vec::new(), r.get("u"), r.get("p")));
        entry.0.push(column);
    }
    s.indexes = indexes
        .into_iter()
        .map(|((t, _), (cols, unique, partial))| (t, cols, unique, partial))
        .collect();
    s
}

/// The differences, one per line, for a message a person can act on.
fn differences(sqlite: &Schema, postgres: &Schema) -> Vec<String> {
    let mut out = Vec::new();
    let tables: BTreeSet<&String> = sqlite
        .columns
        .keys()
        .chain(postgres.columns.keys())
        .collect();
    for t in tables {
        match (sqlite.columns.get(t), postgres.columns.get(t)) {
            (Some(a), Some(b)) => {
                let columns: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for c in columns {
                    match (a.get(c), b.get(c)) {
                        (Some(x), Some(y)) if x != y => out.push(format!(
                            "{t}.{c}: NOT NULL on SQLite {x}, on PostgreSQL {y}"
                        )),
                        (Some(_), None) => out.push(format!("{t}.{c}: only on SQLite")),
                        (None, Some(_)) => out.push(format!("{t}.{c}: only on PostgreSQL")),
                        _ => {}
                    }
                }
            }
            (Some(_), None) => out.push(format!("table {t}: only on SQLite")),
            (None, Some(_)) => out.push(format!("table {t}: only on PostgreSQL")),
            (None, None) => {}
        }
        if sqlite.primary_keys.get(t) != postgres.primary_keys.get(t) {
            out.push(format!(
                "{t}: primary key {:?} on SQLite, {:?} on PostgreSQL",
                sqlite.primary_keys.get(t),
                postgres.primary_keys.get(t)
            ));
        }
    }
    for i in sqlite.indexes.difference(&postgres.indexes) {
        out.push(format!("index only on SQLite: {i:?}"));
    }
    for i in postgres.indexes.difference(&sqlite.indexes) {
        out.push(format!("index only on PostgreSQL: {i:?}"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_and_postgres_schemas_agree() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("k.sqlite").display()
    );
    let sqlite = sqlite_schema(&Db::open(&url).await.unwrap()).await;

    let server = tokio::task::spawn_blocking(|| TempPostgres::start(false).unwrap())
        .await
        .unwrap();
    let url = server.create_database().unwrap();
    let postgres = postgres_schema(&Db::open(&url).await.unwrap()).await;

    // The test reads what it compares: every table has columns, and indexes were found.
    assert!(sqlite.columns.len() > 20, "{:?}", sqlite.columns.keys());
    assert!(sqlite.indexes.len() > 10, "{:?}", sqlite.indexes);
    let diff = differences(&sqlite, &postgres);
    assert!(
        diff.is_empty(),
        "the migration trees disagree; make migrations/sqlite and migrations/postgres define the same schema:\n{}",
        diff.join("\n")
    );
}

#[test]
fn a_drift_is_reported_by_name() {
    let mut a = Schema::default();
    a.columns
        .entry("builds".into())
        .or_default()
        .insert("id".into(), true);
    let mut b = Schema::default();
    b.columns
        .entry("builds".into())
        .or_default()
        .insert("id".into(), false);
    b.indexes
        .insert(("builds".into(), vec!["id".into()], false, false));
    assert_eq!(
        differences(&a, &b),
        [
            "builds.id: NOT NULL on SQLite true, on PostgreSQL false",
            "index only on PostgreSQL: (\"builds\", [\"id\"], false, false)"
        ]
    );
}
