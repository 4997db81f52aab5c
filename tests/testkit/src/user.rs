//! Running PostgreSQL as an unprivileged user when the tests run as root.
//!
//! `initdb` and `postgres` refuse to run as root. When the effective uid is 0, the kit runs them
//! as the `postgres` system user (or `BACKSTOP_TESTKIT_PG_USER`) via `runuser -u USER --` (or
//! `su -s /bin/sh USER -c`), and every file the server must own is chowned to that user. When the
//! tests do not run as root, commands run directly as the current user and nothing is chowned.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

use crate::process;

/// The unprivileged account PostgreSQL runs as when the tests run as root.
#[derive(Clone, Debug)]
pub(crate) struct ServerUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// `runuser` if present, else `su`.
    launcher: Launcher,
}

#[derive(Clone, Debug)]
enum Launcher {
    Runuser(PathBuf),
    Su(PathBuf),
}

fn id_of(user: &str, flag: &str) -> anyhow::Result<u32> {
    let out = process::run_ok(Command::new("id").arg(flag).arg(user), crate::deadline())
        .with_context(|| {
            format!(
                "the tests run as root, so PostgreSQL must run as the unprivileged user `{user}`, \
                 but `id {flag} {user}` failed; create that user (Debian's postgresql package \
                 does) or set BACKSTOP_TESTKIT_PG_USER to an existing non-root user"
            )
        })?;
    out.stdout
        .trim()
        .parse()
        .with_context(|| format!("`id {flag} {user}` printed {:?}, not a number", out.stdout))
}

fn lookup() -> anyhow::Result<Option<ServerUser>> {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Ok(None);
    }
    let name = std::env::var("BACKSTOP_TESTKIT_PG_USER").unwrap_or_else(|_| "postgres".into());
    let uid = id_of(&name, "-u")?;
    let gid = id_of(&name, "-g")?;
    if uid == 0 {
        bail!(
            "BACKSTOP_TESTKIT_PG_USER={name} is root; PostgreSQL refuses to run as root: name a non-root user"
        );
    }
    let launcher = match crate::require_tool("runuser") {
        Ok(p) => Launcher::Runuser(p),
        Err(_) => Launcher::Su(crate::require_tool("su").context(
            "running as root needs `runuser` or `su` to start PostgreSQL as an unprivileged user",
        )?),
    };
    Ok(Some(ServerUser {
        name,
        uid,
        gid,
        launcher,
    }))
}

/// The server user when running as root, `None` otherwise. Looked up once per process.
pub(crate) fn current() -> anyhow::Result<Option<ServerUser>> {
    static USER: OnceLock<Result<Option<ServerUser>, String>> = OnceLock::new();
    match USER.get_or_init(|| lookup().map_err(|e| format!("{e:#}"))) {
        Ok(u) => Ok(u.clone()),
        Err(e) => bail!("{e}"),
    }
}

/// The name of the user PostgreSQL runs as when the tests run as root (`Some("postgres")`), or
/// `None` when the tests run unprivileged and the server runs as the current user.
pub fn server_user() -> anyhow::Result<Option<String>> {
    Ok(current()?.map(|u| u.name))
}

impl ServerUser {
    /// A command that runs `program args...` as this user.
    pub fn command(&self, program: &Path) -> Command {
        match &self.launcher {
            Launcher::Runuser(runuser) => {
                let mut c = Command::new(runuser);
                c.arg("-u").arg(&self.name).arg("--").arg(program);
                c
            }
            Launcher::Su(su) => {
                // `su USER -c 'exec "$0" "$@"' PROGRAM ARGS...` passes arguments without re-quoting.
                let mut c = Command::new(su);
                c.arg("-s")
                    .arg("/bin/sh")
                    .arg(&self.name)
                    .arg("-c")
                    .arg("exec \"$0\" \"$@\"")
                    .arg(program);
                c
            }
        }
    }
}

/// A command that runs `program` as the server user when running as root, else directly.
pub(crate) fn server_command(user: &Option<ServerUser>, program: &Path) -> Command {
    match user {
        Some(u) => u.command(program),
        None => Command::new(program),
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("could not chown {} to uid {uid}", path.display()))?;
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("could not stat {}", path.display()))?;
    if meta.is_dir() {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("could not list {}", path.display()))?
        {
            let entry = entry.with_context(|| format!("could not list {}", path.display()))?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Makes `path` (recursively) owned by the server user, so PostgreSQL can read and write it (a WAL
/// archive directory, a restored data directory). Does nothing when the tests don't run as root.
pub fn give_to_server_user(path: &Path) -> anyhow::Result<()> {
    match current()? {
        Some(u) => chown_tree(path, u.uid, u.gid),
        None => Ok(()),
    }
}

/// A fresh temporary directory the server user owns (when root) and can traverse, for files a
/// test shares with PostgreSQL, e.g. a WAL archive or a data directory restored from a backup.
/// Removed on drop.
pub fn server_tempdir() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("backstop-test-")
        .tempdir()
        .context("could not create a temporary directory (is TMPDIR writable?)")?;
    hand_over(dir)
}

/// Like [`server_tempdir`], but under `parent`, which the server user must be able to traverse.
pub fn server_tempdir_in(parent: &Path) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("backstop-test-")
        .tempdir_in(parent)
        .with_context(|| {
            format!(
                "could not create a temporary directory in {}",
                parent.display()
            )
        })?;
    hand_over(dir)
}

/// A command that runs `program` as the server user when running as root (how PostgreSQL's own
/// helpers, an `archive_command` script or pgBackRest must run), else directly.
pub fn server_user_command(program: &Path) -> anyhow::Result<Command> {
    Ok(server_command(&current()?, program))
}

fn hand_over(dir: tempfile::TempDir) -> anyhow::Result<tempfile::TempDir> {
    give_to_server_user(dir.path())?;
    // 0700 owned by the server user: root can still use it; nobody else needs to.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("could not chmod {}", dir.path().display()))?;
    Ok(dir)
}
