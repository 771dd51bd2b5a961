//! The worker's copy of the master's file cache: modules named by SHA-1, fetched over HTTP and
//! kept on disk, verified by size and SHA-256 on every use.
//!
//! - A file lives at `<dir>/<sha1>` and nowhere else; names are checked to be exactly 40
//!   lowercase hex digits before they touch a path.
//! - Nothing on disk is trusted: a cache hit is verified (size, then SHA-256, streamed) before it
//!   is returned; a damaged file is logged, deleted and fetched again.
//! - A download streams into a temporary file in the same directory while it is hashed, stops as
//!   soon as it is longer than the job says, and becomes `<dir>/<sha1>` by rename only after
//!   size, SHA-256 and SHA-1 all match. A failed or interrupted download leaves nothing behind.
//! - Concurrent requests for one file wait for each other (a lock per SHA-1), so a file is
//!   downloaded once and never renamed over while another request verifies it.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use kiln_protocol::{FILECACHE_PATH, is_sha1, is_sha256};

/// The file a job names: what to fetch and what it must hash to. Borrowed, because the caller
/// holds these in its job description and the cache only reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRef<'a> {
    /// SHA-1 of the content, in lowercase hex: the file's name on the master and on disk.
    pub sha1: &'a str,
    /// SHA-256 of the content, in lowercase hex: what the content is verified against.
    pub sha256: &'a str,
    /// Size of the content in bytes.
    pub size: u64,
}

/// Largest error body read from the master; only its JSON `error` message is of interest.
const MAX_ERROR_BODY: usize = 16 << 10;

/// Read size when verifying a cached file.
const VERIFY_BUFFER: usize = 64 << 10;

/// Why a file could not be had. Every message names the file and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The job names a file by something that is not a digest; nothing was touched.
    #[error(
        "the job names a file by {what} {value:?}, which is not {expected}; the job is malformed \
         (a master and worker of different versions?)"
    )]
    BadName {
        /// "SHA-1" or "SHA-256".
        what: &'static str,
        /// What the job said.
        value: String,
        /// What it should have been.
        expected: &'static str,
    },
    /// The request could not be sent, or no answer came.
    #[error(
        "file {sha1}: cannot fetch it from the master (GET {url}): {reason}; check that the master is up and reachable"
    )]
    Request {
        /// The file.
        sha1: String,
        /// The URL asked.
        url: String,
        /// The error and its causes.
        reason: String,
    },
    /// The master answered with something other than 200.
    #[error("file {sha1}: the master answered {status} to GET {url}{}; {}", colon(.message), status_hint(.status))]
    Status {
        /// The file.
        sha1: String,
        /// The URL asked.
        url: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
        /// The master's JSON `error` message, if it sent one.
        message: Option<String>,
    },
    /// The body broke off.
    #[error(
        "file {sha1}: the download from {url} broke off after {received} bytes: {reason}; try again"
    )]
    Transfer {
        /// The file.
        sha1: String,
        /// The URL asked.
        url: String,
        /// Bytes received before the break.
        received: u64,
        /// The error and its causes.
        reason: String,
    },
    /// The master sent more bytes than the job says the file has; the download was stopped.
    #[error(
        "file {sha1}: the master sent more than the {size} bytes the job says it has; the master's copy \
         is corrupt or was replaced, or the job is wrong"
    )]
    TooLong {
        /// The file.
        sha1: String,
        /// The size the job gives.
        size: u64,
    },
    /// The master sent fewer bytes than the job says the file has.
    #[error(
        "file {sha1}: the master sent {received} bytes but the job says {size}; the master's copy is \
         corrupt or was replaced, or the job is wrong"
    )]
    TooShort {
        /// The file.
        sha1: String,
        /// The size the job gives.
        size: u64,
        /// Bytes received.
        received: u64,
    },
    /// The content's SHA-256 is not the job's.
    #[error(
        "file {sha1}: the master sent {size} bytes whose SHA-256 is {actual} but the job says {expected}; \
         the master's copy is corrupt or was replaced"
    )]
    Sha256 {
        /// The file.
        sha1: String,
        /// Its size.
        size: u64,
        /// The SHA-256 the job gives.
        expected: String,
        /// The SHA-256 of what was sent.
        actual: String,
    },
    /// The content matches the job's SHA-256 but not the name it was fetched by.
    #[error(
        "file {sha1}: the master sent content whose SHA-1 is {actual}, not the name it was asked for \
         (its SHA-256 matches the job's); the job pairs a SHA-1 with another file's SHA-256, which is \
         a master bug"
    )]
    Sha1 {
        /// The file, as named by the job.
        sha1: String,
        /// The SHA-1 of what was sent.
        actual: String,
    },
    /// The cache directory could not be read or written.
    #[error(
        "file {sha1}: {action}: {error}; check the worker's base directory (disk space, permissions)"
    )]
    Io {
        /// The file.
        sha1: String,
        /// What was being done, with the path.
        action: String,
        /// The error.
        error: io::Error,
    },
}

fn colon(message: &Option<String>) -> String {
    match message {
        Some(m) => format!(": {m}"),
        None => String::new(),
    }
}

fn status_hint(status: &reqwest::StatusCode) -> &'static str {
    match status.as_u16() {
        404 => {
            "the master no longer has it (removed since the job was sent?); upload the module again"
        }
        400 => "the master refused the name (a master and worker of different versions?)",
        401 | 403 => {
            "the master refused the worker; check its address and the worker's credentials"
        }
        s if s >= 500 => "the master failed; its log has the details",
        _ => "check that the worker's master address points at a Kiln master",
    }
}

/// An error and its causes, as one line: reqwest's own message omits the cause ("connection
/// refused"), which is the part a person can act on.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What [`inspect`] found at a file's place in the cache.
enum Cached {
    Missing,
    Good,
    Damaged(Damage),
}

/// What is wrong with a cached file.
enum Damage {
    NotAFile,
    Size(u64),
    Sha256(String),
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::NotAFile => write!(f, "it is not a regular file"),
            Damage::Size(n) => write!(f, "it is {n} bytes"),
            Damage::Sha256(h) => write!(f, "its SHA-256 is {h}"),
        }
    }
}

/// The worker's file cache: a directory of files named by SHA-1. Cheap to share behind an
/// `Arc`; every method takes `&self`.
pub struct FileCache {
    dir: PathBuf,
    /// One lock per SHA-1 being fetched or verified. Entries are weak so the map holds only
    /// files someone is waiting for; dead ones are pruned when a new one is added.
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl fmt::Debug for FileCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileCache").field("dir", &self.dir).finish()
    }
}

impl FileCache {
    /// Opens the cache at `dir`, creating it (mode 0700) if needed. Refuses a directory that
    /// is a symlink, belongs to another user or is writable by others: the worker runs what
    /// it finds there.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<FileCache> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        let dir = dir.into();
        let refuse =
            |why: &str| io::Error::other(format!("the file cache {}: {why}", dir.display()));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| refuse(&format!("cannot create it: {e}")))?;
        let meta =
            std::fs::symlink_metadata(&dir).map_err(|e| refuse(&format!("cannot read it: {e}")))?;
        if !meta.is_dir() {
            return Err(refuse("is not a directory (or is a symlink)"));
        }
        if meta.uid() != rustix::process::geteuid().as_raw() {
            return Err(refuse(
                "is owned by another user; the cache must be the worker's own",
            ));
        }
        if meta.permissions().mode() & 0o022 != 0 {
            return Err(refuse(
                "is writable by group or others; run chmod 700 on it",
            ));
        }
        Ok(FileCache {
            dir,
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a file is kept. `sha1` must already be known to be a SHA-1 ([`is_sha1`]).
    pub fn path_of(&self, sha1: &str) -> PathBuf {
        debug_assert!(is_sha1(sha1), "{sha1:?} is not a SHA-1");
        self.dir.join(sha1)
    }

    /// The path of `file`, verified: from the cache if the copy there matches, otherwise
    /// fetched from the master at `base_url` (`http://host:port`, a trailing slash is
    /// tolerated) with `client`, verified, then stored.
    pub async fn get(
        &self,
        client: &reqwest::Client,
        base_url: &str,
        file: FileRef<'_>,
    ) -> Result<PathBuf, CacheError> {
        if !is_sha1(file.sha1) {
            return Err(CacheError::BadName {
                what: "SHA-1",
                value: file.sha1.to_owned(),
                expected: "40 lowercase hex digits",
            });
        }
        if !is_sha256(file.sha256) {
            return Err(CacheError::BadName {
                what: "SHA-256",
                value: file.sha256.to_owned(),
                expected: "64 lowercase hex digits",
            });
        }
        let lock = self.lock_for(file.sha1);
        let _held = lock.lock().await;
        let path = self.path_of(file.sha1);
        let io_err = |action: String| {
            move |error| CacheError::Io {
                sha1: file.sha1.to_owned(),
                action,
                error,
            }
        };

        let check = {
            let (at, size, sha256) = (path.clone(), file.size, file.sha256.to_owned());
            tokio::task::spawn_blocking(move || inspect(&at, size, &sha256))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
                .map_err(io_err(format!("cannot check {}", path.display())))?
        };
        match check {
            Cached::Good => return Ok(path),
            Cached::Damaged(damage) => {
                tracing::warn!(
                    sha1 = %file.sha1,
                    path = %path.display(),
                    problem = %damage,
                    expected_size = file.size,
                    expected_sha256 = %file.sha256,
                    "cached file is damaged; deleting it and fetching it again"
                );
                std::fs::remove_file(&path)
                    .map_err(io_err(format!("cannot delete {}", path.display())))?;
            }
            Cached::Missing => {}
        }
        self.fetch(client, base_url, file, &path).await?;
        Ok(path)
    }

    /// The lock for one SHA-1, shared by everyone asking for it now.
    fn lock_for(&self, sha1: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(lock) = locks.get(sha1).and_then(Weak::upgrade) {
            return lock;
        }
        locks.retain(|_, w| w.strong_count() > 0);
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(sha1.to_owned(), Arc::downgrade(&lock));
        lock
    }

    /// Downloads `file` into a temporary file, verifies it and renames it to `path`.
    async fn fetch(
        &self,
        client: &reqwest::Client,
        base_url: &str,
        file: FileRef<'_>,
        path: &Path,
    ) -> Result<(), CacheError> {
        let sha1 = || file.sha1.to_owned();
        let url = format!(
            "{}{FILECACHE_PATH}{}",
            base_url.trim_end_matches('/'),
            file.sha1
        );
        let mut response = client
            .get(&url)
            .send()
            .await
            .map_err(|e| CacheError::Request {
                sha1: sha1(),
                url: url.clone(),
                reason: chain(&e),
            })?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            return Err(CacheError::Status {
                sha1: sha1(),
                url,
                status,
                message: error_message(response).await,
            });
        }
        if response.content_length().is_some_and(|n| n > file.size) {
            return Err(CacheError::TooLong {
                sha1: sha1(),
                size: file.size,
            });
        }

        let io_err = |action: String| {
            move |error| CacheError::Io {
                sha1: sha1(),
                action,
                error,
            }
        };
        let temp = tempfile::NamedTempFile::new_in(&self.dir).map_err(io_err(format!(
            "cannot create a temporary file in {}",
            self.dir.display()
        )))?;
        let writing = || format!("cannot write {}", temp.path().display());
        let mut out =
            tokio::fs::File::from_std(temp.as_file().try_clone().map_err(io_err(writing()))?);
        let mut sha256 = Sha256::new();
        let mut sha1_hash = sha1::Sha1::new();
        let mut received: u64 = 0;
        loop {
            let chunk = response.chunk().await.map_err(|e| CacheError::Transfer {
                sha1: sha1(),
                url: url.clone(),
                received,
                reason: chain(&e),
            })?;
            let Some(chunk) = chunk else { break };
            received += chunk.len() as u64;
            if received > file.size {
                // Dropping `temp` deletes what was written.
                return Err(CacheError::TooLong {
                    sha1: sha1(),
                    size: file.size,
                });
            }
            sha256.update(&chunk);
            sha1_hash.update(&chunk);
            out.write_all(&chunk).await.map_err(io_err(writing()))?;
        }
        out.flush().await.map_err(io_err(writing()))?;
        out.sync_all().await.map_err(io_err(writing()))?;
        drop(out);

        if received != file.size {
            return Err(CacheError::TooShort {
                sha1: sha1(),
                size: file.size,
                received,
            });
        }
        let actual = hex::encode(sha256.finalize());
        if actual != file.sha256 {
            return Err(CacheError::Sha256 {
                sha1: sha1(),
                size: received,
                expected: file.sha256.to_owned(),
                actual,
            });
        }
        let actual = hex::encode(sha1_hash.finalize());
        if actual != file.sha1 {
            return Err(CacheError::Sha1 {
                sha1: sha1(),
                actual,
            });
        }
        temp.persist(path).map_err(|e| CacheError::Io {
            sha1: sha1(),
            action: format!(
                "cannot rename {} to {}",
                e.file.path().display(),
                path.display()
            ),
            error: e.error,
        })?;
        tracing::debug!(sha1 = %file.sha1, size = file.size, "fetched file from the master");
        Ok(())
    }
}

/// Checks the cached copy at `path` against the size and SHA-256 the job gives. Blocking: reads
/// the whole file.
fn inspect(path: &Path, size: u64, sha256: &str) -> io::Result<Cached> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Cached::Missing),
        Err(e) => return Err(e),
    };
    if !meta.is_file() {
        return Ok(Cached::Damaged(Damage::NotAFile));
    }
    if meta.len() != size {
        return Ok(Cached::Damaged(Damage::Size(meta.len())));
    }
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; VERIFY_BUFFER];
    let mut read: u64 = 0;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        read += n as u64;
        hasher.update(&buf[..n]);
    }
    if read != size {
        // Changed under us between the metadata and the read.
        return Ok(Cached::Damaged(Damage::Size(read)));
    }
    let actual = hex::encode(hasher.finalize());
    Ok(if actual == sha256 {
        Cached::Good
    } else {
        Cached::Damaged(Damage::Sha256(actual))
    })
}

/// The master's JSON `error` message from an error response, if there is one (read up to
/// [`MAX_ERROR_BODY`] bytes).
async fn error_message(mut response: reqwest::Response) -> Option<String> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_ERROR_BODY {
            return None;
        }
    }
    let value: serde_json::Value = serde_json::from_slice(&body).ok()?;
    value.get("error")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// What the test server answers: a status and a body, or an endless body.
    #[derive(Clone)]
    enum Answer {
        Body(u16, Vec<u8>),
        /// 200 with no length, then bytes until the client hangs up.
        Endless,
    }

    /// A minimal HTTP/1.1 server on 127.0.0.1 that answers every request the same way after
    /// `delay`, and counts requests and the paths asked.
    struct Server {
        addr: SocketAddr,
        requests: Arc<AtomicUsize>,
        paths: Arc<Mutex<Vec<String>>>,
        /// Set when an endless body ended because the client hung up.
        hung_up: Arc<tokio::sync::Notify>,
    }

    impl Server {
        async fn start(answer: Answer, delay: Duration) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let requests = Arc::new(AtomicUsize::new(0));
            let paths = Arc::new(Mutex::new(Vec::new()));
            let hung_up = Arc::new(tokio::sync::Notify::new());
            let (r, p, h) = (requests.clone(), paths.clone(), hung_up.clone());
            tokio::spawn(async move {
                loop {
                    let (mut conn, _) = listener.accept().await.unwrap();
                    let (answer, r, p, h) = (answer.clone(), r.clone(), p.clone(), h.clone());
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                                return;
                            }
                            head.push(byte[0]);
                        }
                        r.fetch_add(1, Ordering::SeqCst);
                        let head = String::from_utf8_lossy(&head);
                        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                        p.lock().unwrap().push(path);
                        tokio::time::sleep(delay).await;
                        match answer {
                            Answer::Body(status, body) => {
                                let head = format!(
                                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                                    body.len()
                                );
                                let _ = conn.write_all(head.as_bytes()).await;
                                let _ = conn.write_all(&body).await;
                                let _ = conn.shutdown().await;
                            }
                            Answer::Endless => {
                                let _ = conn
                                    .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
                                    .await;
                                let block = vec![b'x'; 64 << 10];
                                while conn.write_all(&block).await.is_ok() {}
                                h.notify_one();
                            }
                        }
                    });
                }
            });
            Server {
                addr,
                requests,
                paths,
                hung_up,
            }
        }

        fn url(&self) -> String {
            format!("http://{}", self.addr)
        }

        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }
    }

    /// Content with its digests, as a job names it.
    struct Content {
        bytes: Vec<u8>,
        sha1: String,
        sha256: String,
    }

    impl Content {
        fn new(bytes: &[u8]) -> Content {
            Content {
                bytes: bytes.to_vec(),
                sha1: hex::encode(sha1::Sha1::digest(bytes)),
                sha256: hex::encode(Sha256::digest(bytes)),
            }
        }

        fn file(&self) -> FileRef<'_> {
            FileRef {
                sha1: &self.sha1,
                sha256: &self.sha256,
                size: self.bytes.len() as u64,
            }
        }
    }

    fn cache() -> (tempfile::TempDir, FileCache) {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::open(dir.path().join("cache")).unwrap();
        (dir, cache)
    }

    fn entries(cache: &FileCache) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    const MODULE: &[u8] = b"\0asm pretend this is a component, with some bytes \xff\x00\x01";

    #[tokio::test]
    async fn a_fetch_stores_and_a_hit_needs_no_request() {
        let content = Content::new(MODULE);
        let server = Server::start(Answer::Body(200, content.bytes.clone()), Duration::ZERO).await;
        let (_dir, cache) = cache();
        let client = reqwest::Client::new();

        // A trailing slash on the base is tolerated.
        let path = cache
            .get(&client, &format!("{}/", server.url()), content.file())
            .await
            .unwrap();
        assert_eq!(path, cache.dir().join(&content.sha1));
        assert_eq!(std::fs::read(&path).unwrap(), content.bytes);
        assert_eq!(server.requests(), 1);
        assert_eq!(
            *server.paths.lock().unwrap(),
            [format!("/filecache/{}", content.sha1)]
        );
        assert_eq!(
            entries(&cache),
            [content.sha1.as_str()],
            "no temporary left"
        );
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(cache.dir()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }

        let again = cache
            .get(&client, &server.url(), content.file())
            .await
            .unwrap();
        assert_eq!(again, path);
        assert_eq!(server.requests(), 1, "a verified hit is served from disk");
    }

    #[tokio::test]
    async fn a_damaged_cached_file_is_fetched_again() {
        let content = Content::new(MODULE);
        let server = Server::start(Answer::Body(200, content.bytes.clone()), Duration::ZERO).await;
        let (_dir, cache) = cache();
        let client = reqwest::Client::new();
        let path = cache
            .get(&client, &server.url(), content.file())
            .await
            .unwrap();

        // Same size, other bytes: only the SHA-256 can tell.
        let mut bad = content.bytes.clone();
        bad[3] ^= 0x20;
        std::fs::write(&path, &bad).unwrap();
        let path = cache
            .get(&client, &server.url(), content.file())
            .await
            .unwrap();
        assert_eq!(server.requests(), 2);
        assert_eq!(std::fs::read(&path).unwrap(), content.bytes);

        // Truncated.
        std::fs::write(&path, &content.bytes[..5]).unwrap();
        let path = cache
            .get(&client, &server.url(), content.file())
            .await
            .unwrap();
        assert_eq!(server.requests(), 3);
        assert_eq!(std::fs::read(&path).unwrap(), content.bytes);
        assert_eq!(entries(&cache), [content.sha1.as_str()]);
    }

    #[tokio::test]
    async fn wrong_content_is_refused_and_leaves_nothing() {
        let content = Content::new(MODULE);
        let mut other = content.bytes.clone();
        other[0] = b'!';
        let server = Server::start(Answer::Body(200, other), Duration::ZERO).await;
        let (_dir, cache) = cache();
        let e = cache
            .get(&reqwest::Client::new(), &server.url(), content.file())
            .await
            .unwrap_err();
        assert!(matches!(e, CacheError::Sha256 { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&content.sha1), "{text}");
        assert!(text.contains(&content.sha256), "{text}");
        assert!(text.contains("corrupt or was replaced"), "{text}");
        assert_eq!(entries(&cache), Vec::<String>::new());
    }

    #[tokio::test]
    async fn content_with_the_right_sha256_under_the_wrong_name_is_refused() {
        let content = Content::new(MODULE);
        let other_name = hex::encode(sha1::Sha1::digest(b"another file"));
        let server = Server::start(Answer::Body(200, content.bytes.clone()), Duration::ZERO).await;
        let (_dir, cache) = cache();
        let file = FileRef {
            sha1: &other_name,
            ..content.file()
        };
        let e = cache
            .get(&reqwest::Client::new(), &server.url(), file)
            .await
            .unwrap_err();
        assert!(matches!(e, CacheError::Sha1 { .. }), "{e:?}");
        assert!(e.to_string().contains(&content.sha1), "{e}");
        assert_eq!(entries(&cache), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_body_longer_than_the_size_is_refused() {
        let content = Content::new(MODULE);
        let mut longer = content.bytes.clone();
        longer.push(0);
        let server = Server::start(Answer::Body(200, longer), Duration::ZERO).await;
        let (_dir, cache) = cache();
        let e = cache
            .get(&reqwest::Client::new(), &server.url(), content.file())
            .await
            .unwrap_err();
        assert!(matches!(e, CacheError::TooLong { .. }), "{e:?}");
        assert_eq!(entries(&cache), Vec::<String>::new());

        // Shorter is refused too.
        let server = Server::start(
            Answer::Body(200, content.bytes[..10].to_vec()),
            Duration::ZERO,
        )
        .await;
        let e = cache
            .get(&reqwest::Client::new(), &server.url(), content.file())
            .await
            .unwrap_err();
        assert!(
            matches!(e, CacheError::TooShort { received: 10, .. }),
            "{e:?}"
        );
        assert_eq!(entries(&cache), Vec::<String>::new());
    }

    #[tokio::test]
    async fn an_endless_body_is_cut_off_at_the_size() {
        let content = Content::new(MODULE);
        let server = Server::start(Answer::Endless, Duration::ZERO).await;
        let (_dir, cache) = cache();
        let e = tokio::time::timeout(
            Duration::from_secs(20),
            cache.get(&reqwest::Client::new(), &server.url(), content.file()),
        )
        .await
        .expect("the download stops once it is longer than the size")
        .unwrap_err();
        assert!(matches!(e, CacheError::TooLong { .. }), "{e:?}");
        tokio::time::timeout(Duration::from_secs(20), server.hung_up.notified())
            .await
            .expect("the worker hangs up");
        assert_eq!(entries(&cache), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_404_says_so_with_the_masters_message() {
        let content = Content::new(MODULE);
        let body = format!(r#"{{"error":"no file {}"}}"#, content.sha1).into_bytes();
        let server = Server::start(Answer::Body(404, body), Duration::ZERO).await;
        let (_dir, cache) = cache();
        let e = cache
            .get(&reqwest::Client::new(), &server.url(), content.file())
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(&e, CacheError::Status { status, message: Some(m), .. }
                if status.as_u16() == 404 && *m == format!("no file {}", content.sha1)),
            "{e:?}"
        );
        assert!(text.contains("404"), "{text}");
        assert!(text.contains("upload the module again"), "{text}");
        assert_eq!(entries(&cache), Vec::<String>::new());
    }

    #[tokio::test]
    async fn an_unreachable_master_says_why() {
        let content = Content::new(MODULE);
        // A port nobody listens on: bind one, then close it.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let (_dir, cache) = cache();
        let e = cache
            .get(
                &reqwest::Client::new(),
                &format!("http://{addr}"),
                content.file(),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, CacheError::Request { .. }), "{e:?}");
        assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
    }

    #[tokio::test]
    async fn bad_names_are_refused_without_a_request() {
        let content = Content::new(MODULE);
        let server = Server::start(Answer::Body(200, content.bytes.clone()), Duration::ZERO).await;
        let (_dir, cache) = cache();
        let client = reqwest::Client::new();
        let upper = content.sha1.to_uppercase();
        let traversal = format!("../{}", &content.sha1[3..]);
        for sha1 in [upper.as_str(), &content.sha1[1..], traversal.as_str(), ""] {
            let file = FileRef {
                sha1,
                ..content.file()
            };
            let e = cache.get(&client, &server.url(), file).await.unwrap_err();
            assert!(
                matches!(e, CacheError::BadName { what: "SHA-1", .. }),
                "{sha1:?}: {e:?}"
            );
        }
        let file = FileRef {
            sha256: &content.sha256[..63],
            ..content.file()
        };
        let e = cache.get(&client, &server.url(), file).await.unwrap_err();
        assert!(
            matches!(
                e,
                CacheError::BadName {
                    what: "SHA-256",
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(server.requests(), 0);
        assert_eq!(entries(&cache), Vec::<String>::new());
    }

    #[tokio::test]
    async fn concurrent_gets_fetch_once() {
        let content = Content::new(MODULE);
        let server = Server::start(
            Answer::Body(200, content.bytes.clone()),
            Duration::from_millis(200),
        )
        .await;
        let (_dir, cache) = cache();
        let client = reqwest::Client::new();
        let url = server.url();
        let gets = (0..4).map(|_| cache.get(&client, &url, content.file()));
        for path in futures_util::future::join_all(gets).await {
            assert_eq!(std::fs::read(path.unwrap()).unwrap(), content.bytes);
        }
        assert_eq!(server.requests(), 1);
        assert_eq!(entries(&cache), [content.sha1.as_str()]);
        assert!(
            cache
                .locks
                .lock()
                .unwrap()
                .values()
                .all(|w| w.strong_count() == 0)
        );
    }

    #[test]
    fn a_cache_writable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = FileCache::open(&open).unwrap_err();
        assert!(e.to_string().contains("chmod 700"), "{e}");
    }
}
