//! Every benchmark at a tiny size, against the real servers, through `backstop bench`: so that
//! none rots. The figures are not judged (a benchmark asserts nothing); the report's shape is:
//! each expected row is printed with its figures filled in.
//!
//! Declared as a test of the `backstop` package (services/cli/Cargo.toml) although it lives with
//! the benchmarks: there CARGO_BIN_EXE_backstop is set, so the `backstop` binary under test is
//! always freshly built. The `backstop-bench` binary is not one of that package's targets (a
//! binary cannot be a dependency); it is taken from beside `backstop` (the same target
//! directory and profile), where `cargo test --workspace` builds it, since the bench package has
//! an integration test of its own. A missing or stale (older than the bench sources)
//! `backstop-bench` fails with the command that builds it, rather than testing old code.
//!
//! Each benchmark runs in its own test, so two run at once with `--test-threads=2`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Far above a tiny run's few seconds; a hung benchmark fails instead of stalling the suite.
const RUN_LIMIT: Duration = Duration::from_secs(240);

fn backstop() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_backstop"))
}

fn bench_sources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench")
}

/// The newest modification time of the files under `path`.
fn newest(path: &Path) -> SystemTime {
    let Ok(meta) = std::fs::metadata(path) else {
        return SystemTime::UNIX_EPOCH;
    };
    let mut t = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    if meta.is_dir()
        && let Ok(entries) = std::fs::read_dir(path)
    {
        for e in entries.flatten() {
            t = t.max(newest(&e.path()));
        }
    }
    t
}

/// `backstop-bench` beside `backstop`, checked to be there and built from the current sources.
fn bench_binary() -> PathBuf {
    let path = backstop()
        .parent()
        .expect("the backstop binary has a directory")
        .join("backstop-bench");
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "{} is missing ({e}): run `cargo build -p backstop-bench` (with --release for a \
                 release test run), or `cargo test --workspace`, which builds it",
                path.display()
            )
        });
    let src = bench_sources();
    let sources = newest(&src.join("src")).max(newest(&src.join("Cargo.toml")));
    assert!(
        built >= sources,
        "{} is older than its sources in {}: run `cargo build -p backstop-bench` (or `cargo test \
         --workspace`) so that this test runs the current benchmarks",
        path.display(),
        src.display()
    );
    path
}

/// Runs `backstop bench ARGS...` to completion within [`RUN_LIMIT`]; panics with its output
/// unless it succeeds. Returns stdout.
fn run_bench(args: &[&str]) -> String {
    let out = run_limited(
        Command::new(backstop())
            .arg("bench")
            .args(args)
            .env("BACKSTOP_LOG", "warn"),
    );
    assert!(
        out.status.success(),
        "backstop bench {} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_limited(cmd: &mut Command) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("start backstop");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for backstop") {
            break status;
        }
        if start.elapsed() > RUN_LIMIT {
            // The benchmark stops its servers in destructors, which a kill skips; a hung run is
            // a failure worth the leftovers (they live in temporary directories).
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {}s; stderr:\n{}",
                RUN_LIMIT.as_secs(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}

/// The line starting with `label` (after leading spaces), split on whitespace after the label.
fn row<'a>(text: &'a str, label: &str) -> Vec<&'a str> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no row {label:?} in the report:\n{text}"));
    line.trim_start()[label.len()..]
        .split_whitespace()
        .collect()
}

fn number(cell: &str, what: &str, text: &str) -> f64 {
    cell.parse::<f64>()
        .unwrap_or_else(|_| panic!("{what}: {cell:?} is not a number in:\n{text}"))
}

#[test]
fn ledger_reports_every_configuration_with_and_without_nats() {
    bench_binary();
    let text = run_bench(&[
        "ledger",
        "--seconds",
        "1",
        "--appenders",
        "1,4",
        "--runs",
        "1",
    ]);
    assert!(
        text.contains("backstop bench ledger: 1 s per run, median of 1 runs"),
        "{text}"
    );
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|c| c.len() == 8 && c[0].parse::<usize>().is_ok())
        .collect();
    let configs: Vec<(&str, &str)> = rows.iter().map(|c| (c[0], c[1])).collect();
    assert_eq!(
        configs,
        [("1", "no"), ("1", "yes"), ("4", "no"), ("4", "yes")],
        "{text}"
    );
    for c in &rows {
        assert!(number(c[2], "appends", &text) > 0.0, "{text}");
        assert!(number(c[3], "appends/s", &text) > 0.0, "{text}");
        number(c[4], "p50 ms", &text);
        number(c[5], "p99 ms", &text);
        if c[1] == "yes" {
            number(c[6], "lag p50 ms", &text);
            number(c[7], "lag p99 ms", &text);
        } else {
            assert_eq!((c[6], c[7]), ("-", "-"), "{text}");
        }
    }
}

#[test]
fn api_reports_fill_projection_plans_and_every_target() {
    bench_binary();
    let text = run_bench(&["api", "--events", "3000", "--seconds", "1", "--rate", "20"]);
    let fill = row(&text, "fill:");
    assert_eq!(fill[0], "3000", "{text}");
    let projected = text.lines().filter(|l| l.starts_with("project:")).count();
    assert!(projected >= 2, "one project: line per projector:\n{text}");
    for plan in [
        "EXPLAIN audit, by type:",
        "EXPLAIN audit, by actor, page 2:",
        "EXPLAIN audit, by stream:",
    ] {
        assert!(text.contains(plan), "{plan} missing:\n{text}");
    }
    // "audit query " with its space: not the "audit query, actor + page" row.
    for target in ["overview page", "audit query, actor + page", "audit query "] {
        // wrk req/s, p50, p99 (value and unit), |, paced/s, p50, p99, max, errors.
        let c = row(&text, target);
        assert_eq!(c.len(), 11, "{target}: {c:?} (did wrk run?) in:\n{text}");
        let tail = &c[..];
        assert!(number(tail[0], "wrk req/s", &text) > 0.0, "{text}");
        assert_eq!(tail[5], "|", "{text}");
        assert!(number(tail[6], "paced/s", &text) > 0.0, "{text}");
        for (i, what) in [(7, "p50 ms"), (8, "p99 ms"), (9, "max ms")] {
            assert!(number(tail[i], what, &text).is_finite(), "{text}");
        }
        assert_eq!(tail[10], "0", "{target}: requests failed:\n{text}");
    }
}

#[test]
fn backup_reports_every_tool_in_its_json() {
    bench_binary();
    let text = run_bench(&["backup", "--rows", "2000", "--runs", "1", "--json"]);
    let report: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"));
    assert_eq!(report["rows"], 2000, "{text}");
    assert_eq!(report["runs"], 1, "{text}");
    assert!(report["database_bytes"].as_u64().unwrap_or(0) > 0, "{text}");
    let tools: Vec<&str> = report["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert_eq!(tools.len(), 6, "{text}");
    let median = report["median"].as_array().expect("median figures");
    assert_eq!(median.len(), tools.len(), "{text}");
    let sample_ok = |s: &serde_json::Value| {
        s["secs"].as_f64().is_some_and(|v| v > 0.0) && s["peak_bytes"].as_u64().is_some()
    };
    for (i, figures) in median.iter().enumerate() {
        let name = tools[i];
        let restores_only = name.starts_with("pg_restore");
        if restores_only {
            assert!(sample_ok(&figures["restore"]), "{name}: {figures}");
            continue;
        }
        assert!(
            sample_ok(&figures["full"]),
            "{name}: no full backup: {figures}"
        );
        assert!(
            figures["stored_bytes"].as_u64().unwrap_or(0) > 0,
            "{name}: {figures}"
        );
        if name.starts_with("restic") || name.starts_with("backstop") {
            assert!(sample_ok(&figures["second"]), "{name}: {figures}");
            assert!(
                figures["added_bytes"].as_u64().is_some(),
                "{name}: {figures}"
            );
        }
        if name.starts_with("backstop") {
            assert!(sample_ok(&figures["restore"]), "{name}: {figures}");
        }
    }
}

#[test]
fn physical_reports_backups_restores_and_wal_archiving_for_both_tools() {
    bench_binary();
    let text = run_bench(&[
        "physical",
        "--rows",
        "2000",
        "--runs",
        "1",
        "--pgbench-scale",
        "1",
        "--backlog-seconds",
        "2",
        "--lag-seconds",
        "3",
    ]);
    assert!(text.contains("backstop bench physical:"), "{text}");
    for (label, unit) in [
        ("full base backup: time", "s"),
        ("full base backup: stored", "MiB"),
        ("second base backup after churn.sql: time", "s"),
        ("second base backup after churn.sql: stored", "MiB"),
        ("restore (lay out the latest)", "s"),
        ("peak memory (backups and restore)", "MiB"),
        ("WAL archiving under pgbench (higher better)", "seg/s"),
        ("WAL archive lag p50", "ms"),
        ("WAL archive lag p99", "ms"),
    ] {
        // Backstop's value and unit, pgBackRest's value and unit, the ratio.
        let c = row(&text, label);
        assert_eq!(c.len(), 5, "{label}: {c:?} in:\n{text}");
        assert_eq!((c[1], c[3]), (unit, unit), "{label}:\n{text}");
        number(c[0], label, &text);
        number(c[2], label, &text);
        number(c[4], "ratio", &text);
    }
}

#[test]
fn scale_reports_time_per_gib_and_peak_memory_at_each_size() {
    bench_binary();
    let text = run_bench(&["scale", "--rows", "2000,4000", "--runs", "1"]);
    assert!(
        text.contains("backstop bench scale: Backstop at 2000, 4000 rows, median of 1 runs"),
        "{text}"
    );
    for method in ["logical", "physical"] {
        for (step, unit, spread) in [
            ("database", "MiB", false),
            ("full: time", "s", false),
            ("full: per GiB", "s", true),
            ("second: time", "s", false),
            ("second: per GiB", "s", true),
            ("restore: time", "s", false),
            ("restore: per GiB", "s", true),
            ("peak memory", "MB", true),
            ("  in the full", "MB", false),
            ("  in the second", "MB", false),
            ("  in the restore", "MB", false),
        ] {
            let label = format!("{method} {step}");
            // Each size's value and unit, then the spread where there is one.
            let c = row(&text, &label);
            assert_eq!(
                c.len(),
                if spread { 5 } else { 4 },
                "{label}: {c:?}:\n{text}"
            );
            for size in [0, 2] {
                assert_eq!(c[size + 1], unit, "{label}:\n{text}");
                assert!(number(c[size], &label, &text) > 0.0, "{label}:\n{text}");
            }
            if spread {
                let s = c[4].trim_end_matches(['%', 'x']);
                assert!(number(s, &label, &text) >= 0.0, "{label}:\n{text}");
            }
        }
        for step in ["full", "second", "restore"] {
            // "F s + R s per GiB": the fitted fixed cost (it may come out negative) and rate.
            let label = format!("{method} {step}: fixed + per GiB");
            let c = row(&text, &label);
            assert_eq!(c[1..3], ["s", "+"], "{label}:\n{text}");
            assert_eq!(c[4..], ["s", "per", "GiB"], "{label}:\n{text}");
            number(c[0], &label, &text);
            number(c[3], &label, &text);
        }
        for target in ["time per GiB within 15%", "projected for a 10 GB database"] {
            let line = text
                .lines()
                .find(|l| l.trim_start().starts_with(method) && l.contains(target))
                .unwrap_or_else(|| panic!("no {method} target {target:?}:\n{text}"));
            assert!(
                line.contains(": met") || line.contains(": MISSED"),
                "{line}\n{text}"
            );
        }
    }
}

#[test]
fn prune_reports_the_mark_and_sweep_runs_in_text_and_json() {
    bench_binary();
    let text = run_bench(&["prune", "--chunks", "4000", "--manifests", "40"]);
    assert!(
        text.contains("backstop bench prune: 4000 chunks, 40 manifests"),
        "{text}"
    );
    for label in ["mark run:", "sweep run:"] {
        let c = row(&text, label);
        assert_eq!((c[1], c[3]), ("s", "MiB"), "{label}:\n{text}");
        number(c[0], label, &text);
        assert!(
            number(c[2], label, &text) > 0.0,
            "{label}: a peak of 0:\n{text}"
        );
    }
    let json = run_bench(&["prune", "--chunks", "4000", "--manifests", "40", "--json"]);
    let f: serde_json::Value = serde_json::from_str(&json).expect("JSON figures");
    assert_eq!(f["chunks"], 4000, "{json}");
    assert_eq!(f["forgotten"], 20, "{json}");
    // Half the manifests forgotten leaves (40 / 2 - 1) groups of 100 chunks unreferenced.
    assert_eq!(f["swept"], 1900, "{json}");
    assert_eq!(f["chunks_left"], 2100, "{json}");
}

#[test]
fn bench_without_the_bench_binary_names_the_command_that_builds_it() {
    // A copy of `backstop` alone in a directory, with nothing on PATH: `backstop bench` must say
    // what is missing and how to build it. Hard-linked when possible (the binary is large).
    let dir = tempfile::tempdir_in(backstop().parent().expect("target dir")).expect("tempdir");
    let lone = dir.path().join("backstop");
    if std::fs::hard_link(backstop(), &lone).is_err() {
        std::fs::copy(backstop(), &lone).expect("copy backstop");
    }
    let out = run_limited(
        Command::new(&lone)
            .args(["bench", "ledger"])
            .env("PATH", dir.path().join("empty")),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("backstop-bench") && err.contains("cargo build --release -p backstop-bench"),
        "{err}"
    );
}

#[test]
fn webhook_reports_every_sender_count() {
    bench_binary();
    let text = run_bench(&[
        "webhook",
        "--seconds",
        "1",
        "--senders",
        "1,4",
        "--runs",
        "1",
    ]);
    assert!(
        text.contains("backstop bench webhook: 1 s per run, median of 1 runs"),
        "{text}"
    );
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|c| c.len() == 5 && c[0].parse::<usize>().is_ok())
        .collect();
    assert_eq!(
        rows.iter().map(|c| c[0]).collect::<Vec<_>>(),
        ["1", "4"],
        "{text}"
    );
    for c in &rows {
        assert!(number(c[1], "signals", &text) > 0.0, "{text}");
        assert!(number(c[2], "signals/s", &text) > 0.0, "{text}");
        number(c[3], "p50 ms", &text);
        number(c[4], "p99 ms", &text);
    }
}

#[test]
fn drill_reports_each_phase_and_the_rto() {
    bench_binary();
    let text = run_bench(&[
        "drill",
        "--rows",
        "2000",
        "--runs",
        "1",
        "--pgbench-seconds",
        "2",
        "--pgbench-scale",
        "1",
    ]);
    assert!(
        text.contains("backstop bench drill: logical, rows=2000"),
        "{text}"
    );
    assert!(
        text.contains("backstop bench drill: physical, rows=2000"),
        "{text}"
    );
    let phases: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|c| c.len() == 3 && c[2].ends_with('%'))
        .collect();
    // Logical, then physical: each phase of each.
    assert_eq!(
        phases.iter().map(|c| c[0]).collect::<Vec<_>>(),
        [
            "fetch", "restore", "replay", "checks", "fetch", "restore", "replay", "checks"
        ],
        "{text}"
    );
    for c in &phases {
        number(c[1], "ms", &text);
    }
    assert_eq!(
        text.matches("against a target of 60000 ms: met").count(),
        2,
        "{text}"
    );
}
