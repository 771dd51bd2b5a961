//! Runtime benchmark: `cargo bench -p runtime`. Every figure is measured beside a native
//! baseline in the same run and reported as a ratio, one JSON object per line, then a table.
//!
//! (a) a step that runs `true` through run-command, plain and in sandbox mode, against spawning
//!     `true` natively (and through the confinement helper alone);
//! (b) instantiate + run of an empty step with a warm cache (target: under 100 us);
//! (c) 2,000,000 lines of `seq` through the line-counter observer, against `seq` alone
//!     (target: at least 5M lines/s);
//! (d) the same lines through the warnings, test-results and regex observers, against the line
//!     counter.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use runtime::{
    CancelToken, Channel, Confinement, DirStore, Grant, Helper, Loaded, ObserverSpec, Outcome,
    Properties, Runtime, RuntimeConfig, StepComponent, StepEvents, StepRun,
};
use serde_json::{Value, json};

const LINES: u64 = 2_000_000;

/// Counts what would be stored, as a worker shipping logs would touch every byte.
#[derive(Default)]
struct Counting {
    bytes: AtomicU64,
}

impl StepEvents for Counting {
    fn log(&self, _log: &str, _channel: Channel, text: &str) {
        self.bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
    }
}

struct Bench {
    rt: Runtime,
    probe: StepComponent,
    workdir: tempfile::TempDir,
    _store: tempfile::TempDir,
    grant: Grant,
}

impl Bench {
    fn run(&self, args: &Value, grant: &Grant, observers: &[ObserverSpec]) -> runtime::StepOutcome {
        let events = Arc::new(Counting::default());
        let out = self.rt.run_step(StepRun {
            step: &self.probe,
            args,
            properties: &Properties::new(),
            observers,
            grant,
            events,
            cancel: CancelToken::new(),
        });
        assert!(
            out.result.is_ok() || out.result == Outcome::Failure,
            "{out:?}"
        );
        out
    }
}

/// Runs `f` `n` times and returns the median and mean durations.
fn measure(n: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    let mean = times.iter().sum::<Duration>() / n as u32;
    (times[n / 2], mean)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn spawn_true(program: &str, args: &[&str]) {
    let ok = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn main() {
    // `cargo test --benches` runs this binary with no --bench flag: keep that run quick.
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full { 1 } else { 10 };
    let workdir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let rt = Runtime::new(RuntimeConfig {
        cache_dir: Some(cache.path().join("c")),
    })
    .unwrap();
    let Loaded::Step(probe) = rt.load(steps::fixtures::PROBE_STEP, "probe-step").unwrap() else {
        unreachable!()
    };
    let mut grant = Grant::new(
        workdir.path(),
        Arc::new(DirStore::new(store.path()).unwrap()),
    );
    grant.programs = vec!["true".into(), "seq".into()];
    let bench = Bench {
        rt,
        probe,
        workdir,
        _store: store,
        grant,
    };
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut emit = |name: &str, value: Value, shown: String, ratio: String| {
        let mut obj = json!({"bench": name});
        obj.as_object_mut()
            .unwrap()
            .extend(value.as_object().unwrap().clone());
        println!("{obj}");
        rows.push((name.to_owned(), shown, ratio));
    };

    // (a) a step running `true`, against spawning `true`.
    let n = 200 / scale;
    let true_path = "/bin/true";
    let (native_med, native_mean) = measure(n, || spawn_true(true_path, &[]));
    let run_true = json!({"action": "run", "argv": ["true"]});
    bench.run(&run_true, &bench.grant, &[]);
    let (plain_med, plain_mean) = measure(n, || {
        bench.run(&run_true, &bench.grant, &[]);
    });
    emit(
        "a.step_true_plain",
        json!({"native_true_us": us(native_mean), "step_us": us(plain_mean), "median_native_us": us(native_med), "median_step_us": us(plain_med), "overhead_us": us(plain_mean) - us(native_mean), "ratio": plain_mean.as_secs_f64() / native_mean.as_secs_f64()}),
        format!(
            "{:.0} us/step vs {:.0} us native spawn (+{:.0} us)",
            us(plain_mean),
            us(native_mean),
            us(plain_mean) - us(native_mean)
        ),
        format!(
            "{:.2}x",
            plain_mean.as_secs_f64() / native_mean.as_secs_f64()
        ),
    );

    let helper = Path::new(env!("CARGO_BIN_EXE_kiln-confine"));
    match Confinement::probe(Helper::dedicated(helper)) {
        Ok(confinement) => {
            let policy = format!(
                r#"{{"rw":["{}"],"ro":[],"network":false}}"#,
                bench.workdir.path().display()
            );
            let helper_s = helper.to_str().unwrap();
            let (_, confined_native) =
                measure(n, || spawn_true(helper_s, &[&policy, true_path, "true"]));
            let mut sandbox = bench.grant.clone();
            sandbox.confinement = Some(Arc::new(confinement));
            bench.run(&run_true, &sandbox, &[]);
            let (_, sandbox_mean) = measure(n, || {
                bench.run(&run_true, &sandbox, &[]);
            });
            emit(
                "a.step_true_sandbox",
                json!({"native_true_us": us(native_mean), "native_confined_true_us": us(confined_native), "step_us": us(sandbox_mean), "overhead_over_confined_spawn_us": us(sandbox_mean) - us(confined_native), "ratio": sandbox_mean.as_secs_f64() / native_mean.as_secs_f64()}),
                format!(
                    "{:.0} us/step vs {:.0} us confined spawn alone (+{:.0} us)",
                    us(sandbox_mean),
                    us(confined_native),
                    us(sandbox_mean) - us(confined_native)
                ),
                format!(
                    "{:.2}x native, {:.2}x confined",
                    sandbox_mean.as_secs_f64() / native_mean.as_secs_f64(),
                    sandbox_mean.as_secs_f64() / confined_native.as_secs_f64()
                ),
            );
        }
        Err(e) => eprintln!("skipping the sandbox figure: {e}"),
    }

    // (b) instantiate + run an empty step, warm.
    let ok = json!({"action": "ok"});
    for _ in 0..50 {
        bench.run(&ok, &bench.grant, &[]);
    }
    let (empty_med, empty_mean) = measure(5000 / scale, || {
        bench.run(&ok, &bench.grant, &[]);
    });
    emit(
        "b.empty_step",
        json!({"median_us": us(empty_med), "mean_us": us(empty_mean), "target_us": 100, "native_true_us": us(native_mean), "ratio_to_native_spawn": empty_mean.as_secs_f64() / native_mean.as_secs_f64()}),
        format!(
            "{:.1} us median, {:.1} us mean (target < 100 us)",
            us(empty_med),
            us(empty_mean)
        ),
        format!(
            "{:.3}x a native spawn",
            empty_mean.as_secs_f64() / native_mean.as_secs_f64()
        ),
    );

    // (c) 2M lines through an observer, against seq alone.
    let lines = LINES / scale as u64;
    let count = lines.to_string();
    let iters = if full { 5 } else { 1 };
    let (seq_med, _) = measure(iters, || spawn_true("seq", &["1", &count]));
    let observers = |name: &str, bytes: &[u8]| {
        let Loaded::Observer(component) = bench.rt.load(bytes, name).unwrap() else {
            unreachable!()
        };
        vec![ObserverSpec {
            component,
            name: name.into(),
            args: Value::Null,
            log: "stdio".into(),
        }]
    };
    let builtin = |name: &str| observers(name, steps::find(name).unwrap().wasm);
    let line_counter = builtin("line-counter");
    let per_line = observers("count-observer", steps::fixtures::COUNT_OBSERVER);
    let run_seq = json!({"action": "run", "argv": ["seq", "1", count]});
    for (label, obs) in [
        ("c.seq_line_counter", &line_counter),
        ("c.seq_per_line_observer", &per_line),
    ] {
        let mut seen = 0.0;
        let (med, _) = measure(iters, || {
            let out = bench.run(&run_seq, &bench.grant, obs);
            seen = out
                .statistics
                .get("lines")
                .or(out.statistics.get("out_lines"))
                .copied()
                .unwrap_or(0.0);
        });
        assert_eq!(seen as u64, lines, "{label} saw every line");
        let rate = lines as f64 / med.as_secs_f64();
        let native_rate = lines as f64 / seq_med.as_secs_f64();
        emit(
            label,
            json!({"lines": lines, "elapsed_ms": med.as_secs_f64() * 1e3, "lines_per_s": rate, "native_seq_ms": seq_med.as_secs_f64() * 1e3, "native_lines_per_s": native_rate, "ratio": med.as_secs_f64() / seq_med.as_secs_f64(), "target_lines_per_s": 5_000_000}),
            format!(
                "{:.2}M lines/s ({:.0} ms; seq alone {:.0} ms)",
                rate / 1e6,
                med.as_secs_f64() * 1e3,
                seq_med.as_secs_f64() * 1e3
            ),
            format!("{:.2}x seq", med.as_secs_f64() / seq_med.as_secs_f64()),
        );
    }

    // (d) the standard observers over the same lines, against the line counter in this run.
    let (counter_med, _) = measure(iters, || {
        bench.run(&run_seq, &bench.grant, &line_counter);
    });
    for name in ["warnings", "test-results", "regex"] {
        let mut obs = builtin(name);
        if name == "regex" {
            obs[0].args = json!({"patterns": [{"regex": "^1234", "statistic": "hits"}, {"regex": "(?i)error", "statistic": "errors"}]});
        }
        let (med, _) = measure(iters, || {
            let out = bench.run(&run_seq, &bench.grant, &obs);
            assert!(out.result.is_ok(), "{name}: {:?}", out.message);
        });
        let rate = lines as f64 / med.as_secs_f64();
        emit(
            &format!("d.seq_{name}"),
            json!({"lines": lines, "elapsed_ms": med.as_secs_f64() * 1e3, "lines_per_s": rate, "line_counter_ms": counter_med.as_secs_f64() * 1e3, "ratio_to_line_counter": med.as_secs_f64() / counter_med.as_secs_f64()}),
            format!(
                "{:.2}M lines/s ({:.0} ms; line counter {:.0} ms)",
                rate / 1e6,
                med.as_secs_f64() * 1e3,
                counter_med.as_secs_f64() * 1e3
            ),
            format!(
                "{:.2}x line counter",
                med.as_secs_f64() / counter_med.as_secs_f64()
            ),
        );
    }

    println!();
    println!("{:<26} {:<62} vs baseline", "benchmark", "figure");
    for (name, shown, ratio) in rows {
        println!("{name:<26} {shown:<62} {ratio}");
    }
}
