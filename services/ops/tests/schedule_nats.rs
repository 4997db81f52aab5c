//! Two schedulers in two roles over a real nats-server: one beside the ledger (as in `serve`),
//! one on a "worker machine" that appends through NATS request/reply and reads the schedule
//! streams from JetStream. Both run on injected clocks over the same slots; each slot fires once.

use std::sync::Arc;

use backstop_events::Event;
use backstop_ledger::remote::{self, RemoteLedger};
use backstop_ledger::{Ledger, LedgerConfig, outbox};
use backstop_ops::schedule::jetstream::JetStreamScheduleLog;
use backstop_ops::schedule::{self, ManualClock, Schedule, ScheduleConfig};
use backstop_testkit::Nats;
use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::America::New_York;

fn ny(d: u32, h: u32) -> DateTime<Utc> {
    New_York
        .with_ymd_and_hms(2026, 6, d, h, 0, 0)
        .earliest()
        .expect("a time in New York")
        .with_timezone(&Utc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_beside_the_ledger_and_one_over_nats_fire_each_slot_once() {
    let nats = Nats::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client.clone());
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
    let server = tokio::spawn(remote::serve(
        ledger.clone(),
        client.clone(),
        Arc::new(backstop_ledger::identity::AppendPolicy::open()),
        stop.clone(),
    ));

    let remote_appender = Arc::new(RemoteLedger::new(
        async_nats::connect(nats.url()).await.expect("connect"),
    ));
    let remote_log = JetStreamScheduleLog::new(js.clone(), config.stream.clone());
    let s: Schedule = Schedule::new(
        toml::from_str::<ScheduleConfig>("name = \"nightly\"\nsource = \"main\"").unwrap(),
    )
    .unwrap();

    // Every day for a week, both look at the 02:00 slot at the same moment.
    for d in 1..=7 {
        let clock = ManualClock::new(ny(d, 2));
        let (a, b) = tokio::join!(
            schedule::tick(&s, &ledger, &ledger, &clock),
            schedule::tick(&s, remote_appender.as_ref(), &remote_log, &clock),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let fired = [&a, &b].iter().filter(|t| t.fired.is_some()).count();
        assert_eq!(fired, 1, "day {d}: {a:?} {b:?}");
        // A second look by the remote one, once JetStream has caught up, fires nothing more.
        let want = ledger.store().stream_version(&s.stream()).unwrap();
        use backstop_ops::schedule::ScheduleLog;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while remote_log.last_firing(&s.stream()).await.unwrap().version < want {
            assert!(
                std::time::Instant::now() < deadline,
                "JetStream never caught up"
            );
            tokio::task::yield_now().await;
        }
        let again = schedule::tick(&s, remote_appender.as_ref(), &remote_log, &clock)
            .await
            .unwrap();
        assert!(again.fired.is_none(), "day {d}: {again:?}");
    }

    let fired: Vec<DateTime<Utc>> = ledger
        .read_stream(&s.stream(), 1)
        .unwrap()
        .into_iter()
        .map(|e| match e.event().unwrap() {
            Event::ScheduleFired(f) => f.slot,
            other => panic!("not a firing: {other:?}"),
        })
        .collect();
    assert_eq!(fired, (1..=7).map(|d| ny(d, 2)).collect::<Vec<_>>());
    // And one backup requested per slot, whoever claimed it.
    for slot in &fired {
        let id = schedule::backup_id_for(s.name(), *slot);
        let requested = ledger
            .read_stream(&backstop_events::streams::backup(id), 1)
            .unwrap();
        assert_eq!(requested.len(), 1, "slot {slot}");
    }
    stop_tx.send_replace(true);
    let _ = publisher.await;
    let _ = server.await;
}
