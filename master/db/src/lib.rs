//! The master's database: SQLite (the embedded default) or PostgreSQL (farms with several
//! masters), through sqlx's `Any` driver so one set of queries serves both. All SQL lives in
//! this crate; everything else calls these functions. [`model`] holds the domain's records
//! (changes, source stamps, buildsets, requests) as the farm reads and writes them.
//!
//! Concurrency rules, which hold for several masters sharing one PostgreSQL database:
//! - Claims (of build requests, of schedulers) are rows whose primary key is the arbiter:
//!   `INSERT ... ON CONFLICT DO NOTHING`, and whoever inserted the row owns the thing.
//! - Rows that consumers read through a watermark (changes, events) are appended under
//!   [`Db::serialize_appends`], so ids become visible in increasing order and a watermark can
//!   never skip a row that commits late.
//! - On SQLite, write transactions start with `BEGIN IMMEDIATE`: the write lock is taken up
//!   front, so two writers queue on the busy timeout instead of failing on lock upgrade.

mod control;
mod hooks;
pub mod model;
mod poller;
mod queries;
mod reporters;
pub mod tokens;
pub mod views;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, Connection, Executor, Transaction};
use std::str::FromStr;

pub use control::*;
pub use hooks::*;
pub use poller::*;
pub use queries::*;
pub use reporters::*;
pub use views::{Listing, View};

/// Which database server is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A write transaction. On SQLite it also holds the process's write lock (see [`Db::begin`]).
pub struct Tx {
    tx: Transaction<'static, Any>,
    _write: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx").finish_non_exhaustive()
    }
}

impl std::ops::Deref for Tx {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

impl Tx {
    /// Commits (then releases the write lock).
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }

    /// Rolls back (then releases the write lock).
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

/// Errors opening or migrating the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL names no database Kiln supports.
    #[error(
        "database URL {0:?} is not supported: use a SQLite file (sqlite:///path/kiln.sqlite) or a \
         PostgreSQL URL (postgres://user@host/dbname)"
    )]
    UnsupportedUrl(String),
    /// Connecting failed.
    #[error("cannot connect to the database at {url}: {reason}")]
    Connect {
        /// The URL, with any password removed.
        url: String,
        /// Why (named `reason`, not `source`, so the message says it once).
        reason: sqlx::Error,
    },
    /// A migration failed.
    #[error("cannot migrate the database at {url}: {reason}")]
    Migrate {
        /// The URL, with any password removed.
        url: String,
        /// Why.
        reason: sqlx::migrate::MigrateError,
    },
}

/// The master's connection pool.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    /// SQLite: one write transaction at a time in this process, queued here in order rather
    /// than on SQLite's busy handler, which sleeps (up to 100 ms a try) while it waits.
    write: Option<std::sync::Arc<tokio::sync::Mutex<()>>>,
}

/// Key of the PostgreSQL advisory lock that orders appends to watermarked tables.
const APPEND_LOCK: i64 = 0x4b494c4e; // "KILN"

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

impl Db {
    /// Connects to `url` (`sqlite://...` or `postgres://...`) and brings the schema up to date.
    pub async fn open(url: &str) -> Result<Db, DbError> {
        let db = Db::connect(url).await?;
        db.migrate().await.map_err(|reason| DbError::Migrate {
            url: redact_url(url),
            reason,
        })?;
        Ok(db)
    }

    /// Connects without migrating.
    pub async fn connect(url: &str) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(DbError::UnsupportedUrl(redact_url(url)));
        };
        let connect_err = |reason| DbError::Connect {
            url: redact_url(url),
            reason,
        };
        let options = AnyConnectOptions::from_str(url).map_err(connect_err)?;
        // One direct connection first: a pool retries until its timeout and then reports only
        // that it timed out; this says why (refused, authentication, no such database) at once.
        sqlx::AnyConnection::connect_with(&options)
            .await
            .map_err(connect_err)?
            .close()
            .await
            .map_err(connect_err)?;
        let pool = match backend {
            Backend::Sqlite => {
                AnyPoolOptions::new()
                    // SQLite has one writer at a time; a few connections serve concurrent reads.
                    .max_connections(4)
                    // An embedded database's connection cannot drop: pinging it on every
                    // acquire (sqlx's default) only added a round trip to its thread.
                    .test_before_acquire(false)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // WAL lets readers run beside the writer; NORMAL sync is durable
                            // against a process kill (the case that matters for a master),
                            // and a commit costs no fsync.
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                                 PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect_with(options)
                    .await
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(8)
                    .connect_with(options)
                    .await
            }
        }
        .map_err(connect_err)?;
        let write = (backend == Backend::Sqlite).then(Default::default);
        Ok(Db {
            pool,
            backend,
            write,
        })
    }

    /// Applies pending migrations. PostgreSQL serializes concurrent migrators with an advisory
    /// lock; SQLite has no such lock, so when two processes open a new database at once (a
    /// master starting while `kiln sendchange` runs) the loser's migration fails and rolls
    /// back: it then tries again and finds the work done.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        match self.backend {
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&self.pool).await,
            Backend::Sqlite => {
                let mut attempt = 0;
                loop {
                    match SQLITE_MIGRATIONS.run(&self.pool).await {
                        Err(sqlx::migrate::MigrateError::ExecuteMigration(..)) if attempt < 5 => {
                            attempt += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(100 * attempt))
                                .await;
                        }
                        other => return other,
                    }
                }
            }
        }
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool, for reads.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Starts a write transaction. On SQLite, writers of this process queue on an async lock
    /// first (other processes still meet SQLite's own lock and busy timeout).
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        let write = match &self.write {
            Some(lock) => Some(lock.clone().lock_owned().await),
            None => None,
        };
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(Tx { tx, _write: write })
    }

    /// Makes the rest of `tx` the only transaction appending to watermarked tables (changes,
    /// events) until it ends. SQLite's write lock already does this.
    pub async fn serialize_appends(&self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(APPEND_LOCK)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Query parameters whose values are credentials (libpq's `password` and `sslpassword`, and the
/// tokens and keys a reporter's URL may carry), matched ignoring case.
const SECRET_QUERY_KEYS: &[&str] = &["password", "passwd", "pwd", "token", "secret", "key"];

/// The URL with its password and credential-bearing query values replaced by `***`, for
/// messages. Parsed as a URL (WHATWG rules: the userinfo ends at the authority's last `@`, so a
/// password containing `@` is hidden whole). A string that does not parse is cut down to its
/// scheme, so nothing of it can leak.
pub fn redact_url(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text) else {
        return match text.split_once("://") {
            Some((scheme, _)) if !scheme.is_empty() && !scheme.contains(['@', ':', '/']) => {
                format!("{scheme}://*** (not a valid URL)")
            }
            _ => "*** (not a valid URL)".to_owned(),
        };
    };
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    let secret = |key: &str| {
        let key = key.to_ascii_lowercase();
        SECRET_QUERY_KEYS.iter().any(|s| key.contains(s))
    };
    if url.query_pairs().any(|(k, _)| secret(&k)) {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret(&k) {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact_url("postgres://kiln:hunter2@db/kiln"),
            "postgres://kiln:***@db/kiln"
        );
        assert_eq!(
            redact_url("postgres://kiln@db/kiln"),
            "postgres://kiln@db/kiln"
        );
        assert_eq!(
            redact_url("sqlite:///tmp/k.sqlite"),
            "sqlite:///tmp/k.sqlite"
        );
        assert_eq!(
            redact_url("sqlite://kiln.sqlite?mode=rwc"),
            "sqlite://kiln.sqlite?mode=rwc"
        );
    }

    #[test]
    fn a_password_with_an_at_sign_is_hidden_whole() {
        let shown = redact_url("postgres://u:p@ss@h/db");
        assert_eq!(shown, "postgres://u:***@h/db");
        assert!(!shown.contains("ss"), "{shown}");
    }

    #[test]
    fn credentials_in_the_query_are_hidden() {
        assert_eq!(
            redact_url("postgres://kiln@db/kiln?sslmode=require&password=hunter2"),
            "postgres://kiln@db/kiln?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("postgresql:///kiln?host=/run/pg&sslpassword=x&PassWord=y"),
            "postgresql:///kiln?host=%2Frun%2Fpg&sslpassword=***&PassWord=***"
        );
        assert_eq!(
            redact_url("https://hooks.example/notify?token=abc&channel=ci"),
            "https://hooks.example/notify?token=***&channel=ci"
        );
    }

    #[test]
    fn what_does_not_parse_shows_only_its_scheme() {
        assert_eq!(
            redact_url("postgres://u:hunter2@h:99999/db"),
            "postgres://*** (not a valid URL)"
        );
        assert_eq!(redact_url("hunter2@db"), "*** (not a valid URL)");
    }
}
