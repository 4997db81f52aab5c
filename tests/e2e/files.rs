//! A files source through the binary: configured with excludes, backed up, shown, restored by
//! path and in full, a dry run that writes nothing, and the bad inputs: a relative path in the
//! configuration, a restore onto existing files, a path the backup does not hold.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use support::{Site, stderr};

#[test]
fn a_files_source_backs_up_and_restores_chosen_paths_through_the_cli() {
    let site = Site::new("ops");
    let app = site.path("srv/app");
    for (p, body) in [
        ("models/m.bin", vec![3u8; 2 << 20]),
        ("config/app.json", br#"{"k": 1}"#.to_vec()),
        ("node_modules/x/index.js", b"skip".to_vec()),
        ("logs/a.log", b"skip".to_vec()),
    ] {
        let f = app.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, body).unwrap();
    }
    std::fs::set_permissions(
        app.join("config/app.json"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::symlink("config/app.json", app.join("app.json")).unwrap();
    let config = |paths: &str| {
        format!(
            "data_dir = {:?}\n[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n\n[[sources]]\nname = \"app\"\nkind = \"files\"\npaths = [{paths}]\nexclude = [\"node_modules\", \"logs\"]\n",
            site.path("data"),
            site.path("repo"),
            site.path("master.key"),
        )
    };
    // A relative path is refused when the configuration is read.
    std::fs::write(site.path("backstop.toml"), config("\"srv/app\"")).unwrap();
    let out = site.run(&[
        "init",
        "--generate-key",
        site.path("master.key").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not an absolute path"),
        "{}",
        stderr(&out)
    );

    std::fs::write(site.path("backstop.toml"), config(&format!("{app:?}"))).unwrap();
    site.ok(&[
        "init",
        "--generate-key",
        site.path("master.key").to_str().unwrap(),
    ]);
    let out = site.ok(&["backup", "--source", "app", "--json"]);
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = done["completed"]["backup_id"]
        .as_str()
        .or_else(|| done["backup_id"].as_str())
        .unwrap_or_else(|| panic!("no backup id in {done}"))
        .to_string();
    let base = app.to_str().unwrap().trim_start_matches('/').to_string();

    let shown = site.ok(&["show", &id]);
    assert!(shown.contains(&format!("{base}/models/m.bin")), "{shown}");
    assert!(shown.contains("-> config/app.json"), "{shown}");
    assert!(
        !shown.contains("node_modules") && !shown.contains("a.log"),
        "{shown}"
    );

    // A dry run: the plan, nothing written.
    let to = site.path("restored");
    let out = site.ok(&[
        "restore",
        &id,
        "--to-dir",
        to.to_str().unwrap(),
        "--dry-run",
    ]);
    assert!(out.contains("nothing was written"), "{out}");
    assert!(!to.exists());

    // One path: only it (and the directories above it).
    let out = site.ok(&[
        "restore",
        &id,
        "--to-dir",
        to.to_str().unwrap(),
        "--paths",
        &format!("{base}/config"),
    ]);
    assert!(out.contains("1 files"), "{out}");
    let back = to.join(&base);
    assert_eq!(
        std::fs::metadata(back.join("config/app.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o640
    );
    assert!(!back.join("models").exists());

    // Again onto what is there: refused, nothing changed.
    let out = site.run(&[
        "restore",
        &id,
        "--to-dir",
        to.to_str().unwrap(),
        "--paths",
        &format!("{base}/config"),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exists already"), "{}", stderr(&out));

    // A path the backup does not hold.
    let out = site.run(&[
        "restore",
        &id,
        "--to-dir",
        site.path("other").to_str().unwrap(),
        "--paths",
        "srv/nope",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("srv/nope"), "{}", stderr(&out));

    // Everything into a new directory: the link comes back as a link.
    let all = site.path("all");
    site.ok(&[
        "restore",
        "latest",
        "--source",
        "app",
        "--allow-unverified",
        "--to-dir",
        all.to_str().unwrap(),
    ]);
    let back = all.join(&base);
    assert_eq!(
        std::fs::read_link(back.join("app.json")).unwrap(),
        PathBuf::from("config/app.json")
    );
    assert_eq!(
        std::fs::read(back.join("models/m.bin")).unwrap(),
        vec![3u8; 2 << 20]
    );
    assert!(!back.join("node_modules").exists() && !back.join("logs").exists());

    // The ledger has the backup and both restores, by the operator.
    let tail = site.ok(&["ledger", "tail", "--json", "--from", "1"]);
    let count = |t: &str| {
        tail.lines()
            .filter(|l| l.contains(&format!("\"type\":\"{t}\"")))
            .count()
    };
    assert_eq!(count("backup.completed"), 1, "{tail}");
    assert_eq!(count("recovery.completed"), 2, "{tail}");
}
