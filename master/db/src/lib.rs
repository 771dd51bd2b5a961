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

/// The URL with any password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
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
    }
}
