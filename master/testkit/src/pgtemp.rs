//! A throwaway PostgreSQL server for tests and benchmarks: a fresh cluster in a temporary
//! directory, listening on a free port of 127.0.0.1, stopped and deleted when dropped or when
//! the process that started it exits (even by a panic or a kill).
//!
//! It uses Debian's `postgresql` package (`/usr/lib/postgresql/*/bin`), or the directory named
//! by `KILN_PG_BINDIR`. Run as root, the server runs as the `postgres` user, since PostgreSQL
//! refuses to run as root.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running temporary PostgreSQL server.
pub struct TempPostgres {
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
    // Closing this pipe tells the watchdog shell to stop the server and delete its directory.
    watchdog_stdin: Option<ChildStdin>,
    watchdog: Child,
}

impl std::fmt::Debug for TempPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TempPostgres")
            .field("port", &self.port)
            .field("dir", &self.dir)
            .finish()
    }
}

/// How long a new cluster may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn bindir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KILN_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "PostgreSQL is not installed: install Debian's package (`apt-get install -y \
             postgresql`; `.ci/run` does this) or set KILN_PG_BINDIR to the directory holding \
             `initdb` and `postgres`"
        ),
    }
}

/// The uid and gid to run the server as: ours, or the `postgres` user's when we are root.
fn server_user() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 3 && fields[0] == "postgres" {
            return Ok(Some((fields[2].parse()?, fields[3].parse()?)));
        }
    }
    bail!("running as root, and there is no `postgres` user to run PostgreSQL as")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl TempPostgres {
    /// Creates and starts a cluster. `durable` keeps PostgreSQL's fsync on (benchmarks);
    /// tests turn it off.
    pub fn start(durable: bool) -> anyhow::Result<TempPostgres> {
        let bin = bindir()?;
        let user = server_user()?;
        let dir = tempfile::Builder::new()
            .prefix("kiln-pg-")
            .tempdir()
            .context("creating the cluster directory")?
            .keep();
        let data = dir.join("data");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .context("giving the cluster directory to the postgres user")?;
        }
        let as_user = |cmd: &mut Command| {
            if let Some((uid, gid)) = user {
                cmd.uid(uid).gid(gid);
            }
        };
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .arg("-D")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_user(&mut initdb);
        let out = initdb.output().context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let port = free_port()?;
        let fsync = if durable { "on" } else { "off" };
        // The watchdog shell runs the server and waits for its stdin to close: when we drop
        // the handle, or our process dies for any reason, it stops the server (fast shutdown)
        // and removes the cluster.
        let script = format!(
            "\"$1\" -D \"$2\" -p {port} -k \"$3\" -c listen_addresses=127.0.0.1 \
             -c fsync={fsync} -c max_connections=200 >\"$3/server.log\" 2>&1 & pid=$!; \
             read _; kill -INT $pid; wait $pid; rm -rf \"$3\""
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg("kiln-pg-watchdog")
            .arg(bin.join("postgres"))
            .arg(&data)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        as_user(&mut cmd);
        let mut watchdog = cmd.spawn().context("starting postgres")?;
        let stdin = watchdog.stdin.take();
        let server = TempPostgres {
            bin,
            port,
            dir,
            watchdog_stdin: stdin,
            watchdog,
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                // Accepting TCP is not yet accepting queries; pg_isready says when it is.
                let ready = Command::new(self.bin.join("pg_isready"))
                    .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(true);
                if ready {
                    return Ok(());
                }
            }
            if start.elapsed() > START_TIMEOUT {
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                bail!("postgres did not start within {START_TIMEOUT:?}: {log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// `psql` connected to database `name` on this server, quiet, stopping at the first error.
    pub fn psql(&self, name: &str) -> Command {
        let mut cmd = self.client("psql");
        cmd.args(["-q", "-v", "ON_ERROR_STOP=1", "-d", name]);
        cmd
    }

    /// One of PostgreSQL's client programs, pointed at this server as its superuser.
    fn client(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres"]);
        cmd
    }

    /// Creates a new, empty database and returns its URL.
    pub fn create_database(&self) -> anyhow::Result<String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "kiln_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = self
            .client("createdb")
            .arg(&name)
            .output()
            .context("running createdb")?;
        if !out.status.success() {
            bail!(
                "createdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(self.url(&name))
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.watchdog_stdin.take() {
            let _ = stdin.write_all(b"stop\n");
        }
        let _ = self.watchdog.wait();
    }
}
