//! The ledger and the bus, end to end: the `backstop` binary against a real nats-server.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_events::{Actor, Envelope, Event, NewEvent, StorageUsageSampled};
use backstop_ledger::remote::RemoteLedger;
use backstop_ledger::{Appender, ExpectedVersion};
use backstop_testkit::{Nats, free_port};
use support::{Process, run, stderr, stdout};

fn sample(stream: &str) -> NewEvent {
    NewEvent::new(
        stream,
        Actor::System,
        &Event::StorageUsageSampled(StorageUsageSampled {
            region: "primary".into(),
            storage_class: "STANDARD".into(),
            bytes: 1,
            objects: 1,
            repository: String::new(),
        }),
    )
}

fn all_events(data_dir: &std::path::Path) -> Vec<Envelope> {
    let out = run(data_dir, &["ledger", "tail", "--json", "--from", "1"]);
    assert!(out.status.success(), "tail failed: {}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("tail --json prints envelopes"))
        .collect()
}

async fn remote(url: &str) -> RemoteLedger {
    let client = async_nats::ConnectOptions::new()
        .max_reconnects(None)
        .connect(url)
        .await
        .expect("connect");
    RemoteLedger::new(client)
}

async fn wait_until_serving(r: &RemoteLedger) {
    for _ in 0..200 {
        if r.append("probe", ExpectedVersion::Any, vec![sample("probe")])
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("backstop serve never answered remote appends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_loses_no_acknowledged_append_and_the_chain_verifies() {
    let nats = Nats::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Process::spawn(dir.path(), &["serve", "--nats", &nats.url()], &[]);
    let r = remote(&nats.url()).await;
    wait_until_serving(&r).await;

    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let r = r.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let stream = format!("burst-{}", i % 8);
            for _ in 0..10_000 {
                let e = sample(&stream);
                let id = e.id;
                match r.append(&stream, ExpectedVersion::Any, vec![e]).await {
                    Ok(_) => acked.lock().unwrap().push(id),
                    Err(_) => return,
                }
            }
        }));
    }
    // Let the burst run, then kill the serving process without warning.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    serve.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    let acked: Vec<uuid::Uuid> = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "the burst barely ran: {}", acked.len());

    let verify = run(dir.path(), &["ledger", "verify"]);
    assert!(
        verify.status.success(),
        "chain damaged after kill -9: {}{}",
        stdout(&verify),
        stderr(&verify)
    );
    let stored: HashSet<uuid::Uuid> = all_events(dir.path()).iter().map(|e| e.id).collect();
    let lost: Vec<_> = acked.iter().filter(|id| !stored.contains(id)).collect();
    assert!(lost.is_empty(), "{} acknowledged appends lost", lost.len());

    // It starts again on the same ledger and stops cleanly on SIGTERM.
    let mut again = Process::spawn(dir.path(), &["serve", "--nats", &nats.url()], &[]);
    wait_until_serving(&r).await;
    let status = again.terminate();
    assert!(
        status.success(),
        "serve exited with {status}: {}",
        again.log()
    );
    again.wait_for_log("stopped cleanly", Duration::from_secs(5));
}

#[test]
fn one_changed_byte_or_one_removed_event_fails_verify_and_names_the_position() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..6 {
        let payload = format!(
            r#"{{"region":"region-{i}","storage_class":"STANDARD","bytes":{i},"objects":1}}"#
        );
        let out = run(
            dir.path(),
            &[
                "ledger",
                "append",
                "--stream",
                "storage",
                "--type",
                "storage.usage_sampled",
                "--payload",
                &payload,
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let ok = run(dir.path(), &["ledger", "verify"]);
    assert!(ok.status.success(), "{}", stdout(&ok));
    assert!(
        stdout(&ok).contains("ledger intact: 6 events"),
        "{}",
        stdout(&ok)
    );

    let ledger_dir = dir.path().join("ledger");
    let original = {
        let db = sled::open(&ledger_dir).unwrap();
        let events = db.open_tree("events").unwrap();
        let key = 3u64.to_be_bytes();
        let original = events.get(key).unwrap().unwrap().to_vec();
        let text = String::from_utf8(original.clone()).unwrap();
        let changed = text.replace("region-2", "region-7");
        assert_ne!(text, changed);
        assert_eq!(text.len(), changed.len(), "exactly one byte differs");
        events.insert(key, changed.as_bytes()).unwrap();
        db.flush().unwrap();
        original
    };
    released(&ledger_dir);
    let bad = run(dir.path(), &["ledger", "verify"]);
    assert!(!bad.status.success(), "verify passed a changed event");
    let report = format!("{}{}", stdout(&bad), stderr(&bad));
    assert!(report.contains("first bad position 3"), "{report}");
    assert!(report.contains("content changed"), "{report}");

    {
        let db = sled::open(&ledger_dir).unwrap();
        let events = db.open_tree("events").unwrap();
        events.insert(3u64.to_be_bytes(), original).unwrap();
        events.remove(4u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    released(&ledger_dir);
    let bad = run(dir.path(), &["ledger", "verify"]);
    assert!(!bad.status.success(), "verify passed a removed event");
    let report = format!("{}{}", stdout(&bad), stderr(&bad));
    assert!(report.contains("first bad position 4"), "{report}");
    assert!(report.contains("event 4 is missing"), "{report}");
}

/// Waits until this process's sled threads have let go of the ledger's file lock: they can
/// hold it moments after the last handle dropped, and the `backstop` run next would then find
/// the ledger in use instead of checking it.
fn released(ledger_dir: &std::path::Path) {
    let db = ledger_dir.join("db");
    for _ in 0..500 {
        if std::fs::File::open(&db).unwrap().try_lock().is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("sled still holds {} after 5 s", db.display());
}

#[test]
fn bad_input_gets_a_clear_error_and_harms_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Unreachable NATS.
    let port = free_port();
    let out = run(
        dir.path(),
        &["serve", "--nats", &format!("nats://127.0.0.1:{port}")],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot reach NATS"),
        "{}",
        stderr(&out)
    );

    // A malformed configuration file.
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[nats\nurl = 1").unwrap();
    let out = run(
        dir.path(),
        &["--config", config.to_str().unwrap(), "ledger", "stats"],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is malformed"), "{}", stderr(&out));

    // A data directory whose ledger folder holds something else.
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(other.path().join("ledger")).unwrap();
    std::fs::write(other.path().join("ledger/payroll.csv"), "precious").unwrap();
    let out = run(
        other.path(),
        &[
            "ledger",
            "append",
            "--stream",
            "s",
            "--type",
            "storage.usage_sampled",
            "--payload",
            r#"{"region":"r","storage_class":"S","bytes":1,"objects":1}"#,
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not a Backstop ledger"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(other.path().join("ledger/payroll.csv")).unwrap(),
        "precious"
    );

    // An unknown event type and an oversized payload, on a real ledger: refused, ledger intact.
    let ok = run(
        dir.path(),
        &[
            "ledger",
            "append",
            "--stream",
            "s",
            "--type",
            "storage.usage_sampled",
            "--payload",
            r#"{"region":"r","storage_class":"S","bytes":1,"objects":1}"#,
        ],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    let out = run(
        dir.path(),
        &[
            "ledger",
            "append",
            "--stream",
            "s",
            "--type",
            "backup.teleported",
            "--payload",
            "{}",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown event type"),
        "{}",
        stderr(&out)
    );
    let big = format!(
        r#"{{"region":"{}","storage_class":"S","bytes":1,"objects":1}}"#,
        "x".repeat(300_000)
    );
    let big_file = dir.path().join("big.json");
    std::fs::write(&big_file, big).unwrap();
    let at = format!("@{}", big_file.display());
    let out = run(
        dir.path(),
        &[
            "ledger",
            "append",
            "--stream",
            "s",
            "--type",
            "storage.usage_sampled",
            "--payload",
            &at,
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("limit"), "{}", stderr(&out));
    let verify = run(dir.path(), &["ledger", "verify"]);
    assert!(verify.status.success());
    assert!(stdout(&verify).contains("1 events"), "{}", stdout(&verify));
}

/// A pinned public key: `ledger verify` checks the checkpoints against it, so a ledger signed
/// by another key fails, and `serve` refuses to start with a signing key that is not the pinned
/// one.
#[test]
fn a_pinned_public_key_catches_a_replaced_signing_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        &[
            "ledger",
            "append",
            "--stream",
            "storage",
            "--type",
            "storage.usage_sampled",
            "--payload",
            r#"{"region":"r","storage_class":"STANDARD","bytes":1,"objects":1}"#,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let own = stdout(&run(dir.path(), &["ledger", "pubkey"]))
        .trim()
        .to_string();
    assert_eq!(own.len(), 64, "{own}");
    let ok = run(dir.path(), &["ledger", "verify", "--pubkey", &own]);
    assert!(ok.status.success(), "{}{}", stdout(&ok), stderr(&ok));
    let unpinned = run(dir.path(), &["ledger", "verify"]);
    assert!(
        stderr(&unpinned).contains("pin it"),
        "{}",
        stderr(&unpinned)
    );

    // Another key pinned: the checkpoints do not verify under it.
    let other = "11".repeat(32);
    let bad = run(dir.path(), &["ledger", "verify", "--pubkey", &other]);
    assert!(!bad.status.success(), "{}", stdout(&bad));

    // serve with another key pinned in the configuration refuses to start, and says why.
    let config = dir.path().join("backstop.toml");
    std::fs::write(
        &config,
        format!("[ledger]\npublic_key = \"{other}\"\n[api]\nlisten = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    let serve = run(dir.path(), &["--config", config.to_str().unwrap(), "serve"]);
    assert!(!serve.status.success());
    assert!(
        stderr(&serve).contains("is not the pinned [ledger] public_key"),
        "{}",
        stderr(&serve)
    );
    // A malformed pin is a configuration error at once.
    std::fs::write(&config, "[ledger]\npublic_key = \"xyz\"\n").unwrap();
    let bad_pin = run(
        dir.path(),
        &["--config", config.to_str().unwrap(), "ledger", "verify"],
    );
    assert!(!bad_pin.status.success());
    assert!(
        stderr(&bad_pin).contains("64 hex digits"),
        "{}",
        stderr(&bad_pin)
    );
}

/// The signing key lives beside the configuration file, outside the data directory; an
/// installation whose key is still in the data directory keeps it (same public key), and every
/// command says the `mv` that moves it; after the move the same key is found at its new place.
#[test]
fn the_signing_key_is_kept_outside_the_data_directory_and_an_old_one_is_moved_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let config = etc.join("backstop.toml");
    std::fs::write(&config, "").unwrap();
    let cfg = config.to_str().unwrap();

    let append = |data_dir: &std::path::Path, config: Option<&str>| {
        let mut args = Vec::new();
        if let Some(c) = config {
            args.extend(["--config", c]);
        }
        args.extend([
            "ledger",
            "append",
            "--stream",
            "storage",
            "--type",
            "storage.usage_sampled",
            "--payload",
            r#"{"region":"r","storage_class":"STANDARD","bytes":1,"objects":1}"#,
        ]);
        let out = run(data_dir, &args);
        assert!(out.status.success(), "{}", stderr(&out));
    };

    // A new installation.
    let fresh = dir.path().join("fresh");
    append(&fresh, Some(cfg));
    let out = run(&fresh, &["--config", cfg, "ledger", "pubkey"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(etc.join("ledger-signing.key").exists());
    assert!(!fresh.join("keys").join("ledger-signing.key").exists());
    std::fs::remove_file(etc.join("ledger-signing.key")).unwrap();

    // An older one, made without a configuration file: its key is in the data directory.
    let old = dir.path().join("old");
    append(&old, None);
    let own = stdout(&run(&old, &["ledger", "pubkey"])).trim().to_string();
    let legacy = old.join("keys").join("ledger-signing.key");
    assert!(legacy.exists());
    let out = run(&old, &["--config", cfg, "ledger", "pubkey"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), own, "the old key is still used");
    let moved = etc.join("ledger-signing.key");
    let mv = format!(
        "mv {} {}",
        legacy.display(),
        std::fs::canonicalize(&etc)
            .unwrap()
            .join("ledger-signing.key")
            .display()
    );
    assert!(stderr(&out).contains(&mv), "{}", stderr(&out));
    assert!(
        !moved.exists(),
        "nothing is moved behind the operator's back"
    );

    // Moved as told: the same key, no warning.
    std::fs::rename(&legacy, &moved).unwrap();
    let out = run(&old, &["--config", cfg, "ledger", "pubkey"]);
    assert_eq!(stdout(&out).trim(), own);
    assert!(!stderr(&out).contains("mv "), "{}", stderr(&out));
    let verified = run(
        &old,
        &["--config", cfg, "ledger", "verify", "--pubkey", &own],
    );
    assert!(
        verified.status.success(),
        "{}{}",
        stdout(&verified),
        stderr(&verified)
    );
}
