//! Pipeline and transfer tests on local files and the filesystem storage backend.

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use virtrigaud::digest::{CONTENT_BLOCK, hex};
use virtrigaud::format::{self, DecodeOptions, EncodeOptions};
use virtrigaud::io::{ImageSource, LocalFileSink, MemorySink};
use virtrigaud::manifest::manifest_key;
use virtrigaud::pipeline::{self, PipelineOptions};
use virtrigaud::*;

/// CRC32C (Castagnoli), bitwise, as an independent reference for the chunk checksums.
fn crc32c_of(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Reference content digest, straight from the documented definition.
fn reference_digest(disk: &[u8]) -> String {
    let mut root = Sha256::new();
    for b in disk.chunks(CONTENT_BLOCK) {
        root.update(Sha256::digest(b));
    }
    root.update((disk.len() as u64).to_le_bytes());
    hex(&root.finalize())
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    virtrigaud::testdata::noise(seed, len)
}

/// A disk image with data at scattered, unaligned offsets and zero runs.
fn sample_disk(size: usize) -> Vec<u8> {
    let mut d = vec![0u8; size];
    for (i, off) in [0usize, 70_000, size / 3, size / 2 + 12_345, size - 5000]
        .iter()
        .enumerate()
    {
        let n = 20_000.min(size - off);
        d[*off..off + n].copy_from_slice(&pattern(n, i as u64 + 1));
    }
    d
}

/// Sequential source handing out one byte at a time.
fn one_byte_source(disk: &[u8]) -> ImageSource {
    let items: Vec<Result<Extent>> = disk
        .iter()
        .enumerate()
        .map(|(i, b)| {
            Ok(Extent::Data {
                offset: i as u64,
                bytes: Bytes::copy_from_slice(&[*b]),
            })
        })
        .collect();
    ImageSource::Sequential {
        size: Some(disk.len() as u64),
        stream: futures::stream::iter(items).boxed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_at_a_time_source_gives_exact_bytes_and_digests() {
    let disk = sample_disk(300_001);
    let (_, content) = format::decode(one_byte_source(&disk), None, &DecodeOptions::default())
        .await
        .unwrap();
    let (sink, out) = MemorySink::new();
    let (report, sink) = pipeline::run(
        content,
        Box::new(sink),
        pipeline::Job {
            format: DiskFormat::Raw,
            encode: &EncodeOptions::default(),
            content_digest: true,
            hash_object: true,
            phase: Phase::Export,
            label: "d",
        },
        &PipelineOptions {
            chunk_size: 65_536,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    sink.commit().await.unwrap();
    let written = out.lock().unwrap().take().unwrap();
    assert_eq!(written, disk);
    assert_eq!(report.content_digest, Some(reference_digest(&disk)));
    let (sha, chunks) = report.object.unwrap();
    assert_eq!(sha, hex(&Sha256::digest(&disk)));
    assert_eq!(chunks.len(), disk.len().div_ceil(65_536));
    assert_eq!(
        chunks[1],
        hex(&crc32c_of(&disk[65_536..131_072]).to_be_bytes())
    );
    assert_eq!(report.data_bytes_read, disk.len() as u64);
    assert_eq!(report.stored_size, disk.len() as u64);
    let nonzero_blocks = disk
        .chunks(65_536)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count();
    assert!(report.allocated_bytes <= (nonzero_blocks * 65_536) as u64);
}

fn write_sparse(path: &Path, size: u64, pieces: &[(u64, Vec<u8>)]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (off, data) in pieces {
        f.seek(SeekFrom::Start(*off)).unwrap();
        f.write_all(data).unwrap();
    }
}

/// A local provider with one VM `vm1` whose disk `disk0` is `disk.raw`.
async fn provider_with_disk(root: &Path, size: u64, pieces: &[(u64, Vec<u8>)]) -> LocalProvider {
    let p = LocalProvider::new(root);
    std::fs::create_dir_all(root.join("vm1")).unwrap();
    write_sparse(&root.join("vm1/disk.raw"), size, pieces);
    p.write_vm(
        &VmInfo {
            annotation: None,
            id: "vm1".into(),
            name: "vm1".into(),
            cpus: 2,
            memory_mib: 2048,
            firmware: Firmware::Bios,
            machine: None,
            guest_os: None,
            state: PowerState::Stopped,
            disks: vec![DiskInfo {
                id: "disk0".into(),
                capacity: 0,
                allocation: None,
                format: None,
                bus: Some(DiskBus::Virtio),
                location: "disk.raw".into(),
            }],
            nics: vec![NicInfo {
                mac: Some("52:54:00:12:34:56".into()),
                model: Some("virtio".into()),
                network: Some("default".into()),
            }],
        },
        false,
    )
    .await
    .unwrap();
    p
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_import_round_trip_through_fs_storage() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 64u64 << 20;
    let pieces = vec![
        (4096u64, pattern(1 << 20, 1)),
        (33 << 20, pattern(3 << 20, 2)),
        (size - 100, pattern(100, 3)),
    ];
    let src = provider_with_disk(&tmp.path().join("src"), size, &pieces).await;
    let store = virtrigaud_storage_fs(tmp.path().join("store"));
    let progress_calls = Arc::new(AtomicU64::new(0));
    let pc = progress_calls.clone();
    let mut opts = raw_export();
    opts.pipeline.progress = Some(Arc::new(move |p: &Progress| {
        assert!(p.position <= p.virtual_size);
        pc.fetch_add(1, Ordering::Relaxed);
    }));
    let exp = export_disk(&src, "vm1", "disk0", &*store, "vm1/disk0.raw", &opts)
        .await
        .unwrap();
    assert!(progress_calls.load(Ordering::Relaxed) >= 1);
    let m = &exp.manifest;
    assert_eq!(m.virtual_size, size);
    assert_eq!(m.stored_size, size);
    assert_eq!(m.vm.as_ref().unwrap().nics.len(), 1);
    assert_eq!(m.source.as_ref().unwrap().disk, "disk0");
    // Only the allocated data was read: SEEK_DATA told us where the holes are.
    assert!(
        exp.transfer.data_bytes_read < 8 << 20,
        "{}",
        exp.transfer.data_bytes_read
    );
    let stored = std::fs::read(tmp.path().join("store/vm1/disk0.raw")).unwrap();
    assert_eq!(
        hex(&Sha256::digest(&stored)),
        m.object_digest.value,
        "object digest = sha256sum"
    );
    assert_eq!(reference_digest(&stored), m.content_digest.value);

    let dst = LocalProvider::new(tmp.path().join("dst"));
    let imp = import(&*store, "vm1/disk0.raw", &dst, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(
        imp.transfer.content_digest,
        Some(m.content_digest.value.clone())
    );
    let imported = std::fs::read(tmp.path().join("dst/vm1").join(&imp.location)).unwrap();
    assert_eq!(imported, stored);
    verify_object(&*store, "vm1/disk0.raw", &ImportOptions::default())
        .await
        .unwrap();

    // Importing again refuses to overwrite.
    let e = import(&*store, "vm1/disk0.raw", &dst, &ImportOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
}

/// Export options storing raw objects (tests that check stored bytes directly).
fn raw_export() -> ExportOptions {
    ExportOptions {
        format: DiskFormat::Raw,
        ..Default::default()
    }
}

fn virtrigaud_storage_fs(root: std::path::PathBuf) -> Arc<dyn StorageBackend> {
    Arc::new(virtrigaud::storage::FsBackend::new(root))
}

/// A 16 MiB local disk with 4 MiB of data at 1 MiB (pattern `seed`), exported as a raw object
/// at `a/disk.raw` of a filesystem store: (temp dir, source provider, store).
async fn exported_raw_disk(
    seed: u64,
) -> (tempfile::TempDir, LocalProvider, Arc<dyn StorageBackend>) {
    let tmp = tempfile::tempdir().unwrap();
    let src = provider_with_disk(
        &tmp.path().join("src"),
        16 << 20,
        &[(1 << 20, pattern(4 << 20, seed))],
    )
    .await;
    let store = virtrigaud_storage_fs(tmp.path().join("store"));
    export_disk(&src, "vm1", "disk0", &*store, "a/disk.raw", &raw_export())
        .await
        .unwrap();
    (tmp, src, store)
}

/// Imports the object `key` as disk `disk0` of VM `vm1` into `dst`.
async fn import(
    store: &dyn StorageBackend,
    key: &str,
    dst: &LocalProvider,
    opts: &ImportOptions,
) -> Result<ImportReport> {
    import_disk(store, key, dst, "vm1", "disk0", opts).await
}

/// Import options asking for `format` as the target format.
fn as_format(format: DiskFormat) -> ImportOptions {
    ImportOptions {
        format: Some(format),
        ..Default::default()
    }
}

/// Overwrites the byte at `at` of the file at `path` with 0x5a.
fn flip_byte(path: &std::path::Path, at: u64) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[0x5a]).unwrap();
}

/// An import whose caller verifies the target afterwards hashes no SHA-256 of its own, yet
/// a damaged object still stops it (per-chunk CRC32C) before anything becomes visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_verified_later_skips_its_digests_but_still_refuses_a_damaged_object() {
    let (tmp, _src, store) = exported_raw_disk(9).await;
    let later = ImportOptions {
        verified_later: true,
        ..Default::default()
    };
    let dst = LocalProvider::new(tmp.path().join("dst"));
    let imp = import(&*store, "a/disk.raw", &dst, &later).await.unwrap();
    assert_eq!(imp.transfer.content_digest, None);
    assert_eq!(imp.transfer.content_hashed_bytes, 0);
    let imported = std::fs::read(tmp.path().join("dst/vm1").join(&imp.location)).unwrap();
    assert_eq!(
        imported,
        std::fs::read(tmp.path().join("store/a/disk.raw")).unwrap()
    );

    let obj = tmp.path().join("store/a/disk.raw");
    flip_byte(&obj, 3 << 20);
    let dst2 = LocalProvider::new(tmp.path().join("dst2"));
    let e = import(&*store, "a/disk.raw", &dst2, &later)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");
    assert!(files_under(&tmp.path().join("dst2")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_or_missing_stored_objects_are_refused_and_nothing_is_written() {
    let (tmp, src, store) = exported_raw_disk(7).await;
    let size = 16u64 << 20;
    let obj = tmp.path().join("store/a/disk.raw");
    let dst = LocalProvider::new(tmp.path().join("dst"));

    // one flipped byte in the middle
    flip_byte(&obj, 3 << 20);
    let e = import(&*store, "a/disk.raw", &dst, &ImportOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");
    assert!(
        files_under(&tmp.path().join("dst")).is_empty(),
        "{:?}",
        files_under(&tmp.path().join("dst"))
    );
    let e = verify_object(&*store, "a/disk.raw", &ImportOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChecksumMismatch);

    // truncated object
    let f = std::fs::OpenOptions::new().write(true).open(&obj).unwrap();
    f.set_len(size - 1).unwrap();
    drop(f);
    let e = import(&*store, "a/disk.raw", &dst, &ImportOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");

    // manifest with a wrong digest
    export_disk(&src, "vm1", "disk0", &*store, "b/disk.raw", &raw_export())
        .await
        .unwrap();
    let mpath = tmp.path().join("store").join(manifest_key("b/disk.raw"));
    let text = std::fs::read_to_string(&mpath).unwrap();
    let m: Manifest = Manifest::parse(text.as_bytes()).unwrap();
    let wrong = text.replace(&m.content_digest.value, &"0".repeat(64));
    std::fs::write(&mpath, wrong).unwrap();
    let e = import(&*store, "b/disk.raw", &dst, &ImportOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");

    // malformed and missing manifests
    std::fs::write(&mpath, b"{\"schema_version\": 1, \"format\": ").unwrap();
    let e = import(&*store, "b/disk.raw", &dst, &ImportOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    std::fs::remove_file(&mpath).unwrap();
    let e = import(&*store, "b/disk.raw", &dst, &ImportOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("manifest"), "{e}");
    assert!(files_under(&tmp.path().join("dst")).is_empty());
}

/// A source that yields 1 MiB extents forever, slowly, counting what it produced.
fn endless_source(size: u64, produced: Arc<AtomicU64>) -> DiskContent {
    let stream = futures::stream::unfold(0u64, move |off| {
        let produced = produced.clone();
        async move {
            if off >= size {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            produced.fetch_add(1, Ordering::Relaxed);
            Some((
                Ok(Extent::Data {
                    offset: off,
                    bytes: Bytes::from(vec![0xabu8; 1 << 20]),
                }),
                off + (1 << 20),
            ))
        }
    });
    DiskContent::new(size, None, stream.boxed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_mid_stream_leaves_no_partial_target() {
    let tmp = tempfile::tempdir().unwrap();
    let produced = Arc::new(AtomicU64::new(0));
    let content = endless_source(1 << 40, produced.clone());
    let sink = LocalFileSink::create(tmp.path().join("out.raw"), false)
        .await
        .unwrap();
    let opts = PipelineOptions::default();
    let cancel = opts.cancel.clone();
    let p2 = produced.clone();
    tokio::spawn(async move {
        while p2.load(Ordering::Relaxed) < 20 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        cancel.cancel();
    });
    let e = pipeline::run(
        content,
        Box::new(sink),
        pipeline::Job {
            format: DiskFormat::Raw,
            encode: &EncodeOptions::default(),
            content_digest: true,
            hash_object: true,
            phase: Phase::Export,
            label: "x",
        },
        &opts,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(e.kind(), ErrorKind::Cancelled);
    assert!(produced.load(Ordering::Relaxed) < 1000);
    assert!(
        files_under(tmp.path()).is_empty(),
        "{:?}",
        files_under(tmp.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_export_leaves_no_object_and_no_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 256u64 << 20;
    let src = provider_with_disk(
        &tmp.path().join("src"),
        size,
        &[(0, pattern(size as usize, 5))],
    )
    .await;
    let store = virtrigaud_storage_fs(tmp.path().join("store"));
    let mut opts = raw_export();
    let cancel = opts.pipeline.cancel.clone();
    opts.pipeline.progress_interval = std::time::Duration::ZERO;
    opts.pipeline.progress = Some(Arc::new(move |p: &Progress| {
        if p.data_bytes >= 32 << 20 {
            cancel.cancel();
        }
    }));
    let e = export_disk(&src, "vm1", "disk0", &*store, "c/disk.raw", &opts)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    assert!(
        files_under(&tmp.path().join("store")).is_empty(),
        "{:?}",
        files_under(&tmp.path().join("store"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_gib_disk_with_sixteen_mib_of_data_costs_sixteen_mib() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 64u64 << 30;
    let pieces: Vec<(u64, Vec<u8>)> = (0..16u64)
        .map(|i| (i * (4 << 30) + i * 77 * 4096, pattern(1 << 20, i)))
        .collect();
    let src = provider_with_disk(&tmp.path().join("src"), size, &pieces).await;
    let opened = src.open_disk("vm1", "disk0", None).await.unwrap();
    let (_, content) = format::decode(opened.source, None, &DecodeOptions::default())
        .await
        .unwrap();
    assert_eq!(content.virtual_size, size);
    let alloc = content.allocation.as_ref().map(|a| a.allocated_bytes());
    let Some(alloc) = alloc else {
        eprintln!("SKIP: this file system does not report holes (SEEK_DATA)");
        return;
    };
    assert!(alloc <= 17 << 20, "allocation map says {alloc}");
    // Raw target on a sparse file: no object hash (that would hash 64 GiB of zeros by definition).
    let sink = LocalFileSink::create(tmp.path().join("copy.raw"), false)
        .await
        .unwrap();
    let (report, sink) = pipeline::run(
        content,
        Box::new(sink),
        pipeline::Job {
            format: DiskFormat::Raw,
            encode: &EncodeOptions::default(),
            content_digest: true,
            hash_object: false,
            phase: Phase::Export,
            label: "big",
        },
        &PipelineOptions::default(),
    )
    .await
    .unwrap();
    sink.commit().await.unwrap();
    assert_eq!(
        report.data_bytes_read,
        16 << 20,
        "bytes read from the source"
    );
    // Pieces are not 64 KiB-aligned: each touches at most one extra digest block.
    let hashed = report.content_hashed_bytes;
    assert!(
        (16 << 20..=(16 << 20) + 16 * 65536).contains(&hashed),
        "hashed {hashed} bytes for the content digest"
    );
    assert_eq!(report.allocated_bytes, 16 << 20);
    assert_eq!(report.stored_size, size);
    let meta = std::fs::metadata(tmp.path().join("copy.raw")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 64 << 20,
        "copy is sparse: {} bytes allocated",
        meta.blocks() * 512
    );
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // unknown format (VHDX magic)
    let p = tmp.path().join("x.vhdx");
    std::fs::write(&p, b"vhdxfile\0\0\0\0").unwrap();
    let f = virtrigaud::io::LocalFile::open(&p).await.unwrap();
    let e = format::decode(
        ImageSource::RandomAccess(Arc::new(f)),
        None,
        &DecodeOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    // key with ..
    let store = virtrigaud_storage_fs(tmp.path().join("store"));
    let src = provider_with_disk(&tmp.path().join("src"), 1 << 20, &[(0, vec![1; 10])]).await;
    let e = export_disk(&src, "vm1", "disk0", &*store, "../escape", &raw_export())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // missing VM and disk
    let e = export_disk(&src, "nope", "disk0", &*store, "k", &raw_export())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let e = src.open_disk("vm1", "disk9", None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    // unwritable target: storage root is a file
    std::fs::write(tmp.path().join("file"), b"x").unwrap();
    let bad = virtrigaud_storage_fs(tmp.path().join("file"));
    let e = export_disk(&src, "vm1", "disk0", &*bad, "k", &raw_export())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.kind(),
            ErrorKind::Io | ErrorKind::Permission | ErrorKind::NotFound | ErrorKind::AlreadyExists
        ),
        "{e}"
    );
    assert_eq!(std::fs::read(tmp.path().join("file")).unwrap(), b"x");
    // sequential raw without a size
    let s = ImageSource::Sequential {
        size: None,
        stream: futures::stream::empty().boxed(),
    };
    assert_eq!(
        format::decode(s, None, &DecodeOptions::default())
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
}

/// Wraps a backend so that every GET stream passes through `map` (tests that starve or count
/// the reads).
struct MappedGets {
    inner: Arc<dyn StorageBackend>,
    map: Box<dyn Fn(ByteStream) -> ByteStream + Send + Sync>,
}

impl std::fmt::Debug for MappedGets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MappedGets")
    }
}

impl MappedGets {
    /// Every GET hands out one byte at a time.
    fn one_byte_at_a_time(inner: Arc<dyn StorageBackend>) -> Self {
        MappedGets {
            inner,
            map: Box::new(|s| {
                s.flat_map(|r| match r {
                    Ok(b) => futures::stream::iter(
                        (0..b.len())
                            .map(move |i| Ok(b.slice(i..i + 1)))
                            .collect::<Vec<_>>(),
                    )
                    .left_stream(),
                    Err(e) => futures::stream::iter(vec![Err(e)]).right_stream(),
                })
                .boxed()
            }),
        }
    }

    /// Counts the bytes every GET delivers into `n`.
    fn counting(inner: Arc<dyn StorageBackend>, n: Arc<std::sync::atomic::AtomicU64>) -> Self {
        MappedGets {
            inner,
            map: Box::new(move |s| {
                let n = n.clone();
                s.inspect(move |r| {
                    if let Ok(b) = r {
                        n.fetch_add(b.len() as u64, std::sync::atomic::Ordering::SeqCst);
                    }
                })
                .boxed()
            }),
        }
    }
}

#[async_trait::async_trait]
impl StorageBackend for MappedGets {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn capabilities(&self) -> StorageCapabilities {
        self.inner.capabilities()
    }
    async fn put(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ByteSink>> {
        self.inner.put(key, opts).await
    }
    async fn get(&self, key: &str, range: Option<std::ops::Range<u64>>) -> Result<ByteStream> {
        Ok((self.map)(self.inner.get(key, range).await?))
    }
    async fn stat(&self, key: &str) -> Result<ObjectMeta> {
        self.inner.stat(key).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
}

/// A raw object that is mostly holes is imported by ranged reads of its mapped data (a
/// server never reads the holes), and still gives the disk byte for byte; `verify_object`
/// reads every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_raw_object_is_imported_by_reading_its_mapped_data_only() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 64u64 << 20;
    let src = provider_with_disk(
        &tmp.path().join("src"),
        size,
        &[
            (1 << 20, pattern(1 << 20, 5)),
            (40 << 20, pattern(300_000, 6)),
        ],
    )
    .await;
    let store = virtrigaud_storage_fs(tmp.path().join("store"));
    let exp = export_disk(&src, "vm1", "disk0", &*store, "s/disk.raw", &raw_export())
        .await
        .unwrap();
    let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counting: Arc<dyn StorageBackend> =
        Arc::new(MappedGets::counting(store.clone(), read.clone()));
    let dst = LocalProvider::new(tmp.path().join("dst"));
    let imp = import(&*counting, "s/disk.raw", &dst, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(
        imp.transfer.content_digest,
        Some(exp.manifest.content_digest.value.clone())
    );
    assert_eq!(
        std::fs::read(tmp.path().join("dst/vm1").join(&imp.location)).unwrap(),
        std::fs::read(tmp.path().join("store/s/disk.raw")).unwrap()
    );
    let n = read.swap(0, std::sync::atomic::Ordering::SeqCst);
    assert!(
        n < 4 << 20,
        "the import read {n} bytes of a 64 MiB object with 1.3 MiB of data"
    );
    verify_object(&*counting, "s/disk.raw", &ImportOptions::default())
        .await
        .unwrap();
    // every byte of the object, and its manifest
    let n = read.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (size..size + (64 << 10)).contains(&n),
        "verify_object read {n} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_verifies_a_store_that_returns_one_byte_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 400_000u64;
    let src = provider_with_disk(
        &tmp.path().join("src"),
        size,
        &[(1000, pattern(70_000, 3)), (300_000, pattern(50_000, 4))],
    )
    .await;
    let store = virtrigaud_storage_fs(tmp.path().join("store"));
    let mut opts = raw_export();
    opts.pipeline.chunk_size = 100_000;
    let exp = export_disk(&src, "vm1", "disk0", &*store, "one/disk.raw", &opts)
        .await
        .unwrap();
    let slow: Arc<dyn StorageBackend> = Arc::new(MappedGets::one_byte_at_a_time(store.clone()));
    let dst = LocalProvider::new(tmp.path().join("dst"));
    let imp = import(&*slow, "one/disk.raw", &dst, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(
        imp.transfer.content_digest,
        Some(exp.manifest.content_digest.value)
    );
    assert_eq!(
        std::fs::read(tmp.path().join("dst/vm1").join(&imp.location)).unwrap(),
        std::fs::read(tmp.path().join("store/one/disk.raw")).unwrap()
    );
    // a flipped byte in the third chunk is caught even when bytes trickle in one by one
    let obj = tmp.path().join("store/one/disk.raw");
    let mut data = std::fs::read(&obj).unwrap();
    data[250_000] ^= 1;
    std::fs::write(&obj, &data).unwrap();
    let e = import_disk(
        &*slow,
        "one/disk.raw",
        &dst,
        "vm1",
        "disk1",
        &ImportOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");
    assert!(e.to_string().contains("chunk 2"), "{e}");
    assert!(!tmp.path().join("dst/vm1/disk1.raw").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_gib_disk_exports_to_qcow2_and_back_at_the_cost_of_its_data() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 64u64 << 30;
    let pieces: Vec<(u64, Vec<u8>)> = (0..16u64)
        .map(|i| (i * (4 << 30) + i * 77 * 4096, pattern(1 << 20, 100 + i)))
        .collect();
    let src = provider_with_disk(&tmp.path().join("src"), size, &pieces).await;
    let opened = src.open_disk("vm1", "disk0", None).await.unwrap();
    let ImageSource::RandomAccess(r) = opened.source else {
        panic!("local disks are random access")
    };
    if r.data_ranges().await.unwrap().is_none() {
        eprintln!("SKIP: this file system does not report holes (SEEK_DATA)");
        return;
    }
    let store = virtrigaud_storage_fs(tmp.path().join("store"));
    let exp = export_disk(
        &src,
        "vm1",
        "disk0",
        &*store,
        "big/disk.qcow2",
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    let t = &exp.transfer;
    assert_eq!(exp.manifest.format, DiskFormat::Qcow2);
    assert_eq!(t.data_bytes_read, 16 << 20, "read only the data");
    assert!(
        t.content_hashed_bytes <= (16 << 20) + 16 * 65536,
        "{}",
        t.content_hashed_bytes
    );
    assert!(
        t.stored_size < 24 << 20,
        "qcow2 object is {} bytes",
        t.stored_size
    );
    let stored = std::fs::read(tmp.path().join("store/big/disk.qcow2")).unwrap();
    assert_eq!(stored.len() as u64, t.stored_size);
    assert_eq!(
        hex(&Sha256::digest(&stored)),
        exp.manifest.object_digest.value
    );

    // Import as qcow2: the manifest's allocation map lets the encoder lay out a sparse image.
    let dst = LocalProvider::new(tmp.path().join("dst"));
    let imp = import(
        &*store,
        "big/disk.qcow2",
        &dst,
        &as_format(DiskFormat::Qcow2),
    )
    .await
    .unwrap();
    assert_eq!(
        imp.transfer.content_digest,
        Some(exp.manifest.content_digest.value)
    );
    let len = std::fs::metadata(tmp.path().join("dst/vm1").join(&imp.location))
        .unwrap()
        .len();
    assert!(
        len < 24 << 20,
        "imported qcow2 is {len} bytes; manifest map {:?}",
        exp.manifest.allocation.as_ref().map(|a| a.len())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stored_format_imports_as_every_target_format_with_equal_content_digest() {
    use virtrigaud::format::VmdkSubformat::*;
    let tmp = tempfile::tempdir().unwrap();
    let size = (24u64 << 20) + 12_288; // a multiple of 512, but not of any cluster or grain size
    let pieces = vec![
        (0u64, pattern(70_000, 1)),
        (5 << 20, pattern(2 << 20, 2)),
        (size - 3000, pattern(3000, 3)),
    ];
    let src = provider_with_disk(&tmp.path().join("src"), size, &pieces).await;
    let store = virtrigaud_storage_fs(tmp.path().join("store"));
    let formats = [
        DiskFormat::Raw,
        DiskFormat::Qcow2,
        DiskFormat::Vmdk(StreamOptimized),
        DiskFormat::Vmdk(MonolithicSparse),
    ];
    let mut expected = None;
    for (i, stored) in formats.iter().enumerate() {
        let key = format!("m/disk{i}.{}", stored.extension());
        let exp = export_disk(
            &src,
            "vm1",
            "disk0",
            &*store,
            &key,
            &ExportOptions {
                format: *stored,
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("export as {stored}: {e}"));
        let digest = exp.manifest.content_digest.value.clone();
        assert_eq!(
            expected.get_or_insert(digest.clone()),
            &digest,
            "export as {stored}"
        );
        for (j, target) in formats.iter().enumerate() {
            let dst = LocalProvider::new(tmp.path().join(format!("dst{i}{j}")));
            let imp = import(&*store, &key, &dst, &as_format(*target))
                .await
                .unwrap_or_else(|e| panic!("{stored} -> {target}: {e}"));
            assert_eq!(imp.format, *target);
            assert_eq!(
                imp.transfer.content_digest.as_deref(),
                Some(digest.as_str()),
                "{stored} -> {target}"
            );
            // Re-read the written disk independently through its decoder.
            std::fs::write(
                tmp.path().join(format!("dst{i}{j}/vm1/vm.json")),
                format!(r#"{{"id":"vm1","name":"vm1","cpus":1,"memory_mib":64,"disks":[{{"id":"d","capacity":0,"location":"{}"}}]}}"#, imp.location),
            )
            .unwrap();
            let again = digest_disk(&dst, "vm1", "d", &ImportOptions::default())
                .await
                .unwrap();
            assert_eq!(again, digest, "re-read {stored} -> {target}");
        }
    }
    // A size that is not a whole number of 512-byte sectors: QEMU reads a qcow2 or VMDK size in
    // whole sectors (rounding down), so those formats store it rounded up with zeros, like
    // `qemu-img convert`, and the manifest describes the disk as QEMU reads it. Raw stays exact.
    let odd_size = 1_000_001u64;
    let rounded = 1_000_448u64;
    let odd = provider_with_disk(
        &tmp.path().join("odd"),
        odd_size,
        &[(0, vec![1; 10]), (odd_size - 7, vec![7; 7])],
    )
    .await;
    let mut odd_disk = vec![0u8; rounded as usize];
    odd_disk[..10].fill(1);
    odd_disk[(odd_size - 7) as usize..odd_size as usize].fill(7);
    for (i, stored) in formats.iter().enumerate() {
        let key = format!("odd/disk{i}.{}", stored.extension());
        let exp = export_disk(
            &odd,
            "vm1",
            "disk0",
            &*store,
            &key,
            &ExportOptions {
                format: *stored,
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("export of an odd size as {stored}: {e}"));
        let want = if *stored == DiskFormat::Raw {
            odd_size
        } else {
            rounded
        };
        assert_eq!(exp.manifest.virtual_size, want, "{stored}");
        assert_eq!(
            exp.transfer.padded_from,
            (want != odd_size).then_some(odd_size),
            "{stored}"
        );
        assert_eq!(
            exp.manifest.content_digest.value,
            reference_digest(&odd_disk[..want as usize]),
            "{stored}"
        );
        for (j, target) in formats.iter().enumerate() {
            let dst = LocalProvider::new(tmp.path().join(format!("odd-dst{i}{j}")));
            let imp = import(&*store, &key, &dst, &as_format(*target))
                .await
                .unwrap_or_else(|e| panic!("odd size {stored} -> {target}: {e}"));
            assert_eq!(
                imp.transfer.content_digest.as_deref(),
                Some(exp.manifest.content_digest.value.as_str()),
                "odd size {stored} -> {target}"
            );
            if *target == DiskFormat::Raw {
                let got = std::fs::read(
                    tmp.path()
                        .join(format!("odd-dst{i}{j}/vm1"))
                        .join(&imp.location),
                )
                .unwrap();
                assert!(got == odd_disk[..want as usize], "odd size {stored} -> raw");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_allocation_map_falls_back_to_a_sparse_format() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 256u64 << 20;
    // A sparse stream, as a libvirt volume download delivers it: data, then holes.
    let items: Vec<Extent> = vec![
        Extent::Data {
            offset: 0,
            bytes: Bytes::from(pattern(1 << 20, 1)),
        },
        Extent::Zero {
            offset: 1 << 20,
            len: 100 << 20,
        },
        Extent::Data {
            offset: 101 << 20,
            bytes: Bytes::from(pattern(1 << 20, 2)),
        },
        Extent::Zero {
            offset: 102 << 20,
            len: size - (102 << 20),
        },
    ];
    let source = || ImageSource::Sequential {
        size: Some(size),
        stream: futures::stream::iter(items.clone().into_iter().map(Ok)).boxed(),
    };
    let store = virtrigaud_storage_fs(tmp.path().join("store"));
    let r = export_image(
        source(),
        Some(DiskFormat::Raw),
        &*store,
        "s/a.img",
        None,
        None,
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        r.manifest.format,
        DiskFormat::Vmdk(virtrigaud::format::VmdkSubformat::StreamOptimized)
    );
    assert!(
        r.manifest.stored_size < 4 << 20,
        "{}",
        r.manifest.stored_size
    );
    // Without a fallback, qcow2 is honoured (and stores every cluster).
    let opts = ExportOptions {
        fallback_format: None,
        ..Default::default()
    };
    let r2 = export_image(
        source(),
        Some(DiskFormat::Raw),
        &*store,
        "s/b.img",
        None,
        None,
        &opts,
    )
    .await
    .unwrap();
    assert_eq!(r2.manifest.format, DiskFormat::Qcow2);
    assert_eq!(r2.manifest.content_digest, r.manifest.content_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_qcow2_export_of_a_local_disk_imports_back_with_equal_content_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let size = (48u64 << 20) + 3 * 512;
    let pieces = vec![
        (4096u64, virtrigaud::testdata::text(1, 6 << 20)),
        (10 << 20, pattern(1 << 20, 2)),
        (12 << 20, vec![0u8; 2 << 20]),
        (30 << 20, virtrigaud::testdata::text(3, 3 << 20)),
        (size - 3000, virtrigaud::testdata::text(4, 3000)),
    ];
    let mut flat = vec![0u8; size as usize];
    for (off, d) in &pieces {
        flat[*off as usize..*off as usize + d.len()].copy_from_slice(d);
    }
    let src = provider_with_disk(&tmp.path().join("src"), size, &pieces).await;
    let store = virtrigaud_storage_fs(tmp.path().join("store"));
    let compressed = ExportOptions {
        format: DiskFormat::Qcow2,
        encode: EncodeOptions {
            compress: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let exp = export_disk(&src, "vm1", "disk0", &*store, "c/disk.qcow2", &compressed)
        .await
        .unwrap();
    let m = &exp.manifest;
    assert_eq!(m.format, DiskFormat::Qcow2);
    assert_eq!(m.content_digest.value, reference_digest(&flat));
    let stored = std::fs::read(tmp.path().join("store/c/disk.qcow2")).unwrap();
    assert_eq!(stored.len() as u64, m.stored_size);
    assert_eq!(hex(&Sha256::digest(&stored)), m.object_digest.value);
    // The same export uncompressed is much larger; the compressed one is deterministic.
    let plain = export_disk(
        &src,
        "vm1",
        "disk0",
        &*store,
        "c/plain.qcow2",
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    assert!(
        m.stored_size * 2 < plain.manifest.stored_size,
        "compressed {} vs uncompressed {}",
        m.stored_size,
        plain.manifest.stored_size
    );
    let again = export_disk(&src, "vm1", "disk0", &*store, "c/again.qcow2", &compressed)
        .await
        .unwrap();
    assert_eq!(again.manifest.object_digest, m.object_digest);
    // The stored image has compressed clusters (L2 entries with bit 62) and decodes to the disk.
    let (_, c) = format::decode(
        ImageSource::RandomAccess(Arc::new(
            virtrigaud::io::LocalFile::open(tmp.path().join("store/c/disk.qcow2"))
                .await
                .unwrap(),
        )),
        Some(DiskFormat::Qcow2),
        &DecodeOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(c.read_all().await.unwrap(), flat);
    let l1 = u64::from_be_bytes(stored[40..48].try_into().unwrap()) as usize;
    let l2 = (u64::from_be_bytes(stored[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00)
        as usize;
    let e0 = u64::from_be_bytes(stored[l2..l2 + 8].try_into().unwrap());
    assert_eq!(e0 >> 62, 1, "guest cluster 0 (text) is compressed: {e0:#x}");
    verify_object(&*store, "c/disk.qcow2", &ImportOptions::default())
        .await
        .unwrap();

    // Imports back, verified, as raw and as qcow2.
    for (i, target) in [DiskFormat::Raw, DiskFormat::Qcow2].into_iter().enumerate() {
        let dst = LocalProvider::new(tmp.path().join(format!("dst{i}")));
        let imp = import(&*store, "c/disk.qcow2", &dst, &as_format(target))
            .await
            .unwrap();
        assert_eq!(
            imp.transfer.content_digest.as_deref(),
            Some(m.content_digest.value.as_str())
        );
        std::fs::write(
            tmp.path().join(format!("dst{i}/vm1/vm.json")),
            format!(r#"{{"id":"vm1","name":"vm1","cpus":1,"memory_mib":64,"disks":[{{"id":"d","capacity":0,"location":"{}"}}]}}"#, imp.location),
        )
        .unwrap();
        let digest = digest_disk(&dst, "vm1", "d", &ImportOptions::default())
            .await
            .unwrap();
        assert_eq!(digest, m.content_digest.value, "re-read {target}");
    }

    // A stream cannot be read twice: the fallback format is stored, or without one the export
    // fails before anything is stored.
    // A whole stream: 1 MiB of data, then the rest reported as a hole (a stream that ends
    // early is a cut transfer and fails as Corrupt).
    let stream_source = || ImageSource::Sequential {
        size: Some(size),
        stream: futures::stream::iter(vec![
            Ok(Extent::Data {
                offset: 0,
                bytes: Bytes::from(virtrigaud::testdata::text(5, 1 << 20)),
            }),
            Ok(Extent::Zero {
                offset: 1 << 20,
                len: size - (1 << 20),
            }),
        ])
        .boxed(),
    };
    let r = export_image(
        stream_source(),
        Some(DiskFormat::Raw),
        &*store,
        "s/fallback.img",
        None,
        None,
        &compressed,
    )
    .await
    .unwrap();
    assert_eq!(
        r.manifest.format,
        DiskFormat::Vmdk(virtrigaud::format::VmdkSubformat::StreamOptimized)
    );
    let e = export_image(
        stream_source(),
        Some(DiskFormat::Raw),
        &*store,
        "s/none.img",
        None,
        None,
        &ExportOptions {
            fallback_format: None,
            ..compressed.clone()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(!store.exists("s/none.img").await.unwrap());
}
