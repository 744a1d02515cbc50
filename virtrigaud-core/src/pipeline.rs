//! The streaming transfer pipeline: read → zero-detect → content digest → encode → object
//! digest → write, in one pass.
//!
//! Stages run concurrently, linked by a bounded channel (back-pressure), so memory is bounded by
//! [`PipelineOptions`] whatever the disk size: roughly `queue_depth × read size` of extents in
//! flight, plus the content digester's batches (`2 × parallelism × 4 MiB`, shared buffers, no
//! copies), plus the object hasher's queue (4 chunks, shared with the writes). SHA-256 work runs
//! on threads beside the I/O: the object digest on one blocking worker of its own fed by a short
//! queue, so it never waits for a write (it is the one sequential computation, and it bounds the
//! throughput); the content digest in parallel batches on the digester's own threads, below
//! the priority of the rest (see [`ContentDigester`]), so they use the time the sequential hash
//! leaves rather than share a core with it. Cancelling the token aborts the sink,
//! so nothing partial remains.

use crate::digest::{ChunkChecksums, ContentDigester, ObjectSha256};
use crate::extent::{AllocationBuilder, AllocationMap, DiskContent, Extent, zero_detect};
use crate::format::{Chunk, DiskFormat, EncodeOptions};
use crate::io::{ByteSink, join_err};
use crate::progress::{Phase, ProgressFn, Reporter};
use crate::{Error, Result};
use futures::StreamExt;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span};

/// Chunks queued for the object SHA-256 worker.
const SHA_QUEUE: usize = 4;

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
    /// Bandwidth caps this transfer waits for (each of them), on the data bytes it reads
    /// from its source; clones shared with other transfers share the cap (see
    /// [`crate::limit`]). Empty: no cap.
    pub bandwidth: Vec<crate::limit::Bandwidth>,
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
            bandwidth: Vec::new(),
        }
    }
}

/// What a transfer moved and proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferReport {
    /// Format written.
    pub format: DiskFormat,
    /// Virtual size of the disk: for a stored object ([`Job::hash_object`]), the size as QEMU
    /// reads the written image (see [`padded_from`](Self::padded_from)).
    pub virtual_size: u64,
    /// The source's virtual size, when a stored object's format counts whole 512-byte sectors
    /// (qcow2, VMDK) and the source was not such a multiple: the content was then padded with
    /// zeros to [`virtual_size`](Self::virtual_size) before the content digest was computed,
    /// so the digest and the size describe the disk as QEMU reads the stored image (see
    /// [`stored_virtual_size`](crate::format::stored_virtual_size)). `None` otherwise.
    pub padded_from: Option<u64>,
    /// Bytes written to the sink (holes included).
    pub stored_size: u64,
    /// Data bytes the source delivered (holes it reported excluded).
    pub data_bytes_read: u64,
    /// Non-zero data bytes after zero detection.
    pub allocated_bytes: u64,
    /// Where the non-zero data is (coarsened upper bound, see [`AllocationBuilder`]).
    pub allocation: AllocationMap,
    /// Bytes the content digest actually hashed (0 when it was not requested).
    pub content_hashed_bytes: u64,
    /// Content digest (hex), when requested ([`Job::content_digest`]).
    pub content_digest: Option<String>,
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
    /// Compute the format-independent content digest of the disk (needed for a manifest and
    /// for every verification; a plain copy that only needs the stored bytes' SHA-256 can skip
    /// it and save one SHA-256 pass over the data).
    pub content_digest: bool,
    /// Compute the SHA-256 and chunk digests of the output (for stored objects). A stored
    /// object is described by its manifest as QEMU reads it: a size that its format rounds up
    /// to whole sectors is rounded before the content digest is computed (see
    /// [`TransferReport::padded_from`]). A transfer to a provider's disk (no object hash)
    /// digests the content as given, to compare it with the manifest it came from; its
    /// encoder still pads the written image.
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
        content_digest: want_content,
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
        want_content,
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
    want_content: bool,
    hash_object: bool,
    phase: Phase,
    label: &str,
    opts: &PipelineOptions,
) -> Result<TransferReport> {
    let start = Instant::now();
    let (content, padded_from) = if hash_object {
        crate::format::pad_for(content, format)?
    } else {
        (content, None)
    };
    let virtual_size = content.virtual_size;
    let allocation = content.allocation.clone();
    let replay = content.replay.clone();
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
    // The reader starts when the encoder first asks for data: an encoder that reads a replay
    // of the source first (compressed qcow2's sizing pass) must not leave reads of a network
    // source half-done for that long.
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let source = async {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(Error::cancelled()),
            _ = go_rx => {}
        }
        // The object digest is one sequential SHA-256 stream on the critical path: leave it a
        // core of its own, and give the (parallel) content digest the others.
        let digest_workers = if hash_object {
            opts.parallelism.saturating_sub(1).max(1)
        } else {
            opts.parallelism
        };
        let mut digester = want_content.then(|| ContentDigester::new(virtual_size, digest_workers));
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
                crate::limit::consume_or_cancel(&opts.bandwidth, e.len(), &cancel).await?;
            }
            reporter.advance(e.end(), if e.is_data() { e.len() } else { 0 });
            for piece in zero_detect(e, opts.zero_block) {
                if piece.is_data() {
                    allocated += piece.len();
                    alloc.add(piece.offset()..piece.end());
                }
                if let Some(d) = digester.as_mut() {
                    d.update(&piece).await?;
                }
                if tx.send(Ok(piece)).await.is_err() {
                    return Err(Error::new(crate::ErrorKind::Io, "encoder stopped early"));
                }
            }
        }
        drop(tx);
        let (hashed, digest) = match digester {
            Some(d) => (d.hashed_bytes(), Some(d.finish().await?)),
            None => (0, None),
        };
        Ok::<_, Error>((read, allocated, hashed, digest, alloc.finish()))
    };

    // Stage 2: encode, hash the output, write it.
    let encoded = DiskContent {
        virtual_size,
        allocation,
        extents: tokio_stream_from(rx, go_tx),
        replay,
    };
    let cancel2 = opts.cancel.clone();
    let chunk_size = opts.chunk_size;
    let writer = async move {
        let mut chunks = crate::format::encode(encoded, format, encode_opts)?;
        if let Some(enc) = &encode_opts.encrypt {
            chunks = crate::crypt::encrypt_chunks(chunks, enc)?;
        }
        // The SHA-256 is the one sequential computation on the critical path: it runs on a
        // blocking worker of its own, fed through a short queue so it never waits for a write,
        // while this task computes the chunk CRC32Cs and writes.
        let (sha_tx, mut sha_task) = if hash_object {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(SHA_QUEUE);
            let task = tokio::task::spawn_blocking(move || {
                let mut h = ObjectSha256::new();
                while let Some(c) = rx.blocking_recv() {
                    match c {
                        Chunk::Data(b) => h.update(&b),
                        Chunk::Zeros(n) => h.update_zeros(n),
                    }
                }
                h
            });
            (Some(tx), Some(task))
        } else {
            (None, None)
        };
        let mut crcs = hash_object.then(|| ChunkChecksums::new(chunk_size));
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
            if let Some(tx) = &sha_tx
                && tx.send(c.clone()).await.is_err()
            {
                // The worker is gone: report its panic, if that is why.
                if let Some(t) = sha_task.take() {
                    t.await.map_err(join_err)?;
                }
                return Err(Error::new(crate::ErrorKind::Io, "object hasher stopped"));
            }
            match c {
                Chunk::Data(b) => {
                    if let Some(k) = crcs.as_mut() {
                        k.update(&b);
                    }
                    sink.write(b).await?;
                }
                Chunk::Zeros(n) => {
                    if let Some(k) = crcs.as_mut() {
                        k.update_zeros(n);
                    }
                    sink.write_zeros(n).await?;
                }
            }
        }
        drop(sha_tx);
        let object = match (sha_task, crcs) {
            (Some(t), Some(k)) => Some((t.await.map_err(join_err)?.finish(), k.finish())),
            _ => None,
        };
        Ok::<_, Error>((stored, object))
    };

    let ((read, allocated, hashed, content_digest, allocation), (stored, object)) =
        tokio::try_join!(source, writer)?;

    reporter.finish();
    let report = TransferReport {
        format,
        virtual_size,
        padded_from,
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

/// The encoder's input; its first poll tells the reader to start.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Extent>>,
    go: tokio::sync::oneshot::Sender<()>,
) -> crate::extent::ExtentStream {
    let mut go = Some(go);
    futures::stream::poll_fn(move |cx| {
        if let Some(g) = go.take() {
            let _ = g.send(());
        }
        rx.poll_recv(cx)
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemorySink;
    use bytes::Bytes;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

    /// The reader starts only when the encoder asks for data: compressed qcow2 reads a replay
    /// of the source first (its sizing pass), and the main stream must not be read meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_waits_for_the_encoder() {
        let extents = vec![Extent::Data {
            offset: 0,
            bytes: Bytes::from(vec![0x61u8; 256 << 10]),
        }];
        // 0: sizing pass not finished; 1: finished. Recorded at the main stream's first poll.
        let sizing = Arc::new(AtomicU8::new(0));
        let seen_at_first_read = Arc::new(AtomicU8::new(9));
        let polled = Arc::new(AtomicBool::new(false));
        let main = {
            let (sizing, seen, polled) =
                (sizing.clone(), seen_at_first_read.clone(), polled.clone());
            let mut inner = futures::stream::iter(extents.clone().into_iter().map(Ok));
            futures::stream::poll_fn(move |cx| {
                if !polled.swap(true, Ordering::SeqCst) {
                    seen.store(sizing.load(Ordering::SeqCst), Ordering::SeqCst);
                }
                inner.poll_next_unpin(cx)
            })
            .boxed()
        };
        let replay: crate::extent::Replay = {
            let sizing = sizing.clone();
            Arc::new(move || {
                let sizing = sizing.clone();
                let items: Vec<Result<Extent>> = extents.clone().into_iter().map(Ok).collect();
                Box::pin(async move {
                    // slow enough that an eager reader would poll the main stream first
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let s =
                        futures::stream::iter(items).chain(futures::stream::poll_fn(move |_| {
                            sizing.store(1, Ordering::SeqCst);
                            std::task::Poll::Ready(None)
                        }));
                    Ok(s.boxed())
                })
            })
        };
        let content = DiskContent::new(
            256 << 10,
            Some(AllocationMap::from_ranges(
                std::iter::once(0..256 << 10).collect(),
            )),
            main,
        )
        .with_replay(replay);
        let (sink, out) = MemorySink::new();
        let encode = EncodeOptions {
            compress: true,
            cluster_size: 65536,
            ..Default::default()
        };
        let (report, sink) = run(
            content,
            Box::new(sink),
            Job {
                format: DiskFormat::Qcow2,
                encode: &encode,
                content_digest: true,
                hash_object: true,
                phase: Phase::Export,
                label: "gate",
            },
            &PipelineOptions::default(),
        )
        .await
        .unwrap();
        sink.commit().await.unwrap();
        assert_eq!(seen_at_first_read.load(Ordering::SeqCst), 1);
        // metadata clusters + a few hundred bytes of deflate, not 4 more data clusters
        assert!(
            report.stored_size < 6 * 65536,
            "compressible data was not compressed: {}",
            report.stored_size
        );
        assert!(out.lock().unwrap().as_ref().is_some_and(|v| !v.is_empty()));
    }
}
