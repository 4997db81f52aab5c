//! One place that turns the configuration (and a command's flags) into what the commands and
//! the long-running processes use: where events go ([`Events`]: the local ledger, the running
//! `serve` through its control socket, or NATS), the repository with its key-access recorder,
//! the configured sources and schedules, the operator's identity, and this binary as
//! PostgreSQL must run it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use backstop_ledger::{Appender, Ledger, LedgerError};
use backstop_ops::SourceSpec;
use backstop_repo::{KeyAccess, Location, MasterKey, Repository, S3Settings};
use clap::Args;
use tokio::sync::mpsc::unbounded_channel;

use crate::config::Config;

/// The source name when none is given and none (or several) are configured.
pub const ADHOC: &str = "adhoc";

#[derive(Args, Clone, Default)]
pub struct RepoArgs {
    /// Repository: a directory or s3://BUCKET/PREFIX (overrides repository.location).
    #[arg(long)]
    pub repo: Option<String>,
    /// File holding the master key (default: $BACKSTOP_MASTER_KEY).
    #[arg(long)]
    pub master_key_file: Option<PathBuf>,
}

/// Where events go, and the ledger if this process opened it (closed at the end).
pub struct Events {
    pub appender: Arc<dyn Appender>,
    pub ledger: Option<Ledger>,
    pub(crate) key_recorder: Option<tokio::task::JoinHandle<()>>,
}

impl Events {
    pub async fn open(config: &Config, data_dir: &Path) -> anyhow::Result<Events> {
        match Ledger::open(&config.ledger_config(data_dir)) {
            Ok(ledger) => Ok(Events {
                appender: Arc::new(ledger.clone()),
                ledger: Some(ledger),
                key_recorder: None,
            }),
            Err(LedgerError::Locked { path }) => match &config.nats.url {
                Some(url) => {
                    let client = crate::runtime::connect_nats(url, &config.nats).await?;
                    Ok(Events {
                        appender: Arc::new(crate::runtime::remote_ledger(config, client)?),
                        ledger: None,
                        key_recorder: None,
                    })
                }
                None => Ok(Events {
                    appender: crate::control::appender_beside_serve(data_dir, &path).await?,
                    ledger: None,
                    key_recorder: None,
                }),
            },
            Err(e) => Err(e).context(format!("cannot open the ledger in {}", data_dir.display())),
        }
    }

    /// Waits for every key access to be recorded, then closes the ledger.
    pub async fn close(self) {
        let Events {
            appender,
            ledger,
            key_recorder,
        } = self;
        if let Some(t) = key_recorder {
            let _ = t.await;
        }
        // The appender may be a handle on the ledger: the writer stops only when every handle
        // is gone.
        drop(appender);
        if let Some(l) = ledger {
            l.close().await;
        }
    }
}

pub fn location(config: &Config, data_dir: &Path, args: &RepoArgs) -> anyhow::Result<Location> {
    let text = args
        .repo
        .clone()
        .or_else(|| config.repository.location.clone())
        .unwrap_or_else(|| data_dir.join("repository").display().to_string());
    Ok(Location::parse(&text)?)
}

pub fn s3_settings(config: &Config) -> S3Settings {
    let r = &config.repository;
    S3Settings {
        endpoint: r.endpoint.clone(),
        region: r.region.clone(),
        access_key: r.access_key_id.clone(),
        secret_key: r.secret_access_key.clone(),
        path_style: r.path_style.unwrap_or(true),
        object_lock: r.object_lock.map(|d| d.as_std()),
        ..Default::default()
    }
}

pub fn master_key(config: &Config, args: &RepoArgs) -> anyhow::Result<MasterKey> {
    let file = args
        .master_key_file
        .clone()
        .or_else(|| config.repository.master_key_file.clone());
    Ok(MasterKey::load(file.as_deref())?)
}

/// Opens the repository; key unwraps are recorded through `events`.
pub async fn open_repository(
    config: &Config,
    data_dir: &Path,
    args: &RepoArgs,
    events: &mut Events,
) -> anyhow::Result<Repository> {
    let master = master_key(config, args)?;
    let loc = location(config, data_dir, args)?;
    let backend = loc.open(Some(s3_settings(config))).await?;
    let (tx, rx) = unbounded_channel::<KeyAccess>();
    let repo = Repository::open(backend, &master, Arc::new(tx)).await?;
    events.key_recorder = Some(tokio::spawn(backstop_ops::keys::record_key_accesses(
        rx,
        events.appender.clone(),
    )));
    Ok(repo)
}

pub fn source_specs(config: &Config) -> Vec<SourceSpec> {
    config
        .sources
        .iter()
        .map(|s| {
            use crate::config::SourceKindSection as K;
            let secs = |t: Option<u64>| {
                t.map(std::time::Duration::from_secs)
                    .unwrap_or(backstop_sources::command::DEFAULT_TIMEOUT)
            };
            let kind = match &s.kind {
                K::Postgres(pg) => {
                    return SourceSpec::postgres(&s.name, &pg.postgres, pg.jobs.unwrap_or(2));
                }
                K::Command(c) => {
                    backstop_ops::SourceKind::Command(backstop_sources::command::CommandSource {
                        backup: c.backup.clone(),
                        restore: c.restore.clone(),
                        verify: c.verify.clone(),
                        output: c.output,
                        timeout: secs(c.timeout_seconds),
                        work_dir: None,
                    })
                }
                K::Redis(r) => {
                    backstop_ops::SourceKind::Redis(backstop_sources::redis::RedisSource {
                        url: r.url.clone(),
                        timeout: secs(r.timeout_seconds),
                    })
                }
                K::Git(g) => backstop_ops::SourceKind::Git(backstop_sources::git::GitSource {
                    url: g.url.clone(),
                    mirror: g.mirror.clone(),
                    refs: g.ref_patterns(),
                    // The working mirror: main.rs puts the data directory in use into the config.
                    work_dir: config
                        .data_dir(None)
                        .join("git")
                        .join(format!("{}.git", s.name)),
                    force: g.force,
                    timeout: g
                        .timeout_seconds
                        .map(std::time::Duration::from_secs)
                        .unwrap_or(backstop_sources::git::DEFAULT_TIMEOUT),
                }),
                K::Config(c) => {
                    backstop_ops::SourceKind::Config(backstop_sources::config::ConfigSource {
                        env_file: c.env_file.clone(),
                        env_vars: c.env_vars.clone(),
                        json_files: c.json_files.clone(),
                        postgres_settings: c.postgres_settings.clone(),
                    })
                }
                K::Files(f) => {
                    backstop_ops::SourceKind::Files(backstop_sources::files::FilesSource {
                        paths: f.paths.clone(),
                        include: f.include.clone(),
                        exclude: f.exclude.clone(),
                    })
                }
            };
            SourceSpec {
                name: s.name.clone(),
                kind,
            }
        })
        .collect()
}

/// The actor name for events this command appends (see `identity`).
pub fn operator() -> String {
    crate::identity::operator()
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

// ---------------------------------------------------------------------------------------------
// Sources

/// The source named on the command line, else the only configured one, else `adhoc` (what
/// `backup --pg` records without --name) when none is configured.
pub fn configured_source(config: &Config, explicit: Option<&str>) -> anyhow::Result<String> {
    if let Some(s) = explicit {
        return Ok(s.to_string());
    }
    match config.sources.as_slice() {
        [] => Ok(ADHOC.into()),
        [only] => Ok(only.name.clone()),
        many => bail!(
            "say which source: --source NAME (configured: {})",
            many.iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// As [`configured_source`], but when nothing is configured, the only source with physical
/// backups or WAL in the repository.
pub async fn source_in_repo(
    config: &Config,
    explicit: Option<&str>,
    repo: &Repository,
) -> anyhow::Result<String> {
    if explicit.is_some() || !config.sources.is_empty() {
        return configured_source(config, explicit);
    }
    let mut found: BTreeSet<String> = backstop_ops::catalog::physical_backups(repo, None)
        .await?
        .into_iter()
        .map(|b| b.manifest.source)
        .collect();
    for o in repo.backend().list(backstop_ops::wal::WAL_PREFIX).await? {
        if let Some((s, _)) = backstop_ops::wal::parse_wal_object_key(&o.key) {
            found.insert(s);
        }
    }
    match found.len() {
        0 => bail!(
            "the repository holds no physical backup and no WAL yet: take one with `backstop backup --physical`"
        ),
        1 => Ok(found.into_iter().next().unwrap_or_default()),
        _ => bail!(
            "say which source: --source NAME (the repository has physical backups or WAL of {})",
            found.into_iter().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The configuration file this process was started with (absolute), if any: `--config`/`-c`,
/// `BACKSTOP_CONFIG`, else `./backstop.toml` when present (as `Config::load` does).
fn config_path() -> Option<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    let mut found = None;
    while let Some(a) = args.next() {
        let s = a.to_string_lossy();
        if s == "--config" || s == "-c" {
            found = args.next().map(PathBuf::from);
        } else if let Some(v) = s.strip_prefix("--config=") {
            found = Some(PathBuf::from(v));
        } else if s == "--" {
            break;
        }
    }
    let path = found
        .or_else(|| std::env::var_os("BACKSTOP_CONFIG").map(PathBuf::from))
        .or_else(|| {
            let p = PathBuf::from("backstop.toml");
            p.is_file().then_some(p)
        })?;
    std::path::absolute(path).ok()
}

/// Single-quotes a word for `sh` when it needs it.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=@%+,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// This binary as PostgreSQL should run it (`wal-fetch %f %p` or `wal-push %p`): absolute
/// paths to the binary, the configuration file, the repository and the key file, so it works
/// from the data directory and as another user. The key file is `[wal] key_file` when one is
/// configured (a WAL-only key: the server, which in a test restore runs the source database's
/// own code, then never learns where the master key is), else the master key file.
pub fn self_invocation(
    config: &Config,
    data_dir: &Path,
    repo: &RepoArgs,
    source: &str,
    sub: &str,
) -> anyhow::Result<String> {
    self_invocation_with(config, data_dir, repo, source, sub, &[])
}

/// [`self_invocation`] with more arguments for the subcommand (each quoted), e.g. `--from NAME`.
pub fn self_invocation_with(
    config: &Config,
    data_dir: &Path,
    repo: &RepoArgs,
    source: &str,
    sub: &str,
    extra: &[&str],
) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot find this binary's path")?;
    let mut words = vec![sh_quote(&exe.display().to_string())];
    if let Some(c) = config_path() {
        words.push("--config".into());
        words.push(sh_quote(&c.display().to_string()));
    }
    words.push(sub.into());
    words.push("--source".into());
    words.push(sh_quote(source));
    words.extend(extra.iter().map(|w| sh_quote(w)));
    let loc = match location(config, data_dir, repo)? {
        Location::Local(p) => Location::Local(std::path::absolute(&p).unwrap_or(p)),
        other => other,
    };
    words.push("--repo".into());
    words.push(sh_quote(&loc.to_string()));
    if let Some(k) = &config.wal.key_file {
        words.push("--key-file".into());
        words.push(sh_quote(
            &std::path::absolute(k)
                .unwrap_or_else(|_| k.clone())
                .display()
                .to_string(),
        ));
        words.push(if sub == "wal-fetch" { "%f %p" } else { "%p" }.into());
        return Ok(words.join(" "));
    }
    match repo
        .master_key_file
        .clone()
        .or_else(|| config.repository.master_key_file.clone())
    {
        Some(k) => {
            words.push("--master-key-file".into());
            words.push(sh_quote(
                &std::path::absolute(&k).unwrap_or(k).display().to_string(),
            ));
        }
        None => eprintln!(
            "warning: the master key comes from the environment here; PostgreSQL's {sub} will need BACKSTOP_MASTER_KEY in its own environment (or pass --restore-command)"
        ),
    }
    words.push(if sub == "wal-fetch" { "%f %p" } else { "%p" }.into());
    Ok(words.join(" "))
}

/// Every event of the ledger in order, up to its head when called: this process's own, or the
/// running serve's through its control socket. `why` says what the caller reads it for, in the
/// error when neither is there.
pub async fn each_event(
    events: &Events,
    data_dir: &Path,
    why: &str,
    mut f: impl FnMut(&backstop_events::Envelope),
) -> anyhow::Result<()> {
    if let Some(ledger) = &events.ledger {
        let mut from = 1;
        loop {
            let batch = ledger.read(from, 4096)?;
            let Some(last) = batch.last() else {
                return Ok(());
            };
            from = last.position + 1;
            batch.iter().for_each(&mut f);
        }
    }
    let socket = backstop_ledger::local::socket_path(data_dir);
    let local = backstop_ledger::local::LocalLedger::connect(&socket)
        .await
        .with_context(|| {
            format!(
                "cannot read the ledger ({why}): no ledger here, and no serve answers on {}",
                socket.display()
            )
        })?;
    let mut follow = local.follow(1).await?;
    let head = follow.head_at_start().position;
    let mut seen = 0;
    while seen < head {
        let batch = follow.next_batch().await?;
        if batch.is_empty() {
            break;
        }
        for env in &batch {
            seen = seen.max(env.position);
            f(env);
        }
    }
    Ok(())
}

/// The backups whose latest verification passed, read from the ledger. `restore latest`
/// restores only those unless the operator allows unverified ones.
pub async fn verified_backups(
    events: &Events,
    data_dir: &Path,
) -> anyhow::Result<std::collections::HashSet<uuid::Uuid>> {
    let mut verified = std::collections::HashSet::new();
    each_event(
        events,
        data_dir,
        "which backups passed verification; name a backup id, or pass --allow-unverified",
        |env| backstop_ops::catalog::note_verification(&mut verified, env),
    )
    .await?;
    Ok(verified)
}

/// The configured schedules, checked: each names a configured source, its cron expression and
/// zone parse, names are unique. A mistake stops `serve` at start with its message.
pub fn schedules(config: &Config) -> anyhow::Result<Vec<backstop_ops::schedule::Schedule>> {
    if let Some(s) = config
        .schedules
        .iter()
        .find(|s| s.job == backstop_ops::schedule::JobKind::Drill)
    {
        anyhow::bail!(
            "schedule {:?} has job = \"drill\": drills are scheduled by their [[drills]] entry (schedule = \"CRON\", zone = ...); remove this schedule",
            s.name
        );
    }
    let mut schedules = backstop_ops::schedule::Schedule::all(&config.schedules)?;
    // Each [[drills]] entry is a schedule too (monthly by default), in the same name space.
    for d in crate::drill_cmd::drill_schedules(config)? {
        if schedules.iter().any(|s| s.name() == d.name()) {
            anyhow::bail!(
                "a [[schedules]] entry is named {:?}, the name of the drill schedule of source {:?}; rename the schedule",
                d.name(),
                d.source()
            );
        }
        schedules.push(d);
    }
    for s in &schedules {
        if !config.sources.iter().any(|src| src.name == s.source()) {
            anyhow::bail!(
                "schedule {:?} backs up source {:?}, which is not configured; add it under [[sources]] or fix the schedule's source",
                s.name(),
                s.source()
            );
        }
    }
    Ok(schedules)
}

/// Physical test restores fetch WAL through this binary's `wal-fetch`, with the configuration,
/// repository and key file by absolute path, so PostgreSQL's user can run it.
pub fn physical_verify_settings(
    config: &Config,
    data_dir: &Path,
    repo: &RepoArgs,
) -> backstop_ops::verify::PhysicalVerifySettings {
    let config = config.clone();
    let data_dir = data_dir.to_path_buf();
    let repo = repo.clone();
    backstop_ops::verify::PhysicalVerifySettings {
        restore_command: Arc::new(move |source: &str| {
            // The scratch server's environment never carries the master key
            // (backstop_sources::child_env): its wal-fetch must be given the key as a file.
            if config.wal.key_file.is_none()
                && repo.master_key_file.is_none()
                && config.repository.master_key_file.is_none()
            {
                return Err(
                    "physical test restores hand PostgreSQL's restore_command a key file, never a key through its environment: set [wal] key_file to a WAL-only key (`backstop key export --purpose wal`; the scratch server then never sees the master key), or [repository] master_key_file (or pass --master-key-file), readable by the user PostgreSQL runs as"
                        .to_string(),
                );
            }
            self_invocation(&config, &data_dir, &repo, source, "wal-fetch")
                .map_err(|e| format!("{e:#}"))
        }),
        work_dir: None,
        verify: backstop_sources::pg::physical::PhysicalVerifyOptions::default(),
    }
}

/// The alert rules' view of the price table (`[cost]`): the monthly USD of bytes in a storage
/// class and region.
pub fn cost_estimator(config: &Config) -> Option<backstop_ops::alerting::CostEstimator> {
    let prices = config.cost.price_table();
    Some(std::sync::Arc::new(
        move |class: &str, region: &str, bytes: u64| prices.monthly_usd(class, region, bytes),
    ))
}

/// The alert thresholds: `[alerts]`, with the budget of `[cost]`.
pub fn alert_thresholds(config: &Config) -> backstop_ops::alerting::AlertThresholds {
    backstop_ops::alerting::AlertThresholds {
        budget_usd: config.cost.budget_usd,
        ..config.alerts.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_sh() {
        assert_eq!(sh_quote("/usr/bin/backstop"), "/usr/bin/backstop");
        assert_eq!(sh_quote("/a b/it's"), "'/a b/it'\\''s'");
        assert_eq!(sh_quote("s3://bucket/prefix"), "s3://bucket/prefix");
    }

    #[test]
    fn object_lock_reaches_the_s3_settings() {
        let config: Config =
            toml::from_str("[repository]\nlocation = \"s3://b/p\"\nobject_lock = \"30d\"\n")
                .expect("a valid config");
        assert_eq!(
            s3_settings(&config).object_lock,
            Some(std::time::Duration::from_secs(30 * 86_400))
        );
        assert_eq!(s3_settings(&Config::default()).object_lock, None);
        let bad = toml::from_str::<Config>("[repository]\nobject_lock = \"30\"\n")
            .expect_err("a duration without a unit");
        assert!(bad.to_string().contains("object_lock"), "{bad}");
    }
}
