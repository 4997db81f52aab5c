//! Physical restore: the base backup laid out in a directory with its recovery settings, and the
//! restorable window.
//!
//! Invariants:
//! - Restore writes only into a new or empty directory, and removes what it wrote if it fails,
//!   so a half-restored directory is never left for someone to start.
//! - The extracted `backup_label` must be the one the report describes (same start LSN), and,
//!   when the backup carried a manifest, `pg_verifybackup` must agree with every file.
//! - When `pg_verifybackup` will check every file, the part is opened with
//!   [`DumpSource::open_part_checked_downstream`]: the repository still authenticates every
//!   chunk but skips recomputing its chunk id, which that check repeats. A backup recorded with a
//!   manifest whose restored files lack one is then an error, never an unchecked restore.
//! - The recovery settings are appended to `postgresql.auto.conf` (which outranks
//!   `postgresql.conf`), under a `# backstop restore` comment, with `recovery.signal` beside them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::{
    BaseBackupReport, PhysicalError, RecoveryTarget, RecoveryTimeline, TargetAction, os, tar,
};
use crate::error::SourceError;
use crate::pg::logical::{DumpSource, SinkError};
use crate::pg::tools;
use crate::pg::wal::{Lsn, WalFile, WalKind, WalStore};

/// How to restore.
#[derive(Debug, Clone)]
pub struct PhysicalRestoreOptions {
    pub target: RecoveryTarget,
    /// Stop just after the target (`recovery_target_inclusive`, default true) or just before.
    pub inclusive: bool,
    pub action: TargetAction,
    pub timeline: RecoveryTimeline,
    /// The `restore_command`, with `%f` and `%p`, e.g.
    /// `/usr/bin/backstop --config /etc/backstop.toml wal-fetch %f %p`.
    pub restore_command: String,
    /// Leave the backup's archive settings alone (the restored server then archives its new
    /// timeline). Default false: `archive_mode = off`.
    pub keep_archiving: bool,
    /// Check the files with `pg_verifybackup` when the backup carried a manifest (default true).
    pub verify_manifest: bool,
    /// Directory of `pg_verifybackup`; default as for the other tools.
    pub pg_bin_dir: Option<PathBuf>,
    /// When running as root: give the restored directory to this user (the one PostgreSQL will
    /// run as). `None`: leave it to the current user.
    pub owner: Option<String>,
}

impl PhysicalRestoreOptions {
    /// Restore to the latest archived point, promote, with `restore_command`.
    pub fn new(restore_command: impl Into<String>) -> PhysicalRestoreOptions {
        PhysicalRestoreOptions {
            target: RecoveryTarget::Latest,
            inclusive: true,
            action: TargetAction::Promote,
            timeline: RecoveryTimeline::Latest,
            restore_command: restore_command.into(),
            keep_archiving: false,
            verify_manifest: true,
            pg_bin_dir: None,
            owner: None,
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhysicalRestoreReport {
    pub dir: PathBuf,
    pub target: RecoveryTarget,
    pub files: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    /// Bytes of the base backup part read.
    pub archive_bytes: u64,
    /// True when `pg_verifybackup` checked every file against the manifest.
    pub manifest_verified: bool,
    /// The settings appended to `postgresql.auto.conf`.
    pub settings: String,
    pub duration_ms: u64,
}

/// A `postgresql.conf` string literal.
fn conf_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

fn pg_time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

/// The recovery settings [`restore_physical`] appends to `postgresql.auto.conf`.
pub fn recovery_settings(opts: &PhysicalRestoreOptions) -> String {
    let mut s = format!(
        "\n# backstop restore, {}: recovery settings (remove after recovery if you like)\n",
        Utc::now().to_rfc3339()
    );
    s.push_str(&format!(
        "restore_command = {}\n",
        conf_quote(&opts.restore_command)
    ));
    let timeline = match opts.timeline {
        RecoveryTimeline::Latest => "latest".to_string(),
        RecoveryTimeline::Current => "current".to_string(),
        RecoveryTimeline::Id(n) => n.to_string(),
    };
    s.push_str(&format!("recovery_target_timeline = '{timeline}'\n"));
    let target = match &opts.target {
        RecoveryTarget::Latest => None,
        RecoveryTarget::Immediate => Some("recovery_target = 'immediate'".to_string()),
        RecoveryTarget::Time(t) => Some(format!("recovery_target_time = '{}'", pg_time(t))),
        RecoveryTarget::Lsn(l) => Some(format!("recovery_target_lsn = '{l}'")),
        RecoveryTarget::Xid(x) => Some(format!("recovery_target_xid = '{x}'")),
        RecoveryTarget::Name(n) => Some(format!("recovery_target_name = {}", conf_quote(n))),
    };
    if let Some(t) = target {
        s.push_str(&t);
        s.push('\n');
        if !matches!(opts.target, RecoveryTarget::Immediate) {
            s.push_str(&format!(
                "recovery_target_inclusive = {}\n",
                if opts.inclusive { "on" } else { "off" }
            ));
        }
        let action = match opts.action {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        };
        s.push_str(&format!("recovery_target_action = '{action}'\n"));
    }
    if !opts.keep_archiving {
        s.push_str("archive_mode = off\n");
    }
    s
}

async fn dir_is_empty(dir: &Path) -> Result<bool, PhysicalError> {
    match tokio::fs::read_dir(dir).await {
        Ok(mut rd) => Ok(rd
            .next_entry()
            .await
            .map_err(|e| PhysicalError::io(format!("listing {}", dir.display()), e))?
            .is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(PhysicalError::io(format!("listing {}", dir.display()), e)),
    }
}

/// Refuses targets the backup cannot reach (before its consistency point).
fn check_reachable(
    backup: &BaseBackupReport,
    target: &RecoveryTarget,
) -> Result<(), PhysicalError> {
    let too_early = match target {
        RecoveryTarget::Time(t) => *t < backup.start_time.unwrap_or(backup.started_at),
        RecoveryTarget::Lsn(l) => *l < backup.stop_lsn,
        _ => false,
    };
    if too_early {
        return Err(PhysicalError::NoBackupForTarget {
            target: target.to_string(),
            earliest: format!(
                "{} (LSN {}), the end of this base backup",
                backup.finished_at.to_rfc3339(),
                backup.stop_lsn
            ),
        });
    }
    Ok(())
}

/// Lays out `dir` from `backup` so that starting PostgreSQL on it recovers to `opts.target`.
pub async fn restore_physical(
    source: &dyn DumpSource,
    backup: &BaseBackupReport,
    dir: &Path,
    opts: &PhysicalRestoreOptions,
) -> Result<PhysicalRestoreReport, PhysicalError> {
    let clock = Instant::now();
    check_reachable(backup, &opts.target)?;
    if !dir_is_empty(dir).await? {
        return Err(PhysicalError::TargetNotEmpty {
            dir: dir.to_path_buf(),
        });
    }
    let existed = tokio::fs::try_exists(dir).await.unwrap_or(false);
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| PhysicalError::io(format!("creating {}", dir.display()), e))?;
    let result = lay_out(source, backup, dir, opts, clock).await;
    if result.is_err() {
        // Never leave a half-restored directory behind for someone to start.
        if existed {
            if let Ok(mut rd) = tokio::fs::read_dir(dir).await {
                while let Ok(Some(e)) = rd.next_entry().await {
                    let p = e.path();
                    let _ = if p.is_dir() {
                        tokio::fs::remove_dir_all(&p).await
                    } else {
                        tokio::fs::remove_file(&p).await
                    };
                }
            }
        } else {
            let _ = tokio::fs::remove_dir_all(dir).await;
        }
    }
    result
}

async fn lay_out(
    source: &dyn DumpSource,
    backup: &BaseBackupReport,
    dir: &Path,
    opts: &PhysicalRestoreOptions,
    clock: Instant,
) -> Result<PhysicalRestoreReport, PhysicalError> {
    use std::os::unix::fs::PermissionsExt;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .await
        .map_err(|e| PhysicalError::io(format!("chmod 0700 {}", dir.display()), e))?;
    // With the manifest to be checked by pg_verifybackup, every restored byte is checked end to
    // end; the source may skip a per-chunk check that only repeats it.
    let checked_downstream = opts.verify_manifest && backup.has_manifest;
    let opened = if checked_downstream {
        source.open_part_checked_downstream(&backup.part).await
    } else {
        source.open_part(&backup.part).await
    };
    let reader = opened.map_err(|source| SourceError::Source {
        part: backup.part.clone(),
        source,
    })?;
    let stats = tar::extract(reader, dir).await.map_err(|e| match e {
        tar::ExtractError::Read(e) => PhysicalError::Source(SourceError::Source {
            part: backup.part.clone(),
            source: SinkError::from(e),
        }),
        tar::ExtractError::Other(why) => PhysicalError::Extract {
            dir: dir.to_path_buf(),
            why,
        },
    })?;

    let label = tokio::fs::read_to_string(dir.join("backup_label"))
        .await
        .map_err(|_| PhysicalError::BadLabel {
            why: "the restored files have no backup_label".into(),
        })?;
    let expected = format!("START WAL LOCATION: {} ", backup.start_lsn);
    if !label.lines().any(|l| l.starts_with(&expected)) {
        return Err(PhysicalError::BadLabel {
            why: format!(
                "the restored backup_label does not start at {} as the backup's record says; the part belongs to another backup",
                backup.start_lsn
            ),
        });
    }

    let mut manifest_verified = false;
    let manifest_present = tokio::fs::try_exists(dir.join("backup_manifest"))
        .await
        .unwrap_or(false);
    if checked_downstream && !manifest_present {
        // The part was read on the promise of this check: without it, nothing was.
        return Err(PhysicalError::ManifestMismatch {
            dir: dir.to_path_buf(),
            output: "the backup's record says it carried a backup_manifest, but the restored files have none".into(),
        });
    }
    if opts.verify_manifest && manifest_present {
        let tool = tools::locate(
            "pg_verifybackup",
            opts.pg_bin_dir.as_deref(),
            backup.server_major(),
        )
        .await?;
        let out = tool
            .command()
            .stdout(std::process::Stdio::piped())
            .args(["--no-parse-wal", "--quiet"])
            .arg(dir)
            .output()
            .await
            .map_err(|source| SourceError::ToolSpawn {
                tool: tool.name.into(),
                source,
            })?;
        if !out.status.success() {
            let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
            output.push_str(String::from_utf8_lossy(&out.stdout).trim());
            return Err(PhysicalError::ManifestMismatch {
                dir: dir.to_path_buf(),
                output,
            });
        }
        manifest_verified = true;
    }

    for stale in [
        "standby.signal",
        "recovery.signal",
        "postmaster.pid",
        "postmaster.opts",
    ] {
        let _ = tokio::fs::remove_file(dir.join(stale)).await;
    }
    for sub in ["pg_wal", "pg_wal/archive_status"] {
        tokio::fs::create_dir_all(dir.join(sub))
            .await
            .map_err(|e| PhysicalError::io(format!("creating {sub}"), e))?;
    }
    let settings = recovery_settings(opts);
    {
        use tokio::io::AsyncWriteExt;
        let path = dir.join("postgresql.auto.conf");
        let mut f = tokio::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .await
            .map_err(|e| PhysicalError::io("opening postgresql.auto.conf", e))?;
        f.write_all(settings.as_bytes())
            .await
            .map_err(|e| PhysicalError::io("writing postgresql.auto.conf", e))?;
        f.sync_all()
            .await
            .map_err(|e| PhysicalError::io("writing postgresql.auto.conf", e))?;
    }
    tokio::fs::write(dir.join("recovery.signal"), b"")
        .await
        .map_err(|e| PhysicalError::io("writing recovery.signal", e))?;

    if let (Some(owner), true) = (&opts.owner, os::is_root()) {
        let (uid, gid) = os::user_ids(owner)
            .await
            .map_err(|why| PhysicalError::Extract {
                dir: dir.to_path_buf(),
                why,
            })?;
        os::chown_tree(dir, uid, gid)
            .map_err(|e| PhysicalError::io(format!("chown {} to {owner}", dir.display()), e))?;
    }
    tracing::info!(dir = %dir.display(), files = stats.files, target = %opts.target, "base backup restored");
    Ok(PhysicalRestoreReport {
        dir: dir.to_path_buf(),
        target: opts.target.clone(),
        files: stats.files,
        bytes: stats.bytes,
        archive_bytes: stats.archive_bytes,
        manifest_verified,
        settings,
        duration_ms: clock.elapsed().as_millis() as u64,
    })
}

/// The base backup to restore from for `target`: the newest one finished before a time target
/// or consistent before an LSN target; the newest for the latest point; the oldest for a
/// transaction or restore-point target (whose position is unknown until replay finds it: the
/// oldest is sure to precede it, at the cost of a longer replay). `None` if none can reach it.
pub fn choose_base_backup<'a>(
    backups: &'a [BaseBackupReport],
    target: &RecoveryTarget,
) -> Option<&'a BaseBackupReport> {
    let by_age = |b: &&BaseBackupReport| (b.finished_at, b.stop_lsn);
    match target {
        RecoveryTarget::Latest | RecoveryTarget::Immediate => backups.iter().max_by_key(by_age),
        RecoveryTarget::Time(t) => backups
            .iter()
            .filter(|b| b.finished_at <= *t)
            .max_by_key(by_age),
        RecoveryTarget::Lsn(l) => backups
            .iter()
            .filter(|b| b.stop_lsn <= *l)
            .max_by_key(by_age),
        RecoveryTarget::Xid(_) | RecoveryTarget::Name(_) => backups.iter().min_by_key(by_age),
    }
}

/// A restorable moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowPoint {
    /// Wall-clock time (for the earliest point, when the backup finished; for the latest, the
    /// last commit found in the archive). `None` when it could not be determined.
    pub time: Option<DateTime<Utc>>,
    pub lsn: Lsn,
    pub timeline: u32,
}

/// The earliest and latest moments a restore can reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreWindow {
    /// The end of the oldest base backup.
    pub earliest: Option<WindowPoint>,
    /// The last commit in the newest archived segments of the newest timeline.
    pub latest: Option<WindowPoint>,
    /// The newest archived segment.
    pub last_segment: Option<String>,
}

/// Computes the restorable window from the base backups kept and the WAL archive. The latest
/// commit time is read from the last archived segments with `pg_waldump` (found as for the other
/// tools, or in `pg_bin_dir`); without it, `latest.time` is `None`.
pub async fn list_window(
    backups: &[BaseBackupReport],
    store: &dyn WalStore,
    pg_bin_dir: Option<&Path>,
) -> Result<RestoreWindow, PhysicalError> {
    let earliest = backups
        .iter()
        .min_by_key(|b| (b.finished_at, b.stop_lsn))
        .map(|b| WindowPoint {
            time: Some(b.finished_at),
            lsn: b.stop_lsn,
            timeline: b.stop_timeline,
        });
    let mut segments: Vec<WalFile> = store
        .list()
        .await
        .map_err(crate::pg::wal::WalError::from)?
        .iter()
        .filter_map(|e| WalFile::parse(&e.name))
        .filter(|f| f.kind == WalKind::Segment)
        .collect();
    segments.sort_by(|a, b| (a.timeline, &a.name).cmp(&(b.timeline, &b.name)));
    let Some(last) = segments.last().cloned() else {
        return Ok(RestoreWindow {
            earliest,
            latest: None,
            last_segment: None,
        });
    };
    let major = backups.iter().map(|b| b.server_major()).max().unwrap_or(0);
    let waldump = tools::locate("pg_waldump", pg_bin_dir, major).await.ok();

    // The last few segments of the newest timeline, newest first, until one holds a commit.
    let mut latest = None;
    let mut end_lsn = None;
    for f in segments
        .iter()
        .rev()
        .filter(|f| f.timeline == last.timeline)
        .take(4)
    {
        let Some(stored) = store
            .get_segment(&f.name)
            .await
            .map_err(crate::pg::wal::WalError::from)?
        else {
            continue;
        };
        stored
            .verify(&f.name)
            .await
            .map_err(crate::pg::wal::WalError::from)?;
        let segment_size = stored.data.len() as u64;
        if end_lsn.is_none() {
            end_lsn = Some(Lsn((f.segno(segment_size) + 1) * segment_size));
        }
        let Some(tool) = &waldump else { break };
        let (commit, last_record) = last_commit(tool, f, &stored.data).await?;
        if let (Some(l), true) = (last_record, f.name == last.name) {
            end_lsn = Some(l);
        }
        if let Some(t) = commit {
            latest = Some(t);
            break;
        }
    }
    Ok(RestoreWindow {
        earliest,
        latest: Some(WindowPoint {
            time: latest,
            lsn: end_lsn.unwrap_or_default(),
            timeline: last.timeline,
        }),
        last_segment: Some(last.name.clone()),
    })
}

/// The last commit time and the last record's LSN in one segment, by `pg_waldump`.
async fn last_commit(
    tool: &tools::Tool,
    file: &WalFile,
    data: &[u8],
) -> Result<(Option<DateTime<Utc>>, Option<Lsn>), PhysicalError> {
    let tmp =
        tempfile::tempdir().map_err(|e| PhysicalError::io("creating a temporary directory", e))?;
    tokio::fs::write(tmp.path().join(&file.name), data)
        .await
        .map_err(|e| PhysicalError::io("writing a segment for pg_waldump", e))?;
    let out = tool
        .command()
        .stdout(std::process::Stdio::piped())
        .env("TZ", "UTC")
        .arg(format!("--path={}", tmp.path().display()))
        .arg(&file.name)
        .arg(&file.name)
        .output()
        .await
        .map_err(|source| SourceError::ToolSpawn {
            tool: tool.name.into(),
            source,
        })?;
    // pg_waldump exits non-zero at the first invalid record (the end of the written WAL);
    // what it printed before is what counts.
    Ok(parse_waldump(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_waldump(text: &str) -> (Option<DateTime<Utc>>, Option<Lsn>) {
    let mut commit = None;
    let mut last = None;
    for line in text.lines() {
        if let Some(rest) = line.split("lsn: ").nth(1)
            && let Some(l) = rest.split(',').next().and_then(|l| l.trim().parse().ok())
        {
            last = Some(l);
        }
        if let Some(rest) = line.split("desc: COMMIT ").nth(1) {
            let ts = rest.split(';').next().unwrap_or_default().trim();
            let ts = ts.strip_suffix(" UTC").unwrap_or(ts);
            if let Ok(t) = NaiveDateTime::parse_from_str(ts, "%Y-%m-%d %H:%M:%S%.f") {
                commit = Some(Utc.from_utc_datetime(&t));
            }
        }
    }
    (commit, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_quote_and_cover_targets() {
        let mut o = PhysicalRestoreOptions::new("/bin/backstop --config '/x y' wal-fetch %f %p");
        let s = recovery_settings(&o);
        assert!(s.contains("restore_command = '/bin/backstop --config ''/x y'' wal-fetch %f %p'"));
        assert!(s.contains("recovery_target_timeline = 'latest'"));
        assert!(!s.contains("recovery_target_action"));
        assert!(s.contains("archive_mode = off"));
        o.target = RecoveryTarget::Time(Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap());
        o.keep_archiving = true;
        let s = recovery_settings(&o);
        assert!(s.contains("recovery_target_time = '2026-01-02 03:04:05.000000+00'"));
        assert!(s.contains("recovery_target_action = 'promote'"));
        assert!(s.contains("recovery_target_inclusive = on"));
        assert!(!s.contains("archive_mode"));
        o.target = RecoveryTarget::Name("it's".into());
        assert!(recovery_settings(&o).contains("recovery_target_name = 'it''s'"));
    }

    fn report(finished_min: i64, stop: u64) -> BaseBackupReport {
        let t0 = Utc.with_ymd_and_hms(2026, 3, 2, 12, 0, 0).unwrap();
        BaseBackupReport {
            format: 1,
            part: super::super::BASE_PART.into(),
            server_version: "15.18".into(),
            server_version_num: 150018,
            pg_basebackup_version: "15.18".into(),
            system_identifier: 1,
            wal_segment_size: 16 << 20,
            data_checksums: false,
            label: "x".into(),
            start_lsn: Lsn(stop - 0x100),
            checkpoint_lsn: Lsn(stop - 0x100),
            timeline: 1,
            stop_lsn: Lsn(stop),
            stop_timeline: 1,
            start_segment: String::new(),
            stop_segment: String::new(),
            start_time: Some(t0 + chrono::Duration::minutes(finished_min - 1)),
            started_at: t0 + chrono::Duration::minutes(finished_min - 1),
            finished_at: t0 + chrono::Duration::minutes(finished_min),
            duration_ms: 60_000,
            files: 1,
            data_bytes: 1,
            raw_bytes: 1,
            stored: Default::default(),
            has_manifest: true,
        }
    }

    /// A base backup part held in memory: a tar of `backup_label` alone, recording which way it
    /// was opened.
    struct LabelOnly {
        tar: Vec<u8>,
        opened: std::sync::Mutex<Vec<&'static str>>,
    }

    impl LabelOnly {
        fn new(backup: &BaseBackupReport) -> LabelOnly {
            use super::super::tar::tests::header;
            let label = format!(
                "START WAL LOCATION: {} (file 000000010000000000000001)\n",
                backup.start_lsn
            );
            let mut tar = header("backup_label", label.len() as u64, b'0');
            tar.extend(label.as_bytes());
            tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
            LabelOnly {
                tar,
                opened: Default::default(),
            }
        }

        fn open(&self, how: &'static str) -> Result<crate::pg::logical::PartReader, SinkError> {
            self.opened.lock().expect("lock").push(how);
            Ok(Box::pin(std::io::Cursor::new(self.tar.clone())))
        }
    }

    #[async_trait::async_trait]
    impl DumpSource for LabelOnly {
        async fn open_part(&self, _: &str) -> Result<crate::pg::logical::PartReader, SinkError> {
            self.open("plain")
        }

        async fn open_part_checked_downstream(
            &self,
            _: &str,
        ) -> Result<crate::pg::logical::PartReader, SinkError> {
            self.open("checked downstream")
        }
    }

    #[tokio::test]
    async fn the_part_skips_chunk_checks_only_when_pg_verifybackup_will_check_every_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut backup = report(10, 0x2000000);
        let opts = PhysicalRestoreOptions::new("backstop wal-fetch %f %p");

        // Recorded with a manifest, restored without one: the promised check cannot run, so
        // the restore fails and leaves nothing behind.
        let source = LabelOnly::new(&backup);
        let dir = tmp.path().join("with-manifest");
        let err = restore_physical(&source, &backup, &dir, &opts)
            .await
            .expect_err("a backup recorded with a manifest restored without one");
        assert!(
            matches!(err, PhysicalError::ManifestMismatch { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("have none"), "{err}");
        assert!(!dir.exists());
        assert_eq!(*source.opened.lock().unwrap(), ["checked downstream"]);

        // No manifest to check against, or the check turned off: every chunk check stays.
        backup.has_manifest = false;
        let source = LabelOnly::new(&backup);
        let dir = tmp.path().join("no-manifest");
        restore_physical(&source, &backup, &dir, &opts)
            .await
            .expect("a backup without a manifest restores");
        assert!(dir.join("recovery.signal").exists());
        assert_eq!(*source.opened.lock().unwrap(), ["plain"]);

        backup.has_manifest = true;
        let mut unchecked = opts.clone();
        unchecked.verify_manifest = false;
        let source = LabelOnly::new(&backup);
        let dir = tmp.path().join("unverified");
        restore_physical(&source, &backup, &dir, &unchecked)
            .await
            .expect("restored without pg_verifybackup");
        assert_eq!(*source.opened.lock().unwrap(), ["plain"]);
    }

    #[test]
    fn the_right_base_backup_is_chosen() {
        let backups = vec![
            report(10, 0x2000000),
            report(70, 0x5000000),
            report(130, 0x9000000),
        ];
        let t0 = Utc.with_ymd_and_hms(2026, 3, 2, 12, 0, 0).unwrap();
        let at = |m: i64| RecoveryTarget::Time(t0 + chrono::Duration::minutes(m));
        let pick = |t: &RecoveryTarget| choose_base_backup(&backups, t).map(|b| b.stop_lsn.0);
        assert_eq!(pick(&at(5)), None);
        assert_eq!(pick(&at(10)), Some(0x2000000));
        assert_eq!(pick(&at(100)), Some(0x5000000));
        assert_eq!(pick(&RecoveryTarget::Latest), Some(0x9000000));
        assert_eq!(pick(&RecoveryTarget::Lsn(Lsn(0x8FFFFFF))), Some(0x5000000));
        assert_eq!(pick(&RecoveryTarget::Xid(5)), Some(0x2000000));
        assert!(check_reachable(&backups[1], &at(20)).is_err());
        assert!(check_reachable(&backups[1], &RecoveryTarget::Lsn(Lsn(0x4000000))).is_err());
        assert!(check_reachable(&backups[1], &at(80)).is_ok());
    }

    #[test]
    fn waldump_lines_parse() {
        let text = "rmgr: Transaction len (rec/tot):    162/   162, tx:        734, lsn: 0/03039380, prev 0/03039340, desc: COMMIT 2026-11-22 07:00:07.952603 UTC; inval msgs: catcache 63\n\
                    rmgr: XLOG        len (rec/tot):     24/    24, tx:        735, lsn: 0/03055008, prev 0/03054FC8, desc: SWITCH \n";
        let (c, l) = parse_waldump(text);
        assert_eq!(c.unwrap().to_rfc3339(), "2026-11-22T07:00:07.952603+00:00");
        assert_eq!(l, Some(Lsn(0x3055008)));
    }
}
