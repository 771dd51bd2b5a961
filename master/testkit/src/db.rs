//! Databases for tests: a fresh SQLite file, or a fresh database on one throwaway PostgreSQL
//! server per test process (or on the server `KILN_TEST_POSTGRES_URL` names, which must allow
//! `CREATE DATABASE`).

use std::sync::OnceLock;

use crate::pgtemp::TempPostgres;
use kiln_db::Db;

/// A database for one test; the SQLite file lives as long as this.
pub struct TestDb {
    pub db: Db,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

pub async fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("kiln.sqlite").display()
    );
    TestDb {
        db: Db::open(&url).await.unwrap(),
        url,
        _dir: Some(dir),
    }
}

fn server() -> &'static TempPostgres {
    static SERVER: OnceLock<TempPostgres> = OnceLock::new();
    SERVER.get_or_init(|| TempPostgres::start(false).expect("starting a test PostgreSQL server"))
}

/// The URL of a new, empty PostgreSQL database.
pub async fn postgres_url() -> String {
    if let Ok(base) = std::env::var("KILN_TEST_POSTGRES_URL") {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "kiln_t{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let admin = Db::connect(&base).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(admin.pool())
            .await
            .unwrap();
        let (prefix, _) = base.rsplit_once('/').unwrap();
        return format!("{prefix}/{name}");
    }
    tokio::task::spawn_blocking(|| server().create_database().unwrap())
        .await
        .unwrap()
}

pub async fn postgres() -> TestDb {
    let url = postgres_url().await;
    TestDb {
        db: Db::open(&url).await.unwrap(),
        url,
        _dir: None,
    }
}

/// Runs an `async fn(TestDb)` against SQLite and against PostgreSQL, as two tests.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::db::sqlite().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::db::postgres().await).await;
            }
        }
    )*};
}
