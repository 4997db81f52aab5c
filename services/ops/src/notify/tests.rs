//! Routing and composition, without any server (delivery is tested end to end against real
//! SMTP and HTTP servers in tests/e2e/notify.rs).

use backstop_events::{
    Actor, AlertRaised, AlertResolved, BackupCompleted, BackupKind, BackupMethod, Digest, Envelope,
    Event, NewEvent, ReportGenerated, Severity, now_micros, uuid_v7,
};

use super::*;

fn delivered(event: Event) -> Envelope {
    let e = NewEvent::new("alerts", Actor::worker("alerts"), &event);
    Envelope::seal(e, 1, 1, now_micros(), Digest::ZERO)
}

fn config(toml_text: &str) -> NotifyConfig {
    let c: NotifyConfig = toml::from_str(toml_text).expect("test config parses");
    c.check().expect("test config is valid");
    c
}

const CHANNELS: &str = r#"
dashboard_url = "https://backstop.example.com/"
[[channels]]
name = "all"
kind = "webhook"
url = "http://127.0.0.1:9/hook"
[[channels]]
name = "critical-orders"
kind = "email"
smtp_host = "127.0.0.1"
from = "backstop@example.com"
to = ["dba@example.com"]
min_severity = "critical"
sources = ["orders"]
[[channels]]
name = "reports-only"
kind = "webhook"
url = "http://127.0.0.1:9/reports"
events = ["reports"]
"#;

fn raised(severity: Severity, source: Option<&str>) -> Envelope {
    let s = source.unwrap_or("none");
    delivered(Event::AlertRaised(AlertRaised {
        alert_id: uuid_v7(),
        severity,
        kind: "backup_failed".into(),
        subject: s.into(),
        message: format!("backup of `{s}` failed (attempt 1): connection refused"),
        key: format!("backup_failed/{s}"),
        source: source.map(str::to_string),
    }))
}

fn names(n: &Notifier, e: &Envelope) -> Vec<String> {
    let m = n.compose(e).expect("a message");
    n.routes(&m).iter().map(|c| c.name.clone()).collect()
}

#[test]
fn failure_message_has_source_reason_and_link() {
    let n = Notifier::new(config(CHANNELS)).unwrap();
    let m = n
        .compose(&raised(Severity::Critical, Some("orders")))
        .unwrap();
    assert_eq!(m.kind, MessageKind::Alert);
    assert_eq!(m.subject, "[Backstop] CRITICAL: backup_failed orders");
    assert!(m.text.contains("Source: orders"), "{}", m.text);
    assert!(m.text.contains("connection refused"), "{}", m.text);
    assert!(
        m.text.contains("Condition: backup_failed/orders"),
        "{}",
        m.text
    );
    assert_eq!(m.link.as_deref(), Some("https://backstop.example.com/"));
    assert!(
        m.body()
            .contains("Dashboard: https://backstop.example.com/")
    );
    assert_eq!(m.key.as_deref(), Some("backup_failed/orders"));
    let body = channel::webhook_body(&m);
    assert_eq!(body["text"], m.subject);
    assert_eq!(body["attachments"][0]["color"], "#d00000");
    assert_eq!(body["backstop"]["severity"], "critical");
    assert_eq!(body["backstop"]["source"], "orders");
    assert_eq!(body["backstop"]["key"], "backup_failed/orders");
}

#[test]
fn routing_by_severity_source_and_class() {
    let n = Notifier::new(config(CHANNELS)).unwrap();
    assert_eq!(
        names(&n, &raised(Severity::Critical, Some("orders"))),
        ["all", "critical-orders"]
    );
    // Below the email channel's minimum, or another source: only the catch-all webhook.
    assert_eq!(
        names(&n, &raised(Severity::Warning, Some("orders"))),
        ["all"]
    );
    assert_eq!(
        names(&n, &raised(Severity::Critical, Some("billing"))),
        ["all"]
    );
    // An alert about no source passes a source filter.
    assert_eq!(
        names(&n, &raised(Severity::Critical, None)),
        ["all", "critical-orders"]
    );
    let report = delivered(Event::ReportGenerated(ReportGenerated {
        report: "weekly".into(),
        period_start: now_micros(),
        period_end: now_micros(),
        title: "Backstop weekly summary".into(),
        text: "7 of 7 backups succeeded".into(),
        summary: serde_json::Value::Null,
    }));
    assert_eq!(
        names(&n, &report),
        ["all", "critical-orders", "reports-only"]
    );
    let m = n.compose(&report).unwrap();
    assert_eq!(m.subject, "Backstop weekly summary");
    assert_eq!(m.text, "7 of 7 backups succeeded");
}

#[test]
fn recovery_and_success_notes() {
    let n = Notifier::new(config(CHANNELS)).unwrap();
    let resolved = delivered(Event::AlertResolved(AlertResolved {
        alert_id: uuid_v7(),
        kind: "backup_failed".into(),
        subject: "orders".into(),
        message: "a backup of `orders` succeeded".into(),
        key: "backup_failed/orders".into(),
        source: Some("orders".into()),
    }));
    let m = n.compose(&resolved).unwrap();
    assert_eq!(m.kind, MessageKind::Recovery);
    assert_eq!(m.subject, "[Backstop] RESOLVED: backup_failed orders");
    // Recoveries carry no severity: the critical-only channel still hears that it is over.
    assert_eq!(names(&n, &resolved), ["all", "critical-orders"]);
    let backup_id = uuid_v7();
    let done = delivered(Event::BackupCompleted(BackupCompleted {
        backup_id,
        source: "billing".into(),
        kind: BackupKind::Full,
        parent: None,
        method: BackupMethod::Logical,
        manifest: "m".into(),
        manifest_sha3: "00".into(),
        raw_bytes: 1000,
        stored_bytes: 400,
        new_bytes: 100,
        chunks: 3,
        new_chunks: 1,
        duration_ms: 2500,
        attempt: 1,
        tables: vec![],
    }));
    let m = n.compose(&done).unwrap();
    assert_eq!(m.kind, MessageKind::Success);
    assert_eq!(m.subject, "[Backstop] backup of billing succeeded");
    assert!(m.text.contains("Duration: 2.5 s"), "{}", m.text);
    assert_eq!(
        m.link,
        Some(format!("https://backstop.example.com/backups/{backup_id}"))
    );
    assert_eq!(names(&n, &done), ["all"]);
}

#[test]
fn config_mistakes_name_the_key() {
    let bad = |t: &str| {
        let c: NotifyConfig = toml::from_str(t).expect("parses");
        c.check().unwrap_err()
    };
    let e =
        bad("[[channels]]\nname = \"m\"\nkind = \"email\"\nsmtp_host = \"h\"\nfrom = \"a@b.c\"\n");
    assert!(
        e.contains("notify.channels[0] (m)") && e.contains("`to`"),
        "{e}"
    );
    let e = bad("[[channels]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"ftp://x\"\n");
    assert!(e.contains("notify.channels[0] (w).url"), "{e}");
    let e = bad(
        "[[channels]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"http://x\"\nto = [\"a@b.c\"]\n",
    );
    assert!(e.contains("`to` is for email channels"), "{e}");
    let e = bad(
        "[[channels]]\nname = \"m\"\nkind = \"email\"\nsmtp_host = \"h\"\nfrom = \"not an address\"\nto = [\"a@b.c\"]\n",
    );
    assert!(e.contains("(m).from"), "{e}");
    let e = toml::from_str::<NotifyConfig>(
        "[[channels]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"http://x\"\nmin_severity = \"urgent\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("urgent") && e.contains("min_severity"), "{e}");
}

#[test]
fn backoff_doubles() {
    let c = config("backoff_ms = 100\nattempts = 4\n");
    assert_eq!(c.attempts(), 4);
    assert_eq!(c.backoff(1).as_millis(), 100);
    assert_eq!(c.backoff(2).as_millis(), 200);
    assert_eq!(c.backoff(3).as_millis(), 400);
}
