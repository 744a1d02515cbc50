//! Round trips through our own encoders and decoders, and crafted hostile images.

use super::header::*;
use super::*;
use crate::extent::{AllocationMap, Extent};
use crate::format::Chunk;
use crate::{ErrorKind, ReadAt};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};

/// An image held in memory.
pub(super) struct Mem(pub Bytes);

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

fn mem(v: &[u8]) -> Arc<dyn ReadAt> {
    Arc::new(Mem(Bytes::copy_from_slice(v)))
}

async fn collect(s: crate::format::ChunkStream) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut s = s;
    while let Some(c) = s.next().await {
        match c? {
            Chunk::Data(b) => out.extend_from_slice(&b),
            Chunk::Zeros(n) => out.resize(out.len() + n as usize, 0),
        }
    }
    Ok(out)
}

/// A disk of `size` bytes with data at odd places, zero data, holes, and a partial last grain.
fn pattern(size: u64) -> (Vec<u8>, Vec<Extent>) {
    let mut disk = vec![0u8; size as usize];
    let mut ext = Vec::new();
    let mut put = |off: u64, len: u64, seed: u8, ext: &mut Vec<Extent>| {
        let v: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        disk[off as usize..(off + len) as usize].copy_from_slice(&v);
        ext.push(Extent::Data {
            offset: off,
            bytes: Bytes::from(v),
        });
    };
    put(1000, 3000, 1, &mut ext);
    ext.push(Extent::Zero {
        offset: 4000,
        len: 60000,
    });
    ext.push(Extent::Data {
        offset: 64000,
        bytes: Bytes::from(vec![0u8; 200_000]),
    });
    put(264_000, 70_001, 7, &mut ext);
    put(65536 * 10, 65536 * 3, 9, &mut ext); // aligned full grains
    put(65536 * 40 + 17, 100, 3, &mut ext);
    put(size - 1500, 1500, 5, &mut ext);
    (disk, ext)
}

fn content(size: u64, ext: &[Extent]) -> DiskContent {
    DiskContent::from_extents(size, ext.to_vec())
}

fn opts(par: usize) -> EncodeOptions {
    EncodeOptions {
        parallelism: par,
        ..Default::default()
    }
}

fn dopts() -> DecodeOptions {
    DecodeOptions {
        read_size: 256 << 10,
        read_ahead: 3,
        extent_resolver: None,
    }
}

/// Feeds an image as a stream of file extents cut at odd sizes, with zero runs as holes.
fn as_stream(img: &[u8], piece: usize) -> ExtentStream {
    let mut v = Vec::new();
    let mut o = 0usize;
    while o < img.len() {
        let n = piece.min(img.len() - o);
        let b = &img[o..o + n];
        if crate::extent::is_zero(b) {
            v.push(Ok(Extent::Zero {
                offset: o as u64,
                len: n as u64,
            }));
        } else {
            v.push(Ok(Extent::Data {
                offset: o as u64,
                bytes: Bytes::copy_from_slice(b),
            }));
        }
        o += n;
    }
    futures::stream::iter(v).boxed()
}

const SIZE: u64 = 5 * 65536 * 9 + 7 * 512; // not a multiple of the grain

#[tokio::test]
async fn stream_optimized_round_trip_random_and_sequential() {
    let (disk, ext) = pattern(SIZE);
    let img = collect(encode_stream_optimized(content(SIZE, &ext), &opts(3)).unwrap())
        .await
        .unwrap();
    assert_eq!(&img[..4], b"KDMV");
    assert_eq!(img.len() % 512, 0);
    let again = collect(encode_stream_optimized(content(SIZE, &ext), &opts(1)).unwrap())
        .await
        .unwrap();
    assert_eq!(img, again, "deterministic whatever the parallelism");
    assert_eq!(probe(mem(&img).as_ref()).await.unwrap(), SIZE);

    let c = decode_random(mem(&img), &dopts()).await.unwrap();
    let alloc = c.allocation.clone().unwrap();
    assert!(alloc.allocated_bytes() < SIZE / 2, "{alloc:?}");
    assert!(!alloc.intersects(65536..262_144));
    assert_eq!(c.read_all().await.unwrap(), disk);

    for piece in [512usize, 4093, 1 << 20] {
        let c = decode_sequential(Some(img.len() as u64), as_stream(&img, piece), &dopts())
            .await
            .unwrap();
        assert_eq!(c.virtual_size, SIZE);
        assert_eq!(c.read_all().await.unwrap(), disk, "piece {piece}");
    }
}

#[tokio::test]
async fn monolithic_sparse_round_trip_with_and_without_map() {
    let (disk, ext) = pattern(SIZE);
    for alloc in [
        None,
        Some(AllocationMap::from_ranges(
            ext.iter()
                .filter(|e| e.is_data())
                .map(|e| e.offset()..e.end())
                .collect(),
        )),
    ] {
        let mut c = content(SIZE, &ext);
        c.allocation = alloc.clone();
        let img = collect(encode_monolithic_sparse(c, &opts(2)).unwrap())
            .await
            .unwrap();
        assert_eq!(img.len() % 512, 0);
        let h = SparseHeader::parse(&img).unwrap();
        assert_eq!(h.capacity * 512, SIZE);
        assert!(!h.compressed());
        let c = decode_random(mem(&img), &dopts()).await.unwrap();
        if alloc.is_some() {
            let a = c.allocation.clone().unwrap();
            assert!(a.allocated_bytes() < SIZE / 2);
        }
        assert_eq!(c.read_all().await.unwrap(), disk);
        // Metadata comes first, grains in guest order: readable as a stream.
        let c = decode_sequential(None, as_stream(&img, 4096), &dopts())
            .await
            .unwrap();
        assert_eq!(c.read_all().await.unwrap(), disk);
    }
}

#[tokio::test]
async fn monolithic_sparse_refuses_data_outside_map() {
    let (_, ext) = pattern(SIZE);
    let mut c = content(SIZE, &ext);
    c.allocation = Some(AllocationMap::from_ranges(
        std::iter::once(0..65536).collect(),
    ));
    let e = collect(encode_monolithic_sparse(c, &opts(1)).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}

#[tokio::test]
async fn empty_and_tiny_disks() {
    for size in [0u64, 512, 65536, 65536 + 512] {
        let c = DiskContent::from_extents(size, vec![]);
        let img = collect(encode_stream_optimized(c, &opts(2)).unwrap())
            .await
            .unwrap();
        let d = decode_random(mem(&img), &dopts()).await.unwrap();
        assert_eq!(d.read_all().await.unwrap(), vec![0u8; size as usize]);
        let d = decode_sequential(None, as_stream(&img, 1000), &dopts())
            .await
            .unwrap();
        assert_eq!(d.read_all().await.unwrap(), vec![0u8; size as usize]);
        let c = DiskContent::from_extents(size, vec![]);
        let img = collect(encode_monolithic_sparse(c, &opts(2)).unwrap())
            .await
            .unwrap();
        let d = decode_random(mem(&img), &dopts()).await.unwrap();
        assert_eq!(d.read_all().await.unwrap(), vec![0u8; size as usize]);
    }
}

async fn sparse_image() -> Vec<u8> {
    let (_, ext) = pattern(SIZE);
    collect(encode_monolithic_sparse(content(SIZE, &ext), &opts(1)).unwrap())
        .await
        .unwrap()
}

async fn stream_image() -> Vec<u8> {
    let (_, ext) = pattern(SIZE);
    collect(encode_stream_optimized(content(SIZE, &ext), &opts(1)).unwrap())
        .await
        .unwrap()
}

async fn decode_all_random(img: &[u8]) -> Result<Vec<u8>> {
    decode_random(mem(img), &dopts()).await?.read_all().await
}

async fn decode_all_seq(img: &[u8]) -> Result<Vec<u8>> {
    decode_sequential(Some(img.len() as u64), as_stream(img, 3000), &dopts())
        .await?
        .read_all()
        .await
}

#[tokio::test]
async fn grain_directory_pointing_into_the_header_is_corrupt() {
    let mut img = sparse_image().await;
    img[56..64].copy_from_slice(&0u64.to_le_bytes());
    assert_eq!(
        decode_all_random(&img).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    assert_eq!(
        decode_all_seq(&img).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    img[56..64].copy_from_slice(&3u64.to_le_bytes()); // inside the descriptor
    assert_eq!(
        decode_all_random(&img).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    assert_eq!(
        decode_all_seq(&img).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    img[56..64].copy_from_slice(&(u64::MAX - 5).to_le_bytes());
    assert_eq!(
        decode_all_random(&img).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    assert_eq!(
        decode_all_seq(&img).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
}

#[tokio::test]
async fn grain_table_past_eof_is_corrupt() {
    let mut img = sparse_image().await;
    let h = SparseHeader::parse(&img).unwrap();
    let gd = (h.gd_offset * 512) as usize;
    let past = img.len() as u32 / 512 + 10;
    img[gd..gd + 4].copy_from_slice(&past.to_le_bytes());
    assert_eq!(
        decode_all_random(&img).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    assert_eq!(
        decode_all_seq(&img).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
}

/// Offsets of grain markers in a streamOptimized image.
fn grain_markers(img: &[u8]) -> Vec<usize> {
    let mut v = Vec::new();
    let mut p = 128 * 512;
    while p + 16 <= img.len() {
        match Marker::parse(&img[p..p + 16]).unwrap() {
            Marker::Grain { size, .. } => {
                v.push(p);
                p += (12 + size as usize).next_multiple_of(512);
            }
            Marker::Meta {
                sectors: 0,
                kind: 0,
            } => break,
            Marker::Meta { sectors, .. } => p += 512 + sectors as usize * 512,
        }
    }
    v
}

#[tokio::test]
async fn compressed_grain_beyond_the_file_is_corrupt() {
    let mut img = stream_image().await;
    let last = *grain_markers(&img).last().unwrap();
    img[last + 8..last + 12].copy_from_slice(&(2 * 65536u32 - 1).to_le_bytes());
    assert_eq!(
        decode_all_random(&img).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    assert_eq!(
        decode_all_seq(&img).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    img[last + 8..last + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        decode_all_random(&img).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    assert_eq!(
        decode_all_seq(&img).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
}

#[tokio::test]
async fn out_of_order_grains_are_corrupt_in_a_stream() {
    let mut img = stream_image().await;
    let m = grain_markers(&img);
    // Second grain claims the first grain's LBA.
    let lba0 = img[m[0]..m[0] + 8].to_vec();
    img[m[1]..m[1] + 8].copy_from_slice(&lba0);
    assert_eq!(
        decode_all_seq(&img).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    assert_eq!(
        decode_all_random(&img).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
}

#[tokio::test]
async fn truncated_stream_is_corrupt() {
    let img = stream_image().await;
    for cut in [100usize, 512, 128 * 512 + 7, img.len() / 2, img.len() - 512] {
        let t = &img[..cut];
        let e = decode_all_seq(t).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "cut {cut}: {e}");
        let e = decode_all_random(t).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "cut {cut}: {e}");
    }
}

struct CountingResolver(AtomicUsize, Bytes);

#[async_trait]
impl ExtentResolver for CountingResolver {
    async fn open(&self, _name: &str) -> Result<Arc<dyn ReadAt>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(Mem(self.1.clone())))
    }
}

fn flat_descriptor(name: &str, sectors: u64) -> Vec<u8> {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\n# Extent description\nRW {sectors} FLAT \"{name}\" 0\n\n\
         # The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn flat_extent_outside_its_directory_is_corrupt() {
    for name in ["../x-flat.vmdk", "/etc/passwd", "sub/x-flat.vmdk"] {
        let r = Arc::new(CountingResolver(
            AtomicUsize::new(0),
            Bytes::from(vec![1u8; 4096]),
        ));
        let e = decode_flat(mem(&flat_descriptor(name, 8)), r.clone(), &dopts())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}");
        assert_eq!(
            r.0.load(Ordering::SeqCst),
            0,
            "resolver must not be asked for {name}"
        );
        let local = LocalExtentResolver::new("/tmp");
        assert_eq!(
            local.open(name).await.err().map(|e| e.kind()),
            Some(ErrorKind::Corrupt)
        );
    }
}

#[tokio::test]
async fn flat_descriptor_reads_its_extent() {
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let r = Arc::new(CountingResolver(
        AtomicUsize::new(0),
        Bytes::from(data.clone()),
    ));
    let d = flat_descriptor("disk-flat.vmdk", 16);
    assert_eq!(probe(mem(&d).as_ref()).await.unwrap(), 8192);
    let c = decode_flat(mem(&d), r, &dopts()).await.unwrap();
    assert_eq!(c.read_all().await.unwrap(), data);
    // Extent shorter than the descriptor says.
    let r = Arc::new(CountingResolver(
        AtomicUsize::new(0),
        Bytes::from(vec![0u8; 100]),
    ));
    let e = decode_flat(mem(&d), r, &dopts()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn images() -> &'static (Vec<u8>, Vec<u8>) {
        static IMGS: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
        IMGS.get_or_init(|| {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let size = 8 * 65536 + 1024;
                let ext = vec![
                    Extent::Data {
                        offset: 100,
                        bytes: Bytes::from(vec![7u8; 3000]),
                    },
                    Extent::Data {
                        offset: 3 * 65536,
                        bytes: Bytes::from(vec![9u8; 65536]),
                    },
                    Extent::Data {
                        offset: size - 600,
                        bytes: Bytes::from(vec![1u8; 600]),
                    },
                ];
                let so = collect(encode_stream_optimized(content(size, &ext), &opts(1)).unwrap())
                    .await
                    .unwrap();
                let ms = collect(encode_monolithic_sparse(content(size, &ext), &opts(1)).unwrap())
                    .await
                    .unwrap();
                (so, ms)
            })
        })
    }

    fn run(img: Vec<u8>) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let t = std::time::Instant::now();
            // Drain without materialising the (possibly huge, mutated) virtual size.
            if let Ok(c) = decode_random(mem(&img), &dopts()).await {
                let _ = drain(c).await;
            }
            let o = dopts();
            let seq = decode_sequential(Some(img.len() as u64), as_stream(&img, 3000), &o);
            if let Ok(c) = seq.await {
                let _ = drain(c).await;
            }
            let _ = probe(mem(&img).as_ref()).await;
            // A hang guard, generous for a loaded CI machine: a case takes milliseconds.
            assert!(t.elapsed() < std::time::Duration::from_secs(30));
        });
    }

    async fn drain(c: DiskContent) -> Result<u64> {
        let mut s = c.validated().extents;
        let mut n = 0;
        while let Some(e) = s.next().await {
            n += e?.len();
        }
        Ok(n)
    }

    fn mutate(base: &[u8], muts: &[(usize, u8)], hot: bool) -> Vec<u8> {
        let mut img = base.to_vec();
        for &(p, v) in muts {
            // Half of the mutations hit the header, where most fields live.
            let i = if hot { p % 512 } else { p % img.len() };
            img[i] = v;
        }
        img
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]
        #[test]
        fn mutated_stream_optimized_never_panics(
            muts in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            hot in any::<bool>(),
        ) {
            run(mutate(&images().0, &muts, hot));
        }

        #[test]
        fn mutated_monolithic_sparse_never_panics(
            muts in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            hot in any::<bool>(),
        ) {
            run(mutate(&images().1, &muts, hot));
        }

        #[test]
        fn mutated_stream_tail_never_panics(
            muts in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8),
        ) {
            let base = &images().0;
            let mut img = base.clone();
            let n = img.len();
            for (p, v) in muts {
                img[n - 1 - p] = v;
            }
            run(img);
        }
    }
}

#[tokio::test]
async fn incompressible_grains_are_stored_and_round_trip() {
    let size = 16 * 65536u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..size / 2)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let ext = vec![Extent::Data {
        offset: 65536,
        bytes: Bytes::from(noise.clone()),
    }];
    let img = collect(encode_stream_optimized(content(size, &ext), &opts(2)).unwrap())
        .await
        .unwrap();
    // Stored, not searched: the compressed grains are barely larger than the data.
    assert!(img.len() < noise.len() + 65536 + 16 * 1024, "{}", img.len());
    let mut want = vec![0u8; size as usize];
    want[65536..65536 + noise.len()].copy_from_slice(&noise);
    let c = decode_random(mem(&img), &dopts()).await.unwrap();
    assert_eq!(c.read_all().await.unwrap(), want);
    let c = decode_sequential(None, as_stream(&img, 10_000), &dopts())
        .await
        .unwrap();
    assert_eq!(c.read_all().await.unwrap(), want);
}

#[tokio::test]
async fn format_dispatch_detects_and_decodes() {
    use crate::format::{DiskFormat, VmdkSubformat, decode};
    use crate::io::ImageSource;
    let (disk, _) = pattern(SIZE);
    for (img, sub) in [
        (stream_image().await, VmdkSubformat::StreamOptimized),
        (sparse_image().await, VmdkSubformat::MonolithicSparse),
    ] {
        let (f, c) = decode(ImageSource::RandomAccess(mem(&img)), None, &dopts())
            .await
            .unwrap();
        assert_eq!(f, DiskFormat::Vmdk(sub));
        assert_eq!(c.read_all().await.unwrap(), disk);
        let src = ImageSource::Sequential {
            size: Some(img.len() as u64),
            stream: as_stream(&img, 5000),
        };
        let (f, c) = decode(src, None, &dopts()).await.unwrap();
        assert_eq!(f, DiskFormat::Vmdk(sub));
        assert_eq!(c.read_all().await.unwrap(), disk);
        assert_eq!(
            crate::format::probe(mem(&img).as_ref()).await.unwrap(),
            (DiskFormat::Vmdk(sub), SIZE)
        );
    }
}

#[tokio::test]
async fn stream_skips_interleaved_metadata_and_refuses_unknown_markers() {
    let (disk, _) = pattern(SIZE);
    let img = stream_image().await;
    let m = grain_markers(&img);
    // A grain table between two grains, as VMware writes them.
    let mut v = img[..m[1]].to_vec();
    v.extend_from_slice(&Marker::meta_sector(4, MARKER_GT));
    v.extend_from_slice(&[0u8; 2048]);
    v.extend_from_slice(&img[m[1]..]);
    let c = decode_sequential(None, as_stream(&v, 700), &dopts())
        .await
        .unwrap();
    assert_eq!(c.read_all().await.unwrap(), disk);
    // An unknown marker type.
    let mut v = img[..m[1]].to_vec();
    v.extend_from_slice(&Marker::meta_sector(0, 77));
    v.extend_from_slice(&img[m[1]..]);
    assert_eq!(
        decode_all_seq(&v).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
}
