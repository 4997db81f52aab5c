//! Notifications end to end: the `backstop` binary sends to a real SMTP server (aiosmtpd, from
//! the test kit) and a real webhook receiver (an axum server on loopback, below), and records
//! each attempt in the ledger.

mod support;

use std::time::Duration;

use backstop_events::{Actor, AlertRaised, Envelope, Event, NewEvent, Severity, uuid_v7};
use backstop_ledger::remote::RemoteLedger;
use backstop_ledger::{Appender, ExpectedVersion};
use backstop_testkit::{Nats, Smtp, SmtpTls, free_port};
use support::{Process, Webhook, run, stderr, stdout};

fn config(dir: &std::path::Path, smtp_port: u16, webhook: &str, extra: &str) -> String {
    let api_port = free_port();
    let path = dir.join("backstop.toml");
    std::fs::write(
        &path,
        format!(
            r#"[workers]
ack_wait_seconds = 2

[api]
listen = "127.0.0.1:{api_port}"

[notify]
dashboard_url = "http://dashboard.example:8080/"
attempts = 3
backoff_ms = 50
timeout_seconds = 5
{extra}
[[notify.channels]]
name = "email"
kind = "email"
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
security = "plain"
from = "Backstop <backstop@example.com>"
to = ["dba@example.com", "oncall@example.com"]
# Only alerts: the weekly summary that serve composes at start-up is not these tests' business.
events = ["alerts"]

[[notify.channels]]
name = "chat"
kind = "webhook"
url = "{webhook}"
headers = {{ X-Token = "secret" }}
events = ["alerts"]
"#
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn all_events(data_dir: &std::path::Path, cfg: &str) -> Vec<Envelope> {
    let out = run(
        data_dir,
        &["--config", cfg, "ledger", "tail", "--json", "--from", "1"],
    );
    assert!(out.status.success(), "tail failed: {}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("tail --json prints envelopes"))
        .collect()
}

fn of_type<'a>(events: &'a [Envelope], t: &str) -> Vec<&'a Envelope> {
    events.iter().filter(|e| e.event_type == t).collect()
}

async fn remote(url: &str) -> RemoteLedger {
    let client = async_nats::ConnectOptions::new()
        .max_reconnects(None)
        .connect(url)
        .await
        .expect("connect");
    RemoteLedger::new(client)
}

fn failure_alert() -> NewEvent {
    let alert = AlertRaised {
        alert_id: uuid_v7(),
        severity: Severity::Critical,
        kind: "backup_failed".into(),
        subject: "orders".into(),
        message: "backup 0190 of `orders` failed (attempt 1): pg_dump: connection refused".into(),
        key: "backup_failed/orders".into(),
        source: Some("orders".into()),
    };
    NewEvent::new(
        "alerts",
        Actor::worker("alerts"),
        &Event::AlertRaised(alert),
    )
}

async fn append_when_serving(r: &RemoteLedger, e: NewEvent) {
    for _ in 0..200 {
        if r.append("alerts", ExpectedVersion::Any, vec![e.clone()])
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("backstop serve never answered remote appends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_reaches_email_and_webhook_once_even_when_redelivered() {
    let smtp = Smtp::start().expect("aiosmtpd");
    let hook = Webhook::start();
    let nats = Nats::start().expect("nats");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), smtp.port(), &hook.url(), "");
    let mut serve = Process::spawn(
        dir.path(),
        &[
            "--config",
            &cfg,
            "serve",
            "--nats",
            &nats.url(),
            "--no-workers",
        ],
        &[],
    );
    let worker_args = [
        "--config",
        cfg.as_str(),
        "worker",
        "--nats",
        &nats.url(),
        "--only",
        "notify",
    ];
    let mut worker = Process::spawn(
        dir.path(),
        &worker_args,
        &[("BACKSTOP_FAULT_PAUSE_BEFORE_ACK_MS", "60000")],
    );
    let r = remote(&nats.url()).await;
    append_when_serving(&r, failure_alert()).await;

    // Sent on both channels and recorded; now paused before the ack: kill it there.
    worker.wait_for_log(
        "fault injection: pausing before ack",
        Duration::from_secs(60),
    );
    let mails = smtp.wait_for(1).unwrap();
    let mail = &mails[0];
    assert!(
        mail.contains("Subject: [Backstop] CRITICAL: backup_failed orders"),
        "{mail}"
    );
    assert!(mail.contains("Source: orders"), "{mail}");
    assert!(mail.contains("pg_dump: connection refused"), "{mail}");
    assert!(
        mail.contains("Dashboard: http://dashboard.example:8080/"),
        "{mail}"
    );
    assert!(
        mail.contains("X-Envelope-To: dba@example.com, oncall@example.com"),
        "{mail}"
    );
    let bodies = hook.wait_for(1);
    let body = &bodies[0];
    assert_eq!(body["text"], "[Backstop] CRITICAL: backup_failed orders");
    assert_eq!(body["attachments"][0]["color"], "#d00000");
    assert!(
        body["attachments"][0]["text"]
            .as_str()
            .unwrap()
            .contains("connection refused")
    );
    assert_eq!(body["backstop"]["severity"], "critical");
    assert_eq!(body["backstop"]["source"], "orders");
    assert_eq!(body["backstop"]["key"], "backup_failed/orders");
    assert_eq!(body["backstop"]["link"], "http://dashboard.example:8080/");
    worker.kill9();

    // The redelivered alert finds both notification.sent events (in JetStream) and sends nothing.
    let again = Process::spawn(dir.path(), &worker_args, &[]);
    again.wait_for_log("redelivered event handled", Duration::from_secs(60));
    assert!(
        again.log().contains("already notified; not sent again"),
        "{}",
        again.log()
    );
    drop(again);
    assert_eq!(smtp.messages().unwrap().len(), 1, "exactly one email");
    assert_eq!(hook.bodies().len(), 1, "exactly one webhook call");
    assert!(serve.terminate().success());

    let events = all_events(dir.path(), &cfg);
    let sent = of_type(&events, "notification.sent");
    assert_eq!(sent.len(), 2, "one per channel: {sent:?}");
    let alert = of_type(&events, "alert.raised")[0];
    for s in &sent {
        assert_eq!(s.payload["cause"], alert.id.to_string());
        assert_eq!(s.payload["attempt"], 1);
        assert_eq!(s.payload["key"], "backup_failed/orders");
        assert_eq!(s.causation_id, Some(alert.id));
    }
    let mut channels: Vec<&str> = sent
        .iter()
        .map(|s| s.payload["channel"].as_str().unwrap())
        .collect();
    channels.sort();
    assert_eq!(channels, ["chat", "email"]);
    assert!(of_type(&events, "notification.failed").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_smtp_is_retried_and_recorded_and_the_webhook_still_delivers() {
    let hook = Webhook::start();
    let nats = Nats::start().expect("nats");
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on this port: every connection is refused.
    let dead = free_port();
    let cfg = config(dir.path(), dead, &hook.url(), "");
    // All workers in serve, the notifier with the ledger as its lookup.
    let mut serve = Process::spawn(
        dir.path(),
        &["--config", &cfg, "serve", "--nats", &nats.url()],
        &[],
    );
    let r = remote(&nats.url()).await;
    append_when_serving(&r, failure_alert()).await;
    let bodies = hook.wait_for(1);
    assert_eq!(bodies[0]["backstop"]["source"], "orders");
    assert_eq!(bodies[0]["backstop"]["kind"], "alert");
    serve.wait_for_log("last=true", Duration::from_secs(60));
    assert!(serve.terminate().success());

    let events = all_events(dir.path(), &cfg);
    let alert = of_type(&events, "alert.raised")[0];
    let cause = alert.id.to_string();
    // Only the alert's notifications: a recovery note may follow if the alert monitor clears
    // the condition (it has no failed backup of `orders` behind it).
    let failed: Vec<_> = of_type(&events, "notification.failed")
        .into_iter()
        .filter(|e| e.payload["cause"] == cause)
        .collect();
    assert_eq!(failed.len(), 3, "three attempts: {failed:?}");
    for (i, f) in failed.iter().enumerate() {
        assert_eq!(f.payload["channel"], "email");
        assert_eq!(f.payload["attempt"], i as u64 + 1);
        assert_eq!(f.payload["transient"], true);
        assert_eq!(f.payload["last"], i == 2);
        assert!(
            f.payload["reason"]
                .as_str()
                .unwrap()
                .contains("cannot reach smtp://127.0.0.1"),
            "{}",
            f.payload
        );
    }
    let sent: Vec<_> = of_type(&events, "notification.sent")
        .into_iter()
        .filter(|e| e.payload["cause"] == cause)
        .collect();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].payload["channel"], "chat");
    // Nothing lost: the alert and every failed attempt are in the ledger, and the webhook got
    // the alert once.
    assert_eq!(of_type(&events, "alert.raised").len(), 1);
    let alerts = hook
        .bodies()
        .into_iter()
        .filter(|b| b["backstop"]["kind"] == "alert")
        .count();
    assert_eq!(alerts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_test_sends_to_every_channel_and_fails_for_a_dead_one() {
    let smtp = Smtp::start().expect("aiosmtpd");
    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), smtp.port(), &hook.url(), "");
    let out = run(dir.path(), &["--config", &cfg, "notify", "test"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("email: ok"), "{text}");
    assert!(text.contains("chat: ok"), "{text}");
    let mails = smtp.wait_for(1).unwrap();
    assert!(
        mails[0].contains("Subject: [Backstop] test notification"),
        "{}",
        mails[0]
    );
    assert_eq!(hook.wait_for(1)[0]["backstop"]["kind"], "test");
    let events = all_events(dir.path(), &cfg);
    assert_eq!(of_type(&events, "notification.sent").len(), 2);

    let dead = free_port();
    let cfg = config(dir.path(), dead, &hook.url(), "");
    let out = run(dir.path(), &["--config", &cfg, "notify", "test"]);
    assert!(!out.status.success(), "a dead channel fails the command");
    let text = stdout(&out);
    assert!(text.contains("email: FAILED after 3 attempt(s)"), "{text}");
    assert!(text.contains("cannot reach smtp://127.0.0.1"), "{text}");
    assert!(text.contains("chat: ok"), "{text}");
    let events = all_events(dir.path(), &cfg);
    assert_eq!(of_type(&events, "notification.failed").len(), 3);
}

fn email_only(dir: &std::path::Path, name: &str, host: &str, port: u16, tls: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"[notify]
attempts = 3
backoff_ms = 20
timeout_seconds = 10

[[notify.channels]]
name = "{name}"
kind = "email"
smtp_host = "{host}"
smtp_port = {port}
from = "backstop@example.com"
to = ["dba@example.com"]
{tls}
"#
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn starttls_and_tls_deliver_with_the_configured_ca_and_a_tls_mismatch_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, security, host) in [
        (SmtpTls::Starttls, "starttls", "localhost"),
        (SmtpTls::Implicit, "tls", "127.0.0.1"),
    ] {
        let smtp = Smtp::start_tls(mode).expect("aiosmtpd with TLS");
        let ca = smtp.ca_file();
        let cfg = email_only(
            dir.path(),
            security,
            host,
            smtp.port(),
            &format!("security = \"{security}\"\nca_file = \"{}\"", ca.display()),
        );
        let out = run(dir.path(), &["--config", &cfg, "notify", "test"]);
        assert!(
            out.status.success(),
            "{security}: {}\n{}",
            stdout(&out),
            stderr(&out)
        );
        assert!(
            stdout(&out).contains(&format!("{security}: ok")),
            "{}",
            stdout(&out)
        );
        let mails = smtp.wait_for(1).unwrap();
        assert!(
            mails[0].contains("Subject: [Backstop] test notification"),
            "{}",
            mails[0]
        );

        // Without the CA the certificate does not verify: a TLS failure, permanent, tried once.
        let cfg = email_only(
            dir.path(),
            &format!("{security}-untrusted"),
            host,
            smtp.port(),
            &format!("security = \"{security}\""),
        );
        let out = run(dir.path(), &["--config", &cfg, "notify", "test"]);
        assert!(!out.status.success());
        let text = stdout(&out);
        assert!(text.contains("FAILED after 1 attempt(s)"), "{text}");
        assert!(text.contains("TLS with smtp://"), "{text}");
        assert_eq!(smtp.messages().unwrap().len(), 1);
    }

    // TLS from the first byte against a server that speaks plain SMTP: not retried either.
    let plain = Smtp::start().expect("aiosmtpd");
    let cfg = email_only(
        dir.path(),
        "mismatch",
        "127.0.0.1",
        plain.port(),
        "security = \"tls\"",
    );
    let out = run(dir.path(), &["--config", &cfg, "notify", "test"]);
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("mismatch: FAILED after 1 attempt(s): TLS with smtp://"),
        "{text}"
    );
    let events = all_events(dir.path(), &cfg);
    let failed = of_type(&events, "notification.failed");
    assert!(
        failed
            .iter()
            .all(|f| f.payload["transient"] == false && f.payload["last"] == true),
        "{failed:?}"
    );
    assert_eq!(of_type(&events, "notification.sent").len(), 2);
}
