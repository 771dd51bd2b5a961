//! `kiln force --wait`: follows one build request to its end. Its builds (a retried build is
//! followed by the next attempt), their steps and logs are printed as they come, `[out]`,
//! `[err]` and `[hdr]` apart, under a progress line; then the table of steps.
//!
//! The event stream only says when to look and carries log lines: the follower subscribes
//! first, then reads the request, its builds and the followed build from the API, and places
//! each `log` event by its line offset against the log's cursor. So an event missed between two
//! subscriptions, a gap, or a dropped stream (then it reads the build every second) loses
//! nothing, and nothing is printed twice.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use runtime::{Channel, StepEvents};
use serde_json::Value;

use crate::client_cmd::{outcome, result_paint, span, summary, table, text, with_query};
use crate::step_cmd::Printer;
use kiln_client::{Client, ClientError, EventStream, SseEvent};

/// How often a build is read when the event stream is not available.
const POLL: Duration = Duration::from_secs(1);

/// How long a followed build may be quiet on the event stream before it is read again anyway
/// (a request merged into another, say, sends no event of its own).
const RESYNC: Duration = Duration::from_secs(10);

/// Polls between attempts to get the event stream back.
const RECONNECT_POLLS: u32 = 5;

/// Lines read per request when catching up with a log.
const LINES_PER_READ: usize = 1000;

/// How far a log has been printed.
#[derive(Debug)]
struct Cursor {
    /// The log's name (`stdio`, or one a step or observer opened).
    name: String,
    /// The next line to print.
    next: i64,
}

/// The build being followed.
#[derive(Debug)]
struct Current {
    id: i64,
    /// The build as last read, with its steps.
    build: Value,
    /// Steps whose banner is printed.
    announced: BTreeSet<i64>,
    logs: BTreeMap<i64, Cursor>,
}

/// Follows one build request: what it has printed, and where.
struct Follower<'a> {
    client: &'a Client,
    request: i64,
    builder: String,
    bar: ProgressBar,
    printer: Printer,
    current: Option<Current>,
    /// Builds followed to their end.
    finished: BTreeSet<i64>,
    /// The request's result, once it is complete and everything is printed.
    done: Option<Value>,
}

/// What an event asks for.
enum Next {
    /// Nothing more: it was printed, or it is about something else.
    Nothing,
    /// Read the API to catch up.
    Sync,
}

/// Follows `request` (on `builder`) to its end; the exit status of its result (130 when
/// Ctrl-C stops the following; the build goes on).
pub(crate) async fn follow(
    client: &Client,
    request: i64,
    builder: &str,
) -> anyhow::Result<ExitCode> {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} {wide_msg}")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut f = Follower {
        client,
        request,
        builder: builder.to_owned(),
        bar,
        printer: Printer::new(),
        current: None,
        finished: BTreeSet::new(),
        done: None,
    };
    let result = tokio::select! {
        r = f.run() => r,
        _ = tokio::signal::ctrl_c() => {
            f.bar.finish_and_clear();
            let at = match &f.current {
                Some(c) => format!("build {}: {}", c.id, client.page(&format!("/builds/{}", c.id))),
                None => format!("request {}: {}", f.request, client.page(&with_query("/builds", &[("builder", &f.builder)]))),
            };
            eprintln!("kiln: stopped following; the master goes on with {at}");
            return Ok(ExitCode::from(130));
        }
    };
    f.bar.finish_and_clear();
    let results = result?;
    Ok(match outcome(&results) {
        Some(o) => crate::step_cmd::exit_code(o),
        None => ExitCode::from(3),
    })
}

impl Follower<'_> {
    /// Follows until the request is complete; its result.
    async fn run(&mut self) -> Result<Value, ClientError> {
        let mut stream: Option<EventStream> = None;
        let mut subscribed: Vec<i64> = Vec::new();
        let mut polls = 0u32;
        let mut warned = false;
        self.set_message();
        loop {
            // Subscribe before reading, so nothing that happens in between is missed.
            let wanted = self.log_ids();
            let retry = stream.is_none() && polls.is_multiple_of(RECONNECT_POLLS);
            if (stream.is_some() && wanted != subscribed) || retry {
                let query = format!(
                    "kinds=build,step,request&logs={}",
                    wanted
                        .iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                );
                match self.client.events(&query).await {
                    Ok(s) => {
                        stream = Some(s);
                        subscribed = wanted;
                    }
                    Err(e) => {
                        stream = None;
                        if !warned {
                            self.note(&format!(
                                "kiln: the live event stream is not available ({e}); reading the build every second"
                            ));
                            warned = true;
                        }
                    }
                }
            }
            self.sync().await?;
            if let Some(results) = self.done.take() {
                return Ok(results);
            }
            let Some(s) = stream.as_mut() else {
                tokio::time::sleep(POLL).await;
                polls += 1;
                continue;
            };
            if self.log_ids() != subscribed {
                continue;
            }
            loop {
                match tokio::time::timeout(RESYNC, s.next()).await {
                    Err(_) => break,
                    Ok(Ok(event)) => match self.event(&event) {
                        Next::Nothing => {}
                        Next::Sync => break,
                    },
                    Ok(Err(why)) => {
                        self.note(&format!(
                            "kiln: the live event stream stopped ({why}); reading the build every second"
                        ));
                        stream = None;
                        polls = 1;
                        break;
                    }
                }
            }
        }
    }

    /// Prints a line to stderr above the progress line.
    fn note(&self, line: &str) {
        self.bar.suspend(|| eprintln!("{line}"));
    }

    fn log_ids(&self) -> Vec<i64> {
        self.current
            .as_ref()
            .map(|c| c.logs.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Handles one event.
    fn event(&mut self, e: &SseEvent) -> Next {
        let Ok(data) = serde_json::from_str::<Value>(&e.data) else {
            return Next::Nothing;
        };
        let ours = |v: &Value| v.as_i64() == Some(self.request);
        match e.event.as_str() {
            "log" => self.log_event(&data),
            "build" | "request" if ours(&data["buildrequestid"]) => Next::Sync,
            "step"
                if self
                    .current
                    .as_ref()
                    .is_some_and(|c| data["buildid"].as_i64() == Some(c.id)) =>
            {
                Next::Sync
            }
            "lagged" => Next::Sync,
            _ => Next::Nothing,
        }
    }

    /// Prints the new lines of a log event; a gap (lines this client has not seen) is read
    /// from the API instead.
    fn log_event(&mut self, data: &Value) -> Next {
        let (Some(log), Some(offset), Some(lines)) = (
            data["logid"].as_i64(),
            data["offset"].as_i64(),
            data["lines"].as_array(),
        ) else {
            return Next::Nothing;
        };
        let Some(cursor) = self.current.as_mut().and_then(|c| c.logs.get_mut(&log)) else {
            return Next::Nothing;
        };
        if offset > cursor.next {
            return Next::Sync;
        }
        let skip = (cursor.next - offset) as usize;
        if skip >= lines.len() {
            return Next::Nothing;
        }
        cursor.next = offset + lines.len() as i64;
        let name = cursor.name.clone();
        self.print_lines(&name, &lines[skip..]);
        Next::Nothing
    }

    /// Prints `[channel, text]` lines of a log, a run of one channel at a time.
    fn print_lines(&self, log: &str, lines: &[Value]) {
        let channel = |l: &Value| match l[0].as_str() {
            Some("e") => Channel::Stderr,
            Some("h") => Channel::Header,
            _ => Channel::Stdout,
        };
        self.bar.suspend(|| {
            let mut run = String::new();
            let mut run_channel = None;
            for l in lines {
                let c = channel(l);
                if run_channel.is_some_and(|r| r != c) {
                    self.printer.log(log, run_channel.unwrap_or(c), &run);
                    run.clear();
                }
                run_channel = Some(c);
                run.push_str(l[1].as_str().unwrap_or_default());
                run.push('\n');
            }
            if let Some(c) = run_channel {
                self.printer.log(log, c, &run);
            }
        });
    }

    fn out(&self, text: &str) {
        // A closed stdout (a pipe into `head`) must not stop the following.
        self.bar.suspend(|| {
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
        });
    }

    /// Reads the request, its builds and the followed build's steps and logs, and prints what
    /// has not been printed.
    async fn sync(&mut self) -> Result<(), ClientError> {
        let mut request = self
            .client
            .get(&format!("/api/v2/buildrequests/{}", self.request))
            .await?;
        let mut builds = self.builds().await?;
        // A request merged into a newer one (the same build) is followed there.
        let mut seen = vec![self.request];
        while let Some(into) = request["collapsed_into"]
            .as_i64()
            .filter(|into| builds.is_empty() && !seen.contains(into) && seen.len() < 100)
        {
            seen.push(into);
            self.out(&format!(
                "request {} was merged into request {into}, which builds the same; following it\n",
                self.request
            ));
            self.request = into;
            request = self
                .client
                .get(&format!("/api/v2/buildrequests/{into}"))
                .await?;
            builds = self.builds().await?;
        }
        for b in &builds {
            let Some(id) = b["buildid"].as_i64() else {
                continue;
            };
            if self.finished.contains(&id) {
                continue;
            }
            if self.current.as_ref().is_none_or(|c| c.id != id) {
                self.out(&format!(
                    "==> build {} #{} on {}: {}\n",
                    text(&b["builder"]),
                    text(&b["number"]),
                    text(&b["worker"]),
                    self.client.page(&format!("/builds/{id}"))
                ));
                self.current = Some(Current {
                    id,
                    build: b.clone(),
                    announced: BTreeSet::new(),
                    logs: BTreeMap::new(),
                });
            }
            self.catch_up().await?;
            let Some(c) = &self.current else { break };
            if c.build["complete"] != true {
                break;
            }
            self.print_table();
            if c.build["results"] == "RETRY" {
                self.out("the build will be retried: its request is back in the queue\n");
            }
            self.finished.insert(id);
            self.current = None;
        }
        if request["complete"] == true && self.current.is_none() {
            if builds.is_empty() {
                self.out(&format!(
                    "request {} ended {} without a build\n",
                    self.request,
                    text(&request["results"])
                ));
            }
            self.done = Some(request["results"].clone());
        }
        self.set_message();
        Ok(())
    }

    /// The request's builds, oldest first.
    async fn builds(&self) -> Result<Vec<Value>, ClientError> {
        let answer = self
            .client
            .get(&format!(
                "/api/v2/builds?buildrequestid={}&order=buildid",
                self.request
            ))
            .await?;
        Ok(answer["builds"].as_array().cloned().unwrap_or_default())
    }

    /// Reads the followed build with its steps and logs, prints new step banners and the
    /// lines of its logs not printed yet.
    async fn catch_up(&mut self) -> Result<(), ClientError> {
        let Some(id) = self.current.as_ref().map(|c| c.id) else {
            return Ok(());
        };
        let build = self.client.get(&format!("/api/v2/builds/{id}")).await?;
        let mut steps = build["steps"].as_array().cloned().unwrap_or_default();
        steps.sort_by_key(|s| s["number"].as_i64());
        for step in &steps {
            let step_id = step["stepid"].as_i64().unwrap_or_default();
            let announce = self
                .current
                .as_mut()
                .is_some_and(|c| c.announced.insert(step_id));
            if announce {
                self.out(&format!(
                    "==> step {}: {}\n",
                    step["number"].as_i64().unwrap_or_default() + 1,
                    text(&step["name"])
                ));
            }
            for log in step["logs"].as_array().into_iter().flatten() {
                let Some(log_id) = log["logid"].as_i64() else {
                    continue;
                };
                let lines = log["num_lines"].as_i64().unwrap_or(0);
                let name = text(&log["name"]);
                let mut next = match self.current.as_mut() {
                    Some(c) => {
                        c.logs
                            .entry(log_id)
                            .or_insert(Cursor {
                                name: name.clone(),
                                next: 0,
                            })
                            .next
                    }
                    None => return Ok(()),
                };
                while next < lines {
                    let page = self
                        .client
                        .get(&format!(
                            "/api/v2/logs/{log_id}/contents?offset={next}&limit={LINES_PER_READ}"
                        ))
                        .await?;
                    let got = page["lines"].as_array().cloned().unwrap_or_default();
                    if got.is_empty() {
                        break;
                    }
                    // A live event may have printed some of them meanwhile.
                    let printed = self
                        .current
                        .as_ref()
                        .and_then(|c| c.logs.get(&log_id))
                        .map_or(next, |c| c.next);
                    let skip = ((printed - next).max(0) as usize).min(got.len());
                    self.print_lines(&name, &got[skip..]);
                    next += got.len() as i64;
                    if let Some(c) = self.current.as_mut().and_then(|c| c.logs.get_mut(&log_id)) {
                        c.next = c.next.max(next);
                    }
                }
            }
        }
        if let Some(c) = self.current.as_mut() {
            c.build = build;
        }
        Ok(())
    }

    /// The progress line: where the request or build is.
    fn set_message(&self) {
        let message = match &self.current {
            None => format!(
                "request {} for {}: waiting for a worker",
                self.request, self.builder
            ),
            Some(c) => {
                let steps = c.build["steps"].as_array().cloned().unwrap_or_default();
                let done = steps.iter().filter(|s| !s["complete_at"].is_null()).count();
                let running = steps.iter().rev().find(|s| s["complete_at"].is_null());
                let at = match running {
                    Some(s) => format!(
                        "step {}: {}",
                        s["number"].as_i64().unwrap_or_default() + 1,
                        text(&s["name"])
                    ),
                    None => "starting".into(),
                };
                format!(
                    "{} #{} on {}: {at} ({done} step{} done)",
                    text(&c.build["builder"]),
                    text(&c.build["number"]),
                    text(&c.build["worker"]),
                    if done == 1 { "" } else { "s" }
                )
            }
        };
        self.bar.set_message(message);
    }

    /// The table of a finished build's steps and its result, as `kiln build run` prints it.
    fn print_table(&self) {
        let Some(c) = &self.current else { return };
        let color = self.printer.color;
        let steps = c.build["steps"].as_array().cloned().unwrap_or_default();
        let rows: Vec<Vec<String>> = steps
            .iter()
            .map(|s| {
                vec![
                    text(&s["name"]),
                    text(&s["results"]),
                    span(&s["started_at"], &s["complete_at"]),
                    summary(s),
                ]
            })
            .collect();
        let mut out = String::from("\n");
        if !rows.is_empty() {
            out += &table(
                &["STEP", "RESULT", "ELAPSED", "SUMMARY"],
                &rows,
                |col, t| {
                    if col == 1 {
                        result_paint(t, color)
                    } else {
                        ("", "")
                    }
                },
            );
        }
        let results = text(&c.build["results"]);
        let (start, end) = result_paint(&results, color);
        out += &format!("result:     {start}{results}{end}\n");
        let summary = summary(&c.build);
        if !summary.is_empty() {
            out += &format!("summary:    {summary}\n");
        }
        out += &format!(
            "elapsed:    {}\n",
            span(&c.build["started_at"], &c.build["complete_at"])
        );
        out += &format!(
            "build:      {}\n",
            self.client.page(&format!("/builds/{}", c.id))
        );
        self.out(&out);
    }
}
