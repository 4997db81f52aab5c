//! The ledger against a real nats-server (started by the test on a free port).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backstop_events::{Actor, Event, NewEvent, StorageUsageSampled};
use backstop_ledger::consumer::{self, Handler, HandlerError, RetryPolicy};
use backstop_ledger::remote::{AppendReply, RemoteLedger};
use backstop_ledger::{
    Appender, ExpectedVersion, Ledger, LedgerConfig, LedgerError, outbox, remote, verify,
};
use backstop_testkit::Nats;
use futures::StreamExt;

fn sample(stream: &str, n: u64) -> NewEvent {
    NewEvent::new(
        stream,
        Actor::System,
        &Event::StorageUsageSampled(StorageUsageSampled {
            region: "r".into(),
            storage_class: "STANDARD".into(),
            bytes: n,
            objects: n,
            repository: String::new(),
        }),
    )
}

async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .max_reconnects(None)
        .connect(url)
        .await
        .expect("connect to the test nats-server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_a_durable_consumer_once_across_a_nats_outage() {
    let mut nats = Nats::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let client = connect(&nats.url()).await;
    let js = async_nats::jetstream::new(client);
    let config = outbox::OutboxConfig::default();
    outbox::ensure_stream(&js, &config).await.unwrap();
    let policy = RetryPolicy::default();
    // The consumer exists before the burst, as a worker's would.
    consumer::durable_consumer(&js, &config.stream, "probe", &policy)
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(outbox::run(
        ledger.clone(),
        js.clone(),
        config.clone(),
        stop_rx,
        None,
    ));

    // A burst of concurrent appends; NATS goes down in the middle of it and comes back.
    let mut appenders = Vec::new();
    for i in 0..8 {
        let l = ledger.clone();
        appenders.push(tokio::spawn(async move {
            let stream = format!("s{i}");
            for n in 0..250 {
                l.append(&stream, ExpectedVersion::Any, vec![sample(&stream, n)])
                    .await
                    .unwrap();
                if n % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    nats.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    nats.start_again().unwrap();
    for a in appenders {
        a.await.unwrap();
    }
    let head = ledger.head().position;
    assert_eq!(head, 2000);
    outbox::wait_published(&js, &config.stream, head, Duration::from_secs(60))
        .await
        .unwrap();

    // Read everything from the durable consumer: each event exactly once, in ledger order.
    let c = consumer::durable_consumer(&js, &config.stream, "probe", &policy)
        .await
        .unwrap();
    let mut messages = c.messages().await.unwrap();
    let mut seen: HashMap<uuid::Uuid, u32> = HashMap::new();
    let mut positions = Vec::new();
    while positions.len() < head as usize {
        let msg = tokio::time::timeout(Duration::from_secs(20), messages.next())
            .await
            .expect("consumer stalled")
            .unwrap()
            .unwrap();
        let env: backstop_events::Envelope = serde_json::from_slice(&msg.payload).unwrap();
        *seen.entry(env.id).or_default() += 1;
        positions.push(env.position);
        msg.ack().await.unwrap();
    }
    assert!(seen.values().all(|&n| n == 1), "an event arrived twice");
    assert_eq!(seen.len(), 2000);
    assert_eq!(positions, (1..=2000).collect::<Vec<_>>());
    let mut stream = js.get_stream(&config.stream).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 2000);
    assert_eq!(ledger.store().publication_cursor().unwrap(), 2001);
    stop_tx.send(true).unwrap();
    publisher.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_outbox_publishes_nothing_twice() {
    let nats = Nats::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let js = async_nats::jetstream::new(connect(&nats.url()).await);
    let config = outbox::OutboxConfig::default();
    for n in 0..100 {
        ledger
            .append("s", ExpectedVersion::Any, vec![sample("s", n)])
            .await
            .unwrap();
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(outbox::run(
        ledger.clone(),
        js.clone(),
        config.clone(),
        rx,
        None,
    ));
    outbox::wait_published(&js, &config.stream, 100, Duration::from_secs(30))
        .await
        .unwrap();
    tx.send(true).unwrap();
    task.await.unwrap().unwrap();
    // Pretend the cursor was lost (a crash before it was written): the stream's own sequence
    // tells the outbox where to resume.
    ledger.store().set_publication_cursor(1).unwrap();
    for n in 0..10 {
        ledger
            .append("s", ExpectedVersion::Any, vec![sample("s", n)])
            .await
            .unwrap();
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(outbox::run(
        ledger.clone(),
        js.clone(),
        config.clone(),
        rx,
        None,
    ));
    outbox::wait_published(&js, &config.stream, 110, Duration::from_secs(30))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut stream = js.get_stream(&config.stream).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 110);
    assert_eq!(info.state.last_sequence, 110);
    tx.send(true).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_appends_validate_and_bad_input_harms_nothing() {
    let nats = Nats::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let client = connect(&nats.url()).await;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(remote::serve(
        ledger.clone(),
        client.clone(),
        Arc::new(backstop_ledger::identity::AppendPolicy::open()),
        rx,
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let remote = RemoteLedger::new(connect(&nats.url()).await);

    // A good append, and its idempotent replay.
    let e = sample("r", 1);
    let a = remote
        .append("r", ExpectedVersion::NoStream, vec![e.clone()])
        .await
        .unwrap();
    assert_eq!(a.events[0].position, 1);
    let again = remote
        .append("r", ExpectedVersion::NoStream, vec![e.clone()])
        .await
        .unwrap();
    assert!(again.events[0].duplicate);
    // The same id with other content (a pre-claimed id) is refused as `id_reused`, permanent.
    let err = remote
        .append(
            "r",
            ExpectedVersion::Any,
            vec![sample("r", 9).with_id(e.id)],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LedgerError::Refused { kind, .. } if kind == "id_reused"),
        "{err}"
    );
    assert!(!err.is_transient());
    assert_eq!(ledger.head().position, 1);

    // A conflict carries the real version.
    let err = remote
        .append("r", ExpectedVersion::Exact(5), vec![sample("r", 2)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, LedgerError::Conflict { actual: 1, .. }),
        "{err}"
    );

    // Malformed JSON.
    match remote.request_raw(b"{not json".to_vec()).await.unwrap() {
        AppendReply::Error { kind, message, .. } => {
            assert_eq!(kind, "malformed");
            assert!(message.contains("not valid JSON"), "{message}");
        }
        other => panic!("accepted garbage: {other:?}"),
    }
    // An unknown event type, sent raw so the client's own check does not catch it first.
    let mut unknown = sample("r", 3);
    unknown.event_type = "backup.teleported".into();
    let body = serde_json::to_vec(&remote::AppendRequest {
        stream: "r".into(),
        expected: ExpectedVersion::Any,
        events: vec![unknown],
    })
    .unwrap();
    match remote.request_raw(body).await.unwrap() {
        AppendReply::Error { kind, message, .. } => {
            assert_eq!(kind, "invalid");
            assert!(message.contains("unknown event type"), "{message}");
        }
        other => panic!("accepted an unknown type: {other:?}"),
    }
    // An oversized payload.
    let mut big = sample("r", 4);
    big.payload["region"] = serde_json::Value::String("x".repeat(300 * 1024));
    let body = serde_json::to_vec(&remote::AppendRequest {
        stream: "r".into(),
        expected: ExpectedVersion::Any,
        events: vec![big],
    })
    .unwrap();
    match remote.request_raw(body).await.unwrap() {
        AppendReply::Error { kind, message, .. } => {
            assert_eq!(kind, "invalid");
            assert!(message.contains("limit"), "{message}");
        }
        other => panic!("accepted an oversized payload: {other:?}"),
    }
    // Nothing already committed was harmed.
    assert_eq!(ledger.head().position, 1);
    let report = verify::verify(ledger.store(), ledger.public_key()).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    tx.send(true).unwrap();
    server.await.unwrap().unwrap();
}

struct Flaky {
    fail_first: u32,
    calls: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl Handler for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    fn wants(&self, t: &str) -> bool {
        t == "storage.usage_sampled"
    }
    async fn handle(
        &self,
        event: &backstop_events::Envelope,
        appender: &dyn Appender,
    ) -> Result<(), HandlerError> {
        if event.stream != "in" {
            // Its own results have the same type; they are not work.
            return Ok(());
        }
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n < self.fail_first {
            return Err(HandlerError::retryable("not yet"));
        }
        let e = NewEvent::caused_by(
            event,
            "results",
            Actor::worker("flaky"),
            &Event::StorageUsageSampled(StorageUsageSampled {
                region: "handled".into(),
                storage_class: "x".into(),
                bytes: event.position,
                objects: 0,
                repository: String::new(),
            }),
        )
        .with_derived_id(event, "result");
        appender
            .append("results", ExpectedVersion::Any, vec![e])
            .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_workers_retry_with_backoff_then_succeed_or_dead_letter() {
    let nats = Nats::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let js = async_nats::jetstream::new(connect(&nats.url()).await);
    let config = outbox::OutboxConfig::default();
    outbox::ensure_stream(&js, &config).await.unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(outbox::run(
        ledger.clone(),
        js.clone(),
        config.clone(),
        rx.clone(),
        None,
    ));
    let policy = RetryPolicy {
        max_deliveries: 3,
        backoff: vec![Duration::from_millis(100)],
        ack_wait: Duration::from_secs(5),
        ..RetryPolicy::default()
    };
    // Fails twice, then succeeds on the third delivery: one result.
    let handler = Arc::new(Flaky {
        fail_first: 2,
        calls: Default::default(),
    });
    let appender: Arc<dyn Appender> = Arc::new(ledger.clone());
    tokio::spawn(consumer::run_jetstream(
        js.clone(),
        config.stream.clone(),
        appender,
        handler.clone(),
        policy,
        rx,
    ));
    ledger
        .append("in", ExpectedVersion::Any, vec![sample("in", 1)])
        .await
        .unwrap();
    let mut sub = ledger.subscribe(2);
    let got = tokio::time::timeout(Duration::from_secs(30), sub.next_batch(10))
        .await
        .expect("no result")
        .unwrap();
    assert_eq!(got[0].stream, "results");
    assert_eq!(
        handler.calls.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "two failed deliveries, then one that succeeded"
    );
    tx.send(true).unwrap();
}
