//! The distributed engine under failure: a three-node JetStream cluster on loopback, running
//! deploy/nats/nats-1.conf..nats-3.conf and auth.conf as they are (the kit only moves ports and
//! stores), the events stream replicated on all three (`[nats] replicas = 3`), `backstop serve`
//! (ledger owner and outbox, no workers) and two `backstop worker --only notify` processes, all
//! given every node's URL.
//!
//! The work: a burst of `alert.raised` events; the notify worker posts each to a webhook and
//! appends `notification.sent` over NATS, signed with its own identity (`backstop ledger
//! identity new`). The two workers post to two different webhooks (their configs differ only in
//! the channel's URL and the identity; the channel's name is the same), so each webhook counts
//! what its process did, and the `recipient` of each `notification.sent` in the ledger says
//! which process handled it. Half the burst is appended, the node that leads the stream is
//! killed (SIGKILL) once a quarter of the burst has been handled, and the other half is
//! appended at once, so both publication and consumption ride through the leader change.
//!
//! Then: every alert has exactly one `notification.sent` and exactly one webhook post (none
//! lost, none handled twice), both processes handled some, nothing was refused or
//! dead-lettered, and the stream holds every ledger event, byte for byte, at its position.
//! Last, the lost node is started again and must become a current replica of the stream.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use backstop_events::{Actor, AlertRaised, Envelope, Event, NewEvent, Severity, streams};
use backstop_ledger::local::{LocalLedger, socket_path};
use backstop_ledger::{Appender, ExpectedVersion};
use backstop_testkit::{NatsCluster, free_port};
use support::{Process, Webhook, run, stderr, stdout};

/// Alerts in the burst: half before the kill, half right after it.
const BURST: usize = 120;
const STREAM: &str = "BACKSTOP_EVENTS";

fn deploy(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/nats")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.display().to_string()
}

fn key(i: usize) -> String {
    format!("backup_failed/burst-{i:03}")
}

fn alert(i: usize) -> NewEvent {
    let event = Event::AlertRaised(AlertRaised {
        alert_id: uuid::Uuid::now_v7(),
        severity: Severity::Critical,
        kind: "backup_failed".into(),
        subject: format!("burst-{i:03}"),
        message: format!("the last backup of `burst-{i:03}` failed"),
        key: key(i),
        source: Some(format!("burst-{i:03}")),
    });
    NewEvent::new(streams::alerts(), Actor::System, &event)
}

/// Appends alerts `range` through serve's control socket, ten to an append.
async fn append_alerts(ledger: &LocalLedger, range: std::ops::Range<usize>) {
    let all: Vec<usize> = range.collect();
    for chunk in all.chunks(10) {
        ledger
            .append(
                &streams::alerts(),
                ExpectedVersion::Any,
                chunk.iter().map(|&i| alert(i)).collect(),
            )
            .await
            .expect("append the burst through the control socket");
    }
}

/// Every event in serve's ledger, from position 1 to the head when asked.
async fn ledger_events(ledger: &LocalLedger) -> Vec<Envelope> {
    let mut follow = ledger.follow(1).await.expect("follow the ledger");
    let head = follow.head_at_start().position;
    let mut all: Vec<Envelope> = Vec::new();
    while all.last().map_or(0, |e| e.position) < head {
        let batch = tokio::time::timeout(Duration::from_secs(30), follow.next_batch())
            .await
            .expect("the ledger's events within 30 s")
            .expect("read the ledger");
        assert!(!batch.is_empty(), "serve stopped while the ledger was read");
        all.extend(batch);
    }
    all
}

/// The webhook posts per alert key, over both receivers.
fn posts_by_key(hooks: &[&Webhook]) -> BTreeMap<String, usize> {
    let mut by_key = BTreeMap::new();
    for hook in hooks {
        for body in hook.bodies() {
            if let Some(k) = body["backstop"]["key"].as_str()
                && k.starts_with("backup_failed/burst-")
            {
                *by_key.entry(k.to_string()).or_insert(0) += 1;
            }
        }
    }
    by_key
}

fn burst_posts(hook: &Webhook) -> usize {
    posts_by_key(&[hook]).values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nats_node_loses_nothing_repeats_nothing_and_the_work_stays_shared() {
    let (ledger_pw, worker_pw) = ("ledger-pw-c1a55e", "worker-pw-77d0b3");
    let configs = [
        deploy("nats-1.conf"),
        deploy("nats-2.conf"),
        deploy("nats-3.conf"),
    ];
    let auth = deploy("auth.conf");
    let mut cluster = NatsCluster::start_with_configs(
        &configs,
        &[("auth.conf", &auth)],
        &[
            ("BACKSTOP_NATS_LEDGER_PASSWORD", ledger_pw),
            ("BACKSTOP_NATS_WORKER_PASSWORD", worker_pw),
            ("BACKSTOP_NATS_WALHOST_PASSWORD", "walhost-pw-unused-here"),
        ],
    )
    .expect("a three-node NATS cluster with deploy/nats's configuration");
    let urls = cluster.urls();

    let dir = tempfile::tempdir().unwrap();
    let (serve_dir, a_dir, b_dir) = (
        dir.path().join("serve"),
        dir.path().join("worker-a"),
        dir.path().join("worker-b"),
    );
    for d in [&serve_dir, &a_dir, &b_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    let (hook_a, hook_b) = (Webhook::start(), Webhook::start());
    // Each worker's identity (`backstop ledger identity new`, its printed configuration used as
    // is): the ledger's part goes to serve, the worker's to its [nats] section.
    let identity = |name: &str| {
        let key_file = dir.path().join(format!("{name}.key"));
        let made = run(
            dir.path(),
            &[
                "ledger",
                "identity",
                "new",
                name,
                "--key-file",
                key_file.to_str().unwrap(),
                "--role",
                "worker",
            ],
        );
        assert!(made.status.success(), "{}", stderr(&made));
        let printed = stdout(&made);
        let (ledger_part, worker_part) = printed
            .split_once("# On the worker")
            .expect("the command prints both parts");
        let worker_part = worker_part.split_once('\n').unwrap().1;
        (ledger_part.to_string(), worker_part.to_string())
    };
    let (ledger_a, nats_a) = identity("worker-a");
    let (ledger_b, nats_b) = identity("worker-b");
    let config = |user: &str, password: &str, hook: &Webhook, nats_extra: &str, extra: &str| {
        format!(
            "[nats]\nurl = \"{urls}\"\nreplicas = 3\nuser = \"{user}\"\npassword_file = \"{}\"\n{nats_extra}\n\n[api]\nlisten = \"127.0.0.1:{}\"\n\n[reports]\nweekly = false\n\n[workers]\nack_wait_seconds = 10\n\n[notify]\nbackoff_ms = 50\n\n[[notify.channels]]\nname = \"chat\"\nkind = \"webhook\"\nurl = \"{}\"\nevents = [\"alerts\"]\n\n{extra}\n",
            write(dir.path(), &format!("{user}.pw"), &format!("{password}\n")),
            free_port(),
            hook.url()
        )
    };
    let serve_cfg = write(
        dir.path(),
        "serve.toml",
        &config(
            "ledger",
            ledger_pw,
            &hook_a,
            "",
            &format!("{ledger_a}\n{ledger_b}"),
        ),
    );
    let a_cfg = write(
        dir.path(),
        "worker-a.toml",
        &config("worker", worker_pw, &hook_a, &nats_a, ""),
    );
    let b_cfg = write(
        dir.path(),
        "worker-b.toml",
        &config("worker", worker_pw, &hook_b, &nats_b, ""),
    );

    let mut serve = Process::spawn(
        &serve_dir,
        &["--config", &serve_cfg, "serve", "--no-workers"],
        &[],
    );
    serve.wait_for_log("publishing to NATS JetStream", Duration::from_secs(60));
    let mut worker_a = Process::spawn(
        &a_dir,
        &["--config", &a_cfg, "worker", "--only", "notify"],
        &[],
    );
    let mut worker_b = Process::spawn(
        &b_dir,
        &["--config", &b_cfg, "worker", "--only", "notify"],
        &[],
    );
    worker_a.wait_for_log("worker running", Duration::from_secs(60));
    worker_b.wait_for_log("worker running", Duration::from_secs(60));

    // The test's own view of the cluster, as the ledger's user, over every node.
    let client =
        async_nats::ConnectOptions::with_user_and_password("ledger".into(), ledger_pw.into())
            .connect(urls.split(',').collect::<Vec<_>>())
            .await
            .expect("connect to the cluster");
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(STREAM)
        .await
        .expect("serve created the stream");
    let info = stream.info().await.expect("stream info").clone();
    assert_eq!(info.config.num_replicas, 3, "[nats] replicas = 3");
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("the stream has a leader");

    // Both workers are pulling: the consumer has a waiting pull from each.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting = stream
            .consumer_info("notify")
            .await
            .map(|c| c.num_waiting)
            .unwrap_or(0);
        if waiting >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} workers pulling from the notify consumer after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let ledger = LocalLedger::connect(socket_path(&serve_dir))
        .await
        .expect("serve's control socket");
    let started = Instant::now();
    append_alerts(&ledger, 0..BURST / 2).await;

    // A quarter handled: the burst is in full swing. Kill the node that leads the stream.
    let deadline = Instant::now() + Duration::from_secs(60);
    while burst_posts(&hook_a) + burst_posts(&hook_b) < BURST / 4 {
        assert!(
            Instant::now() < deadline,
            "a quarter of the burst was not handled within 60 s:\n{}\n{}",
            worker_a.log(),
            worker_b.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let consumer_leader = stream
        .consumer_info("notify")
        .await
        .ok()
        .and_then(|c| c.cluster.as_ref().and_then(|c| c.leader.clone()));
    let handled_at_kill = burst_posts(&hook_a) + burst_posts(&hook_b);
    cluster.kill(&leader).expect("kill the stream leader");
    let killed = Instant::now();
    append_alerts(&ledger, BURST / 2..BURST).await;

    // Every alert handled: wait for its notification.sent in the ledger.
    let mut first_after_kill = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    let sent = loop {
        let posts = burst_posts(&hook_a) + burst_posts(&hook_b);
        if first_after_kill.is_none() && posts > handled_at_kill {
            first_after_kill = Some(killed.elapsed());
        }
        let events = ledger_events(&ledger).await;
        let sent: Vec<Envelope> = events
            .into_iter()
            .filter(|e| e.event_type == "notification.sent")
            .filter(|e| {
                e.payload["key"]
                    .as_str()
                    .is_some_and(|k| k.starts_with("backup_failed/burst-"))
            })
            .collect();
        if sent.len() >= BURST {
            break sent;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {BURST} alerts notified within 120 s of killing {leader}\n--- serve:\n{}\n--- worker a:\n{}\n--- worker b:\n{}",
            sent.len(),
            serve.log(),
            worker_a.log(),
            worker_b.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let drained = killed.elapsed();
    let total = started.elapsed();

    // None lost, none handled twice: one notification.sent per alert, by cause, and one post.
    let events = ledger_events(&ledger).await;
    let alerts: BTreeMap<uuid::Uuid, String> = events
        .iter()
        .filter(|e| e.event_type == "alert.raised")
        .filter_map(|e| {
            let k = e.payload["key"].as_str()?;
            k.starts_with("backup_failed/burst-")
                .then(|| (e.id, k.to_string()))
        })
        .collect();
    assert_eq!(alerts.len(), BURST, "the burst is in the ledger");
    let mut per_cause: BTreeMap<uuid::Uuid, usize> = BTreeMap::new();
    for e in &sent {
        let cause = e.causation_id.expect("notification.sent names its cause");
        *per_cause.entry(cause).or_insert(0) += 1;
    }
    for (id, k) in &alerts {
        assert_eq!(
            per_cause.get(id),
            Some(&1),
            "alert {k} ({id}) has {:?} notification.sent",
            per_cause.get(id)
        );
    }
    assert_eq!(sent.len(), BURST, "a notification.sent for something else");
    let posts = posts_by_key(&[&hook_a, &hook_b]);
    assert_eq!(posts.len(), BURST, "every alert was posted");
    let twice: Vec<_> = posts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "alerts posted more than once: {twice:?}");

    // Shared: both processes handled some, and the ledger's recipients agree with the webhooks.
    let (by_a, by_b) = (burst_posts(&hook_a), burst_posts(&hook_b));
    assert!(by_a > 0 && by_b > 0, "work not shared: a {by_a}, b {by_b}");
    let recorded_a = sent
        .iter()
        .filter(|e| e.payload["recipient"] == hook_a.url())
        .count();
    let recorded_b = sent
        .iter()
        .filter(|e| e.payload["recipient"] == hook_b.url())
        .count();
    assert_eq!((recorded_a, recorded_b), (by_a, by_b));

    // Nothing refused, nothing given up on.
    for kind in [
        "consumer.refused",
        "worker.dead_lettered",
        "notification.failed",
    ] {
        let bad: Vec<_> = events.iter().filter(|e| e.event_type == kind).collect();
        assert!(bad.is_empty(), "{kind}: {bad:?}");
    }

    // The stream holds every ledger event at its position, byte for byte, with nothing else.
    let head = events.last().map_or(0, |e| e.position);
    let deadline = Instant::now() + Duration::from_secs(60);
    let state = loop {
        let state = stream.info().await.expect("stream info").state.clone();
        if state.last_sequence >= head {
            break state;
        }
        assert!(
            Instant::now() < deadline,
            "the stream reached {} of the ledger's {head} within 60 s",
            state.last_sequence
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(state.first_sequence, 1);
    assert_eq!(state.messages, state.last_sequence, "a gap in the stream");
    for e in &events {
        let msg = stream
            .get_raw_message(e.position)
            .await
            .unwrap_or_else(|err| panic!("message {}: {err}", e.position));
        assert_eq!(
            msg.payload.as_ref(),
            serde_json::to_vec(e).unwrap().as_slice(),
            "stream sequence {} is not the ledger's event at that position",
            e.position
        );
    }
    let after = stream.info().await.expect("stream info").clone();
    let new_leader = after.cluster.as_ref().and_then(|c| c.leader.clone());
    assert!(
        new_leader.as_deref().is_some_and(|l| l != leader),
        "the stream has a new leader: {new_leader:?}"
    );

    // The lost node comes back (same name, same store) and catches up its replica.
    let back = Instant::now();
    tokio::task::block_in_place(|| cluster.start_again(&leader)).expect("restart the lost node");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = stream.info().await.expect("stream info").clone();
        let peers = info
            .cluster
            .as_ref()
            .map(|c| c.replicas.clone())
            .unwrap_or_default();
        if peers.len() == 2 && peers.iter().all(|p| p.current && !p.offline) {
            assert!(
                peers.iter().any(|p| p.name == leader),
                "{leader} is a replica again: {peers:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{leader} did not catch up within 60 s of its restart: {peers:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rejoined = back.elapsed();

    eprintln!(
        "cluster figures: burst {BURST} alerts ({} before the kill, {} after); handled by worker a {by_a}, worker b {by_b}; killed {leader} (stream leader; consumer leader {consumer_leader:?}) after {handled_at_kill} were handled; first handled event after the kill {first_after_kill:?}; all handled {drained:?} after the kill, {total:?} from the burst's start; new stream leader {new_leader:?}; stream last sequence {} = ledger head {head}; {leader} restarted and current again in {rejoined:?}",
        BURST / 2,
        BURST - BURST / 2,
        state.last_sequence
    );

    for w in [&mut worker_a, &mut worker_b] {
        assert!(w.terminate().success(), "{}", w.log());
    }
    assert!(serve.terminate().success(), "{}", serve.log());
}
