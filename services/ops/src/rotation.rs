//! Key rotation, re-encryption and retirement, with their events.
//!
//! - [`rotate`]: a new version of each purpose's key (`Repository::rotate_key`), recorded as
//!   `key.rotated` on the purpose's key stream (`keys-<purpose>`).
//! - [`reencrypt`]: starts the re-encryption job, or resumes the unfinished one
//!   (`backstop_repo::reencrypt`: crash safety, coexistence with backups, restores, prune and
//!   object lock are documented there), and records `reencryption.started` (once per job: every
//!   run appends it with the same id, so a first run killed before its append is covered),
//!   `reencryption.progressed` per backup checkpointed, then `reencryption.completed` or
//!   `reencryption.failed`, all on the `repository` stream.
//! - [`retire`]: retires versions nothing is sealed with (after the object-lock hold), recorded
//!   as `key.retired`.
//! - [`rotation_due`] / [`rotate_if_due`]: the 90-day default. With `[keys] rotate_after_days`
//!   (default 90), a purpose whose current version is older than that is rotated, and the job
//!   re-seals every backup. Only the purposes backups are sealed with ([`SCHEDULED_PURPOSES`]:
//!   database, files) are rotated by the schedule; the others (wal, export, config, ledger) by
//!   `backstop key rotate --purpose` (a WAL key file exported to a database host keeps sealing
//!   with its version until it is exported again).
//!
//! Event ids derive from the job id and the run's time (`crate::record`): a retried append stores
//! nothing twice, and a resumed run (another time) records its own progress events.

use std::sync::Arc;

use backstop_events::{
    Actor, Event, KeyRetired, KeyRotated, ReencryptionCompleted, ReencryptionFailed,
    ReencryptionProgressed, ReencryptionStarted, streams,
};
use backstop_ledger::Appender;
use backstop_repo::reencrypt::ReencryptionState;
use backstop_repo::{
    KeyInfo, KeyPurpose, KeyRotation, ReencryptOptions, ReencryptReport, ReencryptStep, Repository,
    RetireOptions, RetireReport,
};
use chrono::{DateTime, Utc};

use crate::error::OpsError;
use crate::record::record;

/// The default age at which the schedule rotates a key: 90 days.
pub const DEFAULT_ROTATE_AFTER_DAYS: u32 = 90;

/// The purposes the schedule rotates (those backups are sealed with, which the job re-seals).
pub const SCHEDULED_PURPOSES: [KeyPurpose; 2] = [KeyPurpose::Database, KeyPurpose::Files];

/// The purposes among `purposes` whose current version was created more than `rotate_after`
/// before `now`.
pub fn rotation_due(
    keys: &[KeyInfo],
    purposes: &[KeyPurpose],
    now: DateTime<Utc>,
    rotate_after: chrono::Duration,
) -> Vec<KeyPurpose> {
    purposes
        .iter()
        .copied()
        .filter(|p| {
            keys.iter()
                .filter(|k| k.purpose == *p)
                .max_by_key(|k| k.version)
                .is_some_and(|current| current.created_at + rotate_after <= now)
        })
        .collect()
}

/// Rotates each purpose at `now` (the new versions' creation time) and records `key.rotated`
/// for each.
pub async fn rotate(
    repo: &Repository,
    appender: &dyn Appender,
    purposes: &[KeyPurpose],
    actor: &Actor,
    now: DateTime<Utc>,
) -> Result<Vec<KeyRotation>, OpsError> {
    let mut out = Vec::new();
    for p in purposes {
        let r = repo.rotate_key_at(*p, now).await?;
        let stream = streams::keys(p.as_str());
        let subject = backstop_events::uuid_v7_derived(
            uuid::Uuid::from_u128(r.new.version as u128),
            r.new.created_at,
            &r.new.key_id,
        );
        record(
            appender,
            &stream,
            actor,
            None,
            r.new.created_at,
            "key-rotated",
            subject,
            Event::KeyRotated(KeyRotated {
                purpose: p.as_str().to_string(),
                old_key_id: r.old.key_id.clone(),
                new_key_id: r.new.key_id.clone(),
                version: r.new.version,
            }),
        )
        .await?;
        tracing::info!(purpose = %p, old = %r.old.key_id, new = %r.new.key_id, "key rotated");
        out.push(r);
    }
    Ok(out)
}

fn started_event(st: &ReencryptionState, from: &[KeyInfo]) -> Event {
    let to = st
        .targets
        .get(&KeyPurpose::Database)
        .cloned()
        .unwrap_or_default();
    // The versions being replaced: every older version of a target purpose.
    let from_ids: Vec<String> = from
        .iter()
        .filter(|k| st.targets.get(&k.purpose).is_some_and(|t| t != &k.key_id))
        .map(|k| k.key_id.clone())
        .collect();
    let purposes: Vec<&str> = st.targets.keys().map(|p| p.as_str()).collect();
    Event::ReencryptionStarted(ReencryptionStarted {
        job_id: st.job_id,
        purpose: purposes.join(","),
        from_key_id: from_ids.join(","),
        to_key_id: to,
        backups: st.backups_total,
    })
}

fn progressed_event(s: &ReencryptStep) -> Event {
    Event::ReencryptionProgressed(ReencryptionProgressed {
        job_id: s.job_id,
        backup_id: s.backup_id,
        objects: s.chunks_resealed,
        bytes: s.bytes_resealed,
        manifest_sha3: s.manifest_sha3.map(|h| h.to_hex()).unwrap_or_default(),
        backups_done: s.backups_done,
        backups_total: s.backups_total,
    })
}

/// Runs the re-encryption job to its end (resuming the unfinished one, if any) and records its
/// events. `opts.job_id` names a new job; a resumed one keeps its own id.
pub async fn reencrypt(
    repo: &Repository,
    appender: Arc<dyn Appender>,
    actor: &Actor,
    opts: &ReencryptOptions,
) -> Result<ReencryptReport, OpsError> {
    let stream = streams::repository();
    let (state, resumed) = repo.begin_reencryption(opts).await?;
    let job = state.job_id;
    // A run killed between writing its job state and this append leaves a job the ledger never
    // saw start, so a resumed run records `started` too. Its id derives from the job and its start
    // time: when the first run did record it, this append is a duplicate the ledger stores once,
    // or (the listing having moved on since, so the content differs) refused as `id_reused`,
    // which means the same thing here.
    let started = record(
        appender.as_ref(),
        &stream,
        actor,
        None,
        state.started_at,
        "reencryption-started",
        job,
        started_event(&state, &repo.keys()),
    )
    .await;
    match started {
        Ok(()) => {}
        Err(e) if resumed && e.is_id_reused() => {}
        Err(e) => return Err(e.into()),
    }
    // Progress is recorded beside the work, in order, by one task fed from the job's callback.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ReencryptStep>();
    let recorder = {
        let appender = appender.clone();
        let actor = actor.clone();
        let stream = stream.clone();
        let run_at = opts.now;
        tokio::spawn(async move {
            while let Some(s) = rx.recv().await {
                let label = format!("reencryption-progressed-{}", s.backup_id);
                if let Err(e) = record(
                    appender.as_ref(),
                    &stream,
                    &actor,
                    None,
                    run_at,
                    &label,
                    s.job_id,
                    progressed_event(&s),
                )
                .await
                {
                    // The checkpoint is in the repository; a lost progress event only makes the
                    // dashboard lag until the next one.
                    tracing::warn!(job = %s.job_id, backup = %s.backup_id, error = %e, "re-encryption progress not recorded");
                }
            }
        })
    };
    let run = repo
        .run_reencryption(state, opts, |s| {
            let _ = tx.send(s.clone());
        })
        .await;
    drop(tx);
    let _ = recorder.await;
    match run {
        Ok(report) => {
            record(
                appender.as_ref(),
                &stream,
                actor,
                None,
                opts.now,
                "reencryption-completed",
                job,
                Event::ReencryptionCompleted(ReencryptionCompleted {
                    job_id: job,
                    objects: report.chunks_resealed,
                    bytes: report.bytes_resealed,
                    backups: report.backups_total,
                }),
            )
            .await?;
            Ok(report)
        }
        Err(e) => {
            let err = OpsError::from(e);
            // The job stays resumable (its state is in the repository): `failed` says this run
            // stopped, and a later run goes on from the checkpoint.
            record(
                appender.as_ref(),
                &stream,
                actor,
                None,
                opts.now,
                "reencryption-failed",
                job,
                Event::ReencryptionFailed(ReencryptionFailed {
                    job_id: job,
                    reason: err.to_string(),
                }),
            )
            .await?;
            Err(err)
        }
    }
}

/// Retires what can be retired and records `key.retired` for each version retired.
pub async fn retire(
    repo: &Repository,
    appender: &dyn Appender,
    actor: &Actor,
    opts: &RetireOptions,
) -> Result<RetireReport, OpsError> {
    let report = repo.retire_keys(opts).await?;
    for k in &report.retired {
        let subject = backstop_events::uuid_v7_derived(
            uuid::Uuid::from_u128(k.version as u128),
            k.created_at,
            &k.key_id,
        );
        record(
            appender,
            &streams::keys(k.purpose.as_str()),
            actor,
            None,
            opts.now,
            "key-retired",
            subject,
            Event::KeyRetired(KeyRetired {
                purpose: k.purpose.as_str().to_string(),
                key_id: k.key_id.clone(),
                version: k.version,
            }),
        )
        .await?;
    }
    Ok(report)
}

/// What the rotation schedule did at one tick.
#[derive(Debug, Default)]
pub struct RotationTick {
    pub rotated: Vec<KeyRotation>,
    pub reencryption: Option<ReencryptReport>,
}

/// The schedule's tick at `now` (an injected clock's reading): rotates the scheduled purposes
/// whose current version is older than `rotate_after`, then runs the re-encryption job when it
/// rotated something or a job is unfinished.
pub async fn rotate_if_due(
    repo: &Repository,
    appender: Arc<dyn Appender>,
    actor: &Actor,
    now: DateTime<Utc>,
    rotate_after: chrono::Duration,
) -> Result<RotationTick, OpsError> {
    repo.reload_keys().await?;
    let due = rotation_due(&repo.keys(), &SCHEDULED_PURPOSES, now, rotate_after);
    let mut tick = RotationTick::default();
    if !due.is_empty() {
        tick.rotated = rotate(repo, appender.as_ref(), &due, actor, now).await?;
    }
    if !tick.rotated.is_empty() || repo.reencryption_state().await?.is_some() {
        let job = backstop_events::uuid_v7_derived(repo.id(), now, "reencryption");
        let opts = ReencryptOptions::new(job, now);
        tick.reencryption = Some(reencrypt(repo, appender, actor, &opts).await?);
    }
    Ok(tick)
}

/// How often `serve` asks [`rotate_if_due`]: hourly, so a key is rotated within an hour of its
/// age passing the limit, and an unfinished job (a `serve` killed mid-job) resumes within an hour
/// of the restart.
pub const SCHEDULE_EVERY: chrono::Duration = chrono::Duration::hours(1);

/// The rotation schedule in `serve`: [`rotate_if_due`] at start and every [`SCHEDULE_EVERY`] of
/// `clock`, until `shutdown`. A failed tick is logged (the job records its own
/// `reencryption.failed`) and tried again at the next; returns how many ticks ran.
pub async fn run_schedule(
    repo: Repository,
    appender: Arc<dyn Appender>,
    rotate_after: chrono::Duration,
    clock: &dyn crate::schedule::Clock,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> u64 {
    let actor = Actor::worker("key-rotation");
    let repo = repo.with_access(actor.to_string(), "the key rotation schedule");
    let mut ticks = 0;
    loop {
        if *shutdown.borrow() {
            return ticks;
        }
        let now = clock.now();
        match rotate_if_due(&repo, appender.clone(), &actor, now, rotate_after).await {
            Ok(tick) => {
                for r in &tick.rotated {
                    tracing::info!(purpose = r.purpose.as_str(), key = %r.new.key_id, "key rotated by the schedule");
                }
                if let Some(report) = &tick.reencryption {
                    tracing::info!(
                        backups = report.backups_reencrypted,
                        "re-encryption job finished"
                    );
                }
            }
            Err(e) => tracing::error!(
                error = %e.chain(),
                transient = e.is_transient(),
                "the key rotation schedule failed; it tries again in an hour (or run `backstop key reencrypt`)"
            ),
        }
        ticks += 1;
        let due = now + SCHEDULE_EVERY;
        while clock.now() < due {
            tokio::select! {
                _ = clock.sleep_until(due) => {}
                _ = shutdown.changed() => return ticks,
            }
        }
    }
}
