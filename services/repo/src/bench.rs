//! A micro-benchmark of the data path, for `backstop bench` and for choosing the brotli quality.
//!
//! Each stage runs over the same input, single-threaded, `runs` times; the figure is the median.
//! Stages: `chunk` (fastcdc cut points), `chunk-id` (keyed SHA3-256 of every chunk),
//! `brotli-q<N>` (compression of every chunk, with the ratio), `brotli-decompress-q<N>`,
//! `seal` (AES-256-SIV of the quality-1 compressed chunks, plus the SHA3 of the sealed object),
//! `open` (the reverse). Throughput is in MB/s (10^6 bytes) of *input plaintext* per second for
//! every stage, so stages compare directly: a pipeline on one core runs at about
//! `1 / sum(1 / rate)`.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::chunk::chunk_id;
use crate::config::ChunkerParams;
use crate::keys::{DataKey, KeyInfo, KeyPurpose};
use crate::seal::{self, Brotli, ObjectKind};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineFigures {
    pub stage: String,
    pub quality: Option<u32>,
    pub input_bytes: u64,
    pub output_bytes: u64,
    /// input / output (compression stages); 1.0 otherwise.
    pub ratio: f64,
    /// Median throughput in MB/s of plaintext.
    pub mb_per_sec: f64,
    pub runs: u32,
    pub chunks: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn time_runs(runs: u32, bytes: usize, mut f: impl FnMut()) -> f64 {
    let rates: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            let s = t.elapsed().as_secs_f64().max(1e-9);
            bytes as f64 / s / 1e6
        })
        .collect();
    median(rates)
}

/// Measures the pipeline with the default chunk sizes and 5 runs per stage.
pub fn bench_pipeline(data: &[u8], qualities: &[u32]) -> Vec<PipelineFigures> {
    bench_pipeline_with(data, qualities, ChunkerParams::default(), 5)
}

pub fn bench_pipeline_with(
    data: &[u8],
    qualities: &[u32],
    params: ChunkerParams,
    runs: u32,
) -> Vec<PipelineFigures> {
    let runs = runs.max(1);
    let n = data.len();
    let mut out = Vec::new();
    let fig = |stage: &str, quality, output: usize, rate, chunks: usize| PipelineFigures {
        stage: stage.to_string(),
        quality,
        input_bytes: n as u64,
        output_bytes: output as u64,
        ratio: if output > 0 {
            n as f64 / output as f64
        } else {
            1.0
        },
        mb_per_sec: rate,
        runs,
        chunks: chunks as u64,
    };

    let (min, avg, max) = (
        params.min_size as usize,
        params.avg_size as usize,
        params.max_size as usize,
    );
    let mut bounds = Vec::new();
    let rate = time_runs(runs, n, || {
        bounds = fastcdc::v2020::FastCDC::new(data, min, avg, max)
            .map(|c| (c.offset, c.length))
            .collect();
    });
    let chunks: Vec<&[u8]> = bounds.iter().map(|&(o, l)| &data[o..o + l]).collect();
    out.push(fig("chunk", None, n, rate, chunks.len()));

    let key = [7u8; 32];
    let rate = time_runs(runs, n, || {
        for c in &chunks {
            std::hint::black_box(chunk_id(&key, c));
        }
    });
    out.push(fig("chunk-id", None, n, rate, chunks.len()));

    let mut q1_compressed: Vec<Vec<u8>> = Vec::new();
    for &q in qualities {
        let params = seal::brotli_params(
            Brotli {
                quality: q,
                lgwin: 22,
            },
            0,
        );
        let mut compressed: Vec<Vec<u8>> = Vec::new();
        let rate = time_runs(runs, n, || {
            compressed = chunks
                .iter()
                .map(|c| {
                    let mut v = Vec::with_capacity(c.len() / 2);
                    let mut p = params.clone();
                    p.size_hint = c.len();
                    let _ = seal::compress_into(&p, c, &mut v);
                    v
                })
                .collect();
        });
        let total: usize = compressed.iter().map(Vec::len).sum();
        out.push(fig(
            &format!("brotli-q{q}"),
            Some(q),
            total,
            rate,
            chunks.len(),
        ));
        let rate = time_runs(runs, n, || {
            for (c, orig) in compressed.iter().zip(&chunks) {
                let mut v = Vec::with_capacity(orig.len());
                let _ = brotli::BrotliDecompress(&mut &c[..], &mut v);
                std::hint::black_box(v);
            }
        });
        out.push(fig(
            &format!("brotli-decompress-q{q}"),
            Some(q),
            total,
            rate,
            chunks.len(),
        ));
        if q1_compressed.is_empty() || q == 1 {
            q1_compressed = compressed;
        }
    }
    if q1_compressed.is_empty() {
        q1_compressed = chunks.iter().map(|c| c.to_vec()).collect();
    }

    let dk = DataKey::new(
        KeyInfo {
            purpose: KeyPurpose::Database,
            key_id: "bench-v1-00000000".into(),
            version: 1,
            created_at: chrono::Utc::now(),
        },
        zeroize::Zeroizing::new([9u8; 64]),
    );
    let repo = Uuid::nil();
    let mut sealed: Vec<Vec<u8>> = Vec::new();
    let rate = time_runs(runs, n, || {
        sealed = q1_compressed
            .iter()
            .map(|c| {
                let s = seal::seal_object(&repo, "chunks/00/x", &dk, ObjectKind::Chunk, None, c);
                std::hint::black_box(seal::sha3(&s));
                s
            })
            .collect();
    });
    let total: usize = sealed.iter().map(Vec::len).sum();
    out.push(fig("seal", None, total, rate, chunks.len()));
    let rate = time_runs(runs, n, || {
        for s in &sealed {
            std::hint::black_box(seal::sha3(s));
            let _ = std::hint::black_box(seal::open_object(&repo, "chunks/00/x", &dk, s, None));
        }
    });
    out.push(fig("open", None, total, rate, chunks.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_for_every_stage() {
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| {
                if (i / 1000) % 3 == 0 {
                    (i % 251) as u8
                } else {
                    (i.wrapping_mul(2654435761) >> 24) as u8
                }
            })
            .collect();
        let figs = bench_pipeline_with(&data, &[1, 3], ChunkerParams::default(), 1);
        let stages: Vec<&str> = figs.iter().map(|f| f.stage.as_str()).collect();
        assert_eq!(
            stages,
            vec![
                "chunk",
                "chunk-id",
                "brotli-q1",
                "brotli-decompress-q1",
                "brotli-q3",
                "brotli-decompress-q3",
                "seal",
                "open"
            ]
        );
        assert!(figs.iter().all(|f| f.mb_per_sec > 0.0 && f.chunks > 0));
        assert!(figs[2].ratio > 1.0, "partly repetitive data compresses");
    }
}
