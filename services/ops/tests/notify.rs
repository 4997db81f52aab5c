//! The notifier's exactly-once bookkeeping on a real ledger, against a real SMTP server
//! (aiosmtpd from the test kit): a second delivery of the same event finds its
//! `notification.sent` and sends nothing; a send recorded first by a concurrent worker (the same
//! id with other content) is taken as recorded, not as a failure.

use async_trait::async_trait;
use backstop_events::{Actor, AlertRaised, Envelope, Event, NewEvent, Severity, streams, uuid_v7};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig, LedgerError};
use backstop_ops::notify::{EventLookup, Notifier, NotifyConfig, Outcome, sent_id};
use backstop_testkit::Smtp;
use uuid::Uuid;

fn notifier(smtp: &Smtp) -> Notifier {
    let config: NotifyConfig = toml::from_str(&format!(
        r#"attempts = 2
backoff_ms = 10
[[channels]]
name = "email"
kind = "email"
smtp_host = "127.0.0.1"
smtp_port = {}
security = "plain"
from = "backstop@example.com"
to = ["dba@example.com"]
"#,
        smtp.port()
    ))
    .unwrap();
    Notifier::new(config).unwrap()
}

async fn raised(ledger: &Ledger) -> Envelope {
    let e = NewEvent::new(
        streams::alerts(),
        Actor::worker("alerts"),
        &Event::AlertRaised(AlertRaised {
            alert_id: uuid_v7(),
            severity: Severity::Critical,
            kind: "backup_failed".into(),
            subject: "orders".into(),
            message: "backup of `orders` failed: disk full".into(),
            key: "backup_failed/orders".into(),
            source: Some("orders".into()),
        }),
    );
    let id = e.id;
    ledger
        .append(&streams::alerts(), ExpectedVersion::Any, vec![e])
        .await
        .unwrap();
    let position = ledger.store().position_of(id).unwrap().unwrap();
    ledger.store().get(position).unwrap().unwrap()
}

/// A lookup that has not seen anything yet (a worker that looked before the other one wrote).
struct Blind;

#[async_trait]
impl EventLookup for Blind {
    async fn contains(&self, _id: Uuid) -> Result<bool, LedgerError> {
        Ok(false)
    }
}

#[tokio::test]
async fn a_second_delivery_of_the_same_event_sends_nothing() {
    let smtp = Smtp::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let n = notifier(&smtp);
    let cause = raised(&ledger).await;
    let actor = Actor::worker("notify");
    let first = n.deliver(&cause, &actor, &ledger, &ledger).await.unwrap();
    assert_eq!(first, [("email".to_string(), Outcome::Sent { attempt: 1 })]);
    let again = n.deliver(&cause, &actor, &ledger, &ledger).await.unwrap();
    assert_eq!(again, [("email".to_string(), Outcome::AlreadySent)]);
    let mails = smtp.wait_for(1).unwrap();
    assert_eq!(mails.len(), 1);
    assert!(mails[0].contains("disk full"), "{}", mails[0]);
    assert!(
        ledger
            .store()
            .position_of(sent_id(&cause, "email"))
            .unwrap()
            .is_some()
    );
    ledger.close().await;
}

#[tokio::test]
async fn a_send_recorded_first_by_a_concurrent_worker_is_not_a_failure() {
    let smtp = Smtp::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let n = notifier(&smtp);
    let cause = raised(&ledger).await;
    let actor = Actor::worker("notify");
    // The other worker: its own send, recorded under the same derived id.
    let other = n.deliver(&cause, &actor, &ledger, &Blind).await.unwrap();
    assert_eq!(other, [("email".to_string(), Outcome::Sent { attempt: 1 })]);
    // This one looked before that append landed, sent too, and meets the id with other content.
    let this = n.deliver(&cause, &actor, &ledger, &Blind).await.unwrap();
    assert_eq!(this, [("email".to_string(), Outcome::Sent { attempt: 1 })]);
    assert_eq!(smtp.wait_for(2).unwrap().len(), 2, "the race's duplicate");
    ledger.close().await;
}
