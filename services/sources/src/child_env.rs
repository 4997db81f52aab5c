//! What external programs inherit: nothing secret of Backstop's.
//!
//! `pg_dump`, `pg_restore`, `pg_basebackup` and the scratch servers are other people's code
//! (and a test restore runs code the source database's owners wrote: CHECK constraints,
//! generated columns). They get the source's own password through `PGPASSWORD` when its URL has
//! one, and never Backstop's secrets: the master key, which opens every backup, and the URLs that
//! may embed credentials of the ledger's bus and the read models.
//!
//! - [`TOOL_SECRETS`] are removed from every client tool's environment, S3 credentials included.
//! - [`SERVER_SECRETS`] are removed from servers Backstop starts (`pg_ctl`); S3 credentials stay,
//!   because a physical test restore's server runs `backstop wal-fetch` as its
//!   `restore_command`, which reads the repository. The master key reaches that command only as
//!   a file named on its command line (`[repository] master_key_file`).

/// Removed from the environment of servers Backstop starts.
pub const SERVER_SECRETS: &[&str] = &[
    "BACKSTOP_MASTER_KEY",
    "BACKSTOP_PROJECTIONS_URL",
    "BACKSTOP_NATS",
];

/// Removed from the environment of client tools (pg_dump, pg_restore, pg_basebackup, ...).
pub const TOOL_SECRETS: &[&str] = &[
    "BACKSTOP_MASTER_KEY",
    "BACKSTOP_PROJECTIONS_URL",
    "BACKSTOP_NATS",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

/// A client tool's command without [`TOOL_SECRETS`].
pub fn scrub_tool(cmd: &mut tokio::process::Command) -> &mut tokio::process::Command {
    for name in TOOL_SECRETS {
        cmd.env_remove(name);
    }
    cmd
}

/// A server's command without [`SERVER_SECRETS`].
pub fn scrub_server(cmd: &mut tokio::process::Command) -> &mut tokio::process::Command {
    for name in SERVER_SECRETS {
        cmd.env_remove(name);
    }
    cmd
}

/// [`scrub_server`] for a blocking command (stopping a server from `Drop`).
pub fn scrub_server_std(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for name in SERVER_SECRETS {
        cmd.env_remove(name);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `env` (a real program) with a secret and a harmless variable set, scrubbed.
    async fn env_after(
        scrub: fn(&mut tokio::process::Command) -> &mut tokio::process::Command,
    ) -> String {
        let mut cmd = tokio::process::Command::new("env");
        for name in TOOL_SECRETS {
            cmd.env(name, "very-secret-value");
        }
        cmd.env("PGAPPNAME", "backstop-test");
        scrub(&mut cmd);
        let out = cmd.output().await.expect("run env");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[tokio::test]
    async fn client_tools_see_no_secret_of_backstops() {
        let env = env_after(scrub_tool).await;
        assert!(env.contains("PGAPPNAME=backstop-test"), "{env}");
        assert!(!env.contains("very-secret-value"), "{env}");
    }

    #[tokio::test]
    async fn servers_see_no_master_key_but_keep_the_s3_credentials_wal_fetch_needs() {
        let env = env_after(scrub_server).await;
        for name in SERVER_SECRETS {
            assert!(!env.contains(&format!("{name}=")), "{name} in {env}");
        }
        assert!(
            env.contains("AWS_SECRET_ACCESS_KEY=very-secret-value"),
            "{env}"
        );
    }
}
