//! A git source through the binary, on real repositories (bare repositories on loopback paths):
//! a push to the source is mirrored by `backstop git sync` with every ref's hash equal on both
//! sides, its bundle is in the repository and `git clone` of the restored bundle has the same
//! head; a second sync of unchanged refs takes no bundle; a commit pushed to the mirror directly
//! makes the next sync report the divergence, leave the mirror's ref alone and exit 1, and
//! `backstop serve`'s alert monitor raises `git_mirror_diverged` (seen by `alerts list --json`).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Process, Site, stderr, stdout};

/// Runs git with a fixed identity; panics with its output if it fails.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=Dev", "-c", "user.email=dev@example.com"])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn commit(work: &Path, file: &str, body: &str, message: &str) -> String {
    std::fs::write(work.join(file), body).unwrap();
    git(work, &["add", file]);
    git(work, &["commit", "-q", "-m", message]);
    git(work, &["rev-parse", "HEAD"])
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn a_push_is_mirrored_with_equal_hashes_bundled_and_a_diverged_mirror_alerts() {
    let site = Site::new("ops");
    let (src, mirror) = (site.path("src.git"), site.path("mirror.git"));
    for bare in [&src, &mirror] {
        let out = Command::new("git")
            .args(["init", "-q", "--bare", "--initial-branch=main"])
            .arg(bare)
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let work = site.path("work");
    let out = Command::new("git")
        .args(["init", "-q", "--initial-branch=main"])
        .arg(&work)
        .output()
        .unwrap();
    assert!(out.status.success());
    git(&work, &["remote", "add", "origin", src.to_str().unwrap()]);
    commit(&work, "app.py", "print('v1')\n", "first");
    let head = commit(&work, "app.py", "print('v2')\n", "second");
    git(&work, &["tag", "-a", "v1.0", "-m", "release"]);
    git(&work, &["push", "-q", "origin", "main", "--tags"]);

    let api = backstop_testkit::free_port();
    std::fs::write(
        site.path("backstop.toml"),
        format!(
            "data_dir = {:?}\n[api]\nlisten = \"127.0.0.1:{api}\"\n[reports]\nweekly = false\n[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n\n[[sources]]\nname = \"app\"\nkind = \"git\"\nurl = {:?}\nmirror = {:?}\npoll_seconds = 60\n",
            site.path("data"),
            site.path("repo"),
            site.path("master.key"),
            src,
            mirror,
        ),
    )
    .unwrap();
    site.ok(&[
        "init",
        "--generate-key",
        site.path("master.key").to_str().unwrap(),
    ]);

    // The first sync: everything pushed, the hashes equal, a bundle taken.
    let synced = json(&site.ok(&["git", "sync", "app", "--json"]));
    assert_eq!(
        synced["report"]["diverged"],
        serde_json::json!([]),
        "{synced}"
    );
    assert_eq!(synced["report"]["head"], head, "{synced}");
    assert_eq!(synced["report"]["refs"].as_object().unwrap().len(), 2);
    assert_eq!(synced["bundle"], "taken", "{synced}");
    let backup_id = synced["backup_id"].as_str().unwrap().to_string();
    assert_eq!(
        git(&mirror, &["rev-parse", "refs/heads/main"]),
        head,
        "the mirror has the source's head"
    );
    assert_eq!(
        git(&mirror, &["rev-parse", "refs/tags/v1.0"]),
        git(&src, &["rev-parse", "refs/tags/v1.0"])
    );

    // Unchanged refs: no new bundle.
    let again = json(&site.ok(&["git", "sync", "app", "--json"]));
    assert_eq!(again["bundle"], "unchanged", "{again}");
    assert_eq!(again["backup_id"], backup_id.as_str());

    // The bundle restores to a clone with the same head.
    let shown = site.ok(&["show", &backup_id, "--json"]);
    assert!(shown.contains("\"git\""), "{shown}");
    let bundle = site.path("app.bundle");
    site.ok(&["restore", &backup_id, "--out", bundle.to_str().unwrap()]);
    let clone = site.path("clone");
    let out = Command::new("git")
        .arg("clone")
        .arg("-q")
        .arg(&bundle)
        .arg(&clone)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(git(&clone, &["rev-parse", "HEAD"]), head);
    assert_eq!(git(&clone, &["log", "--format=%s", "-1"]), "second");
    // The test restore (clone, refs compared, fsck) passes.
    site.ok(&["verify", &backup_id, "--restore"]);

    // A new push is mirrored by the next sync and bundled again.
    let head2 = commit(&work, "app.py", "print('v3')\n", "third");
    git(&work, &["push", "-q", "origin", "main"]);
    let third = json(&site.ok(&["git", "sync", "app", "--json"]));
    assert_eq!(third["report"]["head"], head2.as_str(), "{third}");
    assert_eq!(third["bundle"], "taken");
    assert_eq!(git(&mirror, &["rev-parse", "refs/heads/main"]), head2);

    // Somebody pushes to the mirror directly: the sync reports it, leaves it, exits 1.
    let other = site.path("other");
    let out = Command::new("git")
        .arg("clone")
        .arg("-q")
        .arg(&mirror)
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    let rogue = commit(&other, "hotfix.py", "x = 1\n", "pushed to the mirror");
    git(&other, &["push", "-q", "origin", "main"]);
    let head3 = commit(&work, "app.py", "print('v4')\n", "fourth");
    git(&work, &["push", "-q", "origin", "main"]);
    let out = site.run(&["git", "sync", "app", "--json"]);
    assert!(!out.status.success(), "a diverged sync exits 1");
    let diverged = json(&stdout(&out));
    let refs = diverged["report"]["diverged"].as_array().unwrap();
    assert_eq!(refs.len(), 1, "{diverged}");
    assert_eq!(refs[0]["name"], "refs/heads/main");
    assert_eq!(refs[0]["source"], head3.as_str());
    assert_eq!(refs[0]["mirror"], rogue.as_str());
    assert_eq!(
        git(&mirror, &["rev-parse", "refs/heads/main"]),
        rogue,
        "the mirror's diverged ref was not overwritten"
    );
    // The source is still bundled: the bundle is the copy that counts now.
    assert_eq!(diverged["bundle"], "taken", "{diverged}");
    let tail = site.ok(&["ledger", "tail", "--json", "--stream", "git-app"]);
    assert!(tail.contains("git.diverged"), "{tail}");

    // serve's alert monitor raises the alert from git.diverged (its own poll finds the same).
    let cfg = site.path("backstop.toml");
    let mut serve = Process::spawn(
        &site.path("data"),
        &["--config", cfg.to_str().unwrap(), "serve"],
        &[],
    );
    serve.wait_for_log("alert monitor running", Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    let alert = loop {
        let out = site.run(&["alerts", "list", "--json"]);
        if out.status.success()
            && let Some(a) = json(&stdout(&out)).as_array().and_then(|a| {
                a.iter()
                    .find(|a| a["kind"] == "git_mirror_diverged")
                    .cloned()
            })
        {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no git_mirror_diverged alert: {} {}\n{}",
            stdout(&out),
            stderr(&out),
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(alert["severity"], "critical", "{alert}");
    assert_eq!(alert["source"], "app");
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("refs/heads/main"),
        "{alert}"
    );
    assert_eq!(git(&mirror, &["rev-parse", "refs/heads/main"]), rogue);
    assert!(serve.terminate().success(), "{}", serve.log());
}
