//! Running PostgreSQL server programs as the right user, and giving them their files.
//!
//! PostgreSQL refuses to run as root. When this process is root, server programs (`pg_ctl`,
//! `postgres`) run as an unprivileged account (by default `postgres`) through `runuser` (or
//! `su`), and the directories the server must own are chowned to it first.

use std::path::{Path, PathBuf};

use tokio::process::Command;

/// The effective uid of this process (from `/proc/self/status`; 0 when unknown is not assumed).
pub(crate) fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

pub(crate) fn is_root() -> bool {
    effective_uid() == Some(0)
}

/// uid and gid of `user`, by `id`.
pub(crate) async fn user_ids(user: &str) -> Result<(u32, u32), String> {
    let id = |flag: &'static str| {
        let user = user.to_string();
        async move {
            let out = Command::new("id")
                .arg(flag)
                .arg(&user)
                .output()
                .await
                .map_err(|e| format!("cannot run `id`: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "user {user:?} does not exist (`id {flag} {user}` failed); PostgreSQL cannot run as root, so name an existing unprivileged user"
                ));
            }
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u32>()
                .map_err(|_| format!("`id {flag} {user}` printed no number"))
        }
    };
    Ok((id("-u").await?, id("-g").await?))
}

/// Recursively chowns `path` (not following links).
pub(crate) fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// A command running `program` as `user` (when given), else directly, without Backstop's
/// secrets in its environment (`crate::child_env::SERVER_SECRETS`).
pub(crate) fn command_as(user: Option<&str>, program: &Path) -> Command {
    let mut c = command_as_inner(user, program);
    crate::child_env::scrub_server(&mut c);
    c
}

fn command_as_inner(user: Option<&str>, program: &Path) -> Command {
    let Some(user) = user else {
        return Command::new(program);
    };
    if let Some(runuser) = find_program("runuser") {
        let mut c = Command::new(runuser);
        c.arg("-u").arg(user).arg("--").arg(program);
        c
    } else {
        // `su USER -c 'exec "$0" "$@"' PROGRAM ARGS...` passes arguments without re-quoting.
        let mut c = Command::new(find_program("su").unwrap_or_else(|| PathBuf::from("su")));
        c.args(["-s", "/bin/sh", user, "-c", "exec \"$0\" \"$@\""])
            .arg(program);
        c
    }
}
