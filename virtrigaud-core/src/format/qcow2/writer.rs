//! The sequential qcow2 v3 encoder, uncompressed (one pass) or compressed (two passes).
//!
//! Output layout, in file order: header cluster, refcount table, refcount blocks, L1 table, L2
//! tables (one per L1 entry that covers stored clusters), then the data of the stored guest
//! clusters, in guest order. The file ends right after the last data byte (rounded up to a
//! 512-byte sector), so `qemu-img check` finds no leak. The writer never seeks: everything the
//! tables say is computed before the first byte is written, which is what lets the output flow
//! straight into a multipart upload, hashed on the way. The output is deterministic.
//!
//! # Uncompressed (one pass)
//!
//! The stored clusters are the allocation map ([`DiskContent::allocation`]) rounded out to
//! clusters (every cluster without a map), one data cluster each: the whole layout follows
//! from the map, and every cluster of the file has refcount 1.
//!
//! # Compressed (two passes over a re-readable source)
//!
//! A compressed cluster's L2 entry holds the byte offset and the sector count of its deflate
//! stream, and every host cluster's refcount counts the compressed clusters that touch it, so
//! the tables written first depend on compressed sizes known only after compressing. The
//! encoder therefore needs [`DiskContent::replay`] (a random-access source; without it:
//! `Unsupported`, since a stream can be read only once) and makes two passes:
//!
//! 1. **Sizing pass** over a replay of the source: every guest cluster holding a non-zero byte
//!    is deflated (in parallel, [`EncodeOptions::parallelism`] workers) and only its
//!    compressed length is kept: 2 bytes per stored cluster (4 with clusters above 64 KiB)
//!    plus 16 bytes per run of consecutive stored clusters: 32 MiB for 1 TiB of contiguous
//!    data in 64 KiB clusters, 288 MiB at worst (every other cluster stored), and 16× that with
//!    4 KiB clusters. It grows with the data, unlike the rest of the pipeline: prefer 64 KiB
//!    or larger clusters for compressed output of big disks. All-zero clusters stay unallocated (they read as zeros), whatever the
//!    allocation map says.
//! 2. **Writing pass** over [`DiskContent::extents`]: the exact layout and refcounts are
//!    computed from the sizes, the metadata is written, then every cluster is deflated again
//!    (deflate is deterministic) and written. A cluster whose compressed length differs from
//!    the sizing pass means the source changed between the passes: `Corrupt`, never an
//!    inconsistent image.
//!
//! Data area: clusters in guest order; a compressed cluster is packed right after the previous
//! one at byte granularity (it may cross a host cluster boundary); a cluster whose deflate
//! stream would not be shorter than the cluster (and any cluster the cheap incompressibility
//! test rejects) is stored as a normal cluster, aligned to a cluster boundary with zero
//! padding. Compressed streams are raw deflate (no zlib header) with a 4 KiB window (window
//! bits 12), like qemu's, whose inflate is set up for exactly that window; the header's
//! compression type is zlib (no incompatible feature bit). Compressed descriptors have bit 62
//! set, the byte offset in bits `0..x` and the number of additional 512-byte sectors in bits
//! `x..62`, `x = 62 - (cluster_bits - 8)`; no COPIED flag. Refcounts: 1 for metadata and normal
//! clusters, and for a host cluster holding compressed data, the number of compressed
//! clusters whose bytes touch it (qemu's rule, checked exactly by `qemu-img check`). Every
//! cluster size qcow2 allows (512 B to 2 MiB) works: a stream shorter than the cluster always
//! fits the sector count field.
//!
//! Costs: the data is read twice and compressed twice (CPU about twice qemu's compression
//! work, spread over the cores); progress reports cover the writing pass only.

use super::header::{Compression, Header, MAX_L1_BYTES};
use crate::extent::{DiskContent, Extent, ExtentStream, Replay};
use crate::format::deflate::{compress_blocks, deflate_into, incompressible, sampler};
use crate::format::{Chunk, ChunkStream, EncodeOptions};
use crate::{Error, Result};
use bytes::{Bytes, BytesMut};
use flate2::Compress;
use futures::stream::{self, StreamExt, TryStreamExt};
use std::collections::VecDeque;
use std::sync::Arc;

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// Data pieces smaller than this are gathered before they are emitted.
const MIN_CHUNK: usize = 1 << 20;
/// Refcount order written (16-bit refcounts, like qemu-img).
const REFCOUNT_ORDER: u32 = 4;
/// Largest refcount a 16-bit entry holds.
const MAX_REFCOUNT: u64 = u16::MAX as u64;
/// Window of the deflate streams written (qemu inflates with a 4 KiB window).
const WINDOW_BITS: u8 = 12;
/// Cluster bytes handed to one compression worker at a time.
const BATCH_BYTES: u64 = 1 << 20;

/// Checks the cluster size and virtual size; returns the cluster bits and the L1 size.
fn geometry(vsize: u64, cluster_size: u32) -> Result<(u32, u64)> {
    if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
        return Err(Error::invalid(format!(
            "qcow2 cluster size {cluster_size} must be a power of two from 512 B to 2 MiB"
        )));
    }
    if vsize > super::header::MAX_VIRTUAL_SIZE {
        return Err(Error::invalid("virtual size too large for qcow2"));
    }
    let cs = u64::from(cluster_size);
    let l1_size = vsize.div_ceil(cs).div_ceil(cs / 8);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(Error::invalid(format!(
            "virtual size {vsize} needs an L1 table larger than {MAX_L1_BYTES} bytes with {cs}-byte clusters; use larger clusters"
        )));
    }
    Ok((cluster_size.trailing_zeros(), l1_size))
}

/// Compressed lengths of the stored clusters of a compressed image, one entry per stored
/// cluster in guest order: 0 for a cluster stored as is (a normal cluster), else the length of
/// its deflate stream (always below the cluster size). Two bytes an entry up to 64 KiB
/// clusters, four above.
#[derive(Debug)]
pub(crate) enum Sizes {
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl Sizes {
    fn new(cs: u64) -> Sizes {
        if cs <= 1 << 16 {
            Sizes::U16(Vec::new())
        } else {
            Sizes::U32(Vec::new())
        }
    }
    /// Appends an entry; `v` is below the cluster size, so it fits.
    fn push(&mut self, v: u32) {
        match self {
            Sizes::U16(s) => s.push(v as u16),
            Sizes::U32(s) => s.push(v),
        }
    }
    fn get(&self, i: usize) -> u64 {
        match self {
            Sizes::U16(s) => s.get(i).map_or(0, |&v| u64::from(v)),
            Sizes::U32(s) => s.get(i).map_or(0, |&v| u64::from(v)),
        }
    }
    fn len(&self) -> usize {
        match self {
            Sizes::U16(s) => s.len(),
            Sizes::U32(s) => s.len(),
        }
    }
}

/// Where one stored guest cluster goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Placed {
    /// Guest cluster index.
    guest: u64,
    /// Byte offset in the data area.
    host: u64,
    /// Bytes it occupies (the cluster size for a normal cluster).
    len: u64,
    /// Whether it is a deflate stream.
    compressed: bool,
}

/// Walks the stored clusters in guest order and places them in the data area.
#[derive(Debug, Default, Clone)]
struct Placer {
    /// Range index.
    k: usize,
    /// Position inside range `k`.
    off: u64,
    /// Stored clusters placed so far.
    n: usize,
    /// End of the data placed so far.
    pos: u64,
    peeked: Option<Placed>,
}

impl Placer {
    fn next(&mut self, l: &Layout) -> Option<Placed> {
        if let Some(p) = self.peeked.take() {
            return Some(p);
        }
        let &(s, e) = l.ranges.get(self.k)?;
        let guest = s + self.off;
        let size = l.sizes.as_ref().map_or(0, |z| z.get(self.n));
        let p = if size == 0 {
            Placed {
                guest,
                host: self.pos.next_multiple_of(l.cs),
                len: l.cs,
                compressed: false,
            }
        } else {
            Placed {
                guest,
                host: self.pos,
                len: size,
                compressed: true,
            }
        };
        self.pos = p.host + p.len;
        self.n += 1;
        self.off += 1;
        if guest + 1 >= e {
            self.k += 1;
            self.off = 0;
        }
        Some(p)
    }

    fn peek(&mut self, l: &Layout) -> Option<Placed> {
        if self.peeked.is_none() {
            self.peeked = self.next(l);
        }
        self.peeked
    }
}

/// Refcounts of the data area's host clusters, asked in increasing order.
#[derive(Debug, Default)]
struct Refcounts {
    placer: Placer,
    /// Refcount of data clusters `base..`, as far as known.
    counts: VecDeque<u64>,
    base: u64,
}

impl Refcounts {
    /// Refcount of data cluster `j` (relative to the data area); `j` never decreases.
    fn get(&mut self, l: &Layout, j: u64) -> u64 {
        while let Some(p) = self.placer.peek(l) {
            let first = p.host / l.cs;
            if first > j {
                break;
            }
            self.placer.next(l);
            let last = (p.host + p.len - 1) / l.cs;
            for c in first.max(self.base)..=last {
                let i = (c - self.base) as usize;
                if self.counts.len() <= i {
                    self.counts.resize(i + 1, 0);
                }
                self.counts[i] += 1;
            }
        }
        while self.base < j {
            self.counts.pop_front();
            self.base += 1;
        }
        self.counts.front().copied().unwrap_or(0)
    }
}

/// Where everything goes.
#[derive(Debug)]
pub(crate) struct Layout {
    cluster_bits: u32,
    cs: u64,
    vsize: u64,
    /// Stored guest clusters, as sorted, disjoint cluster-index ranges.
    ranges: Vec<(u64, u64)>,
    /// Compressed image: the size of each stored cluster.
    sizes: Option<Sizes>,
    l1_size: u64,
    /// L1 indices that get an L2 table, in order.
    l2_tables: Vec<u64>,
    rt_clusters: u64,
    rb_clusters: u64,
    l1_clusters: u64,
    /// Host clusters of the data area.
    data_clusters: u64,
    /// Bytes of the data area (the file ends there).
    data_len: u64,
    total: u64,
}

impl Layout {
    /// Layout of an uncompressed image: one data cluster per allocated cluster.
    pub(crate) fn new(
        content_alloc: Option<&crate::extent::AllocationMap>,
        vsize: u64,
        cluster_size: u32,
    ) -> Result<Layout> {
        geometry(vsize, cluster_size)?;
        let cs = u64::from(cluster_size);
        let guest_clusters = vsize.div_ceil(cs);
        let ranges: Vec<(u64, u64)> = match content_alloc {
            Some(m) => m
                .aligned(cs, vsize)
                .ranges()
                .iter()
                .map(|r| (r.start / cs, r.end.div_ceil(cs)))
                .filter(|(s, e)| e > s)
                .collect(),
            None if guest_clusters > 0 => vec![(0, guest_clusters)],
            None => vec![],
        };
        Layout::build(vsize, cluster_size, ranges, None)
    }

    /// Layout of a compressed image: `ranges` are the stored clusters, `sizes` their sizes.
    pub(crate) fn compressed(
        vsize: u64,
        cluster_size: u32,
        ranges: Vec<(u64, u64)>,
        sizes: Sizes,
    ) -> Result<Layout> {
        Layout::build(vsize, cluster_size, ranges, Some(sizes))
    }

    fn build(
        vsize: u64,
        cluster_size: u32,
        ranges: Vec<(u64, u64)>,
        sizes: Option<Sizes>,
    ) -> Result<Layout> {
        let (cluster_bits, l1_size) = geometry(vsize, cluster_size)?;
        let cs = u64::from(cluster_size);
        let stored: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        if let Some(z) = &sizes
            && z.len() as u64 != stored
        {
            return Err(Error::new(
                crate::ErrorKind::Io,
                format!("qcow2 layout: {} sizes for {stored} clusters", z.len()),
            ));
        }
        let l2e = cs / 8;
        let mut l2_tables: Vec<u64> = Vec::new();
        for (s, e) in &ranges {
            for i in s / l2e..=(e - 1) / l2e {
                if l2_tables.last() != Some(&i) {
                    l2_tables.push(i);
                }
            }
        }
        let mut l = Layout {
            cluster_bits,
            cs,
            vsize,
            ranges,
            sizes,
            l1_size,
            l2_tables,
            rt_clusters: 1,
            rb_clusters: 1,
            // No L1 cluster for an empty disk: nothing would reference it (a leak).
            l1_clusters: (l1_size * 8).div_ceil(cs),
            data_clusters: 0,
            data_len: 0,
            total: 0,
        };
        // The data area, relative to its (cluster-aligned) start, does not depend on where
        // it starts: place everything once.
        l.data_len = if l.sizes.is_some() {
            let mut p = Placer::default();
            while p.next(&l).is_some() {}
            p.pos.next_multiple_of(512)
        } else {
            stored * cs
        };
        l.data_clusters = l.data_len.div_ceil(cs);
        let epb = cs * 8 / (1 << REFCOUNT_ORDER);
        let (mut rt, mut rb) = (1u64, 1u64);
        l.total = loop {
            let total = 1 + rt + rb + l.l1_clusters + l.l2_tables.len() as u64 + l.data_clusters;
            let nrb = total.div_ceil(epb);
            let nrt = (nrb * 8).div_ceil(cs);
            if nrb <= rb && nrt <= rt {
                break total;
            }
            rb = rb.max(nrb);
            rt = rt.max(nrt);
        };
        l.rt_clusters = rt;
        l.rb_clusters = rb;
        if l.sizes.is_some() {
            // Offsets must fit the descriptor's offset field; refcounts their 16 bits.
            let x = 62 - (cluster_bits - 8);
            if l.file_size() >= 1 << x {
                return Err(Error::unsupported(format!(
                    "compressed qcow2 image of {} bytes too large for {cs}-byte clusters",
                    l.file_size()
                )));
            }
            let mut rc = Refcounts::default();
            for j in 0..l.data_clusters {
                let n = rc.get(&l, j);
                if n > MAX_REFCOUNT {
                    return Err(Error::unsupported(format!(
                        "{n} compressed clusters share one host cluster (16-bit refcounts)"
                    )));
                }
            }
        }
        Ok(l)
    }

    fn rt_off(&self) -> u64 {
        self.cs
    }
    fn rb_off(&self) -> u64 {
        self.rt_off() + self.rt_clusters * self.cs
    }
    fn l1_off(&self) -> u64 {
        self.rb_off() + self.rb_clusters * self.cs
    }
    fn l2_off(&self) -> u64 {
        self.l1_off() + self.l1_clusters * self.cs
    }
    fn data_off(&self) -> u64 {
        self.l2_off() + self.l2_tables.len() as u64 * self.cs
    }

    /// Size of the output file.
    pub(crate) fn file_size(&self) -> u64 {
        self.data_off() + self.data_len
    }

    fn header(&self) -> Vec<u8> {
        let h = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: self.cluster_bits,
            size: self.vsize,
            crypt_method: 0,
            l1_size: self.l1_size as u32,
            l1_table_offset: self.l1_off(),
            refcount_table_offset: self.rt_off(),
            refcount_table_clusters: self.rt_clusters as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: REFCOUNT_ORDER,
            header_length: super::header::V3_HEADER_LEN as u32,
            compression: Compression::Zlib,
        };
        let mut b = vec![0u8; self.cs as usize];
        h.write_v3(&mut b);
        b
    }

    fn refcount_table(&self) -> Vec<u8> {
        let mut b = vec![0u8; (self.rt_clusters * self.cs) as usize];
        for i in 0..self.rb_clusters {
            let e = self.rb_off() + i * self.cs;
            let at = i as usize * 8;
            b[at..at + 8].copy_from_slice(&e.to_be_bytes());
        }
        b
    }

    /// Refcount block `i`; `rc` walks the data area (blocks come in order).
    fn refcount_block(&self, i: u64, rc: &mut Refcounts) -> Vec<u8> {
        let epb = self.cs / 2;
        let first = i * epb;
        let n = self.total.saturating_sub(first).min(epb) as usize;
        let data0 = self.data_off() / self.cs;
        let mut b = vec![0u8; self.cs as usize];
        for k in 0..n {
            let c = first + k as u64;
            let v = if c < data0 {
                1
            } else {
                rc.get(self, c - data0).min(MAX_REFCOUNT)
            };
            b[k * 2..k * 2 + 2].copy_from_slice(&(v as u16).to_be_bytes());
        }
        b
    }

    fn l1_table(&self) -> Vec<u8> {
        let mut b = vec![0u8; (self.l1_clusters * self.cs) as usize];
        for (j, i) in self.l2_tables.iter().enumerate() {
            let e = (self.l2_off() + j as u64 * self.cs) | COPIED;
            let at = *i as usize * 8;
            b[at..at + 8].copy_from_slice(&e.to_be_bytes());
        }
        b
    }

    /// L2 table of L1 index `i`; `placer` walks the stored clusters (tables come in order).
    fn l2_table(&self, i: u64, placer: &mut Placer) -> Vec<u8> {
        let l2e = self.cs / 8;
        let (w0, w1) = (i * l2e, (i + 1) * l2e);
        let x = 62 - (self.cluster_bits - 8);
        let mut b = vec![0u8; self.cs as usize];
        while let Some(p) = placer.peek(self) {
            if p.guest >= w1 {
                break;
            }
            placer.next(self);
            let Some(at) = p.guest.checked_sub(w0).map(|r| (r * 8) as usize) else {
                continue; // not reached: a table exists for every stored cluster
            };
            let host = self.data_off() + p.host;
            let e = if p.compressed {
                let extra = ((host + p.len - 1) >> 9) - (host >> 9);
                COMPRESSED | (extra << x) | host
            } else {
                host | COPIED
            };
            b[at..at + 8].copy_from_slice(&e.to_be_bytes());
        }
        b
    }

    /// The metadata clusters, generated lazily and gathered into pieces of about 1 MiB.
    fn metadata(self: Arc<Self>) -> impl Iterator<Item = Bytes> + Send {
        let pieces = 3 + self.rb_clusters + self.l2_tables.len() as u64;
        let mut k = 0u64;
        let mut rc = Refcounts::default();
        let mut placer = Placer::default();
        std::iter::from_fn(move || {
            let mut buf: Vec<u8> = Vec::new();
            while k < pieces && buf.len() < MIN_CHUNK {
                let piece = match k {
                    0 => self.header(),
                    1 => self.refcount_table(),
                    k if k < 2 + self.rb_clusters => self.refcount_block(k - 2, &mut rc),
                    k if k == 2 + self.rb_clusters => self.l1_table(),
                    k => self.l2_table(
                        self.l2_tables[(k - 3 - self.rb_clusters) as usize],
                        &mut placer,
                    ),
                };
                if buf.is_empty() {
                    buf = piece;
                } else {
                    buf.extend_from_slice(&piece);
                }
                k += 1;
            }
            (!buf.is_empty()).then(|| Bytes::from(buf))
        })
    }
}

/// Lays guest data into the data clusters.
struct DataWriter {
    layout: Arc<Layout>,
    /// Guest byte position up to which the data area is written.
    pos: u64,
    /// Index of the range `pos` is in (or before).
    k: usize,
    pending: BytesMut,
    zeros: u64,
    out: VecDeque<Chunk>,
    written: u64,
}

impl DataWriter {
    fn range_bytes(&self, k: usize) -> Option<(u64, u64)> {
        self.layout
            .ranges
            .get(k)
            .map(|(s, e)| (s * self.layout.cs, e * self.layout.cs))
    }

    fn flush_data(&mut self) {
        if !self.pending.is_empty() {
            let b = std::mem::take(&mut self.pending).freeze();
            self.written += b.len() as u64;
            self.out.push_back(Chunk::Data(b));
        }
    }

    fn flush_zeros(&mut self) {
        if self.zeros > 0 {
            self.written += self.zeros;
            self.out.push_back(Chunk::Zeros(self.zeros));
            self.zeros = 0;
        }
    }

    fn zeros(&mut self, n: u64) {
        if n > 0 {
            self.flush_data();
            self.zeros += n;
        }
    }

    fn data(&mut self, b: Bytes) {
        self.flush_zeros();
        if b.len() >= MIN_CHUNK {
            self.flush_data();
            self.written += b.len() as u64;
            self.out.push_back(Chunk::Data(b));
        } else {
            self.pending.extend_from_slice(&b);
            if self.pending.len() >= MIN_CHUNK {
                self.flush_data();
            }
        }
    }

    /// Writes zeros for every allocated byte in `[pos, target)`.
    fn advance_to(&mut self, target: u64) {
        while let Some((s, e)) = self.range_bytes(self.k) {
            if self.pos < s {
                if target <= s {
                    return;
                }
                self.pos = s;
            }
            let stop = target.min(e);
            if stop > self.pos {
                self.zeros(stop - self.pos);
                self.pos = stop;
            }
            if self.pos >= e {
                self.k += 1;
            } else {
                return;
            }
        }
    }

    fn push(&mut self, e: Extent) -> Result<()> {
        let Extent::Data { offset, bytes } = e else {
            return Ok(()); // zero runs are written as zeros (or skipped) by advance_to
        };
        if bytes.is_empty() {
            return Ok(());
        }
        let end = offset + bytes.len() as u64;
        self.advance_to(offset);
        let inside = self
            .range_bytes(self.k)
            .is_some_and(|(s, e)| s <= offset && end <= e);
        if !inside {
            return Err(Error::invalid(format!(
                "data extent {offset}..{end} lies outside the allocation map the qcow2 layout was built from"
            ))
            .with_offset(offset));
        }
        self.pos = end;
        self.data(bytes);
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.advance_to(u64::MAX);
        self.flush_data();
        self.flush_zeros();
        let expect = self.layout.data_clusters * self.layout.cs;
        if self.written != expect {
            return Err(Error::invalid(format!(
                "qcow2 encoder wrote {} data bytes, layout has {expect}",
                self.written
            )));
        }
        Ok(())
    }
}

/// Deflates whole clusters the way qemu expects them (raw deflate, 4 KiB window).
struct ClusterDeflater {
    level: u32,
    cs: usize,
    c: Compress,
    fast: Compress,
    scratch: Vec<u8>,
    buf: Vec<u8>,
}

impl ClusterDeflater {
    fn new(level: u32, cs: u64) -> Self {
        let (fast, scratch) = sampler();
        ClusterDeflater {
            level,
            cs: cs as usize,
            c: Compress::new_with_window_bits(flate2::Compression::new(level), false, WINDOW_BITS),
            fast,
            scratch,
            buf: Vec::new(),
        }
    }

    /// The deflate stream of `data` (one cluster) when it is shorter than the cluster; `None`
    /// when the cluster is to be stored as is. Depends only on the bytes: deterministic.
    ///
    /// The stream is always run to its end (no early stop once it exceeds the cluster): with
    /// zlib-rs 0.6, resetting a compressor whose output buffer ran full leaves its pending
    /// buffer shrunk, and after enough such resets it panics.
    fn deflate(&mut self, data: &[u8]) -> Result<Option<&[u8]>> {
        if self.level > 1 && incompressible(data, &mut self.fast, &mut self.scratch)? {
            return Ok(None);
        }
        deflate_into(&mut self.c, data, &mut self.buf)?;
        Ok((!self.buf.is_empty() && self.buf.len() < self.cs).then_some(&self.buf[..]))
    }
}

/// One cluster of the writing pass.
enum Piece {
    Deflated(Vec<u8>),
    Stored(Bytes),
}

/// Pass 1: the stored clusters and their compressed sizes, from a replay of the source.
async fn sizing_pass(
    replay: Replay,
    vsize: u64,
    cs: u64,
    level: u32,
    batch: usize,
    workers: usize,
) -> Result<(Vec<(u64, u64)>, Sizes)> {
    let extents = DiskContent::new(vsize, None, replay().await?)
        .validated()
        .extents;
    let mut batches = compress_blocks(extents, cs, batch, workers, move |items| {
        let mut d = ClusterDeflater::new(level, cs);
        items
            .into_iter()
            .map(|(g, data)| Ok((g, d.deflate(&data)?.map_or(0, |z| z.len() as u32))))
            .collect::<Result<Vec<(u64, u32)>>>()
    });
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut sizes = Sizes::new(cs);
    while let Some(b) = batches.next().await {
        for (g, n) in b? {
            match ranges.last_mut() {
                Some(r) if r.1 == g => r.1 += 1,
                _ => ranges.push((g, g + 1)),
            }
            sizes.push(n);
        }
    }
    Ok((ranges, sizes))
}

fn source_changed(what: String) -> Error {
    Error::corrupt(format!(
        "the source changed between the sizing pass and the writing pass of the compressed \
         qcow2 encoder ({what}); nothing consistent can be written"
    ))
}

/// Pass 2: places the clusters as the layout says, checking them against pass 1.
struct PackedWriter {
    layout: Arc<Layout>,
    placer: Placer,
    /// Bytes of the data area produced so far.
    pos: u64,
    pending: BytesMut,
}

impl PackedWriter {
    fn place(&mut self, batch: Vec<(u64, Piece)>) -> Result<()> {
        for (g, piece) in batch {
            let p = self
                .placer
                .next(&self.layout)
                .ok_or_else(|| source_changed(format!("guest cluster {g} was all zeros before")))?;
            let (bytes, compressed): (&[u8], bool) = match &piece {
                Piece::Deflated(z) => (z, true),
                Piece::Stored(b) => (b, false),
            };
            if p.guest != g || p.compressed != compressed || p.len != bytes.len() as u64 {
                return Err(source_changed(format!(
                    "guest cluster {g}: {} bytes ({}), expected guest cluster {}: {} bytes",
                    bytes.len(),
                    if compressed { "deflated" } else { "stored" },
                    p.guest,
                    p.len
                )));
            }
            self.pending
                .resize(self.pending.len() + (p.host - self.pos) as usize, 0);
            self.pending.extend_from_slice(bytes);
            self.pos = p.host + p.len;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(p) = self.placer.next(&self.layout) {
            return Err(source_changed(format!(
                "guest cluster {} is all zeros now",
                p.guest
            )));
        }
        let end = self.layout.data_len;
        self.pending.resize(
            self.pending.len() + end.saturating_sub(self.pos) as usize,
            0,
        );
        self.pos = end;
        Ok(())
    }
}

/// Pass 2: the data area, from the content's own extents.
fn writing_pass(
    extents: ExtentStream,
    layout: Arc<Layout>,
    level: u32,
    batch: usize,
    workers: usize,
) -> impl futures::Stream<Item = Result<Chunk>> + Send {
    let cs = layout.cs;
    let batches = compress_blocks(extents, cs, batch, workers, move |items| {
        let mut d = ClusterDeflater::new(level, cs);
        items
            .into_iter()
            .map(|(g, data)| {
                let piece = match d.deflate(&data)? {
                    Some(z) => Piece::Deflated(z.to_vec()),
                    None => Piece::Stored(data),
                };
                Ok((g, piece))
            })
            .collect::<Result<Vec<(u64, Piece)>>>()
    });
    let w = PackedWriter {
        layout,
        placer: Placer::default(),
        pos: 0,
        pending: BytesMut::new(),
    };
    stream::try_unfold(
        (batches, w, false),
        |(mut batches, mut w, mut done)| async move {
            loop {
                if w.pending.len() >= MIN_CHUNK || (done && !w.pending.is_empty()) {
                    let b = w.pending.split().freeze();
                    return Ok(Some((Chunk::Data(b), (batches, w, done))));
                }
                if done {
                    return Ok(None);
                }
                match batches.next().await {
                    Some(b) => w.place(b?)?,
                    None => {
                        w.finish()?;
                        done = true;
                    }
                }
            }
        },
    )
}

/// Compressed output: see the module documentation.
fn encode_compressed(content: DiskContent, opts: &EncodeOptions) -> Result<ChunkStream> {
    let vsize = content.virtual_size;
    let cluster_size = opts.cluster_size;
    geometry(vsize, cluster_size)?;
    let Some(replay) = content.replay.clone() else {
        return Err(Error::unsupported(
            "compressed qcow2 output needs a source that can be read twice (a random-access \
             image): its tables, written first, hold the compressed sizes, known only after \
             compressing. For a stream, write streamOptimized VMDK (compressed in one pass) or \
             uncompressed qcow2",
        ));
    };
    let cs = u64::from(cluster_size);
    let level = opts.compression_level.min(9);
    let workers = opts.parallelism.max(1);
    let batch = (BATCH_BYTES / cs).max(1) as usize;
    let extents = content.validated().extents;
    let out = async move {
        let t = std::time::Instant::now();
        let (ranges, sizes) = sizing_pass(replay, vsize, cs, level, batch, workers).await?;
        let layout = Arc::new(Layout::compressed(vsize, cluster_size, ranges, sizes)?);
        tracing::debug!(
            file_size = layout.file_size(),
            stored_clusters = layout.sizes.as_ref().map_or(0, Sizes::len),
            l2_tables = layout.l2_tables.len(),
            sizing_ms = t.elapsed().as_millis() as u64,
            "compressed qcow2 layout"
        );
        let meta = stream::iter(layout.clone().metadata().map(|b| Ok(Chunk::Data(b))));
        Ok::<_, Error>(meta.chain(writing_pass(extents, layout, level, batch, workers)))
    };
    Ok(stream::once(out).try_flatten().boxed())
}

/// See [`super::encode`].
pub(crate) fn encode(content: DiskContent, opts: &EncodeOptions) -> Result<ChunkStream> {
    if opts.compress {
        return encode_compressed(content, opts);
    }
    let layout = Arc::new(Layout::new(
        content.allocation.as_ref(),
        content.virtual_size,
        opts.cluster_size,
    )?);
    tracing::debug!(
        file_size = layout.file_size(),
        data_clusters = layout.data_clusters,
        l2_tables = layout.l2_tables.len(),
        "qcow2 layout"
    );
    let meta = stream::iter(layout.clone().metadata().map(|b| Ok(Chunk::Data(b))));
    let writer = DataWriter {
        layout,
        pos: 0,
        k: 0,
        pending: BytesMut::new(),
        zeros: 0,
        out: VecDeque::new(),
        written: 0,
    };
    let extents: ExtentStream = content.validated().extents;
    let data = stream::unfold(
        (extents, writer, false),
        |(mut extents, mut w, mut done)| async move {
            loop {
                if let Some(c) = w.out.pop_front() {
                    return Some((Ok(c), (extents, w, done)));
                }
                if done {
                    return None;
                }
                let r = match extents.next().await {
                    Some(Ok(e)) => w.push(e),
                    Some(Err(e)) => Err(e),
                    None => {
                        done = true;
                        w.finish()
                    }
                };
                if let Err(e) = r {
                    w.out.clear();
                    return Some((Err(e), (extents, w, true)));
                }
            }
        },
    );
    Ok(meta.chain(data).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::AllocationMap;

    #[test]
    fn layout_counts_every_cluster() {
        let m = AllocationMap::from_ranges(vec![
            0..1,
            (5 << 16)..(7 << 16) + 1,
            (1 << 30)..(1 << 30) + 10,
        ]);
        let l = Layout::new(Some(&m), (2 << 30) + 123, 65536).unwrap();
        assert_eq!(l.data_clusters, 1 + 3 + 1);
        assert_eq!(l.l2_tables, vec![0, 2]);
        assert_eq!(l.l1_size, 5);
        assert_eq!(l.total, 1 + 1 + 1 + 1 + 2 + 5);
        let meta: Vec<u8> = Arc::new(l).metadata().flat_map(|b| b.to_vec()).collect();
        assert_eq!(meta.len(), 6 << 16);
        let h = Header::parse(&meta).unwrap();
        assert_eq!(h.size, (2 << 30) + 123);
        h.check_layout(Some(11 << 16)).unwrap();
        // Big disks need several refcount blocks and a multi-cluster refcount table.
        let l = Layout::new(None, 1 << 40, 512).unwrap_err();
        assert_eq!(l.kind(), crate::ErrorKind::InvalidInput);
        let l = Layout::new(None, 200 << 20, 4096).unwrap();
        assert!(l.rb_clusters > 1);
        assert!(l.total <= l.rb_clusters * 2048);
        assert!(l.rb_clusters * 8 <= l.rt_clusters * 4096);
    }

    #[test]
    fn compressed_layout_packs_bytes_and_counts_every_touch() {
        let sizes = |v: &[u32]| {
            let mut s = Sizes::new(4096);
            for &x in v {
                s.push(x);
            }
            s
        };
        // Three compressed clusters of 3000 bytes: 0..3000, 3000..6000, 6000..9000.
        let l =
            Layout::compressed(1 << 20, 4096, vec![(0, 3)], sizes(&[3000, 3000, 3000])).unwrap();
        assert_eq!(l.data_len, 9216);
        assert_eq!(l.data_clusters, 3);
        let mut rc = Refcounts::default();
        let got: Vec<u64> = (0..3).map(|j| rc.get(&l, j)).collect();
        assert_eq!(got, vec![2, 2, 1]);
        // Compressed, normal (aligned), compressed after a gap in the guest.
        let l = Layout::compressed(
            1 << 20,
            4096,
            vec![(0, 2), (600, 601)],
            sizes(&[100, 0, 4095]),
        )
        .unwrap();
        let mut p = Placer::default();
        let placed: Vec<(u64, u64, u64, bool)> = std::iter::from_fn(|| p.next(&l))
            .map(|p| (p.guest, p.host, p.len, p.compressed))
            .collect();
        assert_eq!(
            placed,
            vec![
                (0, 0, 100, true),
                (1, 4096, 4096, false),
                (600, 8192, 4095, true)
            ]
        );
        assert_eq!(l.data_len, 12288);
        assert_eq!(l.l2_tables, vec![0, 1]);
        let mut rc = Refcounts::default();
        let got: Vec<u64> = (0..3).map(|j| rc.get(&l, j)).collect();
        assert_eq!(got, vec![1, 1, 1]);
        let meta: Vec<u8> = Arc::new(l).metadata().flat_map(|b| b.to_vec()).collect();
        let h = Header::parse(&meta).unwrap();
        // L2 entry of guest cluster 600 (second table, entry 88): 4095 bytes from a
        // sector-aligned offset span 8 sectors, 7 additional.
        let l2 = meta.len() - 4096;
        let e = u64::from_be_bytes(meta[l2 + 88 * 8..l2 + 89 * 8].try_into().unwrap());
        let x = 62 - (h.cluster_bits - 8);
        assert_eq!(e >> 62, 1, "compressed, not COPIED");
        assert_eq!((e >> x) & 0xf, 7);
        assert_eq!(e & ((1 << x) - 1), meta.len() as u64 + 8192);
        // Sizes that disagree with the ranges are refused.
        assert!(Layout::compressed(1 << 20, 4096, vec![(0, 2)], sizes(&[1])).is_err());
    }

    #[test]
    fn bad_options() {
        let c = DiskContent::new(100, None, futures::stream::empty().boxed());
        let o = EncodeOptions {
            compress: true,
            ..Default::default()
        };
        let e = encode(c, &o).err().unwrap();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        assert!(e.message().contains("streamOptimized VMDK"), "{e}");
        let c = DiskContent::from_extents(100, vec![]);
        let o = EncodeOptions {
            cluster_size: 3000,
            ..Default::default()
        };
        assert_eq!(
            encode(c, &o).err().map(|e| e.kind()),
            Some(crate::ErrorKind::InvalidInput)
        );
    }
}
