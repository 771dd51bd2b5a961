//! Whole-farm benchmark: a real `kiln master` (SQLite) and real `kiln-worker` processes on
//! 127.0.0.1, DESIGN.md's workloads W1 and W3, each printed as one JSON line, then a table.
//!
//! - W1: one build of 50 steps each running `true`: per-step ms, beside spawning `true` 50
//!   times natively in the same run.
//! - W3: 200 one-step (`true`) builds on 4 workers, collapsing off: builds/s from the first
//!   build's start to the last one's end (the requests are queued while the workers are busy),
//!   and end to end counting the 200 force requests; the master's peak RSS (VmHWM) (W4).
//!
//! `cargo bench -p master --bench farm` (`KILN_BENCH_LOG=info` shows the processes' logs).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const STEPS: usize = 50;
/// W3's builds (`KILN_BENCH_BUILDS` overrides, to profile a longer run).
fn builds() -> usize {
    std::env::var("KILN_BENCH_BUILDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200)
}
const WORKERS: usize = 4;

fn config(port: u16) -> String {
    let mut t = format!(
        "[master]\nname = \"bench\"\nlisten = \"127.0.0.1:{port}\"\nheartbeat = \"5s\"\nanonymous = \"force\"\n\n"
    );
    for i in 0..WORKERS {
        t += &format!("[[workers]]\nname = \"w{i}\"\ntoken = \"t{i}\"\n\n");
    }
    t += "[[builders]]\nname = \"fifty\"\ncollapse = false\ngrant = { programs = [\"true\"] }\n";
    for i in 0..STEPS {
        t += &format!(
            "[[builders.steps]]\nname = \"s{i}\"\nmodule = \"shell\"\nargs = {{ command = [\"true\"] }}\n"
        );
    }
    t += "\n[[builders]]\nname = \"one\"\ncollapse = false\ngrant = { programs = [\"true\"] }\n\
          [[builders.steps]]\nmodule = \"shell\"\nargs = { command = [\"true\"] }\n";
    // Keeps every worker busy while W3's requests are queued.
    t += "\n[[builders]]\nname = \"block\"\ncollapse = false\ngrant = { programs = [\"sleep\"] }\n\
          [[builders.steps]]\nmodule = \"shell\"\nargs = { command = [\"sleep\", \"2\"] }\n";
    t += "\n[[schedulers]]\nname = \"force\"\ntype = \"force\"\nbuilders = [\"fifty\", \"one\", \"block\"]\n";
    t
}

fn api(port: u16, method: &str, path: &str, body: &str) -> Value {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(body).unwrap_or(Value::Null)
}

fn wait(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < within, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// CPU time (user + system) a process has used, in ms.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / hz
}

fn spawn_worker(dir: &Path, port: u16, i: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kiln-worker"))
        .args(["--master", &format!("http://127.0.0.1:{port}")])
        .args(["--name", &format!("w{i}")])
        .arg("--workdir")
        .arg(dir.join(format!("w{i}")))
        .env("KILN_TOKEN", format!("t{i}"))
        .env("KILN_CACHE_DIR", dir.join("cache"))
        .env("RUST_LOG", log_level())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// The processes' log level: `KILN_BENCH_LOG`, else warnings only.
fn log_level() -> String {
    std::env::var("KILN_BENCH_LOG").unwrap_or_else(|_| "warn".into())
}

fn complete_builds(port: u16) -> Vec<Value> {
    api(port, "GET", "/api/v2/builds?limit=10000", "")["builds"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|b| b["complete"] == true)
        .collect()
}

fn main() {
    let builds = builds();
    // `cargo bench` passes --bench; nothing else is accepted.
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(dir.path().join("kiln.toml"), config(port)).unwrap();
    let mut master = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["master", "--poll", "1"])
        .current_dir(dir.path())
        .env("KILN_LOG", log_level())
        .env("KILN_CACHE_DIR", dir.path().join("cache"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait("the master", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let mut workers: Vec<Child> = (0..WORKERS)
        .map(|i| spawn_worker(dir.path(), port, i))
        .collect();
    wait("the workers", Duration::from_secs(30), || {
        api(port, "GET", "/api/v2/workers", "")["workers"]
            .as_array()
            .is_some_and(|w| w.iter().all(|w| w["connected"] == true))
    });
    let force = |builder: &str| {
        api(
            port,
            "POST",
            "/api/v2/forceschedulers/force",
            &json!({"builders": [builder], "parameters": {}}).to_string(),
        )
    };
    // Warm up: every worker compiles (or loads) the shell component once.
    for _ in 0..WORKERS {
        force("one");
    }
    wait("warm-up", Duration::from_secs(120), || {
        complete_builds(port).len() >= WORKERS
    });

    // W1: one build of 50 `true` steps, against 50 native spawns of `true`.
    let native = {
        let t = Instant::now();
        for _ in 0..STEPS {
            Command::new("true").status().unwrap();
        }
        t.elapsed()
    };
    let before = complete_builds(port).len();
    let t = Instant::now();
    force("fifty");
    wait("W1", Duration::from_secs(120), || {
        complete_builds(port).len() > before
    });
    let w1_wall = t.elapsed();
    let build = complete_builds(port)
        .into_iter()
        .find(|b| b["builder"] == "fifty")
        .unwrap();
    assert_eq!(build["results"], "SUCCESS", "{build}");
    let w1_build_ms =
        (build["complete_at"].as_i64().unwrap() - build["started_at"].as_i64().unwrap()) as f64;
    let per_step = w1_build_ms / STEPS as f64;
    let native_per = native.as_secs_f64() * 1000.0 / STEPS as f64;
    let w1 = json!({
        "workload": "W1", "steps": STEPS, "build_ms": w1_build_ms,
        "request_to_done_ms": w1_wall.as_secs_f64() * 1000.0,
        "per_step_ms": per_step, "native_spawn_ms": native_per,
        "above_spawn_ms": per_step - native_per, "ratio_to_native": per_step / native_per,
    });
    println!("{w1}");

    // W3: 200 one-step builds on 4 workers. The requests are queued while every worker runs a
    // `sleep 2` build; the drain (first W3 build started to last finished, from the builds'
    // own times) is the figure, and the end-to-end time with the submissions is reported too.
    for _ in 0..WORKERS {
        force("block");
    }
    wait("the workers to be busy", Duration::from_secs(30), || {
        api(port, "GET", "/api/v2/workers", "")["workers"]
            .as_array()
            .is_some_and(|w| {
                w.iter()
                    .all(|w| w["builds"].as_array().is_some_and(|b| !b.is_empty()))
            })
    });
    let before = complete_builds(port).len();
    let cpu_before = cpu_ms(master.id());
    let worker_cpu_before: f64 = workers.iter().map(|w| cpu_ms(w.id())).sum();
    let t = Instant::now();
    for _ in 0..builds {
        force("one");
    }
    let submitted = t.elapsed();
    // Cheap polls while the queue drains (the newest build only: listing every build 50 times
    // a second would load the master more than the workload does), then one full check.
    wait(
        "W3 to start its last build",
        Duration::from_secs(600),
        || {
            let newest = &api(port, "GET", "/api/v2/builds?limit=1", "")["builds"][0];
            newest["builder"] == "one"
                && newest["number"].as_u64() >= Some(builds as u64)
                && newest["complete"] == true
        },
    );
    wait("W3", Duration::from_secs(60), || {
        complete_builds(port).len() >= before + WORKERS + builds
    });
    let w3_elapsed = t.elapsed();
    // Newest first: W3's are the last `builds` of builder "one".
    let w3_builds: Vec<Value> = complete_builds(port)
        .into_iter()
        .filter(|b| b["builder"] == "one")
        .take(builds)
        .collect();
    let first_start = w3_builds
        .iter()
        .filter_map(|b| b["started_at"].as_i64())
        .min()
        .unwrap();
    let last_end = w3_builds
        .iter()
        .filter_map(|b| b["complete_at"].as_i64())
        .max()
        .unwrap();
    let drain_s = (last_end - first_start) as f64 / 1000.0;
    let master_cpu = cpu_ms(master.id()) - cpu_before;
    let worker_cpu: f64 = workers.iter().map(|w| cpu_ms(w.id())).sum::<f64>() - worker_cpu_before;
    let failed = complete_builds(port)
        .iter()
        .filter(|b| b["results"] != "SUCCESS")
        .count();
    assert_eq!(failed, 0, "some builds failed");
    let hwm = vm_hwm_kib(master.id());
    let w3 = json!({
        "workload": "W3", "builds": builds, "workers": WORKERS,
        "drain_s": drain_s, "builds_per_s": builds as f64 / drain_s,
        "submit_s": submitted.as_secs_f64(),
        "submit_per_s": builds as f64 / submitted.as_secs_f64(),
        "master_cpu_ms_per_build": master_cpu / builds as f64,
        "workers_cpu_ms_per_build": worker_cpu / builds as f64,
        "master_cpu_share": master_cpu / (w3_elapsed.as_secs_f64() * 1000.0),
    });
    println!("{w3}");
    let w4 = json!({"workload": "W4", "master_vm_hwm_mib": hwm as f64 / 1024.0});
    println!("{w4}");

    println!();
    println!("| workload | Kiln | baseline (same run) | target |");
    println!("|---|---|---|---|");
    println!(
        "| W1 50 `true` steps, per step | {per_step:.2} ms ({:.2} ms above the spawn, {:.1}x) | spawning `true`: {native_per:.2} ms | under 2 ms |",
        per_step - native_per,
        per_step / native_per
    );
    println!(
        "| W3 {builds} queued one-step builds on {WORKERS} workers | {:.0} builds/s | submitting them: {:.0} force requests/s through the API | at least 400 builds/s |",
        builds as f64 / drain_s,
        builds as f64 / submitted.as_secs_f64()
    );
    println!(
        "| W4 master peak RSS during W3 | {:.1} MiB | | under 30 MiB |",
        hwm as f64 / 1024.0
    );

    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let _ = master.kill();
    let _ = master.wait();
}
