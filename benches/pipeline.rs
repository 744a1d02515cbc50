//! Pipeline throughput: a raw local source → zero detection → content digest → object SHA-256
//! → a local file sink, beside plain single-core SHA-256 measured in the same run.
//!
//! Target (DESIGN.md): pipeline throughput ≥ 90 % of single-core SHA-256 speed.
//!
//! ```text
//! cargo bench --bench pipeline
//! VRG_BENCH_MIB=1024 cargo bench --bench pipeline     # larger input
//! ```

use criterion::{Criterion, Throughput};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtrigaud::format::{self, DecodeOptions, EncodeOptions};
use virtrigaud::io::{ImageSource, LocalFile, LocalFileSink};
use virtrigaud::pipeline::{self, PipelineOptions};
use virtrigaud::{DiskFormat, Phase};

fn random_file(path: &Path, mib: usize) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

fn sha_once(data: &[u8]) -> Duration {
    let t = Instant::now();
    let d = Sha256::digest(data);
    std::hint::black_box(d);
    t.elapsed()
}

fn pipeline_once(rt: &tokio::runtime::Runtime, src: &Path, dst: &Path) -> Duration {
    rt.block_on(async {
        let _ = std::fs::remove_file(dst);
        let t = Instant::now();
        let f = LocalFile::open(src).await.unwrap();
        let (_, content) = format::decode(
            ImageSource::RandomAccess(Arc::new(f)),
            None,
            &DecodeOptions::default(),
        )
        .await
        .unwrap();
        let sink = LocalFileSink::create(dst, true).await.unwrap();
        let (report, sink) = pipeline::run(
            content,
            Box::new(sink),
            pipeline::Job {
                format: DiskFormat::Raw,
                encode: &EncodeOptions::default(),
                hash_object: true,
                phase: Phase::Export,
                label: "bench",
            },
            &PipelineOptions::default(),
        )
        .await
        .unwrap();
        sink.commit().await.unwrap();
        std::hint::black_box(report);
        t.elapsed()
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mib: usize = std::env::var("VRG_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let bytes = (mib as u64) << 20;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.raw");
    random_file(&src, mib);
    let data = std::fs::read(&src).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut c = Criterion::default().sample_size(10).configure_from_args();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("sha256_single_core", |b| b.iter(|| Sha256::digest(&data)));
    g.bench_function("raw_file_to_file_with_digests", |b| {
        b.iter(|| pipeline_once(&rt, &src, &dst))
    });
    g.finish();

    // The ratio, from interleaved runs in this same process.
    let (mut s, mut p) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        s.push(sha_once(&data));
        p.push(pipeline_once(&rt, &src, &dst));
    }
    let (s, p) = (median(s), median(p));
    let mbps = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
    println!(
        "\nRESULT input={mib} MiB random raw; sha256 single core {:.0} MB/s; pipeline {:.0} MB/s; ratio {:.2} (target >= 0.90)",
        mbps(s),
        mbps(p),
        s.as_secs_f64() / p.as_secs_f64()
    );
    c.final_summary();
}
