//! The dashboard end to end: `backstop serve` with projections in a real PostgreSQL, loaded by
//! headless Chromium (Debian's `chromium`), checked for what a person would see: each source's
//! last backup and its verification, a failed verification, the charts drawn with data, and a
//! backup requested through the API appearing. The screenshot is kept in
//! `target/artifacts/dashboard.png`.

#[path = "dashboard_support.rs"]
mod dashboard_support;
#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use backstop_events::BackupKind;
use backstop_projections::sample::{self, BackupSpec};
use backstop_testkit::{Postgres, free_port};
use chrono::Utc;
use dashboard_support::*;
use support::Process;

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_the_last_backups_their_verification_and_the_charts() {
    let pg = Postgres::start().expect("PostgreSQL");
    pg.create_db("projections").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    // Two weeks of nightly backups of `trading` (verified), and `reference` whose latest
    // verification failed; storage samples growing day by day.
    let now = Utc::now();
    let mut events = Vec::new();
    for day in 0..14i64 {
        let at = now - chrono::Duration::days(13 - day) - chrono::Duration::minutes(30);
        let mut spec = BackupSpec::new("trading", at, 2_000_000_000 + day as u64 * 40_000_000);
        spec.kind = if day % 7 == 0 {
            BackupKind::Full
        } else {
            BackupKind::Incremental
        };
        spec.new_bytes = if day % 7 == 0 {
            spec.stored_bytes
        } else {
            60_000_000
        };
        events.extend(sample::backup(&spec).1);
        events.push(sample::storage_sample(
            at,
            3_000_000_000 + day as u64 * 150_000_000,
            4000 + day as u64 * 90,
        ));
    }
    for day in 0..3i64 {
        let at = now - chrono::Duration::days(2 - day) - chrono::Duration::minutes(10);
        let mut spec = BackupSpec::new("reference", at, 300_000_000);
        spec.verified = Some(day != 2);
        events.extend(sample::backup(&spec).1);
    }
    events.push(sample::alert("verification_failed", "reference", "verification of the latest reference backup failed: row counts differ by more than 1% in public.trades"));
    fill_ledger(&data, events, 50).await;

    let config = write_config(dir.path(), true);
    let port = free_port();
    let url = pg.conninfo("projections");
    let listen = format!("127.0.0.1:{port}");
    let mut serve = Process::spawn(
        &data,
        &[
            "--config",
            config.to_str().unwrap(),
            "serve",
            "--projections-url",
            &url,
            "--listen",
            &listen,
        ],
        &[],
    );
    wait_http(port, "/healthz", None, "serve answers", |s, _| s == 200);
    wait_http(
        port,
        "/api/overview",
        Some(OPERATOR),
        "projections caught up",
        |s, b| s == 200 && b.contains("\"reference\"") && b.contains("\"verified_failed_7d\":1"),
    );

    // Live updates: a client following /api/events/stream sees the next event as it commits.
    let follow = move |auth: String| {
        std::thread::spawn(move || {
            use std::io::{BufRead, BufReader, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            write!(
                s,
                "GET /api/events/stream HTTP/1.1\r\nHost: x\r\n{auth}\r\n"
            )
            .unwrap();
            let mut lines = Vec::new();
            for line in BufReader::new(s).lines() {
                let line = line.unwrap();
                let done = line.contains("backup.requested");
                lines.push(line);
                if done {
                    break;
                }
            }
            lines
        })
    };
    let follower = follow(format!("Authorization: Bearer {OPERATOR}\r\n"));
    // The live stream names who did what: even on a public dashboard it needs a token.
    let anonymous = follow("Connection: close\r\n".to_string());
    std::thread::sleep(Duration::from_millis(500));

    // A backup requested through the API while the page is open, recorded with the operator.
    let (s, body) = http(
        port,
        "POST",
        "/api/backups",
        Some(OPERATOR),
        Some(r#"{"source":"trading","kind":"incremental"}"#),
    )
    .unwrap();
    assert_eq!(s, 202, "{body}");
    let requested: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = requested["backup_id"].as_str().unwrap().to_string();
    let streamed = follower.join().unwrap();
    let anonymous = anonymous.join().unwrap();
    assert!(
        anonymous
            .first()
            .is_some_and(|l| l.starts_with("HTTP/1.1 401")),
        "{anonymous:?}"
    );
    assert!(
        !anonymous.iter().any(|l| l.contains("operator:alice")),
        "{anonymous:?}"
    );
    assert!(
        streamed.iter().any(|l| l.starts_with("event: ledger")),
        "{streamed:?}"
    );
    assert!(
        streamed.iter().any(|l| l.contains("operator:alice")),
        "{streamed:?}"
    );
    wait_http(
        port,
        "/api/backups?source=trading&limit=5",
        Some(OPERATOR),
        "the requested backup is projected",
        |s, b| s == 200 && b.contains(&id),
    );
    // The overview is computed at most once a second: wait for one that includes it.
    wait_http(
        port,
        "/api/overview",
        Some(OPERATOR),
        "the overview shows the requested backup",
        |s, b| s == 200 && b.contains(&id),
    );

    let page = format!("http://127.0.0.1:{port}/");
    // No virtual-time budget: the page is rendered on the server, and the live event stream it
    // opens never finishes, which would hold virtual time (and the dump) until a timeout.
    let dom = chromium(&["--dump-dom"], &page);
    assert!(
        dom.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    std::fs::write(artifacts_dir().join("dashboard.html"), &dom).unwrap();

    // Each source, its last success, and its verification, as a person reads them.
    assert!(
        dom.contains("data-source=\"trading\" data-status=\"ok\""),
        "trading is ok:\n{dom}"
    );
    assert!(
        dom.contains("data-source=\"reference\" data-status=\"failing\""),
        "reference is failing"
    );
    assert!(
        dom.contains("data-verification=\"passed\""),
        "the verified backup shows passed"
    );
    // The next run per source: the scheduled one says when, in its zone; the other says none.
    assert!(
        dom.contains("class=\"small next-run\" data-next-run=")
            && dom.contains("(reference-nightly)")
            && dom.contains("America/New_York"),
        "reference's next scheduled run is shown"
    );
    assert!(
        dom.contains("class=\"small muted next-run\">no schedule"),
        "trading has no schedule"
    );
    assert!(
        dom.contains("data-verification=\"failed\""),
        "the failed verification shows"
    );
    assert!(
        dom.contains("min") && dom.contains(" ago"),
        "ages are shown"
    );
    // This is a public dashboard seen without signing in: statuses and ages, never the error
    // texts (or hosts, operators, locations); a token's holder gets them.
    assert!(
        !dom.contains("row counts differ"),
        "the failure reason and the alert's text are hidden from anonymous viewers"
    );
    let (_, signed_in) = http(port, "GET", "/api/overview", Some(OPERATOR), None).unwrap();
    assert!(
        signed_in.contains("row counts differ"),
        "the failure reason and the alert are shown to an operator"
    );
    // The alerts panel, with the open critical alert in it.
    let panel = dom.find("id=\"alerts-panel\"").expect("the alerts panel");
    assert!(
        dom[panel..].contains("data-kind=\"verification_failed\" data-severity=\"critical\""),
        "the open alert is in the panel"
    );
    // The charts, drawn with data: three bars per completed backup (14 + 3), a point per day
    // of storage samples, and seven verification days with passes and one failure.
    assert_eq!(count(&dom, "<rect class=\"bar raw\""), 17, "size bars");
    assert_eq!(count(&dom, "<rect class=\"bar stored\""), 17);
    assert!(
        count(&dom, "<circle class=\"point\"") >= 13,
        "storage points"
    );
    assert_eq!(count(&dom, "<g class=\"day "), 7);
    assert!(
        dom.contains("<g class=\"day failed\""),
        "a day with a failed verification"
    );
    assert!(dom.contains("id=\"recovery-estimate\""));
    assert!(
        dom.contains("data-seconds="),
        "a recovery estimate from measured restore speed"
    );
    assert!(
        dom.contains(&id),
        "the backup requested through the API is listed"
    );
    assert!(
        dom.contains("new EventSource('/api/events/stream')"),
        "the page follows the live stream"
    );

    let shot = artifacts_dir().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(
        &[
            "--window-size=1280,2000",
            &format!("--screenshot={}", shot.display()),
        ],
        &page,
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

    // The backup detail page and the audit trail in the browser.
    let (_, body) = http(port, "GET", "/api/overview", Some(OPERATOR), None).unwrap();
    let o: serde_json::Value = serde_json::from_str(&body).unwrap();
    let reference = o["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == "reference")
        .unwrap();
    let bid = reference["last_success"]["backup_id"].as_str().unwrap();
    let detail = chromium(
        &["--dump-dom"],
        &format!("http://127.0.0.1:{port}/backups/{bid}"),
    );
    let detail = String::from_utf8_lossy(&detail.stdout);
    assert!(
        detail.contains("id=\"verification-state\">failed<"),
        "{detail}"
    );
    assert!(detail.contains("public.trades"));
    let audit = chromium(
        &["--dump-dom"],
        &format!("http://127.0.0.1:{port}/audit?type=verification.failed"),
    );
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit.contains("/login") || audit.contains("Sign in"),
        "the audit trail needs a token even on a public dashboard"
    );

    assert!(
        serve.terminate().success(),
        "serve stops cleanly:\n{}",
        serve.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_projections_serve_explains_and_still_serves_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(dir.path(), false);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut serve = Process::spawn(
        &data,
        &[
            "--config",
            config.to_str().unwrap(),
            "serve",
            "--listen",
            &listen,
        ],
        &[],
    );
    wait_http(port, "/healthz", None, "serve answers", |s, _| s == 200);
    let (s, body) = http(port, "GET", "/api/overview", Some(OPERATOR), None).unwrap();
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("projections.database_url"), "{body}");
    let (s, body) = http(port, "GET", "/metrics", None, None).unwrap();
    assert_eq!(s, 200);
    assert!(body.contains("backstop_projections_up 0"), "{body}");
    let (s, _) = http(port, "GET", "/api/overview", None, None).unwrap();
    assert_eq!(s, 401, "not public by default");
    assert!(serve.terminate().success(), "{}", serve.log());
    assert!(
        serve.log().contains("projections are off"),
        "{}",
        serve.log()
    );
}

fn metric(port: u16, name: &str) -> Option<u64> {
    let (_, body) = http(port, "GET", "/metrics", None, None).ok()?;
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Every projected table, as sorted JSON lines (what a rebuild must reproduce).
fn dump(pg: &Postgres, db: &str) -> String {
    let tables = pg
        .psql(
            db,
            "SELECT string_agg(tablename, ' ' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public' AND tablename NOT IN ('projector_positions', '_sqlx_migrations')",
        )
        .unwrap();
    let mut out = String::new();
    for t in tables.split_whitespace() {
        out.push_str(&format!("== {t}\n"));
        out.push_str(
            &pg.psql(
                db,
                &format!("SELECT x::text FROM (SELECT to_jsonb(t) AS x FROM {t} t) s ORDER BY 1"),
            )
            .unwrap(),
        );
        out.push('\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_killed_while_projecting_resumes_exactly_and_matches_a_rebuild() {
    let pg = Postgres::start().expect("PostgreSQL");
    pg.create_db("live").unwrap();
    pg.create_db("rebuilt").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut events = Vec::new();
    let now = Utc::now();
    for i in 0..2500i64 {
        let mut spec = BackupSpec::new(
            ["trading", "reference", "risk"][(i % 3) as usize],
            now - chrono::Duration::minutes(3000 - i),
            1_000_000 + i as u64,
        );
        spec.verified = Some(i % 40 != 0);
        events.extend(sample::backup(&spec).1);
        events.push(sample::key_access("database", "backup"));
        events.push(sample::storage_sample(
            now - chrono::Duration::minutes(3000 - i),
            1_000_000 * i as u64,
            10,
        ));
    }
    fill_ledger(&data, events, 1000).await;
    let config = write_config(dir.path(), false);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let live = pg.conninfo("live");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "serve",
        "--no-workers",
        "--projections-url",
        &live,
        "--listen",
        &listen,
    ];

    let mut serve = Process::spawn(&data, &args, &[]);
    wait_http(port, "/healthz", None, "serve answers", |s, _| s == 200);
    let head = metric(port, "backstop_ledger_head_position").unwrap();
    // Kill -9 once the state projector is part-way through.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let p = metric(port, "backstop_projection_position{projector=\"state\"}").unwrap_or(0);
        if p > 0 && p < head {
            serve.kill9();
            eprintln!("killed serve with the state projector at {p} of {head}");
            break;
        }
        assert!(
            p < head,
            "the projector finished before the kill; make the ledger larger"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the projector never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut serve = Process::spawn(&data, &args, &[]);
    wait_http(port, "/healthz", None, "serve answers again", |s, _| {
        s == 200
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while metric(port, "backstop_projection_lag_events{projector=\"state\"}") != Some(0)
        || metric(port, "backstop_projection_lag_events{projector=\"audit\"}") != Some(0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "projectors did not catch up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // serve's own monitors (alerts on the sample's failures and silences, the weekly summary)
    // append events of their own after start: count against the head the projectors reached.
    let head = metric(port, "backstop_ledger_head_position").unwrap();
    assert_eq!(
        metric(port, "backstop_projection_lag_events{projector=\"state\"}"),
        Some(0),
        "nothing appended after the catch-up"
    );
    assert!(serve.terminate().success(), "{}", serve.log());

    // Every event applied exactly once...
    let counted: u64 = pg
        .psql("live", "SELECT sum(events) FROM event_counts")
        .unwrap()
        .parse()
        .unwrap();
    let audited: u64 = pg
        .psql("live", "SELECT count(*) FROM audit_events")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(counted, head, "event counts after the crash");
    assert_eq!(audited, head);
    // ...and the same tables as a rebuild from position 1.
    let out = support::run(
        &data,
        &[
            "--config",
            config.to_str().unwrap(),
            "projections",
            "rebuild",
            "--projections-url",
            &pg.conninfo("rebuilt"),
        ],
    );
    assert!(out.status.success(), "{}", support::stderr(&out));
    assert_eq!(dump(&pg, "live"), dump(&pg, "rebuilt"));
    let status = support::run(
        &data,
        &[
            "--config",
            config.to_str().unwrap(),
            "projections",
            "status",
            "--projections-url",
            &live,
        ],
    );
    assert!(status.status.success(), "{}", support::stderr(&status));
    let text = support::stdout(&status);
    assert!(
        text.contains(&format!("state         {head} (0 behind)")),
        "{text}"
    );
}
