//! Disk export and import through storage, with manifests and end-to-end verification.
//!
//! * [`export_disk`]: provider disk → decode → pipeline → stored object in any format, then its
//!   manifest. Order: the old manifest at the key (if any) is deleted, the object committed,
//!   the new manifest written last — a manifest always describes the object beside it, and an
//!   object without a manifest is refused as an incomplete export.
//! * [`import_disk`]: manifest → stored object, verified chunk by chunk while it streams →
//!   decode → encode into the target's format → provider disk. The disk is committed only when
//!   the object SHA-256, every chunk digest and the content digest match the manifest; otherwise
//!   it is aborted and the error is [`ErrorKind::ChecksumMismatch`].
//! * [`verify_object`]: re-reads a stored object and checks it against its manifest.

use crate::digest::{
    CONTENT_ALGORITHM, CONTENT_BLOCK, ChunkChecksums, OBJECT_ALGORITHM, ObjectHasher,
};
use crate::extent::Extent;
use crate::format::{self, DecodeOptions, DiskFormat, EncodeOptions};
use crate::io::{AbortOnDrop, ImageSource, join_err};
use crate::manifest::{
    ChunkDigests, DigestValue, MAX_MANIFEST_BYTES, Manifest, SCHEMA_VERSION, SourceRef,
    manifest_key, now_rfc3339,
};
use crate::pipeline::{self, PipelineOptions, TransferReport};
use crate::progress::Phase;
use crate::provider::{DiskCreateSpec, OpenedDisk, Provider, SnapshotRef};
use crate::storage::{PutOptions, StorageBackend, StorageExt, validate_key};
use crate::{Error, ErrorKind, Result};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

/// Library name and version, as recorded in manifests.
pub const LIBRARY: &str = concat!("virtrigaud ", env!("CARGO_PKG_VERSION"));

/// Options of [`export_disk`].
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Format of the stored object (default qcow2: sparse, and every hypervisor imports it).
    pub format: DiskFormat,
    /// qcow2 and monolithicSparse VMDK lay out their tables before the data, so they need the
    /// source's allocation map up front. A source that cannot tell it (a sequential stream such
    /// as a libvirt volume download) would get every cluster stored; then this format is used
    /// instead (default streamOptimized VMDK, which needs no map and stays sparse). Compressed
    /// qcow2 ([`EncodeOptions::compress`]) needs no map but reads the source twice, so a
    /// sequential source gets this format too. `None` keeps `format` whatever it costs (and
    /// compressed qcow2 from a sequential source fails with `Unsupported`). The manifest
    /// records the format actually stored.
    pub fallback_format: Option<DiskFormat>,
    /// Read from this snapshot (point-in-time) instead of the live disk.
    pub snapshot: Option<SnapshotRef>,
    /// Record the VM's hardware description in the manifest.
    pub include_vm: bool,
    /// Pipeline tuning, progress and cancellation.
    pub pipeline: PipelineOptions,
    /// Decoder options.
    pub decode: DecodeOptions,
    /// Encoder options.
    pub encode: EncodeOptions,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            format: DiskFormat::Qcow2,
            fallback_format: Some(DiskFormat::Vmdk(
                crate::format::VmdkSubformat::StreamOptimized,
            )),
            snapshot: None,
            include_vm: true,
            pipeline: PipelineOptions::default(),
            decode: DecodeOptions::default(),
            encode: EncodeOptions::default(),
        }
    }
}

/// What an export produced.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The manifest stored next to the object.
    pub manifest: Manifest,
    /// Transfer figures.
    pub transfer: TransferReport,
}

/// Exports one disk of a VM to `storage` at `key` (plus `<key>.manifest.json`).
pub async fn export_disk(
    provider: &dyn Provider,
    vm: &str,
    disk: &str,
    storage: &dyn StorageBackend,
    key: &str,
    opts: &ExportOptions,
) -> Result<ExportReport> {
    let span = info_span!("export_disk", provider = provider.kind(), vm, disk, key);
    async {
        validate_key(key)?;
        let ctx = |e: Error| {
            e.with_operation("export_disk")
                .with_vm(vm.to_string())
                .with_disk(disk.to_string())
        };
        let vm_info = if opts.include_vm {
            Some(provider.describe_vm(vm).await.map_err(ctx)?)
        } else {
            None
        };
        let opened = provider
            .open_disk(vm, disk, opts.snapshot.as_ref())
            .await
            .map_err(ctx)?;
        let source = SourceRef {
            provider: provider.kind().into(),
            vm: vm.into(),
            disk: disk.into(),
            snapshot: opts.snapshot.as_ref().map(|s| s.name.clone()),
        };
        export_image(
            opened.source,
            opened.info.format,
            storage,
            key,
            Some(source),
            vm_info,
            opts,
        )
        .await
        .map_err(ctx)
    }
    .instrument(span)
    .await
}

/// Exports any disk image (native bytes from a file, a stream, a URL) to `storage` at `key`,
/// plus its manifest. [`export_disk`] is this with the bytes, source and hardware description
/// taken from a provider.
#[allow(clippy::too_many_arguments)]
pub async fn export_image(
    source: ImageSource,
    format_hint: Option<DiskFormat>,
    storage: &dyn StorageBackend,
    key: &str,
    source_ref: Option<SourceRef>,
    vm_info: Option<crate::provider::VmInfo>,
    opts: &ExportOptions,
) -> Result<ExportReport> {
    validate_key(key)?;
    let ctx = |e: Error| e.with_operation("export_image");
    let (_, content) = format::decode(source, format_hint, &opts.decode)
        .await
        .map_err(ctx)?;
    // Compressed qcow2 reads the source twice (sizing pass, then writing pass) and needs no
    // map; uncompressed qcow2 and monolithicSparse VMDK need the map.
    let compressed_qcow2 = opts.format == DiskFormat::Qcow2 && opts.encode.compress;
    let needs_map = !compressed_qcow2
        && matches!(
            opts.format,
            DiskFormat::Qcow2 | DiskFormat::Vmdk(crate::format::VmdkSubformat::MonolithicSparse)
        );
    let format = match opts.fallback_format {
        Some(fallback) if needs_map && content.allocation.is_none() => {
            tracing::info!(wanted = %opts.format, stored = %fallback,
                "the source cannot tell its allocation map up front: storing the fallback format");
            fallback
        }
        Some(fallback) if compressed_qcow2 && content.replay.is_none() => {
            tracing::info!(wanted = %opts.format, stored = %fallback,
                "compressed qcow2 needs a source that can be read twice: storing the fallback format");
            fallback
        }
        _ => opts.format,
    };
    // An upper bound of the stored size (data, plus format metadata) lets multipart backends
    // choose a part size that fits any disk.
    let bound = content
        .virtual_size
        .saturating_add(content.virtual_size / 64)
        .saturating_add(64 << 20);
    // An encrypted export seals with keys of its own choosing: those of the interrupted
    // upload it resumes, or new ones whose header is kept beside the upload (crate::crypt).
    let mut encode = opts.encode.clone();
    let mut resumed = false;
    if let Some(enc) = &opts.encode.encrypt {
        let (e, r) = crate::crypt::prepare_export(storage, key, enc)
            .await
            .map_err(ctx)?;
        (encode.encrypt, resumed) = (Some(e), r);
    }
    let crypt_state = format!("{key}{}", crate::crypt::RESUME_SUFFIX);
    let put = PutOptions {
        size_hint: Some(bound),
        resume_must_match: resumed,
        ..Default::default()
    };
    let sink = storage
        .put(key, &put)
        .await
        .map_err(|e| ctx(e).with_target(key.to_string()))?;
    let (report, sink) = match pipeline::run(
        content,
        sink,
        pipeline::Job {
            format,
            encode: &encode,
            content_digest: true,
            hash_object: true,
            phase: Phase::Export,
            label: key,
        },
        &opts.pipeline,
    )
    .await
    {
        Ok(r) => r,
        Err(e) if resumed && e.kind() == ErrorKind::Conflict => {
            // The resumed upload holds other ciphertext than this run seals with its key: the
            // source changed. The upload is discarded with the sink; forget its header too, so
            // that the rerun starts over with new keys.
            let _ = storage.delete(&crypt_state).await;
            return Err(ctx(e));
        }
        Err(e) => return Err(ctx(e)),
    };
    let (Some((object_sha, chunks)), Some(content_digest)) =
        (report.object.clone(), report.content_digest.clone())
    else {
        let _ = sink.abort().await;
        return Err(Error::new(ErrorKind::Io, "digest missing"));
    };
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        format,
        virtual_size: report.virtual_size,
        stored_size: report.stored_size,
        allocated_bytes: report.allocated_bytes,
        padded_from: report.padded_from,
        object_digest: DigestValue {
            algorithm: OBJECT_ALGORITHM.into(),
            value: object_sha,
            block_size: None,
        },
        content_digest: DigestValue {
            algorithm: CONTENT_ALGORITHM.into(),
            value: content_digest,
            block_size: Some(CONTENT_BLOCK as u64),
        },
        chunks: ChunkDigests {
            algorithm: crate::digest::CHUNK_ALGORITHM.into(),
            chunk_size: opts.pipeline.chunk_size,
            digests: chunks,
        },
        allocation: Some(
            report
                .allocation
                .aligned(opts.pipeline.zero_block, report.virtual_size)
                .ranges()
                .iter()
                .map(|r| [r.start, r.end])
                .collect(),
        ),
        source: source_ref,
        vm: vm_info,
        encryption: opts.encode.encrypt.as_ref().map(|e| e.info()),
        created: now_rfc3339(),
        library: LIBRARY.into(),
    };
    manifest.check()?;
    let json = manifest.to_json()?;
    if opts.pipeline.cancel.is_cancelled() {
        let _ = sink.abort().await;
        return Err(Error::cancelled());
    }
    // Ordering, so that no reader ever finds a manifest beside an object it does not
    // describe: an older manifest at this key goes first, then the object is committed
    // (atomically, by every backend), then its manifest is written. In between, a reader finds
    // no manifest ("export not completed") and refuses the object.
    match storage.delete(&manifest_key(key)).await {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => {
            let _ = sink.abort().await;
            return Err(ctx(e).with_target(manifest_key(key)));
        }
    }
    sink.commit()
        .await
        .map_err(|e| ctx(e).with_target(key.to_string()))?;
    if let Err(e) = storage
        .put_bytes(&manifest_key(key), Bytes::from(json))
        .await
    {
        let _ = storage.delete(key).await;
        return Err(ctx(e).with_target(manifest_key(key)));
    }
    if opts.encode.encrypt.is_some()
        && storage.capabilities().resume
        && let Err(e) = storage.delete(&crypt_state).await
    {
        tracing::warn!(key = %crypt_state, error = %e, "could not remove the finished export's encryption header copy");
    }
    info!(
        stored = report.stored_size,
        allocated = report.allocated_bytes,
        content = %manifest.content_digest.value,
        "disk exported"
    );
    Ok(ExportReport {
        manifest,
        transfer: report,
    })
}

/// The object stored at `key` as a random-access image source, with its manifest: ranged
/// reads of the store, decrypted chunk by chunk when the manifest says the object is encrypted
/// (a missing or wrong identity is `Auth` here, before any read of the payload). For readers
/// that seek: [`format::decode`] of such a source reads a qcow2's or VMDK's tables and only
/// the clusters it needs. The manifest's digests are not checked here ([`verify_object`]
/// does that); an encrypted chunk is authenticated whenever it is read.
pub async fn open_staged(
    storage: Arc<dyn StorageBackend>,
    key: &str,
    decrypt: Option<&crate::crypt::Decryption>,
) -> Result<(Manifest, ImageSource)> {
    use crate::io::ReadAt as _;
    let manifest = read_manifest(&*storage, key).await?;
    if !storage.capabilities().ranged_read {
        return Err(Error::unsupported(format!(
            "{} cannot read by range",
            storage.location()
        )));
    }
    let reader = crate::storage::StorageReader::open(storage, key).await?;
    if reader.size() != manifest.stored_size {
        return Err(Error::corrupt(format!(
            "{key} holds {} bytes, its manifest says {}",
            reader.size(),
            manifest.stored_size
        )));
    }
    let source = ImageSource::RandomAccess(Arc::new(reader));
    let source = match (&manifest.encryption, decrypt) {
        (Some(info), Some(d)) => crate::crypt::decrypt_source(source, d, info).await?,
        (Some(info), None) => return Err(crate::crypt::missing_identity(info, key)),
        (None, _) => source,
    };
    Ok((manifest, source))
}

/// Reads and checks the manifest of the object at `key`.
pub async fn read_manifest(storage: &dyn StorageBackend, key: &str) -> Result<Manifest> {
    validate_key(key)?;
    let mkey = manifest_key(key);
    let data = storage
        .get_bytes(&mkey, MAX_MANIFEST_BYTES)
        .await
        .map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                Error::not_found(format!(
                    "no manifest for {key}: expected {mkey} next to it (was the export completed?)"
                ))
            } else {
                e.with_target(mkey.clone())
            }
        })?;
    Manifest::parse(&data).map_err(|e| e.with_target(mkey))
}

/// Outcome of a streamed verification.
struct VerifyState {
    mismatch: Option<String>,
}

/// The checks [`verify_stream`] makes: chunk CRC32Cs, and the whole SHA-256 unless the
/// caller proves the result another way ([`ImportOptions::verified_later`]).
enum StreamHasher {
    Whole(ObjectHasher),
    Chunks(ChunkChecksums),
}

impl StreamHasher {
    fn update(&mut self, data: &[u8]) {
        match self {
            StreamHasher::Whole(h) => h.update(data),
            StreamHasher::Chunks(c) => c.update(data),
        }
    }

    fn update_zeros(&mut self, len: u64) {
        match self {
            StreamHasher::Whole(h) => h.update_zeros(len),
            StreamHasher::Chunks(c) => c.update_zeros(len),
        }
    }

    fn completed_chunks(&self) -> &[String] {
        match self {
            StreamHasher::Whole(h) => h.completed_chunks(),
            StreamHasher::Chunks(c) => c.completed(),
        }
    }

    /// (object SHA-256 when computed, chunk digests)
    fn finish(self) -> (Option<String>, Vec<String>) {
        match self {
            StreamHasher::Whole(h) => {
                let (sha, chunks) = h.finish();
                (Some(sha), chunks)
            }
            StreamHasher::Chunks(c) => (None, c.finish()),
        }
    }
}

/// Streams the object (as [`object_feeder`] reads it) through its chunk digests and (with
/// `whole`) its whole SHA-256, forwarding the extents to `tx`. Stops early (at a chunk
/// boundary) when `stop` fires, and forwards an error when a chunk does not match so the
/// consumer stops.
async fn verify_stream(
    mut stream: tokio::sync::mpsc::Receiver<Result<Extent>>,
    manifest: Manifest,
    whole: bool,
    tx: tokio::sync::mpsc::Sender<Result<Extent>>,
    state: Arc<Mutex<VerifyState>>,
    stop: CancellationToken,
) -> Result<bool> {
    let chunk = manifest.chunks.chunk_size;
    let mut h = if whole {
        StreamHasher::Whole(ObjectHasher::new(chunk))
    } else {
        StreamHasher::Chunks(ChunkChecksums::new(chunk))
    };
    let mut checked = 0usize;
    let mut pos = 0u64;
    let mut forward = true;
    let fail = |why: String| {
        if let Ok(mut s) = state.lock() {
            s.mismatch.get_or_insert(why.clone());
        }
        Error::new(ErrorKind::ChecksumMismatch, why)
    };
    while let Some(e) = stream.recv().await {
        let e = match e {
            Ok(e) => e,
            Err(err) => {
                // A read error reaches the decoder as it is (its kind tells a retry from a
                // refusal), not as a stream that ended too early.
                let copy = Error::new(err.kind(), err.to_string());
                let _ = tx.send(Err(err)).await;
                return Err(copy);
            }
        };
        if e.offset() != pos {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "object read out of order at {} (expected {pos})",
                    e.offset()
                ),
            ));
        }
        if pos + e.len() > manifest.stored_size {
            let e = fail(format!(
                "stored object is longer than the {} bytes its manifest records",
                manifest.stored_size
            ));
            let _ = tx.send(Err(fail(e.message().to_string()))).await;
            return Err(e);
        }
        // The SHA-256 of a large piece goes to a blocking worker; CRC32C alone runs at many
        // GB/s and stays here.
        if whole && e.len() >= 256 << 10 {
            let e2 = e.clone();
            h = tokio::task::spawn_blocking(move || {
                match &e2 {
                    Extent::Data { bytes, .. } => h.update(bytes),
                    Extent::Zero { len, .. } => h.update_zeros(*len),
                }
                h
            })
            .await
            .map_err(join_err)?;
        } else {
            match &e {
                Extent::Data { bytes, .. } => h.update(bytes),
                Extent::Zero { len, .. } => h.update_zeros(*len),
            }
        }
        let done = h.completed_chunks();
        while checked < done.len() {
            if manifest.chunks.digests.get(checked) != Some(&done[checked]) {
                let e = fail(format!(
                    "chunk {checked} (bytes {}..{}) does not match its manifest digest",
                    checked as u64 * chunk,
                    (checked as u64 + 1) * chunk
                ));
                let _ = tx.send(Err(fail(e.message().to_string()))).await;
                return Err(e);
            }
            checked += 1;
            if stop.is_cancelled() {
                return Ok(false);
            }
        }
        let len = e.len();
        if forward && tx.send(Ok(e)).await.is_err() {
            forward = false; // the decoder has all it needs; keep hashing to the end
        }
        pos += len;
    }
    drop(tx);
    if pos != manifest.stored_size {
        return Err(fail(format!(
            "stored object has {pos} bytes, its manifest records {}",
            manifest.stored_size
        )));
    }
    let (sha, chunks) = h.finish();
    if chunks.last() != manifest.chunks.digests.last() {
        return Err(fail("last chunk does not match its manifest digest".into()));
    }
    if let Some(sha) = sha
        && sha != manifest.object_digest.value
    {
        return Err(fail(format!(
            "object SHA-256 {sha} differs from the manifest's {}",
            manifest.object_digest.value
        )));
    }
    Ok(true)
}

/// Options of [`import_disk`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Preferred format on the target (the provider may choose).
    pub format: Option<DiskFormat>,
    /// Pool, storage or datastore on the target.
    pub placement: Option<String>,
    /// Replace an existing disk of the same name.
    pub overwrite: bool,
    /// Pipeline tuning, progress and cancellation.
    pub pipeline: PipelineOptions,
    /// Decoder options.
    pub decode: DecodeOptions,
    /// Encoder options.
    pub encode: EncodeOptions,
    /// Identities for an object stored encrypted (see [`crate::crypt`]); without them such an
    /// object is an `Auth` error before anything is created.
    pub decrypt: Option<crate::crypt::Decryption>,
    /// The caller proves the written disk afterwards, by re-reading it from the target and
    /// comparing its content digest with the manifest's (the migration runner's verify step
    /// does). The import then checks the stored object's size and per-chunk CRC32Cs as it
    /// reads, so a damaged object still stops it early, but computes neither the object
    /// SHA-256 nor the content digest of what it writes: two SHA-256 passes over the data
    /// saved, and the later re-read is the stronger proof of the two (it covers the target's
    /// own write path). Default `false`: the import proves both itself.
    pub verified_later: bool,
}

/// What an import produced.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The manifest the import was verified against.
    pub manifest: Manifest,
    /// Location of the new disk on the target (for [`VmDiskSpec`](crate::VmDiskSpec)).
    pub location: String,
    /// Format of the new disk.
    pub format: DiskFormat,
    /// Transfer figures.
    pub transfer: TransferReport,
}

/// Imports the stored disk at `key` into `provider` as disk `name` of VM `vm`, verified
/// against its manifest before it becomes visible.
///
/// A raw, unencrypted object whose manifest maps its data is read by ranges when at least a
/// quarter of it is holes: what lies outside the map is zeros by the manifest's word and is
/// written as zeros, so the server never reads the holes; the content digest still proves
/// the disk, and the object digest is computed over those zeros ([`verify_object`] reads
/// every byte).
pub async fn import_disk(
    storage: &dyn StorageBackend,
    key: &str,
    provider: &dyn Provider,
    vm: &str,
    name: &str,
    opts: &ImportOptions,
) -> Result<ImportReport> {
    let span = info_span!(
        "import_disk",
        provider = provider.kind(),
        vm,
        disk = name,
        key
    );
    async {
        let manifest = read_manifest(storage, key).await?;
        if let Some(enc) = &manifest.encryption
            && opts.decrypt.is_none()
        {
            return Err(crate::crypt::missing_identity(enc, key));
        }
        let meta = storage
            .stat(key)
            .await
            .map_err(|e| e.with_target(key.to_string()))?;
        if meta.size != manifest.stored_size {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "stored object is {} bytes, its manifest records {}",
                    meta.size, manifest.stored_size
                ),
            )
            .with_target(key.to_string()));
        }
        let stop = CancellationToken::new();
        let (feed_tx, source, verifier, state) =
            verified_source(&manifest, !opts.verified_later, stop.clone());
        let (_whole_read, feeder) = object_feeder(
            storage,
            key,
            manifest.stored_size,
            sparse_reads(&manifest),
            feed_tx,
        )
        .await?;
        with_feeder(
            import_fed(
                manifest, provider, vm, name, key, opts, source, verifier, state, stop,
            ),
            feeder,
        )
        .await
    }
    .instrument(span)
    .await
}

/// [`import_disk`]'s work on the object fed to `source`: decode, create the disk, write it
/// through the pipeline, and commit it only when the verifier and the content digest agree.
#[allow(clippy::too_many_arguments)]
async fn import_fed(
    manifest: Manifest,
    provider: &dyn Provider,
    vm: &str,
    name: &str,
    key: &str,
    opts: &ImportOptions,
    source: ImageSource,
    verifier: AbortOnDrop<Result<bool>>,
    state: Arc<Mutex<VerifyState>>,
    stop: CancellationToken,
) -> Result<ImportReport> {
    let mismatch =
        |state: &Arc<Mutex<VerifyState>>| state.lock().ok().and_then(|s| s.mismatch.clone());
    let result = async {
        let source = match (&manifest.encryption, &opts.decrypt) {
            (Some(info), Some(d)) => crate::crypt::decrypt_source(source, d, info).await?,
            _ => source,
        };
        let (_, mut content) = format::decode(source, Some(manifest.format), &opts.decode).await?;
        if content.allocation.is_none() {
            // A stream cannot tell where the data is before it arrives; the manifest can.
            // Aligned out to the zero-detection block: a block holding any data at export
            // holds it now, and zero detection hands the encoder whole blocks.
            content.allocation = manifest
                .allocation_map()
                .map(|m| m.aligned(opts.pipeline.zero_block, manifest.virtual_size));
        }
        if content.virtual_size != manifest.virtual_size {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "decoded virtual size {} differs from the manifest's {}",
                    content.virtual_size, manifest.virtual_size
                ),
            ));
        }
        let created = provider
            .create_disk(&DiskCreateSpec {
                vm: vm.to_string(),
                name: name.to_string(),
                capacity: manifest.virtual_size,
                format: opts.format,
                placement: opts.placement.clone(),
                overwrite: opts.overwrite,
            })
            .await?;
        let (report, sink) = pipeline::run(
            content,
            created.sink,
            pipeline::Job {
                format: created.format,
                encode: &opts.encode,
                content_digest: !opts.verified_later,
                hash_object: false,
                phase: Phase::Import,
                label: name,
            },
            &opts.pipeline,
        )
        .await?;
        Ok((report, sink, created.location, created.format))
    }
    .await;
    let (report, sink, location, fmt) = match result {
        Ok(v) => v,
        Err(e) => {
            stop.cancel();
            let _ = verifier.await;
            if let Some(why) = mismatch(&state) {
                return Err(Error::new(ErrorKind::ChecksumMismatch, why)
                    .with_target(key.to_string())
                    .with_operation("import_disk"));
            }
            return Err(e.with_operation("import_disk").with_target(key.to_string()));
        }
    };
    let verified = verifier.await.map_err(join_err).and_then(|r| r);
    let content_ok = opts.verified_later
        || report.content_digest.as_deref() == Some(manifest.content_digest.value.as_str());
    match verified {
        Ok(true) if content_ok => {
            sink.commit().await?;
            info!(location = %location, "disk imported and verified");
            Ok(ImportReport {
                manifest,
                location,
                format: fmt,
                transfer: report,
            })
        }
        Ok(_) => {
            let _ = sink.abort().await;
            Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "content digest {} differs from the manifest's {}",
                    report.content_digest.as_deref().unwrap_or("(none)"),
                    manifest.content_digest.value
                ),
            )
            .with_target(key.to_string()))
        }
        Err(e) => {
            let _ = sink.abort().await;
            Err(e.with_target(key.to_string()).with_operation("import_disk"))
        }
    }
}

/// Re-reads the object at `key` and checks its size, SHA-256, chunk digests and content digest
/// against its manifest, without writing anything.
pub async fn verify_object(
    storage: &dyn StorageBackend,
    key: &str,
    opts: &ImportOptions,
) -> Result<Manifest> {
    let manifest = read_manifest(storage, key).await?;
    let decrypt = match (&manifest.encryption, &opts.decrypt) {
        (Some(info), Some(d)) => Some((info, d)),
        (Some(info), None) => return Err(crate::crypt::missing_identity(info, key)),
        _ => None,
    };
    let stop = CancellationToken::new();
    let (feed_tx, source, verifier, state) = verified_source(&manifest, true, stop.clone());
    // Read whole: this proves the stored object itself, holes included.
    let (_whole_read, feeder) =
        object_feeder(storage, key, manifest.stored_size, None, feed_tx).await?;
    with_feeder(
        check_object(&manifest, key, opts, decrypt, source, verifier, state, stop),
        feeder,
    )
    .await?;
    Ok(manifest)
}

/// [`verify_object`]'s check of the object fed to `source`.
#[allow(clippy::too_many_arguments)]
async fn check_object(
    manifest: &Manifest,
    key: &str,
    opts: &ImportOptions,
    decrypt: Option<(&crate::crypt::EncryptionInfo, &crate::crypt::Decryption)>,
    source: ImageSource,
    verifier: AbortOnDrop<Result<bool>>,
    state: Arc<Mutex<VerifyState>>,
    stop: CancellationToken,
) -> Result<()> {
    let digest = async {
        let source = match decrypt {
            Some((info, d)) => crate::crypt::decrypt_source(source, d, info).await?,
            None => source,
        };
        let (_, content) = format::decode(source, Some(manifest.format), &opts.decode).await?;
        content_digest_of(content, &opts.pipeline, key).await
    }
    .await;
    let digest = match digest {
        Ok(d) => d,
        Err(e) => {
            stop.cancel();
            let _ = verifier.await;
            if let Some(why) = state.lock().ok().and_then(|s| s.mismatch.clone()) {
                return Err(
                    Error::new(ErrorKind::ChecksumMismatch, why).with_target(key.to_string())
                );
            }
            return Err(e);
        }
    };
    verifier.await.map_err(join_err)??;
    if digest != manifest.content_digest.value {
        return Err(Error::new(
            ErrorKind::ChecksumMismatch,
            format!(
                "content digest {digest} differs from the manifest's {}",
                manifest.content_digest.value
            ),
        ));
    }
    Ok(())
}

/// Computes the content digest of a provider's disk by reading it (holes are skipped where
/// the source knows them). Used to prove a migrated disk equals its source.
pub async fn digest_disk(
    provider: &dyn Provider,
    vm: &str,
    disk: &str,
    opts: &ImportOptions,
) -> Result<String> {
    let opened = provider.open_disk(vm, disk, None).await?;
    digest_opened_disk(opened, opts).await
}

/// Computes the content digest of an opened disk (see [`digest_disk`]).
pub async fn digest_opened_disk(opened: OpenedDisk, opts: &ImportOptions) -> Result<String> {
    let (_, content) = format::decode(opened.source, opened.info.format, &opts.decode).await?;
    content_digest_of(content, &opts.pipeline, &opened.info.id).await
}

/// The content digest of decoded content, zero-detected like the pipeline does it.
/// Reads count against the transfer's bandwidth caps and are reported as `Verify` progress.
async fn content_digest_of(
    content: crate::extent::DiskContent,
    opts: &PipelineOptions,
    label: &str,
) -> Result<String> {
    let data_total = content.allocation.as_ref().map(|a| a.allocated_bytes());
    let mut reporter = crate::progress::Reporter::new(
        opts.progress.clone(),
        opts.progress_interval,
        crate::progress::Phase::Verify,
        label.to_string(),
        content.virtual_size,
        data_total,
    );
    let mut digester = crate::digest::ContentDigester::new(content.virtual_size, opts.parallelism);
    let mut ex = content.extents;
    while let Some(e) = ex.next().await {
        if opts.cancel.is_cancelled() {
            return Err(Error::cancelled());
        }
        let e = e?;
        if e.is_data() {
            crate::limit::consume_or_cancel(&opts.bandwidth, e.len(), &opts.cancel).await?;
        }
        reporter.advance(e.end(), if e.is_data() { e.len() } else { 0 });
        for piece in crate::extent::zero_detect(e, opts.zero_block) {
            digester.update(&piece).await?;
        }
    }
    let d = digester.finish().await?;
    reporter.finish();
    Ok(d)
}

/// Gaps between the mapped data of a raw object shorter than this are read as they are: one
/// ranged read fewer is worth more than a few MiB of zeros.
const SPARSE_MIN_GAP: u64 = 8 << 20;
/// Most ranged reads that replace one whole read of an object.
const SPARSE_MAX_READS: usize = 1024;

/// The ranges of a stored object worth reading, when it is a raw, unencrypted object whose
/// manifest maps its data and whose holes are at least a quarter of it; `None`: read it
/// whole. Everything outside the ranges is zeros by the manifest's map, and is written as
/// zeros: the content digest proves the result, and a server never reads the holes (a
/// ganesha export zero-fills a page-cache page for every hole byte read, which made the
/// first import of a just-exported sparse object 1.7× slower than the second).
fn sparse_reads(manifest: &Manifest) -> Option<Vec<std::ops::Range<u64>>> {
    if manifest.format != DiskFormat::Raw || manifest.encryption.is_some() {
        return None;
    }
    let size = manifest.stored_size;
    let mut reads: Vec<std::ops::Range<u64>> = Vec::new();
    for [s, e] in manifest.allocation.as_ref()? {
        let (s, e) = ((*s).min(size), (*e).min(size));
        if s >= e {
            continue;
        }
        match reads.last_mut() {
            Some(last) if s <= last.end.saturating_add(SPARSE_MIN_GAP) => {
                last.end = last.end.max(e)
            }
            _ => reads.push(s..e),
        }
    }
    let read: u64 = reads.iter().map(|r| r.end - r.start).sum();
    (reads.len() <= SPARSE_MAX_READS && read <= size / 4 * 3).then_some(reads)
}

/// Forwards `stream` (object bytes from offset `pos`) to `tx` as data extents; returns the
/// offset reached, or `None` when the receiver is gone or a read failed (the error is
/// forwarded).
async fn forward_bytes(
    mut stream: crate::io::ByteStream,
    mut pos: u64,
    tx: &tokio::sync::mpsc::Sender<Result<Extent>>,
) -> Option<u64> {
    while let Some(b) = stream.next().await {
        let item = b.map(|bytes| {
            let offset = pos;
            pos += bytes.len() as u64;
            Extent::Data { offset, bytes }
        });
        let failed = item.is_err();
        if tx.send(item).await.is_err() || failed {
            return None;
        }
    }
    Some(pos)
}

/// Ranged reads of `reads` (see [`sparse_reads`]) into `tx`, with zero extents between them
/// up to `size`. Ends early, quietly, when the receiver is gone; a read error is forwarded.
async fn feed_ranges(
    storage: &dyn StorageBackend,
    key: &str,
    size: u64,
    reads: Vec<std::ops::Range<u64>>,
    tx: tokio::sync::mpsc::Sender<Result<Extent>>,
) {
    let mut pos = 0u64;
    for range in reads.into_iter().chain(std::iter::once(size..size)) {
        if range.start > pos {
            let zero = Extent::Zero {
                offset: pos,
                len: range.start - pos,
            };
            if tx.send(Ok(zero)).await.is_err() {
                return;
            }
            pos = range.start;
        }
        if range.is_empty() {
            continue;
        }
        let stream = match storage.get(key, Some(range)).await {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e.with_target(key.to_string()))).await;
                return;
            }
        };
        match forward_bytes(stream, pos, &tx).await {
            Some(p) => pos = p,
            None => return,
        }
    }
}

/// The reads that feed a verifying read of the object at `key` to `tx`: a whole read runs on
/// a task of its own (returned, aborted when dropped); ranged reads ([`sparse_reads`]), which
/// borrow the store, run in the returned future, which the caller drives beside its own work
/// ([`with_feeder`]).
async fn object_feeder<'a>(
    storage: &'a dyn StorageBackend,
    key: &'a str,
    size: u64,
    reads: Option<Vec<std::ops::Range<u64>>>,
    tx: tokio::sync::mpsc::Sender<Result<Extent>>,
) -> Result<(Option<AbortOnDrop<()>>, futures::future::BoxFuture<'a, ()>)> {
    match reads {
        None => {
            let stream = storage
                .get(key, None)
                .await
                .map_err(|e| e.with_target(key.to_string()))?;
            let task = AbortOnDrop(tokio::spawn(async move {
                let _ = forward_bytes(stream, 0, &tx).await;
            }));
            Ok((Some(task), Box::pin(futures::future::ready(()))))
        }
        Some(reads) => Ok((None, Box::pin(feed_ranges(storage, key, size, reads, tx)))),
    }
}

/// Runs `main` while driving `feeder` beside it, in this task (the feeder borrows the store).
async fn with_feeder<T>(main: impl Future<Output = T>, feeder: impl Future<Output = ()>) -> T {
    tokio::pin!(main);
    tokio::pin!(feeder);
    let mut fed = false;
    loop {
        tokio::select! {
            biased;
            r = &mut main => return r,
            () = &mut feeder, if !fed => fed = true,
        }
    }
}

/// A stored object's extents (fed to the returned sender by [`object_feeder`]) wrapped by
/// [`verify_stream`] on its own task: the sender, the image source a decoder reads, the
/// verifier's handle, and its mismatch record.
#[allow(clippy::type_complexity)]
fn verified_source(
    manifest: &Manifest,
    whole: bool,
    stop: CancellationToken,
) -> (
    tokio::sync::mpsc::Sender<Result<Extent>>,
    ImageSource,
    AbortOnDrop<Result<bool>>,
    Arc<Mutex<VerifyState>>,
) {
    let (feed_tx, stream) = tokio::sync::mpsc::channel::<Result<Extent>>(4);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Extent>>(4);
    let state = Arc::new(Mutex::new(VerifyState { mismatch: None }));
    // Aborted when dropped: an import whose future is dropped stops reading the object.
    let verifier = AbortOnDrop(tokio::spawn(verify_stream(
        stream,
        manifest.clone(),
        whole,
        tx,
        state.clone(),
        stop,
    )));
    let source = ImageSource::Sequential {
        size: Some(manifest.stored_size),
        stream: futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed(),
    };
    (feed_tx, source, verifier, state)
}
