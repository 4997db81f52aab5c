//! The ledger survives its machine, end to end with the `backstop` binary: `serve` mirrors the
//! ledger into a local-directory repository (at start and at shutdown; the interval is set to
//! an hour so that no timer is involved), the data directory is deleted, `ledger restore`
//! rebuilds it from the bucket alone, `ledger verify` passes, and `serve` resumes on it.

mod support;

use std::path::Path;
use std::time::Duration;

use backstop_events::Envelope;
use support::{Process, run, stderr, stdout};

fn all_events(cfg: &str, data_dir: &Path) -> Vec<Envelope> {
    let out = run(
        data_dir,
        &["--config", cfg, "ledger", "tail", "--json", "--from", "1"],
    );
    assert!(out.status.success(), "tail failed: {}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("tail --json prints envelopes"))
        .collect()
}

fn append(cfg: &str, data_dir: &Path, region: &str) {
    let payload = format!(
        r#"{{"region": "{region}", "storage_class": "STANDARD", "bytes": 7, "objects": 1}}"#
    );
    let out = run(
        data_dir,
        &[
            "--config",
            cfg,
            "ledger",
            "append",
            "--stream",
            "storage",
            "--type",
            "storage.usage_sampled",
            "--payload",
            &payload,
            "--operator",
            "e2e",
        ],
    );
    assert!(out.status.success(), "append: {}", stderr(&out));
}

fn serve(cfg: &str, data_dir: &Path) -> Process {
    let listen = format!("127.0.0.1:{}", backstop_testkit::free_port());
    let p = Process::spawn(
        data_dir,
        &["--config", cfg, "serve", "--listen", &listen],
        &[],
    );
    p.wait_for_log("control socket listening", Duration::from_secs(60));
    p
}

#[test]
fn the_data_directory_deleted_ledger_restore_gives_every_mirrored_event_back_and_serve_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let data = dir.path().join("data");
    let bucket = dir.path().join("bucket");
    let key = etc.join("master.key");
    let cfg = etc.join("backstop.toml");
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n\n[ledger]\nmirror_seconds = 3600\n",
            bucket.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_string();

    let out = run(
        &data,
        &[
            "--config",
            &cfg,
            "init",
            "--repo",
            bucket.to_str().unwrap(),
            "--generate-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "init: {}", stderr(&out));
    for i in 0..5 {
        append(&cfg, &data, &format!("before-serve-{i}"));
    }
    let mut p = serve(&cfg, &data);
    // Beside the running serve (through its control socket), then mirrored at its shutdown.
    append(&cfg, &data, "beside-serve");
    assert!(p.terminate().success(), "{}", p.log());
    let before = all_events(&cfg, &data);
    let beside = before
        .iter()
        .find(|e| e.payload["region"] == "beside-serve")
        .expect("the append beside serve is in the ledger")
        .position;
    assert!(
        std::fs::read_dir(bucket.join("ledger")).unwrap().count() >= 1,
        "segments in the bucket"
    );

    // The machine is lost: its data directory with it (the signing key, beside the
    // configuration file, and the master key are kept elsewhere).
    std::fs::remove_dir_all(&data).unwrap();

    let out = run(
        &data,
        &[
            "--config",
            &cfg,
            "ledger",
            "restore",
            "--json",
            "--operator",
            "e2e-restore",
        ],
    );
    assert!(out.status.success(), "restore: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let last = report["last_position"].as_u64().unwrap();
    // Everything committed before the shutdown's mirror is back; at most what was appended
    // during shutdown, after its last round, is not.
    assert!(
        last >= beside,
        "restored up to {last}, the append beside serve was {beside}"
    );
    assert!(report["checkpoints"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(report["pinned"], false);

    let out = run(&data, &["--config", &cfg, "ledger", "verify"]);
    assert!(
        out.status.success(),
        "verify after restore: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let after = all_events(&cfg, &data);
    assert_eq!(&after[..last as usize], &before[..last as usize]);
    // The restore recorded its own unwrap of the ledger key, chained after the restored head.
    let access = &after[last as usize];
    assert_eq!(access.event_type, "key.accessed");
    assert_eq!(access.actor.to_string(), "operator:e2e-restore");
    assert_eq!(access.prev_hash, after[last as usize - 1].hash);

    // The mirror goes on after the restored head: only the restore's own event is to upload.
    let out = run(&data, &["--config", &cfg, "ledger", "stats", "--json"]);
    assert!(out.status.success(), "stats: {}", stderr(&out));
    let stats: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(stats["mirror_cursor"].as_u64(), Some(last + 1), "{stats}");
    assert_eq!(stats["mirror_lag"].as_u64(), Some(1), "{stats}");

    // A second restore into the rebuilt data directory is refused, and changes nothing.
    let again = run(&data, &["--config", &cfg, "ledger", "restore"]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("not empty"), "{}", stderr(&again));

    // serve resumes on the restored ledger; a new append continues the chain.
    let mut p = serve(&cfg, &data);
    append(&cfg, &data, "after-restore");
    assert!(p.terminate().success(), "{}", p.log());
    let resumed = all_events(&cfg, &data);
    let new = resumed
        .iter()
        .find(|e| e.payload["region"] == "after-restore")
        .expect("the append after the restore");
    assert!(new.position > last + 1);
    assert_eq!(new.prev_hash, resumed[new.position as usize - 2].hash);
    let out = run(&data, &["--config", &cfg, "ledger", "verify"]);
    assert!(
        out.status.success(),
        "verify after resuming: {}{}",
        stdout(&out),
        stderr(&out)
    );
}
