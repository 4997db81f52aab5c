//! Git repositories (R3): a source repository mirrored to a second remote, the hashes of every
//! ref compared on both sides, and a bundle of the whole repository streamed into the data path.
//!
//! A git source keeps a *working mirror*, a bare repository of its own (`DATA_DIR/git/NAME.git`
//! in the CLI's wiring). A sync ([`mirror`]):
//! 1. fetches the source into the working mirror: `git fetch --prune --no-tags URL
//!    +P:P` for each configured ref pattern `P` (`refs/heads/*` and `refs/tags/*` by default),
//!    and points its `HEAD` where the source's does (so a clone of the bundle checks that out);
//! 2. lists the mirror remote's refs (`git ls-remote`) and plans each ref: one the mirror lacks
//!    is created; one the mirror has at the hash this source last left there, or at an ancestor
//!    of the source's, is moved (the source is authoritative for what it mirrored); one the
//!    source deleted is deleted when the mirror still has it where it was left. Anything else is
//!    **diverged**: somebody wrote to the mirror directly. A diverged ref is never overwritten
//!    unless the source says `force = true`, and then it is reported as forced, never silently;
//! 3. pushes the plan in one `git push --atomic`, every ref under a `--force-with-lease` naming
//!    the hash it was planned against, so a push to the mirror between the listing and the push
//!    fails the push instead of being overwritten;
//! 4. lists the mirror again and compares every ref with the source's hash: a ref that still
//!    differs is diverged too.
//!
//! The refs both sides agreed on are kept in `backstop-mirrored.json` inside the working mirror
//! (`{"refs": {"refs/heads/main": "<hash>", ...}}`): what "where it was left" means in step 2.
//!
//! A backup ([`backup`]) fetches the same way, then streams `git bundle create - --all` of the
//! working mirror into the part [`BUNDLE_PART`]; its report holds every ref and hash, and the
//! SHA3-256 of the bundle. `git clone FILE.bundle` restores it; [`test_restore`] checks a
//! bundle by cloning it (`git clone --mirror`), comparing its refs with the report's and
//! running `git fsck`.
//!
//! Invariants:
//! - `git` runs with [`crate::child_env`]'s scrubbed environment, `GIT_TERMINAL_PROMPT=0` (it
//!   never waits for a password), no standard input, in its own process group, under the
//!   source's timeout (the group is killed past it).
//! - URLs are shown with any `user:password@` removed ([`redact_url`]): in errors, reports and
//!   events.
//! - One process at a time works in a working mirror (an exclusive `flock` on
//!   `NAME.git.lock` beside it), so a sync and a scheduled backup do not fetch over each other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha3::{Digest, Sha3_256};
use tokio::process::Command;

use crate::SourceError;
use crate::capture::hex;
use crate::child_env::scrub_tool;
use crate::command::{run_captured, stream_cmd_out};
use crate::pg::logical::{DumpSink, PartReader};

/// The part of a git backup: the bundle.
pub const BUNDLE_PART: &str = "git/bundle";
/// The refs mirrored and bundled when the source names none.
pub const DEFAULT_REFS: &[&str] = &["refs/heads/*", "refs/tags/*"];
/// Default limit of each git command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Refs pushed per `git push` (each carries a lease argument; this keeps the command line far
/// below the kernel's limit). A plan of more refs is pushed in several atomic pushes.
const PUSH_BATCH: usize = 2000;
/// The file in the working mirror that holds the refs both sides last agreed on.
const STATE_FILE: &str = "backstop-mirrored.json";

/// Ref name -> object hash (hex).
pub type Refs = BTreeMap<String, String>;

/// A configured git source.
#[derive(Clone, Debug)]
pub struct GitSource {
    /// The repository backed up and mirrored (any URL git takes, or a path).
    pub url: String,
    /// The second remote it is mirrored to; none: bundles only.
    pub mirror: Option<String>,
    /// Ref patterns: exact names, or prefixes ending in `/*` (`refs/heads/*`).
    pub refs: Vec<String>,
    /// The working mirror, a bare repository Backstop owns.
    pub work_dir: PathBuf,
    /// Overwrite diverged refs on the mirror (reported as forced) instead of leaving them.
    pub force: bool,
    /// Limit of each git command.
    pub timeout: Duration,
}

/// One ref moved on the mirror (`from`/`to` none: created/deleted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefChange {
    pub name: String,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// A ref whose hash differs between the source and the mirror, and why it was not (or could
/// not be) made equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefDivergence {
    pub name: String,
    /// The source's hash (none: the source has no such ref).
    pub source: Option<String>,
    /// The mirror's hash (none: the mirror has no such ref).
    pub mirror: Option<String>,
    pub why: String,
}

/// What a sync found and did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorReport {
    /// The source's refs as fetched (what the mirror must equal).
    pub refs: Refs,
    /// The ref the source's `HEAD` names, and its hash.
    pub head_ref: Option<String>,
    pub head: Option<String>,
    /// [`refs_sha3`] of `refs`.
    pub refs_sha3: String,
    /// Refs pushed to the mirror.
    pub updated: Vec<RefChange>,
    /// Diverged refs overwritten because the source says `force = true`.
    pub forced: Vec<RefDivergence>,
    /// Refs that differ after the sync: left alone, or still different after the push.
    pub diverged: Vec<RefDivergence>,
    /// Refs the mirror holds after the sync (of the configured patterns).
    pub mirror_refs: usize,
}

impl MirrorReport {
    /// Every ref has the same hash on both sides.
    pub fn in_sync(&self) -> bool {
        self.diverged.is_empty()
    }
}

/// What a git backup recorded, stored in the manifest (`extra.git`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitReport {
    /// The source's URL, redacted.
    pub url: String,
    pub refs: Refs,
    pub head_ref: Option<String>,
    pub head: Option<String>,
    pub refs_sha3: String,
    /// The part holding the bundle.
    pub part: String,
    /// Bytes and SHA3-256 (hex) of the bundle.
    pub bytes: u64,
    pub sha3: String,
    pub timeout_secs: u64,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// A digest of a ref listing (each `name hash\n` in name order): equal listings, equal digests.
pub fn refs_sha3(refs: &Refs) -> String {
    let mut h = Sha3_256::new();
    for (name, hash) in refs {
        h.update(name.as_bytes());
        h.update(b" ");
        h.update(hash.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

/// `url` with any `user[:password]@` of a `scheme://` URL removed.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://{host}{path}"),
        None => url.to_string(),
    }
}

/// Checks ref patterns: each starts with `refs/` and is an exact name or ends in `/*`.
pub fn check_patterns(patterns: &[String]) -> Result<(), String> {
    if patterns.is_empty() {
        return Err("refs must name at least one pattern, e.g. [\"refs/heads/*\"]".into());
    }
    for p in patterns {
        let body = p.strip_suffix("/*").unwrap_or(p);
        if !p.starts_with("refs/") || body.contains('*') || body.contains(char::is_whitespace) {
            return Err(format!(
                "ref pattern {p:?} is not of the form refs/NAME or refs/PREFIX/*, e.g. \"refs/heads/*\""
            ));
        }
    }
    Ok(())
}

fn matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == p,
    })
}

/// Parses `HASH<TAB or space>REF` lines, keeping the refs the patterns match (peeled `^{}`
/// lines and `HEAD` are left out).
fn parse_refs(out: &[u8], patterns: &[String]) -> Refs {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| {
            let (hash, name) = l.split_once(['\t', ' '])?;
            let name = name.trim();
            (!name.ends_with("^{}") && matches(patterns, name))
                .then(|| (name.to_string(), hash.trim().to_string()))
        })
        .collect()
}

fn git(dir: Option<&Path>) -> Command {
    let mut cmd = Command::new("git");
    if let Some(d) = dir {
        cmd.arg("-C").arg(d);
    }
    scrub_tool(&mut cmd);
    cmd.env("GIT_TERMINAL_PROMPT", "0");
    cmd.process_group(0).kill_on_drop(true);
    cmd
}

/// How a git command is shown in errors: its arguments, URLs redacted.
fn shown(args: &[String]) -> String {
    let words: Vec<String> = args.iter().map(|a| redact_url(a)).collect();
    format!("git {}", words.join(" "))
}

async fn run_git(
    what: &str,
    dir: Option<&Path>,
    args: &[String],
    limit: Duration,
) -> Result<Vec<u8>, SourceError> {
    let mut cmd = git(dir);
    cmd.args(args);
    run_captured(what, &shown(args), cmd, limit).await
}

/// Whether `ancestor` is in the history of `of` in the working mirror (an object the mirror
/// does not have is in nobody's history there).
async fn is_ancestor(
    work: &Path,
    ancestor: &str,
    of: &str,
    limit: Duration,
) -> Result<bool, SourceError> {
    let args = [
        "merge-base".to_string(),
        "--is-ancestor".into(),
        ancestor.into(),
        of.into(),
    ];
    match run_git("ancestry check", Some(work), &args, limit).await {
        Ok(_) => Ok(true),
        Err(SourceError::CommandFailed { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// An exclusive lock on a working mirror, released when dropped (the file is closed).
struct WorkLock(#[allow(dead_code)] std::fs::File);

async fn lock(work: &Path) -> Result<WorkLock, SourceError> {
    let mut path = work.as_os_str().to_owned();
    path.push(".lock");
    let path = PathBuf::from(path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| {
            SourceError::io(format!("creating {} for git mirrors", parent.display()), e)
        })?;
    }
    tokio::task::spawn_blocking(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| SourceError::io(format!("opening {}", path.display()), e))?;
        // SAFETY: flock(2) on a descriptor this function owns; no memory involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(SourceError::io(
                format!("locking {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(WorkLock(file))
    })
    .await
    .map_err(|e| SourceError::Task(format!("locking a git working mirror: {e}")))?
}

/// Fetches the source into the working mirror (creating it on first use); returns the source's
/// refs and the ref its `HEAD` names.
async fn fetch(src: &GitSource) -> Result<(Refs, Option<String>), SourceError> {
    let work = src.work_dir.as_path();
    let limit = src.timeout;
    if !work.join("HEAD").exists() {
        let args = [
            "init".to_string(),
            "--bare".into(),
            "--quiet".into(),
            work.to_string_lossy().into_owned(),
        ];
        run_git("creation of the working mirror", None, &args, limit).await?;
    }
    let mut args = vec![
        "fetch".to_string(),
        "--prune".into(),
        "--no-tags".into(),
        "--quiet".into(),
        src.url.clone(),
    ];
    args.extend(src.refs.iter().map(|p| format!("+{p}:{p}")));
    run_git("fetch of the source", Some(work), &args, limit).await?;
    let listed = run_git(
        "listing of the working mirror's refs",
        Some(work),
        &[
            "for-each-ref".into(),
            "--format=%(objectname)%09%(refname)".into(),
        ],
        limit,
    )
    .await?;
    let all = parse_refs(&listed, &["refs/*".to_string()]);
    // Refs of patterns the source no longer names: gone from the mirror's view and the bundle.
    for stale in all.keys().filter(|n| !matches(&src.refs, n)) {
        run_git(
            "removal of a ref outside the source's patterns",
            Some(work),
            &["update-ref".into(), "-d".into(), stale.clone()],
            limit,
        )
        .await?;
    }
    let refs: Refs = all
        .into_iter()
        .filter(|(n, _)| matches(&src.refs, n))
        .collect();
    let symref = run_git(
        "reading of the source's HEAD",
        None,
        &[
            "ls-remote".into(),
            "--symref".into(),
            src.url.clone(),
            "HEAD".into(),
        ],
        limit,
    )
    .await?;
    let head_ref = String::from_utf8_lossy(&symref).lines().find_map(|l| {
        let target = l.strip_prefix("ref: ")?.strip_suffix("\tHEAD")?;
        refs.contains_key(target).then(|| target.to_string())
    });
    if let Some(h) = &head_ref {
        run_git(
            "pointing the working mirror's HEAD",
            Some(work),
            &["symbolic-ref".into(), "HEAD".into(), h.clone()],
            limit,
        )
        .await?;
    }
    Ok((refs, head_ref))
}

async fn ls_remote(src: &GitSource, url: &str) -> Result<Refs, SourceError> {
    let out = run_git(
        "listing of the mirror's refs",
        None,
        &["ls-remote".into(), url.to_string()],
        src.timeout,
    )
    .await?;
    Ok(parse_refs(&out, &src.refs))
}

#[derive(Default, Serialize, Deserialize)]
struct State {
    refs: Refs,
}

fn load_state(work: &Path) -> Result<Refs, SourceError> {
    let path = work.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice::<State>(&b)
            .map(|s| s.refs)
            .map_err(|e| SourceError::BadReport {
                why: format!(
                    "{} does not decode ({e}); remove it and the next sync treats every ref the mirror has that the source lacks as diverged",
                    path.display()
                ),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Refs::new()),
        Err(e) => Err(SourceError::io(format!("reading {}", path.display()), e)),
    }
}

fn save_state(work: &Path, refs: &Refs) -> Result<(), SourceError> {
    let path = work.join(STATE_FILE);
    let tmp = work.join(format!("{STATE_FILE}.tmp"));
    let body = serde_json::to_vec_pretty(&State { refs: refs.clone() })
        .map_err(|e| SourceError::Task(format!("encoding the mirror state: {e}")))?;
    std::fs::write(&tmp, body)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| SourceError::io(format!("writing {}", path.display()), e))
}

/// The file in the working mirror naming the newest bundle taken of it.
const BUNDLED_FILE: &str = "backstop-bundled.json";

/// The newest bundle backed up from a working mirror: its backup id and [`refs_sha3`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleNote {
    pub backup_id: String,
    pub refs_sha3: String,
}

/// The bundle [`note_bundle`] recorded last in `work`, if any (a note that does not decode is
/// no note: the next sync takes a bundle, which deduplication makes cheap).
pub fn last_bundle(work: &Path) -> Option<BundleNote> {
    let b = std::fs::read(work.join(BUNDLED_FILE)).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Records in `work` that the bundle of the refs with digest `refs_sha3` is backup
/// `backup_id` (written after its `backup.completed`).
pub fn note_bundle(work: &Path, note: &BundleNote) -> Result<(), SourceError> {
    let path = work.join(BUNDLED_FILE);
    let tmp = work.join(format!("{BUNDLED_FILE}.tmp"));
    let body = serde_json::to_vec_pretty(note)
        .map_err(|e| SourceError::Task(format!("encoding the bundle note: {e}")))?;
    std::fs::write(&tmp, body)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| SourceError::io(format!("writing {}", path.display()), e))
}

/// What to do with one ref.
enum Step {
    Push(RefChange),
    Diverged(RefDivergence),
}

/// Plans one ref (see the module docs, step 2).
async fn plan_ref(
    src: &GitSource,
    name: &str,
    s: Option<&String>,
    d: Option<&String>,
    left: Option<&String>,
) -> Result<Option<Step>, SourceError> {
    let change = || RefChange {
        name: name.to_string(),
        from: d.cloned(),
        to: s.cloned(),
    };
    let diverged = |why: String| RefDivergence {
        name: name.to_string(),
        source: s.cloned(),
        mirror: d.cloned(),
        why,
    };
    Ok(match (s, d) {
        (Some(s), Some(d)) if s == d => None,
        (Some(_), None) => Some(Step::Push(change())),
        (None, Some(d)) if left == Some(d) => Some(Step::Push(change())),
        (None, Some(_)) => Some(Step::Diverged(diverged(
            "the mirror has this ref and the source does not, and this source never mirrored it there".into(),
        ))),
        (Some(_), Some(d)) if left == Some(d) => Some(Step::Push(change())),
        (Some(s), Some(d)) => {
            if is_ancestor(&src.work_dir, d, s, src.timeout).await? {
                Some(Step::Push(change()))
            } else {
                Some(Step::Diverged(diverged(
                    "the mirror's commit is not in the source's history: something was pushed to the mirror directly".into(),
                )))
            }
        }
        (None, None) => None,
    })
}

async fn push(src: &GitSource, url: &str, changes: &[RefChange]) -> Result<(), SourceError> {
    for batch in changes.chunks(PUSH_BATCH) {
        let mut args = vec![
            "push".to_string(),
            "--porcelain".into(),
            "--atomic".into(),
            "--quiet".into(),
            url.to_string(),
        ];
        for c in batch {
            args.push(format!(
                "--force-with-lease={}:{}",
                c.name,
                c.from.as_deref().unwrap_or("")
            ));
        }
        for c in batch {
            args.push(format!("{}:{}", c.to.as_deref().unwrap_or(""), c.name));
        }
        run_git(
            "push to the mirror",
            Some(&src.work_dir),
            &args,
            src.timeout,
        )
        .await?;
    }
    Ok(())
}

/// One sync of `src` to `mirror_url` (see the module docs).
pub async fn mirror(src: &GitSource, mirror_url: &str) -> Result<MirrorReport, SourceError> {
    let _lock = lock(&src.work_dir).await?;
    let (refs, head_ref) = fetch(src).await?;
    let left = load_state(&src.work_dir)?;
    let before = ls_remote(src, mirror_url).await?;
    let names: BTreeSet<&String> = refs.keys().chain(before.keys()).collect();
    let mut updated = Vec::new();
    let mut forced = Vec::new();
    let mut diverged = Vec::new();
    for name in names {
        let (s, d) = (refs.get(name), before.get(name));
        match plan_ref(src, name, s, d, left.get(name)).await? {
            None => {}
            Some(Step::Push(c)) => updated.push(c),
            Some(Step::Diverged(v)) if src.force => {
                updated.push(RefChange {
                    name: v.name.clone(),
                    from: v.mirror.clone(),
                    to: v.source.clone(),
                });
                forced.push(v);
            }
            Some(Step::Diverged(v)) => diverged.push(v),
        }
    }
    if !updated.is_empty() {
        push(src, mirror_url, &updated).await?;
    }
    // The check: every ref planned to be equal is equal now.
    let after = ls_remote(src, mirror_url).await?;
    let left_alone: BTreeSet<String> = diverged.iter().map(|v| v.name.clone()).collect();
    let all: BTreeSet<&String> = refs.keys().chain(after.keys()).collect();
    for name in all {
        let (s, d) = (refs.get(name), after.get(name));
        if s != d && !left_alone.contains(name) {
            diverged.push(RefDivergence {
                name: name.clone(),
                source: s.cloned(),
                mirror: d.cloned(),
                why: "after the push the mirror's hash still differs from the source's".into(),
            });
        }
    }
    // Remember where both sides agree; a ref that still differs keeps what was left before.
    let mut state = left;
    for name in refs.keys().chain(after.keys()) {
        match (refs.get(name), after.get(name)) {
            (Some(s), Some(d)) if s == d => {
                state.insert(name.clone(), s.clone());
            }
            (None, None) => {
                state.remove(name);
            }
            _ => {}
        }
    }
    state.retain(|name, _| refs.contains_key(name) || after.contains_key(name));
    save_state(&src.work_dir, &state)?;
    let head = head_ref.as_ref().and_then(|h| refs.get(h)).cloned();
    Ok(MirrorReport {
        refs_sha3: refs_sha3(&refs),
        head_ref,
        head,
        refs,
        updated,
        forced,
        diverged,
        mirror_refs: after.len(),
    })
}

/// The source's refs now, as a fetch into the working mirror leaves them (for deciding whether
/// a new bundle is needed without taking one).
pub async fn current_refs(src: &GitSource) -> Result<Refs, SourceError> {
    let _lock = lock(&src.work_dir).await?;
    Ok(fetch(src).await?.0)
}

/// Takes one backup of `src` into `sink`: a fetch, then the bundle of every ref.
pub async fn backup(src: &GitSource, sink: &dyn DumpSink) -> Result<GitReport, SourceError> {
    let started_at = Utc::now();
    let _lock = lock(&src.work_dir).await?;
    let (refs, head_ref) = fetch(src).await?;
    if refs.is_empty() {
        return Err(SourceError::BadReport {
            why: format!(
                "the repository {} has no refs matching {:?}: there is nothing to bundle (push a commit first, or widen refs)",
                redact_url(&src.url),
                src.refs
            ),
        });
    }
    let args = [
        "bundle".to_string(),
        "create".into(),
        "--quiet".into(),
        "-".into(),
        "--all".into(),
    ];
    let mut cmd = git(Some(&src.work_dir));
    cmd.args(args.iter());
    let (bytes, sha3) = stream_cmd_out(
        "git bundle",
        &shown(&args),
        cmd,
        src.timeout,
        BUNDLE_PART,
        sink,
    )
    .await?;
    let head = head_ref.as_ref().and_then(|h| refs.get(h)).cloned();
    Ok(GitReport {
        url: redact_url(&src.url),
        refs_sha3: refs_sha3(&refs),
        refs,
        head_ref,
        head,
        part: BUNDLE_PART.to_string(),
        bytes,
        sha3,
        timeout_secs: src.timeout.as_secs(),
        started_at,
        finished_at: Utc::now(),
    })
}

/// A test restore of a bundle: written to a temporary file (bytes and SHA3 checked), cloned
/// with `git clone --mirror`, its refs compared with the report's, and `git fsck` run on the
/// clone.
pub async fn test_restore(
    report: &GitReport,
    input: PartReader,
    work_dir: Option<&Path>,
) -> Result<(), SourceError> {
    let mut b = tempfile::Builder::new();
    b.prefix("backstop-git-verify-");
    let scratch = match work_dir {
        Some(d) => b.tempdir_in(d),
        None => b.tempdir(),
    }
    .map_err(|e| SourceError::io("creating a temporary directory for a git test restore", e))?;
    let bundle = scratch.path().join("backup.bundle");
    crate::command::write_raw(input, (report.bytes, &report.sha3), &bundle).await?;
    let limit = Duration::from_secs(report.timeout_secs.max(1));
    let clone = scratch.path().join("clone.git");
    let cloned = run_git(
        "clone of the bundle",
        None,
        &[
            "clone".into(),
            "--mirror".into(),
            "--quiet".into(),
            bundle.to_string_lossy().into_owned(),
            clone.to_string_lossy().into_owned(),
        ],
        limit,
    )
    .await;
    if let Err(SourceError::CommandFailed { stderr, .. }) = &cloned {
        return Err(SourceError::Mismatch {
            what: "the bundle".into(),
            why: format!("git cannot clone it: {stderr}"),
        });
    }
    cloned?;
    let listed = run_git(
        "listing of the clone's refs",
        Some(&clone),
        &[
            "for-each-ref".into(),
            "--format=%(objectname)%09%(refname)".into(),
        ],
        limit,
    )
    .await?;
    let patterns = vec!["refs/*".to_string()];
    let got = parse_refs(&listed, &patterns);
    if got != report.refs {
        return Err(SourceError::Mismatch {
            what: "the bundle's refs".into(),
            why: format!(
                "the backup recorded {} refs (digest {}), the clone of its bundle has {} (digest {})",
                report.refs.len(),
                report.refs_sha3,
                got.len(),
                refs_sha3(&got)
            ),
        });
    }
    match run_git(
        "git fsck of the clone",
        Some(&clone),
        &["fsck".into(), "--no-progress".into(), "--strict".into()],
        limit,
    )
    .await
    {
        Err(SourceError::CommandFailed { stderr, .. }) => Err(SourceError::Mismatch {
            what: "the clone of the bundle".into(),
            why: format!("git fsck found damage: {stderr}"),
        }),
        other => other.map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_and_patterns_are_checked() {
        assert_eq!(
            redact_url("https://bot:s3cret@gitlab.example/team/app.git"),
            "https://gitlab.example/team/app.git"
        );
        assert_eq!(
            redact_url("git@github.com:team/app.git"),
            "git@github.com:team/app.git"
        );
        assert_eq!(redact_url("/srv/git/app.git"), "/srv/git/app.git");
        assert!(check_patterns(&["refs/heads/*".into(), "refs/tags/v1".into()]).is_ok());
        for bad in ["heads/*", "refs/*/x", "refs/he*"] {
            assert!(check_patterns(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(check_patterns(&[]).is_err());
    }

    #[test]
    fn listings_keep_matching_refs_without_peeled_lines() {
        let out = b"aaa\tHEAD\nbbb\trefs/heads/main\nccc\trefs/tags/v1\nddd\trefs/tags/v1^{}\neee\trefs/pull/1/head\n";
        let refs = parse_refs(out, &["refs/heads/*".into(), "refs/tags/*".into()]);
        assert_eq!(
            refs.into_iter().collect::<Vec<_>>(),
            vec![
                ("refs/heads/main".to_string(), "bbb".to_string()),
                ("refs/tags/v1".to_string(), "ccc".to_string())
            ]
        );
    }
}
