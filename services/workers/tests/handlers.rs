//! Every worker's handler, table-driven, with no server: the repository lives in memory
//! (`MemoryBackend`), the ledger is the testkit's `RecordingAppender`, and the few cases that
//! need a database point at a closed loopback port, which is how an unreachable server looks.
//! Each case feeds one event to a handler and checks the decision (done, retry, permanent) and
//! exactly which events it recorded; the redelivery cases feed the same event twice.

use std::sync::Arc;

use backstop_events::{
    Actor, BackupCompleted, BackupFailed, BackupKind, BackupMethod, BackupRequested, Digest,
    Envelope, Event, NewEvent, RecoveryRequested, RecoveryScope, Trigger, streams, uuid_v7,
};
use backstop_ledger::Appender;
use backstop_ledger::consumer::{Handler, HandlerError};
use backstop_ops::verify::VerifySettings;
use backstop_ops::{DataPath, SourceSpec};
use backstop_repo::{BackupMeta, KeyAccessLog, KeyPurpose, MasterKey, RepoParams, Repository};
use backstop_testkit::{MemoryBackend, RecordingAppender};
use backstop_workers::backup::BackupWorker;
use backstop_workers::restore::RestoreWorker;
use backstop_workers::verify::VerifyWorker;
use uuid::Uuid;

/// A PostgreSQL URL nothing listens on.
const UNREACHABLE: &str = "postgres://backstop@127.0.0.1:1/trading";

struct World {
    backend: Arc<MemoryBackend>,
    ledger: Arc<RecordingAppender>,
    dp: DataPath,
}

async fn world() -> World {
    let backend = Arc::new(MemoryBackend::new());
    let master = MasterKey::from_bytes([7; 64]);
    let repo = Repository::init(
        backend.clone(),
        &master,
        RepoParams::default(),
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .expect("a repository in memory");
    let ledger = Arc::new(RecordingAppender::new());
    let dp = DataPath {
        repo,
        appender: ledger.clone(),
        sources: vec![SourceSpec::postgres("main", UNREACHABLE, 1)],
    };
    World {
        backend,
        ledger,
        dp,
    }
}

/// Seals `event` as the ledger would deliver it (position 1 of its own stream).
fn delivered(stream: &str, event: Event) -> Envelope {
    let e = NewEvent::new(stream, Actor::operator("alice"), &event);
    Envelope::seal(e, 1, 1, backstop_events::now_micros(), Digest::ZERO)
}

fn request(source: &str, method: BackupMethod, trigger: Trigger) -> (Uuid, Envelope) {
    let backup_id = uuid_v7();
    let env = delivered(
        &streams::backup(backup_id),
        Event::BackupRequested(BackupRequested {
            backup_id,
            source: source.into(),
            kind: BackupKind::Full,
            method,
            trigger,
            attempt: 1,
        }),
    );
    (backup_id, env)
}

/// Writes a small backup straight through the repository's writer (no database needed).
async fn stored_backup(dp: &DataPath, extra: serde_json::Value) -> backstop_repo::BackupResult {
    let backup_id = uuid_v7();
    let writer = dp
        .repo
        .start_backup_with(
            BackupMeta {
                backup_id,
                kind: BackupKind::Full,
                parent: None,
                source: "main".into(),
                purpose: KeyPurpose::Database,
                actor: "worker:test".into(),
            },
            Default::default(),
        )
        .await
        .expect("a writer");
    writer
        .add_stream("data/public.t", &b"1\tone\n2\ttwo\n"[..])
        .await
        .expect("a stream");
    writer.finish(extra).await.expect("a manifest")
}

/// A logical backup's manifest `extra`: a dump report of an empty database.
fn logical_extra() -> serde_json::Value {
    serde_json::json!({ "logical": {
            "format": 1, "database": "trading", "server_version": "15.18",
            "server_version_num": 150018, "pg_dump_version": "15.18",
            "encoding": "UTF8", "snapshot": "00000003-0000001B-1",
            "started_at": "2026-01-01T00:00:00Z",
            "finished_at": "2026-01-01T00:00:01Z", "duration_ms": 1000,
            "filtered": false, "tables": [], "sequences": [],
            "large_objects": 0, "parts": [], "raw_bytes": 0, "total_rows": 0,
        } })
}

/// The events a handler recorded about its work: lease renewals are a running job's heartbeat,
/// appended on a timer, so how many there are depends on timing, not on the decision.
fn work(ledger: &RecordingAppender) -> Vec<String> {
    ledger
        .types()
        .into_iter()
        .filter(|t| t != "lease.renewed")
        .collect()
}

#[derive(Debug, PartialEq)]
enum Decision {
    Done,
    Retry,
    Permanent,
}

fn decision(r: &Result<(), HandlerError>) -> Decision {
    match r {
        Ok(()) => Decision::Done,
        Err(e) if e.retryable => Decision::Retry,
        Err(_) => Decision::Permanent,
    }
}

#[tokio::test]
async fn backup_worker_decides_by_failure_class() {
    struct Case {
        name: &'static str,
        source: &'static str,
        method: BackupMethod,
        trigger: Trigger,
        decision: Decision,
        recorded: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "a foreground backup is the operator's command's own",
            source: "main",
            method: BackupMethod::Logical,
            trigger: Trigger::Foreground { host: "h".into() },
            decision: Decision::Done,
            recorded: &[],
        },
        Case {
            name: "an unknown source is recorded as failed at once",
            source: "ghost",
            method: BackupMethod::Logical,
            trigger: Trigger::Manual,
            decision: Decision::Done,
            recorded: &["backup.failed"],
        },
        Case {
            name: "an unreachable database is transient: retried, not recorded as failed",
            source: "main",
            method: BackupMethod::Logical,
            trigger: Trigger::Manual,
            decision: Decision::Retry,
            recorded: &["backup.started"],
        },
        Case {
            name: "a physical backup is taken by the worker too (and the same policy holds)",
            source: "main",
            method: BackupMethod::Physical,
            trigger: Trigger::Manual,
            decision: Decision::Retry,
            recorded: &["backup.started"],
        },
    ];
    for case in cases {
        let w = world().await;
        let worker = BackupWorker {
            data_path: w.dp.clone(),
            schedules: Vec::new(),
            limits: Default::default(),
        };
        let (_, event) = request(case.source, case.method, case.trigger.clone());
        let got = worker.handle(&event, w.ledger.as_ref()).await;
        assert_eq!(decision(&got), case.decision, "{}: {got:?}", case.name);
        // Lease renewals run beside every started backup (backstop_ops::lease); not the point here.
        let types: Vec<String> = w
            .ledger
            .types()
            .into_iter()
            .filter(|t| t != "lease.renewed")
            .collect();
        assert_eq!(types, case.recorded, "{}", case.name);
        if let Some(Event::BackupStarted(s)) = w.ledger.of_type("backup.started").first() {
            assert_eq!(s.method, case.method, "{}", case.name);
        }
    }
}

#[tokio::test]
async fn backup_worker_gives_up_with_one_recorded_failure() {
    let w = world().await;
    let worker = BackupWorker {
        data_path: w.dp.clone(),
        schedules: Vec::new(),
        limits: Default::default(),
    };
    let (backup_id, event) = request("main", BackupMethod::Logical, Trigger::Manual);
    let error = worker
        .handle(&event, w.ledger.as_ref())
        .await
        .expect_err("the database is unreachable");
    assert!(error.retryable);
    assert!(
        error.message.contains("127.0.0.1"),
        "the chain names the server: {}",
        error.message
    );
    // Twice, as a consumer that crashed after the first call would: one event.
    for _ in 0..2 {
        worker
            .give_up(&event, &error, w.ledger.as_ref())
            .await
            .expect("recorded");
    }
    let failed = w.ledger.of_type("backup.failed");
    assert_eq!(failed.len(), 1);
    let Event::BackupFailed(BackupFailed {
        backup_id: id,
        reason,
        ..
    }) = &failed[0]
    else {
        panic!("not a failure")
    };
    assert_eq!(*id, backup_id);
    assert!(reason.contains("abandoned"), "{reason}");
}

#[tokio::test]
async fn backup_worker_completes_a_redelivered_request_from_its_manifest() {
    let w = world().await;
    let stored = stored_backup(&w.dp, serde_json::json!({})).await;
    let worker = BackupWorker {
        data_path: w.dp.clone(),
        schedules: Vec::new(),
        limits: Default::default(),
    };
    let event = delivered(
        &streams::backup(stored.backup_id),
        Event::BackupRequested(BackupRequested {
            backup_id: stored.backup_id,
            source: "main".into(),
            kind: BackupKind::Full,
            method: BackupMethod::Logical,
            trigger: Trigger::Manual,
            attempt: 1,
        }),
    );
    for _ in 0..2 {
        let got = worker.handle(&event, w.ledger.as_ref()).await;
        assert_eq!(decision(&got), Decision::Done, "{got:?}");
    }
    let completed = w.ledger.of_type("backup.completed");
    assert_eq!(completed.len(), 1, "a redelivery records nothing twice");
    let Event::BackupCompleted(c) = &completed[0] else {
        panic!("not a completion")
    };
    assert_eq!(c.manifest_sha3, stored.manifest_sha3.to_hex());
    // The storage briefly down: retried, nothing recorded.
    let (_, other) = request("main", BackupMethod::Logical, Trigger::Manual);
    w.backend.fail_next(1);
    let got = worker.handle(&other, w.ledger.as_ref()).await;
    assert_eq!(decision(&got), Decision::Retry, "{got:?}");
    assert_eq!(work(&w.ledger), ["backup.completed"]);
}

fn completed_event(stored: &backstop_repo::BackupResult, method: BackupMethod) -> BackupCompleted {
    BackupCompleted {
        backup_id: stored.backup_id,
        source: "main".into(),
        kind: BackupKind::Full,
        parent: None,
        method,
        manifest: stored.manifest_key.clone(),
        manifest_sha3: stored.manifest_sha3.to_hex(),
        raw_bytes: stored.raw_bytes,
        stored_bytes: stored.stored_bytes,
        new_bytes: stored.new_bytes,
        chunks: stored.chunks,
        new_chunks: stored.new_chunks,
        duration_ms: 1,
        attempt: 1,
        tables: Vec::new(),
    }
}

#[tokio::test]
async fn verify_worker_tells_damage_from_an_unusable_environment() {
    struct Case {
        name: &'static str,
        method: BackupMethod,
        /// Replace the recorded manifest checksum (a damaged manifest).
        wrong_sha3: bool,
        decision: Decision,
        recorded: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "the scratch server unreachable says nothing about the backup: retried",
            method: BackupMethod::Logical,
            wrong_sha3: false,
            decision: Decision::Retry,
            recorded: &["verification.started"],
        },
        Case {
            name: "a manifest whose checksum differs is damage: failed, and a retry backup",
            method: BackupMethod::Logical,
            wrong_sha3: true,
            decision: Decision::Done,
            recorded: &[
                "verification.started",
                "verification.failed",
                "backup.requested",
            ],
        },
        Case {
            name: "a physical backup's retry is physical too",
            method: BackupMethod::Physical,
            wrong_sha3: true,
            decision: Decision::Done,
            recorded: &[
                "verification.started",
                "verification.failed",
                "backup.requested",
            ],
        },
    ];
    for case in cases {
        let w = world().await;
        let extra = match case.method {
            BackupMethod::Logical => logical_extra(),
            BackupMethod::Physical => serde_json::json!({ "physical": {} }),
            other => unreachable!("no case of {other} here"),
        };
        let stored = stored_backup(&w.dp, extra).await;
        let mut done = completed_event(&stored, case.method);
        if case.wrong_sha3 {
            done.manifest_sha3 = "00".repeat(32);
        }
        let event = delivered(
            &streams::backup(stored.backup_id),
            Event::BackupCompleted(done),
        );
        let worker = VerifyWorker {
            data_path: w.dp.clone(),
            settings: VerifySettings {
                scratch: Some("postgres://verify@127.0.0.1:1/postgres".into()),
                tolerance_percent: 1.0,
                max_retries: 2,
                jobs: 1,
                physical: Some(backstop_ops::verify::PhysicalVerifySettings {
                    restore_command: Arc::new(|_| Ok("false".into())),
                    work_dir: None,
                    verify: Default::default(),
                }),
                allow_superuser: false,
            },
        };
        for delivery in 0..2 {
            let got = worker.handle(&event, w.ledger.as_ref()).await;
            assert_eq!(decision(&got), case.decision, "{}: {got:?}", case.name);
            assert_eq!(
                w.ledger.types(),
                case.recorded,
                "{} (delivery {delivery})",
                case.name
            );
        }
        for e in w.ledger.of_type("backup.requested") {
            let Event::BackupRequested(r) = e else {
                unreachable!()
            };
            assert_eq!(r.method, case.method, "{}", case.name);
            assert_eq!(r.attempt, 2, "{}", case.name);
            assert!(matches!(r.trigger, Trigger::Retry { of, .. } if of == stored.backup_id));
        }
    }
}

#[tokio::test]
async fn verify_worker_without_physical_settings_leaves_physical_backups_alone() {
    let w = world().await;
    let stored = stored_backup(&w.dp, serde_json::json!({ "physical": {} })).await;
    let event = delivered(
        &streams::backup(stored.backup_id),
        Event::BackupCompleted(completed_event(&stored, BackupMethod::Physical)),
    );
    let worker = VerifyWorker {
        data_path: w.dp.clone(),
        settings: VerifySettings {
            scratch: Some(UNREACHABLE.into()),
            tolerance_percent: 1.0,
            max_retries: 2,
            jobs: 1,
            physical: None,
            allow_superuser: false,
        },
    };
    let got = worker.handle(&event, w.ledger.as_ref()).await;
    assert_eq!(decision(&got), Decision::Done, "{got:?}");
    assert!(w.ledger.types().is_empty());
}

#[tokio::test]
async fn restore_worker_claims_once_and_refuses_what_it_cannot_run() {
    struct Case {
        name: &'static str,
        /// A physical backup in the repository (else a logical one); `None`: no backup at all.
        physical: Option<bool>,
        target: &'static str,
        /// Someone else started it first.
        claimed: bool,
        recorded: &'static [&'static str],
        reason: Option<&'static str>,
    }
    let cases = [
        Case {
            name: "claimed by someone else: left alone",
            physical: Some(false),
            target: "postgres://restore@127.0.0.1:1/copy",
            claimed: true,
            recorded: &["recovery.started"],
            reason: None,
        },
        Case {
            name: "a backup that is not there: failed, with the reason",
            physical: None,
            target: "postgres://restore@127.0.0.1:1/copy",
            claimed: false,
            recorded: &["recovery.started", "recovery.failed"],
            reason: Some("not in the repository"),
        },
        Case {
            name: "a physical backup runs on the target machine: refused with the instruction",
            physical: Some(true),
            target: "postgres://restore@127.0.0.1:1/copy",
            claimed: false,
            recorded: &["recovery.started", "recovery.failed"],
            reason: Some("--physical --to-dir"),
        },
        Case {
            name: "a forged request naming another server: refused and recorded, nothing restored",
            physical: Some(false),
            target: "postgres://restore@10.9.9.9:5432/prod",
            claimed: false,
            recorded: &["recovery.started", "recovery.failed"],
            reason: Some("not in [restore] allowed_targets"),
        },
        Case {
            name: "a target carrying a password: refused",
            physical: Some(false),
            target: "postgres://restore:hunter2@127.0.0.1:1/copy",
            claimed: false,
            recorded: &["recovery.started", "recovery.failed"],
            reason: Some("carries a password"),
        },
        Case {
            name: "a logical backup without its schema part: failed with the reason, once",
            physical: Some(false),
            target: "postgres://restore@127.0.0.1:1/copy",
            claimed: false,
            recorded: &["recovery.started", "recovery.failed"],
            reason: Some("no stream \"schema\""),
        },
    ];
    for case in cases {
        let w = world().await;
        let backup_id = match case.physical {
            None => uuid_v7(),
            Some(physical) => {
                let extra = if physical {
                    serde_json::json!({ "physical": {} })
                } else {
                    logical_extra()
                };
                stored_backup(&w.dp, extra).await.backup_id
            }
        };
        let recovery_id = uuid_v7();
        let stream = streams::recovery(recovery_id);
        let event = delivered(
            &stream,
            Event::RecoveryRequested(RecoveryRequested {
                recovery_id,
                backup_id,
                operator: "lead".into(),
                scope: RecoveryScope {
                    target: case.target.into(),
                    ..Default::default()
                },
            }),
        );
        // The request itself is at version 1 of its stream in the real ledger.
        w.ledger
            .append(
                &stream,
                backstop_ledger::ExpectedVersion::NoStream,
                vec![NewEvent::new(
                    &stream,
                    Actor::operator("lead"),
                    &event.event().expect("decodes"),
                )],
            )
            .await
            .expect("requested");
        if case.claimed {
            let other = NewEvent::new(
                &stream,
                Actor::operator("someone"),
                &Event::RecoveryStarted(backstop_events::RecoveryStarted {
                    recovery_id,
                    backup_id,
                    operator: "someone".into(),
                    scope: Default::default(),
                }),
            );
            w.ledger
                .append(
                    &stream,
                    backstop_ledger::ExpectedVersion::Exact(1),
                    vec![other],
                )
                .await
                .expect("claimed");
        }
        let worker = RestoreWorker {
            data_path: w.dp.clone(),
            allowed_targets: backstop_ops::restore::RestoreTargets::parse(&[
                "postgres://127.0.0.1:1/*".to_string(),
            ])
            .unwrap(),
        };
        for _ in 0..2 {
            let got = worker.handle(&event, w.ledger.as_ref()).await;
            assert_eq!(decision(&got), Decision::Done, "{}: {got:?}", case.name);
        }
        let mut types = w.ledger.types();
        assert_eq!(types.remove(0), "recovery.requested");
        assert_eq!(types, case.recorded, "{}", case.name);
        if let Some(want) = case.reason {
            let failed = w.ledger.of_type("recovery.failed");
            let Some(Event::RecoveryFailed(f)) = failed.first() else {
                panic!("{}: no failure", case.name)
            };
            assert!(f.reason.contains(want), "{}: {}", case.name, f.reason);
        }
    }
}

#[test]
fn restore_targets_match_server_and_database_and_say_how_to_allow_one() {
    use backstop_ops::restore::RestoreTargets;
    let t = RestoreTargets::parse(&[
        "postgres://db-recovery:5433/*".to_string(),
        "postgres://restore@10.0.0.5/copy".to_string(),
    ])
    .unwrap();
    assert!(t.check("postgres://lead@db-recovery:5433/anything").is_ok());
    assert!(t.check("postgres://10.0.0.5:5432/copy").is_ok());
    assert!(t.check("postgres://10.0.0.5:5432/other").is_err());
    assert!(
        t.check("postgres://db-recovery:5432/anything").is_err(),
        "another port"
    );
    let none = RestoreTargets::default()
        .check("postgres://db:5432/x")
        .unwrap_err();
    assert!(
        none.contains("allowed_targets") && none.contains("postgres://db:5432/x"),
        "{none}"
    );
    let e = RestoreTargets::parse(&["postgres://u:pw@db/x".to_string()]).unwrap_err();
    assert!(e.contains("carries a password"), "{e}");
    assert!(RestoreTargets::parse(&["not a url".to_string()]).is_err());
}

/// A backup request delivered again after its backup completed and was recorded (the worker
/// died before its ack): the worker finds the manifest and ends without taking it again or
/// failing, on a real ledger (which compares a re-offered event's content) and PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_worker_redelivered_after_completion_takes_nothing_and_fails_nothing() {
    let pg = backstop_testkit::Postgres::start().unwrap();
    pg.create_db("app").unwrap();
    pg.psql(
        "app",
        "CREATE TABLE t AS SELECT generate_series(1, 20) AS id",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger =
        backstop_ledger::Ledger::open(&backstop_ledger::LedgerConfig::in_data_dir(dir.path()))
            .unwrap();
    let mut w = world().await;
    w.dp.appender = Arc::new(ledger.clone());
    w.dp.sources = vec![SourceSpec::postgres("main", pg.conninfo("app"), 1)];
    let worker = BackupWorker {
        data_path: w.dp.clone(),
        schedules: Vec::new(),
        limits: Default::default(),
    };
    let (_, event) = request("main", BackupMethod::Logical, Trigger::Manual);
    for delivery in 0..2 {
        let got = worker.handle(&event, &ledger).await;
        assert_eq!(
            decision(&got),
            Decision::Done,
            "delivery {delivery}: {got:?}"
        );
    }
    let types: Vec<String> = ledger
        .read(1, 1000)
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(
        types.iter().filter(|t| *t == "backup.completed").count(),
        1,
        "{types:?}"
    );
    assert!(!types.iter().any(|t| t == "backup.failed"), "{types:?}");
    drop(worker);
    drop(w);
    ledger.close().await;
}
