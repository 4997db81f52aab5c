//! The `backstop-bench` command line without any server: what it offers and how it refuses.
//! (Each benchmark's run against real servers is tests/tiny.rs, a test of the `backstop`
//! package.) Being an integration test of this package, it also makes `cargo test --workspace`
//! build the `backstop-bench` binary that tiny.rs runs.

use std::process::Command;

fn bench() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backstop-bench"));
    c.env_remove("BACKSTOP_BIN");
    c
}

#[test]
fn help_lists_every_benchmark() {
    let out = bench().arg("--help").output().expect("run backstop-bench");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["api", "backup", "physical", "ledger", "fuzz", "--backstop"] {
        assert!(
            text.contains(name),
            "--help does not mention {name}:\n{text}"
        );
    }
}

#[test]
fn a_missing_backstop_binary_is_named_with_the_command_that_builds_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("backstop");
    for bench_name in ["backup", "physical", "api"] {
        let out = bench()
            .arg("--backstop")
            .arg(&missing)
            .arg(bench_name)
            .output()
            .expect("run backstop-bench");
        assert_eq!(out.status.code(), Some(1), "{bench_name}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&missing.display().to_string())
                && err.contains("cargo build --release -p backstop"),
            "{bench_name}: {err}"
        );
    }
}

#[test]
fn bad_arguments_are_usage_errors() {
    let out = bench()
        .args(["ledger", "--appenders", "many"])
        .output()
        .expect("run backstop-bench");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = bench()
        .args(["backup", "--tools", "tar"])
        .output()
        .expect("run backstop-bench");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// Refused before cargo or the nightly toolchain is run: an unknown target is named beside the
/// real ones, and a checkout without fuzz/ is named.
#[test]
fn fuzz_refuses_an_unknown_target_and_a_checkout_without_fuzz() {
    let out = bench()
        .args(["fuzz", "--seconds", "1", "--target", "nope"])
        .output()
        .expect("run backstop-bench");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"nope\"") && err.contains("pg_toc") && err.contains("config"),
        "{err}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bench()
        .args(["fuzz", "--repo"])
        .arg(dir.path())
        .output()
        .expect("run backstop-bench");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fuzz/Cargo.toml"), "{err}");
}
