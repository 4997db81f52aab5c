//! Alerts end to end in one embedded `backstop serve`: a recorded backup failure is raised by
//! the alert monitor, emailed by the notify worker to a real SMTP server (aiosmtpd), listed by
//! `backstop alerts` beside the serve, and resolved (with a recovery email) when a backup of the
//! source completes; a dead letter stays open until an operator resolves it.

mod support;

use std::time::{Duration, Instant};

use backstop_testkit::{Smtp, free_port};
use support::{Process, run, stderr, stdout};
use uuid::Uuid;

fn config(dir: &std::path::Path, smtp_port: u16) -> String {
    let path = dir.join("backstop.toml");
    std::fs::write(
        &path,
        format!(
            r#"[api]
listen = "127.0.0.1:{api}"

[reports]
weekly = false

[notify]
dashboard_url = "http://dashboard.example:8080/"
backoff_ms = 50
timeout_seconds = 5

[[notify.channels]]
name = "oncall"
kind = "email"
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
security = "plain"
from = "Backstop <backstop@example.com>"
to = ["dba@example.com"]
events = ["alerts", "recoveries"]
"#,
            api = free_port()
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn append(dir: &std::path::Path, cfg: &str, stream: &str, event_type: &str, payload: &str) {
    let out = run(
        dir,
        &[
            "--config",
            cfg,
            "ledger",
            "append",
            "--stream",
            stream,
            "--type",
            event_type,
            "--payload",
            payload,
        ],
    );
    assert!(
        out.status.success(),
        "append {event_type}: {}",
        stderr(&out)
    );
}

fn open_alerts(dir: &std::path::Path, cfg: &str) -> Vec<serde_json::Value> {
    let out = run(dir, &["--config", cfg, "alerts", "list", "--json"]);
    assert!(out.status.success(), "alerts list: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("alerts list --json is JSON")
}

/// Waits (on the real servers, not on a rule's clock) until `want` holds.
fn until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_failure_is_raised_emailed_listed_and_resolved_by_the_next_success() {
    let smtp = Smtp::start().expect("aiosmtpd");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), smtp.port());
    let mut serve = Process::spawn(dir.path(), &["--config", &cfg, "serve"], &[]);
    serve.wait_for_log("alert monitor running", Duration::from_secs(60));

    let failed = Uuid::now_v7();
    append(
        dir.path(),
        &cfg,
        &format!("backup-{failed}"),
        "backup.failed",
        &format!(
            r#"{{"backup_id":"{failed}","source":"orders","reason":"pg_dump: connection to 10.0.0.9 refused","attempt":1}}"#
        ),
    );
    let mail = smtp.wait_for(1).expect("the failure email");
    assert!(mail[0].contains("backup_failed"), "{}", mail[0]);
    assert!(mail[0].contains("orders"), "{}", mail[0]);
    assert!(
        mail[0].contains("connection to 10.0.0.9 refused"),
        "{}",
        mail[0]
    );
    assert!(
        mail[0].contains("http://dashboard.example:8080/"),
        "{}",
        mail[0]
    );
    let open = open_alerts(dir.path(), &cfg);
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["key"], "backup_failed/orders");
    assert_eq!(open[0]["severity"], "critical");

    // A later backup of the source completes: resolved, and the recovery note goes out.
    let good = Uuid::now_v7();
    append(
        dir.path(),
        &cfg,
        &format!("backup-{good}"),
        "backup.completed",
        &format!(
            r#"{{"backup_id":"{good}","source":"orders","kind":"full","parent":null,"method":"logical","manifest":"manifests/{good}","manifest_sha3":"00","raw_bytes":1000,"stored_bytes":500,"new_bytes":100,"chunks":1,"new_chunks":1,"duration_ms":1000}}"#
        ),
    );
    let mail = smtp.wait_for(2).expect("the recovery email");
    assert!(
        mail[1].to_lowercase().contains("resolved") || mail[1].to_lowercase().contains("recover"),
        "{}",
        mail[1]
    );
    until("the alert to resolve", || {
        open_alerts(dir.path(), &cfg).is_empty().then_some(())
    });

    // A dead letter stays open until an operator resolves it, and then stays resolved.
    let lost = Uuid::now_v7();
    append(
        dir.path(),
        &cfg,
        "workers",
        "worker.dead_lettered",
        &format!(
            r#"{{"consumer":"verify","event_id":"{lost}","event_type":"backup.completed","position":7,"deliveries":5,"error":"scratch server down"}}"#
        ),
    );
    let key = format!("event_dead_lettered/verify/{lost}");
    until("the dead letter's alert", || {
        open_alerts(dir.path(), &cfg)
            .iter()
            .any(|a| a["key"] == key.as_str())
            .then_some(())
    });
    let nope = run(
        dir.path(),
        &["--config", &cfg, "alerts", "resolve", "no_such/key"],
    );
    assert!(!nope.status.success());
    assert!(
        stderr(&nope).contains("backstop alerts list"),
        "{}",
        stderr(&nope)
    );
    let out = run(
        dir.path(),
        &[
            "--config",
            &cfg,
            "alerts",
            "resolve",
            &key,
            "--reason",
            "verified by hand",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    until("the dead letter to stay resolved", || {
        open_alerts(dir.path(), &cfg).is_empty().then_some(())
    });
    // The monitor does not raise it again (give it a batch to react to, then look).
    append(
        dir.path(),
        &cfg,
        "storage",
        "storage.connectivity_checked",
        r#"{"backend":"x","ok":true,"latency_ms":1}"#,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(open_alerts(dir.path(), &cfg).is_empty());
    assert!(serve.terminate().success(), "{}", serve.log());
}
