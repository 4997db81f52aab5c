//! The base backup: `pg_basebackup` to stdout, inspected on the fly, streamed into the sink.
//!
//! Invariants:
//! - The server is checked first: it must archive WAL (`archive_mode` on, or `always` on a
//!   standby, with an `archive_command` or `archive_library`), run at `wal_level` replica or
//!   above, and have no tablespace outside the data directory.
//! - The tar stream goes from `pg_basebackup`'s stdout to the sink through a bounded channel
//!   (at most `CHANNEL_DEPTH` batches of about 256 KiB in flight). Each batch passes a tar
//!   scanner that picks `backup_label` and the manifest's WAL ranges out and checks the archive's
//!   structure.
//! - The sink's reader reaches end-of-file only once `pg_basebackup` exited successfully and the
//!   archive was complete; otherwise it fails, so a truncated backup is never stored as good.
//! - The first failure (the tool, the archive, the sink) abandons the backup; the child is killed
//!   when dropped.

use std::io;
use std::pin::Pin;
use std::process::Stdio;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes};
use chrono::{NaiveDateTime, TimeZone, Utc};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::sync::mpsc;

use super::tar::{EntryKind, TarEvent, TarScanner};
use super::{BASE_PART, BaseBackupReport, PhysicalError};
use crate::error::SourceError;
use crate::pg::conninfo::ConnInfo;
use crate::pg::logical::DumpSink;
use crate::pg::tools;
use crate::pg::wal::{Lsn, segment_name};

const BATCH: usize = 256 * 1024;
const CHANNEL_DEPTH: usize = 4;
/// Bytes of the manifest's end kept to find its WAL ranges (they close the manifest).
const MANIFEST_TAIL: usize = 64 * 1024;

/// How to take a base backup.
#[derive(Debug, Clone)]
pub struct BaseBackupOptions {
    /// Directory of `pg_basebackup`; default: `BACKSTOP_PG_BIN`, `PATH`, `/usr/lib/postgresql/*/bin`.
    pub pg_bin_dir: Option<std::path::PathBuf>,
    /// Request an immediate checkpoint (`--checkpoint=fast`, default) rather than waiting for a
    /// spread one.
    pub fast_checkpoint: bool,
    /// The backup label (shown in `backup_label` and the server's backup history file).
    pub label: String,
    /// `--max-rate` (e.g. `100M`), to spare a busy primary's disks.
    pub max_rate: Option<String>,
}

impl Default for BaseBackupOptions {
    fn default() -> Self {
        BaseBackupOptions {
            pg_bin_dir: None,
            fast_checkpoint: true,
            label: "backstop base backup".into(),
            max_rate: None,
        }
    }
}

struct ServerFacts {
    version: String,
    version_num: u32,
    system_identifier: u64,
    segment_size: u64,
    data_checksums: bool,
}

async fn check_server(ci: &ConnInfo) -> Result<ServerFacts, PhysicalError> {
    let mut conn = ci.connect_source().await?;
    type Row = (
        String,
        i32,
        String,
        String,
        String,
        i64,
        String,
        String,
        bool,
        Option<String>,
    );
    let row: Row = sqlx::query_as(
        "SELECT current_setting('server_version'), current_setting('server_version_num')::int4, \
         current_setting('archive_mode'), current_setting('archive_command'), \
         current_setting('wal_level'), pg_size_bytes(current_setting('wal_segment_size'))::int8, \
         (SELECT system_identifier::text FROM pg_control_system()), \
         current_setting('data_checksums'), pg_is_in_recovery(), \
         (SELECT string_agg(spcname, ', ' ORDER BY spcname) FROM pg_tablespace \
          WHERE spcname NOT IN ('pg_default', 'pg_global'))",
    )
    .fetch_one(&mut conn)
    .await
    .map_err(|e| SourceError::query("checking the server before a base backup", ci, e))?;
    let (version, num, mode, command, level, seg, sysid, checksums, in_recovery, spaces) = row;
    let archive_library: Option<String> =
        sqlx::query_scalar("SELECT setting FROM pg_settings WHERE name = 'archive_library'")
            .fetch_optional(&mut conn)
            .await
            .map_err(|e| SourceError::query("reading archive_library", ci, e))?;
    let server = ci.server();
    let not = |why: String| PhysicalError::NotArchiving {
        server: server.clone(),
        why,
    };
    if level == "minimal" {
        return Err(not("wal_level is minimal".into()));
    }
    match (mode.as_str(), in_recovery) {
        ("off", _) => return Err(not("archive_mode is off".into())),
        ("on", true) => {
            return Err(not(
                "this is a standby with archive_mode = on, which archives nothing until promoted (use archive_mode = always, or back up the primary)".into(),
            ));
        }
        _ => {}
    }
    if command.trim().is_empty() && archive_library.unwrap_or_default().trim().is_empty() {
        return Err(not("archive_command is empty".into()));
    }
    if !command.contains("wal-push") {
        tracing::warn!(
            %server, archive_command = %command,
            "archive_command does not look like `backstop wal-push %p`; restores need the WAL in the Backstop repository"
        );
    }
    if let Some(names) = spaces {
        return Err(PhysicalError::Tablespaces { server, names });
    }
    Ok(ServerFacts {
        version,
        version_num: num as u32,
        system_identifier: sysid.parse().map_err(|_| PhysicalError::BadLabel {
            why: format!("the server reported system identifier {sysid:?}"),
        })?,
        segment_size: seg as u64,
        data_checksums: checksums == "on",
    })
}

enum Msg {
    Data(Bytes),
    End,
    Fail(String),
}

/// The sink's end of the tar stream.
struct TarStream {
    rx: mpsc::Receiver<Msg>,
    cur: Bytes,
    done: bool,
}

impl AsyncRead for TarStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.cur.is_empty() {
                let n = self.cur.len().min(buf.remaining());
                buf.put_slice(&self.cur[..n]);
                self.cur.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.done {
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Msg::Data(b))) => self.cur = b,
                Poll::Ready(Some(Msg::End)) => self.done = true,
                Poll::Ready(Some(Msg::Fail(m))) => return Poll::Ready(Err(io::Error::other(m))),
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "pg_basebackup's stream stopped before its end",
                    )));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// What the scanner picked out of the stream.
#[derive(Default)]
struct Inspected {
    label: Option<Vec<u8>>,
    manifest_tail: Option<Vec<u8>>,
    tablespace_map: Vec<u8>,
    files: u64,
    data_bytes: u64,
    raw_bytes: u64,
}

/// Which member the data events currently belong to.
enum Capture {
    None,
    Label,
    Manifest,
    TablespaceMap,
}

/// Reads `pg_basebackup`'s stdout, inspects it and hands it on. Returns what it found, or why
/// the stream is not a good backup (the reader is then failed with the same message).
async fn produce(
    mut child: tokio::process::Child,
    tool: tools::Tool,
    tx: mpsc::Sender<Msg>,
) -> Result<Inspected, PhysicalError> {
    let stderr = tokio::spawn(tools::collect_stderr(child.stderr.take()));
    let Some(mut stdout) = child.stdout.take() else {
        return Err(PhysicalError::Source(SourceError::Task(
            "pg_basebackup has no stdout".into(),
        )));
    };
    let mut scanner = TarScanner::new();
    let mut seen = Inspected::default();
    let mut capture = Capture::None;
    let mut archive_error: Option<String> = None;
    let mut reader_gone = false;
    loop {
        let mut buf = vec![0u8; BATCH];
        let mut filled = 0;
        // Fill a whole batch unless the stream ends.
        while filled < BATCH {
            match stdout.read(&mut buf[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => {
                    archive_error = Some(format!("reading pg_basebackup's output failed: {e}"));
                    break;
                }
            }
        }
        if filled == 0 || archive_error.is_some() {
            break;
        }
        buf.truncate(filled);
        seen.raw_bytes += filled as u64;
        match scanner.feed(&buf) {
            Ok(events) => {
                for ev in events {
                    match ev {
                        TarEvent::Entry(e) => {
                            capture = Capture::None;
                            if e.kind == EntryKind::File {
                                seen.files += 1;
                                seen.data_bytes += e.size;
                                match e.path.as_str() {
                                    "backup_label" => {
                                        seen.label = Some(Vec::new());
                                        capture = Capture::Label;
                                    }
                                    "backup_manifest" => {
                                        seen.manifest_tail = Some(Vec::new());
                                        capture = Capture::Manifest;
                                    }
                                    "tablespace_map" => capture = Capture::TablespaceMap,
                                    _ => {}
                                }
                            }
                        }
                        TarEvent::Data(r) => {
                            let slice = &buf[r];
                            match capture {
                                Capture::Label => {
                                    if let Some(l) = seen.label.as_mut() {
                                        l.extend_from_slice(slice)
                                    }
                                }
                                Capture::Manifest => {
                                    if let Some(m) = seen.manifest_tail.as_mut() {
                                        m.extend_from_slice(slice);
                                        if m.len() > 2 * MANIFEST_TAIL {
                                            m.drain(..m.len() - MANIFEST_TAIL);
                                        }
                                    }
                                }
                                Capture::TablespaceMap => {
                                    seen.tablespace_map.extend_from_slice(slice)
                                }
                                Capture::None => {}
                            }
                        }
                        TarEvent::EntryEnd => capture = Capture::None,
                        TarEvent::End => {}
                    }
                }
            }
            Err(why) => {
                archive_error = Some(why);
            }
        }
        if tx.send(Msg::Data(Bytes::from(buf))).await.is_err() {
            reader_gone = true;
            break;
        }
        if archive_error.is_some() {
            break;
        }
    }
    if reader_gone {
        // The sink gave up; its own error explains why. Stop the tool.
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(PhysicalError::Source(SourceError::SinkStoppedEarly {
            part: BASE_PART.into(),
        }));
    }
    if let Some(why) = archive_error {
        let _ = child.start_kill();
        let _ = child.wait().await;
        let _ = tx.send(Msg::Fail(why.clone())).await;
        return Err(PhysicalError::BadArchive { why });
    }
    let status = child
        .wait()
        .await
        .map_err(|e| PhysicalError::io("waiting for pg_basebackup", e))?;
    let stderr = stderr.await.unwrap_or_default();
    if !status.success() {
        let err = tools::tool_failed(&tool, "taking the base backup", status, stderr);
        let _ = tx.send(Msg::Fail(err.to_string())).await;
        return Err(err.into());
    }
    if let Err(why) = scanner.finish() {
        let _ = tx.send(Msg::Fail(why.clone())).await;
        return Err(PhysicalError::BadArchive { why });
    }
    if !stderr.is_empty() {
        tracing::debug!(%stderr, "pg_basebackup said");
    }
    if tx.send(Msg::End).await.is_err() {
        return Err(PhysicalError::Source(SourceError::SinkStoppedEarly {
            part: BASE_PART.into(),
        }));
    }
    Ok(seen)
}

/// `backup_label` fields.
struct Label {
    start_lsn: Lsn,
    checkpoint_lsn: Lsn,
    timeline: u32,
    start_time: Option<chrono::DateTime<Utc>>,
    label: String,
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim()))
}

fn parse_label(text: &str) -> Result<Label, String> {
    let lsn_of = |key: &str| -> Result<Lsn, String> {
        let v = field(text, key).ok_or_else(|| format!("backup_label has no {key}"))?;
        v.split_whitespace()
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|e| format!("backup_label {key} {e}"))
    };
    let start_lsn = lsn_of("START WAL LOCATION:")?;
    let checkpoint_lsn = lsn_of("CHECKPOINT LOCATION:")?;
    let timeline = field(text, "START TIMELINE:")
        .and_then(|v| v.parse().ok())
        .ok_or("backup_label has no START TIMELINE")?;
    let start_time = field(text, "START TIME:").and_then(parse_pg_time);
    let label = field(text, "LABEL:").unwrap_or_default().to_string();
    Ok(Label {
        start_lsn,
        checkpoint_lsn,
        timeline,
        start_time,
        label,
    })
}

/// `2026-11-22 06:59:07 UTC` (PostgreSQL writes the label's time in the log time zone; only a
/// UTC or numeric-offset time is understood, others are left out).
pub(crate) fn parse_pg_time(v: &str) -> Option<chrono::DateTime<Utc>> {
    let v = v.trim();
    if let Some(naive) = v.strip_suffix(" UTC").or_else(|| v.strip_suffix(" GMT")) {
        let t = NaiveDateTime::parse_from_str(naive, "%Y-%m-%d %H:%M:%S%.f").ok()?;
        return Some(Utc.from_utc_datetime(&t));
    }
    chrono::DateTime::parse_from_str(v, "%Y-%m-%d %H:%M:%S%.f %z")
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The manifest's `"WAL-Ranges"`: the last range's timeline and end LSN.
fn parse_wal_ranges(tail: &[u8]) -> Result<(u32, Lsn), String> {
    let text = String::from_utf8_lossy(tail);
    let at = text
        .rfind("\"WAL-Ranges\"")
        .ok_or("the backup manifest has no WAL-Ranges")?;
    let open = text[at..]
        .find('[')
        .map(|i| at + i)
        .ok_or("malformed WAL-Ranges")?;
    let close = text[open..]
        .find(']')
        .map(|i| open + i)
        .ok_or("malformed WAL-Ranges")?;
    let ranges: Vec<serde_json::Value> = serde_json::from_str(&text[open..=close])
        .map_err(|e| format!("malformed WAL-Ranges: {e}"))?;
    let last = ranges
        .last()
        .ok_or("the backup manifest lists no WAL range")?;
    let timeline = last["Timeline"]
        .as_u64()
        .ok_or("WAL range without a timeline")? as u32;
    let end: Lsn = last["End-LSN"]
        .as_str()
        .ok_or("WAL range without an End-LSN")?
        .parse()?;
    Ok((timeline, end))
}

/// Takes a base backup of the cluster at `conninfo` (any database; the connection needs the
/// REPLICATION attribute or superuser, and a `replication` line in `pg_hba.conf`), streaming it
/// into `sink` as [`BASE_PART`].
pub async fn base_backup(
    conninfo: &str,
    sink: &dyn DumpSink,
    opts: &BaseBackupOptions,
) -> Result<BaseBackupReport, PhysicalError> {
    let ci = ConnInfo::parse(conninfo)?;
    let facts = check_server(&ci).await?;
    let tool = tools::locate(
        "pg_basebackup",
        opts.pg_bin_dir.as_deref(),
        facts.version_num / 10000,
    )
    .await?;

    let started_at = Utc::now();
    let clock = Instant::now();
    let mut cmd = tool.command();
    cmd.stdout(Stdio::piped())
        .args([
            "--pgdata=-",
            "--format=tar",
            "--wal-method=none",
            "--manifest-checksums=CRC32C",
            "--no-password",
        ])
        .arg(if opts.fast_checkpoint {
            "--checkpoint=fast"
        } else {
            "--checkpoint=spread"
        })
        .arg(format!("--label={}", opts.label));
    if let Some(rate) = &opts.max_rate {
        cmd.arg(format!("--max-rate={rate}"));
    }
    ci.apply_to_tool(&mut cmd);
    let child = tool.spawn(&mut cmd)?;
    tracing::info!(server = %ci.server(), "base backup started");

    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let reader = TarStream {
        rx,
        cur: Bytes::new(),
        done: false,
    };
    let producer = produce(child, tool.clone(), tx);
    let consumer = sink.put_part(BASE_PART, Box::pin(reader));
    let (produced, stored) = tokio::join!(producer, consumer);
    // The tool's or the archive's own error explains a failure better than the sink's.
    let seen = match (produced, stored) {
        (Err(e @ PhysicalError::Source(SourceError::SinkStoppedEarly { .. })), Err(source)) => {
            tracing::debug!(error = %e, "producer stopped because the sink failed");
            return Err(SourceError::Sink {
                part: BASE_PART.into(),
                source,
            }
            .into());
        }
        (Err(e), _) => return Err(e),
        (Ok(_), Err(source)) => {
            return Err(SourceError::Sink {
                part: BASE_PART.into(),
                source,
            }
            .into());
        }
        (Ok(seen), Ok(stored)) => (seen, stored),
    };
    let (seen, stored) = seen;
    let finished_at = Utc::now();

    let label_text = seen
        .label
        .map(|l| String::from_utf8_lossy(&l).into_owned())
        .ok_or_else(|| PhysicalError::BadLabel {
            why: "the stream has no backup_label".into(),
        })?;
    let label = parse_label(&label_text).map_err(|why| PhysicalError::BadLabel { why })?;
    if !seen.tablespace_map.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(PhysicalError::Tablespaces {
            server: ci.server(),
            names: String::from_utf8_lossy(&seen.tablespace_map)
                .trim()
                .to_string(),
        });
    }
    let has_manifest = seen.manifest_tail.is_some();
    let (stop_timeline, stop_lsn) = parse_wal_ranges(&seen.manifest_tail.unwrap_or_default())
        .map_err(|why| PhysicalError::BadLabel { why })?;
    let seg = facts.segment_size;
    let report = BaseBackupReport {
        format: 1,
        part: BASE_PART.into(),
        server_version: facts.version,
        server_version_num: facts.version_num,
        pg_basebackup_version: tool.version.clone(),
        system_identifier: facts.system_identifier,
        wal_segment_size: seg,
        data_checksums: facts.data_checksums,
        label: label.label,
        start_lsn: label.start_lsn,
        checkpoint_lsn: label.checkpoint_lsn,
        timeline: label.timeline,
        stop_lsn,
        stop_timeline,
        start_segment: segment_name(label.timeline, label.start_lsn.segno(seg), seg),
        stop_segment: segment_name(stop_timeline, stop_lsn.segno(seg), seg),
        start_time: label.start_time,
        started_at,
        finished_at,
        duration_ms: clock.elapsed().as_millis() as u64,
        files: seen.files,
        data_bytes: seen.data_bytes,
        raw_bytes: seen.raw_bytes,
        stored,
        has_manifest,
    };
    tracing::info!(
        start = %report.start_lsn, stop = %report.stop_lsn, bytes = report.raw_bytes,
        "base backup finished"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_and_manifest_parse() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                     CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
                     START TIME: 2026-11-22 06:59:07 UTC\nLABEL: pg_basebackup base backup\n\
                     START TIMELINE: 1\n";
        let l = parse_label(label).unwrap();
        assert_eq!(l.start_lsn, Lsn(0x2000028));
        assert_eq!(l.checkpoint_lsn, Lsn(0x2000060));
        assert_eq!(l.timeline, 1);
        assert_eq!(l.label, "pg_basebackup base backup");
        assert_eq!(
            l.start_time.unwrap().to_rfc3339(),
            "2026-11-22T06:59:07+00:00"
        );
        let tail = br#"{ "Path": "global/pg_control", "Size": 8192 }
],
"WAL-Ranges": [
{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }
],
"Manifest-Checksum": "f9be"}"#;
        assert_eq!(parse_wal_ranges(tail).unwrap(), (1, Lsn(0x2000100)));
        assert!(parse_wal_ranges(b"{}").is_err());
        assert!(parse_label("LABEL: x\n").is_err());
    }
}
