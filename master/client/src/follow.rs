//! Following one build request to its end (`kiln force --wait`, `kiln try --wait`): its
//! builds (a retried build is followed by the next attempt), their steps and logs, handed to a
//! [`FollowView`] as they come.
//!
//! The event stream only says when to look and carries log lines: the follower subscribes
//! first, then reads the request, its builds and the followed build from the API, and places
//! each `log` event by its line offset against the log's cursor. So an event missed between two
//! subscriptions, a gap, or a dropped stream (then it reads the build every second) loses
//! nothing, and nothing is delivered twice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kiln_protocol::Channel;
use serde_json::Value;

use crate::{Client, ClientError, EventStream, SseEvent, text};

/// How often a build is read when the event stream is not available.
const POLL: Duration = Duration::from_secs(1);

/// How long a followed build may be quiet on the event stream before it is read again anyway
/// (a request merged into another, say, sends no event of its own).
const RESYNC: Duration = Duration::from_secs(10);

/// Polls between attempts to get the event stream back.
const RECONNECT_POLLS: u32 = 5;

/// Lines read per request when catching up with a log.
const LINES_PER_READ: usize = 1000;

/// What a follower finds, as it finds it; the `kiln` command line draws it on a terminal.
/// Builds and steps are the API's JSON (`GET /api/v2/builds/{id}`).
pub trait FollowView {
    /// Something the user should know about the following itself (the event stream is not
    /// available, say).
    fn note(&mut self, text: &str);
    /// Where the request stands, whenever it is read again.
    fn progress(&mut self, progress: &Progress);
    /// Request `from` was merged into `into`, which builds the same; `into` is followed.
    fn merged(&mut self, from: i64, into: i64);
    /// A build of the request started (or is first seen); `page` is its web UI page.
    fn build_started(&mut self, build: &Value, page: &str);
    /// A step of the followed build started.
    fn step_started(&mut self, step: &Value);
    /// Complete lines (each ending in "\n") of one channel appended to a log.
    fn lines(&mut self, log: &str, channel: Channel, text: &str);
    /// The followed build ended; `build` has its steps.
    fn build_finished(&mut self, build: &Value, page: &str);
    /// The request ended without a build (cancelled while queued, say).
    fn ended_without_build(&mut self, request: i64, results: &str);
}

/// Where a followed request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Queued: no worker has taken it yet.
    Waiting {
        /// The request.
        request: i64,
        /// Its builder.
        builder: String,
    },
    /// A build runs.
    Running {
        /// Its builder, number and worker, as the API shows them.
        builder: String,
        /// The build's number.
        number: String,
        /// The worker.
        worker: String,
        /// The step running (its number from 1, and name), if one is.
        step: Option<(i64, String)>,
        /// Steps done.
        done: usize,
    },
}

/// How far a log has been delivered.
#[derive(Debug)]
struct Cursor {
    /// The log's name (`stdio`, or one a step or observer opened).
    name: String,
    /// The next line to deliver.
    next: i64,
}

/// The build being followed.
#[derive(Debug)]
struct Current {
    id: i64,
    /// The build as last read, with its steps.
    build: Value,
    /// Steps whose start was delivered.
    announced: BTreeSet<i64>,
    logs: BTreeMap<i64, Cursor>,
}

/// Follows one build request: what it has delivered, and where.
#[derive(Debug)]
pub struct Follower<'a> {
    client: &'a Client,
    request: i64,
    builder: String,
    current: Option<Current>,
    /// Builds followed to their end.
    finished: BTreeSet<i64>,
    /// The request's result, once it is complete and everything is delivered.
    done: Option<Value>,
}

/// What an event asks for.
enum Next {
    /// Nothing more: it was delivered, or it is about something else.
    Nothing,
    /// Read the API to catch up.
    Sync,
}

impl<'a> Follower<'a> {
    /// A follower of `request`, a request for `builder`.
    pub fn new(client: &'a Client, request: i64, builder: &str) -> Self {
        Follower {
            client,
            request,
            builder: builder.to_owned(),
            current: None,
            finished: BTreeSet::new(),
            done: None,
        }
    }

    /// The request followed (another, once the first was merged into it).
    pub fn request(&self) -> i64 {
        self.request
    }

    /// The build followed now, if one runs.
    pub fn build(&self) -> Option<i64> {
        self.current.as_ref().map(|c| c.id)
    }

    /// The builder the request is for.
    pub fn builder(&self) -> &str {
        &self.builder
    }

    /// Follows until the request is complete; its result (`"SUCCESS"`, `"FAILURE"`, ...).
    pub async fn run(&mut self, view: &mut dyn FollowView) -> Result<Value, ClientError> {
        let mut stream: Option<EventStream> = None;
        let mut subscribed: Vec<i64> = Vec::new();
        let mut polls = 0u32;
        let mut warned = false;
        view.progress(&self.progress());
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
                            view.note(&format!(
                                "kiln: the live event stream is not available ({e}); reading the build every second"
                            ));
                            warned = true;
                        }
                    }
                }
            }
            self.sync(view).await?;
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
                    Ok(Ok(event)) => match self.event(&event, view) {
                        Next::Nothing => {}
                        Next::Sync => break,
                    },
                    Ok(Err(why)) => {
                        view.note(&format!(
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

    fn log_ids(&self) -> Vec<i64> {
        self.current
            .as_ref()
            .map(|c| c.logs.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Handles one event.
    fn event(&mut self, e: &SseEvent, view: &mut dyn FollowView) -> Next {
        let Ok(data) = serde_json::from_str::<Value>(&e.data) else {
            return Next::Nothing;
        };
        let ours = |v: &Value| v.as_i64() == Some(self.request);
        match e.event.as_str() {
            "log" => self.log_event(&data, view),
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

    /// Delivers the new lines of a log event; a gap (lines this client has not seen) is read
    /// from the API instead.
    fn log_event(&mut self, data: &Value, view: &mut dyn FollowView) -> Next {
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
        deliver_lines(view, &name, &lines[skip..]);
        Next::Nothing
    }

    /// Reads the request, its builds and the followed build's steps and logs, and delivers
    /// what has not been delivered.
    async fn sync(&mut self, view: &mut dyn FollowView) -> Result<(), ClientError> {
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
            view.merged(self.request, into);
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
                view.build_started(b, &self.client.page(&format!("/builds/{id}")));
                self.current = Some(Current {
                    id,
                    build: b.clone(),
                    announced: BTreeSet::new(),
                    logs: BTreeMap::new(),
                });
            }
            self.catch_up(view).await?;
            let Some(c) = &self.current else { break };
            if c.build["complete"] != true {
                break;
            }
            view.build_finished(&c.build, &self.client.page(&format!("/builds/{id}")));
            self.finished.insert(id);
            self.current = None;
        }
        if request["complete"] == true && self.current.is_none() {
            if builds.is_empty() {
                view.ended_without_build(self.request, &text(&request["results"]));
            }
            self.done = Some(request["results"].clone());
        }
        view.progress(&self.progress());
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

    /// Reads the followed build with its steps and logs, and delivers its new steps and the
    /// lines of its logs not delivered yet.
    async fn catch_up(&mut self, view: &mut dyn FollowView) -> Result<(), ClientError> {
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
                view.step_started(step);
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
                    // A live event may have delivered some of them meanwhile.
                    let printed = self
                        .current
                        .as_ref()
                        .and_then(|c| c.logs.get(&log_id))
                        .map_or(next, |c| c.next);
                    let skip = ((printed - next).max(0) as usize).min(got.len());
                    deliver_lines(view, &name, &got[skip..]);
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

    /// Where the request stands.
    fn progress(&self) -> Progress {
        match &self.current {
            None => Progress::Waiting {
                request: self.request,
                builder: self.builder.clone(),
            },
            Some(c) => {
                let steps = c.build["steps"].as_array().cloned().unwrap_or_default();
                let done = steps.iter().filter(|s| !s["complete_at"].is_null()).count();
                let step = steps
                    .iter()
                    .rev()
                    .find(|s| s["complete_at"].is_null())
                    .map(|s| {
                        (
                            s["number"].as_i64().unwrap_or_default() + 1,
                            text(&s["name"]),
                        )
                    });
                Progress::Running {
                    builder: text(&c.build["builder"]),
                    number: text(&c.build["number"]),
                    worker: text(&c.build["worker"]),
                    step,
                    done,
                }
            }
        }
    }
}

/// Delivers `[channel, text]` lines of a log, a run of one channel at a time.
fn deliver_lines(view: &mut dyn FollowView, log: &str, lines: &[Value]) {
    let channel = |l: &Value| match l[0].as_str() {
        Some("e") => Channel::Stderr,
        Some("h") => Channel::Header,
        _ => Channel::Stdout,
    };
    let mut run = String::new();
    let mut run_channel = None;
    for l in lines {
        let c = channel(l);
        if let Some(r) = run_channel.filter(|r| *r != c) {
            view.lines(log, r, &run);
            run.clear();
        }
        run_channel = Some(c);
        run.push_str(l[1].as_str().unwrap_or_default());
        run.push('\n');
    }
    if let Some(c) = run_channel {
        view.lines(log, c, &run);
    }
}
