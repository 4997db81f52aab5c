//! Which backup `latest` means, on a repository in memory: the newest verified one unless
//! unverified are allowed, and a damaged manifest named as damaged, not as "no backup".

use std::collections::HashSet;
use std::sync::Arc;

use backstop_events::{BackupKind, BackupMethod};
use backstop_ops::OpsError;
use backstop_ops::catalog::{Selector, resolve_backup};
use backstop_repo::{
    BackupMeta, KeyAccessLog, KeyPurpose, MasterKey, MemoryBackend, RepoParams, Repository,
};
use uuid::Uuid;

async fn repo() -> (Arc<MemoryBackend>, Repository) {
    let backend = Arc::new(MemoryBackend::new());
    let repo = Repository::init(
        backend.clone(),
        &MasterKey::from_bytes([3; 64]),
        RepoParams::default(),
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .unwrap();
    (backend, repo)
}

async fn backup(repo: &Repository, extra: serde_json::Value) -> Uuid {
    let id = backstop_events::uuid_v7();
    let writer = repo
        .start_backup_with(
            BackupMeta {
                backup_id: id,
                kind: BackupKind::Full,
                parent: None,
                source: "main".into(),
                purpose: KeyPurpose::Database,
                actor: "operator:test".into(),
            },
            Default::default(),
        )
        .await
        .unwrap();
    writer.add_stream("s", &b"rows"[..]).await.unwrap();
    writer.finish(extra).await.unwrap();
    id
}

#[tokio::test]
async fn latest_is_the_newest_verified_and_says_why() {
    let (_, repo) = repo().await;
    let old = backup(&repo, serde_json::json!({})).await;
    let new = backup(&repo, serde_json::json!({})).await;
    let physical = backup(&repo, serde_json::json!({ "physical": {} })).await;

    let verified: HashSet<Uuid> = [old].into();
    let r = resolve_backup(
        &repo,
        "latest",
        &Selector {
            method: Some(BackupMethod::Logical),
            verified: Some(&verified),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(r.manifest.backup_id, old);
    assert!(r.why.contains(&new.to_string()), "{}", r.why);

    let any = resolve_backup(&repo, "latest", &Selector::default())
        .await
        .unwrap();
    assert_eq!(any.manifest.backup_id, physical);

    let none: HashSet<Uuid> = HashSet::new();
    let e = resolve_backup(
        &repo,
        "latest",
        &Selector {
            verified: Some(&none),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(e, OpsError::NoBackup(_)), "{e}");
    assert!(e.to_string().contains("--allow-unverified"), "{e}");
}

#[tokio::test]
async fn a_damaged_only_manifest_is_named_as_damaged() {
    let (backend, repo) = repo().await;
    let id = backup(&repo, serde_json::json!({})).await;
    assert!(backend.tamper(&backstop_repo::manifest_key(&id), |b| {
        let last = b.len() - 1;
        b[last] ^= 1;
    }));
    let e = resolve_backup(&repo, "latest", &Selector::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, OpsError::DamagedManifest { backup, .. } if backup == id),
        "{e}"
    );
    assert!(e.is_data());
    assert!(e.to_string().contains("damaged"), "{e}");
    let by_id = resolve_backup(&repo, &id.to_string(), &Selector::default())
        .await
        .unwrap_err();
    assert!(matches!(by_id, OpsError::DamagedManifest { .. }), "{by_id}");
}
