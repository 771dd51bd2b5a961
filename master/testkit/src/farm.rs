//! A farm of real processes for tests: a `kiln master` on SQLite in a temporary directory
//! (plain or HTTPS through a private CA), `kiln-worker`s started and killed at will, and its
//! API (with an admin token), metrics, logs and database at hand. Dropped, it kills them all.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_db::Db;

use crate::bins::{KILN_SOURCES, WORKER_SOURCES};
use serde_json::Value;

/// A connection to the master's API, plain or TLS.
trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// A farm in a temporary directory.
pub struct Farm {
    pub dir: tempfile::TempDir,
    pub port: u16,
    master: Option<Child>,
    workers: HashMap<String, Child>,
    /// Set when the master serves HTTPS: the client side, trusting the farm's private CA.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// An admin API token, made when the master first starts; `api` sends it.
    pub token: Option<String>,
}

/// A port of 127.0.0.1 nothing listens on (now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Farm {
    /// A farm whose configuration is `[master]` (fixed port, SQLite in the directory, a fast
    /// heartbeat) followed by `rest`.
    pub fn new(rest: &str) -> Farm {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = format!(
            "[master]\nname = \"farm\"\nlisten = \"127.0.0.1:{port}\"\nheartbeat = \"1s\"\n\n{rest}"
        );
        std::fs::write(dir.path().join("kiln.toml"), config).unwrap();
        Farm {
            dir,
            port,
            master: None,
            workers: HashMap::new(),
            tls: None,
            token: None,
        }
    }

    /// A farm whose master serves HTTPS with a certificate (for `localhost` and 127.0.0.1)
    /// signed by a private CA, written to `ca.pem`.
    pub fn with_tls(rest: &str) -> Farm {
        let mut farm = Farm::new(rest);
        let dir = farm.path();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "Kiln farm test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let server =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = server
            .signed_by(&key, &rcgen::Issuer::from_params(&ca, &ca_key))
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("chain.pem"), cert.pem() + &ca_cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        let config = std::fs::read_to_string(dir.join("kiln.toml")).unwrap().replacen(
            "[master]\n",
            &format!(
                "[master]\ntls_cert = \"chain.pem\"\ntls_key = \"key.pem\"\nurl = \"https://localhost:{}/\"\n",
                farm.port
            ),
            1,
        );
        std::fs::write(dir.join("kiln.toml"), config).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        farm.tls = Some(std::sync::Arc::new(client));
        farm
    }

    /// The master's URL, as a worker is given it.
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("https://localhost:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// A handle on a running farm's API only (for blocking calls from async tests).
    pub fn attach(port: u16, token: Option<String>) -> Farm {
        Farm {
            dir: tempfile::tempdir().unwrap(),
            port,
            master: None,
            workers: HashMap::new(),
            tls: None,
            token,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join(format!("{name}.log")))
            .unwrap()
    }

    /// Starts the master and waits for its API.
    pub fn start_master(&mut self) {
        let child = Command::new(crate::bins::workspace_bin("kiln", KILN_SOURCES))
            .args(["master", "--poll", "0.05"])
            .current_dir(self.path())
            .env("KILN_LOG", "info")
            .env("KILN_CACHE_DIR", self.path().join("cache"))
            .stdout(Stdio::null())
            .stderr(self.log("master"))
            .spawn()
            .unwrap();
        self.master = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self.master.as_mut().unwrap().try_wait().unwrap();
            assert!(exited.is_none(), "the master exited: {}", self.logs());
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the master did not start: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.token.is_none() {
            self.token = Some(self.make_token("farm", "admin"));
        }
    }

    /// Makes an API token with `kiln token create`, as an administrator would.
    pub fn make_token(&self, name: &str, role: &str) -> String {
        let out = Command::new(crate::bins::workspace_bin("kiln", KILN_SOURCES))
            .args(["token", "create", name, "--role", role])
            .current_dir(self.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kiln token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    pub fn kill_master(&mut self) {
        if let Some(mut m) = self.master.take() {
            m.kill().unwrap();
            m.wait().unwrap();
        }
    }

    /// Starts a worker named `name` (token `t-NAME`) with its own base directory.
    pub fn start_worker(&mut self, name: &str, extra: &[&str]) {
        let child = Command::new(crate::bins::workspace_bin("kiln-worker", WORKER_SOURCES))
            .args(["--master", &self.url()])
            .args(["--name", name])
            .arg("--workdir")
            .arg(self.worker_dir(name))
            .args(extra)
            .env("KILN_TOKEN", format!("t-{name}"))
            .env("KILN_CACHE_DIR", self.path().join("cache"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(self.log(name))
            .spawn()
            .unwrap();
        self.workers.insert(name.to_owned(), child);
    }

    pub fn worker_dir(&self, name: &str) -> PathBuf {
        self.path().join(format!("worker-{name}"))
    }

    pub fn kill_worker(&mut self, name: &str) {
        if let Some(mut w) = self.workers.remove(name) {
            w.kill().unwrap();
            w.wait().unwrap();
        }
    }

    /// Sends a signal to a worker.
    pub fn signal_worker(&self, name: &str, signal: i32) {
        let pid = self.workers[name].id() as i32;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, signal) };
    }

    /// Waits for a worker process to exit; its status code.
    pub fn wait_worker(&mut self, name: &str, within: Duration) -> Option<i32> {
        let mut w = self.workers.remove(name).unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = w.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < within,
                "worker {name} did not exit: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.path()).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "log") {
                out += &format!(
                    "\n--- {} ---\n{}",
                    p.display(),
                    std::fs::read_to_string(&p).unwrap_or_default()
                );
            }
        }
        out
    }

    pub fn api(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        self.request(method, path, &auth, body)
    }

    /// A request with the given extra header lines (each ending in CRLF), no token unless
    /// they carry one.
    pub fn request(&self, method: &str, path: &str, headers: &str, body: &str) -> (u16, Value) {
        use std::io::Read;
        let tcp = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut s: Box<dyn ReadWrite> = match &self.tls {
            Some(config) => Box::new(rustls::StreamOwned::new(
                rustls::ClientConnection::new(config.clone(), "localhost".try_into().unwrap())
                    .unwrap(),
                tcp,
            )),
            None => Box::new(tcp),
        };
        write!(
            s,
            "{method} {path} HTTP/1.1\r\n{host}Content-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len(),
            // The caller's own Host, if it gives one.
            host = if headers.starts_with("Host:") {
                ""
            } else {
                "Host: 127.0.0.1\r\n"
            }
        )
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        let status = response[9..12].parse().unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        };
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        let (status, body) = self.api("GET", "/metrics", "");
        assert_eq!(status, 200, "{body}");
        body.as_str().unwrap().to_owned()
    }

    pub fn force(&self, scheduler: &str, body: Value) -> i64 {
        let (status, body) = self.api(
            "POST",
            &format!("/api/v2/forceschedulers/{scheduler}"),
            &body.to_string(),
        );
        assert_eq!(status, 200, "{body}");
        body["buildrequests"][0]["buildrequestid"].as_i64().unwrap()
    }

    pub async fn db(&self) -> Db {
        let url = format!(
            "sqlite://{}?mode=rwc",
            self.path().join("kiln.sqlite").display()
        );
        Db::connect(&url).await.unwrap()
    }

    /// Waits until `ok` holds, with the farm's logs on failure.
    pub fn wait_until(&self, what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ok() {
            assert!(
                start.elapsed() < within,
                "timed out waiting for {what}{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The builds of a request, oldest first.
    pub fn builds_of(&self, request: i64) -> Vec<Value> {
        let (status, body) = self.api(
            "GET",
            &format!("/api/v2/builds?buildrequestid={request}"),
            "",
        );
        assert_eq!(status, 200, "{body}");
        let mut builds = body["builds"].as_array().cloned().unwrap_or_default();
        builds.reverse();
        builds
    }

    pub fn build(&self, id: i64) -> Value {
        let (status, body) = self.api("GET", &format!("/api/v2/builds/{id}"), "");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Waits for a request's build `n` (0-based) to finish; returns it with its steps.
    pub fn finished_build(&self, request: i64, n: usize, within: Duration) -> Value {
        let mut found = Value::Null;
        self.wait_until(
            &format!("build {n} of request {request}"),
            within,
            || match self.builds_of(request).get(n) {
                Some(b) if b["complete"] == true => {
                    found = b.clone();
                    true
                }
                _ => false,
            },
        );
        self.build(found["buildid"].as_i64().unwrap())
    }

    pub fn log_text(&self, log: i64) -> String {
        let (status, body) = self.api("GET", &format!("/api/v2/logs/{log}/raw"), "");
        assert_eq!(status, 200);
        body.as_str().unwrap_or_default().to_owned()
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        self.kill_master();
        for (_, mut w) in self.workers.drain() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// The body of a response sent in chunks (a streamed download).
pub fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return body;
        }
        body.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").expect("a chunk's CRLF");
    }
}

/// Results as the API gives them.
pub const SUCCESS: &str = "SUCCESS";
/// A build that will be retried.
pub const RETRY: &str = "RETRY";

/// `[[workers]]` entries for workers `names` (token `t-NAME`, two builds at a time).
pub fn workers(names: &[&str], sandbox: bool) -> String {
    names
        .iter()
        .map(|n| format!("[[workers]]\nname = \"{n}\"\ntoken = \"t-{n}\"\nsandbox = {sandbox}\nmax_builds = 2\n\n"))
        .collect()
}
