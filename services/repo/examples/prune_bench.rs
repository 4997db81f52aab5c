//! The prune benchmark: `cargo run --release -p backstop-repo --example prune_bench --
//! [CHUNKS [MANIFESTS [MEMORY_IDS]]]` (default 1,000,000 chunks, 1,000 manifests, the default
//! in-memory budget). Builds the repository in a temporary directory (under `$TMPDIR`), prints
//! the figures as JSON and removes it. Targets: each run under 60 s and 300 MB.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: usize| -> usize {
        match args.get(i) {
            None => default,
            Some(a) => a.replace('_', "").parse().unwrap_or_else(|_| {
                eprintln!(
                    "usage: prune_bench [CHUNKS [MANIFESTS [MEMORY_IDS]]]: {a:?} is not a number"
                );
                std::process::exit(2);
            }),
        }
    };
    let chunks = num(0, 1_000_000);
    let manifests = num(1, 1_000);
    let memory_ids = num(2, 1 << 20);
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot create a temporary directory: {e}");
            std::process::exit(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let res = rt.block_on(backstop_repo::gc_bench::bench_prune_with(
        dir.path(),
        chunks,
        manifests,
        memory_ids,
    ));
    match res {
        Ok(f) => match serde_json::to_string_pretty(&f) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("cannot print the figures: {e}"),
        },
        Err(e) => {
            eprintln!("prune benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}
