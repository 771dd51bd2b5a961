//! A small Chrome DevTools Protocol client for the UI tests: it starts a headless Chromium,
//! opens one page, and drives it over the DevTools WebSocket (navigate, evaluate, screenshot),
//! collecting what the page reports as an error (exceptions, console errors, failed loads,
//! Content-Security-Policy violations).
//!
//! Hand-written on the blocking tungstenite client that tokio-tungstenite already brings, rather
//! than chromiumoxide or headless_chrome: the tests need four commands, and those crates would
//! add their generated protocol bindings (hundreds of thousands of lines) to every CI build.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message, WebSocket};

/// Where Debian's `chromium` package puts the browser; `KILN_TEST_CHROMIUM` overrides it.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Longest wait for one DevTools answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The page's size: a laptop screen.
const VIEWPORT: (u32, u32) = (1280, 860);

/// A headless Chromium with one page open.
pub struct Browser {
    // Dropped first: Chromium stops before its profile directory goes.
    _process: Process,
    profile: tempfile::TempDir,
    socket: WebSocket<TcpStream>,
    next_id: u64,
    session: String,
    /// What the page reported as errors since the last `take_errors`.
    errors: Vec<String>,
}

fn chromium() -> PathBuf {
    let path = std::env::var_os("KILN_TEST_CHROMIUM")
        .map_or_else(|| PathBuf::from(CHROMIUM), PathBuf::from);
    assert!(
        path.exists(),
        "the UI tests need Chromium, and {} does not exist: install Debian's chromium package \
         (`sudo apt-get install chromium`; .ci/run does this) or set KILN_TEST_CHROMIUM to a \
         Chromium or Chrome binary",
        path.display()
    );
    path
}

impl Browser {
    /// Starts Chromium with a fresh profile and opens a blank page.
    pub fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let stderr = std::fs::File::create(profile.path().join("stderr.log")).unwrap();
        let mut process = Process(
            Command::new(chromium())
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-extensions",
                    "--remote-debugging-port=0",
                ])
                .arg(format!(
                    "--user-data-dir={}",
                    profile.path().join("data").display()
                ))
                .arg(format!("--window-size={},{}", VIEWPORT.0, VIEWPORT.1))
                .arg("about:blank")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium().display())),
        );
        // Chromium writes its port and browser endpoint once it listens.
        let active = profile.path().join("data/DevToolsActivePort");
        let start = Instant::now();
        let (port, path) = loop {
            if let Ok(text) = std::fs::read_to_string(&active)
                && let Some((port, path)) = text.split_once('\n')
                && !path.trim().is_empty()
            {
                break (port.trim().parse::<u16>().unwrap(), path.trim().to_owned());
            }
            if let Some(status) = process.0.try_wait().unwrap() {
                panic!(
                    "Chromium exited ({status}) before listening: {}",
                    log(profile.path())
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "Chromium did not start within 30 s: {}",
                log(profile.path())
            );
            std::thread::sleep(Duration::from_millis(25));
        };
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(COMMAND_TIMEOUT)).unwrap();
        let (socket, _) = tungstenite::client(format!("ws://127.0.0.1:{port}{path}"), stream)
            .expect("the DevTools handshake failed");
        // From here reads wake up often, so a command's own deadline is checked.
        socket
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut browser = Browser {
            _process: process,
            profile,
            socket,
            next_id: 0,
            session: String::new(),
            errors: Vec::new(),
        };
        let target = browser.send(None, "Target.createTarget", json!({"url": "about:blank"}));
        let attached = browser.send(
            None,
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        for method in ["Runtime.enable", "Log.enable", "Page.enable"] {
            browser.call(method, json!({}));
        }
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": VIEWPORT.0, "height": VIEWPORT.1, "deviceScaleFactor": 1, "mobile": false}),
        );
        browser
    }

    /// A command to the page; its result.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(Some(&session), method, params)
    }

    fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            message["sessionId"] = json!(s);
        }
        self.socket
            .send(Message::text(message.to_string()))
            .unwrap_or_else(|e| panic!("{method}: cannot send to Chromium: {e}"));
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < COMMAND_TIMEOUT,
                "{method}: Chromium did not answer within {COMMAND_TIMEOUT:?}"
            );
            let text = match self.socket.read() {
                Ok(Message::Text(t)) => t,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    continue;
                }
                Err(e) => panic!(
                    "{method}: the DevTools connection failed: {e}: {}",
                    log(self.profile.path())
                ),
            };
            let answer: Value = serde_json::from_str(&text).unwrap();
            if answer["id"] == id {
                if let Some(error) = answer.get("error") {
                    panic!("{method} failed: {error}");
                }
                return answer["result"].clone();
            }
            self.note_event(&answer);
        }
    }

    /// Keeps what the page reports as an error.
    fn note_event(&mut self, event: &Value) {
        let params = &event["params"];
        match event["method"].as_str() {
            Some("Runtime.exceptionThrown") => {
                let details = &params["exceptionDetails"];
                let text = details["exception"]["description"]
                    .as_str()
                    .or(details["text"].as_str())
                    .unwrap_or("an exception");
                self.errors.push(format!("exception: {text}"));
            }
            Some("Runtime.consoleAPICalled")
                if matches!(params["type"].as_str(), Some("error" | "assert")) =>
            {
                let args: Vec<String> = params["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        a["value"].as_str().map(str::to_owned).unwrap_or_else(|| {
                            a["description"]
                                .as_str()
                                .map_or_else(|| a["value"].to_string(), str::to_owned)
                        })
                    })
                    .collect();
                self.errors
                    .push(format!("console.error: {}", args.join(" ")));
            }
            Some("Log.entryAdded") if params["entry"]["level"] == "error" => {
                let entry = &params["entry"];
                self.errors.push(format!(
                    "{} error: {} {}",
                    entry["source"].as_str().unwrap_or("log"),
                    entry["text"].as_str().unwrap_or_default(),
                    entry["url"].as_str().unwrap_or_default()
                ));
            }
            _ => {}
        }
    }

    /// Loads a URL and waits for its document to be complete.
    pub fn navigate(&mut self, url: &str) {
        let result = self.call("Page.navigate", json!({"url": url}));
        if let Some(error) = result["errorText"].as_str() {
            panic!("cannot load {url}: {error}");
        }
        self.wait_for(
            &format!("{url} to load"),
            "document.readyState === 'complete' && location.href !== 'about:blank'",
            Duration::from_secs(30),
        );
    }

    /// Evaluates JavaScript in the page (awaiting a promise); its value as JSON.
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(details) = result.get("exceptionDetails") {
            panic!(
                "evaluating {expression} threw: {}",
                details["exception"]["description"]
                    .as_str()
                    .unwrap_or_else(|| details["text"].as_str().unwrap_or("?"))
            );
        }
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy; its value. On timeout, fails with the page's text.
    pub fn wait_for(&mut self, what: &str, expression: &str, within: Duration) -> Value {
        let start = Instant::now();
        loop {
            let value = self.eval(expression);
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            if start.elapsed() > within {
                let text = self.eval("document.body ? document.body.innerText : ''");
                panic!(
                    "timed out after {within:?} waiting for {what} ({expression})\npage text:\n{}\nerrors: {:#?}",
                    text.as_str().unwrap_or_default(),
                    self.errors
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The errors the page reported since the last call.
    pub fn take_errors(&mut self) -> Vec<String> {
        // Events that arrived after the last command's answer are read by one more command.
        self.eval("0");
        std::mem::take(&mut self.errors)
    }

    /// Saves a PNG of the whole page (up to 4000 pixels tall) to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let metrics = self.call("Page.getLayoutMetrics", json!({}));
        let height = metrics["cssContentSize"]["height"]
            .as_f64()
            .unwrap_or(f64::from(VIEWPORT.1))
            .clamp(f64::from(VIEWPORT.1), 4000.0);
        let shot = self.call(
            "Page.captureScreenshot",
            json!({
                "format": "png",
                "captureBeyondViewport": true,
                "clip": {"x": 0, "y": 0, "width": VIEWPORT.0, "height": height, "scale": 1},
            }),
        );
        let png = base64_decode(shot["data"].as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

/// The browser's process, killed when dropped (also when a test fails while starting it).
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Chromium's own output, for failure messages.
fn log(profile: &Path) -> String {
    std::fs::read_to_string(profile.join("stderr.log")).unwrap_or_default()
}

/// Standard base64 (what DevTools sends screenshots in).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:?}"),
        }
    };
    let bytes: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c) << (18 - 6 * i);
        }
        let take = chunk.len() * 6 / 8;
        out.extend_from_slice(&n.to_be_bytes()[1..=take]);
    }
    out
}

#[test]
fn base64_decodes_what_it_should() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGVsbG8h"), b"hello!");
    assert_eq!(base64_decode("aGk="), b"hi");
    assert_eq!(base64_decode(""), b"");
}
