//! What steps used, end to end: measured by a real worker, stored by the master, shown in a
//! build's JSON and in `/metrics`.

use std::time::Duration;

use serde_json::json;

use crate::farm::Farm;

/// Holds 64 MiB in the shell (a string read from a pipe) while it counts to 200,000.
const BURN: &str = "x=$(head -c 67108864 /dev/zero | tr '\\\\0' a); \
                    i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo ${#x}";

/// A sample's value in a scrape.
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {sample} in:\n{text}"))
}

#[test]
fn a_builds_steps_show_what_they_used_and_metrics_count_them() {
    let mut farm = Farm::new(&format!(
        r#"[[workers]]
name = "w1"
token = "t-w1"

[[builders]]
name = "burn"
grant = {{ programs = ["sh"] }}
[[builders.steps]]
module = "shell"
name = "burn"
args = {{ command = ["sh", "-c", "{BURN}"] }}
[[builders.steps]]
module = "shell"
name = "never"
do_step_if = false
args = {{ command = ["sh", "-c", "true"] }}

[[schedulers]]
name = "force"
type = "force"
builders = ["burn"]
"#
    ));
    farm.start_master();
    farm.start_worker("w1", &[]);
    let request = farm.force("force", json!({"parameters": {}}));
    let build = farm.finished_build(request, 0, Duration::from_secs(60));
    assert_eq!(build["results"], "SUCCESS", "{build:#}{}", farm.logs());
    let steps = build["steps"].as_array().unwrap();
    let burn = &steps[0];
    assert!(burn["cpu_seconds"].as_f64().unwrap() >= 0.05, "{burn:#}");
    assert!(
        burn["peak_rss_bytes"].as_i64().unwrap() >= 64 << 20,
        "{burn:#}"
    );
    assert!(burn["guest_memory_bytes"].as_i64().unwrap() > 0, "{burn:#}");
    // The skipped step measured nothing, and says so.
    let never = &steps[1];
    for figure in ["cpu_seconds", "peak_rss_bytes", "guest_memory_bytes"] {
        assert!(never[figure].is_null(), "{figure}: {never:#}");
    }

    let metrics = farm.metrics();
    let count = |name: &str| metric(&metrics, &format!("{name}_count{{builder=\"burn\"}}"));
    // Counted for the step that ran, not for the skipped one.
    assert_eq!(count("kiln_step_cpu_seconds"), 1.0);
    assert_eq!(count("kiln_step_peak_rss_bytes"), 1.0);
    assert_eq!(count("kiln_step_guest_memory_bytes"), 1.0);
    assert!(metric(&metrics, "kiln_step_cpu_seconds_sum{builder=\"burn\"}") >= 0.05);
    assert!(
        metric(&metrics, "kiln_step_peak_rss_bytes_sum{builder=\"burn\"}") >= f64::from(64 << 20)
    );
}
