//! VMDK encoders: streamOptimized (grains compressed in parallel, metadata at the end) and
//! monolithicSparse (metadata first from the allocation map, then the grains).

use super::descriptor::Descriptor;
use super::header::*;
use crate::extent::{DiskContent, Extent, is_zero};
use crate::format::deflate::{compress_blocks, deflate_into, incompressible, sampler};
use crate::format::{Chunk, ChunkStream, EncodeOptions};
use crate::{Error, Result};
use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression};
use futures::stream::{self, StreamExt, TryStreamExt};

/// Grain size written, in sectors (64 KiB).
pub const GRAIN_SECTORS: u64 = 128;
/// Descriptor area written, in sectors.
const DESCRIPTOR_SECTORS: u64 = 20;
/// Name of the (only) extent in the embedded descriptor.
pub const EMBEDDED_EXTENT_NAME: &str = "disk.vmdk";
/// Grains handed to one compression worker.
const BATCH_GRAINS: usize = 16;
/// Sectors in one grain table (512 entries of 4 bytes).
const GT_SECTORS: u64 = 4;

fn capacity_of(virtual_size: u64) -> Result<u64> {
    // A VMDK counts its capacity in 512-byte sectors. [`crate::format::encode`] has already
    // rounded the size up to a whole sector (with zeros, like `qemu-img convert`); round up here
    // too, so that no caller can ever get a capacity that cuts the disk short.
    let cap = virtual_size.div_ceil(SECTOR);
    if cap > MAX_CAPACITY_SECTORS {
        return Err(Error::invalid(format!(
            "disk of {virtual_size} bytes too large for VMDK"
        )));
    }
    Ok(cap)
}

/// Header sector plus the descriptor area.
fn header_and_descriptor(h: &SparseHeader, create_type: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(((1 + DESCRIPTOR_SECTORS) * SECTOR) as usize);
    b.put_slice(&h.to_bytes());
    let text = Descriptor::embedded_text(create_type, h.capacity, EMBEDDED_EXTENT_NAME);
    b.put_slice(text.as_bytes());
    b.resize(((1 + DESCRIPTOR_SECTORS) * SECTOR) as usize, 0);
    b.freeze()
}

/// Compresses grains into zlib streams, one after the other on this thread.
fn compress_batch(grains: Vec<(u64, Bytes)>, level: u32) -> Result<CompressedBatch> {
    let level = level.min(9);
    let mut c = Compress::new(Compression::new(level), true);
    let mut stored = Compress::new(Compression::none(), true);
    let (mut fast, mut scratch) = sampler();
    let mut out = Vec::with_capacity(grains.len());
    for (idx, data) in grains {
        let mut buf = Vec::new();
        if level > 1 && incompressible(&data, &mut fast, &mut scratch)? {
            deflate_into(&mut stored, &data, &mut buf)?;
        } else {
            deflate_into(&mut c, &data, &mut buf)?;
        }
        out.push((idx, buf));
    }
    Ok(out)
}

/// Compressed grains (grain index, zlib stream), in order.
type CompressedBatch = Vec<(u64, Vec<u8>)>;

/// State of the streamOptimized writer.
enum SoState {
    Header(Bytes, u64),
    Body,
    Tail(std::vec::IntoIter<Chunk>),
    Done,
}

struct SoWriter {
    state: SoState,
    body: stream::BoxStream<'static, Result<CompressedBatch>>,
    header: SparseHeader,
    /// Next free sector.
    sector: u64,
    /// Grain tables holding at least one grain: (table index, entries).
    gts: Vec<(u64, Vec<u32>)>,
}

impl SoWriter {
    fn place(&mut self, batch: CompressedBatch) -> Result<Bytes> {
        let total: usize = batch
            .iter()
            .map(|(_, d)| (12 + d.len()).next_multiple_of(512))
            .sum();
        let mut out = BytesMut::with_capacity(total);
        for (idx, data) in batch {
            let sector = u32::try_from(self.sector).map_err(|_| {
                Error::unsupported("streamOptimized VMDK output beyond 2 TiB of compressed data")
            })?;
            let gt = idx / u64::from(GTES_PER_GT);
            let slot = (idx % u64::from(GTES_PER_GT)) as usize;
            if self.gts.last().is_none_or(|(t, _)| *t != gt) {
                self.gts.push((gt, vec![0u32; GTES_PER_GT as usize]));
            }
            if let Some((_, entries)) = self.gts.last_mut() {
                entries[slot] = sector;
            }
            let lba = idx * self.header.grain_size;
            out.put_slice(&Marker::grain_marker(lba, data.len() as u32));
            out.put_slice(&data);
            let used = 12 + data.len();
            let padded = used.next_multiple_of(512);
            out.resize(out.len() + (padded - used), 0);
            self.sector += (padded / 512) as u64;
        }
        Ok(out.freeze())
    }

    /// Grain tables, grain directory, footer and end-of-stream marker, in ~1 MiB chunks.
    fn tail(&mut self) -> Result<Vec<Chunk>> {
        let gt_count = self.header.gt_count();
        let mut gd = vec![0u32; gt_count as usize];
        let mut chunks = Vec::new();
        let mut cur = BytesMut::new();
        let gts = std::mem::take(&mut self.gts);
        for (t, entries) in gts {
            cur.put_slice(&Marker::meta_sector(GT_SECTORS, MARKER_GT));
            self.sector += 1;
            if let Some(slot) = gd.get_mut(t as usize) {
                *slot = u32::try_from(self.sector)
                    .map_err(|_| Error::unsupported("streamOptimized VMDK output beyond 2 TiB"))?;
            }
            for e in entries {
                cur.put_u32_le(e);
            }
            self.sector += GT_SECTORS;
            if cur.len() >= 1 << 20 {
                chunks.push(Chunk::Data(cur.split().freeze()));
            }
        }
        let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
        cur.put_slice(&Marker::meta_sector(gd_sectors, MARKER_GD));
        self.sector += 1;
        let gd_sector = self.sector;
        let start = cur.len();
        for e in gd {
            cur.put_u32_le(e);
        }
        cur.resize(start + (gd_sectors * SECTOR) as usize, 0);
        self.sector += gd_sectors;
        cur.put_slice(&Marker::meta_sector(1, MARKER_FOOTER));
        let mut footer = self.header.clone();
        footer.gd_offset = gd_sector;
        cur.put_slice(&footer.to_bytes());
        cur.put_slice(&Marker::meta_sector(0, MARKER_EOS));
        self.sector += 3;
        chunks.push(Chunk::Data(cur.freeze()));
        Ok(chunks)
    }
}

pub(crate) fn encode_stream_optimized(
    content: DiskContent,
    opts: &EncodeOptions,
) -> Result<ChunkStream> {
    let capacity = capacity_of(content.virtual_size)?;
    let mut h = SparseHeader::new(capacity);
    h.version = 3;
    h.flags = FLAG_VALID_NEWLINE | FLAG_COMPRESSED | FLAG_MARKERS;
    h.grain_size = GRAIN_SECTORS;
    h.gd_offset = GD_AT_END;
    h.rgd_offset = 0;
    h.descriptor_offset = 1;
    h.descriptor_size = DESCRIPTOR_SECTORS;
    h.overhead = 128;
    h.compress_algorithm = COMPRESS_DEFLATE;
    let head = header_and_descriptor(&h, "streamOptimized");
    let pad = h.overhead * SECTOR - head.len() as u64;
    let level = opts.compression_level;
    let body = compress_blocks(
        content.validated().extents,
        h.grain_bytes(),
        BATCH_GRAINS,
        opts.parallelism,
        move |batch| compress_batch(batch, level),
    );
    let w = SoWriter {
        state: SoState::Header(head, pad),
        body,
        sector: h.overhead,
        header: h,
        gts: Vec::new(),
    };
    Ok(stream::try_unfold(w, |mut w| async move {
        loop {
            match std::mem::replace(&mut w.state, SoState::Done) {
                SoState::Header(head, pad) => {
                    w.state = SoState::Header(Bytes::new(), pad);
                    if !head.is_empty() {
                        return Ok(Some((vec![Chunk::Data(head), Chunk::Zeros(pad)], w)));
                    }
                    w.state = SoState::Body;
                }
                SoState::Body => match w.body.next().await {
                    Some(batch) => {
                        let b = w.place(batch?)?;
                        w.state = SoState::Body;
                        return Ok(Some((vec![Chunk::Data(b)], w)));
                    }
                    None => {
                        let t = w.tail()?;
                        w.state = SoState::Tail(t.into_iter());
                    }
                },
                SoState::Tail(mut it) => {
                    let c = it.next();
                    w.state = SoState::Tail(it);
                    match c {
                        Some(c) => return Ok(Some((vec![c], w))),
                        None => w.state = SoState::Done,
                    }
                }
                SoState::Done => return Ok::<_, Error>(None),
            }
        }
    })
    .map_ok(|v| stream::iter(v.into_iter().filter(|c| !c.is_empty()).map(Ok)))
    .try_flatten()
    .boxed())
}

/// Layout of a monolithicSparse file computed from the allocation map.
struct SparseLayout {
    /// Allocated grain ranges (grain indexes), merged and sorted.
    runs: Vec<(u64, u64)>,
    /// Allocated grains before each run.
    before: Vec<u64>,
    /// Grain tables holding at least one allocated grain.
    tables: Vec<u64>,
    header: SparseHeader,
    rgt_start: u64,
    gt_start: u64,
}

impl SparseLayout {
    fn grain_sector(&self, g: u64) -> Option<u64> {
        let i = self.runs.partition_point(|r| r.1 <= g);
        let r = self.runs.get(i)?;
        (r.0 <= g).then(|| self.header.overhead + (self.before[i] + g - r.0) * GRAIN_SECTORS)
    }

    /// The metadata after the descriptor: redundant GD, redundant GTs, GD, GTs, padding to the
    /// first grain, produced lazily in pieces.
    fn metadata(self) -> impl Iterator<Item = Chunk> + Send {
        let gt_count = self.header.gt_count();
        let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
        let mut pieces: Vec<(u8, u64)> = Vec::new(); // (0 = gd, 1 = gts from index), (copy)
        for copy in [0u64, 1] {
            pieces.push((0, copy));
            pieces.push((1, copy));
        }
        let meta_end = self.gt_start + self.tables.len() as u64 * GT_SECTORS;
        let pad = (self.header.overhead - meta_end) * SECTOR;
        pieces.into_iter().flat_map(move |(what, copy)| {
            let base = if copy == 0 {
                self.rgt_start
            } else {
                self.gt_start
            };
            let mut v: Vec<Chunk> = Vec::new();
            if what == 0 {
                let mut b = BytesMut::with_capacity((gd_sectors * SECTOR) as usize);
                let mut ti = 0usize;
                for t in 0..gt_count {
                    if self.tables.get(ti) == Some(&t) {
                        b.put_u32_le((base + ti as u64 * GT_SECTORS) as u32);
                        ti += 1;
                    } else {
                        b.put_u32_le(0);
                    }
                }
                b.resize((gd_sectors * SECTOR) as usize, 0);
                v.push(Chunk::Data(b.freeze()));
            } else {
                for part in self.tables.chunks(256) {
                    let mut b = BytesMut::with_capacity(part.len() * 2048);
                    for &t in part {
                        for j in 0..u64::from(GTES_PER_GT) {
                            let g = t * u64::from(GTES_PER_GT) + j;
                            b.put_u32_le(self.grain_sector(g).unwrap_or(0) as u32);
                        }
                    }
                    v.push(Chunk::Data(b.freeze()));
                }
                if copy == 1 && pad > 0 {
                    v.push(Chunk::Zeros(pad));
                }
            }
            v
        })
    }
}

pub(crate) fn encode_monolithic_sparse(
    content: DiskContent,
    opts: &EncodeOptions,
) -> Result<ChunkStream> {
    let _ = opts;
    let capacity = capacity_of(content.virtual_size)?;
    let mut h = SparseHeader::new(capacity);
    h.version = 1;
    h.flags = FLAG_VALID_NEWLINE | FLAG_REDUNDANT_GD;
    h.grain_size = GRAIN_SECTORS;
    let gb = h.grain_bytes();
    let grain_count = h.grain_count();
    let runs: Vec<(u64, u64)> = match &content.allocation {
        Some(a) => a
            .aligned(gb, grain_count * gb)
            .ranges()
            .iter()
            .map(|r| (r.start / gb, r.end.div_ceil(gb)))
            .filter(|r| r.1 > r.0)
            .collect(),
        None if grain_count > 0 => vec![(0, grain_count)],
        None => Vec::new(),
    };
    let mut before = Vec::with_capacity(runs.len());
    let mut allocated = 0u64;
    let mut tables: Vec<u64> = Vec::new();
    let per = u64::from(GTES_PER_GT);
    for &(s, e) in &runs {
        before.push(allocated);
        allocated += e - s;
        for t in s / per..=(e - 1) / per {
            if tables.last() != Some(&t) {
                tables.push(t);
            }
        }
    }
    let gt_count = h.gt_count();
    let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
    h.descriptor_offset = 1;
    h.descriptor_size = DESCRIPTOR_SECTORS;
    h.rgd_offset = 1 + DESCRIPTOR_SECTORS;
    let rgt_start = h.rgd_offset + gd_sectors;
    h.gd_offset = rgt_start + tables.len() as u64 * GT_SECTORS;
    let gt_start = h.gd_offset + gd_sectors;
    let meta_end = gt_start + tables.len() as u64 * GT_SECTORS;
    h.overhead = meta_end.next_multiple_of(GRAIN_SECTORS);
    let file_sectors = h.overhead + allocated * GRAIN_SECTORS;
    if file_sectors > u64::from(u32::MAX) {
        return Err(Error::unsupported(
            "monolithicSparse VMDK limited to 2 TiB of allocated grains",
        ));
    }
    let head = header_and_descriptor(&h, "monolithicSparse");
    let alloc_bytes: Vec<(u64, u64)> = runs.iter().map(|&(s, e)| (s * gb, e * gb)).collect();
    let layout = SparseLayout {
        runs,
        before,
        tables,
        header: h,
        rgt_start,
        gt_start,
    };
    let meta = stream::iter(
        std::iter::once(Chunk::Data(head))
            .chain(layout.metadata())
            .map(Ok),
    );
    let mut place = SparsePlacer {
        ranges: alloc_bytes,
        idx: 0,
        cursor: 0,
    };
    let data = content
        .validated()
        .extents
        .map(Some)
        .chain(stream::once(async { None }))
        .map(move |item| -> Result<Vec<Chunk>> {
            let mut out = Vec::new();
            match item {
                Some(e) => {
                    if let Extent::Data { offset, bytes } = e? {
                        place.data(offset, bytes, &mut out)?;
                    }
                }
                None => place.zeros_until(u64::MAX, &mut out),
            }
            Ok(out)
        })
        .map_ok(|v| stream::iter(v.into_iter().map(Ok)))
        .try_flatten();
    Ok(meta.chain(data).boxed())
}

/// Places guest data into the allocated grains of a monolithicSparse file, in order.
struct SparsePlacer {
    /// Allocated byte ranges of the guest.
    ranges: Vec<(u64, u64)>,
    idx: usize,
    /// Guest offset up to which output was produced.
    cursor: u64,
}

impl SparsePlacer {
    fn zeros_until(&mut self, target: u64, out: &mut Vec<Chunk>) {
        while let Some(&(s, e)) = self.ranges.get(self.idx) {
            if self.cursor < s {
                self.cursor = s;
            }
            if target <= self.cursor {
                break;
            }
            let end = target.min(e);
            out.push(Chunk::Zeros(end - self.cursor));
            self.cursor = end;
            if self.cursor == e {
                self.idx += 1;
            } else {
                break;
            }
        }
    }

    fn data(&mut self, offset: u64, bytes: Bytes, out: &mut Vec<Chunk>) -> Result<()> {
        let mut o = offset;
        let mut rest = bytes;
        while !rest.is_empty() {
            // Skip ranges that end before o.
            while self.ranges.get(self.idx).is_some_and(|r| r.1 <= o) {
                self.zeros_until(self.ranges[self.idx].1, out);
            }
            let next = self.ranges.get(self.idx).copied();
            match next {
                Some((s, e)) if s <= o => {
                    let n = ((e - o) as usize).min(rest.len());
                    self.zeros_until(o, out);
                    out.push(Chunk::Data(rest.split_to(n)));
                    o += n as u64;
                    self.cursor = o;
                    if self.cursor == e {
                        self.idx += 1;
                    }
                }
                _ => {
                    let gap_end = next.map_or(u64::MAX, |r| r.0);
                    let n = ((gap_end - o).min(rest.len() as u64)) as usize;
                    if !is_zero(&rest[..n]) {
                        return Err(Error::invalid(format!(
                            "data at {o} outside the allocation map given for a \
                             monolithicSparse VMDK"
                        )));
                    }
                    let _ = rest.split_to(n);
                    o += n as u64;
                }
            }
        }
        Ok(())
    }
}
