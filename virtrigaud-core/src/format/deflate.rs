//! Deflate helpers shared by the encoders that compress fixed-size blocks of the disk
//! (streamOptimized VMDK grains, compressed qcow2 clusters): cutting the extent stream into
//! whole non-zero blocks, compressing batches of blocks in parallel on blocking workers while
//! keeping their order, and cheap detection of incompressible data.

use crate::extent::{Extent, ExtentStream, is_zero};
use crate::io::join_err;
use crate::{Error, Result};
use bytes::Bytes;
use flate2::{Compress, FlushCompress, Status};
use futures::stream::{self, BoxStream, StreamExt};
use std::collections::VecDeque;
use std::sync::Arc;

/// Cuts an extent stream into whole blocks (`block` bytes each, zero-padded at the end of the
/// disk) that hold at least one non-zero byte, in order. All-zero blocks are skipped.
pub(crate) struct BlockAssembler {
    extents: ExtentStream,
    block: u64,
    cur: Option<(u64, Vec<u8>)>,
    ready: VecDeque<(u64, Bytes)>,
    done: bool,
}

impl BlockAssembler {
    pub(crate) fn new(extents: ExtentStream, block: u64) -> Self {
        BlockAssembler {
            extents,
            block,
            cur: None,
            ready: Default::default(),
            done: false,
        }
    }

    fn flush_cur(&mut self) {
        if let Some((i, buf)) = self.cur.take()
            && !is_zero(&buf)
        {
            self.ready.push_back((i, Bytes::from(buf)));
        }
    }

    fn add(&mut self, offset: u64, bytes: Bytes) {
        let g = self.block;
        let mut o = offset;
        let mut rest = bytes;
        while !rest.is_empty() {
            let idx = o / g;
            let in_g = (o % g) as usize;
            let n = ((g - o % g) as usize).min(rest.len());
            let piece = rest.split_to(n);
            o += n as u64;
            if self.cur.as_ref().is_some_and(|(i, _)| *i != idx) {
                self.flush_cur();
            }
            if in_g == 0 && n as u64 == g {
                if !is_zero(&piece) {
                    self.ready.push_back((idx, piece));
                }
                continue;
            }
            if self.cur.is_none() {
                if is_zero(&piece) {
                    continue;
                }
                self.cur = Some((idx, vec![0u8; g as usize]));
            }
            if let Some((_, buf)) = &mut self.cur {
                buf[in_g..in_g + n].copy_from_slice(&piece);
            }
        }
    }

    /// The next non-zero block: (block index, its `block` bytes).
    pub(crate) async fn next(&mut self) -> Result<Option<(u64, Bytes)>> {
        loop {
            if let Some(x) = self.ready.pop_front() {
                return Ok(Some(x));
            }
            if self.done {
                return Ok(None);
            }
            match self.extents.next().await {
                Some(item) => {
                    if let Extent::Data { offset, bytes } = item? {
                        self.add(offset, bytes);
                    }
                }
                None => {
                    self.done = true;
                    self.flush_cur();
                }
            }
        }
    }
}

/// Cuts `extents` into non-zero blocks of `block` bytes, hands batches of `batch` blocks to
/// `work` on blocking threads (exactly `workers` at once, twice as many batches queued behind
/// them) and yields the results in order. Memory: about `3 × workers × batch × block` bytes.
pub(crate) fn compress_blocks<T, F>(
    extents: ExtentStream,
    block: u64,
    batch: usize,
    workers: usize,
    work: F,
) -> BoxStream<'static, Result<T>>
where
    T: Send + 'static,
    F: Fn(Vec<(u64, Bytes)>) -> Result<T> + Clone + Send + Sync + 'static,
{
    let workers = workers.max(1);
    let permits = Arc::new(tokio::sync::Semaphore::new(workers));
    let blocks = BlockAssembler::new(extents, block);
    stream::try_unfold(blocks, |mut b| async move {
        Ok(b.next().await?.map(|x| (x, b)))
    })
    .chunks(batch.max(1))
    .map(move |items| {
        let permits = permits.clone();
        let work = work.clone();
        async move {
            let items: Vec<(u64, Bytes)> = items.into_iter().collect::<Result<_>>()?;
            let _permit = permits
                .acquire_owned()
                .await
                .map_err(|_| Error::new(crate::ErrorKind::Io, "compression workers closed"))?;
            tokio::task::spawn_blocking(move || work(items))
                .await
                .map_err(join_err)?
        }
    })
    .buffered(workers * 2)
    .boxed()
}

/// Runs one deflate stream over `data` into `buf` (cleared first).
pub(crate) fn deflate_into(c: &mut Compress, data: &[u8], buf: &mut Vec<u8>) -> Result<()> {
    c.reset();
    buf.clear();
    buf.reserve(data.len() + data.len() / 8 + 64);
    loop {
        let consumed = c.total_in() as usize;
        let st = c
            .compress_vec(
                data.get(consumed..).unwrap_or(&[]),
                buf,
                FlushCompress::Finish,
            )
            .map_err(|e| Error::new(crate::ErrorKind::Io, format!("deflate failed: {e}")))?;
        match st {
            Status::StreamEnd => return Ok(()),
            _ => buf.reserve(buf.capacity().max(4096)),
        }
    }
}

/// Bytes of each of the four samples [`incompressible`] tries.
const SAMPLE: usize = 1024;

/// Whether four samples of the block (at 0, ¼, ½, ¾) all fail to shrink by 3 % under a fast
/// deflate level (2, dynamic Huffman trees): such blocks (already compressed or encrypted data)
/// are stored, not deflated, which costs a copy instead of a full deflate search. Depends only
/// on the block's bytes, so the output stays deterministic. `fast` is a raw deflate
/// compressor of level 2.
pub(crate) fn incompressible(
    data: &[u8],
    fast: &mut Compress,
    scratch: &mut Vec<u8>,
) -> Result<bool> {
    if data.len() < 4 * SAMPLE {
        return Ok(false);
    }
    for k in 0..4 {
        let at = data.len() / 4 * k;
        deflate_into(fast, &data[at..at + SAMPLE], scratch)?;
        if scratch.len() * 100 < SAMPLE * 97 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A compressor for [`incompressible`].
pub(crate) fn sampler() -> (Compress, Vec<u8>) {
    (
        Compress::new(flate2::Compression::new(2), false),
        Vec::with_capacity(2 * SAMPLE),
    )
}
