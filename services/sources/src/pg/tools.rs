//! Locating and running the PostgreSQL client tools (`pg_dump`, `pg_restore`).
//!
//! Invariants:
//! - A tool older than the server is never used (`pg_dump` refuses newer servers anyway, but
//!   picking the right one up front gives a clear error instead of its message).
//! - Search order: an explicit directory (from options), else `BACKSTOP_PG_BIN`, else `PATH`
//!   followed by `/usr/lib/postgresql/*/bin` (newest first); the first tool whose major version
//!   is at least the server's wins.
//! - Every child is started with `kill_on_drop`, so an abandoned dump or restore leaves no
//!   process behind. Its stderr is collected (the last 16 KiB) for error messages.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::error::SourceError;

/// A located PostgreSQL client tool and its version.
#[derive(Debug, Clone)]
pub(crate) struct Tool {
    pub name: &'static str,
    pub path: PathBuf,
    pub version: String,
}

fn candidate_dirs(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(dir) = explicit {
        return vec![dir.to_path_buf()];
    }
    if let Some(dir) = std::env::var_os("BACKSTOP_PG_BIN").filter(|d| !d.is_empty()) {
        return vec![PathBuf::from(dir)];
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let major: u32 = e.file_name().to_str()?.parse().ok()?;
                    Some((major, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    versioned.sort_by_key(|v| std::cmp::Reverse(v.0));
    dirs.extend(versioned.into_iter().map(|(_, d)| d));
    dirs
}

/// `pg_dump (PostgreSQL) 15.18 (Debian ...)` -> (15, "15.18").
fn parse_version(out: &str) -> Option<(u32, String)> {
    let token = out
        .split_whitespace()
        .find(|t| t.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let major: u32 = token
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((major, token.to_string()))
}

/// Finds `name` with a major version of at least `server_major`.
pub(crate) async fn locate(
    name: &'static str,
    explicit: Option<&Path>,
    server_major: u32,
) -> Result<Tool, SourceError> {
    let dirs = candidate_dirs(explicit);
    let mut too_old: Option<String> = None;
    for dir in &dirs {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let out = match crate::child_env::scrub_tool(&mut Command::new(&path))
            .arg("--version")
            .output()
            .await
        {
            Ok(o) if o.status.success() => o,
            _ => continue,
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let Some((major, version)) = parse_version(&text) else {
            continue;
        };
        if major >= server_major {
            return Ok(Tool {
                name,
                path,
                version,
            });
        }
        too_old.get_or_insert(version);
    }
    match too_old {
        Some(found) => Err(SourceError::ToolTooOld {
            tool: name.to_string(),
            found,
            server: server_major,
        }),
        None => Err(SourceError::ToolMissing {
            tool: name.to_string(),
            major: server_major,
            searched: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        }),
    }
}

impl Tool {
    /// A command for this tool with quiet, predictable defaults.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.path);
        crate::child_env::scrub_tool(&mut cmd);
        cmd.kill_on_drop(true)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    pub fn spawn(&self, cmd: &mut Command) -> Result<Child, SourceError> {
        cmd.spawn().map_err(|source| SourceError::ToolSpawn {
            tool: self.name.to_string(),
            source,
        })
    }
}

/// Collects a child's stderr, keeping the last 16 KiB (enough for any error pg_dump prints).
pub(crate) async fn collect_stderr(stderr: Option<tokio::process::ChildStderr>) -> String {
    const KEEP: usize = 16 * 1024;
    let Some(mut stderr) = stderr else {
        return String::new();
    };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * KEEP {
                    kept.drain(..kept.len() - KEEP);
                }
            }
        }
    }
    if kept.len() > KEEP {
        kept.drain(..kept.len() - KEEP);
    }
    String::from_utf8_lossy(&kept).trim().to_string()
}

pub(crate) fn tool_failed(
    tool: &Tool,
    doing: &str,
    status: std::process::ExitStatus,
    stderr: String,
) -> SourceError {
    let mut stderr = if stderr.is_empty() {
        "(no message)".to_string()
    } else {
        stderr
    };
    if stderr.contains("role") && stderr.contains("does not exist") {
        stderr.push_str(
            " (hint: the roles owning the objects do not exist on the target; create them, or restore with --no-owner)",
        );
    }
    SourceError::ToolFailed {
        tool: tool.name.to_string(),
        doing: doing.to_string(),
        status: status.to_string(),
        stderr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_version("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some((15, "15.18".to_string()))
        );
        assert_eq!(
            parse_version("pg_restore (PostgreSQL) 17beta1"),
            Some((17, "17beta1".to_string()))
        );
        assert_eq!(parse_version("nonsense"), None);
    }
}
