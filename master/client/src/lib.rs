//! A client of a master's HTTP API (the `kiln` commands are one): where the master is and which
//! token to send (options, `KILN_TOKEN`, `~/.config/kiln/client.toml`), requests
//! over reqwest (rustls, with `--ca-cert` beside the public roots, as the worker does), the
//! API's JSON errors turned into messages that say what to do, and a reader of the
//! Server-Sent Events of `GET /api/v2/events`.

pub mod follow;

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::StatusCode;
use serde_json::Value;

/// Where a master is when nothing says otherwise: `[master] listen`'s default.
pub const DEFAULT_MASTER: &str = "http://127.0.0.1:8010";

/// How long a request may take (uploads and the event stream have their own limits).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an upload may take: a module may be 64 MiB, and the master compiles it to check it.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// How long the event stream may stay silent before it is taken for dead: the master sends a
/// keep-alive every 15 s, so this is three missed ones.
const STREAM_SILENCE: Duration = Duration::from_secs(45);

/// Where the master is and how to reach it, as a command's flags (or their environment
/// variables) say; `None` leaves it to the client file and the defaults.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// The master's URL. Default: `master` in the client file, else [`DEFAULT_MASTER`].
    pub master: Option<String>,
    /// A file holding the API token (else `KILN_TOKEN`, else `token` in the client file).
    pub token_file: Option<PathBuf>,
    /// A PEM file of certificate authorities to trust beside the public ones (a farm's private
    /// CA, or the master's own certificate if it is self-signed).
    pub ca_cert: Option<PathBuf>,
}

/// Exit status of a command the master refused (bad input): the same as a command line error.
pub const EXIT_REFUSED: u8 = 2;

/// Exit status of a command that could not reach the master, or that the master failed.
pub const EXIT_UNREACHABLE: u8 = 1;

/// `path?k=v&...`, the values encoded.
pub fn with_query(path: &str, pairs: &[(&str, &str)]) -> String {
    let mut url = reqwest::Url::parse("http://x/").expect("a fixed URL");
    url.query_pairs_mut().extend_pairs(pairs);
    match url.query() {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_owned(),
    }
}

/// A path segment, encoded (a builder or module name from the command line).
pub fn segment(text: &str) -> String {
    let mut url = reqwest::Url::parse("http://x/").expect("a fixed URL");
    url.path_segments_mut()
        .expect("an http URL has segments")
        .push(text);
    url.path()[1..].to_owned()
}

/// The (request id, builder) of each request a submission (force, try) made.
pub fn submitted_requests(submitted: &Value) -> Vec<(i64, String)> {
    submitted["buildrequests"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter_map(|r| Some((r["buildrequestid"].as_i64()?, text(&r["builder"]))))
                .collect()
        })
        .unwrap_or_default()
}

/// A field of the API's JSON as text: a string as it is, null as "", anything else (a number)
/// as written.
pub fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The client configuration file, `~/.config/kiln/client.toml` (or under `$XDG_CONFIG_HOME`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// The master's URL, as `--master` takes it.
    pub master: Option<String>,
    /// An API token (`kiln_` and 64 hex digits), as `kiln token create` prints it.
    pub token: Option<String>,
    /// Certificate authorities to trust, as `--ca-cert` takes them (relative to the file).
    pub ca_cert: Option<PathBuf>,
}

/// Where the client configuration file is: `$XDG_CONFIG_HOME/kiln/client.toml`, else
/// `~/.config/kiln/client.toml`.
pub fn config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("kiln").join("client.toml"))
}

/// Reads the client configuration file, if there is one.
fn read_config(path: &Path) -> anyhow::Result<Option<ClientFile>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let file: ClientFile = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {}; the keys are master, token and ca_cert",
            path.display(),
            e.message()
        )
    })?;
    if file.token.is_some() && is_readable_by_others(path) {
        eprintln!(
            "kiln: warning: {} holds an API token and other users can read it; chmod 600 it",
            path.display()
        );
    }
    Ok(Some(file))
}

fn is_readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

/// Where the token came from, for messages (the token itself is never shown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `--token-file FILE`.
    File(PathBuf),
    /// The `KILN_TOKEN` environment variable.
    Env,
    /// `token` in the client configuration file.
    Config(PathBuf),
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::File(p) => write!(f, "--token-file {}", p.display()),
            TokenSource::Env => f.write_str("KILN_TOKEN"),
            TokenSource::Config(p) => write!(f, "`token` in {}", p.display()),
        }
    }
}

/// Why a request did not get the answer it wanted. Each kind has its exit status: 1 when the
/// master could not be reached or failed, 2 when it refused what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered at the master's address, or TLS failed.
    #[error("cannot reach the master at {url}: {reason}{hint}")]
    Unreachable {
        /// The master's URL.
        url: String,
        /// The innermost cause ("Connection refused (os error 111)").
        reason: String,
        /// What to do about it.
        hint: String,
    },
    /// The master refused the request (4xx): the input, the token or its role is wrong.
    #[error("{message} ({status}){advice}")]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The master's message.
        message: String,
        /// What to do, for the statuses that have a general answer (401, 403).
        advice: String,
    },
    /// The master failed (5xx), or what answered is not a Kiln master.
    #[error("{0}")]
    Failed(String),
}

impl ClientError {
    /// The exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Refused { .. } => EXIT_REFUSED,
            ClientError::Unreachable { .. } | ClientError::Failed(_) => EXIT_UNREACHABLE,
        }
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An API client of one master.
pub struct Client {
    /// The master's URL, without a trailing slash.
    base: String,
    http: reqwest::Client,
    token: Option<(String, TokenSource)>,
    /// The client configuration file, when it exists (for messages).
    config: Option<PathBuf>,
    /// Whether the master was named (flag, environment or file), not the default.
    named: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|(_, source)| source))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client as the options, the environment and the configuration file say. Errors are
    /// the user's to fix (a bad URL, an unreadable token file).
    pub fn new(args: &ClientOptions) -> anyhow::Result<Client> {
        let path = config_path();
        let file = match &path {
            Some(p) => read_config(p)?,
            None => None,
        };
        let config = path.filter(|_| file.is_some());
        let file = file.unwrap_or_default();
        let named = args.master.is_some() || file.master.is_some();
        let base = args
            .master
            .clone()
            .or(file.master.clone())
            .unwrap_or_else(|| DEFAULT_MASTER.to_owned());
        let base = check_url(&base)?;
        let token = token(args, &file, config.as_deref())?;
        let ca_cert = match (&args.ca_cert, &file.ca_cert, &config) {
            (Some(p), ..) => Some(p.clone()),
            (None, Some(p), Some(c)) => Some(c.parent().unwrap_or(Path::new(".")).join(p)),
            _ => None,
        };
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &ca_cert {
            let pem = std::fs::read(path)
                .with_context(|| format!("--ca-cert {}: cannot read it", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow::anyhow!("--ca-cert {}: {e}", path.display()))?;
            if certs.is_empty() {
                bail!(
                    "--ca-cert {}: no certificate found; give a PEM file with -----BEGIN CERTIFICATE----- blocks",
                    path.display()
                );
            }
            for cert in certs {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http.build().context("building the HTTP client")?;
        Ok(Client {
            base,
            http,
            token,
            config,
            named,
        })
    }

    /// The master's URL, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether the master was named by a flag, `KILN_MASTER` or the configuration file.
    pub fn master_named(&self) -> bool {
        self.named
    }

    /// A link to a page of the web UI (`#/builds/12`).
    pub fn page(&self, route: &str) -> String {
        format!("{}/#{route}", self.base)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(REQUEST_TIMEOUT);
        if let Some((token, _)) = &self.token {
            r = r.bearer_auth(token);
        }
        r
    }

    /// `GET path` (with its query), the answer's JSON.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(
            self.request(reqwest::Method::POST, path)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string()),
        )
        .await
    }

    /// `POST path` with `bytes` of `content_type` as the body (a module upload).
    pub async fn upload(
        &self,
        path: &str,
        query: &[(&str, &str)],
        content_type: &str,
        bytes: Vec<u8>,
    ) -> Result<Value, ClientError> {
        self.send(
            self.request(reqwest::Method::POST, path)
                .query(query)
                .timeout(UPLOAD_TIMEOUT)
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(bytes),
        )
        .await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.request(reqwest::Method::DELETE, path)).await
    }

    /// Opens `GET /api/v2/events?QUERY`. The master has subscribed the stream by the time this
    /// returns, so nothing that happens afterwards is missed.
    pub async fn events(&self, query: &str) -> Result<EventStream, ClientError> {
        let mut r = self
            .http
            .get(format!("{}/api/v2/events?{query}", self.base))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some((token, _)) = &self.token {
            r = r.bearer_auth(token);
        }
        // The stream has no overall timeout, but its answer must come.
        let response = match tokio::time::timeout(REQUEST_TIMEOUT, r.send()).await {
            Ok(sent) => sent.map_err(|e| self.unreachable(&e))?,
            Err(_) => {
                return Err(ClientError::Unreachable {
                    url: self.base.clone(),
                    reason: format!(
                        "its event stream did not answer within {} s",
                        REQUEST_TIMEOUT.as_secs()
                    ),
                    hint: String::new(),
                });
            }
        };
        if !response.status().is_success() {
            return Err(self.refusal(response).await);
        }
        Ok(EventStream {
            response,
            parser: SseParser::default(),
            ready: VecDeque::new(),
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        if !response.status().is_success() {
            return Err(self.refusal(response).await);
        }
        let status = response.status();
        let is_json = content_type(&response).starts_with("application/json");
        let body = response.bytes().await.map_err(|e| self.unreachable(&e))?;
        if !is_json {
            return Err(self.not_kiln(status));
        }
        serde_json::from_slice(&body).map_err(|_| self.not_kiln(status))
    }

    fn not_kiln(&self, status: StatusCode) -> ClientError {
        ClientError::Failed(format!(
            "what answered at {} ({status}) is not a Kiln master's API; check --master",
            self.base
        ))
    }

    /// An error answer, as a [`ClientError`] with its advice.
    async fn refusal(&self, response: reqwest::Response) -> ClientError {
        let status = response.status();
        let is_json = content_type(&response).starts_with("application/json");
        let body = response.bytes().await.unwrap_or_default();
        let message = serde_json::from_slice::<Value>(&body)
            .ok()
            .filter(|_| is_json)
            .and_then(|v| v["error"].as_str().map(str::to_owned));
        let Some(message) = message else {
            return self.not_kiln(status);
        };
        if status.is_server_error() {
            return ClientError::Failed(format!(
                "the master at {} failed ({status}): {message}",
                self.base
            ));
        }
        let advice = match status {
            StatusCode::UNAUTHORIZED => self.token_advice(),
            StatusCode::FORBIDDEN if self.token.is_some() => format!(
                "\nkiln: the token from {} lacks that role; ask the master's administrator for one that has it",
                self.token
                    .as_ref()
                    .map(|(_, s)| s.to_string())
                    .unwrap_or_default()
            ),
            _ => String::new(),
        };
        ClientError::Refused {
            status,
            message,
            advice,
        }
    }

    /// What to do about a 401: where the client looks for a token, and how one is made.
    fn token_advice(&self) -> String {
        let file = self
            .config
            .clone()
            .or_else(config_path)
            .map_or("~/.config/kiln/client.toml".to_owned(), |p| {
                p.display().to_string()
            });
        match &self.token {
            Some((_, source)) => format!(
                "\nkiln: the token came from {source}; check that it was made on this master's farm and not revoked (`kiln token list` on the master's machine)"
            ),
            None => format!(
                "\nkiln: this needs an API token: set KILN_TOKEN, give --token-file FILE, or put `token = \"kiln_...\"` in {file}; make one on the master's machine with `kiln token create NAME --role ROLE`"
            ),
        }
    }

    fn unreachable(&self, e: &reqwest::Error) -> ClientError {
        let reason = innermost(e);
        let hint = if e.is_timeout() {
            "; it did not answer in time".to_owned()
        } else if reason.contains("certificate") || reason.contains("Certificate") {
            if reason.contains("UnknownIssuer") {
                "; the master's certificate is not signed by an authority this client trusts: give --ca-cert with the CA that signed it (or the certificate itself, if it is self-signed)".to_owned()
            } else if reason.contains("NotValidForName") {
                "; the master's certificate does not name the host in the URL: use a name it has"
                    .to_owned()
            } else {
                "; the master's certificate was refused".to_owned()
            }
        } else {
            let named = if self.named {
                ""
            } else {
                " (the default; give --master URL, set KILN_MASTER, or put `master = \"...\"` in ~/.config/kiln/client.toml)"
            };
            format!("; is the master running there?{named}")
        };
        ClientError::Unreachable {
            url: self.base.clone(),
            reason,
            hint,
        }
    }
}

fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// The innermost cause of an error: reqwest's own message ("error sending request") omits
/// what a person can act on ("Connection refused").
fn innermost(error: &dyn std::error::Error) -> String {
    let mut last = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}

/// Checks a master URL and strips its trailing slash.
fn check_url(url: &str) -> anyhow::Result<String> {
    let parsed = reqwest::Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    match parsed {
        Some(u) if u.query().is_none() => Ok(url.trim_end_matches('/').to_owned()),
        _ => bail!("master URL {url:?}: give http://HOST:PORT or https://HOST:PORT"),
    }
}

/// The token to send: `--token-file`, else `KILN_TOKEN`, else the configuration file's.
fn token(
    args: &ClientOptions,
    file: &ClientFile,
    config: Option<&Path>,
) -> anyhow::Result<Option<(String, TokenSource)>> {
    let shaped = |t: &str| kiln_protocol::api::is_token(t.trim());
    if let Some(path) = &args.token_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--token-file {}: cannot read it", path.display()))?;
        if !shaped(&text) {
            bail!(
                "--token-file {}: it does not hold a Kiln API token (kiln_ and 64 hex digits, as `kiln token create` prints)",
                path.display()
            );
        }
        return Ok(Some((
            text.trim().to_owned(),
            TokenSource::File(path.clone()),
        )));
    }
    if let Ok(text) = std::env::var("KILN_TOKEN")
        && !text.is_empty()
    {
        if shaped(&text) {
            return Ok(Some((text.trim().to_owned(), TokenSource::Env)));
        }
        // kiln-worker reads its worker password from KILN_TOKEN too; on a worker's machine
        // that is what this is, and sending it would only get every request refused.
        eprintln!(
            "kiln: warning: KILN_TOKEN is not an API token (kiln_ and 64 hex digits), so it is not sent (a worker's token? kiln-worker reads KILN_TOKEN too)"
        );
    }
    if let (Some(text), Some(path)) = (&file.token, config) {
        if !shaped(text) {
            bail!(
                "{}: token: not a Kiln API token (kiln_ and 64 hex digits, as `kiln token create` prints)",
                path.display()
            );
        }
        return Ok(Some((
            text.trim().to_owned(),
            TokenSource::Config(path.to_owned()),
        )));
    }
    Ok(None)
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// Its type (`event:`), `message` when none was given.
    pub event: String,
    /// Its data, lines joined with `\n`.
    pub data: String,
}

/// Server-Sent Events from bytes as they arrive, however they are cut (the format of the
/// WHATWG HTML standard: `field: value` lines, an event per blank line, `:` comments).
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    event: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// Feeds bytes; the events they complete.
    pub fn feed(&mut self, bytes: &[u8], out: &mut VecDeque<SseEvent>) {
        for &b in bytes {
            if b == b'\n' {
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.line_done(&String::from_utf8_lossy(&line), out);
            } else {
                self.line.push(b);
            }
        }
    }

    fn line_done(&mut self, line: &str, out: &mut VecDeque<SseEvent>) {
        if line.is_empty() {
            let event = std::mem::take(&mut self.event);
            let data = std::mem::take(&mut self.data);
            if std::mem::take(&mut self.has_data) {
                out.push_back(SseEvent {
                    event: if event.is_empty() {
                        "message".into()
                    } else {
                        event
                    },
                    data,
                });
            }
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
    }
}

/// The live event stream of a master.
#[derive(Debug)]
pub struct EventStream {
    response: reqwest::Response,
    parser: SseParser,
    ready: VecDeque<SseEvent>,
}

impl EventStream {
    /// The next event. `Err` says why the stream is no longer usable (it ended, failed, or
    /// was silent for longer than the master's keep-alives allow).
    pub async fn next(&mut self) -> Result<SseEvent, String> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Ok(e);
            }
            match tokio::time::timeout(STREAM_SILENCE, self.response.chunk()).await {
                Err(_) => return Err(format!("silent for {} s", STREAM_SILENCE.as_secs())),
                Ok(Err(e)) => return Err(innermost(&e)),
                Ok(Ok(None)) => return Err("the master closed it".into()),
                Ok(Ok(Some(bytes))) => self.parser.feed(&bytes, &mut self.ready),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_segments_encode_nothing_twice() {
        assert_eq!(
            with_query("/api/v2/builds", &[("builder", "a b&c"), ("limit", "2")]),
            "/api/v2/builds?builder=a+b%26c&limit=2"
        );
        assert_eq!(with_query("/x", &[]), "/x");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }

    fn parse(chunks: &[&str]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = VecDeque::new();
        for c in chunks {
            p.feed(c.as_bytes(), &mut out);
        }
        out.into()
    }

    fn event(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn events_are_parsed_however_the_bytes_are_cut() {
        let text = "event: log\ndata: {\"logid\":1}\n\n: keep-alive\n\nevent: build\r\ndata:{\"a\":1}\r\n\r\n";
        let whole = parse(&[text]);
        assert_eq!(
            whole,
            vec![event("log", "{\"logid\":1}"), event("build", "{\"a\":1}")]
        );
        // Byte by byte, the same events.
        let bytes: Vec<String> = text.chars().map(String::from).collect();
        let cut: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(parse(&cut), whole);
    }

    #[test]
    fn data_lines_join_and_events_without_data_are_dropped() {
        assert_eq!(
            parse(&["data: one\ndata: two\n\nevent: empty\n\ndata\n\n"]),
            vec![event("message", "one\ntwo"), event("message", "")]
        );
        // An event not yet ended by a blank line is held back.
        assert_eq!(parse(&["event: log\ndata: x\n"]), vec![]);
    }

    #[test]
    fn master_urls_are_checked() {
        assert_eq!(
            check_url("http://127.0.0.1:8010/").unwrap(),
            "http://127.0.0.1:8010"
        );
        assert_eq!(
            check_url("https://ci.example.org").unwrap(),
            "https://ci.example.org"
        );
        for bad in ["127.0.0.1:8010", "ftp://x", "http://x/?a=b", ""] {
            let e = check_url(bad).unwrap_err().to_string();
            assert!(e.contains("give http://HOST:PORT"), "{bad}: {e}");
        }
    }
}
