//! Retention recommendations over real backups in a repository in memory.
//!
//! Forty backups of one source, each with a stream every backup shares byte for byte
//! (`data/common`, deduplicated by the repository) and a stream of its own (`data/own`). The
//! manifests carry the real time they were written, so the test gives the candidates a history
//! of one backup a day at noon, 2026-01-21 .. 2026-03-01 (a Sunday), judged at 23:00 that day.
//! The kept sets are worked out by hand from the calendar below, and the cost of each from the
//! manifests' per-stream chunk lengths: the shared stream once, plus each kept backup's own
//! stream and manifest.

use std::collections::BTreeMap;
use std::sync::Arc;

use backstop_events::{BackupKind, uuid_v7};
use backstop_ops::cost::{self, StoredBackup};
use backstop_ops::forget::RetentionFacts;
use backstop_ops::retention::{Class, PolicyEntry, RetentionConfig};
use backstop_repo::{BackupMeta, KeyAccessLog, KeyPurpose, MasterKey, RepoParams, Repository};
use backstop_testkit::MemoryBackend;
use chrono::{NaiveDate, TimeZone, Utc};

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

fn sealed(m: &backstop_repo::Manifest, stream: &str) -> u64 {
    let mut seen = std::collections::HashSet::new();
    m.stream(stream)
        .unwrap()
        .chunks
        .iter()
        .filter(|c| seen.insert(c.id))
        .map(|c| u64::from(c.sealed_len))
        .sum()
}

#[tokio::test]
async fn recommendations_count_shared_chunks_once_and_follow_the_calendar() {
    let repo = Repository::init(
        Arc::new(MemoryBackend::new()),
        &MasterKey::from_bytes([7; 64]),
        RepoParams::default(),
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .unwrap();
    let common = noise(1, 300_000);
    for i in 0..40u64 {
        let w = repo
            .start_backup(BackupMeta {
                backup_id: uuid_v7(),
                kind: BackupKind::Full,
                parent: None,
                source: "main".into(),
                purpose: KeyPurpose::Database,
                actor: "test".into(),
            })
            .await
            .unwrap();
        w.add_stream("data/common", &common[..]).await.unwrap();
        w.add_stream("data/own", &noise(100 + i, 20_000)[..])
            .await
            .unwrap();
        w.finish(serde_json::json!({})).await.unwrap();
    }
    let (mut backups, unreadable) = cost::stored_backups(&repo, &RetentionFacts::default())
        .await
        .unwrap();
    assert_eq!((backups.len(), unreadable), (40, 0));
    // Oldest first (ids are time-ordered): day i is 2026-01-21 + i.
    backups.sort_by_key(|b| b.candidate.id);
    let first = NaiveDate::from_ymd_opt(2026, 1, 21).unwrap();
    let mut by_day: BTreeMap<NaiveDate, StoredBackup> = BTreeMap::new();
    let mut manifests = BTreeMap::new();
    for listed in repo.list_backups().await.unwrap() {
        let m = listed.manifest.unwrap();
        manifests.insert(m.backup_id, (m, listed.manifest_size));
    }
    for (i, b) in backups.iter_mut().enumerate() {
        let day = first + chrono::TimeDelta::days(i as i64);
        b.candidate.time = Utc.from_utc_datetime(&day.and_hms_opt(12, 0, 0).unwrap());
        by_day.insert(day, b.clone());
    }
    let now = Utc.with_ymd_and_hms(2026, 3, 1, 23, 0, 0).unwrap();
    let retention = RetentionConfig::new(vec![PolicyEntry {
        source: Some("main".into()),
        class: Class::Backups,
        keep_daily: Some(30),
        keep_hourly: Some(0),
        keep_last: Some(0),
        keep_weekly: Some(0),
        keep_monthly: Some(0),
        keep_yearly: Some(0),
        keep_tags: Some(BTreeMap::new()),
        ..Default::default()
    }])
    .unwrap();
    let price = 0.023;
    let r = cost::recommend(&backups, &retention, price, now);

    // The cost of a kept set by hand: the shared stream once, each kept backup's own stream and
    // manifest.
    let any = manifests.values().next().unwrap();
    let common_bytes = sealed(&any.0, "data/common");
    let cost_of = |days: &[NaiveDate]| -> u64 {
        common_bytes
            + days
                .iter()
                .map(|d| {
                    let (m, size) = &manifests[&by_day[d].candidate.id];
                    sealed(m, "data/own") + size
                })
                .sum::<u64>()
    };
    let d = |m: u32, day: u32| NaiveDate::from_ymd_opt(2026, m, day).unwrap();
    let range = |from: NaiveDate, to: NaiveDate| -> Vec<NaiveDate> {
        from.iter_days().take_while(|x| *x <= to).collect()
    };

    // Current: 30 dailies = Jan 31 .. Mar 1.
    let current = range(d(1, 31), d(3, 1));
    // 14 dailies = Feb 16 .. Mar 1; 8 weeklies = the newest of each ISO week, of which there
    // are 6 (W04 Jan 19-25 holds the oldest): Mar 1, Feb 22, 15, 8, 1, Jan 25.
    let mut two_weeks = range(d(2, 16), d(3, 1));
    two_weeks.extend([d(2, 15), d(2, 8), d(2, 1), d(1, 25)]);
    // 7 dailies = Feb 23 .. Mar 1; 4 weeklies: Mar 1, Feb 22, 15, 8; monthlies: Mar 1, Feb 28,
    // Jan 31.
    let mut monthly = range(d(2, 23), d(3, 1));
    monthly.extend([d(2, 22), d(2, 15), d(2, 8), d(1, 31)]);

    let by_name: BTreeMap<&str, &cost::PolicyCost> =
        r.policies.iter().map(|p| (p.name.as_str(), p)).collect();
    for (name, days) in [
        ("current", &current),
        ("30 dailies", &current),
        ("14 dailies + 8 weeklies", &two_weeks),
        ("7 dailies + 4 weeklies + 12 monthlies", &monthly),
    ] {
        let p = by_name[name];
        assert_eq!(p.backups_kept, days.len(), "{name}");
        let bytes = cost_of(days);
        assert_eq!(p.stored_bytes, bytes, "{name}");
        // USD a month = bytes / 2^30 * 0.023.
        let usd = bytes as f64 / (1u64 << 30) as f64 * price;
        assert!((p.monthly_usd - usd).abs() < 1e-12, "{name}");
    }
    assert!(by_name["current"].current);
    assert_eq!(r.policies[0].name, "current");
    // Deduplication is what makes the alternatives cheap but not proportionally so: 11 of 30
    // backups cost more than 11/30 of the current set, since the shared stream stays.
    let cheap = by_name["7 dailies + 4 weeklies + 12 monthlies"];
    assert!(cheap.delta_usd < 0.0);
    assert!(
        cheap.stored_bytes as f64 > by_name["current"].stored_bytes as f64 * 11.0 / 30.0,
        "the shared chunks are counted once in each set"
    );
    assert_eq!(r.summary().len(), 3);
    assert!(r.summary()[1].contains("14 dailies + 8 weeklies"));
}
