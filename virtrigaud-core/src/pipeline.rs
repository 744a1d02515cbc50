//! The streaming transfer pipeline: read → zero-detect → content digest → encode → object
//! digest → write, in one pass.
//!
//! Stages run concurrently, linked by a bounded channel (back-pressure), so memory is bounded by
//! [`PipelineOptions`] whatever the disk size: roughly `queue_depth × read size` of extents in
//! flight, plus the content digester's batches (`2 × parallelism × 4 MiB`, shared buffers, no
//! copies), plus one chunk being hashed and written. SHA-256 work runs on blocking workers beside
//! the I/O: the content digest in parallel batches, the object digest overlapping the write of
//! the same chunk. Cancelling the token aborts the sink, so nothing partial remains.

use crate::digest::{ContentDigester, ObjectHasher};
use crate::extent::{AllocationBuilder, AllocationMap, DiskContent, Extent, zero_detect};
use crate::format::{Chunk, DiskFormat, EncodeOptions};
use crate::io::{ByteSink, join_err};
use crate::progress::{Phase, ProgressFn, Reporter};
use crate::{Error, Result};
use futures::StreamExt;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span};

/// Chunks smaller than this are hashed inline rather than on a blocking worker.
const INLINE_HASH: usize = 256 << 10;

/// Tuning and hooks of one transfer.
#[derive(Clone)]
pub struct PipelineOptions {
    /// Chunk size of the per-chunk digests of the stored object (default 8 MiB).
    pub chunk_size: u64,
    /// Granularity of zero detection on data (default 64 KiB).
    pub zero_block: u64,
    /// Extents queued between the reader and the encoder (default 4).
    pub queue_depth: usize,
    /// Hashing workers (default: the number of cores).
    pub parallelism: usize,
    /// Progress callback.
    pub progress: Option<ProgressFn>,
    /// Minimum time between two progress reports (default 250 ms).
    pub progress_interval: Duration,
    /// Cancels the transfer; the sink is aborted.
    pub cancel: CancellationToken,
}

impl std::fmt::Debug for PipelineOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineOptions")
            .field("chunk_size", &self.chunk_size)
            .field("zero_block", &self.zero_block)
            .field("queue_depth", &self.queue_depth)
            .field("parallelism", &self.parallelism)
            .finish_non_exhaustive()
    }
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            chunk_size: 8 << 20,
            zero_block: 64 << 10,
            queue_depth: 4,
            parallelism: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            progress: None,
            progress_interval: Duration::from_millis(250),
            cancel: CancellationToken::new(),
        }
    }
}

/// What a transfer moved and proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferReport {
    /// Format written.
    pub format: DiskFormat,
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Bytes written to the sink (holes included).
    pub stored_size: u64,
    /// Data bytes the source delivered (holes it reported excluded).
    pub data_bytes_read: u64,
    /// Non-zero data bytes after zero detection.
    pub allocated_bytes: u64,
    /// Where the non-zero data is (coarsened upper bound, see [`AllocationBuilder`]).
    pub allocation: AllocationMap,
    /// Bytes the content digest actually hashed.
    pub content_hashed_bytes: u64,
    /// Content digest (hex).
    pub content_digest: String,
    /// SHA-256 of the written bytes and per-chunk digests, when requested.
    pub object: Option<(String, Vec<String>)>,
    /// Wall time.
    pub elapsed: Duration,
}

/// What one transfer writes.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    /// Output format.
    pub format: DiskFormat,
    /// Encoder options.
    pub encode: &'a EncodeOptions,
    /// Compute the SHA-256 and chunk digests of the output (for stored objects).
    pub hash_object: bool,
    /// Phase reported in progress.
    pub phase: Phase,
    /// What moves (disk id or key), for progress and logs.
    pub label: &'a str,
}

/// Runs one transfer: encodes `content` as `job.format` into `sink`, computing the digests on
/// the way. On success the sink is returned **uncommitted**, so the caller decides (after
/// verifying) whether to commit or abort. On error or cancellation the sink has been aborted.
pub async fn run(
    content: DiskContent,
    mut sink: Box<dyn ByteSink>,
    job: Job<'_>,
    opts: &PipelineOptions,
) -> Result<(TransferReport, Box<dyn ByteSink>)> {
    let Job {
        format,
        encode: encode_opts,
        hash_object,
        phase,
        label,
    } = job;
    let span = info_span!("transfer", disk = label, format = %format, phase = ?phase);
    let res = run_inner(
        content,
        format,
        encode_opts,
        &mut sink,
        hash_object,
        phase,
        label,
        opts,
    )
    .instrument(span)
    .await;
    match res {
        Ok(r) => Ok((r, sink)),
        Err(e) => {
            if let Err(abort_err) = sink.abort().await {
                tracing::warn!(error = %abort_err, "aborting the sink failed");
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_inner(
    content: DiskContent,
    format: DiskFormat,
    encode_opts: &EncodeOptions,
    sink: &mut Box<dyn ByteSink>,
    hash_object: bool,
    phase: Phase,
    label: &str,
    opts: &PipelineOptions,
) -> Result<TransferReport> {
    let start = Instant::now();
    let virtual_size = content.virtual_size;
    let allocation = content.allocation.clone();
    let data_total = allocation.as_ref().map(|a| a.allocated_bytes());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Extent>>(opts.queue_depth.max(1));
    let cancel = opts.cancel.clone();
    let mut reporter = Reporter::new(
        opts.progress.clone(),
        opts.progress_interval,
        phase,
        label.to_string(),
        virtual_size,
        data_total,
    );

    // Stage 1: read, zero-detect, content digest, hand extents to the encoder.
    let source = async {
        // The object digest is one sequential SHA-256 stream on the critical path: leave it a
        // core of its own, and give the (parallel) content digest the others.
        let digest_workers = if hash_object {
            opts.parallelism.saturating_sub(1).max(1)
        } else {
            opts.parallelism
        };
        let mut digester = ContentDigester::new(virtual_size, digest_workers);
        let mut extents = content.validated().extents;
        let (mut read, mut allocated) = (0u64, 0u64);
        let mut alloc = AllocationBuilder::new(opts.zero_block, 65_536);
        loop {
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Error::cancelled()),
                n = extents.next() => n,
            };
            let Some(item) = next else { break };
            let e = item?;
            if e.is_data() {
                read += e.len();
            }
            reporter.advance(e.end(), if e.is_data() { e.len() } else { 0 });
            for piece in zero_detect(e, opts.zero_block) {
                if piece.is_data() {
                    allocated += piece.len();
                    alloc.add(piece.offset()..piece.end());
                }
                digester.update(&piece).await?;
                if tx.send(Ok(piece)).await.is_err() {
                    return Err(Error::new(crate::ErrorKind::Io, "encoder stopped early"));
                }
            }
        }
        drop(tx);
        let hashed = digester.hashed_bytes();
        let digest = digester.finish().await?;
        Ok::<_, Error>((read, allocated, hashed, digest, alloc.finish()))
    };

    // Stage 2: encode, hash the output, write it.
    let encoded = DiskContent {
        virtual_size,
        allocation,
        extents: tokio_stream_from(rx),
    };
    let cancel2 = opts.cancel.clone();
    let chunk_size = opts.chunk_size;
    let writer = async move {
        let mut chunks = crate::format::encode(encoded, format, encode_opts)?;
        let mut hasher = hash_object.then(|| ObjectHasher::new(chunk_size));
        let mut stored = 0u64;
        loop {
            let next = tokio::select! {
                biased;
                _ = cancel2.cancelled() => return Err(Error::cancelled()),
                n = chunks.next() => n,
            };
            let Some(c) = next else { break };
            let c = c?;
            stored += c.len();
            match (c, hasher.take()) {
                (Chunk::Data(b), Some(mut h)) if b.len() < INLINE_HASH => {
                    h.update(&b);
                    hasher = Some(h);
                    sink.write(b).await?;
                }
                (Chunk::Data(b), Some(mut h)) => {
                    let b2 = b.clone();
                    let hf = tokio::task::spawn_blocking(move || {
                        h.update(&b2);
                        h
                    });
                    let (hr, wr) = tokio::join!(hf, sink.write(b));
                    wr?;
                    hasher = Some(hr.map_err(join_err)?);
                }
                (Chunk::Zeros(n), Some(mut h)) => {
                    let hf = tokio::task::spawn_blocking(move || {
                        h.update_zeros(n);
                        h
                    });
                    let (hr, wr) = tokio::join!(hf, sink.write_zeros(n));
                    wr?;
                    hasher = Some(hr.map_err(join_err)?);
                }
                (Chunk::Data(b), None) => sink.write(b).await?,
                (Chunk::Zeros(n), None) => sink.write_zeros(n).await?,
            }
        }
        Ok::<_, Error>((stored, hasher.map(ObjectHasher::finish)))
    };

    let ((read, allocated, hashed, content_digest, allocation), (stored, object)) =
        tokio::try_join!(source, writer)?;
    reporter.finish();
    let report = TransferReport {
        format,
        virtual_size,
        stored_size: stored,
        data_bytes_read: read,
        allocated_bytes: allocated,
        allocation,
        content_hashed_bytes: hashed,
        content_digest,
        object,
        elapsed: start.elapsed(),
    };
    debug!(?report, "transfer done");
    Ok(report)
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Extent>>,
) -> crate::extent::ExtentStream {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
