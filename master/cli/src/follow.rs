//! `kiln force --wait`: the client's [`Follower`] drawn on a terminal. Builds, steps and logs
//! print as they come, `[out]`, `[err]` and `[hdr]` apart, under a progress line; then the
//! table of steps.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_client::follow::{FollowView, Follower, Progress};
use kiln_client::{Client, with_query};
use runtime::{Channel, StepEvents};
use serde_json::Value;

use crate::term::{Printer, outcome, result_paint, span, summary, table, text};

/// A follower's findings on the terminal: log lines and announcements on stdout, notes on
/// stderr, all above a progress line (drawn only on a terminal).
struct TermView {
    bar: ProgressBar,
    printer: Printer,
}

impl TermView {
    fn out(&self, text: &str) {
        // A closed stdout (a pipe into `head`) must not stop the following.
        self.bar.suspend(|| {
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
        });
    }

    /// The table of a finished build's steps and its result, as `kiln build run` prints it.
    fn print_table(&self, build: &Value, page: &str) {
        let color = self.printer.color;
        let steps = build["steps"].as_array().cloned().unwrap_or_default();
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
        let results = text(&build["results"]);
        let (start, end) = result_paint(&results, color);
        out += &format!("result:     {start}{results}{end}\n");
        let summary = summary(build);
        if !summary.is_empty() {
            out += &format!("summary:    {summary}\n");
        }
        out += &format!(
            "elapsed:    {}\n",
            span(&build["started_at"], &build["complete_at"])
        );
        out += &format!("build:      {page}\n");
        self.out(&out);
    }
}

impl FollowView for TermView {
    fn note(&mut self, text: &str) {
        self.bar.suspend(|| eprintln!("{text}"));
    }

    fn progress(&mut self, progress: &Progress) {
        let message = match progress {
            Progress::Waiting { request, builder } => {
                format!("request {request} for {builder}: waiting for a worker")
            }
            Progress::Running {
                builder,
                number,
                worker,
                step,
                done,
            } => {
                let at = match step {
                    Some((n, name)) => format!("step {n}: {name}"),
                    None => "starting".into(),
                };
                let plural = if *done == 1 { "" } else { "s" };
                format!("{builder} #{number} on {worker}: {at} ({done} step{plural} done)")
            }
        };
        self.bar.set_message(message);
    }

    fn merged(&mut self, from: i64, into: i64) {
        self.out(&format!(
            "request {from} was merged into request {into}, which builds the same; following it\n"
        ));
    }

    fn build_started(&mut self, build: &Value, page: &str) {
        self.out(&format!(
            "==> build {} #{} on {}: {page}\n",
            text(&build["builder"]),
            text(&build["number"]),
            text(&build["worker"]),
        ));
    }

    fn step_started(&mut self, step: &Value) {
        self.out(&format!(
            "==> step {}: {}\n",
            step["number"].as_i64().unwrap_or_default() + 1,
            text(&step["name"])
        ));
    }

    fn lines(&mut self, log: &str, channel: Channel, text: &str) {
        self.bar.suspend(|| self.printer.log(log, channel, text));
    }

    fn build_finished(&mut self, build: &Value, page: &str) {
        self.print_table(build, page);
        if build["results"] == "RETRY" {
            self.out("the build will be retried: its request is back in the queue\n");
        }
    }

    fn ended_without_build(&mut self, request: i64, results: &str) {
        self.out(&format!(
            "request {request} ended {results} without a build\n"
        ));
    }
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
    let mut view = TermView {
        bar,
        printer: Printer::new(),
    };
    let mut f = Follower::new(client, request, builder);
    let result = tokio::select! {
        r = f.run(&mut view) => r,
        _ = tokio::signal::ctrl_c() => {
            view.bar.finish_and_clear();
            let at = match f.build() {
                Some(id) => format!("build {id}: {}", client.page(&format!("/builds/{id}"))),
                None => format!(
                    "request {}: {}",
                    f.request(),
                    client.page(&with_query("/builds", &[("builder", f.builder())]))
                ),
            };
            eprintln!("kiln: stopped following; the master goes on with {at}");
            return Ok(ExitCode::from(130));
        }
    };
    view.bar.finish_and_clear();
    let results = result?;
    Ok(match outcome(&results) {
        Some(o) => crate::term::exit_code(o),
        None => ExitCode::from(3),
    })
}
