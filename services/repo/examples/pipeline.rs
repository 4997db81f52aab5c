//! Prints the data-path figures for a file: `cargo run -p backstop-repo --example pipeline --
//! FILE [QUALITY...]` (default qualities 0 1 3 5). Single core, median of 3 runs per stage.

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: pipeline FILE [QUALITY...]");
        std::process::exit(2);
    };
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot read {path}: {e}");
            std::process::exit(1);
        }
    };
    let mut qualities: Vec<u32> = args.filter_map(|a| a.parse().ok()).collect();
    if qualities.is_empty() {
        qualities = vec![0, 1, 3, 5];
    }
    let figs = backstop_repo::bench_pipeline_with(
        &data,
        &qualities,
        backstop_repo::ChunkerParams::default(),
        3,
    );
    println!("{} bytes, {} chunks", data.len(), figs[0].chunks);
    println!("{:<24} {:>10} {:>8}", "stage", "MB/s", "ratio");
    for f in figs {
        println!("{:<24} {:>10.1} {:>8.2}", f.stage, f.mb_per_sec, f.ratio);
    }
}
