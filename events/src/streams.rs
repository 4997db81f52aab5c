//! Stream ids: which events share an ordering and a version sequence.
//!
//! A stream is the unit of optimistic concurrency: an append names the version it expects the
//! stream to be at. One stream per backup keeps a backup's lifecycle (requested, started,
//! completed, verified, deleted) ordered; one per source orders that source's backups.

use uuid::Uuid;

pub fn backup(id: Uuid) -> String {
    format!("backup-{id}")
}
pub fn source(name: &str) -> String {
    format!("source-{name}")
}
pub fn keys(purpose: &str) -> String {
    format!("keys-{purpose}")
}
pub fn export(id: Uuid) -> String {
    format!("export-{id}")
}
/// A webhook log's sealed pieces (`webhook.log_sealed`, `webhook.log_deleted`).
pub fn webhook(name: &str) -> String {
    format!("webhook-{name}")
}
pub fn recovery(id: Uuid) -> String {
    format!("recovery-{id}")
}
pub fn repository() -> String {
    "repository".to_string()
}
pub fn schedule(name: &str) -> String {
    format!("schedule-{name}")
}
pub fn alerts() -> String {
    "alerts".to_string()
}
pub fn health(endpoint: &str) -> String {
    let safe: String = endpoint
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(180)
        .collect();
    format!("health-{safe}")
}
pub fn storage() -> String {
    "storage".to_string()
}
pub fn wal(timeline: u32) -> String {
    format!("wal-{timeline:08X}")
}
/// A git source's syncs (`git.mirrored`, `git.diverged`, `git.mirror_failed`).
pub fn git(source: &str) -> String {
    format!("git-{source}")
}
pub fn drill(id: Uuid) -> String {
    format!("drill-{id}")
}
/// An offline copy's start and end (`copy.started`, `copy.completed`, `copy.failed`).
pub fn copy(id: Uuid) -> String {
    format!("copy-{id}")
}
/// A backup set's start and end (`set.started`, `set.completed`).
pub fn set(id: Uuid) -> String {
    format!("set-{id}")
}
pub fn workers() -> String {
    "workers".to_string()
}
pub fn access() -> String {
    "access".to_string()
}
/// Notifications sent or failed, with the alert or event that caused them.
pub fn notifications() -> String {
    "notifications".to_string()
}
/// Periodic reports (`report.generated`).
pub fn reports() -> String {
    "reports".to_string()
}
