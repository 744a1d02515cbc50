//! The one-pass qcow2 v3 encoder.
//!
//! Output layout, in file order: header cluster, refcount table, refcount blocks, L1 table, L2
//! tables (one per L1 entry that covers allocated clusters), then one data cluster per
//! allocated guest cluster, in guest order. Every cluster of the file has refcount 1 and the
//! file ends right after the last data cluster, so `qemu-img check` finds no leak.

use super::header::{Compression, Header, MAX_L1_BYTES};
use crate::extent::{DiskContent, Extent, ExtentStream};
use crate::format::{Chunk, ChunkStream, EncodeOptions};
use crate::{Error, Result};
use bytes::{Bytes, BytesMut};
use futures::stream::{self, StreamExt};
use std::collections::VecDeque;
use std::sync::Arc;

const COPIED: u64 = 1 << 63;
/// Data pieces smaller than this are gathered before they are emitted.
const MIN_CHUNK: usize = 1 << 20;
/// Refcount order written (16-bit refcounts, like qemu-img).
const REFCOUNT_ORDER: u32 = 4;

/// Where everything goes.
#[derive(Debug)]
pub(crate) struct Layout {
    cluster_bits: u32,
    cs: u64,
    vsize: u64,
    /// Allocated guest clusters, as sorted, disjoint cluster-index ranges.
    ranges: Vec<(u64, u64)>,
    /// Data clusters before each range.
    rank: Vec<u64>,
    l1_size: u64,
    /// L1 indices that get an L2 table, in order.
    l2_tables: Vec<u64>,
    rt_clusters: u64,
    rb_clusters: u64,
    l1_clusters: u64,
    data_clusters: u64,
    total: u64,
}

impl Layout {
    pub(crate) fn new(
        content_alloc: Option<&crate::extent::AllocationMap>,
        vsize: u64,
        cluster_size: u32,
    ) -> Result<Layout> {
        if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
            return Err(Error::invalid(format!(
                "qcow2 cluster size {cluster_size} must be a power of two from 512 B to 2 MiB"
            )));
        }
        if vsize > super::header::MAX_VIRTUAL_SIZE {
            return Err(Error::invalid("virtual size too large for qcow2"));
        }
        let cs = u64::from(cluster_size);
        let cluster_bits = cluster_size.trailing_zeros();
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
        let mut rank = Vec::with_capacity(ranges.len());
        let mut data_clusters = 0u64;
        for (s, e) in &ranges {
            rank.push(data_clusters);
            data_clusters += e - s;
        }
        let l2e = cs / 8;
        let l1_size = guest_clusters.div_ceil(l2e);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(format!(
                "virtual size {vsize} needs an L1 table larger than {MAX_L1_BYTES} bytes with {cs}-byte clusters; use larger clusters"
            )));
        }
        let mut l2_tables: Vec<u64> = Vec::new();
        for (s, e) in &ranges {
            for i in s / l2e..=(e - 1) / l2e {
                if l2_tables.last() != Some(&i) {
                    l2_tables.push(i);
                }
            }
        }
        let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
        let epb = cs * 8 / (1 << REFCOUNT_ORDER);
        let (mut rt, mut rb) = (1u64, 1u64);
        let total = loop {
            let total = 1 + rt + rb + l1_clusters + l2_tables.len() as u64 + data_clusters;
            let nrb = total.div_ceil(epb);
            let nrt = (nrb * 8).div_ceil(cs);
            if nrb <= rb && nrt <= rt {
                break total;
            }
            rb = rb.max(nrb);
            rt = rt.max(nrt);
        };
        Ok(Layout {
            cluster_bits,
            cs,
            vsize,
            ranges,
            rank,
            l1_size,
            l2_tables,
            rt_clusters: rt,
            rb_clusters: rb,
            l1_clusters,
            data_clusters,
            total,
        })
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
        self.total * self.cs
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

    fn refcount_block(&self, i: u64) -> Vec<u8> {
        let epb = self.cs / 2;
        let first = i * epb;
        let n = self.total.saturating_sub(first).min(epb) as usize;
        let mut b = vec![0u8; self.cs as usize];
        for k in 0..n {
            b[k * 2..k * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
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

    fn l2_table(&self, i: u64) -> Vec<u8> {
        let l2e = self.cs / 8;
        let (w0, w1) = (i * l2e, (i + 1) * l2e);
        let mut b = vec![0u8; self.cs as usize];
        let k0 = self.ranges.partition_point(|r| r.1 <= w0);
        for (k, (s, e)) in self.ranges.iter().enumerate().skip(k0) {
            if *s >= w1 {
                break;
            }
            for g in (*s).max(w0)..(*e).min(w1) {
                let host = self.data_off() + (self.rank[k] + g - s) * self.cs;
                let at = ((g - w0) * 8) as usize;
                b[at..at + 8].copy_from_slice(&(host | COPIED).to_be_bytes());
            }
        }
        b
    }

    /// The metadata clusters, generated lazily and gathered into pieces of about 1 MiB.
    fn metadata(self: Arc<Self>) -> impl Iterator<Item = Bytes> + Send {
        let pieces = 3 + self.rb_clusters + self.l2_tables.len() as u64;
        let mut k = 0u64;
        std::iter::from_fn(move || {
            let mut buf: Vec<u8> = Vec::new();
            while k < pieces && buf.len() < MIN_CHUNK {
                let piece = match k {
                    0 => self.header(),
                    1 => self.refcount_table(),
                    k if k < 2 + self.rb_clusters => self.refcount_block(k - 2),
                    k if k == 2 + self.rb_clusters => self.l1_table(),
                    k => self.l2_table(self.l2_tables[(k - 3 - self.rb_clusters) as usize]),
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

/// See [`super::encode`].
pub(crate) fn encode(content: DiskContent, opts: &EncodeOptions) -> Result<ChunkStream> {
    if opts.compress {
        return Err(Error::unsupported(
            "compressed qcow2 output is not supported: a strictly sequential one-pass writer \
             must write the L2 tables before the data, but compressed cluster offsets are only \
             known after compressing; write uncompressed qcow2 or use qemu-img convert -c",
        ));
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
    fn bad_options() {
        let c = DiskContent::from_extents(100, vec![]);
        let o = EncodeOptions {
            compress: true,
            ..Default::default()
        };
        assert_eq!(
            encode(c, &o).err().map(|e| e.kind()),
            Some(crate::ErrorKind::Unsupported)
        );
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
