//! Command sources: whatever has no native support (SQLite, InfluxDB 1.x, Kafka metadata) is
//! backed up by a shell command the operator configures, and restored by another.
//!
//! - `output = "stdout"`: the backup command's standard output *is* the backup (`sqlite3 DB
//!   .dump`). It is streamed into the sink as one part, [`STDOUT_PART`], as it is produced.
//! - `output = "directory"`: the backup command writes a directory, named by `$BACKSTOP_DIR` (a
//!   fresh temporary directory: `influxd backup -portable "$BACKSTOP_DIR"`); once it has exited
//!   successfully, the directory is streamed as a tar archive (GNU tar, sorted names, so an
//!   unchanged file deduplicates) into the part [`DIRECTORY_PART`], and removed.
//!
//! A restore command gets the backup on its standard input (stdout backups) or as the extracted
//! directory `$BACKSTOP_DIR` (directory backups), and where to restore as `$BACKSTOP_TARGET`
//! (`backstop restore --to`, or a scratch path in a test restore). A verify command runs after a
//! test restore with the same `$BACKSTOP_TARGET`; exit 0 means the restored copy is good.
//!
//! Invariants:
//! - Commands run by `sh -c`, in their own process group, with [`crate::child_env`]'s scrubbed
//!   environment; a timeout or a dropped future kills the whole group.
//! - A non-zero exit, a kill or a timeout is an error carrying the tail of standard error; the
//!   caller then writes no manifest, so no completed backup exists.
//! - Nothing is buffered whole in memory: parts stream through, and the byte count and SHA3-256
//!   of the raw stream are recorded in [`CommandReport`] and checked again when it is read back.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::process::Command;

use crate::SourceError;
use crate::capture::{Group, Measured, StderrTail, status_text};
use crate::child_env::scrub_tool;
use crate::pg::logical::{DumpSink, PartReader};

/// The part of a stdout backup.
pub const STDOUT_PART: &str = "command/stdout";
/// The part of a directory backup (a tar archive of the directory).
pub const DIRECTORY_PART: &str = "command/directory.tar";
/// Default limit of each command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// What the backup command produces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandOutput {
    /// Its standard output is the backup.
    #[default]
    Stdout,
    /// It writes a directory (`$BACKSTOP_DIR`), archived as tar once it succeeded.
    Directory,
}

impl CommandOutput {
    pub fn part(&self) -> &'static str {
        match self {
            CommandOutput::Stdout => STDOUT_PART,
            CommandOutput::Directory => DIRECTORY_PART,
        }
    }
}

/// A configured command source.
#[derive(Clone, Debug)]
pub struct CommandSource {
    /// Run by `sh -c`; see the module docs for what it gets.
    pub backup: String,
    /// Run by `sh -c` to restore; recorded in the manifest so a restore needs only the
    /// repository.
    pub restore: Option<String>,
    /// Run after a test restore; exit 0 means good.
    pub verify: Option<String>,
    pub output: CommandOutput,
    /// Limit of each command (and of the tar step).
    pub timeout: Duration,
    /// Where temporary directories go (default: the system's).
    pub work_dir: Option<PathBuf>,
}

/// What a command backup recorded, stored in the manifest (`extra.command`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandReport {
    pub output: CommandOutput,
    /// The part holding the raw stream.
    pub part: String,
    /// Bytes of the raw stream (the command's output, or the tar archive).
    pub bytes: u64,
    /// SHA3-256 (hex) of the raw stream.
    pub sha3: String,
    /// The commands, as configured when the backup was taken.
    pub backup_command: String,
    pub restore_command: Option<String>,
    pub verify_command: Option<String>,
    pub timeout_secs: u64,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

fn shell(command: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(command);
    scrub_tool(&mut cmd);
    cmd.process_group(0).kill_on_drop(true);
    cmd
}

fn spawn_error(command: &str, e: std::io::Error) -> SourceError {
    SourceError::ToolSpawn {
        tool: format!("sh -c {command:?}"),
        source: e,
    }
}

/// The spawn error of a prepared command: a shell command is named as `sh -c "..."`, a tool by
/// what the caller shows.
fn spawn_error_of(cmd: &Command, shown: &str, e: std::io::Error) -> SourceError {
    if cmd.as_std().get_program() == "sh" {
        spawn_error(shown, e)
    } else {
        SourceError::ToolSpawn {
            tool: shown.into(),
            source: e,
        }
    }
}

fn temp_dir(work_dir: Option<&Path>, prefix: &str) -> Result<tempfile::TempDir, SourceError> {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    match work_dir {
        Some(d) => b.tempdir_in(d),
        None => b.tempdir(),
    }
    .map_err(|e| SourceError::io("creating a temporary directory for a command source", e))
}

/// Waits for `work`, which ends with the child's exit, within `limit`, and judges the exit: past
/// the limit the child's whole process group is killed ([`SourceError::CommandTimeout`]); a
/// non-zero exit is [`SourceError::CommandFailed`] with the tail of its standard error, and is
/// the reason even when the work failed too (a command that dies cuts its streams short).
/// Returns what the work produced beside the exit status.
async fn supervise<T>(
    what: &str,
    command: &str,
    limit: Duration,
    mut group: Group,
    tail: StderrTail,
    work: impl std::future::Future<Output = (T, std::io::Result<std::process::ExitStatus>)>,
) -> Result<T, SourceError> {
    let (produced, status) = match tokio::time::timeout(limit, work).await {
        Ok(done) => done,
        Err(_) => {
            drop(group);
            tail.abort();
            return Err(SourceError::CommandTimeout {
                what: what.into(),
                command: command.into(),
                limit_secs: limit.as_secs(),
                stderr: String::new(),
            });
        }
    };
    let status = status.map_err(|e| SourceError::io(format!("waiting for the {what}"), e))?;
    group.reaped();
    let stderr = tail.finish().await;
    if !status.success() {
        return Err(SourceError::CommandFailed {
            what: what.into(),
            command: command.into(),
            status: status_text(&status),
            stderr,
        });
    }
    Ok(produced)
}

/// Runs `command` to its end (stdout discarded), within `limit`.
async fn run_plain(
    what: &str,
    command: &str,
    envs: &[(&str, &Path)],
    limit: Duration,
) -> Result<(), SourceError> {
    let mut cmd = shell(command);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    run_captured(what, command, cmd, limit).await.map(|_| ())
}

/// Runs a prepared `cmd` (spawned with `process_group(0)`; `shown` names it in errors) to its
/// end within `limit`, and returns its standard output, read whole: for tools whose output is
/// small (a list of refs), never for a backup's stream.
pub(crate) async fn run_captured(
    what: &str,
    shown: &str,
    mut cmd: Command,
    limit: Duration,
) -> Result<Vec<u8>, SourceError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| spawn_error_of(&cmd, shown, e))?;
    let group = Group::new(&child);
    let tail = StderrTail::spawn(child.stderr.take());
    let stdout = child.stdout.take();
    let work = async {
        let mut out = Vec::new();
        if let Some(mut s) = stdout {
            // A read error shows as a short output; the exit status judges the run.
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut out).await;
        }
        (out, child.wait().await)
    };
    supervise(what, shown, limit, group, tail, work).await
}

/// Runs `command` with its standard output streamed into `sink` as `part`, within `limit`;
/// returns the stream's byte count and SHA3.
async fn stream_out(
    what: &str,
    command: &str,
    envs: &[(&str, &Path)],
    limit: Duration,
    part: &str,
    sink: &dyn DumpSink,
) -> Result<(u64, String), SourceError> {
    let mut cmd = shell(command);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    stream_cmd_out(what, command, cmd, limit, part, sink).await
}

/// Runs a prepared `cmd` (spawned with `process_group(0)`; `shown` names it in errors) with its
/// standard output streamed into `sink` as `part`, within `limit`; returns the stream's byte
/// count and SHA3.
pub(crate) async fn stream_cmd_out(
    what: &str,
    shown: &str,
    mut cmd: Command,
    limit: Duration,
    part: &str,
    sink: &dyn DumpSink,
) -> Result<(u64, String), SourceError> {
    let command = shown;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| spawn_error_of(&cmd, shown, e))?;
    let group = Group::new(&child);
    let tail = StderrTail::spawn(child.stderr.take());
    let Some(stdout) = child.stdout.take() else {
        return Err(SourceError::Task(
            "the command's stdout was not piped".into(),
        ));
    };
    let (reader, measure) = Measured::new(stdout);
    let work = async {
        let stored = sink.put_part(part, Box::pin(reader)).await;
        let status = child.wait().await;
        (stored, status)
    };
    let stored = supervise(what, command, limit, group, tail, work).await?;
    stored.map_err(|source| SourceError::Sink {
        part: part.into(),
        source,
    })?;
    Ok(measure.figures())
}

/// Takes one backup of `source` into `sink` (see the module docs).
pub async fn backup(
    source: &CommandSource,
    sink: &dyn DumpSink,
) -> Result<CommandReport, SourceError> {
    let started_at = Utc::now();
    let limit = source.timeout;
    let part = source.output.part();
    let (bytes, sha3) = match source.output {
        CommandOutput::Stdout => {
            stream_out("backup command", &source.backup, &[], limit, part, sink).await?
        }
        CommandOutput::Directory => {
            let dir = temp_dir(source.work_dir.as_deref(), "backstop-command-")?;
            run_plain(
                "backup command",
                &source.backup,
                &[("BACKSTOP_DIR", dir.path())],
                limit,
            )
            .await?;
            stream_out(
                "archive step (tar) of the directory the backup command wrote",
                "exec tar --sort=name --numeric-owner -C \"$BACKSTOP_DIR\" -cf - .",
                &[("BACKSTOP_DIR", dir.path())],
                limit,
                part,
                sink,
            )
            .await?
        }
    };
    Ok(CommandReport {
        output: source.output,
        part: part.to_string(),
        bytes,
        sha3,
        backup_command: source.backup.clone(),
        restore_command: source.restore.clone(),
        verify_command: source.verify.clone(),
        timeout_secs: limit.as_secs(),
        started_at,
        finished_at: Utc::now(),
    })
}

/// Checks the figures of a stream read back against the report's.
pub fn check_figures(
    what: &str,
    expected: (u64, &str),
    got: (u64, String),
) -> Result<(), SourceError> {
    if got.0 != expected.0 || got.1 != expected.1 {
        return Err(SourceError::Mismatch {
            what: what.into(),
            why: format!(
                "the backup recorded {} bytes with SHA3-256 {}, but {} bytes with SHA3-256 {} were read back",
                expected.0, expected.1, got.0, got.1
            ),
        });
    }
    Ok(())
}

/// Feeds `input` to `command`'s standard input within `limit`; returns the figures of what was
/// fed.
async fn stream_in(
    what: &str,
    command: &str,
    envs: &[(&str, &Path)],
    limit: Duration,
    input: PartReader,
) -> Result<(u64, String), SourceError> {
    let mut cmd = shell(command);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| spawn_error(command, e))?;
    let group = Group::new(&child);
    let tail = StderrTail::spawn(child.stderr.take());
    let Some(mut stdin) = child.stdin.take() else {
        return Err(SourceError::Task(
            "the command's stdin was not piped".into(),
        ));
    };
    let (mut reader, measure) = Measured::new(input);
    let work = async {
        let copied = tokio::io::copy(&mut reader, &mut stdin).await;
        let closed = stdin.shutdown().await;
        drop(stdin);
        let status = child.wait().await;
        (copied.and(closed), status)
    };
    let copied = supervise(what, command, limit, group, tail, work).await?;
    // A read error of the backup (a damaged chunk) is the backup's fault, not the command's.
    copied.map_err(|e| SourceError::Source {
        part: what.into(),
        source: e.into(),
    })?;
    Ok(measure.figures())
}

/// Restores a command backup: `input` is its part, `target` goes to `$BACKSTOP_TARGET`.
pub async fn restore(
    report: &CommandReport,
    restore_command: &str,
    target: &str,
    input: PartReader,
    work_dir: Option<&Path>,
) -> Result<(), SourceError> {
    let limit = Duration::from_secs(report.timeout_secs.max(1));
    let target = Path::new(target);
    let figures = match report.output {
        CommandOutput::Stdout => {
            stream_in(
                "restore command",
                restore_command,
                &[("BACKSTOP_TARGET", target)],
                limit,
                input,
            )
            .await?
        }
        CommandOutput::Directory => {
            let dir = temp_dir(work_dir, "backstop-restore-")?;
            let figures = stream_in(
                "extraction (tar) of the backed-up directory",
                "exec tar --no-same-owner -C \"$BACKSTOP_DIR\" -xf -",
                &[("BACKSTOP_DIR", dir.path())],
                limit,
                input,
            )
            .await?;
            check_figures(
                "the backed-up directory's archive",
                (report.bytes, &report.sha3),
                figures.clone(),
            )?;
            run_plain(
                "restore command",
                restore_command,
                &[("BACKSTOP_DIR", dir.path()), ("BACKSTOP_TARGET", target)],
                limit,
            )
            .await?;
            figures
        }
    };
    check_figures("the restored stream", (report.bytes, &report.sha3), figures)
}

/// A test restore: the backup restored into a scratch `$BACKSTOP_TARGET` inside a temporary
/// directory, then the verify command run against it. Without a restore or verify command,
/// only the stream's bytes and SHA3 are checked (every chunk is checked by the reader too).
pub async fn test_restore(
    report: &CommandReport,
    input: PartReader,
    work_dir: Option<&Path>,
) -> Result<(), SourceError> {
    let (Some(restore_cmd), Some(verify_cmd)) = (&report.restore_command, &report.verify_command)
    else {
        let (mut reader, measure) = Measured::new(input);
        tokio::io::copy(&mut reader, &mut tokio::io::sink())
            .await
            .map_err(|e| SourceError::Source {
                part: report.part.clone(),
                source: e.into(),
            })?;
        return check_figures(
            "the backup's stream",
            (report.bytes, &report.sha3),
            measure.figures(),
        );
    };
    let scratch = temp_dir(work_dir, "backstop-verify-")?;
    let target = scratch.path().join("restored");
    let target_s = target.to_string_lossy().to_string();
    restore(report, restore_cmd, &target_s, input, Some(scratch.path())).await?;
    let limit = Duration::from_secs(report.timeout_secs.max(1));
    match run_plain(
        "verify command",
        verify_cmd,
        &[("BACKSTOP_TARGET", &target)],
        limit,
    )
    .await
    {
        // The restored copy failed its check: the backup is at fault.
        Err(SourceError::CommandFailed {
            command,
            status,
            stderr,
            ..
        }) => Err(SourceError::Mismatch {
            what: format!("the verify command `{command}` on the restored copy"),
            why: format!("it failed ({status}): {stderr}"),
        }),
        other => other,
    }
}

/// Copies a raw stream to `out` (through `out.partial`, renamed once complete and checked).
pub async fn write_raw(
    input: impl AsyncRead + Unpin,
    expected: (u64, &str),
    out: &Path,
) -> Result<(), SourceError> {
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut file = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| SourceError::io(format!("creating {}", partial.display()), e))?;
    let (mut reader, measure) = Measured::new(input);
    let copied = tokio::io::copy(&mut reader, &mut file).await;
    let synced = file.sync_all().await;
    drop(file);
    let result = match (copied, synced) {
        (Err(e), _) => Err(SourceError::Source {
            part: out.display().to_string(),
            source: e.into(),
        }),
        (_, Err(e)) => Err(SourceError::io(format!("writing {}", partial.display()), e)),
        _ => check_figures("the written file", expected, measure.figures()),
    };
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(e);
    }
    tokio::fs::rename(&partial, out)
        .await
        .map_err(|e| SourceError::io(format!("renaming {} into place", partial.display()), e))
}
