//! Signed remote appends against a real nats-server: what each identity may append, and every
//! way of appending without the right key refused, answered `denied` and recorded.

use std::sync::Arc;
use std::time::Duration;

use backstop_events::{AccessDenied, Actor, Event, NewEvent, WalArchived, now_micros, uuid_v7};
use backstop_ledger::identity::{AppendPolicy, AppendSigner, Grant};
use backstop_ledger::remote::{self, APPEND_SUBJECT, AppendReply, RemoteLedger};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig, LedgerError};
use backstop_testkit::Nats;

async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .connect(url)
        .await
        .expect("connect to the test nats-server")
}

fn wal_archived(n: u32, actor: Actor) -> NewEvent {
    let segment = format!("0000000100000000000000{n:02X}");
    NewEvent::new(
        "wal-00000001",
        actor,
        &Event::WalArchived(WalArchived {
            timeline: 1,
            object: format!("wal/main/00000001/{segment}"),
            segment,
            sha3: "ab".repeat(32),
            bytes: 16 << 20,
        }),
    )
}

/// A raw request body, as an attacker would send it: it need not pass the client's checks.
fn raw_request(stream: &str, event_type: &str, actor: &str, payload: serde_json::Value) -> Vec<u8> {
    let id = uuid_v7();
    serde_json::to_vec(&serde_json::json!({
        "stream": stream,
        "expected": {"expect": "any"},
        "events": [{
            "id": id, "stream": stream, "type": event_type, "schema_version": 1,
            "occurred_at": now_micros(), "actor": actor, "correlation_id": id,
            "payload": payload,
        }],
    }))
    .unwrap()
}

fn denied_kind(reply: AppendReply) -> String {
    match reply {
        AppendReply::Error { kind, message, .. } => {
            assert_eq!(kind, "denied", "{message}");
            message
        }
        AppendReply::Ok(a) => panic!("appended: {a:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_listed_identities_append_and_only_what_they_are_granted() {
    let nats = Nats::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let db1 = Arc::new(AppendSigner::create("db1", &dir.path().join("db1.key")).unwrap());
    let worker = Arc::new(AppendSigner::create("worker-a", &dir.path().join("w.key")).unwrap());
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let policy = AppendPolicy::new(vec![
        Grant::new(
            "db1",
            &db1.public_key_hex(),
            &s(&["wal.archived"]),
            &s(&["wal-*"]),
            &s(&["worker:wal-push"]),
        )
        .unwrap(),
        Grant::new(
            "worker-a",
            &worker.public_key_hex(),
            &s(&["verification.*", "backup.*"]),
            &s(&["*"]),
            &s(&["worker:*"]),
        )
        .unwrap(),
    ])
    .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(remote::serve(
        ledger.clone(),
        connect(&nats.url()).await,
        Arc::new(policy),
        stop_rx,
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = connect(&nats.url()).await;
    let as_db1 = RemoteLedger::new(client.clone()).signed_by(db1.clone());
    let unsigned = RemoteLedger::new(client.clone());
    let mut refusals = 0u64;

    // The host appends what it is granted.
    let a = as_db1
        .append(
            "wal-00000001",
            ExpectedVersion::Any,
            vec![wal_archived(1, Actor::worker("wal-push"))],
        )
        .await
        .expect("db1 may append wal.archived");
    assert_eq!(a.events.len(), 1);

    // Unsigned: refused, permanently.
    let err = unsigned
        .append(
            "wal-00000001",
            ExpectedVersion::Any,
            vec![wal_archived(2, Actor::worker("wal-push"))],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LedgerError::Refused { kind, .. } if kind == "denied"),
        "{err}"
    );
    assert!(!err.is_transient());
    refusals += 1;

    // The database host forges a recovery into another host, and a passed verification.
    let forged_recovery = raw_request(
        &format!("recovery-{}", uuid_v7()),
        "recovery.requested",
        "operator:alice",
        serde_json::json!({"recovery_id": uuid_v7(), "backup_id": uuid_v7(), "operator": "alice",
                           "scope": {"target": "postgres://evil.example/prod"}}),
    );
    let m = denied_kind(as_db1.request_raw(forged_recovery).await.unwrap());
    assert!(m.contains("identity db1"), "{m}");
    refusals += 1;
    let forged_pass = raw_request(
        &format!("backup-{}", uuid_v7()),
        "verification.passed",
        "worker:wal-push",
        serde_json::json!({}),
    );
    let m = denied_kind(as_db1.request_raw(forged_pass).await.unwrap());
    assert!(m.contains("may not append"), "{m}");
    refusals += 1;
    // Its own type under an operator's name.
    let body = serde_json::to_vec(&serde_json::json!({
        "stream": "wal-00000001", "expected": {"expect": "any"},
        "events": [wal_archived(3, Actor::operator("alice"))],
    }))
    .unwrap();
    let m = denied_kind(as_db1.request_raw(body).await.unwrap());
    assert!(m.contains("as operator:alice"), "{m}");
    refusals += 1;

    // Someone else's key under the worker's name.
    let impostor = Arc::new(AppendSigner::from_seed("worker-a", [42; 32]));
    let as_impostor = RemoteLedger::new(client.clone()).signed_by(impostor);
    let err = as_impostor
        .append(
            "wal-00000001",
            ExpectedVersion::Any,
            vec![wal_archived(4, Actor::worker("wal-push"))],
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bad signature"), "{err}");
    refusals += 1;

    // A genuine request captured and replayed after the window, and one whose body was changed
    // after signing (headers sent by hand: what a man in the middle would do).
    let good_body = serde_json::to_vec(&serde_json::json!({
        "stream": "wal-00000001", "expected": {"expect": "any"},
        "events": [wal_archived(5, Actor::worker("wal-push"))],
    }))
    .unwrap();
    let send = |body: Vec<u8>, signed: backstop_ledger::identity::SignedBy| {
        let client = client.clone();
        async move {
            let h = signed.to_headers();
            let reply = client
                .request_with_headers(APPEND_SUBJECT, h, body.into())
                .await
                .unwrap();
            serde_json::from_slice::<AppendReply>(&reply.payload).unwrap()
        }
    };
    let old = db1.sign(
        &good_body,
        chrono::Utc::now() - chrono::Duration::minutes(10),
    );
    let m = denied_kind(send(good_body.clone(), old).await);
    assert!(m.contains("replayed"), "{m}");
    refusals += 1;
    let signed = db1.sign(&good_body, chrono::Utc::now());
    let mut tampered = good_body.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 1;
    let m = denied_kind(send(tampered, signed.clone()).await);
    assert!(m.contains("bad signature"), "{m}");
    refusals += 1;
    // The untouched request with the same signature goes in.
    assert!(matches!(send(good_body, signed).await, AppendReply::Ok(_)));
    let head_before_flood = ledger.head().position;

    // A flood of unsigned garbage: refused, and recorded as one event at once (the rest of the
    // window is counted and recorded at the end of it, here the shutdown).
    for _ in 0..40 {
        denied_kind(unsigned.request_raw(b"{garbage".to_vec()).await.unwrap());
        refusals += 1;
    }
    assert!(
        ledger.head().position <= head_before_flood + 1,
        "the flood wrote {} events",
        ledger.head().position - head_before_flood
    );

    stop_tx.send(true).unwrap();
    server.await.unwrap().unwrap();

    // Nothing refused was written; every refusal is counted in access.denied.
    let access = ledger.read_stream("access", 0).unwrap();
    let denials: Vec<AccessDenied> = access
        .iter()
        .map(|e| match e.event().unwrap() {
            Event::AccessDenied(d) => d,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(denials.iter().map(|d| d.count).sum::<u64>(), refusals);
    assert!(
        denials.len() < 15,
        "{} events for {refusals} refusals",
        denials.len()
    );
    for caller in [
        "unsigned",
        "identity db1",
        "identity worker-a (bad signature)",
        "identity db1 (bad signature)",
    ] {
        assert!(
            denials.iter().any(|d| d.caller == caller),
            "no denial recorded for {caller}: {denials:?}"
        );
    }
    assert!(denials.iter().all(|d| d.method == "append"));
    let others: Vec<_> = ledger
        .read(1, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.stream != "access")
        .map(|e| e.event_type.clone())
        .collect();
    assert_eq!(
        others,
        ["wal.archived", "wal.archived"],
        "only granted appends"
    );
    ledger.close().await;
}
