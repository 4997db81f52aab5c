//! The webhook log against a real local-directory repository and a real ledger
//! (`ops::webhook`), time on a `ManualClock`: a piece is sealed at 1,000 entries and at
//! midnight America/New_York (not before), recorded once as `webhook.log_sealed`; a piece
//! uploaded before a crash that came before its record is recorded (once) at the next start and
//! not uploaded twice; pieces past the retention are deleted and the deletion recorded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backstop_events::{Event, streams};
use backstop_ledger::{Ledger, LedgerConfig};
use backstop_ops::schedule::{Clock, ManualClock};
use backstop_ops::webhook::{
    self, Uploading, WebhookConfig, WebhookLogs, encode_piece, list_pieces, log_dir, piece_key,
};
use backstop_repo::{KeyPurpose, LocalBackend, MasterKey, RepoParams, Repository};
use backstop_sources::webhook::{Entry, Header, SegmentWriter};
use chrono::{DateTime, NaiveDate, Utc};
use tokio::sync::watch;

const TOKEN: &str = "a-token-of-at-least-16";

struct World {
    _dirs: tempfile::TempDir,
    data_dir: PathBuf,
    ledger: Ledger,
    repo: Repository,
}

async fn world() -> World {
    let dirs = tempfile::tempdir().unwrap();
    let data_dir = dirs.path().join("data");
    let ledger = Ledger::open(&LedgerConfig {
        signing_key: dirs.path().join("signing.key"),
        ..LedgerConfig::in_data_dir(&data_dir)
    })
    .unwrap();
    let backend = Arc::new(LocalBackend::new(dirs.path().join("bucket")).unwrap());
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let repo = Repository::init(
        backend,
        &MasterKey::from_bytes([3; 64]),
        RepoParams::default(),
        Arc::new(tx),
    )
    .await
    .unwrap();
    World {
        _dirs: dirs,
        data_dir,
        ledger,
        repo,
    }
}

fn config() -> Vec<WebhookConfig> {
    vec![WebhookConfig {
        name: "signals".into(),
        token: Some(TOKEN.into()),
        token_file: None,
        keep: None,
    }]
}

fn open(
    w: &World,
    clock: Arc<dyn Clock>,
    shutdown: watch::Receiver<bool>,
) -> (WebhookLogs, Vec<tokio::task::JoinHandle<()>>) {
    webhook::open(
        &w.data_dir,
        &config(),
        Some(Uploading {
            repo: w.repo.clone(),
            appender: Arc::new(w.ledger.clone()),
        }),
        clock,
        shutdown,
    )
    .unwrap()
}

fn sealed_events(ledger: &Ledger) -> Vec<backstop_events::WebhookLogSealed> {
    ledger
        .read_stream(&streams::webhook("signals"), 1)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event() {
            Ok(Event::WebhookLogSealed(s)) => Some(s),
            _ => None,
        })
        .collect()
}

/// Polls (the uploader is a task of its own) until `n` pieces are stored.
async fn pieces(repo: &Repository, n: usize) -> Vec<webhook::Piece> {
    for _ in 0..500 {
        let p = list_pieces(repo, "signals").await.unwrap();
        if p.len() >= n {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{n} pieces were not stored in time");
}

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_are_sealed_at_1000_entries_and_at_new_york_midnight() {
    let w = world().await;
    // 23:50 in New York on 2 December (EST, UTC-5).
    let start = t("2026-12-03T04:50:00Z");
    let clock = Arc::new(ManualClock::new(start));
    clock.set_horizon(Some(start));
    let (stop_tx, stop) = watch::channel(false);
    let (logs, tasks) = open(&w, clock.clone(), stop);
    let log = logs.get("signals").unwrap();
    assert!(log.token_matches(TOKEN) && !log.token_matches("a-token-of-at-least-17"));
    // The midnight roll is asleep on the clock.
    clock.wait_parked(1).await;

    // 1,005 signals at once: group commit, one piece of exactly 1,000 without any roll.
    let acks = futures::future::join_all(
        (0..1005).map(|i| log.append(format!("{{\"n\":{i}}}").into_bytes())),
    )
    .await;
    let mut seqs: Vec<u64> = acks.into_iter().map(|a| a.unwrap().seq).collect();
    seqs.sort();
    assert_eq!(seqs, (1..=1005).collect::<Vec<_>>());
    let p = pieces(&w.repo, 1).await;
    assert_eq!((p[0].first, p[0].last, p[0].entries), (1, 1000, 1000));
    assert_eq!(p[0].day, NaiveDate::from_ymd_opt(2026, 12, 2).unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        list_pieces(&w.repo, "signals").await.unwrap().len(),
        1,
        "nothing else is sealed before midnight"
    );

    // Midnight in New York: the day's last five are sealed as the 2 December piece.
    clock.set_horizon(Some(t("2026-12-03T05:00:01Z")));
    let p = pieces(&w.repo, 2).await;
    assert_eq!((p[1].first, p[1].last), (1001, 1005));
    assert_eq!(p[1].day, NaiveDate::from_ymd_opt(2026, 12, 2).unwrap());
    assert_eq!(clock.now(), t("2026-12-03T05:00:00Z"));
    // The next signal is the 3 December log's first.
    let ack = log.append(b"after midnight".to_vec()).await.unwrap();
    assert_eq!(ack.seq, 1006);

    let events = sealed_events(&w.ledger);
    assert_eq!(events.len(), 2);
    assert_eq!(
        (events[1].first, events[1].last, events[1].entries),
        (1001, 1005, 5)
    );
    assert_eq!(events[1].day, "2026-12-02");
    assert_eq!(events[1].object, p[1].key);
    // Each piece opens with the export key and holds what was acknowledged.
    let entries = webhook::read_entries(&w.repo, "signals", start, t("2026-12-04T00:00:00Z"), None)
        .await
        .unwrap();
    assert_eq!(entries.len(), 1005);
    assert!(events.iter().all(|e| e.key_id.starts_with("export-")));

    stop_tx.send_replace(true);
    for t in tasks {
        t.await.unwrap();
    }
}

/// A crash after the piece was stored but before `webhook.log_sealed` and the cursor: the next
/// start finds the segment, sees the piece (same name), checks it, records it once and does
/// not store a second copy. Then retention deletes pieces past 90 days, recorded first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piece_stored_before_a_crash_is_recorded_once_and_expires_after_90_days() {
    let w = world().await;
    let day = NaiveDate::from_ymd_opt(2026, 9, 1).unwrap();
    let entries: Vec<Entry> = (1..=3)
        .map(|seq| Entry {
            seq,
            received_at: t("2026-09-01T14:00:00Z"),
            body: format!("{{\"n\":{seq}}}").into_bytes(),
        })
        .collect();
    let dir = log_dir(&w.data_dir, "signals");
    let mut seg = SegmentWriter::create(&dir, Header { first_seq: 1, day }).unwrap();
    seg.append(&entries, 0).unwrap();
    let seg_path = seg.path().to_path_buf();
    drop(seg);
    let key = piece_key("signals", day, 1, 3);
    w.repo
        .put_blob(
            &key,
            KeyPurpose::Export,
            encode_piece(w.repo.id(), "signals", day, &entries).into(),
        )
        .await
        .unwrap();

    // A piece under the same name with other entries is never taken for this segment's.
    let other: Vec<Entry> = entries
        .iter()
        .map(|e| Entry {
            body: b"someone else's".to_vec(),
            ..e.clone()
        })
        .collect();
    w.repo
        .put_blob(
            &key,
            KeyPurpose::Export,
            encode_piece(w.repo.id(), "signals", day, &other).into(),
        )
        .await
        .unwrap();
    let err = webhook::upload_segment(&w.repo, &w.ledger, "signals", &dir, &seg_path)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("other entries"), "{err}");
    assert!(seg_path.exists(), "the local segment is kept");
    w.repo
        .put_blob(
            &key,
            KeyPurpose::Export,
            encode_piece(w.repo.id(), "signals", day, &entries).into(),
        )
        .await
        .unwrap();

    let clock = Arc::new(ManualClock::new(t("2026-09-02T12:00:00Z")));
    clock.set_horizon(Some(t("2026-09-02T12:00:00Z")));
    let (stop_tx, stop) = watch::channel(false);
    let (logs, tasks) = open(&w, clock.clone(), stop);
    wait_gone(&seg_path).await;
    assert_eq!(list_pieces(&w.repo, "signals").await.unwrap().len(), 1);
    assert_eq!(sealed_events(&w.ledger).len(), 1);
    assert_eq!(
        std::fs::read_to_string(dir.join("uploaded"))
            .unwrap()
            .trim(),
        "3"
    );
    // Sequence numbers continue after the uploaded piece.
    let ack = logs
        .get("signals")
        .unwrap()
        .append(b"x".to_vec())
        .await
        .unwrap();
    assert_eq!(ack.seq, 4);
    stop_tx.send_replace(true);
    for t in tasks {
        t.await.unwrap();
    }

    // 90 days on: not yet (the piece's day is within the retention) ...
    let appender = w.ledger.clone();
    let n = webhook::expire(
        &w.repo,
        &appender,
        "signals",
        webhook::DEFAULT_KEEP,
        t("2026-11-30T12:00:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(n, 0);
    // ... past them: deleted, and recorded (once, even when the pass runs again).
    let later = t("2026-12-01T12:00:00Z");
    assert_eq!(
        webhook::expire(&w.repo, &appender, "signals", webhook::DEFAULT_KEEP, later)
            .await
            .unwrap(),
        1
    );
    assert!(list_pieces(&w.repo, "signals").await.unwrap().is_empty());
    let deleted: Vec<_> = w
        .ledger
        .read_stream(&streams::webhook("signals"), 1)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "webhook.log_deleted")
        .collect();
    assert_eq!(deleted.len(), 1);
}

async fn wait_gone(p: &Path) {
    for _ in 0..500 {
        if !p.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} was not uploaded and removed", p.display());
}

fn segment(dir: &Path, first: u64, batches: &[(&[u64], u64)]) -> PathBuf {
    let mut seg = SegmentWriter::create(
        dir,
        Header {
            first_seq: first,
            day: NaiveDate::from_ymd_opt(2026, 12, 2).unwrap(),
        },
    )
    .unwrap();
    for (seqs, synced) in batches {
        let entries: Vec<Entry> = seqs
            .iter()
            .map(|&seq| Entry {
                seq,
                received_at: t("2026-12-02T15:00:00Z"),
                body: format!("{{\"n\":{seq}}}").into_bytes(),
            })
            .collect();
        seg.append(&entries, *synced).unwrap();
    }
    seg.path().to_path_buf()
}

/// At start: a torn last record (never acknowledged) is cut and the rest uploaded; damage that
/// a later record proves was acknowledged stops the start with the file named; set aside in
/// `damaged/`, its sequence numbers are not handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_and_acknowledged_damage_stops_the_start() {
    let w = world().await;
    let dir = log_dir(&w.data_dir, "signals");
    let manual = Arc::new(ManualClock::new(t("2026-12-02T16:00:00Z")));
    // Without a horizon the midnight roll would race the clock ahead, day after day.
    manual.set_horizon(Some(t("2026-12-02T16:00:00Z")));
    let clock: Arc<dyn Clock> = manual;

    // Torn: the last record (4, written with 2 and 3 in a batch never acknowledged) cut short.
    let path = segment(&dir, 1, &[(&[1], 0), (&[2, 3, 4], 1)]);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let (logs, tasks) = open(&w, clock.clone(), stop);
    let p = pieces(&w.repo, 1).await;
    assert_eq!(
        (p[0].first, p[0].last),
        (1, 3),
        "records 1-3 kept, the torn 4 dropped"
    );
    assert_eq!(
        logs.get("signals")
            .unwrap()
            .append(b"next".to_vec())
            .await
            .unwrap()
            .seq,
        4
    );
    stop_tx.send_replace(true);
    for t in tasks {
        t.await.unwrap();
    }
    wait_gone(&path).await;
    for p in backstop_sources::webhook::list_segments(&dir).unwrap() {
        std::fs::remove_file(p).unwrap();
    }

    // Acknowledged: record 11 damaged, record 12 (a later batch) says 11 was on disk.
    let path = segment(&dir, 10, &[(&[10], 9), (&[11], 10), (&[12], 11)]);
    let mut bytes = std::fs::read(&path).unwrap();
    // Records are 40 bytes here (32 + an 8-byte body): a byte of the body of 11.
    let at = bytes.len() - 80 + 35;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let (_stop_tx, stop) = watch::channel(false);
    let err = webhook::open(&w.data_dir, &config(), None, clock.clone(), stop)
        .err()
        .expect("acknowledged damage must stop the start");
    let msg = err.to_string();
    assert!(
        msg.contains("sequence 11") && msg.contains("was acknowledged") && msg.contains(".log"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was changed");

    // Set aside as the RUNBOOK says: the start goes on, numbering after 12.
    std::fs::create_dir_all(dir.join("damaged")).unwrap();
    std::fs::rename(&path, dir.join("damaged").join("00000000000000000010.log")).unwrap();
    let (_stop_tx, stop) = watch::channel(false);
    let (logs, _tasks) = webhook::open(&w.data_dir, &config(), None, clock, stop).unwrap();
    assert_eq!(
        logs.get("signals")
            .unwrap()
            .append(b"x".to_vec())
            .await
            .unwrap()
            .seq,
        13
    );
}

/// A storage error (here: the next segment cannot be created) refuses the signal and every one
/// after it, rather than writing after a failure whose effect on the file is unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_error_stops_the_log_until_restart() {
    let w = world().await;
    let manual = Arc::new(ManualClock::new(t("2026-12-02T16:00:00Z")));
    manual.set_horizon(Some(t("2026-12-02T16:00:00Z")));
    let (_stop_tx, stop) = watch::channel(false);
    let (logs, _tasks) = webhook::open(&w.data_dir, &config(), None, manual, stop).unwrap();
    let dir = log_dir(&w.data_dir, "signals");
    std::fs::create_dir_all(dir.join(backstop_sources::webhook::segment_name(1))).unwrap();
    let log = logs.get("signals").unwrap();
    for _ in 0..2 {
        let err = log.append(b"x".to_vec()).await.unwrap_err();
        assert!(matches!(err, webhook::WebhookError::Stopped(_)), "{err}");
        assert!(err.to_string().contains("restart"), "{err}");
    }
}
