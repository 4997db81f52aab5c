//! The audit export end to end, as an auditor uses it: `backstop audit export` on a stopped
//! ledger and `GET /api/audit/export` on a running one; `backstop audit verify` with nothing but
//! the file (and the public key given separately) passes on an intact file and fails, naming the
//! line, when one byte is changed or a line removed.

#[path = "dashboard_support.rs"]
mod dashboard_support;
#[path = "../support/mod.rs"]
mod support;

use backstop_projections::sample::{self, BackupSpec};
use backstop_testkit::free_port;
use chrono::Utc;
use dashboard_support::*;
use support::{Process, run, stderr, stdout};

async fn ledger(dir: &std::path::Path) {
    let mut events = Vec::new();
    for i in 0..20i64 {
        let spec = BackupSpec::new(
            "trading",
            Utc::now() - chrono::Duration::hours(20 - i),
            1_000_000,
        );
        events.extend(sample::backup(&spec).1);
        events.push(sample::key_access("database", &format!("backup {i}")));
    }
    fill_ledger(dir, events, 25).await;
}

fn pubkey(data: &std::path::Path) -> String {
    let out = run(data, &["ledger", "pubkey"]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_verify_and_tampering_named_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ledger(&data).await;
    let key = pubkey(&data);

    for format in ["jsonl", "csv"] {
        let file = dir.path().join(format!("audit.{format}"));
        let out = run(
            &data,
            &[
                "audit",
                "export",
                "--from-position",
                "10",
                "--to-position",
                "60",
                "--out",
                file.to_str().unwrap(),
                "--format",
                format,
            ],
        );
        assert!(out.status.success(), "export: {}", stderr(&out));
        assert!(
            stderr(&out).contains("signed checkpoint"),
            "{}",
            stderr(&out)
        );

        let ok = run(
            &data,
            &["audit", "verify", file.to_str().unwrap(), "--pubkey", &key],
        );
        assert!(
            ok.status.success(),
            "verify: {}{}",
            stdout(&ok),
            stderr(&ok)
        );
        assert!(stdout(&ok).contains("intact"), "{}", stdout(&ok));
        let without_key = run(&data, &["audit", "verify", file.to_str().unwrap()]);
        assert!(without_key.status.success());
        assert!(
            stdout(&without_key).contains("warning"),
            "{}",
            stdout(&without_key)
        );

        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // One byte changed: a digit in an event's payload, on the 8th event line.
        let target = if format == "jsonl" { 8 } else { 9 };
        let line = lines[target];
        let pos = line
            .find("\"raw_bytes\":1000000")
            .or_else(|| line.find("backup "))
            .map(|p| p + 1)
            .unwrap_or(line.len() / 2);
        let mut bytes = text.clone().into_bytes();
        let offset: usize = lines[..target].iter().map(|l| l.len() + 1).sum::<usize>() + pos + 1;
        bytes[offset] = if bytes[offset] == b'a' { b'b' } else { b'a' };
        let bad = dir.path().join(format!("changed.{format}"));
        std::fs::write(&bad, &bytes).unwrap();
        let out = run(
            &data,
            &["audit", "verify", bad.to_str().unwrap(), "--pubkey", &key],
        );
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        assert!(
            stdout(&out).contains(&format!("line {}:", target + 1)),
            "{}",
            stdout(&out)
        );

        // A line removed.
        let mut removed: Vec<&str> = lines.clone();
        removed.remove(target);
        let bad = dir.path().join(format!("removed.{format}"));
        std::fs::write(&bad, removed.join("\n") + "\n").unwrap();
        let out = run(
            &data,
            &["audit", "verify", bad.to_str().unwrap(), "--pubkey", &key],
        );
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stdout(&out).contains(&format!("line {}:", target + 1)),
            "{}",
            stdout(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_serve_runs_auditors_export_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ledger(&data).await;
    let key = pubkey(&data);
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

    // The ledger is locked: the CLI says where to go instead.
    let out = run(
        &data,
        &[
            "audit",
            "export",
            "--out",
            dir.path().join("x.jsonl").to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/api/audit/export"),
        "{}",
        stderr(&out)
    );

    let (s, _) = http(port, "GET", "/api/audit/export", Some(OPERATOR), None).unwrap();
    assert_eq!(s, 403, "operators do not export");
    let from = (Utc::now() - chrono::Duration::days(2))
        .format("%Y-%m-%d")
        .to_string();
    let (s, body) = http(
        port,
        "GET",
        &format!("/api/audit/export?from={from}&format=csv"),
        Some(AUDITOR),
        None,
    )
    .unwrap();
    assert_eq!(s, 200, "{body}");
    let file = dir.path().join("served.csv");
    std::fs::write(&file, &body).unwrap();
    assert!(serve.terminate().success(), "{}", serve.log());

    let out = run(
        &data,
        &["audit", "verify", file.to_str().unwrap(), "--pubkey", &key],
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    // The refused export is in the ledger, with the caller.
    let tail = run(&data, &["ledger", "tail", "--json", "--from", "1"]);
    let denied: Vec<String> = stdout(&tail)
        .lines()
        .filter(|l| l.contains("access.denied"))
        .map(str::to_string)
        .collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert!(
        denied[0].contains("operator:alice") && denied[0].contains("/api/audit/export"),
        "{}",
        denied[0]
    );
}
