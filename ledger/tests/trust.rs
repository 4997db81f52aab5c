//! The consumers and the outbox trust nothing on the bus: forged messages published with a bare
//! NATS client are refused (never handled) and recorded, and no real event is lost because of
//! them. Against a real nats-server started by the test.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_events::{Actor, Digest, Envelope, Event, NewEvent, StorageUsageSampled};
use backstop_ledger::consumer::{self, Handler, HandlerError, MessageHeaders, RetryPolicy, Seen};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig, outbox, verify};
use backstop_testkit::Nats;
use bytes::Bytes;

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

/// Records every event of stream `in` it is given.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<u64>>,
}

#[async_trait::async_trait]
impl Handler for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn wants(&self, t: &str) -> bool {
        t == "storage.usage_sampled"
    }
    async fn handle(&self, event: &Envelope, _: &dyn Appender) -> Result<(), HandlerError> {
        if event.stream == "in" {
            self.seen.lock().unwrap().push(event.position);
        }
        Ok(())
    }
}

/// Publishes like an attacker: no ledger code, just a NATS client and a JetStream ack.
async fn forge(js: &async_nats::jetstream::Context, subject: &str, position: &str, body: Vec<u8>) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(outbox::POSITION_HEADER, position);
    js.publish_with_headers(subject.to_string(), headers, Bytes::from(body))
        .await
        .expect("publish")
        .await
        .expect("stored");
}

fn refusals(ledger: &Ledger) -> Vec<backstop_events::ConsumerRefused> {
    ledger
        .read(1, 10_000)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event() {
            Ok(Event::ConsumerRefused(r)) => Some(r),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_messages_are_refused_recorded_and_skip_no_real_event() {
    let nats = Nats::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let config = outbox::OutboxConfig::default();
    outbox::ensure_stream(&js, &config).await.unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(outbox::run(
        ledger.clone(),
        js.clone(),
        config.clone(),
        stop.clone(),
        None,
    ));
    let recorder = Arc::new(Recorder::default());
    let policy = RetryPolicy {
        backoff: vec![Duration::from_millis(50)],
        ..RetryPolicy::default()
    };
    let appender: Arc<dyn Appender> = Arc::new(ledger.clone());
    let worker = tokio::spawn(consumer::run_jetstream(
        js.clone(),
        config.stream.clone(),
        appender,
        recorder.clone(),
        policy,
        stop.clone(),
    ));

    // Before any real event: a message that is not an envelope takes stream sequence 1, where
    // the outbox would have put position 1.
    forge(
        &js,
        "backstop.events.storage.usage_sampled",
        "1",
        b"{\"not\": \"an event\"}".to_vec(),
    )
    .await;
    for n in 0..3 {
        ledger
            .append("in", ExpectedVersion::Any, vec![sample("in", n)])
            .await
            .unwrap();
    }
    wait_for(
        || recorder.seen.lock().unwrap().len() == 3,
        "the first real events",
    )
    .await
    .unwrap();

    let real: Vec<Envelope> = ledger
        .read(1, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.stream == "in")
        .collect();
    let header = |e: &Envelope| e.position.to_string();
    // A replay of a real event, already handled: skipped, never handled twice.
    forge(
        &js,
        "backstop.events.storage.usage_sampled",
        &header(&real[1]),
        serde_json::to_vec(&real[1]).unwrap(),
    )
    .await;
    // A real event with its payload changed (its hash no longer matches).
    let mut tampered = real[2].clone();
    tampered.payload["bytes"] = serde_json::json!(999_999);
    forge(
        &js,
        "backstop.events.storage.usage_sampled",
        &header(&tampered),
        serde_json::to_vec(&tampered).unwrap(),
    )
    .await;
    // A well-sealed event claiming a position far beyond its place in the stream.
    let far = Envelope::seal(
        sample("in", 77),
        500,
        1,
        backstop_events::now_micros(),
        real[2].hash,
    );
    forge(
        &js,
        "backstop.events.storage.usage_sampled",
        "500",
        serde_json::to_vec(&far).unwrap(),
    )
    .await;
    for n in 3..6 {
        ledger
            .append("in", ExpectedVersion::Any, vec![sample("in", n)])
            .await
            .unwrap();
    }
    wait_for(
        || recorder.seen.lock().unwrap().len() >= 6 && refusals(&ledger).len() >= 3,
        "every real event handled and every forgery recorded",
    )
    .await
    .unwrap_or_else(|what| {
        panic!(
            "{what}: handled {:?}, refused {:#?}, head {}, cursor {}",
            recorder.seen.lock().unwrap(),
            refusals(&ledger),
            ledger.head().position,
            ledger.store().publication_cursor().unwrap()
        )
    });

    // Every real event was handled once, in order; no forgery reached the handler.
    let in_positions: Vec<u64> = ledger
        .read(1, 10_000)
        .unwrap()
        .iter()
        .filter(|e| e.stream == "in")
        .map(|e| e.position)
        .collect();
    assert_eq!(*recorder.seen.lock().unwrap(), in_positions);
    // Each forgery is recorded with its reason.
    let refused = refusals(&ledger);
    // (The replay, a real envelope, is only skipped.)
    assert_eq!(refused.len(), 3, "{refused:#?}");
    let reason = |position: Option<u64>| {
        refused
            .iter()
            .find(|r| r.position == position)
            .map(|r| r.reason.clone())
            .unwrap_or_default()
    };
    assert!(
        reason(None).contains("not an event envelope"),
        "{refused:#?}"
    );
    assert_eq!(
        refused
            .iter()
            .find(|r| r.position.is_none())
            .unwrap()
            .stream_sequence,
        1
    );
    assert!(
        reason(Some(real[2].position)).contains("not the hash of its content"),
        "{refused:#?}"
    );
    assert!(
        reason(Some(500)).contains("cannot sit at stream sequence"),
        "{refused:#?}"
    );
    assert!(refused.iter().all(|r| r.consumer == "recorder"));

    // JetStream holds every real event, byte for byte, in order, forgeries in between.
    let head = ledger.head().position;
    // The stream holds the head's events plus the four forgeries.
    outbox::wait_published(&js, &config.stream, head + 4, Duration::from_secs(10))
        .await
        .unwrap();
    let stream = js.get_stream(&config.stream).await.unwrap();
    let mut genuine = std::collections::BTreeSet::new();
    let mut seq = 1;
    loop {
        let Ok(msg) = stream.get_raw_message(seq).await else {
            break;
        };
        if let Ok(env) = serde_json::from_slice::<Envelope>(&msg.payload)
            && ledger.store().get(env.position).unwrap().as_ref() == Some(&env)
            && env.compute_hash() == env.hash
        {
            genuine.insert(env.position);
        }
        seq += 1;
    }
    // (The replayed copy is a real envelope too; the set counts it once.)
    let head = ledger.head().position;
    assert_eq!(
        genuine,
        (1..=head).collect(),
        "every ledger event is in the stream"
    );
    assert!(
        verify::verify(ledger.store(), ledger.public_key())
            .unwrap()
            .ok()
    );
    stop_tx.send(true).unwrap();
    publisher.await.unwrap().unwrap();
    worker.await.unwrap().unwrap();
}

async fn wait_for(mut done: impl FnMut() -> bool, what: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("timed out: {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn at(position: u64) -> MessageHeaders {
    MessageHeaders {
        position: Some(position.to_string()),
        signature: None,
    }
}

/// The link check, which a live stream rarely lets a forgery reach: an event at the next
/// position whose `prev_hash` is not the hash of the event before it.
#[test]
fn an_event_that_does_not_link_to_the_previous_one_is_refused() {
    let first = Envelope::seal(
        sample("in", 1),
        1,
        1,
        backstop_events::now_micros(),
        Digest::ZERO,
    );
    let seen = Seen {
        position: 1,
        hash: first.hash,
    };
    let linked = Envelope::seal(
        sample("in", 2),
        2,
        2,
        backstop_events::now_micros(),
        first.hash,
    );
    let body = serde_json::to_vec(&linked).unwrap();
    assert!(consumer::check_message(&body, &at(2), 2, Some(&seen), None).is_ok());
    let unlinked = Envelope::seal(
        sample("in", 2),
        2,
        2,
        backstop_events::now_micros(),
        Digest::of(b"another chain"),
    );
    let body = serde_json::to_vec(&unlinked).unwrap();
    let refused = consumer::check_message(&body, &at(2), 2, Some(&seen), None).unwrap_err();
    assert!(refused.reason.contains("prev_hash"), "{}", refused.reason);
    // The header must name the position the envelope claims.
    let body = serde_json::to_vec(&linked).unwrap();
    let refused = consumer::check_message(&body, &at(3), 3, Some(&seen), None).unwrap_err();
    assert!(refused.reason.contains("header"), "{}", refused.reason);
    // A finished position is skipped on any later delivery; an unfinished one (a retry) is not.
    let mut tracker = consumer::Tracker::default();
    tracker.finish(1);
    assert!(tracker.finished(1));
    assert!(!tracker.finished(2));
}

/// With the ledger's public key pinned, a well-formed forgery that links to the chain and
/// arrives before the real event (which the structural checks cannot tell from a real one) is
/// refused, as is one signed by another key; the real event that follows is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_ledgers_key_pinned_a_linked_forgery_is_refused() {
    let nats = Nats::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let config = outbox::OutboxConfig::default();
    outbox::ensure_stream(&js, &config).await.unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(outbox::run(
        ledger.clone(),
        js.clone(),
        config.clone(),
        stop.clone(),
        None,
    ));
    let recorder = Arc::new(Recorder::default());
    let policy = RetryPolicy {
        ledger_public_key: Some(ledger.public_key().to_string()),
        ..RetryPolicy::default()
    };
    let worker = tokio::spawn(consumer::run_jetstream(
        js.clone(),
        config.stream.clone(),
        Arc::new(ledger.clone()),
        recorder.clone(),
        policy,
        stop.clone(),
    ));
    ledger
        .append("in", ExpectedVersion::Any, vec![sample("in", 1)])
        .await
        .unwrap();
    wait_for(
        || recorder.seen.lock().unwrap().len() == 1,
        "the first event",
    )
    .await
    .unwrap();
    let last = ledger.read(1, 1).unwrap().remove(0);
    // What an attacker who watches the bus can build: the next position, linked, well sealed.
    let forged = Envelope::seal(
        sample("in", 666),
        2,
        2,
        backstop_events::now_micros(),
        last.hash,
    );
    forge(
        &js,
        "backstop.events.storage.usage_sampled",
        "2",
        serde_json::to_vec(&forged).unwrap(),
    )
    .await;
    // The same, signed with a key of the attacker's own.
    let other =
        backstop_ledger::CheckpointSigner::load_or_create(&dir.path().join("other.key")).unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(outbox::POSITION_HEADER, "2");
    headers.insert(
        outbox::SIGNATURE_HEADER,
        other
            .sign_statement(&outbox::event_statement(2, &forged.hash))
            .as_str(),
    );
    js.publish_with_headers(
        "backstop.events.storage.usage_sampled",
        headers,
        Bytes::from(serde_json::to_vec(&forged).unwrap()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    ledger
        .append("in", ExpectedVersion::Any, vec![sample("in", 2)])
        .await
        .unwrap();
    wait_for(
        || recorder.seen.lock().unwrap().len() == 2 && refusals(&ledger).len() == 2,
        "the real second event handled and both forgeries recorded",
    )
    .await
    .unwrap_or_else(|what| {
        panic!(
            "{what}: handled {:?}, refused {:#?}",
            recorder.seen.lock().unwrap(),
            refusals(&ledger)
        )
    });
    let handled = recorder.seen.lock().unwrap().clone();
    let real: Vec<u64> = ledger
        .read(1, 100)
        .unwrap()
        .iter()
        .filter(|e| e.stream == "in")
        .map(|e| e.position)
        .collect();
    assert_eq!(handled, real);
    for r in refusals(&ledger) {
        assert!(
            r.reason.contains("not signed by the ledger's pinned key"),
            "{r:?}"
        );
        assert_eq!(r.position, Some(2));
    }
    stop_tx.send(true).unwrap();
    publisher.await.unwrap().unwrap();
    worker.await.unwrap().unwrap();
}
