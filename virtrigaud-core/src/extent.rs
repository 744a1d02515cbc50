//! The disk data model: a disk is its virtual size plus an ordered stream of extents.
//!
//! An [`Extent`] is either data bytes at an offset or a run of zeros. A [`DiskContent`] is the
//! guest-visible content of a disk: extents come in increasing offset order, never overlap and
//! stay inside the virtual size; any range no extent covers reads as zeros. Holes come from the
//! source's metadata (qcow2 tables, `SEEK_DATA`, sparse streams) and from zero detection, so the
//! cost of moving a disk grows with its allocated data, not with its virtual size.

use crate::{Error, Result};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::Arc;

/// A piece of a disk (or of an image file, for native byte streams).
#[derive(Clone, PartialEq, Eq)]
pub enum Extent {
    /// Bytes at `offset`.
    Data {
        /// Offset of the first byte.
        offset: u64,
        /// The bytes.
        bytes: Bytes,
    },
    /// `len` zero bytes at `offset`.
    Zero {
        /// Offset of the run.
        offset: u64,
        /// Length of the run.
        len: u64,
    },
}

impl std::fmt::Debug for Extent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Extent::Data { offset, bytes } => write!(f, "Data({offset}+{})", bytes.len()),
            Extent::Zero { offset, len } => write!(f, "Zero({offset}+{len})"),
        }
    }
}

impl Extent {
    /// Offset of the first byte.
    pub fn offset(&self) -> u64 {
        match self {
            Extent::Data { offset, .. } | Extent::Zero { offset, .. } => *offset,
        }
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Extent::Data { bytes, .. } => bytes.len() as u64,
            Extent::Zero { len, .. } => *len,
        }
    }
    /// Whether the extent covers no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset().saturating_add(self.len())
    }
    /// Whether this is a data extent.
    pub fn is_data(&self) -> bool {
        matches!(self, Extent::Data { .. })
    }
}

/// A stream of extents (or of native image bytes, for sequential sources).
pub type ExtentStream = BoxStream<'static, Result<Extent>>;

/// The ranges of a disk that may hold data, known from metadata alone (no data read).
///
/// Sorted, non-overlapping, merged. Everything outside reads as zeros.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationMap {
    ranges: Vec<Range<u64>>,
}

impl AllocationMap {
    /// Builds a map from ranges in any order; overlapping and adjacent ranges are merged and
    /// empty ones dropped.
    pub fn from_ranges(mut ranges: Vec<Range<u64>>) -> Self {
        ranges.retain(|r| r.end > r.start);
        ranges.sort_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match out.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        AllocationMap { ranges: out }
    }
    /// The merged ranges.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }
    /// Total bytes covered.
    pub fn allocated_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }
    /// Whether any byte of `range` may hold data.
    pub fn intersects(&self, range: Range<u64>) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= range.start);
        self.ranges.get(i).is_some_and(|r| r.start < range.end)
    }
    /// The map rounded out to `granule` boundaries (e.g. a cluster size) and clipped to `size`.
    pub fn aligned(&self, granule: u64, size: u64) -> AllocationMap {
        let g = granule.max(1);
        AllocationMap::from_ranges(
            self.ranges
                .iter()
                .map(|r| (r.start / g * g)..r.end.div_ceil(g).saturating_mul(g).min(size))
                .collect(),
        )
    }
}

/// Builds an [`AllocationMap`] from data ranges seen in order, coarsening as it goes so that it
/// never holds more than `max_ranges` ranges: gaps smaller than the current granule are
/// merged, and the granule doubles whenever the cap is reached. The result is an upper bound of
/// the data, which is all that layouts (qcow2 tables) need.
#[derive(Debug, Clone)]
pub struct AllocationBuilder {
    granule: u64,
    max_ranges: usize,
    ranges: Vec<Range<u64>>,
}

impl AllocationBuilder {
    /// A builder merging gaps below `granule` bytes and holding at most `max_ranges` ranges.
    pub fn new(granule: u64, max_ranges: usize) -> Self {
        AllocationBuilder {
            granule: granule.max(1),
            max_ranges: max_ranges.max(16),
            ranges: Vec::new(),
        }
    }

    /// Records that `range` holds data. Ranges must come in increasing order.
    pub fn add(&mut self, range: Range<u64>) {
        if range.end <= range.start {
            return;
        }
        match self.ranges.last_mut() {
            Some(last) if range.start <= last.end.saturating_add(self.granule) => {
                last.end = last.end.max(range.end)
            }
            _ => self.ranges.push(range),
        }
        if self.ranges.len() > self.max_ranges {
            self.granule = self.granule.saturating_mul(2);
            let g = self.granule;
            let old = std::mem::take(&mut self.ranges);
            for r in old {
                match self.ranges.last_mut() {
                    Some(last) if r.start <= last.end.saturating_add(g) => last.end = r.end,
                    _ => self.ranges.push(r),
                }
            }
        }
    }

    /// The map.
    pub fn finish(self) -> AllocationMap {
        AllocationMap::from_ranges(self.ranges)
    }
}

/// Reads the same content again, from the start: each call opens a fresh stream of extents
/// describing the same guest bytes as [`DiskContent::extents`] (possibly cut into different
/// extents). See [`DiskContent::replay`].
pub type Replay = Arc<dyn Fn() -> BoxFuture<'static, Result<ExtentStream>> + Send + Sync>;

/// The guest-visible content of a disk, as a stream.
pub struct DiskContent {
    /// Size of the disk as the guest sees it.
    pub virtual_size: u64,
    /// Ranges that may hold data, when the source knows them from metadata.
    pub allocation: Option<AllocationMap>,
    /// The extents, in order.
    pub extents: ExtentStream,
    /// A way to read the same content once more, when the source can be re-read (a
    /// random-access image: [`format::decode`](crate::format::decode) sets it to re-decode the
    /// image from the start). Encoders that must see the whole data before they can write their
    /// first byte (compressed qcow2: the tables hold the compressed sizes) use it for a sizing
    /// pass, then write from [`extents`](Self::extents). `None` for sequential sources (a
    /// stream can be read only once). The replayed stream must give the same bytes; an encoder
    /// that notices otherwise fails rather than writing an inconsistent image.
    pub replay: Option<Replay>,
}

impl std::fmt::Debug for DiskContent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskContent")
            .field("virtual_size", &self.virtual_size)
            .field(
                "allocation",
                &self.allocation.as_ref().map(|a| a.allocated_bytes()),
            )
            .field("replay", &self.replay.is_some())
            .finish_non_exhaustive()
    }
}

impl DiskContent {
    /// Content from a stream of extents, without replay.
    pub fn new(
        virtual_size: u64,
        allocation: Option<AllocationMap>,
        extents: ExtentStream,
    ) -> Self {
        DiskContent {
            virtual_size,
            allocation,
            extents,
            replay: None,
        }
    }

    /// The same content, re-readable through `replay` (see [`DiskContent::replay`]).
    pub fn with_replay(self, replay: Replay) -> Self {
        DiskContent {
            replay: Some(replay),
            ..self
        }
    }

    /// Content from extents held in memory (tests, small disks). Replayable: the extents are
    /// kept (shared, no copy of the data) so that they can be handed out again.
    pub fn from_extents(virtual_size: u64, extents: Vec<Extent>) -> Self {
        let kept: Arc<[Extent]> = extents.into();
        let stream = |v: Arc<[Extent]>| -> ExtentStream {
            futures::stream::iter((0..v.len()).map(move |i| Ok(v[i].clone()))).boxed()
        };
        let again = kept.clone();
        DiskContent::new(virtual_size, None, stream(kept)).with_replay(Arc::new(move || {
            let s = stream(again.clone());
            Box::pin(async move { Ok(s) })
        }))
    }

    /// The same content on a disk of `size` bytes: what lies beyond the current virtual size
    /// reads as zeros. A `size` below the current one changes nothing (content is never cut).
    pub fn padded_to(self, size: u64) -> Self {
        DiskContent {
            virtual_size: self.virtual_size.max(size),
            ..self
        }
    }

    /// Wraps the stream so that any violation of the contract (order, overlap, bounds) becomes a
    /// [`Corrupt`](crate::ErrorKind::Corrupt) error instead of silently wrong data.
    pub fn validated(self) -> Self {
        let size = self.virtual_size;
        let mut pos = 0u64;
        let extents = self
            .extents
            .map(move |item| {
                let e = item?;
                if e.offset() < pos {
                    return Err(Error::corrupt(format!(
                        "extent at {} overlaps or goes backwards (expected >= {pos})",
                        e.offset()
                    )));
                }
                let end = e.offset().checked_add(e.len()).ok_or_else(|| {
                    Error::corrupt("extent end overflows").with_offset(e.offset())
                })?;
                if end > size {
                    return Err(Error::corrupt(format!(
                        "extent {}..{end} beyond virtual size {size}",
                        e.offset()
                    )));
                }
                pos = end;
                Ok(e)
            })
            .boxed();
        DiskContent { extents, ..self }
    }

    /// Collects the whole disk into memory as a flat byte vector (tests and small disks only).
    pub async fn read_all(self) -> Result<Vec<u8>> {
        let size = usize::try_from(self.virtual_size)
            .map_err(|_| Error::invalid("disk too large to hold in memory"))?;
        let mut out = vec![0u8; size];
        let mut s = self.validated().extents;
        while let Some(e) = s.next().await {
            if let Extent::Data { offset, bytes } = e? {
                let o = offset as usize;
                out[o..o + bytes.len()].copy_from_slice(&bytes);
            }
        }
        Ok(out)
    }
}

/// Whether every byte of `buf` is zero. Compares 64-byte blocks of words, which the compiler
/// vectorises; runs at memory speed.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Splits data extents into data and zero runs at `block` granularity (blocks aligned to absolute
/// disk offsets), so all-zero blocks cost nothing downstream. Zero extents pass through.
pub fn zero_detect(extent: Extent, block: u64) -> Vec<Extent> {
    let Extent::Data { offset, bytes } = extent else {
        return vec![extent];
    };
    let block = block.max(1);
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = 0usize;
    let len = bytes.len();
    while pos < len {
        let abs = offset + pos as u64;
        let next = ((abs / block + 1) * block - offset) as usize;
        let end = next.min(len);
        let zero = is_zero(&bytes[pos..end]);
        match (out.last_mut(), zero) {
            (Some(Extent::Zero { len: l, .. }), true) => *l += (end - pos) as u64,
            (
                Some(Extent::Data {
                    offset: o,
                    bytes: b,
                }),
                false,
            ) => {
                let start = (*o - offset) as usize;
                *b = bytes.slice(start..end);
            }
            (_, true) => out.push(Extent::Zero {
                offset: abs,
                len: (end - pos) as u64,
            }),
            (_, false) => out.push(Extent::Data {
                offset: abs,
                bytes: bytes.slice(pos..end),
            }),
        }
        pos = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_finds_any_nonzero_byte() {
        let mut v = vec![0u8; 1000];
        assert!(is_zero(&v));
        for i in [0, 7, 63, 64, 500, 999] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            v[i] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn zero_detect_splits_on_absolute_blocks() {
        let mut data = vec![0u8; 40];
        data[12] = 1; // abs 20: block [20,30)
        data[35] = 1; // abs 43: block [40,50), clipped at 48
        let out = zero_detect(
            Extent::Data {
                offset: 8,
                bytes: Bytes::from(data),
            },
            10,
        );
        let shape: Vec<(bool, u64, u64)> = out
            .iter()
            .map(|e| (e.is_data(), e.offset(), e.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (false, 8, 12),
                (true, 20, 10),
                (false, 30, 10),
                (true, 40, 8)
            ]
        );
        let total: u64 = out.iter().map(|e| e.len()).sum();
        assert_eq!(total, 40);
    }

    #[test]
    fn allocation_map_merges_and_aligns() {
        let m = AllocationMap::from_ranges(vec![10..20, 0..5, 15..30, 40..40]);
        assert_eq!(m.ranges(), &[0..5, 10..30]);
        assert_eq!(m.allocated_bytes(), 25);
        assert!(m.intersects(29..35));
        assert!(!m.intersects(30..35));
        let a = m.aligned(16, 40);
        assert_eq!(a.ranges().len(), 1);
        assert_eq!(a.ranges()[0], 0..32);
    }

    #[test]
    fn allocation_builder_stays_bounded_and_covers_all_data() {
        let mut b = AllocationBuilder::new(10, 16);
        let mut data = Vec::new();
        for i in 0..1000u64 {
            let r = i * 100..i * 100 + 7;
            data.push(r.clone());
            b.add(r);
        }
        let m = b.finish();
        assert!(m.ranges().len() <= 16, "{}", m.ranges().len());
        for r in data {
            assert!(
                m.ranges()
                    .iter()
                    .any(|x| x.start <= r.start && x.end >= r.end),
                "{r:?}"
            );
        }
    }

    #[tokio::test]
    async fn validated_rejects_overlap_and_bounds() {
        let c = DiskContent::from_extents(
            100,
            vec![
                Extent::Zero { offset: 0, len: 50 },
                Extent::Zero { offset: 40, len: 5 },
            ],
        );
        assert_eq!(
            c.read_all().await.unwrap_err().kind(),
            crate::ErrorKind::Corrupt
        );
        let c = DiskContent::from_extents(10, vec![Extent::Zero { offset: 5, len: 6 }]);
        assert_eq!(
            c.read_all().await.unwrap_err().kind(),
            crate::ErrorKind::Corrupt
        );
    }
}
