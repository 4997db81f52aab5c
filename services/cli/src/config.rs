//! The configuration file (`backstop.toml`) and how command-line flags override it.
//!
//! Every key is optional; the embedded default (no file at all) keeps everything under
//! `./backstop-data`, runs the workers in-process and stores the repository in
//! `./backstop-data/repository`. The README's configuration reference lists every key; keep the
//! two in step.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the ledger, keys and local state live.
    pub data_dir: Option<PathBuf>,
    /// The directory of the configuration file that was read (none: no file). Not a setting:
    /// the default ledger signing key is there (see [`Config::signing_key_path`]).
    #[serde(skip)]
    pub config_dir: Option<PathBuf>,
    #[serde(default)]
    pub ledger: LedgerSection,
    #[serde(default)]
    pub nats: NatsSection,
    #[serde(default)]
    pub api: ApiSection,
    #[serde(default)]
    pub projections: ProjectionsSection,
    #[serde(default)]
    pub workers: WorkersSection,
    #[serde(default)]
    pub repository: RepositorySection,
    /// WAL archiving on a database host (`[wal]`): the key file wal-push and wal-fetch use.
    #[serde(default)]
    pub wal: WalSection,
    /// Databases to back up, by name.
    #[serde(default)]
    pub sources: Vec<SourceSection>,
    #[serde(default)]
    pub verify: VerifySection,
    /// When backups run: cron in a zone, per source (see `backstop schedule list`).
    #[serde(default)]
    pub schedules: Vec<backstop_ops::schedule::ScheduleConfig>,
    /// Retention policies per source and class (see `backstop forget`).
    #[serde(default)]
    pub retention: Vec<backstop_ops::retention::PolicyEntry>,
    /// Garbage collection (`backstop prune` and the daily maintenance job).
    #[serde(default)]
    pub prune: PruneSection,
    /// Where restores requested through the API or the ledger may go (`[restore]`).
    #[serde(default)]
    pub restore: RestoreSection,
    /// The weekly summary (`[reports]`).
    #[serde(default)]
    pub reports: ReportsSection,
    /// Alert thresholds (`[alerts]`); the seeds' values by default.
    #[serde(default)]
    pub alerts: backstop_ops::alerting::AlertThresholds,
    /// Email and webhook notifications (`[notify]`, `[[notify.channels]]`).
    pub notify: Option<backstop_ops::notify::NotifyConfig>,
    /// The health monitor of HTTP endpoints and the storage probe (`[health]`).
    #[serde(default)]
    pub health: backstop_ops::health::HealthConfig,
    /// Cost tracking: budget, price table, storage class (`[cost]`).
    #[serde(default)]
    pub cost: backstop_ops::cost::CostConfig,
    /// Key rotation (`[keys]`).
    #[serde(default)]
    pub keys: KeysSection,
    /// Webhook logs (`[[webhooks]]`): `POST /webhooks/NAME`, each with its own token.
    #[serde(default)]
    pub webhooks: Vec<backstop_ops::webhook::WebhookConfig>,
    /// DR drills (`[[drills]]`): per source, the staging database, targets and endpoints.
    #[serde(default)]
    pub drills: Vec<backstop_ops::drill::DrillConfig>,
    /// Backup sets (`[[sets]]`): sources backed up together (`backup --set NAME`) and
    /// restored together (`restore --set ID`).
    #[serde(default)]
    pub sets: Vec<SetSection>,
}

/// `[[sets]]`: a name, the sources it takes (each a `[[sources]]` name, taken in this order),
/// and where each is restored to by default (`[sets.restore] SOURCE = TARGET`: a postgres://
/// URL, a dump.rdb path, a directory, or a command source's `$BACKSTOP_TARGET`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetSection {
    pub name: String,
    pub sources: Vec<String>,
    #[serde(default)]
    pub restore: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysSection {
    /// `serve` rotates the database and files keys once their current version is this many
    /// days old, and re-encrypts every backup under the new versions (default 90; 0: never,
    /// only `backstop key rotate`).
    pub rotate_after_days: Option<u32>,
}

impl KeysSection {
    /// The age that makes a rotation due, or `None` when the schedule is off.
    pub fn rotate_after(&self) -> Option<chrono::Duration> {
        let days = self
            .rotate_after_days
            .unwrap_or(backstop_ops::rotation::DEFAULT_ROTATE_AFTER_DAYS);
        (days > 0).then(|| chrono::Duration::days(days as i64))
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreSection {
    /// `postgres://HOST[:PORT]/DB` or `postgres://HOST[:PORT]/*`; none: the restore worker
    /// refuses every request.
    #[serde(default)]
    pub allowed_targets: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportsSection {
    /// The zone whose Monday-to-Monday weeks the summary covers (default America/New_York).
    pub zone: Option<String>,
    /// Compose the weekly summary in `serve` (default true).
    pub weekly: Option<bool>,
}

impl ReportsSection {
    pub fn zone(&self) -> anyhow::Result<chrono_tz::Tz> {
        let name = self.zone.as_deref().unwrap_or("America/New_York");
        name.parse().map_err(|_| {
            anyhow::anyhow!(
                "reports.zone: {name:?} is not an IANA time zone (for example Europe/Berlin)"
            )
        })
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneSection {
    /// How long a marked object waits before it may be deleted; longer than any backup
    /// (default 24h).
    pub grace: Option<backstop_ops::schedule::ConfigDuration>,
    /// Where the reference set spills past its memory budget (default: the temporary directory).
    pub scratch_dir: Option<PathBuf>,
    /// When `serve` runs the daily maintenance job (forget, prune, lock extension), `HH:MM` UTC
    /// (default 04:00).
    pub daily_at: Option<String>,
    /// Run the daily maintenance job in `serve` (default true).
    pub daily: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySection {
    /// A PostgreSQL URL where the verify worker may create and drop test databases; absent:
    /// no automatic test restores.
    pub scratch: Option<String>,
    /// Allowed row-count difference in percent (default 1).
    pub tolerance_percent: Option<f64>,
    /// Backups retried after failed verifications, at most (default 2).
    pub max_retries: Option<u32>,
    /// Parallel restore jobs (default 2).
    pub jobs: Option<usize>,
    /// Allow a superuser as the scratch role (default false: refused, see docs/RUNBOOK.md).
    pub allow_superuser: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositorySection {
    /// A directory, or s3://BUCKET/PREFIX; default DATA_DIR/repository (`--repo`).
    pub location: Option<String>,
    /// S3 endpoint, e.g. http://127.0.0.1:3900 (default: AWS_ENDPOINT_URL or AWS itself).
    pub endpoint: Option<String>,
    /// S3 region (default: AWS_REGION, then us-east-1).
    pub region: Option<String>,
    /// Static S3 credentials (default: the AWS credential chain: AWS_ACCESS_KEY_ID, ...).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Path-style addressing (default true: what S3-compatible stores expect).
    pub path_style: Option<bool>,
    /// File holding the master key (default: BACKSTOP_MASTER_KEY; `--master-key-file`).
    pub master_key_file: Option<PathBuf>,
    /// Brotli quality for new repositories (default 2; see the benchmark).
    pub brotli_quality: Option<u32>,
    /// Average chunk size in KiB for new repositories (default 1024).
    pub chunk_avg_kib: Option<usize>,
    /// S3 object lock in compliance mode, e.g. "30d" (at least 1d): every object is written
    /// locked for this long, and the daily maintenance job extends the locks of what kept
    /// backups still need. The bucket must have been created with object lock enabled; local
    /// directories and Garage refuse it. Absent: no lock.
    pub object_lock: Option<backstop_ops::schedule::ConfigDuration>,
    /// `[[repository.replicas]]`: copies of the repository elsewhere (see backstop_ops::replicate).
    #[serde(default)]
    pub replicas: Vec<ReplicaSection>,
}

/// `[[repository.replicas]]`: another S3 endpoint, region and bucket, or a directory, holding
/// the same sealed objects as the primary (opened with the same master key).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSection {
    /// Its name (`--from NAME`, `check --replica NAME`, `to_region` in the events).
    pub name: String,
    /// A directory, or s3://BUCKET/PREFIX.
    pub location: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Path-style addressing (default true).
    pub path_style: Option<bool>,
    /// The storage class its cost is counted at (default `[cost] storage_class`); its price
    /// is the `[[cost.prices]]` entry of this class and its region (`backstop cost`).
    pub storage_class: Option<String>,
}

/// `[[sources]]`: a name, a `kind` (default `postgres`, so older files read unchanged) and the
/// kind's own keys; a key of another kind is refused.
#[derive(Debug, Clone)]
pub struct SourceSection {
    pub name: String,
    pub kind: SourceKindSection,
}

/// The keys of each source kind.
#[derive(Debug, Clone)]
pub enum SourceKindSection {
    Postgres(PostgresSourceSection),
    Command(CommandSourceSection),
    Redis(RedisSourceSection),
    Files(FilesSourceSection),
    Git(GitSourceSection),
    Config(ConfigSourceSection),
}

/// `kind = "config"`: environment variables, JSON settings and database settings, backed up
/// when they change (see backstop_sources::config and backstop_ops::config_backup).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSourceSection {
    /// An env file (`NAME=VALUE` lines), kept byte for byte: "/etc/app/.env".
    pub env_file: Option<std::path::PathBuf>,
    /// Variables read from backstop's own environment when the backup runs.
    #[serde(default)]
    pub env_vars: Vec<String>,
    /// JSON settings files, kept byte for byte.
    #[serde(default)]
    pub json_files: Vec<std::path::PathBuf>,
    /// A postgres:// URL whose non-default server settings (pg_settings) are recorded.
    pub postgres_settings: Option<String>,
}

/// `kind = "git"`: a repository mirrored to a second remote and bundled (see
/// backstop_sources::git and backstop_ops::git).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitSourceSection {
    /// The repository (any URL git takes, or a path): `/srv/git/app.git`,
    /// `https://github.com/team/app.git`.
    pub url: String,
    /// The second remote it is mirrored to; without one, only bundles are taken.
    pub mirror: Option<String>,
    /// Ref patterns mirrored and bundled (default ["refs/heads/*", "refs/tags/*"]).
    pub refs: Option<Vec<String>>,
    /// `serve` syncs the source every N seconds (default 60; at most 240, so a push is
    /// mirrored within 5 minutes, R3).
    pub poll_seconds: Option<u64>,
    /// Overwrite refs that diverged on the mirror (each one is listed in `git.mirrored`); by
    /// default they are left alone and alerted on.
    #[serde(default)]
    pub force: bool,
    /// Limit of each git command in seconds (default 600).
    pub timeout_seconds: Option<u64>,
}

/// Most seconds between two polls of a git source: R3 asks for a mirror within 5 minutes of a
/// push, and a sync itself takes time.
pub const GIT_POLL_MAX: u64 = 240;

impl GitSourceSection {
    pub fn poll(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.poll_seconds.unwrap_or(60))
    }

    pub fn ref_patterns(&self) -> Vec<String> {
        self.refs.clone().unwrap_or_else(|| {
            backstop_sources::git::DEFAULT_REFS
                .iter()
                .map(|s| s.to_string())
                .collect()
        })
    }
}

/// `kind = "files"`: directory trees (see backstop_sources::files).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesSourceSection {
    /// Absolute paths of directories or files.
    pub paths: Vec<std::path::PathBuf>,
    /// Keep only matching files (globs; without a `/` they match a name, with one the path).
    #[serde(default)]
    pub include: Vec<String>,
    /// Leave out matching files and directories, e.g. ["node_modules", "dist", "logs"].
    #[serde(default)]
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSourceSection {
    /// A PostgreSQL connection URL (postgres://user@host:port/db).
    pub postgres: String,
    /// Parallel COPY jobs (default 2).
    pub jobs: Option<usize>,
}

/// `kind = "command"`: commands run by `sh -c` (see backstop_sources::command).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSourceSection {
    /// Its standard output is the backup (output = "stdout"), or it writes `$BACKSTOP_DIR`
    /// (output = "directory").
    pub backup: String,
    /// Restores: the backup on its standard input (or `$BACKSTOP_DIR`), `$BACKSTOP_TARGET` the
    /// target (`backstop restore ID --to TARGET`).
    pub restore: Option<String>,
    /// Run on a test-restored copy (`$BACKSTOP_TARGET`); exit 0 means good.
    pub verify: Option<String>,
    /// "stdout" (default) or "directory".
    #[serde(default)]
    pub output: backstop_sources::command::CommandOutput,
    /// Limit of each command in seconds (default 3600).
    pub timeout_seconds: Option<u64>,
}

/// `kind = "redis"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSourceSection {
    /// redis://[[USER]:PASSWORD@]HOST[:PORT]
    pub url: String,
    /// Limit of a snapshot in seconds (default 3600).
    pub timeout_seconds: Option<u64>,
}

impl<'de> Deserialize<'de> for SourceSection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(d)?;
        let name = match table.remove("name") {
            Some(toml::Value::String(n)) => n,
            Some(_) => return Err(D::Error::custom("sources: name must be a string")),
            None => return Err(D::Error::missing_field("name")),
        };
        let kind = match table.remove("kind") {
            None => "postgres".to_string(),
            Some(toml::Value::String(k)) => k,
            Some(_) => return Err(D::Error::custom("sources: kind must be a string")),
        };
        let rest = toml::Value::Table(table);
        let at = |e: toml::de::Error| D::Error::custom(format!("sources.{name} ({kind}): {e}"));
        let kind = match kind.as_str() {
            "postgres" => SourceKindSection::Postgres(rest.try_into().map_err(at)?),
            "command" => SourceKindSection::Command(rest.try_into().map_err(at)?),
            "redis" => SourceKindSection::Redis(rest.try_into().map_err(at)?),
            "files" => SourceKindSection::Files(rest.try_into().map_err(at)?),
            "git" => SourceKindSection::Git(rest.try_into().map_err(at)?),
            "config" => SourceKindSection::Config(rest.try_into().map_err(at)?),
            other => {
                return Err(D::Error::custom(format!(
                    "sources.{name}: unknown kind {other:?}: expected postgres, command, redis, files, git or config"
                )));
            }
        };
        Ok(SourceSection { name, kind })
    }
}

/// `[wal]`: what `wal-push` and `wal-fetch` use on a database host.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalSection {
    /// A `wal` key file (`backstop key export --purpose wal`, mode 0600), used instead of the
    /// master key: it seals and opens WAL and cannot open backups.
    pub key_file: Option<PathBuf>,
    /// With `[[repository.replicas]]`: how long `wal-push` waits for one replica to store one
    /// file (default 30). The primary's copy decides the exit status; a replica that fails or
    /// takes longer falls behind and `backstop replicate` copies what it lacks.
    pub replica_timeout_seconds: Option<u64>,
    /// How long a copy found unreachable is skipped by `wal-push` (a replica) or `wal-fetch`
    /// (the primary, which then reads a replica at once), default 60.
    pub unreachable_rest_seconds: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSection {
    /// Checkpoint signing key file (mode 0600). Default: `ledger-signing.key` beside the
    /// configuration file (e.g. /etc/backstop/ledger-signing.key), outside the data directory;
    /// with no configuration file, DATA_DIR/keys/ledger-signing.key. A key still at that old
    /// path is used, with a warning saying how to move it (see [`Config::signing_key_path`]).
    pub signing_key: Option<PathBuf>,
    /// Sign a checkpoint every N events (default 1000).
    pub checkpoint_every: Option<u64>,
    /// ... or every N seconds, whichever comes first (default 10).
    pub checkpoint_seconds: Option<u64>,
    /// Mirror committed events into the repository every N seconds (default 5), and at
    /// shutdown, as sealed segments under `ledger/` (`backstop ledger restore` rebuilds the
    /// ledger from them). 0 turns the mirror off.
    pub mirror_seconds: Option<u64>,
    /// The ledger's public key (hex, `backstop ledger pubkey`), pinned: `ledger verify` checks
    /// the signed checkpoints against it, and `serve` refuses to start with another signing key.
    pub public_key: Option<String>,
    /// The identities that may append over NATS, each with what it may append
    /// (`[[ledger.identities]]`; see `backstop ledger identity new`). With any listed, unsigned
    /// remote appends are refused.
    #[serde(default)]
    pub identities: Vec<IdentitySection>,
    /// Refuse unsigned remote appends even with no identity listed (default: refused as soon as
    /// one identity is listed).
    pub require_signed_appends: Option<bool>,
}

/// One `[[ledger.identities]]` entry. Each list holds exact values or prefixes ending in `*`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySection {
    pub name: String,
    /// Its ed25519 public key, 64 hex digits.
    pub public_key: String,
    /// Event types it may append, e.g. `["wal.archived"]`, `["backup.*", "verification.*"]`.
    pub event_types: Vec<String>,
    /// Streams it may append to, e.g. `["wal-*"]`.
    pub streams: Vec<String>,
    /// Actors it may append as, e.g. `["worker:*"]` (never `operator:*` for a machine).
    pub actors: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSection {
    /// nats://host:port[,nats://host2:port...]; absent means the embedded mode.
    pub url: Option<String>,
    /// The JetStream stream name (default BACKSTOP_EVENTS).
    pub stream: Option<String>,
    /// Stream replicas (3 on a three-node cluster; default 1).
    pub replicas: Option<usize>,
    /// The ledger's public key (hex, `backstop ledger stats` shows it). When set, JetStream
    /// workers act only on events signed by it and refuse (and record) anything else.
    pub ledger_public_key: Option<String>,
    /// This process's append identity: its name in the ledger's `[[ledger.identities]]` and its
    /// key file (mode 0600). Remote appends are signed with it.
    pub identity: Option<String>,
    pub identity_key_file: Option<PathBuf>,
    /// User name and a file holding the password (the file's first line), for servers with
    /// `authorization { users: [...] }` (see deploy/nats/auth.conf).
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// A `.creds` file (JWT and nkey seed) for servers run with operator/account JWTs.
    pub creds_file: Option<PathBuf>,
    /// A file holding an nkey user seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// TLS: the CA that signed the servers' certificates, a client certificate and key (mutual
    /// TLS), and whether TLS is required even when the URL says nats://.
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_required: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// Address the API and dashboard listen on (default 127.0.0.1:8080).
    pub listen: Option<String>,
    /// Serve the overview and backup pages (and their JSON) without a token (default false).
    pub public_dashboard: Option<bool>,
    /// Serve /metrics without a token (default true).
    pub metrics_public: Option<bool>,
    /// A file of `NAME ROLE TOKEN` lines (roles: operator, recovery-lead, auditor).
    pub tokens_file: Option<PathBuf>,
    /// Tokens by their SHA3-256: `[[api.tokens]] name = "alice", role = "operator", sha3 = "<hex>"`.
    #[serde(default)]
    pub tokens: Vec<ApiToken>,
    /// The largest request body accepted, in bytes (413 beyond; default 65536).
    pub max_body_bytes: Option<usize>,
    /// The longest a request may take to be answered, in seconds (408 beyond; default 30).
    pub request_timeout_seconds: Option<u64>,
    /// Requests in progress at once; the others wait (default 256).
    pub max_concurrent_requests: Option<usize>,
    /// Refused requests per client and minute before 429s (default 30).
    pub refusals_per_minute: Option<u32>,
    /// Sign-in attempts per client and minute (default 10).
    pub sign_ins_per_minute: Option<u32>,
    /// One `access.denied` event per client and window, with a count (default 60 seconds).
    pub denial_window_seconds: Option<u64>,
    /// How long a dashboard sign-in lasts (default 12 hours).
    pub session_hours: Option<u64>,
    /// Always mark the sign-in cookie `Secure` (set it when clients reach the API over HTTPS).
    pub secure_cookies: Option<bool>,
    /// Reverse proxies (IP addresses) whose X-Forwarded-For and X-Forwarded-Proto are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Serve HTTPS: the certificate chain (PEM), with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM; readable by the owner only).
    pub tls_key: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    pub name: String,
    pub role: String,
    /// SHA3-256 of the token, hex (`printf %s TOKEN | openssl dgst -sha3-256`).
    pub sha3: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionsSection {
    /// PostgreSQL for the read models (postgres://USER@HOST:PORT/DB); absent: projections off.
    pub database_url: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersSection {
    /// Deliveries before an event is dead-lettered (default 5).
    pub max_deliveries: Option<u32>,
    /// Seconds JetStream waits for an ack before redelivering (default 60).
    pub ack_wait_seconds: Option<u64>,
    /// Seconds a running backup or restore holds its lease; renewed every third of it, and a
    /// job whose lease lapses is recorded as abandoned by `serve` (default 60).
    pub lease_seconds: Option<u64>,
    /// A backup running longer is stopped and recorded as failed (default 24h).
    pub job_deadline: Option<backstop_ops::schedule::ConfigDuration>,
    /// How long a logical backup waits for a table's lock before failing (default 10m).
    pub lock_wait_timeout: Option<backstop_ops::schedule::ConfigDuration>,
}

impl Config {
    /// Loads the file if given (or `./backstop.toml` if present); a missing explicit file, bad
    /// TOML or an unknown key is an error that names the file and the problem.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from("backstop.toml"), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default());
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot read the configuration file {}", path.display())
                });
            }
        };
        let mut config = Config::parse(&text, &path)?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        config.config_dir = Some(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()));
        Ok(config)
    }

    /// Where the ledger's signing key is: `[ledger] signing_key`, else `ledger-signing.key`
    /// beside the configuration file, outside the data directory (a copy of the data directory,
    /// a backup of it, a volume snapshot, does not carry the key that signs its checkpoints),
    /// else, with no configuration file, DATA_DIR/keys/ledger-signing.key as before. An
    /// installation whose key is still at that old path keeps it: it is used until moved (see
    /// [`Config::signing_key_notice`]), so existing signatures keep verifying.
    pub fn signing_key_path(&self, data_dir: &Path) -> PathBuf {
        if let Some(k) = &self.ledger.signing_key {
            return k.clone();
        }
        let legacy = data_dir.join("keys").join("ledger-signing.key");
        let Some(dir) = &self.config_dir else {
            return legacy;
        };
        let preferred = dir.join("ledger-signing.key");
        if !preferred.exists() && legacy.exists() {
            return legacy;
        }
        preferred
    }

    /// The warning to show when the signing key is still inside the data directory by default:
    /// the `mv` that moves it beside the configuration file.
    pub fn signing_key_notice(&self, data_dir: &Path) -> Option<String> {
        if self.ledger.signing_key.is_some() {
            return None;
        }
        let dir = self.config_dir.as_ref()?;
        let legacy = data_dir.join("keys").join("ledger-signing.key");
        if self.signing_key_path(data_dir) != legacy {
            return None;
        }
        let preferred = dir.join("ledger-signing.key");
        Some(format!(
            "the ledger signing key is inside the data directory ({}), where every copy of the data directory carries it; it is still used. Move it beside the configuration file while backstop is stopped: `mv {} {}` (it keeps mode 0600), or set [ledger] signing_key",
            legacy.display(),
            legacy.display(),
            preferred.display()
        ))
    }

    /// Decodes and checks the text of the configuration file read from `path` (named in
    /// errors). The one decoding path of [`Config::load`]; separate so that the fuzz target
    /// `config` (fuzz/, which compiles this file as a module) feeds it arbitrary text.
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "configuration file {} is malformed: {e}\nSee the configuration reference in README.md.",
                path.display()
            )
        })?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        self.alerts.validate().map_err(anyhow::Error::msg)?;
        if let Some(k) = &self.ledger.public_key
            && !(k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            bail!(
                "ledger.public_key must be 64 hex digits (as `backstop ledger pubkey` prints it)"
            );
        }
        if let Some(k) = &self.nats.ledger_public_key
            && !(k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            bail!(
                "nats.ledger_public_key must be 64 hex digits (as `backstop ledger pubkey` prints it)"
            );
        }
        self.reports.zone()?;
        backstop_ops::restore::RestoreTargets::parse(&self.restore.allowed_targets)
            .map_err(anyhow::Error::msg)?;
        if let Some(n) = &self.notify {
            n.check().map_err(anyhow::Error::msg)?;
        }
        if self.nats.user.is_some() != self.nats.password_file.is_some() {
            bail!("nats.user and nats.password_file go together: set both, or neither");
        }
        if self.nats.tls_cert_file.is_some() != self.nats.tls_key_file.is_some() {
            bail!("nats.tls_cert_file and nats.tls_key_file go together: set both, or neither");
        }
        if let Some(url) = &self.nats.url {
            for u in url.split(',') {
                if !(u.starts_with("nats://") || u.starts_with("tls://")) {
                    bail!("nats.url: {u:?} is not a nats:// or tls:// URL");
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for src in &self.sources {
            if src.name.is_empty()
                || !src
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                bail!(
                    "sources: name {:?} must be letters, digits, - _ or .",
                    src.name
                );
            }
            if !names.insert(&src.name) {
                bail!("sources: the name {:?} is used twice", src.name);
            }
            match &src.kind {
                SourceKindSection::Postgres(pg) => {
                    if !(pg.postgres.starts_with("postgres://")
                        || pg.postgres.starts_with("postgresql://"))
                    {
                        bail!("sources.{}: postgres must be a postgres:// URL", src.name);
                    }
                }
                SourceKindSection::Command(c) => {
                    if c.backup.trim().is_empty() {
                        bail!("sources.{}: backup must be a command", src.name);
                    }
                    if c.verify.is_some() && c.restore.is_none() {
                        bail!(
                            "sources.{}: verify runs on a restored copy, so it needs restore too",
                            src.name
                        );
                    }
                    if c.timeout_seconds == Some(0) {
                        bail!("sources.{}: timeout_seconds must be at least 1", src.name);
                    }
                }
                SourceKindSection::Files(f) => {
                    if f.paths.is_empty() {
                        bail!(
                            "sources.{}: paths must name at least one directory or file",
                            src.name
                        );
                    }
                    if let Some(p) = f.paths.iter().find(|p| !p.is_absolute()) {
                        bail!(
                            "sources.{}: {} is not an absolute path; files sources name absolute paths (/srv/app)",
                            src.name,
                            p.display()
                        );
                    }
                }
                SourceKindSection::Config(c) => {
                    if c.env_file.is_none()
                        && c.env_vars.is_empty()
                        && c.json_files.is_empty()
                        && c.postgres_settings.is_none()
                    {
                        bail!(
                            "sources.{}: a config source needs env_file, env_vars, json_files or postgres_settings",
                            src.name
                        );
                    }
                    if let Some(p) = c
                        .env_file
                        .iter()
                        .chain(&c.json_files)
                        .find(|p| !p.is_absolute())
                    {
                        bail!(
                            "sources.{}: {} is not an absolute path; config sources name absolute paths (/etc/app/.env)",
                            src.name,
                            p.display()
                        );
                    }
                    if let Some(u) = &c.postgres_settings
                        && !(u.starts_with("postgres://") || u.starts_with("postgresql://"))
                    {
                        bail!(
                            "sources.{}: postgres_settings must be a postgres:// URL",
                            src.name
                        );
                    }
                }
                SourceKindSection::Git(g) => {
                    if g.url.trim().is_empty() {
                        bail!("sources.{}: url must name the repository", src.name);
                    }
                    if g.mirror.as_deref() == Some(g.url.as_str()) {
                        bail!(
                            "sources.{}: mirror is the url itself; name the second remote",
                            src.name
                        );
                    }
                    if g.mirror.as_deref().is_some_and(|m| m.trim().is_empty()) {
                        bail!(
                            "sources.{}: mirror is empty; name the second remote or leave it out",
                            src.name
                        );
                    }
                    backstop_sources::git::check_patterns(&g.ref_patterns())
                        .map_err(|e| anyhow::anyhow!("sources.{}: {e}", src.name))?;
                    match g.poll_seconds {
                        Some(0) => bail!("sources.{}: poll_seconds must be at least 1", src.name),
                        Some(s) if s > GIT_POLL_MAX => bail!(
                            "sources.{}: poll_seconds = {s} is too long: a push must be mirrored within 5 minutes, so poll at most every {GIT_POLL_MAX} s",
                            src.name
                        ),
                        _ => {}
                    }
                    if g.timeout_seconds == Some(0) {
                        bail!("sources.{}: timeout_seconds must be at least 1", src.name);
                    }
                }
                SourceKindSection::Redis(r) => {
                    backstop_sources::redis::RedisTarget::parse(&r.url)
                        .map_err(|e| anyhow::anyhow!("sources.{}: {e}", src.name))?;
                    if r.timeout_seconds == Some(0) {
                        bail!("sources.{}: timeout_seconds must be at least 1", src.name);
                    }
                }
            }
        }
        if self.nats.replicas == Some(0) {
            bail!("nats.replicas must be at least 1");
        }
        self.append_policy()?;
        if self.nats.identity.is_some() != self.nats.identity_key_file.is_some() {
            bail!(
                "nats.identity and nats.identity_key_file go together: name the identity and its key file (`backstop ledger identity new NAME --key-file FILE` makes both)"
            );
        }
        self.retention_config()?;
        self.maintenance_time()?;
        if self.workers.lease_seconds == Some(0) {
            bail!("workers.lease_seconds must be at least 1 (the default is 60)");
        }
        self.health.validate()?;
        self.cost.validate()?;
        self.check_sets()?;
        Ok(())
    }

    /// `[[sets]]`: names valid and unique, each naming configured sources, once each.
    fn check_sets(&self) -> anyhow::Result<()> {
        let mut names = std::collections::HashSet::new();
        for set in &self.sets {
            if set.name.is_empty()
                || set.name == "latest"
                || !set
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                bail!(
                    "sets: name {:?} must be letters, digits, - _ or . (and not `latest`)",
                    set.name
                );
            }
            if !names.insert(&set.name) {
                bail!("sets: the name {:?} is used twice", set.name);
            }
            if set.sources.is_empty() {
                bail!("sets.{}: sources must name at least one source", set.name);
            }
            let mut seen = std::collections::HashSet::new();
            for s in set.sources.iter().chain(set.restore.keys()) {
                if !self.sources.iter().any(|c| &c.name == s) {
                    bail!(
                        "sets.{}: {s:?} is not a configured source; name one of [[sources]]",
                        set.name
                    );
                }
            }
            for s in &set.sources {
                if !seen.insert(s) {
                    bail!("sets.{}: the source {s:?} is listed twice", set.name);
                }
            }
            if let Some(k) = set.restore.keys().find(|k| !set.sources.contains(k)) {
                bail!(
                    "sets.{}: restore names {k:?}, which is not one of the set's sources",
                    set.name
                );
            }
        }
        Ok(())
    }

    /// The `[[sets]]` entry named `name`.
    pub fn set(&self, name: &str) -> anyhow::Result<&SetSection> {
        self.sets.iter().find(|s| s.name == name).with_context(|| {
            let known: Vec<&str> = self.sets.iter().map(|s| s.name.as_str()).collect();
            format!(
                "unknown backup set `{name}`; configure it under [[sets]] (configured: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )
        })
    }

    pub fn data_dir(&self, flag: Option<&Path>) -> PathBuf {
        flag.map(Path::to_path_buf)
            .or_else(|| self.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from("backstop-data"))
    }

    pub fn ledger_config(&self, data_dir: &Path) -> backstop_ledger::LedgerConfig {
        let mut c = backstop_ledger::LedgerConfig::in_data_dir(data_dir);
        c.signing_key = self.signing_key_path(data_dir);
        if let Some(n) = self.ledger.checkpoint_every {
            c.checkpoint_every = n;
        }
        if let Some(s) = self.ledger.checkpoint_seconds {
            c.checkpoint_interval = std::time::Duration::from_secs(s.max(1));
        }
        c
    }

    /// Who may append over NATS: `[[ledger.identities]]`, checked.
    pub fn append_policy(&self) -> anyhow::Result<backstop_ledger::identity::AppendPolicy> {
        use backstop_ledger::identity::{AppendPolicy, Grant};
        let grants = self
            .ledger
            .identities
            .iter()
            .map(|i| {
                Grant::new(
                    &i.name,
                    &i.public_key,
                    &i.event_types,
                    &i.streams,
                    &i.actors,
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .context("[[ledger.identities]]")?;
        let policy = AppendPolicy::new(grants).context("[[ledger.identities]]")?;
        Ok(if self.ledger.require_signed_appends == Some(true) {
            policy.require_signatures()
        } else {
            policy
        })
    }

    /// This process's append identity (`[nats] identity` and `identity_key_file`), loaded.
    pub fn append_signer(
        &self,
    ) -> anyhow::Result<Option<std::sync::Arc<backstop_ledger::identity::AppendSigner>>> {
        match (&self.nats.identity, &self.nats.identity_key_file) {
            (Some(name), Some(file)) => Ok(Some(std::sync::Arc::new(
                backstop_ledger::identity::AppendSigner::load(name, file)?,
            ))),
            _ => Ok(None),
        }
    }

    pub fn outbox_config(&self) -> backstop_ledger::outbox::OutboxConfig {
        let mut c = backstop_ledger::outbox::OutboxConfig::default();
        if let Some(s) = &self.nats.stream {
            c.stream = s.clone();
        }
        if let Some(r) = self.nats.replicas {
            c.replicas = r;
        }
        c
    }

    /// The `[[retention]]` entries, checked (zones, one entry per source and class).
    pub fn retention_config(&self) -> anyhow::Result<backstop_ops::retention::RetentionConfig> {
        backstop_ops::retention::RetentionConfig::new(self.retention.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// `[prune] grace`, else 24 h.
    pub fn prune_grace(&self) -> chrono::TimeDelta {
        self.prune
            .grace
            .map(|g| g.as_chrono())
            .unwrap_or(backstop_ops::forget::DEFAULT_PRUNE_GRACE)
    }

    /// `[prune] daily_at` as a UTC time of day (04:00 by default).
    pub fn maintenance_time(&self) -> anyhow::Result<chrono::NaiveTime> {
        match &self.prune.daily_at {
            None => Ok(chrono::NaiveTime::from_hms_opt(4, 0, 0).unwrap_or_default()),
            Some(t) => chrono::NaiveTime::parse_from_str(t, "%H:%M").map_err(|_| {
                anyhow::anyhow!(
                    "prune.daily_at: {t:?} is not a time of day; write HH:MM (UTC), e.g. \"04:00\""
                )
            }),
        }
    }

    /// How long a running job's lease lasts (`[workers] lease_seconds`).
    /// The restore worker's allow-list (checked when the configuration was loaded).
    pub fn restore_targets(&self) -> backstop_ops::restore::RestoreTargets {
        backstop_ops::restore::RestoreTargets::parse(&self.restore.allowed_targets)
            .unwrap_or_default()
    }

    /// The deadline and lock wait every backup runs with (`[workers] job_deadline`,
    /// `lock_wait_timeout`).
    pub fn job_limits(&self) -> backstop_ops::backup::JobLimits {
        let secs = |d: Option<backstop_ops::schedule::ConfigDuration>, default: u64| {
            std::time::Duration::from_secs(d.map(|d| d.as_secs()).unwrap_or(default))
        };
        backstop_ops::backup::JobLimits {
            deadline: Some(secs(self.workers.job_deadline, 24 * 3600)),
            lock_wait_timeout: Some(secs(self.workers.lock_wait_timeout, 600)),
        }
    }

    pub fn lease_period(&self) -> std::time::Duration {
        self.workers
            .lease_seconds
            .map(std::time::Duration::from_secs)
            .unwrap_or(backstop_ops::lease::DEFAULT_LEASE)
    }

    pub fn retry_policy(&self) -> backstop_ledger::consumer::RetryPolicy {
        let mut p = backstop_ledger::consumer::RetryPolicy::default();
        if let Some(n) = self.workers.max_deliveries {
            p.max_deliveries = n.max(1);
        }
        if let Some(s) = self.workers.ack_wait_seconds {
            p.ack_wait = std::time::Duration::from_secs(s.max(1));
        }
        // One pinned key serves both: `[ledger] public_key` when `[nats]` names none.
        p.ledger_public_key = self
            .nats
            .ledger_public_key
            .clone()
            .or_else(|| self.ledger.public_key.clone());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signing_key_defaults_beside_the_configuration_file_and_an_old_one_is_kept() {
        let dir = tempfile_dir().join("signing-key-default");
        let _ = std::fs::remove_dir_all(&dir);
        let etc = dir.join("etc");
        let data = dir.join("data");
        std::fs::create_dir_all(&etc).unwrap();
        let p = etc.join("backstop.toml");
        std::fs::write(&p, "").unwrap();
        let c = Config::load(Some(&p)).unwrap();
        let etc = std::fs::canonicalize(&etc).unwrap();
        // A new installation: beside the configuration, outside the data directory.
        assert_eq!(c.signing_key_path(&data), etc.join("ledger-signing.key"));
        assert_eq!(
            c.ledger_config(&data).signing_key,
            etc.join("ledger-signing.key")
        );
        assert!(c.signing_key_notice(&data).is_none());
        // An existing one: its key in the data directory is used, with the mv to run.
        let legacy = data.join("keys").join("ledger-signing.key");
        std::fs::create_dir_all(legacy.parent().unwrap()).unwrap();
        std::fs::write(&legacy, "00").unwrap();
        assert_eq!(c.signing_key_path(&data), legacy);
        let notice = c.signing_key_notice(&data).unwrap();
        assert!(
            notice.contains(&format!(
                "mv {} {}",
                legacy.display(),
                etc.join("ledger-signing.key").display()
            )),
            "{notice}"
        );
        // Once moved, the new path wins.
        std::fs::rename(&legacy, etc.join("ledger-signing.key")).unwrap();
        assert_eq!(c.signing_key_path(&data), etc.join("ledger-signing.key"));
        // An explicit path, and no configuration file at all, are as before.
        let explicit = Config::parse("[ledger]\nsigning_key = \"/k\"\n", &p).unwrap();
        assert_eq!(explicit.signing_key_path(&data), PathBuf::from("/k"));
        assert_eq!(Config::default().signing_key_path(&data), legacy);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn git_sources_take_their_keys_and_a_poll_past_the_5_minute_promise_is_refused() {
        let p = tempfile_dir().join("git.toml");
        let src = |extra: &str| {
            format!(
                "[[sources]]\nname = \"app\"\nkind = \"git\"\nurl = \"/srv/git/app.git\"\nmirror = \"/srv/mirror/app.git\"\n{extra}"
            )
        };
        let c = Config::parse(&src(""), &p).unwrap();
        let SourceKindSection::Git(g) = &c.sources[0].kind else {
            panic!("{:?}", c.sources[0].kind)
        };
        assert_eq!(g.poll(), std::time::Duration::from_secs(60));
        assert_eq!(g.ref_patterns(), vec!["refs/heads/*", "refs/tags/*"]);
        for (extra, said) in [
            ("poll_seconds = 600\n", "within 5 minutes"),
            ("refs = [\"heads/*\"]\n", "not of the form"),
            ("postgres = \"postgres://x\"\n", "postgres"),
        ] {
            let e = format!("{:#}", Config::parse(&src(extra), &p).unwrap_err());
            assert!(e.contains(said), "{extra}: {e}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_urls_are_named() {
        let dir = tempfile_dir();
        let p = dir.join("b.toml");
        std::fs::write(&p, "data_dri = \"/x\"\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("data_dri"), "{e}");
        std::fs::write(&p, "[nats]\nurl = \"http://x\"\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("nats://"), "{e}");
        let e = Config::load(Some(&dir.join("missing.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
    }

    #[test]
    fn the_pinned_ledger_key_reaches_the_jetstream_workers() {
        let p = Path::new("k.toml");
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let c = Config::parse(&format!("[ledger]\npublic_key = \"{a}\"\n"), p).unwrap();
        assert_eq!(c.retry_policy().ledger_public_key, Some(a.clone()));
        let text = format!("[ledger]\npublic_key = \"{a}\"\n[nats]\nledger_public_key = \"{b}\"\n");
        let c = Config::parse(&text, p).unwrap();
        assert_eq!(c.retry_policy().ledger_public_key, Some(b));
        let c = Config::parse("", p).unwrap();
        assert_eq!(c.retry_policy().ledger_public_key, None);
        let e = Config::parse("[nats]\nledger_public_key = \"xyz\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nats.ledger_public_key"), "{e}");
    }

    #[test]
    fn notify_mistakes_name_the_key() {
        let dir = tempfile_dir();
        let p = dir.join("n.toml");
        let channel = "[[notify.channels]]\nname = \"oncall\"\nkind = \"email\"\nsmtp_host = \"127.0.0.1\"\nfrom = \"backstop@example.com\"\n";
        std::fs::write(&p, channel).unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(
            e.contains("notify.channels[0] (oncall)") && e.contains("`to`"),
            "{e}"
        );
        std::fs::write(
            &p,
            format!("{channel}to = [\"dba@example.com\"]\nmin_severity = \"urgent\"\n"),
        )
        .unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("min_severity") && e.contains("urgent"), "{e}");
        std::fs::write(&p, format!("{channel}to = [\"dba@example.com\"]\n")).unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.notify.unwrap().channels[0].port(), 587);
    }

    #[test]
    fn health_and_cost_mistakes_name_the_key() {
        let dir = tempfile_dir();
        let p = dir.join("h.toml");
        std::fs::write(
            &p,
            "[[health.endpoints]]\nname = \"web\"\nurl = \"htp:/nowhere\"\n",
        )
        .unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(
            e.contains("health.endpoints") && e.contains("htp:/nowhere"),
            "{e}"
        );
        std::fs::write(
            &p,
            "[[cost.prices]]\nstorage_class = \"STANDARD\"\nusd_per_gib_month = -0.5\n",
        )
        .unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("cost.prices[0].usd_per_gib_month"), "{e}");
        std::fs::write(
            &p,
            "[health]\ninterval = \"1m\"\n[[health.endpoints]]\nname = \"web\"\nurl = \"https://example.com/healthz\"\n\
             expected_status = 204\n[cost]\nbudget_usd = 40\nstorage_class = \"standard_ia\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(
            c.health.thresholds().interval,
            chrono::TimeDelta::minutes(1)
        );
        assert_eq!(c.cost.budget_usd, 40.0);
        assert_eq!(c.cost.storage_class(), "STANDARD_IA");
        // Absent: the seeds' defaults.
        let c = Config::default();
        assert_eq!(c.cost.budget_usd, 15.0);
        assert_eq!(
            c.health.thresholds().slow,
            std::time::Duration::from_secs(3)
        );
    }

    #[test]
    fn retention_and_prune_keys_are_checked_at_load() {
        let dir = tempfile_dir();
        let p = dir.join("r.toml");
        std::fs::write(
            &p,
            "[[retention]]\nkeep_last = 2\n[prune]\ngrace = \"6h\"\ndaily_at = \"03:15\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.prune_grace(), chrono::TimeDelta::hours(6));
        assert_eq!(
            c.retention_config()
                .unwrap()
                .policy("x", Default::default())
                .keep_last,
            2
        );
        std::fs::write(&p, "[[retention]]\nzone = \"Mars/Olympus\"\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("Mars/Olympus"), "{e}");
        std::fs::write(&p, "[prune]\ndaily_at = \"4am\"\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("prune.daily_at") && e.contains("HH:MM"), "{e}");
        assert_eq!(
            Config::default().prune_grace(),
            chrono::TimeDelta::hours(24)
        );
    }

    #[test]
    fn sets_name_configured_sources_once() {
        let p = Path::new("s.toml");
        let sources = "[[sources]]\nname = \"main\"\npostgres = \"postgres://db/app\"\n[[sources]]\nname = \"cache\"\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n";
        let ok = format!(
            "{sources}[[sets]]\nname = \"nightly\"\nsources = [\"main\", \"cache\"]\n[sets.restore]\ncache = \"/srv/restore/dump.rdb\"\n"
        );
        let c = Config::parse(&ok, p).unwrap();
        assert_eq!(c.set("nightly").unwrap().sources, ["main", "cache"]);
        let e = c.set("weekly").unwrap_err().to_string();
        assert!(e.contains("nightly"), "{e}");
        for (bad, says) in [
            (
                "name = \"nightly\"\nsources = [\"main\", \"models\"]\n",
                "\"models\" is not a configured source",
            ),
            (
                "name = \"nightly\"\nsources = [\"main\", \"main\"]\n",
                "listed twice",
            ),
            ("name = \"latest\"\nsources = [\"main\"]\n", "not `latest`"),
            (
                "name = \"n\"\nsources = [\"main\"]\n[sets.restore]\ncache = \"/x\"\n",
                "not one of the set's sources",
            ),
        ] {
            let e = Config::parse(&format!("{sources}[[sets]]\n{bad}"), p)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{e}");
        }
    }
    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("backstop-config-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
