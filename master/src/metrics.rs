//! `GET /metrics`: the master's figures in the Prometheus (OpenMetrics) text format. Counters
//! and histograms are kept as things happen; the queue and the workers are read at scrape
//! time, so a scrape is always current.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use kiln_db::model::Results;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Builder {
    builder: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuilderResult {
    builder: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceOutcome {
    source: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReporterOutcome {
    reporter: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceResult {
    source: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: String,
}

type Durations = Family<Builder, Histogram, fn() -> Histogram>;
type Sizes = Durations;

fn build_buckets() -> Histogram {
    // 0.1 s to about 7 hours.
    Histogram::new(exponential_buckets(0.1, 3.0, 11))
}

fn step_buckets() -> Histogram {
    // 10 ms to about 2.5 hours.
    Histogram::new(exponential_buckets(0.01, 3.5, 11))
}

fn memory_buckets() -> Histogram {
    // 256 KiB to 64 GiB.
    Histogram::new(exponential_buckets(f64::from(256 << 10), 4.0, 10))
}

/// The master's metrics.
pub struct Metrics {
    registry: Registry,
    builds_started: Family<Builder, Counter>,
    builds_finished: Family<BuilderResult, Counter>,
    build_seconds: Durations,
    step_seconds: Durations,
    step_cpu_seconds: Durations,
    step_peak_rss: Sizes,
    step_guest_memory: Sizes,
    queue_depth: Family<Builder, Gauge>,
    queue_oldest: Family<Builder, Gauge<f64, std::sync::atomic::AtomicU64>>,
    workers: Family<State, Gauge>,
    refused: Counter,
    polls: Family<SourceResult, Counter>,
    deliveries: Family<SourceOutcome, Counter>,
    reports: Family<ReporterOutcome, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kiln");
        let m = Metrics {
            builds_started: Family::default(),
            builds_finished: Family::default(),
            build_seconds: Family::new_with_constructor(build_buckets),
            step_seconds: Family::new_with_constructor(step_buckets),
            step_cpu_seconds: Family::new_with_constructor(step_buckets),
            step_peak_rss: Family::new_with_constructor(memory_buckets),
            step_guest_memory: Family::new_with_constructor(memory_buckets),
            queue_depth: Family::default(),
            queue_oldest: Family::default(),
            workers: Family::default(),
            refused: Counter::default(),
            polls: Family::default(),
            deliveries: Family::default(),
            reports: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "builds_started",
            "Builds dispatched to a worker",
            m.builds_started.clone(),
        );
        registry.register(
            "builds_finished",
            "Builds ended, by result (RETRY: requeued after a lost worker)",
            m.builds_finished.clone(),
        );
        registry.register(
            "build_duration_seconds",
            "From dispatch to the build's end",
            m.build_seconds.clone(),
        );
        registry.register(
            "step_duration_seconds",
            "Steps' wall-clock time, as their workers measured it",
            m.step_seconds.clone(),
        );
        registry.register(
            "step_cpu_seconds",
            "CPU time (user and system) of the commands a step ran, as its worker measured it",
            m.step_cpu_seconds.clone(),
        );
        registry.register(
            "step_peak_rss_bytes",
            "Peak resident memory of the largest command a step ran (steps that ran commands)",
            m.step_peak_rss.clone(),
        );
        registry.register(
            "step_guest_memory_bytes",
            "Peak linear memory of a step's own WebAssembly guest",
            m.step_guest_memory.clone(),
        );
        registry.register(
            "queue_depth",
            "Build requests waiting for a worker",
            m.queue_depth.clone(),
        );
        registry.register(
            "queue_oldest_age_seconds",
            "How long the oldest waiting request has waited",
            m.queue_oldest.clone(),
        );
        registry.register(
            "workers",
            "Configured workers by state: idle, busy, draining, quarantined, paused, offline",
            m.workers.clone(),
        );
        registry.register(
            "worker_messages_refused",
            "Worker messages refused (wrong cookie, not the worker's build, out of order)",
            m.refused.clone(),
        );
        registry.register(
            "change_source_polls",
            "Polls of git pollers, by change source and result (ok, error)",
            m.polls.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries by change source and outcome (accepted, duplicate, ignored, \
             unauthorized, forbidden, bad_request, too_large, unknown_source, error)",
            m.deliveries.clone(),
        );
        registry.register(
            "reporter_deliveries",
            "Reporter delivery attempts by reporter and outcome (delivered, retried, failed, \
             skipped)",
            m.reports.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// A build was dispatched.
    pub fn build_started(&self, builder: &str) {
        self.builds_started
            .get_or_create(&Builder {
                builder: builder.to_owned(),
            })
            .inc();
    }

    /// A build ended; `took` is since its dispatch, when known.
    pub fn build_finished(&self, builder: &str, result: Results, took: Option<Duration>) {
        self.builds_finished
            .get_or_create(&BuilderResult {
                builder: builder.to_owned(),
                result: result.to_string(),
            })
            .inc();
        if let Some(took) = took {
            self.build_seconds
                .get_or_create(&Builder {
                    builder: builder.to_owned(),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// A step ended, taking `took` by its worker's clock.
    pub fn step_finished(&self, builder: &str, took: Duration) {
        self.step_seconds
            .get_or_create(&Builder {
                builder: builder.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// A step that ran reported what it used.
    pub fn step_resources(&self, builder: &str, r: &runtime::StepResources) {
        let label = Builder {
            builder: builder.to_owned(),
        };
        self.step_cpu_seconds
            .get_or_create(&label)
            .observe(r.cpu_ms as f64 / 1000.0);
        if let Some(rss) = r.peak_rss_bytes {
            self.step_peak_rss.get_or_create(&label).observe(rss as f64);
        }
        self.step_guest_memory
            .get_or_create(&label)
            .observe(r.guest_memory_bytes as f64);
    }

    /// A poll of change source `source` ended, well or not.
    pub fn poll_finished(&self, source: &str, ok: bool) {
        self.polls
            .get_or_create(&SourceResult {
                source: source.to_owned(),
                result: if ok { "ok" } else { "error" }.to_owned(),
            })
            .inc();
    }

    /// Worker messages were refused.
    pub fn refused(&self, n: usize) {
        self.refused.inc_by(n as u64);
    }

    /// An attempt of reporter `reporter` ended with `outcome`.
    pub fn reporter_delivery(&self, reporter: &str, outcome: &str) {
        self.reports
            .get_or_create(&ReporterOutcome {
                reporter: reporter.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A webhook delivery to change source `source` ended with `outcome`.
    pub fn delivery(&self, source: &str, outcome: &str) {
        self.deliveries
            .get_or_create(&SourceOutcome {
                source: source.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The text of a scrape, given the queue now (builder, waiting, oldest age in seconds;
    /// every configured builder, so an emptied queue reads 0) and the workers' states.
    pub fn encode(
        &self,
        queue: &[(String, i64, f64)],
        workers: &[&str],
    ) -> Result<String, std::fmt::Error> {
        self.queue_depth.clear();
        self.queue_oldest.clear();
        for (builder, depth, oldest) in queue {
            let label = Builder {
                builder: builder.clone(),
            };
            self.queue_depth.get_or_create(&label).set(*depth);
            self.queue_oldest.get_or_create(&label).set(*oldest);
        }
        self.workers.clear();
        for state in [
            "idle",
            "busy",
            "draining",
            "quarantined",
            "paused",
            "offline",
        ] {
            let n = workers.iter().filter(|s| **s == state).count();
            self.workers
                .get_or_create(&State {
                    state: state.to_owned(),
                })
                .set(n as i64);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_has_the_counters_histograms_and_current_gauges() {
        let m = Metrics::default();
        m.build_started("linux");
        m.build_finished("linux", Results::Success, Some(Duration::from_millis(1500)));
        m.step_finished("linux", Duration::from_millis(20));
        m.step_resources(
            "linux",
            &runtime::StepResources {
                commands: 1,
                cpu_ms: 1500,
                peak_rss_bytes: Some(100 << 20),
                guest_memory_bytes: 2 << 20,
                observer_memory_bytes: None,
            },
        );
        m.step_resources(
            "linux",
            &runtime::StepResources {
                guest_memory_bytes: 1 << 20,
                ..Default::default()
            },
        );
        m.refused(2);
        let text = m
            .encode(&[("linux".into(), 3, 12.5)], &["idle", "busy", "busy"])
            .unwrap();
        for line in [
            "kiln_builds_started_total{builder=\"linux\"} 1",
            "kiln_builds_finished_total{builder=\"linux\",result=\"SUCCESS\"} 1",
            "kiln_build_duration_seconds_count{builder=\"linux\"} 1",
            "kiln_build_duration_seconds_sum{builder=\"linux\"} 1.5",
            "kiln_step_duration_seconds_count{builder=\"linux\"} 1",
            "kiln_step_cpu_seconds_count{builder=\"linux\"} 2",
            "kiln_step_cpu_seconds_sum{builder=\"linux\"} 1.5",
            // Only steps that ran commands have a peak resident memory.
            "kiln_step_peak_rss_bytes_count{builder=\"linux\"} 1",
            "kiln_step_peak_rss_bytes_bucket{le=\"268435456.0\",builder=\"linux\"} 1",
            "kiln_step_peak_rss_bytes_bucket{le=\"67108864.0\",builder=\"linux\"} 0",
            "kiln_step_guest_memory_bytes_count{builder=\"linux\"} 2",
            "kiln_step_guest_memory_bytes_sum{builder=\"linux\"} 3145728.0",
            "kiln_queue_depth{builder=\"linux\"} 3",
            "kiln_queue_oldest_age_seconds{builder=\"linux\"} 12.5",
            "kiln_workers{state=\"busy\"} 2",
            "kiln_workers{state=\"offline\"} 0",
            "kiln_worker_messages_refused_total 2",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
        // The queue is read afresh each time: a builder gone from it is gone from the text.
        let text = m.encode(&[], &[]).unwrap();
        assert!(!text.contains("kiln_queue_depth{"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
