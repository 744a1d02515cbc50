//! Codec tests on in-memory images: round trips, sequential decoding, crafted hostile images.

use super::*;
use crate::ErrorKind;
use crate::extent::{AllocationMap, Extent};
use crate::format::Chunk;
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

struct Mem(Bytes);

#[async_trait]
impl ReadAt for Mem {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let s = (offset.min(self.0.len() as u64)) as usize;
        let e = s.saturating_add(len).min(self.0.len());
        Ok(self.0.slice(s..e))
    }
}

use crate::testdata::noise as pattern;

/// A disk with data at odd offsets, holes and a zero run; returns content and flat bytes.
fn sample_disk(vsize: u64, with_map: bool) -> (DiskContent, Vec<u8>) {
    let mut flat = vec![0u8; vsize as usize];
    let pieces: Vec<(u64, usize)> = vec![(1000, 5000), (70_000, 3), (200_001, 150_000)];
    let mut extents = Vec::new();
    for (i, (off, len)) in pieces.iter().enumerate() {
        if *off as usize + len > vsize as usize {
            continue;
        }
        let p = pattern(i as u64 + 1, *len);
        flat[*off as usize..*off as usize + len].copy_from_slice(&p);
        extents.push(Extent::Data {
            offset: *off,
            bytes: Bytes::from(p),
        });
        if i == 1 {
            extents.push(Extent::Zero {
                offset: 70_003,
                len: 1000,
            });
        }
    }
    let map = AllocationMap::from_ranges(
        extents
            .iter()
            .filter(|e| e.is_data())
            .map(|e| e.offset()..e.end())
            .collect(),
    );
    let mut c = DiskContent::from_extents(vsize, extents);
    if with_map {
        c.allocation = Some(map);
    }
    (c, flat)
}

async fn encode_vec(c: DiskContent, cluster_size: u32) -> Result<(Vec<u8>, Vec<Chunk>)> {
    let opts = EncodeOptions {
        cluster_size,
        ..Default::default()
    };
    let mut s = encode(c, &opts)?;
    let mut out = Vec::new();
    let mut chunks = Vec::new();
    while let Some(c) = s.next().await {
        let c = c?;
        match &c {
            Chunk::Data(b) => out.extend_from_slice(b),
            Chunk::Zeros(n) => out.resize(out.len() + *n as usize, 0),
        }
        chunks.push(c);
    }
    Ok((out, chunks))
}

/// The file as a sequential stream, cut into `piece`-byte extents (all-zero pieces as holes).
fn as_stream(file: &[u8], piece: usize) -> ExtentStream {
    let file = Bytes::copy_from_slice(file);
    let mut v = Vec::new();
    let mut o = 0;
    while o < file.len() {
        let n = piece.min(file.len() - o);
        let b = file.slice(o..o + n);
        if crate::extent::is_zero(&b) {
            v.push(Ok(Extent::Zero {
                offset: o as u64,
                len: n as u64,
            }));
        } else {
            v.push(Ok(Extent::Data {
                offset: o as u64,
                bytes: b,
            }));
        }
        o += n;
    }
    futures::stream::iter(v).boxed()
}

async fn drain(c: DiskContent) -> Result<u64> {
    let mut s = c.validated().extents;
    let mut n = 0u64;
    while let Some(e) = s.next().await {
        n += e?.len();
    }
    Ok(n)
}

async fn decode_both(file: &[u8]) -> (Result<Vec<u8>>, Result<Vec<u8>>) {
    let src: Arc<dyn ReadAt> = Arc::new(Mem(Bytes::copy_from_slice(file)));
    let opts = DecodeOptions {
        read_size: 64 << 10,
        ..Default::default()
    };
    let r = match decode_random(src, &opts).await {
        Ok(c) => c.read_all().await,
        Err(e) => Err(e),
    };
    let s = match decode_sequential(Some(file.len() as u64), as_stream(file, 777), &opts).await {
        Ok(c) => c.read_all().await,
        Err(e) => Err(e),
    };
    (r, s)
}

#[tokio::test]
async fn round_trip_in_memory() {
    for cs in [512u32, 4096, 65536] {
        for with_map in [true, false] {
            let vsize = 400_000 + 123;
            let (c, mut flat) = sample_disk(vsize, with_map);
            // QEMU reads a qcow2 size in whole sectors: the encoder rounds it up with zeros.
            let stored = vsize.next_multiple_of(512);
            flat.resize(stored as usize, 0);
            let (file, chunks) = encode_vec(c, cs).await.unwrap();
            assert_eq!(file.len() as u64 % u64::from(cs), 0);
            if !with_map {
                assert!(chunks.iter().any(|c| matches!(c, Chunk::Zeros(_))));
            }
            let (r, s) = decode_both(&file).await;
            assert_eq!(r.unwrap(), flat, "random cs={cs} map={with_map}");
            assert_eq!(s.unwrap(), flat, "sequential cs={cs} map={with_map}");
            let src = Mem(Bytes::from(file.clone()));
            assert_eq!(probe(&src).await.unwrap(), stored);
            // deterministic
            let (c2, _) = sample_disk(vsize, with_map);
            assert_eq!(encode_vec(c2, cs).await.unwrap().0, file);
        }
    }
}

#[tokio::test]
async fn allocation_map_from_metadata() {
    let (c, _) = sample_disk(1 << 20, true);
    let (file, _) = encode_vec(c, 4096).await.unwrap();
    let c = decode_random(Arc::new(Mem(Bytes::from(file))), &DecodeOptions::default())
        .await
        .unwrap();
    let a = c.allocation.clone().unwrap();
    assert_eq!(a.ranges(), &[0..8192, 69632..73728, 196608..352256]);
}

#[tokio::test]
async fn empty_and_tiny_disks() {
    for vsize in [0u64, 1, 511] {
        let c = DiskContent::from_extents(vsize, vec![]);
        let (file, _) = encode_vec(c, 512).await.unwrap();
        let (r, s) = decode_both(&file).await;
        // Rounded up to a whole sector (QEMU reads the size in sectors).
        let stored = vsize.next_multiple_of(512) as usize;
        assert_eq!(r.unwrap(), vec![0u8; stored]);
        assert_eq!(s.unwrap(), vec![0u8; stored]);
    }
}

#[tokio::test]
async fn data_outside_map_is_invalid() {
    let mut c = DiskContent::from_extents(
        1 << 20,
        vec![Extent::Data {
            offset: 500_000,
            bytes: Bytes::from_static(b"x"),
        }],
    );
    c.allocation = Some(AllocationMap::from_ranges(
        std::iter::once(0..100).collect(),
    ));
    let e = encode_vec(c, 4096).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}

#[tokio::test]
async fn sequential_buffers_out_of_order_data() {
    // Two data clusters; swap them in the file and in the L2 table.
    let cs = 4096usize;
    let a = pattern(7, cs);
    let b = pattern(8, cs);
    let c = DiskContent::from_extents(
        2 * cs as u64,
        vec![
            Extent::Data {
                offset: 0,
                bytes: Bytes::from(a.clone()),
            },
            Extent::Data {
                offset: cs as u64,
                bytes: Bytes::from(b.clone()),
            },
        ],
    );
    let (mut file, _) = encode_vec(c, cs as u32).await.unwrap();
    let l1_off = u64::from_be_bytes(file[40..48].try_into().unwrap()) as usize;
    let l2_off =
        (u64::from_be_bytes(file[l1_off..l1_off + 8].try_into().unwrap()) & !(1 << 63)) as usize;
    let e0: [u8; 8] = file[l2_off..l2_off + 8].try_into().unwrap();
    let e1: [u8; 8] = file[l2_off + 8..l2_off + 16].try_into().unwrap();
    file[l2_off..l2_off + 8].copy_from_slice(&e1);
    file[l2_off + 8..l2_off + 16].copy_from_slice(&e0);
    let d = file.len() - 2 * cs;
    file[d..d + cs].copy_from_slice(&b);
    file[d + cs..].copy_from_slice(&a);
    let (r, s) = decode_both(&file).await;
    let mut want = a;
    want.extend_from_slice(&b);
    assert_eq!(r.unwrap(), want);
    assert_eq!(s.unwrap(), want);
}

fn put64(f: &mut [u8], at: usize, v: u64) {
    f[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

async fn small_image() -> Vec<u8> {
    let (c, _) = sample_disk(400_000, true);
    encode_vec(c, 4096).await.unwrap().0
}

async fn assert_corrupt(file: &[u8], what: &str) {
    let (r, s) = decode_both(file).await;
    for (mode, res) in [("random", r), ("sequential", s)] {
        let e = res.expect_err(&format!("{what} ({mode}) should fail"));
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{what} ({mode}): {e}");
    }
}

#[tokio::test]
async fn hostile_images_are_corrupt() {
    let good = small_image().await;
    let l1_off = u64::from_be_bytes(good[40..48].try_into().unwrap()) as usize;
    let l2_off =
        (u64::from_be_bytes(good[l1_off..l1_off + 8].try_into().unwrap()) & !(1 << 63)) as usize;

    let mut f = good.clone();
    f[36..40].copy_from_slice(&4_000_000_000u32.to_be_bytes());
    assert_corrupt(&f, "L1 size of billions").await;

    let mut f = good.clone();
    f[36..40].copy_from_slice(&1_000_000u32.to_be_bytes()); // under the cap, beyond the file
    assert_corrupt(&f, "L1 table beyond file").await;

    let mut f = good.clone();
    put64(&mut f, 40, 1 << 40);
    assert_corrupt(&f, "L1 offset past EOF").await;

    let mut f = good.clone();
    put64(&mut f, 40, 0);
    assert_corrupt(&f, "L1 overlapping header").await;

    let mut f = good.clone();
    put64(&mut f, l1_off, (1 << 63) | (1 << 40));
    assert_corrupt(&f, "L2 offset past EOF").await;

    let mut f = good.clone();
    put64(&mut f, l1_off, l1_off as u64);
    assert_corrupt(&f, "L2 overlapping L1").await;

    let mut f = good.clone();
    put64(&mut f, l1_off, 4096); // the refcount table
    assert_corrupt(&f, "L2 overlapping refcount table").await;

    let mut f = good.clone();
    let x = 62 - (12 - 8);
    let host = good.len() as u64 - 100;
    put64(&mut f, l2_off, (1 << 62) | (7u64 << x) | host);
    assert_corrupt(&f, "compressed length beyond file").await;

    let mut f = good.clone();
    put64(&mut f, l2_off, (1 << 63) | (1 << 40));
    assert_corrupt(&f, "data cluster past EOF").await;

    let mut f = good.clone();
    put64(&mut f, l2_off, (1 << 63) | 12288 | 512);
    assert_corrupt(&f, "unaligned data cluster").await;

    let mut f = good.clone();
    put64(&mut f, l2_off, (1 << 62) | 4096);
    assert_corrupt(&f, "compressed garbage").await;

    let mut f = good.clone();
    let e0 = u64::from_be_bytes(good[l2_off..l2_off + 8].try_into().unwrap());
    put64(&mut f, l2_off + 8 * 20, e0);
    let (r, _) = decode_both(&f).await;
    assert_eq!(
        r.unwrap_err().kind(),
        ErrorKind::Corrupt,
        "data cluster used twice"
    );

    let mut f = good.clone();
    put64(&mut f, l2_off, (1 << 63) | l2_off as u64);
    let (r, _) = decode_both(&f).await;
    assert_eq!(
        r.unwrap_err().kind(),
        ErrorKind::Corrupt,
        "data cluster is an L2 table"
    );

    let f = good[..good.len() / 2].to_vec();
    assert_corrupt(&f, "truncated image").await;
    let f = good[..60].to_vec();
    assert_corrupt(&f, "truncated header").await;
}

#[tokio::test]
async fn backing_file_is_unsupported() {
    let mut f = small_image().await;
    put64(&mut f, 8, 0x200);
    f[16..20].copy_from_slice(&4u32.to_be_bytes());
    f[0x200..0x204].copy_from_slice(b"base");
    let (r, s) = decode_both(&f).await;
    for e in [r.unwrap_err(), s.unwrap_err()] {
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(
            e.message()
                .contains("backing file base: supply the backing chain"),
            "{e}"
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 500, ..Default::default() })]
    #[test]
    fn mutated_images_never_panic(
        muts in proptest::collection::vec(
            (proptest::prop_oneof![0usize..112, 0usize..6 * 4096], proptest::prelude::any::<u8>()),
            1..8,
        ),
        cut in proptest::option::of(0usize..200_000),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut f = small_image().await;
            for (at, v) in &muts {
                if let Some(b) = f.get_mut(*at) {
                    *b = *v;
                }
            }
            if let Some(c) = cut {
                f.truncate(c);
            }
            let fut = async {
                let src: Arc<dyn ReadAt> = Arc::new(Mem(Bytes::from(f.clone())));
                if let Ok(c) = decode_random(src, &DecodeOptions::default()).await {
                    let _ = drain(c).await;
                }
                if let Ok(c) = decode_sequential(Some(f.len() as u64), as_stream(&f, 1000), &DecodeOptions::default()).await {
                    let _ = drain(c).await;
                }
                if let Ok(c) = decode_sequential(None, as_stream(&f, 5000), &DecodeOptions::default()).await {
                    let _ = drain(c).await;
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(10), fut).await.expect("decoder hangs");
        });
    }
}

#[tokio::test]
async fn sequential_decoder_learns_the_allocation_map_when_tables_come_first() {
    let (c, flat) = sample_disk(1 << 20, true);
    let (file, _) = encode_vec(c, 4096).await.unwrap();
    let random = decode_random(
        Arc::new(Mem(Bytes::copy_from_slice(&file))),
        &DecodeOptions::default(),
    )
    .await
    .unwrap()
    .allocation
    .unwrap();
    let seq = decode_sequential(
        Some(file.len() as u64),
        as_stream(&file, 333),
        &DecodeOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        seq.allocation.as_ref(),
        Some(&random),
        "same map as the random-access decoder"
    );
    assert_eq!(seq.read_all().await.unwrap(), flat);
}

// ---- compressed output ----

use crate::testdata::text;

/// Compressible, incompressible and zero regions (zero data extents included), an odd
/// virtual size and data in the partial last cluster.
fn mixed_disk() -> (Vec<Extent>, Vec<u8>, u64) {
    let vsize: u64 = (3 << 20) + 777;
    let mut flat = vec![0u8; vsize as usize];
    let mut mix = Vec::new();
    for i in 0..50 {
        mix.extend(if i % 2 == 0 {
            text(i, 10_000)
        } else {
            pattern(i, 10_000)
        });
    }
    let pieces: Vec<(u64, Vec<u8>)> = vec![
        (0, text(1, 300_000)),
        (400_000, pattern(2, 300_001)),
        (700_001, vec![0u8; 199_999]),
        (1_000_003, b"abcdefg".to_vec()),
        (2 << 20, mix),
        (vsize - 1000, text(3, 1000)),
    ];
    let mut extents = Vec::new();
    for (off, data) in pieces {
        if off == 400_000 {
            extents.push(Extent::Zero {
                offset: 300_000,
                len: 100_000,
            });
        }
        flat[off as usize..off as usize + data.len()].copy_from_slice(&data);
        extents.push(Extent::Data {
            offset: off,
            bytes: Bytes::from(data),
        });
    }
    (extents, flat, vsize)
}

async fn encode_compressed(c: DiskContent, cluster_size: u32, par: usize) -> Result<Vec<u8>> {
    let opts = EncodeOptions {
        compress: true,
        cluster_size,
        parallelism: par,
        ..Default::default()
    };
    let mut s = encode(c, &opts)?;
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        match c? {
            Chunk::Data(b) => out.extend_from_slice(&b),
            Chunk::Zeros(n) => out.resize(out.len() + n as usize, 0),
        }
    }
    Ok(out)
}

/// What `qemu-img check` verifies, recomputed independently from the tables: every host
/// cluster's refcount equals its references (compressed clusters count once on every cluster
/// their sector-rounded bytes touch), COPIED is set exactly on refcount-1 normal clusters and
/// L2 tables and never on compressed ones, everything lies inside the file. Returns the
/// numbers of normal and compressed data clusters.
fn check_image(file: &[u8]) -> (usize, usize) {
    let be64 = |at: u64| u64::from_be_bytes(file[at as usize..at as usize + 8].try_into().unwrap());
    let be32 = |at: u64| u32::from_be_bytes(file[at as usize..at as usize + 4].try_into().unwrap());
    let cb = be32(20);
    let cs = 1u64 << cb;
    let (l1_size, l1_off) = (u64::from(be32(36)), be64(40));
    let (rt_off, rt_clusters) = (be64(48), u64::from(be32(56)));
    assert_eq!(be32(96), 4, "16-bit refcounts");
    assert_eq!(file[104], 0, "zlib");
    assert_eq!(be64(72), 0, "no incompatible feature");
    assert_eq!(file.len() % 512, 0, "file ends on a sector boundary");
    let n = (file.len() as u64).div_ceil(cs);
    let mut refs = vec![0u64; n as usize];
    let mut inc = |start: u64, len: u64| {
        for c in start / cs..=(start + len - 1) / cs {
            assert!(c < n, "reference beyond the file: {start}+{len}");
            refs[c as usize] += 1;
        }
    };
    inc(0, cs);
    inc(rt_off, rt_clusters * cs);
    let mut rbs = Vec::new();
    for i in 0..rt_clusters * cs / 8 {
        let e = be64(rt_off + 8 * i);
        if e != 0 {
            inc(e, cs);
            rbs.push(e);
        }
    }
    if l1_size > 0 {
        inc(l1_off, l1_size * 8);
    }
    let x = 62 - (cb - 8);
    let (mut normal, mut compressed) = (Vec::new(), 0usize);
    for i in 0..l1_size {
        let e = be64(l1_off + 8 * i);
        if e == 0 {
            continue;
        }
        assert_ne!(e & (1 << 63), 0, "L1 COPIED");
        let l2 = e & 0x00ff_ffff_ffff_fe00;
        inc(l2, cs);
        normal.push(l2);
        for j in 0..cs / 8 {
            let e = be64(l2 + 8 * j);
            if e == 0 {
                continue;
            }
            if e & (1 << 62) != 0 {
                assert_eq!(e & (1 << 63), 0, "no COPIED on compressed clusters");
                let off = e & ((1 << x) - 1);
                let sectors = ((e >> x) & ((1 << (cb - 8)) - 1)) + 1;
                inc(off, sectors * 512 - (off & 511));
                compressed += 1;
            } else {
                assert_ne!(e & (1 << 63), 0, "COPIED on normal clusters");
                let host = e & 0x00ff_ffff_ffff_fe00;
                assert_eq!(host % cs, 0);
                inc(host, cs);
                normal.push(host);
            }
        }
    }
    let epb = cs / 2;
    for c in 0..rbs.len() as u64 * epb {
        let rb = rbs[(c / epb) as usize] + 2 * (c % epb);
        let got = u64::from(u16::from_be_bytes(
            file[rb as usize..rb as usize + 2].try_into().unwrap(),
        ));
        let want = refs.get(c as usize).copied().unwrap_or(0);
        assert_eq!(got, want, "refcount of host cluster {c}");
    }
    assert!(rbs.len() as u64 * epb >= n);
    for h in &normal {
        assert_eq!(refs[(h / cs) as usize], 1, "normal cluster {h:#x} shared");
    }
    (
        normal.len() - (0..l1_size).filter(|i| be64(l1_off + 8 * i) != 0).count(),
        compressed,
    )
}

#[tokio::test]
async fn compressed_round_trip_in_memory() {
    let (extents, mut flat, vsize) = mixed_disk();
    // Rounded up to a whole sector (QEMU reads a qcow2 size in sectors).
    flat.resize(vsize.next_multiple_of(512) as usize, 0);
    for cs in [512u32, 4096, 65536, 2 << 20] {
        let c = DiskContent::from_extents(vsize, extents.clone());
        let file = encode_compressed(c, cs, 3).await.unwrap();
        let (normal, compressed) = check_image(&file);
        assert!(compressed > 0, "cs={cs}");
        if cs <= 65536 {
            assert!(
                normal > 0,
                "incompressible clusters are stored as is, cs={cs}"
            );
        }
        let (r, s) = decode_both(&file).await;
        assert_eq!(r.unwrap(), flat, "random cs={cs}");
        assert_eq!(s.unwrap(), flat, "sequential cs={cs}");
        // All-zero clusters are not stored: a zero-filled data extent costs nothing.
        let src: Arc<dyn ReadAt> = Arc::new(Mem(Bytes::from(file.clone())));
        let d = decode_random(src, &DecodeOptions::default()).await.unwrap();
        let a = d.allocation.clone().unwrap();
        let cs64 = u64::from(cs);
        let probe_at = 800_000u64 / cs64 * cs64;
        if cs <= 65536 {
            assert!(!a.intersects(probe_at..probe_at + cs64), "cs={cs}");
        }
        // Much smaller than the uncompressed image.
        let (plain, _) = encode_vec(DiskContent::from_extents(vsize, extents.clone()), cs)
            .await
            .unwrap();
        // (2 MiB clusters: five metadata clusters dominate this small disk.)
        let ratio = if cs < 2 << 20 { 7 } else { 10 };
        assert!(
            file.len() * 10 < plain.len() * ratio,
            "cs={cs}: {} vs {}",
            file.len(),
            plain.len()
        );
        // Deterministic, whatever the number of workers.
        let again = encode_compressed(DiskContent::from_extents(vsize, extents.clone()), cs, 1)
            .await
            .unwrap();
        assert!(again == file, "cs={cs}: not deterministic");
    }
    // Level 0 stores every cluster as is and still round-trips.
    let c = DiskContent::from_extents(vsize, extents.clone());
    let opts = EncodeOptions {
        compress: true,
        compression_level: 0,
        cluster_size: 4096,
        ..Default::default()
    };
    let mut s = encode(c, &opts).unwrap();
    let mut file = Vec::new();
    while let Some(c) = s.next().await {
        if let Chunk::Data(b) = c.unwrap() {
            file.extend_from_slice(&b);
        }
    }
    assert_eq!(check_image(&file).1, 0);
    let (r, _) = decode_both(&file).await;
    assert_eq!(r.unwrap(), flat);
}

#[tokio::test]
async fn compressed_empty_and_tiny_disks() {
    for vsize in [0u64, 1, 511, 4096] {
        let c = DiskContent::from_extents(vsize, vec![]);
        let file = encode_compressed(c, 512, 2).await.unwrap();
        check_image(&file);
        let (r, s) = decode_both(&file).await;
        let stored = vsize.next_multiple_of(512) as usize;
        assert_eq!(r.unwrap(), vec![0u8; stored]);
        assert_eq!(s.unwrap(), vec![0u8; stored]);
    }
    let c = DiskContent::from_extents(
        1,
        vec![Extent::Data {
            offset: 0,
            bytes: Bytes::from_static(b"x"),
        }],
    );
    let file = encode_compressed(c, 65536, 2).await.unwrap();
    assert_eq!(check_image(&file), (0, 1));
    let (r, _) = decode_both(&file).await;
    let mut want = b"x".to_vec();
    want.resize(512, 0);
    assert_eq!(r.unwrap(), want);
}

/// Content whose replay (the sizing pass) sees `before` and whose stream sees `now`.
fn changing(vsize: u64, before: Vec<Extent>, now: Vec<Extent>) -> DiskContent {
    let before: Arc<[Extent]> = before.into();
    DiskContent::new(
        vsize,
        None,
        futures::stream::iter(now.into_iter().map(Ok)).boxed(),
    )
    .with_replay(Arc::new(move || {
        let v: Vec<Result<Extent>> = before.iter().cloned().map(Ok).collect();
        Box::pin(async move { Ok(futures::stream::iter(v).boxed()) })
    }))
}

#[tokio::test]
async fn compressed_refuses_a_source_that_changed_between_passes() {
    let data = |off: u64, b: Vec<u8>| Extent::Data {
        offset: off,
        bytes: Bytes::from(b),
    };
    let cases = [
        // compressible before, incompressible now
        (
            vec![data(0, text(1, 4096))],
            vec![data(0, pattern(1, 4096))],
        ),
        // other text, other compressed length
        (vec![data(0, text(1, 4096))], vec![data(0, text(2, 4096))]),
        // a cluster vanished
        (
            vec![data(0, text(1, 4096)), data(8192, text(2, 10))],
            vec![data(0, text(1, 4096))],
        ),
        // a cluster appeared
        (
            vec![data(0, text(1, 4096))],
            vec![data(0, text(1, 4096)), data(8192, text(2, 10))],
        ),
    ];
    for (i, (before, now)) in cases.into_iter().enumerate() {
        let e = encode_compressed(changing(1 << 20, before, now), 4096, 2)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "case {i}: {e}");
        assert!(e.message().contains("source changed"), "case {i}: {e}");
    }
    // The same bytes cut differently are the same content.
    let t = text(5, 10_000);
    let before = vec![data(0, t.clone())];
    let now = vec![data(0, t[..3000].to_vec()), data(3000, t[3000..].to_vec())];
    let file = encode_compressed(changing(1 << 20, before, now), 4096, 2)
        .await
        .unwrap();
    check_image(&file);
}

#[tokio::test]
async fn compressed_needs_a_replayable_source() {
    let (extents, _, vsize) = mixed_disk();
    let c = DiskContent::new(
        vsize,
        None,
        futures::stream::iter(extents.into_iter().map(Ok)).boxed(),
    );
    let e = encode_compressed(c, 65536, 2).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
}
