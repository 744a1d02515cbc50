//! qcow2 codec against the `qemu-img` / `qemu-io` / `qemu-nbd` oracle.
//!
//! Skipped (with a message) when `qemu-img` is missing, unless `VIRTRIGAUD_IT=1`.

mod common;

use bytes::Bytes;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use virtrigaud_core::digest::ContentDigester;
use virtrigaud_core::format::{self, Chunk, DecodeOptions, EncodeOptions, qcow2, raw};
use virtrigaud_core::io::{ByteSink, ImageSource, LocalFile, LocalFileSink, ReadAt};
use virtrigaud_core::{DiskContent, Extent, ExtentStream};

fn have_qemu() -> bool {
    virtrigaud_testkit::have_tool("qemu-img", "qemu-utils")
}

use virtrigaud_testkit::run;

fn qemu_io(fmt: &str, file: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let f = file.to_str().unwrap();
    args.push(f);
    run("qemu-io", &args);
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Writes a decoded disk to a raw file and returns its content digest.
async fn write_raw(c: DiskContent, out: &Path) -> String {
    use std::os::unix::fs::FileExt;
    let size = c.virtual_size;
    let f = std::fs::File::create(out).unwrap();
    f.set_len(size).unwrap();
    let mut d = ContentDigester::new(size, 2);
    let mut s = c.validated().extents;
    while let Some(e) = s.next().await {
        let e = e.unwrap();
        if let Extent::Data { offset, bytes } = &e {
            f.write_all_at(bytes, *offset).unwrap();
        }
        d.update(&e).await.unwrap();
    }
    d.finish().await.unwrap()
}

/// Digest of the raw bytes qemu-img gives for `image`.
async fn qemu_raw_digest(image: &Path, fmt: &str, dir: &Path) -> String {
    let out = dir.join(format!("qemu-{}.raw", virtrigaud_core::io::unique_suffix()));
    run(
        "qemu-img",
        &["convert", "-f", fmt, "-O", "raw", p(image), p(&out)],
    );
    let src: Arc<dyn ReadAt> = Arc::new(LocalFile::open(&out).await.unwrap());
    let c = raw::decode_random(src, &DecodeOptions::default())
        .await
        .unwrap();
    let mut d = ContentDigester::new(c.virtual_size, 2);
    let mut s = c.extents;
    while let Some(e) = s.next().await {
        d.update(&e.unwrap()).await.unwrap();
    }
    std::fs::remove_file(&out).unwrap();
    d.finish().await.unwrap()
}

/// The file as a sequential stream of 1 MiB extents (holes from SEEK_DATA as Zero items).
async fn file_stream(path: &Path) -> (u64, ExtentStream) {
    let src: Arc<dyn ReadAt> = Arc::new(LocalFile::open(path).await.unwrap());
    let size = src.size();
    let c = raw::decode_random(
        src,
        &DecodeOptions {
            read_size: 1 << 20,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    (size, c.extents)
}

fn opts() -> DecodeOptions {
    DecodeOptions {
        read_size: 1 << 20,
        read_ahead: 2,
        extent_resolver: None,
    }
}

/// Decodes `image` randomly and (if `sequential`) as a stream; checks both against qemu.
async fn check_decoders(image: &Path, dir: &Path, sequential: bool) {
    let want = qemu_raw_digest(image, "qcow2", dir).await;
    let src: Arc<dyn ReadAt> = Arc::new(LocalFile::open(image).await.unwrap());
    let info = run("qemu-img", &["info", "--output=json", p(image)]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        qcow2::probe(src.as_ref()).await.unwrap(),
        info["virtual-size"].as_u64().unwrap()
    );
    let c = qcow2::decode_random(src, &opts()).await.unwrap();
    assert!(c.allocation.is_some());
    let out = dir.join("ours-random.raw");
    let got = write_raw(c, &out).await;
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", p(&out), p(image)],
    );
    assert_eq!(got, want, "random decode digest of {}", image.display());
    if sequential {
        let (size, stream) = file_stream(image).await;
        let c = qcow2::decode_sequential(Some(size), stream, &opts())
            .await
            .unwrap();
        let out = dir.join("ours-seq.raw");
        let got = write_raw(c, &out).await;
        run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "qcow2", p(&out), p(image)],
        );
        assert_eq!(got, want, "sequential decode digest of {}", image.display());
    }
}

const WRITES: &[&str] = &[
    "write -P 0xab 0 1M",
    "write -P 0x11 1536 5120",
    "write -P 0xcd 3M 2M",
    "write -P 0x5a 9437184 4096",
    "write -P 0x77 12582912 1M",
];

fn create_qcow2(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let f = dir.join(name);
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, p(&f), size],
    );
    f
}

#[tokio::test]
async fn decodes_qemu_images() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = "16M";
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        ("v2-64k", "compat=0.10,cluster_size=64k", vec![]),
        ("v3-4k", "compat=1.1,cluster_size=4k", vec![]),
        ("v3-2m", "compat=1.1,cluster_size=2M", vec![]),
        (
            "zero",
            "compat=1.1,cluster_size=64k",
            vec![
                "write -z 3M 256k",
                "write -z -u 3276800 64k",
                "write -z 14M 1M",
            ],
        ),
        (
            "discard",
            "compat=1.1,cluster_size=64k",
            vec!["discard 256k 256k", "discard 4M 64k"],
        ),
        (
            "extl2",
            "compat=1.1,cluster_size=64k,extended_l2=on",
            vec![
                "write -P 0x42 8389120 2048",
                "write -z 8454144 4096",
                "write -P 0x43 8458240 2048",
                "write -z 3149824 4096",
                "discard 3276800 8192",
            ],
        ),
    ];
    for (name, o, extra) in cases {
        let img = create_qcow2(d, &format!("{name}.qcow2"), o, size);
        let mut cmds: Vec<&str> = WRITES.to_vec();
        cmds.extend(extra);
        qemu_io("qcow2", &img, &cmds);
        eprintln!("case {name}");
        check_decoders(&img, d, true).await;
    }

    // Preallocated: data clusters that are holes in the file.
    let img = create_qcow2(d, "prealloc.qcow2", "compat=1.1,preallocation=falloc", "8M");
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x21 1M 64k", "write -P 0x22 5M 3M"],
    );
    check_decoders(&img, d, true).await;

    // A size that is not a multiple of the cluster size, data in the partial last cluster.
    let img = create_qcow2(d, "odd.qcow2", "compat=1.1,cluster_size=64k", "5000192");
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x33 0 4096", "write -P 0xab 4999000 1192"],
    );
    check_decoders(&img, d, true).await;

    // Internal snapshot, then overwrites: the active L1 maps new clusters at the end of the
    // file (file order is no longer guest order; small enough for the sequential buffer).
    let img = create_qcow2(d, "snap.qcow2", "compat=1.1,cluster_size=64k", "16M");
    qemu_io("qcow2", &img, WRITES);
    run("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0xee 0 128k",
            "write -P 0xef 3M 64k",
            "discard 12M 64k",
        ],
    );
    check_decoders(&img, d, true).await;
}

#[tokio::test]
async fn sequential_refuses_layouts_needing_random_access() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // After a snapshot, rewriting guest cluster 0 moves it and its (copied) L2 table behind
    // 70 MiB of guest data that only that L2 table maps.
    let img = create_qcow2(d, "far.qcow2", "compat=1.1,cluster_size=64k", "80M");
    qemu_io("qcow2", &img, &["write -P 0xab 0 70M"]);
    run("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
    qemu_io("qcow2", &img, &["write -P 0xee 0 64k"]);
    let (size, stream) = file_stream(&img).await;
    let c = qcow2::decode_sequential(Some(size), stream, &opts())
        .await
        .unwrap();
    let mut s = c.validated().extents;
    let mut err = None;
    let mut emitted = 0u64;
    while let Some(e) = s.next().await {
        match e {
            Ok(e) => emitted += e.len(),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    assert!(emitted < 70 << 20);
    let e = err.expect("an error");
    assert_eq!(e.kind(), virtrigaud_core::ErrorKind::Unsupported, "{e}");
    assert!(e.message().contains("needs random access"), "{e}");
    // Random access copes.
    check_decoders(&img, d, false).await;
}

#[tokio::test]
async fn decodes_compressed_images() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&src), "12M"]);
    qemu_io(
        "raw",
        &src,
        &[
            "write -P 0xab 0 1M",
            "write -P 0x11 1536 5120",
            "write -P 0xcd 3M 2M",
            "write -P 0x5a 9437184 4096",
        ],
    );
    // Some incompressible data too.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&noise(0x1234, 1 << 20), 6 << 20).unwrap();
    }
    for (name, o) in [
        ("zlib-64k", "compat=1.1,cluster_size=64k"),
        ("zlib-4k", "compat=1.1,cluster_size=4k"),
        ("zlib-v2", "compat=0.10"),
        ("zlib-extl2", "compat=1.1,extended_l2=on"),
        ("zstd", "compat=1.1,compression_type=zstd"),
        (
            "zstd-2m",
            "compat=1.1,compression_type=zstd,cluster_size=2M",
        ),
    ] {
        let img = d.join(format!("{name}.qcow2"));
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                o,
                p(&src),
                p(&img),
            ],
        );
        eprintln!("case {name}");
        check_decoders(&img, d, true).await;
    }
}

async fn encode_to(c: DiskContent, cluster_size: u32, out: &Path) {
    let o = EncodeOptions {
        cluster_size,
        ..Default::default()
    };
    encode_with(c, &o, out).await;
}

async fn encode_with(c: DiskContent, o: &EncodeOptions, out: &Path) {
    let mut s = qcow2::encode(c, o).unwrap();
    let mut sink = Box::new(LocalFileSink::create(out, true).await.unwrap());
    while let Some(c) = s.next().await {
        match c.unwrap() {
            Chunk::Data(b) => sink.write(b).await.unwrap(),
            Chunk::Zeros(n) => sink.write_zeros(n).await.unwrap(),
        }
    }
    sink.commit().await.unwrap();
}

#[tokio::test]
async fn encodes_images_qemu_accepts() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    let vsize: u64 = (20 << 20) + 3 * 512; // not a multiple of any cluster size
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", p(&src), &vsize.to_string()],
    );
    qemu_io(
        "raw",
        &src,
        &[
            "write -P 0xab 0 1M",
            "write -P 0x11 5000 70001",
            "write -P 0xcd 7M 3M",
            "write -P 0x00 12M 1M",
            "write -P 0x5a 20970000 1000",
        ],
    );
    let want = qemu_raw_digest(&src, "raw", d).await;
    for (cs, with_map) in [
        (65536u32, true),
        (4096, true),
        (2 << 20, true),
        (65536, false),
    ] {
        eprintln!("encode cs={cs} map={with_map}");
        let out = d.join(format!("out-{cs}-{with_map}.qcow2"));
        let out2 = d.join(format!("out2-{cs}-{with_map}.qcow2"));
        for o in [&out, &out2] {
            let s: Arc<dyn ReadAt> = Arc::new(LocalFile::open(&src).await.unwrap());
            let mut c = raw::decode_random(s, &opts()).await.unwrap();
            if !with_map {
                c.allocation = None;
            }
            encode_to(c, cs, o).await;
        }
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&out2).unwrap(),
            "deterministic"
        );
        let chk = Command::new("qemu-img")
            .args(["check", "--output=json", p(&out)])
            .output()
            .unwrap();
        let j: serde_json::Value = serde_json::from_slice(&chk.stdout).unwrap_or_default();
        assert!(
            chk.status.success(),
            "qemu-img check: {j} {}",
            String::from_utf8_lossy(&chk.stderr)
        );
        for k in ["leaks", "corruptions", "check-errors"] {
            assert!(j.get(k).is_none_or(|v| v == 0), "qemu-img check {k}: {j}");
        }
        run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "qcow2", p(&src), p(&out)],
        );
        let info = run("qemu-img", &["info", "--output=json", p(&out)]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"].as_u64(), Some(vsize));
        // Round trip through our decoders.
        check_decoders(&out, d, true).await;
        assert_eq!(qemu_raw_digest(&out, "qcow2", d).await, want);
    }
}

use virtrigaud_core::testdata::{noise, text};

/// A raw disk of `vsize` bytes with constant, text, random, zero (written) and
/// long-distance-repeat regions, and data in its last, partial cluster.
fn mixed_raw(path: &Path, vsize: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(vsize).unwrap();
    let m = 1u64 << 20;
    // Text repeating every 5000 bytes: a deflate window above 4 KiB would use those long
    // matches (qemu deflates with a 4 KiB window).
    let block = text(9, 5000);
    let far: Vec<u8> = block.iter().copied().cycle().take(1 << 20).collect();
    let pieces: Vec<(u64, Vec<u8>)> = vec![
        (0, vec![0xab; 1 << 20]),
        (m + 5000, text(1, 70_001)),
        (3 * m, noise(2, 2 << 20)),
        (6 * m, far),
        (8 * m, vec![0u8; 1 << 20]),
        (12 * m, text(3, 2 << 20)),
        (vsize - 1000, text(4, 1000)),
    ];
    for (off, data) in pieces {
        f.write_all_at(&data, off).unwrap();
    }
}

fn qemu_check(image: &Path) -> serde_json::Value {
    let chk = Command::new("qemu-img")
        .args(["check", "--output=json", p(image)])
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&chk.stdout).unwrap_or_default();
    assert!(
        chk.status.success(),
        "qemu-img check {}: {j} {}",
        image.display(),
        String::from_utf8_lossy(&chk.stderr)
    );
    for k in ["leaks", "corruptions", "check-errors"] {
        assert!(j.get(k).is_none_or(|v| v == 0), "qemu-img check {k}: {j}");
    }
    j
}

/// The image decoded from a random-access file: replayable, as compression needs.
async fn open_image(path: &Path) -> DiskContent {
    let src = ImageSource::RandomAccess(Arc::new(LocalFile::open(path).await.unwrap()));
    let (_, c) = format::decode(src, None, &opts()).await.unwrap();
    assert!(c.replay.is_some());
    c
}

#[tokio::test]
async fn encodes_compressed_images_qemu_accepts() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    // Not a multiple of any cluster size (qemu truncates a qcow2 size to whole sectors, so
    // sizes that are not multiples of 512 are left to the unit tests).
    let vsize: u64 = (20 << 20) + 3 * 512;
    mixed_raw(&src, vsize);
    let want = qemu_raw_digest(&src, "raw", d).await;
    for cs in [4096u32, 65536, 2 << 20] {
        eprintln!("compressed cs={cs}");
        let o = EncodeOptions {
            compress: true,
            cluster_size: cs,
            ..Default::default()
        };
        let out = d.join(format!("c-{cs}.qcow2"));
        let out2 = d.join(format!("c2-{cs}.qcow2"));
        encode_with(open_image(&src).await, &o, &out).await;
        let o1 = EncodeOptions {
            parallelism: 1,
            ..o.clone()
        };
        encode_with(open_image(&src).await, &o1, &out2).await;
        let bytes = std::fs::read(&out).unwrap();
        assert!(bytes == std::fs::read(&out2).unwrap(), "deterministic");
        let j = qemu_check(&out);
        let compressed = j["compressed-clusters"].as_u64().unwrap_or(0);
        assert!(compressed > 0, "no compressed cluster: {j}");
        let allocated = j["allocated-clusters"].as_u64().unwrap_or(0);
        if cs < 2 << 20 {
            // Random data and far repeats stay uncompressed; zero clusters are not stored.
            assert!(compressed < allocated, "{j}");
            assert!(allocated * u64::from(cs) < 12 << 20, "{j}");
        }
        run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "qcow2", p(&src), p(&out)],
        );
        let info = run("qemu-img", &["info", "--output=json", p(&out)]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"].as_u64(), Some(vsize));
        // Much smaller than uncompressed qcow2 (data: 1 MiB constant, 2 MiB + 70 KiB text,
        // 3 MiB incompressible, zeros).
        let plain = d.join(format!("p-{cs}.qcow2"));
        encode_to(open_image(&src).await, cs, &plain).await;
        let plain_len = std::fs::metadata(&plain).unwrap().len();
        let qemu_c = d.join(format!("q-{cs}.qcow2"));
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &format!("cluster_size={cs}"),
                p(&src),
                p(&qemu_c),
            ],
        );
        let qemu_len = std::fs::metadata(&qemu_c).unwrap().len();
        eprintln!(
            "cs={cs}: ours {} bytes, uncompressed {plain_len}, qemu-img -c {qemu_len}",
            bytes.len()
        );
        assert!(
            (bytes.len() as u64) * 10 < plain_len * 8,
            "{} vs {plain_len}",
            bytes.len()
        );
        assert!(
            (bytes.len() as u64) * 10 < qemu_len * 11,
            "{} vs qemu-img {qemu_len}",
            bytes.len()
        );
        // Our decoders (random and sequential) and qemu agree on the content.
        check_decoders(&out, d, true).await;
        assert_eq!(qemu_raw_digest(&out, "qcow2", d).await, want);
    }

    // An empty disk, compressed or not.
    let empty = d.join("empty.raw");
    std::fs::File::create(&empty).unwrap();
    for compress in [false, true] {
        let out = d.join(format!("empty-{compress}.qcow2"));
        let o = EncodeOptions {
            compress,
            ..Default::default()
        };
        encode_with(open_image(&empty).await, &o, &out).await;
        qemu_check(&out);
        run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "qcow2", p(&empty), p(&out)],
        );
    }

    // A sequential source cannot be read twice: refused up front.
    let (size, stream) = file_stream(&src).await;
    let src_seq = ImageSource::Sequential {
        size: Some(size),
        stream,
    };
    let (_, c) = format::decode(src_seq, None, &opts()).await.unwrap();
    assert!(c.replay.is_none());
    let e = qcow2::encode(
        c,
        &EncodeOptions {
            compress: true,
            ..Default::default()
        },
    )
    .err()
    .expect("an error");
    assert_eq!(e.kind(), virtrigaud_core::ErrorKind::Unsupported, "{e}");
}

/// Compressed encode against `qemu-img convert -c -O qcow2` on the same raw input (run with
/// `--ignored --nocapture`; timings and sizes are printed, not asserted). `VIRTRIGAUD_BENCH_MIB`
/// sets the input size (default 512); `VIRTRIGAUD_BENCH_TEXT_ONLY=1` fills it with text only
/// (every cluster compresses: no incompressible shortcut).
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn bench_compressed_encode_vs_qemu_img() {
    if !have_qemu() {
        return;
    }
    let mib: u64 = std::env::var("VIRTRIGAUD_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let text_only = std::env::var("VIRTRIGAUD_BENCH_TEXT_ONLY").as_deref() == Ok("1");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("bench.raw");
    {
        // Per 8 MiB: 4 MiB text, 2 MiB random, 2 MiB hole (or 8 MiB text).
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(mib << 20).unwrap();
        let t = text(1, 4 << 20);
        for k in 0..mib / 8 {
            let at = k * (8 << 20);
            f.write_all_at(&t, at).unwrap();
            if text_only {
                f.write_all_at(&text(k + 2, 4 << 20), at + (4 << 20))
                    .unwrap();
            } else {
                f.write_all_at(&noise(k + 1, 2 << 20), at + (4 << 20))
                    .unwrap();
            }
        }
    }
    let qemu_out = d.join("q.qcow2");
    let t = std::time::Instant::now();
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            p(&src),
            p(&qemu_out),
        ],
    );
    let qemu = t.elapsed();
    let ours_out = d.join("o.qcow2");
    let t = std::time::Instant::now();
    encode_with(
        open_image(&src).await,
        &EncodeOptions {
            compress: true,
            ..Default::default()
        },
        &ours_out,
    )
    .await;
    let ours = t.elapsed();
    let plain_out = d.join("p.qcow2");
    encode_to(open_image(&src).await, 65536, &plain_out).await;
    let len = |f: &Path| std::fs::metadata(f).unwrap().len();
    println!(
        "{mib} MiB raw ({}), {} cores: qemu-img convert -c: {qemu:?}, {} bytes; ours (2 passes): {ours:?}, {} bytes; uncompressed qcow2 {} bytes",
        if text_only {
            "text"
        } else {
            "half text, quarter random, quarter hole"
        },
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        len(&qemu_out),
        len(&ours_out),
        len(&plain_out)
    );
    qemu_check(&ours_out);
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", p(&src), p(&ours_out)],
    );
}

#[tokio::test]
async fn qemu_nbd_serves_our_output() {
    if !have_qemu() {
        return;
    }
    if !virtrigaud_testkit::have_tool("qemu-nbd", "qemu-utils") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut flat = vec![0u8; 3 << 20];
    flat[100_000..300_000].fill(0x3c);
    flat[(2 << 20) + 7..(2 << 20) + 9000].fill(0xe1);
    let extents = vec![
        Extent::Data {
            offset: 100_000,
            bytes: Bytes::copy_from_slice(&flat[100_000..300_000]),
        },
        Extent::Data {
            offset: (2 << 20) + 7,
            bytes: Bytes::copy_from_slice(&flat[(2 << 20) + 7..(2 << 20) + 9000]),
        },
    ];
    let raw_path = d.join("flat.raw");
    std::fs::write(&raw_path, &flat).unwrap();
    // uncompressed and compressed output
    for compress in [false, true] {
        let mut c = DiskContent::from_extents(flat.len() as u64, extents.clone());
        c.allocation = Some(virtrigaud_core::AllocationMap::from_ranges(vec![
            100_000..300_000,
            (2 << 20) + 7..(2 << 20) + 9000,
        ]));
        let img = d.join(format!("nbd-{compress}.qcow2"));
        let o = EncodeOptions {
            cluster_size: 65536,
            compress,
            ..Default::default()
        };
        encode_with(c, &o, &img).await;
        let sock = d.join(format!("nbd-{compress}.sock"));
        let mut child = common::serve_nbd(&img, "qcow2", &sock);
        let url = format!("nbd+unix:///?socket={}", p(&sock));
        let res = Command::new("qemu-img")
            .args(["compare", "-f", "raw", p(&raw_path), &url])
            .output()
            .unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            res.status.success(),
            "compare over NBD (compress {compress}): {}{}",
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        );
    }
}

/// Rough throughput comparison with `qemu-img convert -O raw` (run with `--ignored
/// --nocapture`; timings, not assertions, except a generous factor).
#[tokio::test]
#[ignore]
async fn bench_decode_vs_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = create_qcow2(d, "bench.qcow2", "compat=1.1", "1G");
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0xab 0 100M",
            "write -P 0xcd 300M 100M",
            "write -P 0x11 700M 100M",
        ],
    );
    let t = std::time::Instant::now();
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            p(&img),
            p(&d.join("q.raw")),
        ],
    );
    let qemu = t.elapsed();
    let t = std::time::Instant::now();
    let src: Arc<dyn ReadAt> = Arc::new(LocalFile::open(&img).await.unwrap());
    let c = qcow2::decode_random(src, &DecodeOptions::default())
        .await
        .unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = Arc::new(std::fs::File::create(d.join("o.raw")).unwrap());
        f.set_len(c.virtual_size).unwrap();
        let mut s = c.extents;
        while let Some(e) = s.next().await {
            if let Extent::Data { offset, bytes } = e.unwrap() {
                let f = f.clone();
                tokio::task::spawn_blocking(move || f.write_all_at(&bytes, offset))
                    .await
                    .unwrap()
                    .unwrap();
            }
        }
    }
    let ours = t.elapsed();
    let t = std::time::Instant::now();
    let src: Arc<dyn ReadAt> = Arc::new(LocalFile::open(&img).await.unwrap());
    let c = qcow2::decode_random(src, &DecodeOptions::default())
        .await
        .unwrap();
    let mut s = c.extents;
    while let Some(e) = s.next().await {
        e.unwrap();
    }
    println!("decode_random, no sink: {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let (size, stream) = file_stream(&img).await;
    let c = qcow2::decode_sequential(Some(size), stream, &DecodeOptions::default())
        .await
        .unwrap();
    let n = {
        let mut s = c.extents;
        let mut n = 0u64;
        while let Some(e) = s.next().await {
            n += e.unwrap().len();
        }
        n
    };
    let seq = t.elapsed();
    println!(
        "qemu-img convert: {qemu:?}, decode_random to file: {ours:?}, decode_sequential (no sink, {n} bytes): {seq:?}"
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            p(&d.join("q.raw")),
            p(&d.join("o.raw")),
        ],
    );
}

/// Writes an encoded stream to `out`.
async fn write_chunks(mut s: format::ChunkStream, out: &Path) {
    let mut sink = Box::new(LocalFileSink::create(out, true).await.unwrap());
    while let Some(c) = s.next().await {
        match c.unwrap() {
            Chunk::Data(b) => sink.write(b).await.unwrap(),
            Chunk::Zeros(n) => sink.write_zeros(n).await.unwrap(),
        }
    }
    sink.commit().await.unwrap();
}

/// QEMU reads a qcow2 or VMDK size in whole 512-byte sectors and rounds down: a disk of
/// 100,000,001 bytes written with its exact size opens as 99,999,744 bytes, its last 257 bytes
/// gone. Every encoder rounds such a size up with zeros, like `qemu-img convert`: QEMU itself
/// must see the full disk (virtual size, and the bytes, compared with a raw file of the rounded
/// size).
#[tokio::test]
async fn sizes_not_a_multiple_of_512_open_in_qemu_rounded_up_with_every_byte() {
    use virtrigaud_core::format::{DiskFormat, VmdkSubformat};
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vsize: u64 = 100_000_001;
    let rounded: u64 = 100_000_256;
    let src = d.join("src.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(vsize).unwrap();
        f.write_all_at(&virtrigaud_core::testdata::noise(1, 70_000), 4096)
            .unwrap();
        f.write_all_at(&[0xab; 257], vsize - 257).unwrap();
    }
    // The oracle's reference: the same bytes in a raw file of the rounded size.
    let padded = d.join("padded.raw");
    std::fs::copy(&src, &padded).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&padded)
        .unwrap()
        .set_len(rounded)
        .unwrap();
    let compressed = EncodeOptions {
        compress: true,
        ..Default::default()
    };
    let cases = [
        ("plain.qcow2", DiskFormat::Qcow2, EncodeOptions::default()),
        ("compressed.qcow2", DiskFormat::Qcow2, compressed),
        (
            "stream.vmdk",
            DiskFormat::Vmdk(VmdkSubformat::StreamOptimized),
            EncodeOptions::default(),
        ),
        (
            "sparse.vmdk",
            DiskFormat::Vmdk(VmdkSubformat::MonolithicSparse),
            EncodeOptions::default(),
        ),
    ];
    for (name, fmt, o) in cases {
        let out = d.join(name);
        let content = open_image(&src).await;
        assert_eq!(content.virtual_size, vsize);
        write_chunks(format::encode(content, fmt, &o).unwrap(), &out).await;
        let qfmt = fmt.name();
        let info = run("qemu-img", &["info", "--output=json", "-f", qfmt, p(&out)]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(
            info["virtual-size"].as_u64(),
            Some(rounded),
            "{name}: {info}"
        );
        // Equal to the rounded raw file: the last 257 bytes are there, the padding is zero.
        run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", qfmt, p(&padded), p(&out)],
        );
        // Our own decoder agrees.
        let c = open_image(&out).await;
        assert_eq!(c.virtual_size, rounded, "{name}");
    }
}
