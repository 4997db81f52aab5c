//! What the dashboard and audit end-to-end tests share: a tiny HTTP/1.1 client over a TCP
//! stream (no client library needed), a ledger filled with realistic events before `serve`
//! starts, and a `backstop serve` with the API on a free port.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backstop_events::NewEvent;
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig};

pub const OPERATOR: &str = "operator-token-e2e-0123456789";
pub const AUDITOR: &str = "auditor-token-e2e-0123456789";
pub const LEAD: &str = "lead-token-e2e-0123456789abcd";

/// Sends one request and returns (status, body).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n..];
        s = s.strip_prefix("\r\n").unwrap_or(s);
    }
    out
}

/// Appends events to the ledger in `data_dir` (serve must not be running), grouping
/// consecutive events of one stream into one append.
pub async fn fill_ledger(data_dir: &Path, events: Vec<NewEvent>, checkpoint_every: u64) {
    let mut cfg = LedgerConfig::in_data_dir(data_dir);
    cfg.checkpoint_every = checkpoint_every;
    let ledger = Ledger::open(&cfg).expect("open the ledger");
    let mut group: Vec<NewEvent> = Vec::new();
    for e in events {
        if group.first().is_some_and(|g| g.stream != e.stream) {
            let stream = group[0].stream.clone();
            ledger
                .append(&stream, ExpectedVersion::Any, std::mem::take(&mut group))
                .await
                .expect("append");
        }
        group.push(e);
    }
    if let Some(first) = group.first() {
        let stream = first.stream.clone();
        ledger
            .append(&stream, ExpectedVersion::Any, group)
            .await
            .expect("append");
    }
    ledger.close().await;
}

/// Writes `backstop.toml` and a tokens file in `dir`; returns the config path.
pub fn write_config(dir: &Path, public_dashboard: bool) -> PathBuf {
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        format!("alice operator {OPERATOR}\naudrey auditor {AUDITOR}\nlee recovery-lead {LEAD}\n"),
    )
    .unwrap();
    let config = dir.join("backstop.toml");
    std::fs::write(
        &config,
        format!(
            "[ledger]\ncheckpoint_seconds = 1\n\n[api]\npublic_dashboard = {public_dashboard}\ntokens_file = \"{}\"\n\n\
             # The sample's `reference` source, scheduled (no repository here: nothing runs).\n\
             [[sources]]\nname = \"reference\"\npostgres = \"postgres://backup@127.0.0.1:1/reference\"\n\n\
             [[schedules]]\nname = \"reference-nightly\"\nsource = \"reference\"\n",
            tokens.display()
        ),
    )
    .unwrap();
    config
}

/// Polls `GET path` until `ok(status, body)` or the deadline.
pub fn wait_http(
    port: u16,
    path: &str,
    token: Option<&str>,
    what: &str,
    ok: impl Fn(u16, &str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = String::new();
    while Instant::now() < deadline {
        match http(port, "GET", path, token, None) {
            Ok((s, b)) if ok(s, &b) => return b,
            Ok((s, b)) => last = format!("{s}: {}", b.chars().take(500).collect::<String>()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what}: not reached within 90 s; last answer: {last}");
}

/// Where test artifacts (screenshots) are kept: `target/artifacts/`.
pub fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("artifacts");
    std::fs::create_dir_all(&dir).expect("create target/artifacts");
    dir
}

/// Headless Chromium (Debian's `chromium`) on `url` with a throwaway profile, offline.
pub fn chromium(args: &[&str], url: &str) -> std::process::Output {
    let chromium = backstop_testkit::require_tool("chromium").expect("chromium");
    let profile = tempfile::tempdir().unwrap();
    std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium")
}
