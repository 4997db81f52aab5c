//! The webhook log survives `kill -9` (R15): the real binary, a local repository, a real
//! PostgreSQL 15 to replay into. 2,500 signals are POSTed by 16 concurrent senders to
//! `/webhooks/signals`; `serve` is killed with SIGKILL once about 1,200 were acknowledged; the
//! senders retry what got no answer against a restarted `serve` (as a real sender does).
//! Then: every acknowledged signal (by its sequence number and body) is in the uploaded pieces
//! (replayed from the repository alone, `--no-local`), the pieces cover the sequence numbers
//! without a gap or an overlap, and a second replay inserts nothing. A wrong token is a 401
//! recorded as `access.denied`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backstop_testkit::{Postgres, free_port};
use support::{Process, run_env, stderr, stdout};

const TOKEN: &str = "s3cret-webhook-token-0123456789";
const SIGNALS: usize = 2500;
const SENDERS: usize = 16;

struct Site {
    tmp: tempfile::TempDir,
    port: u16,
}

impl Site {
    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn env(&self) -> [(&'static str, String); 1] {
        [(
            "BACKSTOP_CONFIG",
            self.path("backstop.toml").display().to_string(),
        )]
    }

    fn run(&self, args: &[&str]) -> Output {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_env(&self.path("data"), args, &env)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "backstop {args:?} failed:\n{}\n{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    fn serve(&self) -> Process {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let p = Process::spawn(&self.path("data"), &["serve"], &env);
        p.wait_for_log("API and dashboard listening", Duration::from_secs(30));
        p
    }
}

/// One POST on a fresh connection: the status and the body, or None when the server did not
/// answer (refused, reset, killed mid-request).
fn post(port: u16, path: &str, token: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    // An empty token: none sent (the token is then in the query, or missing).
    let auth = if token.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {token}\r\n")
    };
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status: u16 = resp.split(' ').nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

fn signal(i: usize) -> String {
    format!(
        "{{\"signal\":{i},\"symbol\":\"ES\",\"side\":\"{}\",\"qty\":{}}}",
        if i.is_multiple_of(2) { "buy" } else { "sell" },
        i % 7 + 1
    )
}

/// Sends every signal in `todo` from SENDERS threads; returns the acknowledged ones as
/// (sequence, signal number), and the ones that got no answer.
fn send_all(
    port: u16,
    todo: Vec<usize>,
    acked: Arc<AtomicUsize>,
) -> (Vec<(u64, usize)>, Vec<usize>) {
    let queue = Arc::new(Mutex::new(todo));
    let done = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (queue, done, failed, acked) =
                (queue.clone(), done.clone(), failed.clone(), acked.clone());
            std::thread::spawn(move || {
                loop {
                    let Some(i) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    match post(port, "/webhooks/signals", TOKEN, &signal(i)) {
                        Some((200, body)) => {
                            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                            done.lock().unwrap().push((v["seq"].as_u64().unwrap(), i));
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Some((status, body)) if status != 503 => {
                            panic!("signal {i}: {status} {body}")
                        }
                        _ => failed.lock().unwrap().push(i),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let done = std::mem::take(&mut *done.lock().unwrap());
    let failed = std::mem::take(&mut *failed.lock().unwrap());
    (done, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_signal_survives_kill_9_and_replays_once() {
    let started = Instant::now();
    let pg = Postgres::start().unwrap();
    pg.create_db("trading").unwrap();
    let site = Site {
        tmp: tempfile::tempdir().unwrap(),
        port: free_port(),
    };
    std::fs::write(
        site.path("backstop.toml"),
        format!(
            "data_dir = {:?}\n[api]\nlisten = \"127.0.0.1:{}\"\n[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n\n[[webhooks]]\nname = \"signals\"\ntoken = {TOKEN:?}\n",
            site.path("data"),
            site.port,
            site.path("repo"),
            site.path("master.key"),
        ),
    )
    .unwrap();
    site.ok(&[
        "init",
        "--generate-key",
        site.path("master.key").to_str().unwrap(),
    ]);

    let mut serve = site.serve();
    // A wrong token: 401, nothing written, recorded with the API's other refusals.
    let (status, _) = post(site.port, "/webhooks/signals", "not-the-token-at-all", "{}").unwrap();
    assert_eq!(status, 401);
    let (status, _) = post(site.port, "/webhooks/nosuchlog", TOKEN, "{}").unwrap();
    assert_eq!(status, 404);
    let (status, _) = post(site.port, "/webhooks/signals", "", "{}").unwrap();
    assert_eq!(status, 401, "no token");
    // Past [api] max_body_bytes (64 KiB): 413, nothing written.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(70 * 1024));
    let (status, _) = post(site.port, "/webhooks/signals", TOKEN, &big).unwrap();
    assert_eq!(status, 413);
    // The token in the query, for senders that cannot set headers: accepted, sequence 1.
    let (status, body) = post(
        site.port,
        &format!("/webhooks/signals?token={TOKEN}"),
        "",
        &signal(SIGNALS),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let first: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(first["seq"], 1);

    // Phase 1: all signals, SIGKILL in the middle.
    let acked = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (port, acked) = (site.port, acked.clone());
        std::thread::spawn(move || send_all(port, (0..SIGNALS).rev().collect(), acked))
    };
    while acked.load(Ordering::SeqCst) < 1200 {
        assert!(!sender.is_finished(), "the senders ended before the kill");
        std::thread::sleep(Duration::from_millis(2));
    }
    serve.kill9();
    let (mut done, failed) = sender.join().unwrap();
    eprintln!(
        "killed after {} acknowledgements; {} signals got no answer",
        done.len(),
        failed.len()
    );
    assert!(done.len() >= 1200 && !failed.is_empty());

    // Phase 2: serve again (it uploads what the local log holds), the senders retry.
    let mut serve = site.serve();
    let (more, failed) = send_all(site.port, failed, acked.clone());
    assert!(
        failed.is_empty(),
        "signals refused after the restart: {failed:?}"
    );
    done.extend(more);
    // The tail (under 1,000 entries, before midnight) is uploaded at the next start.
    serve.kill9();
    let serve = site.serve();
    serve.wait_for_log("webhook log open", Duration::from_secs(30));

    // Every signal acknowledged, each sequence number once.
    done.push((1, SIGNALS));
    let by_seq: BTreeMap<u64, usize> = done.iter().copied().collect();
    assert_eq!(
        by_seq.len(),
        done.len(),
        "a sequence number acknowledged twice"
    );
    let signals: BTreeSet<usize> = done.iter().map(|(_, i)| *i).collect();
    assert_eq!(signals.len(), SIGNALS + 1);
    let last = *by_seq.keys().last().unwrap();

    // The pieces cover 1..=last (entries written but never acknowledged before the kill are
    // in too: at least once), without a gap or an overlap.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pieces = loop {
        let out = site.ok(&["webhook", "list", "signals", "--json"]);
        let pieces: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        let end = pieces
            .last()
            .map(|p| p["last"].as_u64().unwrap())
            .unwrap_or(0);
        if end >= last {
            break pieces;
        }
        assert!(
            Instant::now() < deadline,
            "pieces end at {end}, not {last}: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut next = 1;
    for p in &pieces {
        assert_eq!(p["first"].as_u64().unwrap(), next, "pieces: {pieces:?}");
        next = p["last"].as_u64().unwrap() + 1;
        assert!(p["entries"].as_u64().unwrap() <= 1000);
    }
    assert!(
        pieces.iter().any(|p| p["entries"] == 1000),
        "a full piece of 1,000"
    );

    // Replay from the repository alone, twice.
    let db = pg.conninfo("trading");
    let replay = |site: &Site| -> serde_json::Value {
        let out = site.ok(&[
            "webhook",
            "replay",
            "signals",
            "--from",
            "2000-01-01T00:00:00Z",
            "--to-db",
            &db,
            "--table",
            "public.signals",
            "--no-local",
            "--json",
        ]);
        serde_json::from_str(&out).unwrap()
    };
    let first = replay(&site);
    assert_eq!(first["inserted"].as_u64().unwrap(), next - 1, "{first}");
    let second = replay(&site);
    assert_eq!(second["inserted"], 0, "{second}");
    assert_eq!(second["skipped"].as_u64().unwrap(), next - 1);
    let rows = pg
        .psql(
            "trading",
            "SELECT seq || ' ' || (body_json->>'signal') FROM signals WHERE log = 'signals' ORDER BY seq",
        )
        .unwrap();
    let stored: BTreeMap<u64, usize> = rows
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (s, i) = l.trim().split_once(' ').unwrap();
            (s.parse().unwrap(), i.parse().unwrap())
        })
        .collect();
    for (seq, i) in &by_seq {
        assert_eq!(
            stored.get(seq),
            Some(i),
            "acknowledged signal {i} (seq {seq})"
        );
    }

    // The wrong token was recorded; the pieces too.
    let tail = site.ok(&["ledger", "tail", "--json"]);
    assert!(
        tail.lines()
            .any(|l| l.contains("access.denied") && l.contains("/webhooks/signals")),
        "no access.denied for the wrong token"
    );
    let sealed = tail
        .lines()
        .filter(|l| l.contains("webhook.log_sealed"))
        .count();
    assert_eq!(sealed, pieces.len(), "one webhook.log_sealed per piece");
    drop(serve);
    eprintln!("took {:?}", started.elapsed());
}
