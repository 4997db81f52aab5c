//! What the alert rules know: the ledger's events folded into the latest facts per source,
//! backup, endpoint, backend and repository.
//!
//! Invariants:
//! - Only the newest fact of each kind is kept (the last outcome of a source, the last check of an
//!   endpoint), plus what a rule compares with (the two newest comparable backup sizes) and what
//!   is still running. Memory grows with the number of sources, endpoints and running jobs, never
//!   with the length of the ledger.
//! - Every fact keeps the id and time of the event it comes from: an alert's id is derived from
//!   them, so two monitors reading the same ledger raise the same alert under the same id.

use std::collections::{BTreeMap, HashMap};

use backstop_events::{BackupKind, BackupMethod, Envelope, Event, HealthState, Severity};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// An event a fact comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cause {
    pub event_id: Uuid,
    pub at: DateTime<Utc>,
}

impl Cause {
    fn of(e: &Envelope) -> Cause {
        Cause {
            event_id: e.id,
            at: e.occurred_at,
        }
    }
}

/// The newest ending of a source's backups.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Completed,
    Failed { backup_id: Uuid, reason: String },
}

/// One completed backup's size, for the size-change rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Sized {
    pub backup_id: Uuid,
    pub raw_bytes: u64,
    pub cause: Cause,
}

/// The newest verification verdict on a source's backups.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub backup_id: Uuid,
    pub passed: bool,
    pub reason: String,
    pub cause: Cause,
}

#[derive(Clone, Debug, Default)]
pub struct SourceFacts {
    /// The first event that named the source: the clock of "no success yet" starts there.
    pub first_seen: Option<Cause>,
    pub last_completed: Option<Cause>,
    pub last_outcome: Option<(Outcome, Cause)>,
    /// The two newest sizes per (method, kind): a size is compared with the one before it.
    pub sizes: BTreeMap<(String, String), (Option<Sized>, Sized)>,
    pub verdict: Option<Verdict>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Running {
    pub source: String,
    pub started: Cause,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EndpointFacts {
    pub state: HealthState,
    pub latency_ms: u64,
    pub error: Option<String>,
    pub cause: Cause,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendFacts {
    pub ok: bool,
    pub error: Option<String>,
    pub cause: Cause,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Usage {
    pub region: String,
    pub storage_class: String,
    pub bytes: u64,
    pub cause: Cause,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    pub consumer: String,
    pub event_type: String,
    pub position: u64,
    pub deliveries: u32,
    pub error: String,
    pub cause: Cause,
}

/// An alert raised and not yet resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenAlert {
    pub alert_id: Uuid,
    pub severity: Severity,
    pub message: String,
    pub kind: String,
    pub subject: String,
    pub source: Option<String>,
    pub raised: Cause,
}

#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub sources: BTreeMap<String, SourceFacts>,
    /// Backup id -> source, for verdicts (which name only the backup).
    pub backup_sources: HashMap<Uuid, String>,
    pub running: BTreeMap<Uuid, Running>,
    pub endpoints: BTreeMap<String, EndpointFacts>,
    pub backends: BTreeMap<String, BackendFacts>,
    /// Per repository, per (region, class): the newest usage sample.
    pub usage: BTreeMap<String, BTreeMap<(String, String), Usage>>,
    /// Per source, the newest `wal.archiver_checked`.
    pub archivers: BTreeMap<String, (backstop_events::WalArchiverChecked, Cause)>,
    /// The newest `wal.archived`, if WAL was ever archived.
    pub last_wal: Option<Cause>,
    /// Dead-lettered events, by alert key, until an operator resolves their alert.
    pub dead_letters: BTreeMap<String, DeadLetter>,
    /// Per source, its last table export when that one failed (export id, reason); a completed
    /// export clears it.
    pub failed_exports: BTreeMap<String, (Uuid, String, Cause)>,
    /// Per source, its last DR drill when that one failed (drill id, reason); a passed drill
    /// clears it.
    pub failed_drills: BTreeMap<String, (Uuid, String, Cause)>,
    /// Per git source, the newest sync when it did not end mirrored: diverged (the refs that
    /// differ, summarised) or failed (the reason). A `git.mirrored` clears it.
    pub git_mirrors: BTreeMap<String, (GitTrouble, Cause)>,
    /// Per replica, the newest `replication.lag_measured` (lag in seconds).
    pub replication_lag: BTreeMap<String, (u64, Cause)>,
    /// Open alerts by key, as the ledger records them.
    pub open: BTreeMap<String, OpenAlert>,
    /// How many times each key was raised: part of the next raise's id, so a condition that
    /// returns after it was resolved is a new alert, never swallowed as a duplicate of the old.
    pub raised_count: HashMap<String, u64>,
}

/// What is wrong with a git source's mirror (see [`Facts::git_mirrors`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GitTrouble {
    /// The newest sync left these refs different on the mirror.
    Diverged { mirror: String, refs: Vec<String> },
    /// The newest sync could not finish.
    Failed { mirror: String, reason: String },
}

/// The alert key of a dead-lettered event.
pub fn dead_letter_key(consumer: &str, event_id: Uuid) -> String {
    format!("event_dead_lettered/{consumer}/{event_id}")
}

impl Facts {
    fn source(&mut self, name: &str, cause: Cause) -> &mut SourceFacts {
        let s = self.sources.entry(name.to_string()).or_default();
        s.first_seen.get_or_insert(cause);
        s
    }

    /// Folds one event in. Events of other types, and events that do not decode, change nothing:
    /// the monitor must keep going past anything the ledger holds.
    pub fn observe(&mut self, e: &Envelope) {
        let interesting = matches!(
            e.event_type.as_str(),
            "backup.requested"
                | "backup.started"
                | "backup.completed"
                | "backup.failed"
                | "backup.skipped"
                | "verification.passed"
                | "verification.failed"
                | "health.checked"
                | "storage.connectivity_checked"
                | "storage.usage_sampled"
                | "wal.archived"
                | "replication.lag_measured"
                | "wal.archiver_checked"
                | "worker.dead_lettered"
                | "export.completed"
                | "export.failed"
                | "drill.completed"
                | "git.mirrored"
                | "git.diverged"
                | "git.mirror_failed"
                | "alert.raised"
                | "alert.resolved"
        );
        if !interesting {
            return;
        }
        let Ok(event) = e.event() else {
            tracing::warn!(position = e.position, event_type = %e.event_type, "alert monitor: cannot decode event; skipped");
            return;
        };
        let cause = Cause::of(e);
        match event {
            Event::BackupRequested(r) => {
                self.backup_sources.insert(r.backup_id, r.source.clone());
                self.source(&r.source, cause);
            }
            Event::BackupStarted(s) => {
                self.backup_sources.insert(s.backup_id, s.source.clone());
                self.source(&s.source, cause);
                self.running.insert(
                    s.backup_id,
                    Running {
                        source: s.source,
                        started: cause,
                    },
                );
            }
            Event::BackupCompleted(c) => {
                self.running.remove(&c.backup_id);
                self.backup_sources.insert(c.backup_id, c.source.clone());
                let s = self.source(&c.source, cause);
                s.last_completed = Some(cause);
                s.last_outcome = Some((Outcome::Completed, cause));
                let class = (method_name(c.method).to_string(), kind_name(c.kind));
                let now = Sized {
                    backup_id: c.backup_id,
                    raw_bytes: c.raw_bytes,
                    cause,
                };
                let prev = s.sizes.remove(&class).map(|(_, newest)| newest);
                s.sizes.insert(class, (prev, now));
            }
            // A configuration source confirmed unchanged since a completed backup is as fresh
            // as of the skip: it restarts the staleness clock (the outcome is left as it was).
            Event::BackupSkipped(k) => {
                self.running.remove(&k.backup_id);
                self.backup_sources.insert(k.backup_id, k.source.clone());
                let s = self.source(&k.source, cause);
                s.last_completed = Some(cause);
            }
            Event::BackupFailed(f) => {
                self.running.remove(&f.backup_id);
                let s = self.source(&f.source, cause);
                s.last_outcome = Some((
                    Outcome::Failed {
                        backup_id: f.backup_id,
                        reason: f.reason,
                    },
                    cause,
                ));
            }
            Event::VerificationPassed(v) => self.verdict(v.backup_id, true, String::new(), cause),
            Event::VerificationFailed(v) => {
                let tables: Vec<String> = v
                    .tables
                    .iter()
                    .filter(|t| t.expected != t.restored)
                    .map(|t| {
                        format!(
                            "{}.{} {} expected, {} restored",
                            t.schema, t.table, t.expected, t.restored
                        )
                    })
                    .collect();
                let reason = if tables.is_empty() {
                    v.reason
                } else {
                    format!("{} (tables: {})", v.reason, tables.join(", "))
                };
                self.verdict(v.backup_id, false, reason, cause)
            }
            Event::HealthChecked(h) => {
                self.endpoints.insert(
                    h.endpoint,
                    EndpointFacts {
                        state: h.state,
                        latency_ms: h.latency_ms,
                        error: h.error,
                        cause,
                    },
                );
            }
            Event::StorageConnectivityChecked(c) => {
                self.backends.insert(
                    c.backend,
                    BackendFacts {
                        ok: c.ok,
                        error: c.error,
                        cause,
                    },
                );
            }
            Event::StorageUsageSampled(u) => {
                self.usage.entry(u.repository).or_default().insert(
                    (u.region.clone(), u.storage_class.clone()),
                    Usage {
                        region: u.region,
                        storage_class: u.storage_class,
                        bytes: u.bytes,
                        cause,
                    },
                );
            }
            Event::ExportCompleted(c) => {
                self.failed_exports.remove(&c.source);
            }
            Event::ExportFailed(f) => {
                self.failed_exports
                    .insert(f.source, (f.export_id, f.reason, cause));
            }
            Event::DrillCompleted(d) if d.passed => {
                self.failed_drills.remove(&d.source);
            }
            Event::DrillCompleted(d) => {
                self.failed_drills
                    .insert(d.source, (d.drill_id, d.reason, cause));
            }
            Event::GitMirrored(m) => {
                self.git_mirrors.remove(&m.source);
            }
            Event::GitDiverged(d) => {
                let refs: Vec<String> = d.diverged.iter().map(|r| r.name.clone()).collect();
                let trouble = GitTrouble::Diverged {
                    mirror: d.mirror,
                    refs,
                };
                self.git_mirrors.insert(d.source, (trouble, cause));
            }
            Event::GitMirrorFailed(f) => {
                let trouble = GitTrouble::Failed {
                    mirror: f.mirror,
                    reason: f.reason,
                };
                self.git_mirrors.insert(f.source, (trouble, cause));
            }
            Event::ReplicationLagMeasured(l) => {
                self.replication_lag
                    .insert(l.region, (l.lag_seconds, cause));
            }
            Event::WalArchived(_) => self.last_wal = Some(cause),
            Event::WalArchiverChecked(c) => {
                self.archivers.insert(c.source.clone(), (c, cause));
            }
            Event::WorkerDeadLettered(d) => {
                let key = dead_letter_key(&d.consumer, d.event_id);
                // A dead letter whose alert an operator already resolved stays resolved.
                self.dead_letters.insert(
                    key,
                    DeadLetter {
                        consumer: d.consumer,
                        event_type: d.event_type,
                        position: d.position,
                        deliveries: d.deliveries,
                        error: d.error,
                        cause,
                    },
                );
            }
            Event::AlertRaised(a) if !a.key.is_empty() => {
                *self.raised_count.entry(a.key.clone()).or_default() += 1;
                self.open.insert(
                    a.key,
                    OpenAlert {
                        alert_id: a.alert_id,
                        severity: a.severity,
                        message: a.message,
                        kind: a.kind,
                        subject: a.subject,
                        source: a.source,
                        raised: cause,
                    },
                );
            }
            Event::AlertResolved(r) if !r.key.is_empty() => {
                self.open.remove(&r.key);
                // Resolving a dead letter's alert is how an operator says it was dealt with.
                self.dead_letters.remove(&r.key);
            }
            _ => {}
        }
    }

    /// The open alerts with their keys, critical first, then oldest first (ties in key order):
    /// the order `backstop alerts` and the weekly summary list them in.
    pub fn open_by_urgency(&self) -> Vec<(&String, &OpenAlert)> {
        let mut open: Vec<_> = self.open.iter().collect();
        open.sort_by_key(|(_, a)| (std::cmp::Reverse(a.severity as u8), a.raised.at));
        open
    }

    fn verdict(&mut self, backup_id: Uuid, passed: bool, reason: String, cause: Cause) {
        let Some(source) = self.backup_sources.get(&backup_id).cloned() else {
            return;
        };
        self.source(&source, cause).verdict = Some(Verdict {
            backup_id,
            passed,
            reason,
            cause,
        });
    }
}

fn method_name(m: BackupMethod) -> &'static str {
    match m {
        BackupMethod::Logical => "logical",
        BackupMethod::Physical => "physical",
        BackupMethod::Command => "command",
        BackupMethod::Redis => "redis",
        BackupMethod::Files => "files",
        BackupMethod::Git => "git",
        BackupMethod::Config => "config",
    }
}

fn kind_name(k: BackupKind) -> String {
    k.as_str().to_string()
}
