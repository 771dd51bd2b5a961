//! The farm's processes and what the benchmark reads of them: the database a master uses
//! (SQLite, or a throwaway PostgreSQL), `kiln master` and `kiln-worker` processes, API
//! requests over plain TCP, and figures from `/proc`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_testkit::pgtemp::TempPostgres;
use serde_json::Value;

/// The database the farm's masters use: SQLite by default, PostgreSQL with
/// `KILN_BENCH_DB=postgres` (a durable server, fsync on, started for this run).
pub enum Backend {
    /// A SQLite file in the master's directory.
    Sqlite,
    /// A fresh database on one PostgreSQL server per run.
    Postgres(TempPostgres),
}

impl Backend {
    /// The backend `KILN_BENCH_DB` asks for.
    pub fn from_env() -> Backend {
        match std::env::var("KILN_BENCH_DB").as_deref() {
            Err(_) | Ok("" | "sqlite") => Backend::Sqlite,
            Ok("postgres" | "postgresql") => {
                Backend::Postgres(TempPostgres::start(true).expect("starting PostgreSQL"))
            }
            Ok(other) => panic!("KILN_BENCH_DB={other}: use sqlite or postgres"),
        }
    }

    /// Its name in figures.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// The URL of a new, empty database for a master whose files are in `dir`.
    pub fn database(&self, dir: &Path) -> String {
        match self {
            Backend::Sqlite => format!("sqlite://{}?mode=rwc", dir.join("kiln.sqlite").display()),
            Backend::Postgres(pg) => pg.create_database().expect("creating a database"),
        }
    }

    /// How long the database's own client takes to create Kiln's schema on a new database:
    /// every migration applied by `psql` in one session (PostgreSQL only: SQLite's schema
    /// costs a master a few milliseconds).
    pub fn schema_alone(&self) -> Option<Duration> {
        let Backend::Postgres(pg) = self else {
            return None;
        };
        let url = pg.create_database().expect("creating a database");
        let name = url.rsplit('/').next().unwrap_or_default().to_owned();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../db/migrations/postgres");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "sql"))
            .collect();
        files.sort();
        let mut psql = pg.psql(&name);
        for f in &files {
            psql.arg("-f").arg(f);
        }
        let t = Instant::now();
        let out = psql.output().expect("running psql");
        let took = t.elapsed();
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(took)
    }
}

/// A free port on 127.0.0.1 (free when asked; the master binds it a moment later).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The processes' log level: `KILN_BENCH_LOG`, else warnings only.
pub fn log_level() -> String {
    std::env::var("KILN_BENCH_LOG").unwrap_or_else(|_| "warn".into())
}

/// A `kiln master` process, killed when dropped.
pub struct MasterProc {
    pub child: Child,
    pub port: u16,
}

impl MasterProc {
    /// Starts `kiln master` in `dir` (where `kiln.toml` is) on database `db`, listening on
    /// `port`. Returns at once: see [`MasterProc::wait_ready`].
    pub fn spawn(dir: &Path, db: &str, port: u16) -> MasterProc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["master", "--poll", "1", "--db", db])
            .current_dir(dir)
            .env("KILN_LOG", log_level())
            .env("KILN_CACHE_DIR", dir.join("cache"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        // Passes the master's log on, without the banner each start prints.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !line.starts_with("kiln: master ") {
                    eprintln!("{line}");
                }
            }
        });
        MasterProc { child, port }
    }

    /// Waits until the API answers a request, polling every 0.5 ms; returns when it did.
    pub fn wait_ready(&mut self, within: Duration) -> Instant {
        let start = Instant::now();
        loop {
            if status(self.port, "/api/v2/auth") == Some(200) {
                return Instant::now();
            }
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!("kiln master exited before its API answered: {exit}");
            }
            assert!(start.elapsed() < within, "timed out: the master's API");
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for MasterProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `kiln-worker` process, killed when dropped.
pub struct WorkerProc {
    pub child: Child,
}

impl WorkerProc {
    /// Starts worker `w{i}` (token `t{i}`) against the master on `port`, its workdir and
    /// component cache under `dir`. With `timed`, waits until the worker says it is connected
    /// (it logs that once the master's welcome arrived, so the master holds the connection)
    /// and returns how long that took from the spawn.
    pub fn spawn(dir: &Path, port: u16, i: usize, timed: bool) -> (WorkerProc, Option<Duration>) {
        let level = if timed {
            // The worker's own "connected" line, nothing more.
            format!("{},kiln_worker=info", log_level())
        } else {
            log_level()
        };
        let start = Instant::now();
        let mut child = Command::new(kiln_testkit::bins::workspace_bin(
            "kiln-worker",
            kiln_testkit::bins::WORKER_SOURCES,
        ))
        .args(["--master", &format!("http://127.0.0.1:{port}")])
        .args(["--name", &format!("w{i}")])
        .arg("--workdir")
        .arg(dir.join(format!("w{i}")))
        .env("KILN_TOKEN", format!("t{i}"))
        .env("KILN_CACHE_DIR", dir.join("cache"))
        .env("RUST_LOG", level)
        .stdout(Stdio::null())
        .stderr(if timed {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .spawn()
        .unwrap();
        let took = timed.then(|| {
            let (tx, rx) = mpsc::channel();
            let stderr = child.stderr.take().unwrap();
            // Reads the worker's log to its end, so the pipe never fills.
            std::thread::spawn(move || {
                let show = std::env::var_os("KILN_BENCH_LOG").is_some();
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("connected") && !line.contains("disconnected") {
                        let _ = tx.send(Instant::now());
                    }
                    if show {
                        eprintln!("{line}");
                    }
                }
            });
            rx.recv_timeout(Duration::from_secs(30))
                .expect("the worker did not connect")
                - start
        });
        (WorkerProc { child }, took)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one request over a fresh connection; the status and the raw response.
fn request(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    // Anonymous requests must name this master as their Host: an IP address does.
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, response))
}

/// The status of `GET path`, or None if the master does not answer.
pub fn status(port: u16, path: &str) -> Option<u16> {
    request(port, "GET", path, "").ok().map(|(s, _)| s)
}

/// An API request whose answer must be a success; its JSON body.
pub fn api(port: u16, method: &str, path: &str, body: &str) -> Value {
    let (status, response) = request(port, method, path, body).unwrap();
    let (_, json) = response.split_once("\r\n\r\n").unwrap_or(("", ""));
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {}",
        &response[..response.len().min(500)]
    );
    serde_json::from_str(json).unwrap_or(Value::Null)
}

/// Waits until `ok`, checking every `every`.
pub fn wait_every(what: &str, within: Duration, every: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < within, "timed out: {what}");
        std::thread::sleep(every);
    }
}

/// Waits until `ok`, checking every 20 ms.
pub fn wait(what: &str, within: Duration, ok: impl FnMut() -> bool) {
    wait_every(what, within, Duration::from_millis(20), ok)
}

/// A field of `/proc/PID/status` in KiB (`VmHWM`, `VmRSS`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// Peak resident memory (VmHWM) in MiB.
pub fn vm_hwm_mib(pid: u32) -> f64 {
    proc_status_kib(pid, "VmHWM") as f64 / 1024.0
}

/// CPU time (user + system) a process has used, in ms.
pub fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / hz
}

/// The median of some durations, in ms.
pub fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

/// How long a command takes to run to its end, stdout to /dev/null.
pub fn time_command(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Duration {
    let program = program.as_ref();
    let t = Instant::now();
    let status = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{program:?} {args:?}: {status}");
    t.elapsed()
}
