//! serve's poll of a git source, on an injected clock and real repositories (bare repositories
//! in a temporary directory): the first sync runs at once (mirrored, hashes equal, bundled); a
//! push made while the poll waits for its next slot is not mirrored until the clock reaches
//! that slot, then is; no real time passes between the slots.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use backstop_events::{Actor, Event};
use backstop_ledger::{Ledger, LedgerConfig};
use backstop_ops::backup::BackupOptions;
use backstop_ops::schedule::{Clock, ManualClock};
use backstop_ops::{DataPath, SourceKind, SourceSpec};
use backstop_sources::git::GitSource;
use chrono::{TimeZone, Utc};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=Dev", "-c", "user.email=dev@example.com"])
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn push_commit(work: &Path, body: &str) -> String {
    std::fs::write(work.join("app.py"), body).unwrap();
    git(work, &["add", "app.py"]);
    git(work, &["commit", "-q", "-m", body]);
    git(work, &["push", "-q", "origin", "main"]);
    git(work, &["rev-parse", "HEAD"])
}

fn git_events(ledger: &Ledger) -> Vec<Event> {
    ledger
        .read(1, 10_000)
        .unwrap()
        .iter()
        .filter(|e| e.event_type.starts_with("git.") || e.event_type == "backup.completed")
        .map(|e| e.event().unwrap())
        .collect()
}

/// Waits for work already started (a sync in flight) to show, without moving the clock.
async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poll_mirrors_a_push_at_its_next_slot_on_the_injected_clock() {
    let dir = tempfile::tempdir().unwrap();
    let (src, mirror, work) = (
        dir.path().join("src.git"),
        dir.path().join("mirror.git"),
        dir.path().join("work"),
    );
    for bare in [&src, &mirror] {
        git(
            dir.path(),
            &[
                "init",
                "-q",
                "--bare",
                "--initial-branch=main",
                bare.to_str().unwrap(),
            ],
        );
    }
    git(
        dir.path(),
        &[
            "init",
            "-q",
            "--initial-branch=main",
            work.to_str().unwrap(),
        ],
    );
    git(&work, &["remote", "add", "origin", src.to_str().unwrap()]);
    let head1 = push_commit(&work, "v1");

    let ledger = Ledger::open(&LedgerConfig::in_data_dir(&dir.path().join("data"))).unwrap();
    let dp = DataPath {
        repo: support::memory_repo().await,
        appender: Arc::new(ledger.clone()),
        sources: vec![SourceSpec {
            name: "app".into(),
            kind: SourceKind::Git(GitSource {
                url: src.to_string_lossy().into_owned(),
                mirror: Some(mirror.to_string_lossy().into_owned()),
                refs: vec!["refs/heads/*".into(), "refs/tags/*".into()],
                work_dir: dir.path().join("data/git/app.git"),
                force: false,
                timeout: Duration::from_secs(60),
            }),
        }],
    };
    let t0 = Utc.with_ymd_and_hms(2026, 3, 2, 14, 30, 0).unwrap();
    let clock = Arc::new(ManualClock::new(t0));
    // The first sync runs at t0; the next slot (t0 + 60 s) is past the horizon, so the poll
    // parks there until the test moves it.
    clock.set_horizon(Some(t0 + chrono::Duration::seconds(30)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let poll = tokio::spawn(backstop_ops::git::poll(
        dp.clone(),
        vec![("app".into(), Duration::from_secs(60))],
        clock.clone(),
        Actor::worker("git"),
        BackupOptions::default(),
        stop_rx,
    ));
    clock.wait_parked(1).await;
    assert_eq!(git(&mirror, &["rev-parse", "refs/heads/main"]), head1);
    let events = git_events(&ledger);
    let Some(Event::GitMirrored(m)) = events.first() else {
        panic!("{events:?}")
    };
    assert_eq!((m.refs, m.head.as_deref()), (1, Some(head1.as_str())));
    assert_eq!(m.updated_total, 1);
    assert!(
        matches!(events.get(1), Some(Event::BackupCompleted(c)) if c.method == backstop_events::BackupMethod::Git),
        "{events:?}"
    );

    // Pushed while the poll waits for t0 + 60 s: nothing happens until the clock gets there.
    let head2 = push_commit(&work, "v2");
    assert_eq!(clock.now(), t0, "the parked poll did not move the clock");
    assert_eq!(git(&mirror, &["rev-parse", "refs/heads/main"]), head1);
    assert_eq!(git_events(&ledger).len(), 2);
    clock.set_horizon(Some(t0 + chrono::Duration::seconds(90)));
    until("the second push mirrored", || {
        git_events(&ledger)
            .iter()
            .filter(|e| matches!(e, Event::BackupCompleted(_)))
            .count()
            == 2
    })
    .await;
    assert_eq!(git(&mirror, &["rev-parse", "refs/heads/main"]), head2);
    let events = git_events(&ledger);
    let mirrored: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::GitMirrored(m) => Some(m.head.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(mirrored, vec![Some(head1), Some(head2)]);
    // The second sync ran at its slot, t0 + 60 s, and the poll then waits for t0 + 120 s.
    clock.wait_parked(1).await;
    assert_eq!(clock.now(), t0 + chrono::Duration::seconds(60));

    stop_tx.send(true).unwrap();
    poll.await.unwrap().unwrap();
    drop(dp);
    ledger.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_mirror_is_recorded_as_failed_and_the_bundle_is_still_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (src, work) = (dir.path().join("src.git"), dir.path().join("work"));
    git(
        dir.path(),
        &[
            "init",
            "-q",
            "--bare",
            "--initial-branch=main",
            src.to_str().unwrap(),
        ],
    );
    git(
        dir.path(),
        &[
            "init",
            "-q",
            "--initial-branch=main",
            work.to_str().unwrap(),
        ],
    );
    git(&work, &["remote", "add", "origin", src.to_str().unwrap()]);
    push_commit(&work, "v1");
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(&dir.path().join("data"))).unwrap();
    let dp = DataPath {
        repo: support::memory_repo().await,
        appender: Arc::new(ledger.clone()),
        sources: vec![SourceSpec {
            name: "app".into(),
            kind: SourceKind::Git(GitSource {
                url: src.to_string_lossy().into_owned(),
                mirror: Some(
                    dir.path()
                        .join("no-such-mirror.git")
                        .to_string_lossy()
                        .into_owned(),
                ),
                refs: vec!["refs/heads/*".into()],
                work_dir: dir.path().join("data/git/app.git"),
                force: false,
                timeout: Duration::from_secs(60),
            }),
        }],
    };
    let outcome = backstop_ops::git::sync(
        &dp,
        "app",
        &Actor::operator("test"),
        &BackupOptions::default(),
    )
    .await
    .unwrap();
    assert!(!outcome.ok());
    assert!(outcome.failed.is_some(), "{outcome:?}");
    assert!(
        matches!(
            outcome.bundle,
            backstop_ops::git::BundleOutcome::Taken { .. }
        ),
        "{outcome:?}"
    );
    let events = git_events(&ledger);
    let Some(Event::GitMirrorFailed(f)) = events.first() else {
        panic!("{events:?}")
    };
    assert!(f.reason.contains("no-such-mirror"), "{}", f.reason);
    // A source that is not git is refused by name.
    let e = backstop_ops::git::git_source(&dp, "nope").unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    drop(dp);
    ledger.close().await;
}
