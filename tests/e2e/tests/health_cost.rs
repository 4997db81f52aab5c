//! The health and cost pages end to end: `backstop serve` with projections in a real
//! PostgreSQL and a real local repository holding two real backups, loaded by headless
//! Chromium. The ledger holds three weeks of daily usage samples of an S3 repository (growing
//! from 100 GiB to 700 GiB, so the estimate ends over the $15 budget: 700 x 0.023 = $16.10) and a
//! day of an endpoint's recorded checks (down, degraded, up). The screenshots are kept in
//! `target/artifacts/cost.png` and `target/artifacts/health.png`.

#[path = "dashboard_support.rs"]
mod dashboard_support;
#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use backstop_events::{Actor, Event, HealthState, NewEvent, StorageUsageSampled, streams};
use backstop_ops::health::{CheckResult, checked_event};
use backstop_testkit::{Postgres, free_port};
use chrono::{TimeDelta, Utc};
use dashboard_support::*;
use support::{Process, run, stderr};

fn screenshot(url: &str, name: &str) {
    let shot = artifacts_dir().join(name);
    let _ = std::fs::remove_file(&shot);
    let out = chromium(
        &[
            "--window-size=1280,1400",
            &format!("--screenshot={}", shot.display()),
        ],
        url,
    );
    assert!(
        out.status.success(),
        "screenshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "a real screenshot ({} bytes)",
        png.len()
    );
}

fn dom(url: &str) -> String {
    let out = chromium(&["--dump-dom"], url);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_the_cost_estimate_trend_recommendations_and_endpoint_health() {
    let pg = Postgres::start().expect("PostgreSQL");
    pg.create_db("projections").unwrap();
    pg.create_db("main").unwrap();
    pg.psql(
        "main",
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 5000) g;",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let repo = dir.path().join("repo");
    let key = dir.path().join("master.key");
    let port = free_port();
    let config = write_config(dir.path(), true);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[repository]\nlocation = \"{}\"\nmaster_key_file = \"{}\"\n\n\
         [[sources]]\nname = \"main\"\npostgres = \"{}\"\n\n[cost]\nbudget_usd = 15.0\n\n\
         # serve's health monitor checks serve itself, every second.\n\
         [health]\ninterval = \"1s\"\n[[health.endpoints]]\nname = \"self\"\nurl = \"http://127.0.0.1:{port}/healthz\"\n",
        repo.display(),
        key.display(),
        pg.conninfo("main"),
    ));
    std::fs::write(&config, text).unwrap();
    let cfg = config.to_str().unwrap();
    let out = run(
        &data,
        &[
            "--config",
            cfg,
            "init",
            "--generate-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "init: {}", stderr(&out));
    for _ in 0..2 {
        let out = run(&data, &["--config", cfg, "backup", "--source", "main"]);
        assert!(out.status.success(), "backup: {}", stderr(&out));
    }

    let now = Utc::now();
    let gib = 1u64 << 30;
    let mut events = Vec::new();
    for day in 0..21i64 {
        let mut e = NewEvent::new(
            streams::storage(),
            Actor::worker("storage-probe"),
            &Event::StorageUsageSampled(StorageUsageSampled {
                region: "us-east-1".into(),
                storage_class: "STANDARD".into(),
                bytes: (100 + day as u64 * 30) * gib,
                objects: 1000 + day as u64 * 10,
                repository: "s3://backups/prod".into(),
            }),
        );
        e.occurred_at = now - TimeDelta::days(20 - day) - TimeDelta::hours(1);
        events.push(e);
    }
    let answer = |ms: u64, fail: bool| CheckResult {
        status: Some(if fail { 503 } else { 200 }),
        latency: Duration::from_millis(ms),
        error: fail.then(|| "answered 503, expected 200".to_string()),
    };
    let t0 = now - TimeDelta::hours(20);
    for (i, (ms, fail, state)) in [
        (40, false, HealthState::Up),
        (12, true, HealthState::Up),
        (12, true, HealthState::Down),
        (3500, false, HealthState::Up),
        (3800, false, HealthState::Up),
        (4100, false, HealthState::Degraded),
        (60, false, HealthState::Up),
        (45, false, HealthState::Up),
    ]
    .into_iter()
    .enumerate()
    {
        // An hour apart, so the chart spreads them (the monitor's slots are 5 minutes apart).
        let slot = t0 + TimeDelta::hours(i as i64);
        events.push(checked_event("platform", slot, &answer(ms, fail), state));
    }
    fill_ledger(&data, events, 50).await;

    let url = pg.conninfo("projections");
    let listen = format!("127.0.0.1:{port}");
    let mut serve = Process::spawn(
        &data,
        &[
            "--config",
            cfg,
            "serve",
            "--projections-url",
            &url,
            "--listen",
            &listen,
        ],
        &[],
    );
    wait_http(port, "/healthz", None, "serve answers", |s, _| s == 200);
    let body = wait_http(
        port,
        "/api/cost",
        Some(OPERATOR),
        "the usage samples are projected and the backups read",
        |s, b| s == 200 && b.contains("s3://backups/prod") && b.contains("\"backups\":2"),
    );
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let series = report["estimate"]["series"].as_array().unwrap();
    let s3 = series
        .iter()
        .find(|s| s["repository"] == "s3://backups/prod")
        .unwrap();
    // The latest sample: 100 + 20 x 30 = 700 GiB at $0.023 = $16.10 a month.
    assert_eq!(s3["bytes"].as_u64().unwrap(), 700 * gib);
    assert!((s3["monthly_usd"].as_f64().unwrap() - 16.10).abs() < 1e-9);
    assert_eq!(report["over_budget"], true);
    assert!(report["trend"].as_array().unwrap().len() >= 21);
    let policies = report["recommendations"]["policies"].as_array().unwrap();
    assert_eq!(policies[0]["name"], "current");
    assert!(policies[0]["stored_bytes"].as_u64().unwrap() > 0);
    let health = wait_http(
        port,
        "/api/health",
        Some(OPERATOR),
        "the checks are projected",
        |s, b| {
            // serve's own check of `self` reaches health_status and health_checks in turn:
            // wait for the check itself, not just the endpoint's name.
            s == 200
                && b.contains("\"platform\"")
                && b.contains("degraded")
                && serde_json::from_str::<serde_json::Value>(b).is_ok_and(|v| {
                    v["checks"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|c| c["endpoint"] == "self"))
                })
        },
    );
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["endpoints"][0]["state"], "up");
    let checks = health["checks"].as_array().unwrap();
    assert_eq!(
        checks
            .iter()
            .filter(|c| c["endpoint"] == "platform")
            .count(),
        8
    );
    // serve's own monitor recorded its first check of `self` (a sample), answered in time.
    let own = checks.iter().find(|c| c["endpoint"] == "self").unwrap();
    assert_eq!(
        (own["ok"].as_bool(), own["state"].as_str()),
        (Some(true), Some("up"))
    );

    // `backstop cost` beside the running serve reads the same samples through its socket and
    // the backups from the repository.
    let out = run(&data, &["--config", cfg, "cost", "--json"]);
    assert!(out.status.success(), "cost: {}", stderr(&out));
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let total = cli["estimate"]["total_usd"].as_f64().unwrap();
    assert!((16.10..16.11).contains(&total), "{total}");
    assert_eq!(cli["recommendations"]["backups"], 2);
    assert_eq!(cli["over_budget"], true);
    let out = run(&data, &["--config", cfg, "cost"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("OVER BUDGET")
            && text.contains("14 dailies + 8 weeklies"),
        "{text}\n{}",
        stderr(&out)
    );

    let cost_url = format!("http://127.0.0.1:{port}/cost");
    let page = dom(&cost_url);
    std::fs::write(artifacts_dir().join("cost.html"), &page).unwrap();
    assert!(page.contains("id=\"estimate\""), "{page}");
    assert!(
        page.contains("id=\"over-budget\""),
        "the estimate is over budget"
    );
    assert!(page.contains("budget $15.00"));
    assert!(
        page.matches("<circle class=\"point cost\"").count() >= 21,
        "a point a day in the trend chart"
    );
    assert!(page.contains("data-policy=\"current\""));
    assert!(page.contains("data-policy=\"14 dailies + 8 weeklies\""));
    assert!(page.contains("href=\"/cost\"") && page.contains("href=\"/health\""));
    screenshot(&cost_url, "cost.png");

    let health_url = format!("http://127.0.0.1:{port}/health");
    let page = dom(&health_url);
    std::fs::write(artifacts_dir().join("health.html"), &page).unwrap();
    assert!(
        page.contains("data-endpoint=\"platform\" data-state=\"up\""),
        "{page}"
    );
    assert!(page.contains("data-endpoint=\"self\" data-state=\"up\""));
    assert!(page.matches("<circle class=\"point ").count() >= 9);
    assert!(page.contains("<circle class=\"point down\""));
    assert!(page.contains("<circle class=\"point degraded\""));
    screenshot(&health_url, "health.png");

    assert!(
        serve.terminate().success(),
        "serve stops cleanly:\n{}",
        serve.log()
    );
}
