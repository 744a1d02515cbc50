//! VMDK codec against qemu-img / qemu-io / qemu-nbd as oracles.
//!
//! Skipped (with "SKIP: qemu-img not found") when qemu-img is missing, unless `VIRTRIGAUD_IT=1`.

mod common;

use bytes::Bytes;
use futures::StreamExt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use virtrigaud_core::digest::ContentDigester;
use virtrigaud_core::format::{Chunk, ChunkStream, DecodeOptions, EncodeOptions, raw, vmdk};
use virtrigaud_core::io::LocalFile;
use virtrigaud_core::{DiskContent, Extent, ReadAt};

fn have_qemu() -> bool {
    virtrigaud_testkit::have_tool("qemu-img", "qemu-utils")
}

fn run(cmd: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&virtrigaud_testkit::run(cmd, args).stdout).into_owned()
}

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

/// `qemu-img convert -f raw -O vmdk -o subformat=SUB SRC OUT`.
fn qemu_vmdk(src: &Path, out: &Path, sub: &str) {
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            p(src),
            p(out),
        ],
    );
}

/// Pseudo-random bytes (xorshift), so compression has real work.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// 24 MiB + 3 sectors, sparse: data at odd offsets, text-like and random runs, holes.
const SIZE: u64 = (24 << 20) + 3 * 512;

fn make_source(dir: &Path) -> PathBuf {
    let path = dir.join("src.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(SIZE).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&noise(1, 70_001), 1000).unwrap();
    f.write_all_at(&vec![0x5a; 3 << 20], 5 << 20).unwrap();
    f.write_all_at(&noise(2, 4 << 20), (9 << 20) + 4096)
        .unwrap();
    let text: Vec<u8> = b"virtrigaud vmdk oracle test "
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    f.write_all_at(&text, 17 << 20).unwrap();
    f.write_all_at(&noise(3, 5000), SIZE - 5000).unwrap();
    drop(f);
    path
}

async fn open(path: &Path) -> Arc<dyn ReadAt> {
    Arc::new(LocalFile::open(path).await.unwrap())
}

async fn source_content(path: &Path) -> DiskContent {
    raw::decode_random(open(path).await, &DecodeOptions::default())
        .await
        .unwrap()
}

async fn digest(c: DiskContent) -> String {
    let mut d = ContentDigester::new(c.virtual_size, 2);
    let mut s = c.validated().extents;
    while let Some(e) = s.next().await {
        d.update(&e.unwrap()).await.unwrap();
    }
    d.finish().await.unwrap()
}

async fn write_chunks(mut s: ChunkStream, path: &Path) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let zeros = vec![0u8; 1 << 20];
    while let Some(c) = s.next().await {
        match c.unwrap() {
            Chunk::Data(b) => f.write_all(&b).unwrap(),
            Chunk::Zeros(mut n) => {
                while n > 0 {
                    let k = n.min(zeros.len() as u64) as usize;
                    f.write_all(&zeros[..k]).unwrap();
                    n -= k as u64;
                }
            }
        }
    }
    f.flush().unwrap();
}

fn file_stream(path: &Path, piece: usize) -> virtrigaud_core::ExtentStream {
    let data = std::fs::read(path).unwrap();
    let mut v = Vec::new();
    let mut o = 0;
    while o < data.len() {
        let n = piece.min(data.len() - o);
        v.push(Ok(Extent::Data {
            offset: o as u64,
            bytes: Bytes::copy_from_slice(&data[o..o + n]),
        }));
        o += n;
    }
    futures::stream::iter(v).boxed()
}

fn info_create_type(path: &Path) -> String {
    let out = run("qemu-img", &["info", "--output=json", p(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["create-type"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decodes_what_qemu_img_writes() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    let want = std::fs::read(&src).unwrap();
    let want_digest = digest(source_content(&src).await).await;
    let opts = DecodeOptions {
        read_size: 1 << 20,
        ..Default::default()
    };
    for sub in ["monolithicSparse", "streamOptimized"] {
        let out = dir.path().join(format!("{sub}.vmdk"));
        qemu_vmdk(&src, &out, sub);
        let r = open(&out).await;
        assert_eq!(vmdk::probe(r.as_ref()).await.unwrap(), SIZE, "{sub}");
        let c = vmdk::decode_random(r.clone(), &opts).await.unwrap();
        let alloc = c.allocation.clone().unwrap();
        assert!(alloc.allocated_bytes() < SIZE / 2, "{sub}: {alloc:?}");
        assert!(
            c.read_all().await.unwrap() == want,
            "{sub}: random decode differs"
        );
        let c = vmdk::decode_random(r, &opts).await.unwrap();
        assert_eq!(digest(c).await, want_digest, "{sub}");
        {
            // Both arrive readable as one stream (monolithicSparse: tables first, grains in order).
            let c = vmdk::decode_sequential(None, file_stream(&out, 100_000), &opts)
                .await
                .unwrap();
            assert!(
                c.read_all().await.unwrap() == want,
                "sequential decode differs"
            );
            let c = vmdk::decode_sequential(None, file_stream(&out, 1 << 20), &opts)
                .await
                .unwrap();
            assert_eq!(digest(c).await, want_digest);
        }
    }
    // monolithicFlat: a descriptor plus a -flat extent next to it.
    let out = dir.path().join("flat.vmdk");
    qemu_vmdk(&src, &out, "monolithicFlat");
    let r = open(&out).await;
    assert_eq!(vmdk::probe(r.as_ref()).await.unwrap(), SIZE);
    let res = Arc::new(vmdk::LocalExtentResolver::new(dir.path()));
    let c = vmdk::decode_flat(r.clone(), res.clone(), &opts)
        .await
        .unwrap();
    assert!(c.read_all().await.unwrap() == want, "flat decode differs");
    let c = vmdk::decode_flat(r, res, &opts).await.unwrap();
    assert_eq!(digest(c).await, want_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_reads_what_we_write() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    let want = std::fs::read(&src).unwrap();
    let eopts = EncodeOptions::default();
    let dopts = DecodeOptions::default();

    for (sub, create) in [
        ("stream", "streamOptimized"),
        ("sparse", "monolithicSparse"),
    ] {
        let out = dir.path().join(format!("ours-{sub}.vmdk"));
        let again = dir.path().join(format!("ours-{sub}-2.vmdk"));
        for target in [&out, &again] {
            let c = source_content(&src).await;
            let s = if sub == "stream" {
                vmdk::encode_stream_optimized(c, &eopts).unwrap()
            } else {
                vmdk::encode_monolithic_sparse(c, &eopts).unwrap()
            };
            write_chunks(s, target).await;
        }
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&again).unwrap(),
            "{sub}: not deterministic"
        );
        run("qemu-img", &["check", "-f", "vmdk", p(&out)]);
        run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "vmdk", p(&src), p(&out)],
        );
        assert_eq!(info_create_type(&out), create);
        // Our own decoders.
        let c = vmdk::decode_random(open(&out).await, &dopts).await.unwrap();
        assert!(
            c.read_all().await.unwrap() == want,
            "{sub}: our random decode differs"
        );
        {
            let c = vmdk::decode_sequential(None, file_stream(&out, 77_777), &dopts)
                .await
                .unwrap();
            assert!(
                c.read_all().await.unwrap() == want,
                "our sequential decode differs"
            );
        }
        // qemu-nbd serves our file; compare through NBD.
        let sock = dir.path().join(format!("{sub}.sock"));
        let mut child = common::serve_nbd(&out, "vmdk", &sock);
        let url = format!("nbd+unix:///?socket={}", p(&sock));
        let o = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", p(&src), &url])
            .output()
            .unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            o.status.success(),
            "nbd compare: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// User + system CPU seconds of this process (`who` = RUSAGE_SELF) or its waited-for children.
fn cpu_secs(who: i32) -> f64 {
    // SAFETY: getrusage fills a zeroed, owned struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `u` outlives the call.
    unsafe { libc::getrusage(who, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Not a test: prints our streamOptimized encode time against qemu-img convert.
/// `cargo test --release -p virtrigaud-core --test vmdk_qemu -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_stream_optimized_vs_qemu_img() {
    if !have_qemu() {
        return;
    }
    // Random bytes (incompressible), then 4-bit symbols (compressible about 2:1, real deflate work).
    measure("random", |b| b).await;
    measure("4-bit symbols", |b| b'a' + (b & 0x0f)).await;
}

async fn measure(kind: &str, map: fn(u8) -> u8) {
    println!("== 1 GiB virtual, 300 MiB of {kind}");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(1 << 30).unwrap();
        // 300 MiB of data in 30 runs of 10 MiB spread over the disk.
        for i in 0..30u64 {
            let d: Vec<u8> = noise(i + 7, 10 << 20).into_iter().map(map).collect();
            f.write_all_at(&d, i * (34 << 20)).unwrap();
        }
        f.sync_all().unwrap();
    }
    let qout = dir.path().join("qemu.vmdk");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load before: {}", load.trim());
    let c0 = cpu_secs(libc::RUSAGE_CHILDREN);
    let t = std::time::Instant::now();
    qemu_vmdk(&src, &qout, "streamOptimized");
    let tq = t.elapsed();
    let cq = cpu_secs(libc::RUSAGE_CHILDREN) - c0;
    let ours = dir.path().join("ours.vmdk");
    let c0 = cpu_secs(libc::RUSAGE_SELF);
    let t = std::time::Instant::now();
    let c = source_content(&src).await;
    let s = vmdk::encode_stream_optimized(c, &EncodeOptions::default()).unwrap();
    write_chunks(s, &ours).await;
    let to = t.elapsed();
    let co = cpu_secs(libc::RUSAGE_SELF) - c0;
    println!("cpu: qemu-img {cq:.2}s, ours {co:.2}s");
    println!(
        "streamOptimized: qemu-img {:.2}s ({} bytes), ours {:.2}s ({} bytes), ratio {:.2}",
        tq.as_secs_f64(),
        std::fs::metadata(&qout).unwrap().len(),
        to.as_secs_f64(),
        std::fs::metadata(&ours).unwrap().len(),
        to.as_secs_f64() / tq.as_secs_f64()
    );
    let t = std::time::Instant::now();
    let c = vmdk::decode_random(open(&ours).await, &DecodeOptions::default())
        .await
        .unwrap();
    let d = digest(c).await;
    println!(
        "our random decode + digest: {:.2}s",
        t.elapsed().as_secs_f64()
    );
    let t = std::time::Instant::now();
    let c = vmdk::decode_sequential(None, file_stream(&ours, 4 << 20), &DecodeOptions::default())
        .await
        .unwrap();
    assert_eq!(digest(c).await, d);
    println!(
        "our sequential decode + digest (file in memory): {:.2}s",
        t.elapsed().as_secs_f64()
    );
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "vmdk", p(&src), p(&ours)],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decodes_zeroed_grains_written_by_qemu_io() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("z.vmdk");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on",
            p(&img),
            "4M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "vmdk",
            "-c",
            "write -P 0x33 0 1M",
            "-c",
            "write -z 256k 256k",
            "-c",
            "write -P 0x44 3M 100k",
            p(&img),
        ],
    );
    let mut want = vec![0u8; 4 << 20];
    want[..1 << 20].fill(0x33);
    want[256 << 10..512 << 10].fill(0);
    want[3 << 20..(3 << 20) + (100 << 10)].fill(0x44);
    let c = vmdk::decode_random(open(&img).await, &DecodeOptions::default())
        .await
        .unwrap();
    let alloc = c.allocation.clone().unwrap();
    assert!(
        !alloc.intersects((256 << 10)..(512 << 10)),
        "zeroed grains are not allocated: {alloc:?}"
    );
    assert!(c.read_all().await.unwrap() == want);
}

/// Not a test: our streamOptimized encoder alone, from memory, with 1 and 2 workers.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_stream_optimized_parallelism() {
    let data: Vec<u8> = noise(5, 96 << 20)
        .into_iter()
        .map(|b| b'a' + (b & 0x0f))
        .collect();
    let data = Bytes::from(data);
    for workers in [1usize, 2] {
        let ext: Vec<Extent> = (0..24)
            .map(|i| Extent::Data {
                offset: i * (4 << 20),
                bytes: data.slice((i as usize) * (4 << 20)..(i as usize + 1) * (4 << 20)),
            })
            .collect();
        let c = DiskContent::from_extents(96 << 20, ext);
        let opts = EncodeOptions {
            parallelism: workers,
            ..Default::default()
        };
        let c0 = cpu_secs(libc::RUSAGE_SELF);
        let t = std::time::Instant::now();
        let mut s = vmdk::encode_stream_optimized(c, &opts).unwrap();
        let mut n = 0u64;
        while let Some(c) = s.next().await {
            n += c.unwrap().len();
        }
        println!(
            "workers {workers}: {:.2}s wall, {:.2}s cpu, {n} bytes out",
            t.elapsed().as_secs_f64(),
            cpu_secs(libc::RUSAGE_SELF) - c0
        );
    }
}

/// The split VMDKs VMware Workstation writes by default (twoGbMaxExtentSparse) and its flat
/// twin (twoGbMaxExtentFlat), made by qemu-img from a 4.5 GiB sparse raw disk (3 extents),
/// with data in each extent and a run across the first extent boundary: decoded through the
/// descriptor with their extents, they give the raw disk's content digest, and the allocation
/// map of the sparse one leaves the holes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_extents_decode_to_the_same_disk() {
    if !have_qemu() {
        return;
    }
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(4500 * MIB).unwrap();
    f.write_all_at(&noise(11, MIB as usize), MIB).unwrap();
    // Across the boundary between the first two 2 GiB extents (qemu-img splits at 2 GiB).
    f.write_all_at(&noise(12, 3 * MIB as usize), 2047 * MIB)
        .unwrap();
    f.write_all_at(&noise(13, 777_777), 4400 * MIB + 4096)
        .unwrap();
    drop(f);
    let want = digest(source_content(&src).await).await;
    let opts = DecodeOptions::default();
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let sub_dir = dir.path().join(sub);
        std::fs::create_dir(&sub_dir).unwrap();
        let out = sub_dir.join("disk.vmdk");
        qemu_vmdk(&src, &out, sub);
        let extents = std::fs::read_dir(&sub_dir).unwrap().count() - 1;
        assert!(extents >= 3, "{sub}: {extents} extent files");
        let r = open(&out).await;
        assert_eq!(vmdk::probe(r.as_ref()).await.unwrap(), 4500 * MIB, "{sub}");
        // The generic entry point detects the descriptor and needs the resolver.
        let e = virtrigaud_core::format::decode(
            virtrigaud_core::ImageSource::RandomAccess(r.clone()),
            None,
            &opts,
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), virtrigaud_core::ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains("twoGbMaxExtentSparse"), "{e}");
        let res = Arc::new(vmdk::LocalExtentResolver::new(&sub_dir));
        let c = vmdk::decode_flat(r.clone(), res.clone(), &opts)
            .await
            .unwrap();
        assert_eq!(c.virtual_size, 4500 * MIB);
        let map: u64 = c
            .allocation
            .as_ref()
            .unwrap()
            .ranges()
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        if sub == "twoGbMaxExtentSparse" {
            assert!(map < 16 * MIB, "{sub}: {map} bytes mapped");
        }
        assert_eq!(digest(c).await, want, "{sub}: content differs");
        let mut o = opts.clone();
        o.extent_resolver = Some(res);
        let (_, c) = virtrigaud_core::format::decode(
            virtrigaud_core::ImageSource::RandomAccess(r),
            None,
            &o,
        )
        .await
        .unwrap();
        assert_eq!(digest(c).await, want, "{sub}: through format::decode");
    }
}

/// Descriptors that must not be followed: an extent name leaving its directory, a missing
/// extent file, a sparse extent whose size disagrees, a delta disk of a snapshot chain.
#[tokio::test]
async fn bad_descriptors_are_refused_clearly() {
    use virtrigaud_core::ErrorKind;
    let dir = tempfile::tempdir().unwrap();
    let res = Arc::new(vmdk::LocalExtentResolver::new(dir.path()));
    let opts = DecodeOptions::default();
    let desc = |parent: &str, extents: &str| {
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID={parent}\n\
             createType=\"twoGbMaxExtentSparse\"\n\n# Extent description\n{extents}\n"
        )
    };
    let cases = [
        (
            desc("ffffffff", "RW 2048 SPARSE \"../escape.vmdk\""),
            ErrorKind::Corrupt,
            "outside its directory",
        ),
        (
            desc("ffffffff", "RW 2048 SPARSE \"missing-s001.vmdk\""),
            ErrorKind::NotFound,
            "missing-s001.vmdk",
        ),
        (
            desc("ffffffff", "RW 2048 SPARSE \"notsparse.vmdk\""),
            ErrorKind::Corrupt,
            "notsparse.vmdk",
        ),
        (
            desc("87654321", "RW 2048 SPARSE \"x.vmdk\""),
            ErrorKind::Unsupported,
            "consolidate",
        ),
    ];
    std::fs::write(dir.path().join("notsparse.vmdk"), vec![7u8; 1 << 20]).unwrap();
    for (i, (text, kind, needle)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("d{i}.vmdk"));
        std::fs::write(&path, text).unwrap();
        let e = vmdk::decode_flat(open(&path).await, res.clone(), &opts)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), *kind, "case {i}: {e}");
        assert!(e.to_string().contains(needle), "case {i}: {e}");
    }
}
