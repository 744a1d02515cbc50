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

/// Discards what it gets: the pipeline's own cost, without the file system's.
struct NullSink;

#[async_trait::async_trait]
impl virtrigaud::ByteSink for NullSink {
    async fn write(&mut self, data: bytes::Bytes) -> virtrigaud::Result<()> {
        std::hint::black_box(data);
        Ok(())
    }
    async fn commit(self: Box<Self>) -> virtrigaud::Result<()> {
        Ok(())
    }
    async fn abort(self: Box<Self>) -> virtrigaud::Result<()> {
        Ok(())
    }
}

fn pipeline_once(
    rt: &tokio::runtime::Runtime,
    src: &Path,
    dst: Option<&Path>,
    digest: bool,
) -> Duration {
    rt.block_on(async {
        if let Some(dst) = dst {
            let _ = std::fs::remove_file(dst);
        }
        let t = Instant::now();
        let f = LocalFile::open(src).await.unwrap();
        let (_, content) = format::decode(
            ImageSource::RandomAccess(Arc::new(f)),
            None,
            &DecodeOptions::default(),
        )
        .await
        .unwrap();
        let sink: Box<dyn virtrigaud::ByteSink> = match dst {
            Some(dst) => Box::new(LocalFileSink::create(dst, true).await.unwrap()),
            None => Box::new(NullSink),
        };
        let (report, sink) = pipeline::run(
            content,
            sink,
            pipeline::Job {
                format: DiskFormat::Raw,
                encode: &EncodeOptions::default(),
                content_digest: digest,
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
    g.bench_function("raw_file_to_file_sha256", |b| {
        b.iter(|| pipeline_once(&rt, &src, Some(&dst), false))
    });
    g.bench_function("raw_file_to_file_sha256_and_content_digest", |b| {
        b.iter(|| pipeline_once(&rt, &src, Some(&dst), true))
    });
    g.finish();

    // The ratio, from interleaved runs in this same process.
    let (mut s, mut p, mut pc, mut pn) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..7 {
        pn.push(pipeline_once(&rt, &src, None, false));
        s.push(sha_once(&data));
        p.push(pipeline_once(&rt, &src, Some(&dst), false));
        pc.push(pipeline_once(&rt, &src, Some(&dst), true));
    }
    let (s, p, pc, pn) = (median(s), median(p), median(pc), median(pn));
    let mbps = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
    println!(
        "\nRESULT input={mib} MiB random raw, {} cores; sha256 single core {:.0} MB/s",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        mbps(s)
    );
    println!(
        "RESULT pipeline raw -> SHA-256 + CRC32C chunks -> file (fsync): {:.0} MB/s; ratio {:.2} (target >= 0.90)",
        mbps(p),
        s.as_secs_f64() / p.as_secs_f64()
    );
    println!(
        "RESULT same to a null sink (the pipeline without the file system): {:.0} MB/s; ratio {:.2}",
        mbps(pn),
        s.as_secs_f64() / pn.as_secs_f64()
    );
    println!(
        "RESULT same + content digest (a second SHA-256 pass over every data block): {:.0} MB/s; ratio {:.2}",
        mbps(pc),
        s.as_secs_f64() / pc.as_secs_f64()
    );
    c.final_summary();
}
