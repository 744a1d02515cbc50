//! Format conversion inside the pipeline, timed beside `qemu-img convert` on the same input in
//! the same run; prints the ratio (ours / qemu-img, lower is better).
//!
//! Targets (DESIGN.md): qcow2 → raw ≤ 1.0×; raw → streamOptimized VMDK ≤ 0.6× (parallel deflate).
//!
//! ```text
//! cargo bench --bench formats                 # 1 GiB virtual, 300 MiB random data
//! VRG_BENCH_DATA_MIB=100 cargo bench --bench formats
//! ```
//! qcow2 → raw is timed three ways: the pipeline without the content digest (decode, zero
//! detection, encode, write: what `qemu-img convert` does, the figure the target is about), the
//! codecs alone, and the pipeline with the content digest (a SHA-256 pass qemu-img does not
//! do). raw → VMDK includes the content digest. Our commit fsyncs the output; qemu-img flushes
//! its output on close too. Needs `qemu-img`.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtrigaud::format::{self, DecodeOptions, EncodeOptions, VmdkSubformat};
use virtrigaud::io::{ImageSource, LocalFile, LocalFileSink};
use virtrigaud::pipeline::{self, Job, PipelineOptions};
use virtrigaud::{DiskFormat, Phase};

/// Text-like bytes (words of a small vocabulary): deflate shrinks them about 3×.
fn text_fill(buf: &mut [u8], x: &mut u64) {
    const WORDS: [&str; 16] = [
        "disk", "cluster", "the", "virtual", "machine", "of", "stream", "table", "grain", "and",
        "export", "import", "manifest", "to", "a", "sector",
    ];
    let mut i = 0;
    while i < buf.len() {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        let w = WORDS[(*x % 16) as usize].as_bytes();
        let sep = if x.is_multiple_of(11) { b'\n' } else { b' ' };
        for &b in w.iter().chain(std::iter::once(&sep)) {
            if i < buf.len() {
                buf[i] = b;
                i += 1;
            }
        }
    }
}

/// 1 GiB-ish sparse raw file with `data_mib` of data in 4 MiB pieces spread evenly: random
/// bytes, or with `text` every other piece text-like (compressible).
fn random_sparse(path: &Path, virtual_mib: u64, data_mib: u64, text: bool) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(virtual_mib << 20).unwrap();
    let mut x: u64 = 0x9abc_def1_2345_6789;
    let mut buf = vec![0u8; 4 << 20];
    let pieces = data_mib / 4;
    let stride = (virtual_mib << 20) / pieces.max(1);
    for i in 0..pieces {
        if text && i % 2 == 1 {
            text_fill(&mut buf, &mut x);
        } else {
            for c in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
        f.seek(SeekFrom::Start(i * stride)).unwrap();
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

fn qemu(args: &[&str]) -> Duration {
    let t = Instant::now();
    let st = Command::new("qemu-img")
        .args(args)
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img {args:?}");
    t.elapsed()
}

fn ours(
    rt: &tokio::runtime::Runtime,
    src: &Path,
    dst: &Path,
    to: DiskFormat,
    digest: bool,
    compress: bool,
) -> Duration {
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
        let enc = EncodeOptions {
            compress,
            ..EncodeOptions::default()
        };
        let (_, sink) = pipeline::run(
            content,
            Box::new(sink),
            Job {
                format: to,
                encode: &enc,
                content_digest: digest,
                hash_object: false,
                phase: Phase::Export,
                label: "bench",
            },
            &PipelineOptions::default(),
        )
        .await
        .unwrap();
        sink.commit().await.unwrap();
        t.elapsed()
    })
}

/// The codecs alone: decode → encode → file sink, no digest (what `qemu-img convert` does).
fn codec_only(rt: &tokio::runtime::Runtime, src: &Path, dst: &Path, to: DiskFormat) -> Duration {
    use futures::StreamExt;
    use virtrigaud::ByteSink;
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
        let mut chunks = format::encode(content, to, &EncodeOptions::default()).unwrap();
        let mut sink: Box<dyn ByteSink> = Box::new(LocalFileSink::create(dst, true).await.unwrap());
        while let Some(c) = chunks.next().await {
            match c.unwrap() {
                format::Chunk::Data(b) => sink.write(b).await.unwrap(),
                format::Chunk::Zeros(n) => sink.write_zeros(n).await.unwrap(),
            }
        }
        sink.commit().await.unwrap();
        t.elapsed()
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        println!("SKIP: qemu-img not found");
        return;
    }
    let data_mib: u64 = std::env::var("VRG_BENCH_DATA_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let runs: usize = std::env::var("VRG_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    // Outputs on tmpfs when there is one (VRG_BENCH_OUT overrides): this VM's disk writeback
    // varies by 5x between runs and would drown the codecs' own cost.
    let out_dir = match std::env::var("VRG_BENCH_OUT") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) if Path::new("/dev/shm").is_dir() => tempfile::tempdir_in("/dev/shm").unwrap(),
        Err(_) => tempfile::tempdir().unwrap(),
    };
    println!("outputs in {}", out_dir.path().display());
    let raw = dir.path().join("in.raw");
    let qcow = dir.path().join("in.qcow2");
    random_sparse(&raw, 1024, data_mib, false);
    qemu(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        qcow.to_str().unwrap(),
    ]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("input: 1 GiB virtual, {data_mib} MiB random data; {runs} runs each, medians");

    let out_q = out_dir.path().join("q.raw");
    let out_o = out_dir.path().join("o.raw");
    let (mut q, mut o, mut c, mut p) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let _ = std::fs::remove_file(&out_q);
        q.push(qemu(&[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            qcow.to_str().unwrap(),
            out_q.to_str().unwrap(),
        ]));
        c.push(codec_only(&rt, &qcow, &out_o, DiskFormat::Raw));
        p.push(ours(&rt, &qcow, &out_o, DiskFormat::Raw, false, false));
        o.push(ours(&rt, &qcow, &out_o, DiskFormat::Raw, true, false));
    }
    let (q, o, c, p) = (median(q), median(o), median(c), median(p));
    let r = |d: Duration| d.as_secs_f64() / q.as_secs_f64();
    println!(
        "RESULT qcow2->raw: qemu-img {:.2} s; virtrigaud pipeline (zero detection, like qemu-img) {:.2} s, ratio {:.2} (target <= 1.0); \
         codecs alone {:.2} s, ratio {:.2}; pipeline with the content digest {:.2} s, ratio {:.2}",
        q.as_secs_f64(),
        p.as_secs_f64(),
        r(p),
        c.as_secs_f64(),
        r(c),
        o.as_secs_f64(),
        r(o)
    );

    if std::env::var("VRG_BENCH_ONLY").as_deref() == Ok("qcow2") {
        return;
    }
    let out_q = out_dir.path().join("q.vmdk");
    let out_o = out_dir.path().join("o.vmdk");
    let (mut q, mut o) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let _ = std::fs::remove_file(&out_q);
        q.push(qemu(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            raw.to_str().unwrap(),
            out_q.to_str().unwrap(),
        ]));
        o.push(ours(
            &rt,
            &raw,
            &out_o,
            DiskFormat::Vmdk(VmdkSubformat::StreamOptimized),
            true,
            false,
        ));
    }
    let (q, o) = (median(q), median(o));
    println!(
        "RESULT raw->vmdk(streamOptimized): qemu-img {:.2} s, virtrigaud {:.2} s, ratio {:.2} (target <= 0.6); sizes qemu {} MiB, ours {} MiB",
        q.as_secs_f64(),
        o.as_secs_f64(),
        o.as_secs_f64() / q.as_secs_f64(),
        std::fs::metadata(&out_q).unwrap().len() >> 20,
        std::fs::metadata(&out_o).unwrap().len() >> 20
    );

    // Compressible input: every other 4 MiB piece text-like.
    let mixed = dir.path().join("mixed.raw");
    random_sparse(&mixed, 1024, data_mib, true);
    let size = |p: &Path| std::fs::metadata(p).unwrap().len() >> 20;
    for (name, to, qemu_args) in [
        (
            "mixed raw->vmdk(streamOptimized)",
            DiskFormat::Vmdk(VmdkSubformat::StreamOptimized),
            &["-O", "vmdk", "-o", "subformat=streamOptimized"][..],
        ),
        (
            "mixed raw->qcow2 compressed",
            DiskFormat::Qcow2,
            &["-O", "qcow2", "-c"][..],
        ),
    ] {
        let out_q = out_dir.path().join("q.out");
        let out_o = out_dir.path().join("o.out");
        let (mut q, mut o) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let _ = std::fs::remove_file(&out_q);
            let mut args = vec!["convert", "-f", "raw"];
            args.extend_from_slice(qemu_args);
            args.push(mixed.to_str().unwrap());
            args.push(out_q.to_str().unwrap());
            q.push(qemu(&args));
            o.push(ours(&rt, &mixed, &out_o, to, true, true));
        }
        let (q, o) = (median(q), median(o));
        println!(
            "RESULT {name} ({data_mib} MiB data, half text): qemu-img {:.2} s, virtrigaud {:.2} s (content digest included), ratio {:.2}; sizes qemu {} MiB, ours {} MiB",
            q.as_secs_f64(),
            o.as_secs_f64(),
            o.as_secs_f64() / q.as_secs_f64(),
            size(&out_q),
            size(&out_o)
        );
    }
}
