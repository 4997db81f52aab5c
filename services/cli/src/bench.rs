//! `backstop bench ...`: a thin entry to the benchmarks, which are a binary of their own,
//! `backstop-bench` (services/bench), so that this binary neither contains nor links them.
//!
//! The arguments after `bench` are handed over untouched (`--help` included) to the
//! `backstop-bench` found beside this executable, else on `PATH`. It replaces this process
//! (`exec`), so its output, exit status and signals are the benchmark's own. `BACKSTOP_BIN` is set
//! to this executable, so that benchmarks running `backstop` as a child measure this very build.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The benchmark binary's file name.
const BENCH_BINARY: &str = "backstop-bench";

/// Everything after `backstop bench`, passed through as it is.
#[derive(clap::Args)]
#[command(disable_help_flag = true)]
pub struct BenchArgs {
    /// The benchmark and its options: `ledger`, `api`, `backup`, `physical`, `prune`, `drill`,
    /// `webhook` or `fuzz` (`backstop bench --help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<OsString>,
}

/// Runs `backstop-bench ARGS...` in place of this process; returns only if it cannot.
pub fn run(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find the backstop executable's path")?;
    let bench = find_bench(exe.parent(), std::env::var_os("PATH").as_deref()).with_context(|| {
        format!(
            "the benchmarks are a separate binary, `{BENCH_BINARY}`, and it is neither beside {} \
             nor on PATH: build it with `cargo build --release -p backstop-bench` (it lands \
             beside target/release/backstop)",
            exe.display()
        )
    })?;
    let err = std::process::Command::new(&bench)
        .args(&args.args)
        .env("BACKSTOP_BIN", &exe)
        .exec();
    Err(err).with_context(|| format!("cannot run {}", bench.display()))
}

/// `backstop-bench` in `exe_dir`, else in the first directory of `path` holding an executable
/// of that name.
fn find_bench(exe_dir: Option<&Path>, path: Option<&OsStr>) -> Option<PathBuf> {
    let beside = exe_dir.map(|d| d.join(BENCH_BINARY));
    let on_path = path
        .map(|p| std::env::split_paths(p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(BENCH_BINARY));
    beside.into_iter().chain(on_path).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn make(dir: &Path, mode: u32) -> PathBuf {
        let p = dir.join(BENCH_BINARY);
        std::fs::write(&p, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }

    #[test]
    fn prefers_the_binary_beside_the_executable_then_path() {
        let (beside, on_path, empty) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let in_path = make(on_path.path(), 0o755);
        let path = std::env::join_paths([empty.path(), on_path.path()]).expect("join");
        assert_eq!(
            find_bench(Some(empty.path()), Some(&path)),
            Some(in_path),
            "falls back to PATH"
        );
        let next_to = make(beside.path(), 0o755);
        assert_eq!(find_bench(Some(beside.path()), Some(&path)), Some(next_to));
    }

    #[test]
    fn ignores_files_that_are_not_executable_and_reports_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        make(dir.path(), 0o644);
        let path = OsString::from(dir.path());
        assert_eq!(find_bench(Some(dir.path()), Some(&path)), None);
        assert_eq!(find_bench(None, None), None);
    }
}
