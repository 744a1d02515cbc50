//! VMDK decoders: sparse images read by ranges (monolithicSparse, streamOptimized), a
//! streamOptimized image read once in order, and monolithicFlat descriptors with flat extents.

use super::ExtentResolver;
use super::descriptor::{Descriptor, ExtentKind, MAX_DESCRIPTOR, check_extent_name};
use super::header::*;
use crate::extent::{AllocationMap, DiskContent, Extent, ExtentStream, is_zero};
use crate::format::DecodeOptions;
use crate::io::{ReadAt, ReadBuf, join_err};
use crate::{Error, Result};
use bytes::{Bytes, BytesMut};
use flate2::{Decompress, FlushDecompress, Status};
use futures::stream::{self, StreamExt, TryStreamExt};
use std::sync::Arc;

/// Reads the header of a sparse file, and the footer when the header says the grain directory
/// is at the end.
pub(crate) async fn read_sparse_header(src: &dyn ReadAt) -> Result<SparseHeader> {
    let size = src.size();
    let head = src.read_exact_at(0, SECTOR as usize).await?;
    let h = SparseHeader::parse(&head)?;
    if h.gd_offset != GD_AT_END {
        return Ok(h);
    }
    if !h.markers() {
        return Err(Error::corrupt("VMDK grain directory at end but no markers"));
    }
    let end = size / SECTOR * SECTOR;
    if end < 4 * SECTOR {
        return Err(Error::corrupt("streamOptimized VMDK truncated: no footer"));
    }
    let foot = src
        .read_exact_at(end - 3 * SECTOR, 3 * SECTOR as usize)
        .await?;
    let fm = Marker::parse(&foot[..512])?;
    let eos = Marker::parse(&foot[1024..])?;
    if !matches!(
        fm,
        Marker::Meta {
            kind: MARKER_FOOTER,
            ..
        }
    ) || eos
        != (Marker::Meta {
            sectors: 0,
            kind: MARKER_EOS,
        })
    {
        return Err(Error::corrupt(
            "streamOptimized VMDK truncated or damaged: no footer and end-of-stream marker",
        )
        .with_offset(end - 3 * SECTOR));
    }
    let f = SparseHeader::parse(&foot[512..1024])?;
    if f.gd_offset == GD_AT_END {
        return Err(Error::corrupt("VMDK footer has no grain directory offset"));
    }
    if f.capacity != h.capacity || f.grain_size != h.grain_size {
        return Err(Error::corrupt("VMDK footer disagrees with header"));
    }
    Ok(f)
}

/// An allocated grain: guest grain index and file sector.
#[derive(Debug, Clone, Copy)]
struct Grain {
    index: u64,
    sector: u64,
}

/// Largest compressed grain accepted: twice the grain.
fn max_compressed(h: &SparseHeader) -> u64 {
    2 * h.grain_bytes()
}

/// Reads `len` bytes at `off` in pieces of at most `piece` bytes.
async fn read_big(src: &dyn ReadAt, off: u64, len: u64, piece: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len.min(64 << 20) as usize);
    let mut o = 0u64;
    while o < len {
        let n = (len - o).min(piece.max(4096) as u64) as usize;
        out.extend_from_slice(&src.read_exact_at(off + o, n).await?);
        o += n as u64;
    }
    Ok(out)
}

/// Whether `len` bytes at `sector` overlap the header sector or the embedded descriptor.
fn in_header(h: &SparseHeader, sector: u64, len: u64) -> bool {
    let end = sector.saturating_mul(SECTOR).saturating_add(len);
    let desc_start = h.descriptor_offset.saturating_mul(SECTOR);
    let desc_end = desc_start.saturating_add(h.descriptor_size.saturating_mul(SECTOR));
    sector == 0
        || (h.descriptor_size > 0 && sector.saturating_mul(SECTOR) < desc_end && end > desc_start)
}

/// Appends the allocated grains of grain table `gi` (raw entries in `table`), checking each
/// against the header and a file of `size` bytes.
fn parse_table(
    h: &SparseHeader,
    gi: u64,
    table: &[u8],
    size: u64,
    grains: &mut Vec<Grain>,
) -> Result<()> {
    let grain_count = h.grain_count();
    let cap = h.capacity_bytes();
    let gb = h.grain_bytes();
    for (j, c) in table.chunks_exact(4).enumerate() {
        let index = gi * u64::from(h.num_gtes_per_gt) + j as u64;
        if index >= grain_count {
            break;
        }
        let e = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if e == 0 || (e == GTE_ZEROED && h.zeroed_gte()) {
            continue;
        }
        let sector = u64::from(e);
        let need = if h.compressed() {
            12
        } else {
            gb.min(cap - index * gb)
        };
        if sector * SECTOR + need > size {
            return Err(Error::corrupt(format!(
                "VMDK grain {index} at sector {sector} beyond end of file"
            ))
            .with_offset(sector * SECTOR));
        }
        if in_header(h, sector, need) {
            return Err(
                Error::corrupt(format!("VMDK grain {index} points into the header"))
                    .with_offset(sector * SECTOR),
            );
        }
        grains.push(Grain { index, sector });
    }
    Ok(())
}

/// Reads the grain directory and grain tables; returns allocated grains in guest order and the
/// zeroed grains count. Every offset is checked against the file before it is used.
async fn read_grain_tables(
    src: &Arc<dyn ReadAt>,
    h: &SparseHeader,
    opts: &DecodeOptions,
) -> Result<Vec<Grain>> {
    let size = src.size();
    let gt_count = h.gt_count();
    let gd_bytes = gt_count * 4;
    let in_header = |sector: u64, len: u64| in_header(h, sector, len);
    if gt_count == 0 {
        return Ok(Vec::new());
    }
    if in_header(h.gd_offset, gd_bytes) {
        return Err(
            Error::corrupt("VMDK grain directory points into the header")
                .with_offset(h.gd_offset.saturating_mul(SECTOR)),
        );
    }
    let gd_start = h
        .gd_offset
        .checked_mul(SECTOR)
        .filter(|s| s.checked_add(gd_bytes).is_some_and(|e| e <= size))
        .ok_or_else(|| {
            Error::corrupt(format!(
                "VMDK grain directory ({gt_count} entries at sector {}) beyond end of file",
                h.gd_offset
            ))
        })?;
    let gd_raw = read_big(src.as_ref(), gd_start, gd_bytes, opts.read_size).await?;
    let gd: Vec<u32> = gd_raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    drop(gd_raw);
    let gt_bytes = u64::from(h.num_gtes_per_gt) * 4;
    // Distinct tables, sorted by file offset, every one inside the file.
    let mut tables: Vec<u64> = gd
        .iter()
        .filter(|&&e| e != 0)
        .map(|&e| u64::from(e))
        .collect();
    tables.sort_unstable();
    let n_before = tables.len();
    tables.dedup();
    if tables.len() != n_before {
        return Err(Error::corrupt(
            "VMDK grain directory names one grain table twice",
        ));
    }
    for &t in &tables {
        if in_header(t, gt_bytes) {
            return Err(
                Error::corrupt("VMDK grain table points into the header").with_offset(t * SECTOR)
            );
        }
        if t * SECTOR + gt_bytes > size {
            return Err(Error::corrupt(format!(
                "VMDK grain table at sector {t} beyond end of file ({size} bytes)"
            ))
            .with_offset(t * SECTOR));
        }
    }
    // Coalesce nearby tables into bigger reads.
    let span_max = (opts.read_size as u64).max(gt_bytes);
    let mut groups: Vec<(u64, u64)> = Vec::new(); // (start byte, end byte)
    for &t in &tables {
        let (s, e) = (t * SECTOR, t * SECTOR + gt_bytes);
        match groups.last_mut() {
            Some(g) if s <= g.1 + (64 << 10) && e - g.0 <= span_max => g.1 = g.1.max(e),
            _ => groups.push((s, e)),
        }
    }
    let bufs: Vec<(u64, Bytes)> = stream::iter(groups)
        .map(|(s, e)| {
            let src = src.clone();
            async move { Ok::<_, Error>((s, src.read_exact_at(s, (e - s) as usize).await?)) }
        })
        .buffered(opts.read_ahead.max(1) * 2)
        .try_collect()
        .await?;
    let table_at = |t: u64| -> Option<&[u8]> {
        let s = t * SECTOR;
        let i = bufs.partition_point(|(bs, _)| *bs <= s).checked_sub(1)?;
        let (bs, b) = &bufs[i];
        b.get((s - bs) as usize..(s - bs + gt_bytes) as usize)
    };
    let mut grains = Vec::new();
    for (gi, &t) in gd.iter().enumerate() {
        if t == 0 {
            continue;
        }
        let table =
            table_at(u64::from(t)).ok_or_else(|| Error::corrupt("VMDK grain table not read"))?;
        parse_table(h, gi as u64, table, size, &mut grains)?;
    }
    Ok(grains)
}

fn allocation_of(grains: &[Grain], gb: u64, cap: u64) -> AllocationMap {
    let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
    for g in grains {
        let s = g.index * gb;
        let e = (s + gb).min(cap);
        match ranges.last_mut() {
            Some(r) if r.end == s => r.end = e,
            _ => ranges.push(s..e),
        }
    }
    AllocationMap::from_ranges(ranges)
}

/// Inflates one zlib-wrapped grain into the front of `out` (its length is the most the grain
/// may inflate to); returns the inflated length.
fn inflate_into(data: &[u8], out: &mut [u8], d: &mut Decompress) -> Result<usize> {
    d.reset(true);
    loop {
        let (before_in, before_out) = (d.total_in(), d.total_out());
        let status = d
            .decompress(
                data.get(before_in as usize..).unwrap_or(&[]),
                out.get_mut(before_out as usize..).unwrap_or(&mut []),
                FlushDecompress::Finish,
            )
            .map_err(|e| Error::corrupt(format!("VMDK grain does not inflate: {e}")))?;
        match status {
            Status::StreamEnd => return Ok(d.total_out() as usize),
            Status::Ok | Status::BufError => {
                if d.total_in() == before_in && d.total_out() == before_out {
                    return Err(Error::corrupt(if d.total_out() as usize >= out.len() {
                        "VMDK grain inflates to more than the grain size"
                    } else {
                        "VMDK compressed grain truncated"
                    }));
                }
            }
        }
    }
}

/// Grains of one run inflated into one buffer at most.
const RUN_GRAINS: usize = 16;

/// Inflates grains in guest order into runs: a grain that continues the current run is
/// inflated straight into the run's buffer (pooled and page-aligned, see [`ReadBuf`]), so
/// contiguous grains reach the encoder as extents of up to [`RUN_GRAINS`] grains, without a
/// copy or an allocation per grain.
struct GrainRuns {
    d: Decompress,
    gb: usize,
    cap: u64,
    /// Short grains are zero-padded to the grain size (else the run ends after them).
    pad: bool,
    /// (guest offset, buffer, bytes filled)
    cur: Option<(u64, ReadBuf, usize)>,
    out: Vec<Extent>,
}

impl GrainRuns {
    fn new(gb: u64, cap: u64, pad: bool) -> Self {
        GrainRuns {
            d: Decompress::new(true),
            gb: gb as usize,
            cap,
            pad,
            cur: None,
            out: Vec::new(),
        }
    }

    fn flush(&mut self) {
        if let Some((o, b, n)) = self.cur.take()
            && n > 0
        {
            self.out.push(Extent::Data {
                offset: o,
                bytes: b.freeze(n),
            });
        }
    }

    /// Inflates the grain at guest offset `off`; `left` grains (this one included) remain in
    /// this batch, which sizes a new run's buffer.
    fn push(&mut self, off: u64, data: &[u8], left: usize) -> Result<()> {
        let gb = self.gb;
        let continues = matches!(&self.cur, Some((o, b, n))
            if *o + *n as u64 == off && b.as_ref().len() - n >= gb);
        if !continues {
            self.flush();
            let grains = left.clamp(1, RUN_GRAINS);
            self.cur = Some((off, ReadBuf::new(grains * gb), 0));
        }
        let Some((_, buf, n)) = self.cur.as_mut() else {
            return Err(Error::corrupt("VMDK grain run lost"));
        };
        let at = *n;
        let slot = &mut buf.as_mut()[at..at + gb];
        let mut len = inflate_into(data, slot, &mut self.d).map_err(|e| e.with_offset(off))?;
        // Zero bytes past the capacity are dropped; data there is corrupt.
        let room = self.cap.saturating_sub(off);
        if len as u64 > room {
            if !is_zero(&slot[room as usize..len]) {
                return Err(Error::corrupt("VMDK grain data beyond the capacity").with_offset(off));
            }
            len = room as usize;
        }
        let full = (gb as u64).min(room) as usize;
        if self.pad && len < full {
            slot[len..full].fill(0);
            len = full;
        }
        *n += len;
        if len < gb {
            // A short grain ends its run: the next grain does not start where it ends.
            self.flush();
        }
        Ok(())
    }

    fn finish(mut self) -> Vec<Extent> {
        self.flush();
        self.out
    }
}

/// Decodes a sparse VMDK read by ranges.
pub(crate) async fn decode_random(
    src: Arc<dyn ReadAt>,
    opts: &DecodeOptions,
) -> Result<DiskContent> {
    let head = src.read_at(0, 32).await?;
    if head.starts_with(b"# Disk DescriptorFile") {
        return Err(Error::unsupported(
            "a VMDK descriptor file is read with its extent files (an extent resolver)",
        ));
    }
    let h = read_sparse_header(src.as_ref()).await?;
    if h.compressed() && !h.markers() {
        return Err(Error::unsupported("compressed VMDK grains without markers"));
    }
    let grains = read_grain_tables(&src, &h, opts).await?;
    let gb = h.grain_bytes();
    let cap = h.capacity_bytes();
    let allocation = allocation_of(&grains, gb, cap);
    tracing::debug!(
        grains = grains.len(),
        capacity = cap,
        compressed = h.compressed(),
        "vmdk: grain tables read"
    );
    let read_size = (opts.read_size as u64).max(gb);
    let read_ahead = opts.read_ahead.max(1);
    let extents = if h.compressed() {
        // Batches of grains adjacent in the file.
        let maxc = max_compressed(&h);
        let mut batches: Vec<Vec<Grain>> = Vec::new();
        for g in grains {
            match batches.last_mut() {
                Some(b)
                    if b.last().is_some_and(|l| {
                        g.sector > l.sector && (g.sector - l.sector) * SECTOR <= 12 + maxc + SECTOR
                    }) && (g.sector - b[0].sector) * SECTOR < read_size =>
                {
                    b.push(g)
                }
                _ => batches.push(vec![g]),
            }
        }
        let h2 = h.clone();
        stream::iter(batches)
            .map(move |b| read_compressed_batch(src.clone(), h2.clone(), b))
            .buffered(read_ahead)
            .map_ok(|v| stream::iter(v.into_iter().map(Ok)))
            .try_flatten()
            .boxed()
    } else {
        let gs = h.grain_size;
        let mut runs: Vec<(u64, u64, u64)> = Vec::new(); // guest offset, file offset, len
        for g in grains {
            let off = g.index * gb;
            let len = gb.min(cap - off);
            match runs.last_mut() {
                Some(r)
                    if r.0 + r.2 == off
                        && r.1 + r.2 == g.sector * SECTOR
                        && r.2 + len <= read_size =>
                {
                    r.2 += len
                }
                _ => runs.push((off, g.sector * SECTOR, len)),
            }
        }
        let _ = gs;
        stream::iter(runs)
            .map(move |(off, foff, len)| {
                let src = src.clone();
                async move {
                    let bytes = src.read_exact_at(foff, len as usize).await?;
                    Ok(Extent::Data { offset: off, bytes })
                }
            })
            .buffered(read_ahead)
            .boxed()
    };
    Ok(DiskContent::new(cap, Some(allocation), extents))
}

async fn read_compressed_batch(
    src: Arc<dyn ReadAt>,
    h: SparseHeader,
    batch: Vec<Grain>,
) -> Result<Vec<Extent>> {
    let size = src.size();
    let maxc = max_compressed(&h);
    let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
        return Ok(Vec::new());
    };
    let start = first.sector * SECTOR;
    let end = (last.sector * SECTOR + 12 + maxc).min(size);
    let buf = src.read_exact_at(start, (end - start) as usize).await?;
    let mut jobs: Vec<(u64, Bytes)> = Vec::with_capacity(batch.len());
    for g in &batch {
        let at = g.sector * SECTOR;
        let rel = (at - start) as usize;
        let m = buf
            .get(rel..rel + 12)
            .ok_or_else(|| Error::corrupt("VMDK grain marker truncated").with_offset(at))?;
        let lba = u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]]);
        let csize = u64::from(u32::from_le_bytes([m[8], m[9], m[10], m[11]]));
        if lba != g.index * h.grain_size {
            return Err(Error::corrupt(format!(
                "VMDK grain marker says sector {lba}, grain table says {}",
                g.index * h.grain_size
            ))
            .with_offset(at));
        }
        if csize == 0 || csize > maxc {
            return Err(
                Error::corrupt(format!("VMDK compressed grain of {csize} bytes")).with_offset(at),
            );
        }
        if at + 12 + csize > size {
            return Err(Error::corrupt("VMDK compressed grain beyond end of file").with_offset(at));
        }
        let data = match buf.get(rel + 12..rel + 12 + csize as usize) {
            Some(_) => buf.slice(rel + 12..rel + 12 + csize as usize),
            None => src.read_exact_at(at + 12, csize as usize).await?,
        };
        jobs.push((g.index, data));
    }
    drop(buf);
    let gb = h.grain_bytes();
    let cap = h.capacity_bytes();
    tokio::task::spawn_blocking(move || -> Result<Vec<Extent>> {
        // Short grains read as zero-padded.
        let mut runs = GrainRuns::new(gb, cap, true);
        let n = jobs.len();
        for (i, (index, data)) in jobs.into_iter().enumerate() {
            runs.push(index * gb, &data, n - i)?;
        }
        Ok(runs.finish())
    })
    .await
    .map_err(join_err)?
}

/// Reads the bytes of an image file arriving as a stream of file extents, in order.
pub(crate) struct SeqReader {
    stream: ExtentStream,
    /// File offset of the next byte handed out.
    pos: u64,
    /// Zero bytes (a hole or a gap) to hand out before `buf`.
    zeros: u64,
    buf: Bytes,
    eof: bool,
}

impl SeqReader {
    pub(crate) fn new(stream: ExtentStream) -> Self {
        SeqReader {
            stream,
            pos: 0,
            zeros: 0,
            buf: Bytes::new(),
            eof: false,
        }
    }

    /// File offset of the next byte.
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    /// Makes sure something is buffered; false at the end of the stream.
    async fn fill(&mut self) -> Result<bool> {
        while self.zeros == 0 && self.buf.is_empty() {
            if self.eof {
                return Ok(false);
            }
            let Some(item) = self.stream.next().await else {
                self.eof = true;
                return Ok(false);
            };
            let e = item?;
            if e.offset() < self.pos {
                return Err(Error::corrupt("image stream goes backwards").with_offset(e.offset()));
            }
            self.zeros = e.offset() - self.pos;
            match e {
                Extent::Data { bytes, .. } => self.buf = bytes,
                Extent::Zero { len, .. } => self.zeros = self.zeros.saturating_add(len),
            }
        }
        Ok(true)
    }

    /// Reads exactly `n` bytes, or fails with `Corrupt` at the end of the stream.
    pub(crate) async fn read_exact(&mut self, n: usize) -> Result<Bytes> {
        if !self.fill().await? {
            return Err(self.truncated());
        }
        if self.zeros == 0 && self.buf.len() >= n {
            self.pos += n as u64;
            return Ok(self.buf.split_to(n));
        }
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            if !self.fill().await? {
                return Err(self.truncated());
            }
            let want = n - out.len();
            if self.zeros > 0 {
                let k = self.zeros.min(want as u64) as usize;
                out.resize(out.len() + k, 0);
                self.zeros -= k as u64;
                self.pos += k as u64;
            } else {
                let k = self.buf.len().min(want);
                out.extend_from_slice(&self.buf.split_to(k));
                self.pos += k as u64;
            }
        }
        Ok(out.freeze())
    }

    /// Skips `n` bytes.
    pub(crate) async fn skip(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            if !self.fill().await? {
                return Err(self.truncated());
            }
            if self.zeros > 0 {
                let k = self.zeros.min(n);
                self.zeros -= k;
                self.pos += k;
                n -= k;
            } else {
                let k = (self.buf.len() as u64).min(n);
                let _ = self.buf.split_to(k as usize);
                self.pos += k;
                n -= k;
            }
        }
        Ok(())
    }

    fn truncated(&self) -> Error {
        Error::corrupt("VMDK stream truncated").with_offset(self.pos)
    }
}

/// Grains handed to one inflate worker.
const SEQ_BATCH_GRAINS: usize = 16;
/// Compressed bytes handed to one inflate worker (at most, plus one grain).
const SEQ_BATCH_BYTES: usize = 1 << 20;

/// Parser state of a streamOptimized stream.
struct SeqParser {
    r: SeqReader,
    h: SparseHeader,
    next_lba: u64,
    done: bool,
}

impl SeqParser {
    /// Reads markers up to the next batch of compressed grains (LBA, data).
    async fn next_batch(&mut self) -> Result<Option<Vec<(u64, Bytes)>>> {
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        let maxc = max_compressed(&self.h);
        while !self.done && batch.len() < SEQ_BATCH_GRAINS && bytes < SEQ_BATCH_BYTES {
            let at = self.r.pos();
            let m = self.r.read_exact(12).await.map_err(|e| {
                Error::corrupt("streamOptimized VMDK truncated: no end-of-stream marker")
                    .with_offset(e.context().offset.unwrap_or(at))
            })?;
            let val = u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]]);
            let size = u32::from_le_bytes([m[8], m[9], m[10], m[11]]);
            if size != 0 {
                let csize = u64::from(size);
                if csize > maxc {
                    return Err(
                        Error::corrupt(format!("VMDK compressed grain of {csize} bytes"))
                            .with_offset(at),
                    );
                }
                if val % self.h.grain_size != 0 || val >= self.h.capacity {
                    return Err(Error::corrupt(format!(
                        "VMDK grain at sector {val} misaligned or beyond capacity"
                    ))
                    .with_offset(at));
                }
                if val < self.next_lba {
                    return Err(Error::corrupt(format!(
                        "VMDK grain at sector {val} out of order (expected >= {})",
                        self.next_lba
                    ))
                    .with_offset(at));
                }
                self.next_lba = val + self.h.grain_size;
                let data = self.r.read_exact(csize as usize).await?;
                let used = 12 + csize;
                self.r.skip(used.next_multiple_of(SECTOR) - used).await?;
                bytes += data.len();
                batch.push((val, data));
                continue;
            }
            let t = self.r.read_exact(4).await?;
            let kind = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
            self.r.skip(SECTOR - 16).await?;
            match kind {
                MARKER_EOS => self.done = true,
                MARKER_GT | MARKER_GD | MARKER_FOOTER => {
                    let n = val.checked_mul(SECTOR).ok_or_else(|| {
                        Error::corrupt("VMDK metadata marker too large").with_offset(at)
                    })?;
                    self.r.skip(n).await?;
                }
                other => {
                    return Err(
                        Error::corrupt(format!("VMDK marker of unknown type {other}"))
                            .with_offset(at),
                    );
                }
            }
        }
        Ok(if batch.is_empty() { None } else { Some(batch) })
    }
}

/// Decodes a streamOptimized VMDK read strictly once, in order.
pub(crate) async fn decode_sequential(
    size: Option<u64>,
    stream: ExtentStream,
    opts: &DecodeOptions,
) -> Result<DiskContent> {
    let mut r = SeqReader::new(stream);
    let head = r.read_exact(SECTOR as usize).await?;
    let h = SparseHeader::parse(&head)?;
    if !h.markers() {
        return decode_sequential_sparse(r, h, size, opts).await;
    }
    if !h.compressed() {
        return Err(Error::unsupported(
            "VMDK with markers but uncompressed grains",
        ));
    }
    // Markers start after the metadata (`overHead`), and never inside the embedded descriptor.
    let desc_end = h
        .descriptor_offset
        .saturating_add(h.descriptor_size)
        .saturating_mul(SECTOR);
    let start = h
        .overhead
        .saturating_mul(SECTOR)
        .max(SECTOR)
        .max(if h.descriptor_size > 0 { desc_end } else { 0 });
    if size.is_some_and(|s| start > s) {
        return Err(Error::corrupt("VMDK overhead beyond end of file"));
    }
    r.skip(start - SECTOR).await?;
    let cap = h.capacity_bytes();
    let gb = h.grain_bytes();
    let parser = SeqParser {
        r,
        h,
        next_lba: 0,
        done: false,
    };
    let workers = opts.read_ahead.max(1) * 2;
    let extents = stream::try_unfold(parser, |mut p| async move {
        Ok(p.next_batch().await?.map(|b| (b, p)))
    })
    .map_ok(move |batch| async move {
        tokio::task::spawn_blocking(move || -> Result<Vec<Extent>> {
            let mut runs = GrainRuns::new(gb, cap, false);
            let n = batch.len();
            for (i, (lba, data)) in batch.into_iter().enumerate() {
                runs.push(lba * SECTOR, &data, n - i)?;
            }
            Ok(runs.finish())
        })
        .await
        .map_err(join_err)?
    })
    .try_buffered(workers)
    .map_ok(|v| stream::iter(v.into_iter().map(Ok)))
    .try_flatten()
    .boxed();
    Ok(DiskContent::new(cap, None, extents))
}

/// Most grain directory plus grain table bytes a monolithicSparse stream may make us hold
/// (32 MiB of tables map 512 GiB of 64 KiB grains).
const MAX_SEQ_METADATA: u64 = 32 << 20;

/// A monolithicSparse file arriving as a stream: the grain directory and tables come before the
/// grains, so they are read first; the grains must then follow in guest order (what qemu-img and
/// our encoder write). Anything else needs random access and is `Unsupported`.
async fn decode_sequential_sparse(
    mut r: SeqReader,
    h: SparseHeader,
    size: Option<u64>,
    opts: &DecodeOptions,
) -> Result<DiskContent> {
    let needs_random = |why: &str| {
        Error::unsupported(format!(
            "this monolithicSparse VMDK needs random access ({why}); it cannot be read as a stream"
        ))
    };
    if h.compressed() {
        return Err(Error::unsupported("compressed VMDK grains without markers"));
    }
    if h.gd_offset == GD_AT_END {
        return Err(Error::corrupt("VMDK grain directory at end but no markers"));
    }
    let limit = size.unwrap_or(u64::MAX);
    let gt_count = h.gt_count();
    let gd_bytes = gt_count * 4;
    let gt_bytes = u64::from(h.num_gtes_per_gt) * 4;
    let cap = h.capacity_bytes();
    let gb = h.grain_bytes();
    let mut grains: Vec<Grain> = Vec::new();
    if gt_count > 0 {
        if in_header(&h, h.gd_offset, gd_bytes) {
            return Err(Error::corrupt(
                "VMDK grain directory points into the header",
            ));
        }
        let gd_start = h
            .gd_offset
            .checked_mul(SECTOR)
            .filter(|s| s.checked_add(gd_bytes).is_some_and(|e| e <= limit))
            .ok_or_else(|| Error::corrupt("VMDK grain directory beyond end of file"))?;
        if gd_bytes > MAX_SEQ_METADATA {
            return Err(needs_random("grain directory too large"));
        }
        if gd_start < r.pos() {
            return Err(needs_random("grain directory before the read position"));
        }
        r.skip(gd_start - r.pos()).await?;
        let mut gd: Vec<u32> = Vec::new();
        let mut left = gd_bytes;
        while left > 0 {
            let n = left.min(1 << 20);
            let b = r.read_exact(n as usize).await?;
            gd.extend(
                b.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            left -= n;
        }
        let mut tables: Vec<(u64, u64)> = gd
            .iter()
            .enumerate()
            .filter(|(_, t)| **t != 0)
            .map(|(gi, t)| (u64::from(*t), gi as u64))
            .collect();
        drop(gd);
        tables.sort_unstable();
        if tables.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(Error::corrupt(
                "VMDK grain directory names one grain table twice",
            ));
        }
        if tables.len() as u64 * gt_bytes > MAX_SEQ_METADATA {
            return Err(needs_random("grain tables too large"));
        }
        for (t, gi) in tables {
            if in_header(&h, t, gt_bytes) {
                return Err(Error::corrupt("VMDK grain table points into the header"));
            }
            if t * SECTOR + gt_bytes > limit {
                return Err(Error::corrupt(format!(
                    "VMDK grain table at sector {t} beyond end of file"
                )));
            }
            if t * SECTOR < r.pos() {
                return Err(needs_random("grain table before the grain directory"));
            }
            r.skip(t * SECTOR - r.pos()).await?;
            let table = r.read_exact(gt_bytes as usize).await?;
            parse_table(&h, gi, &table, limit, &mut grains)?;
        }
        grains.sort_unstable_by_key(|g| g.sector);
        for w in grains.windows(2) {
            if w[1].sector < w[0].sector + h.grain_size {
                return Err(Error::corrupt("VMDK grains overlap in the file")
                    .with_offset(w[1].sector * SECTOR));
            }
            if w[1].index <= w[0].index {
                return Err(needs_random("grains not in guest order"));
            }
        }
        if grains.first().is_some_and(|g| g.sector * SECTOR < r.pos()) {
            return Err(needs_random("grains before the grain tables"));
        }
    }
    let allocation = allocation_of(&grains, gb, cap);
    let _ = opts;
    let extents = stream::try_unfold((r, grains.into_iter()), move |(mut r, mut it)| async move {
        let Some(g) = it.next() else {
            return Ok(None);
        };
        let off = g.index * gb;
        let len = gb.min(cap - off);
        r.skip(g.sector * SECTOR - r.pos()).await?;
        let bytes = r.read_exact(len as usize).await?;
        Ok(Some((Extent::Data { offset: off, bytes }, (r, it))))
    })
    .boxed();
    Ok(DiskContent::new(cap, Some(allocation), extents))
}

/// Decodes a monolithicFlat descriptor and its flat extents.
pub(crate) async fn decode_flat(
    descriptor: Arc<dyn ReadAt>,
    resolver: Arc<dyn ExtentResolver>,
    opts: &DecodeOptions,
) -> Result<DiskContent> {
    let d = read_descriptor(descriptor.as_ref()).await?;
    if d.extents.is_empty() {
        return Err(Error::corrupt("VMDK descriptor names no extent"));
    }
    if let Some(parent) = d.get("parentCID")
        && !parent.eq_ignore_ascii_case("ffffffff")
    {
        return Err(Error::unsupported(format!(
            "this VMDK is a delta disk of a parent ({}): consolidate the snapshot chain (or \
             convert the chain with qemu-img) and export the result",
            d.get("parentFileNameHint").unwrap_or("parentCID {parent}")
        )));
    }
    // The extents in guest order, each one stream; sparse extents are decoded up front (their
    // grain tables give the allocation map), their grains read when the stream gets there.
    let mut parts: Vec<ExtentStream> = Vec::new();
    let mut alloc = Vec::new();
    let mut guest = 0u64;
    let piece = opts.read_size.max(4096) as u64;
    for e in &d.extents {
        let len = e.sectors * SECTOR;
        match e.kind {
            ExtentKind::Zero => {}
            ExtentKind::Flat => {
                let name = e.file.as_deref().unwrap_or("");
                check_extent_name(name)?;
                let f = resolver.open(name).await?;
                let foff = e.offset * SECTOR;
                if foff + len > f.size() {
                    return Err(Error::corrupt(format!(
                        "flat extent '{name}' has {} bytes, descriptor needs {}",
                        f.size(),
                        foff + len
                    )));
                }
                let ranges: Vec<std::ops::Range<u64>> = match f.data_ranges().await? {
                    Some(r) => AllocationMap::from_ranges(r)
                        .ranges()
                        .iter()
                        .filter_map(|r| {
                            let s = r.start.max(foff);
                            let en = r.end.min(foff + len);
                            (en > s).then_some(s..en)
                        })
                        .collect(),
                    None => std::iter::once(foff..foff + len).collect(),
                };
                // (guest offset, file offset, len)
                let mut pieces: Vec<(u64, u64, u64)> = Vec::new();
                for r in ranges {
                    let g = guest + (r.start - foff);
                    alloc.push(g..g + (r.end - r.start));
                    let mut o = r.start;
                    while o < r.end {
                        let n = piece.min(r.end - o);
                        pieces.push((guest + (o - foff), o, n));
                        o += n;
                    }
                }
                parts.push(
                    stream::iter(pieces)
                        .map(move |(g, o, n)| {
                            let f = f.clone();
                            async move {
                                let bytes = f.read_exact_at(o, n as usize).await?;
                                Ok(Extent::Data { offset: g, bytes })
                            }
                        })
                        .buffered(opts.read_ahead.max(1))
                        .boxed(),
                );
            }
            // A hosted sparse extent (twoGbMaxExtentSparse): a monolithicSparse file of its own.
            ExtentKind::Sparse if e.kind_name.eq_ignore_ascii_case("SPARSE") => {
                let name = e.file.as_deref().unwrap_or("");
                check_extent_name(name)?;
                let f = resolver.open(name).await?;
                let head = f.read_at(0, 4).await?;
                if head.as_ref() != b"KDMV" {
                    return Err(Error::corrupt(format!(
                        "sparse extent '{name}' has no sparse extent header"
                    )));
                }
                let c = Box::pin(decode_random(f, opts)).await?;
                if c.virtual_size != len {
                    return Err(Error::corrupt(format!(
                        "sparse extent '{name}' holds {} bytes, the descriptor says {len}",
                        c.virtual_size
                    )));
                }
                match &c.allocation {
                    Some(m) => {
                        alloc.extend(m.ranges().iter().map(|r| r.start + guest..r.end + guest))
                    }
                    None => alloc.push(guest..guest + len),
                }
                let base = guest;
                parts.push(
                    c.extents
                        .map_ok(move |x| match x {
                            Extent::Data { offset, bytes } => Extent::Data {
                                offset: offset + base,
                                bytes,
                            },
                            Extent::Zero { offset, len } => Extent::Zero {
                                offset: offset + base,
                                len,
                            },
                        })
                        .boxed(),
                );
            }
            ExtentKind::Sparse | ExtentKind::Other => {
                return Err(Error::unsupported(format!(
                    "VMDK extent type {} in a descriptor",
                    e.kind_name
                )));
            }
        }
        guest += len;
    }
    Ok(DiskContent::new(
        guest,
        Some(AllocationMap::from_ranges(alloc)),
        stream::iter(parts).flatten().boxed(),
    ))
}

async fn read_descriptor(src: &dyn ReadAt) -> Result<Descriptor> {
    if src.size() > MAX_DESCRIPTOR as u64 {
        return Err(Error::corrupt(format!(
            "VMDK descriptor of {} bytes (at most {MAX_DESCRIPTOR})",
            src.size()
        )));
    }
    let text = src.read_at(0, src.size() as usize).await?;
    Descriptor::parse(&text)
}

/// Virtual size from a sparse header or a descriptor.
pub(crate) async fn probe(src: &dyn ReadAt) -> Result<u64> {
    let head = src.read_at(0, SECTOR as usize).await?;
    if head.starts_with(&MAGIC) {
        return Ok(SparseHeader::parse(&head)?.capacity_bytes());
    }
    if head.starts_with(b"# Disk DescriptorFile") {
        return Ok(read_descriptor(src).await?.virtual_size());
    }
    Err(Error::corrupt("not a VMDK image"))
}

#[cfg(test)]
mod grain_run_tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::ZlibEncoder;
    use std::io::Write;

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn data_of(extents: &[Extent]) -> Vec<(u64, Vec<u8>)> {
        extents
            .iter()
            .map(|e| match e {
                Extent::Data { offset, bytes } => (*offset, bytes.to_vec()),
                Extent::Zero { .. } => panic!("a zero extent from inflated grains"),
            })
            .collect()
    }

    #[test]
    fn a_grain_larger_than_its_slot_or_cut_short_is_corrupt() {
        let mut d = Decompress::new(true);
        let mut slot = vec![0u8; 4096];
        let e = inflate_into(&zlib(&[7u8; 4097]), &mut slot, &mut d).unwrap_err();
        assert!(e.to_string().contains("more than the grain size"), "{e}");
        let z = zlib(&crate::testdata::noise(3, 4096));
        let e = inflate_into(&z[..z.len() - 9], &mut slot, &mut d).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        // exactly the slot's size is fine
        assert_eq!(inflate_into(&z, &mut slot, &mut d).unwrap(), 4096);
        assert_eq!(slot, crate::testdata::noise(3, 4096));
    }

    #[test]
    fn contiguous_grains_share_one_buffer_and_gaps_start_a_new_run() {
        let gb = 4096u64;
        let g = |seed| crate::testdata::noise(seed, gb as usize);
        let mut r = GrainRuns::new(gb, 64 * gb, false);
        r.push(0, &zlib(&g(1)), 4).unwrap();
        r.push(gb, &zlib(&g(2)), 3).unwrap();
        r.push(5 * gb, &zlib(&g(3)), 2).unwrap();
        r.push(6 * gb, &zlib(&g(4)[..100]), 1).unwrap();
        let got = data_of(&r.finish());
        assert_eq!(
            got,
            vec![
                (0, [g(1), g(2)].concat()),
                (5 * gb, [g(3), g(4)[..100].to_vec()].concat()),
            ]
        );
    }

    #[test]
    fn more_grains_than_one_run_holds_continue_in_a_new_run() {
        let gb = 4096u64;
        let n = RUN_GRAINS + 3;
        let mut r = GrainRuns::new(gb, 64 * gb, false);
        for i in 0..n {
            r.push(i as u64 * gb, &zlib(&[i as u8 + 1; 4096]), n - i)
                .unwrap();
        }
        let got = data_of(&r.finish());
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1.len(), RUN_GRAINS * 4096);
        assert_eq!(got[1].0, RUN_GRAINS as u64 * gb);
        let flat: Vec<u8> = got.into_iter().flat_map(|(_, b)| b).collect();
        let want: Vec<u8> = (0..n).flat_map(|i| vec![i as u8 + 1; 4096]).collect();
        assert_eq!(flat, want);
    }

    #[test]
    fn short_grains_pad_when_asked_and_the_capacity_clips_zeros_only() {
        let gb = 4096u64;
        let mut r = GrainRuns::new(gb, 10_000, true);
        r.push(0, &zlib(&[5u8; 100]), 3).unwrap();
        r.push(gb, &zlib(&[6u8; 4096]), 2).unwrap();
        // the last grain crosses the capacity (10 000): zeros past it are dropped
        let mut last = vec![7u8; 10_000 - 2 * 4096];
        last.resize(4096, 0);
        r.push(2 * gb, &zlib(&last), 1).unwrap();
        let got = data_of(&r.finish());
        let mut want = vec![5u8; 100];
        want.resize(4096, 0);
        want.extend_from_slice(&[6u8; 4096]);
        want.extend_from_slice(&[7u8; 10_000 - 2 * 4096]);
        assert_eq!(got, vec![(0, want)]);

        let mut r = GrainRuns::new(gb, 10_000, true);
        let e = r.push(2 * gb, &zlib(&[7u8; 4096]), 1).unwrap_err();
        assert!(e.to_string().contains("beyond the capacity"), "{e}");
    }
}
