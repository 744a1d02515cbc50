//! Raw images: offset in the file is offset in the disk.
//!
//! Decoding a random-access source uses the source's hole map (`SEEK_DATA`/`SEEK_HOLE` on local
//! files) so holes are never read; a sequential source's holes (sparse streams) pass through.
//! Encoding emits data as is and zero runs as [`Chunk::Zeros`], which sparse sinks skip.

use super::{Chunk, ChunkStream, DecodeOptions};
use crate::extent::{AllocationMap, DiskContent, Extent, ExtentStream};
use crate::io::ReadAt;
use crate::{Error, Result};
use futures::stream::{self, StreamExt};
use std::sync::Arc;

/// Decodes a raw image read by ranges.
pub async fn decode_random(src: Arc<dyn ReadAt>, opts: &DecodeOptions) -> Result<DiskContent> {
    let size = src.size();
    let ranges = src.data_ranges().await?;
    let allocation = ranges.clone().map(AllocationMap::from_ranges);
    let ranges = match ranges {
        Some(r) => AllocationMap::from_ranges(r).ranges().to_vec(),
        None => std::iter::once(0..size).collect(),
    };
    let piece = opts.read_size.max(4096) as u64;
    let pieces = ranges.into_iter().flat_map(move |r| {
        let mut v = Vec::new();
        let mut o = r.start;
        while o < r.end {
            let n = piece.min(r.end - o);
            v.push((o, n as usize));
            o += n;
        }
        v
    });
    let extents = stream::iter(pieces)
        .map(move |(off, len)| {
            let src = src.clone();
            async move {
                let bytes = src.read_exact_at(off, len).await?;
                Ok(Extent::Data { offset: off, bytes })
            }
        })
        .buffered(opts.read_ahead.max(1))
        .boxed();
    Ok(DiskContent::new(size, allocation, extents))
}

/// Decodes a raw image arriving as one sequential stream of file extents.
pub fn decode_sequential(size: Option<u64>, stream: ExtentStream) -> Result<DiskContent> {
    let size =
        size.ok_or_else(|| Error::invalid("a raw image read as a stream needs its size up front"))?;
    // A stream that ends before its announced size is a cut transfer, not a disk whose tail
    // is zeros: fail at the end instead of padding silently.
    let reached = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = reached.clone();
    let tracked = stream.map(move |item| {
        if let Ok(e) = &item {
            seen.fetch_max(
                e.offset().saturating_add(e.len()),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        item
    });
    let end = futures::stream::once(async move {
        let got = reached.load(std::sync::atomic::Ordering::Relaxed);
        (got < size).then(|| {
            Err(Error::corrupt(format!(
                "the raw stream ended after {got} of its {size} bytes"
            ))
            .with_offset(got))
        })
    })
    .filter_map(|x| async move { x });
    Ok(DiskContent::new(size, None, tracked.chain(end).boxed()).validated())
}

/// Encodes content as raw bytes: data as is, holes as zero runs.
pub fn encode(content: DiskContent) -> ChunkStream {
    let size = content.virtual_size;
    let mut pos = 0u64;
    let body = content
        .validated()
        .extents
        .map(move |item| -> Result<Vec<Chunk>> {
            let e = item?;
            let mut out = Vec::with_capacity(2);
            if e.offset() > pos {
                out.push(Chunk::Zeros(e.offset() - pos));
            }
            pos = e.end();
            match e {
                Extent::Data { bytes, .. } => out.push(Chunk::Data(bytes)),
                Extent::Zero { len, .. } => out.push(Chunk::Zeros(len)),
            }
            Ok(out)
        })
        .flat_map(|r| match r {
            Ok(v) => stream::iter(v.into_iter().map(Ok)).left_stream(),
            Err(e) => stream::iter(vec![Err(e)]).right_stream(),
        });
    TailPad::new(body.boxed(), size).boxed()
}

/// Appends `Zeros` so the output reaches `size` bytes.
struct TailPad {
    inner: ChunkStream,
    size: u64,
    written: u64,
    done: bool,
}

impl TailPad {
    fn new(inner: ChunkStream, size: u64) -> Self {
        TailPad {
            inner,
            size,
            written: 0,
            done: false,
        }
    }
}

impl futures::Stream for TailPad {
    type Item = Result<Chunk>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(c))) => {
                self.written += c.len();
                Poll::Ready(Some(Ok(c)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.done = true;
                if self.written < self.size {
                    Poll::Ready(Some(Ok(Chunk::Zeros(self.size - self.written))))
                } else {
                    Poll::Ready(None)
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod cut_stream_tests {
    use super::*;
    use bytes::Bytes;

    async fn drain(c: DiskContent) -> Result<u64> {
        let mut n = 0;
        let mut s = c.extents;
        while let Some(e) = s.next().await {
            n += e?.len();
        }
        Ok(n)
    }

    #[tokio::test]
    async fn a_sequential_raw_stream_cut_short_is_corrupt() {
        let ext = |off: u64, len: usize| {
            Ok(Extent::Data {
                offset: off,
                bytes: Bytes::from(vec![7u8; len]),
            })
        };
        let cut = stream::iter(vec![ext(0, 4096)]).boxed();
        let e = drain(decode_sequential(Some(8192), cut).unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corrupt, "{e}");
        // A whole stream, its tail a reported hole, is fine.
        let whole = stream::iter(vec![
            ext(0, 4096),
            Ok(Extent::Zero {
                offset: 4096,
                len: 4096,
            }),
        ])
        .boxed();
        assert_eq!(
            drain(decode_sequential(Some(8192), whole).unwrap())
                .await
                .unwrap(),
            8192
        );
    }
}
