//! Decoders: random access (ranged reads, coalesced and read ahead) and sequential (one pass
//! over the file bytes, with a bounded buffer).

use super::header::Header;
use super::tables::{self, Kind, Run};
use crate::extent::{AllocationMap, DiskContent, Extent, ExtentStream};
use crate::format::DecodeOptions;
use crate::io::ReadAt;
use crate::{Error, Result};
use bytes::{Bytes, BytesMut};
use futures::stream::{self, StreamExt};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Bytes read to parse the header.
pub(crate) const HEAD_LEN: usize = 4096;
/// Most bytes the sequential decoder holds while waiting for metadata or earlier guest data.
pub(crate) const SEQ_BUDGET: u64 = 64 << 20;
/// Most raw L2 table bytes the sequential decoder holds ahead of the guest position.
pub(crate) const SEQ_TABLE_BUDGET: u64 = 256 << 20;
/// Largest extent the sequential decoder emits at once.
const SEQ_PIECE: u64 = 4 << 20;

fn decode_l1(h: &Header, bytes: &[u8]) -> Result<Vec<Option<u64>>> {
    let n = h.l1_entries_needed() as usize;
    let mut out = Vec::with_capacity(n.min(bytes.len() / 8));
    for i in 0..n {
        let e = bytes
            .get(i * 8..i * 8 + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| Error::corrupt("qcow2 L1 table truncated"))?;
        out.push(tables::l1_entry(h, e)?);
    }
    Ok(out)
}

/// Parses the header from a random-access source.
pub(crate) async fn read_header(src: &dyn ReadAt) -> Result<Header> {
    let head = src.read_at(0, HEAD_LEN).await?;
    let h = Header::parse(&head)?;
    h.check_layout(Some(src.size()))?;
    Ok(h)
}

struct Image {
    h: Header,
    l1: Vec<Option<u64>>,
    src: Arc<dyn ReadAt>,
}

impl Image {
    async fn l2_runs(&self, i: usize) -> Result<Vec<Run>> {
        let cover = self.h.l1_coverage();
        let base = i as u64 * cover;
        let Some(Some(off)) = self.l1.get(i).copied() else {
            let len = cover.min(self.h.size.saturating_sub(base));
            return Ok(vec![Run {
                guest: base,
                len,
                kind: Kind::Hole,
            }]);
        };
        let fs = self.src.size();
        tables::check_l2_location(&self.h, off, Some(fs))?;
        let t = self
            .src
            .read_exact_at(off, self.h.cluster_size() as usize)
            .await?;
        let mut runs = Vec::new();
        tables::l2_runs(&self.h, &t, base, Some(fs), &mut runs)?;
        Ok(runs)
    }
}

/// Which host clusters are in use, to refuse images whose tables point twice at the same
/// cluster (which would turn a small hostile file into an endless amount of output). Skipped
/// for files with more than 2^28 clusters.
struct HostMap {
    bits: Vec<u64>,
    cs: u64,
}

impl HostMap {
    fn new(file_size: u64, cs: u64) -> HostMap {
        let n = file_size.div_ceil(cs);
        let bits = if n <= 1 << 28 {
            vec![0u64; n.div_ceil(64) as usize]
        } else {
            Vec::new()
        };
        HostMap { bits, cs }
    }

    /// Marks a host cluster; false if it was marked already.
    fn mark(&mut self, c: u64) -> bool {
        let Some(w) = self.bits.get_mut((c / 64) as usize) else {
            return true;
        };
        let b = 1u64 << (c % 64);
        let fresh = *w & b == 0;
        *w |= b;
        fresh
    }

    /// Marks the host clusters of one L2 table's data runs (subclusters of one cluster count
    /// once).
    fn mark_runs(&mut self, runs: &[Run]) -> Result<()> {
        let cs = self.cs;
        let mut last: Option<(u64, u64)> = None;
        for r in runs {
            let Kind::Data { host } = r.kind else {
                continue;
            };
            let first = host / cs;
            let g0 = (r.guest - host % cs) / cs;
            for hc in first..=(host + r.len - 1) / cs {
                let gc = g0 + (hc - first);
                if last == Some((gc, hc)) {
                    continue;
                }
                last = Some((gc, hc));
                if !self.mark(hc) {
                    return Err(Error::corrupt(
                        "qcow2 host cluster used twice (by two guest clusters or a table)",
                    )
                    .with_offset(hc * cs));
                }
            }
        }
        Ok(())
    }
}

/// One coalesced read: a host range and the guest pieces inside it.
struct Plan {
    host: u64,
    len: u64,
    items: Vec<Item>,
}

struct Item {
    guest: u64,
    rel: u64,
    glen: u64,
    compressed: Option<u64>,
}

impl Plan {
    fn new(run: &Run) -> Option<Plan> {
        let (host, hlen, compressed) = match run.kind {
            Kind::Hole => return None,
            Kind::Data { host } => (host, run.len, None),
            Kind::Compressed { host, len } => (host, len, Some(len)),
        };
        Some(Plan {
            host,
            len: hlen,
            items: vec![Item {
                guest: run.guest,
                rel: 0,
                glen: run.len,
                compressed,
            }],
        })
    }

    /// Adds `run` if it starts inside or right at the end of this read and the read stays
    /// within `max` bytes.
    fn absorb(&mut self, run: &Run, max: u64) -> bool {
        let (host, hlen, compressed) = match run.kind {
            Kind::Hole => return true,
            Kind::Data { host } => (host, run.len, None),
            Kind::Compressed { host, len } => (host, len, Some(len)),
        };
        let end = self.host + self.len;
        if host < self.host || host > end {
            return false;
        }
        let new_end = end.max(host + hlen);
        if new_end - self.host > max {
            return false;
        }
        self.items.push(Item {
            guest: run.guest,
            rel: host - self.host,
            glen: run.len,
            compressed,
        });
        self.len = new_end - self.host;
        true
    }
}

fn execute(h: &Header, plan: &Plan, bytes: &Bytes) -> Result<Vec<Extent>> {
    enum Last {
        None,
        /// The last extent is `bytes[from..to]`.
        Slice {
            guest: u64,
            from: usize,
            to: usize,
        },
        /// The last extent is decompressed clusters being gathered.
        Inflated {
            guest: u64,
            data: Vec<u8>,
        },
    }
    fn flush(last: Last, bytes: &Bytes, out: &mut Vec<Extent>) {
        match last {
            Last::None => {}
            Last::Slice { guest, from, to } => out.push(Extent::Data {
                offset: guest,
                bytes: bytes.slice(from..to),
            }),
            Last::Inflated { guest, data } => out.push(Extent::Data {
                offset: guest,
                bytes: Bytes::from(data),
            }),
        }
    }
    let mut out: Vec<Extent> = Vec::new();
    let mut last = Last::None;
    for it in &plan.items {
        let start = it.rel as usize;
        match it.compressed {
            None => {
                let end = start + it.glen as usize;
                if bytes.len() < end {
                    return Err(Error::corrupt("qcow2 data cluster beyond end of file")
                        .with_offset(plan.host + it.rel));
                }
                // Extend the previous slice when guest and file are both contiguous.
                if let Last::Slice { guest, from, to } = &mut last
                    && *guest + (*to - *from) as u64 == it.guest
                    && *to == start
                {
                    *to = end;
                    continue;
                }
                flush(std::mem::replace(&mut last, Last::None), bytes, &mut out);
                last = Last::Slice {
                    guest: it.guest,
                    from: start,
                    to: end,
                };
            }
            Some(clen) => {
                let end = start.saturating_add(clen as usize).min(bytes.len());
                let input = bytes.get(start..end).unwrap_or(&[]);
                let mut cluster =
                    tables::decompress(h, input).map_err(|e| e.with_offset(plan.host + it.rel))?;
                cluster.truncate(it.glen as usize);
                if let Last::Inflated { guest, data } = &mut last
                    && *guest + data.len() as u64 == it.guest
                {
                    data.extend_from_slice(&cluster);
                    continue;
                }
                flush(std::mem::replace(&mut last, Last::None), bytes, &mut out);
                last = Last::Inflated {
                    guest: it.guest,
                    data: cluster,
                };
            }
        }
    }
    flush(last, bytes, &mut out);
    Ok(out)
}

/// See [`super::decode_random`].
pub(crate) async fn decode_random(
    src: Arc<dyn ReadAt>,
    opts: &DecodeOptions,
) -> Result<DiskContent> {
    let h = read_header(src.as_ref()).await?;
    let l1_bytes = if h.l1_size > 0 {
        src.read_exact_at(h.l1_table_offset, h.l1_size as usize * 8)
            .await?
    } else {
        Bytes::new()
    };
    let l1 = decode_l1(&h, &l1_bytes)?;
    let img = Arc::new(Image { h, l1, src });

    // Pass 1: metadata only, for the allocation map.
    let n = img.l1.len();
    let mut ranges = Vec::new();
    let mut tables_stream = stream::iter(0..n)
        .filter(|i| futures::future::ready(img.l1[*i].is_some()))
        .map(|i| {
            let img = img.clone();
            async move { img.l2_runs(i).await }
        })
        .buffered(4);
    let mut used = HostMap::new(img.src.size(), img.h.cluster_size());
    for off in img.l1.iter().flatten() {
        if !used.mark(off / img.h.cluster_size()) {
            return Err(Error::corrupt("qcow2 L2 table referenced twice").with_offset(*off));
        }
    }
    while let Some(runs) = tables_stream.next().await {
        let runs = runs?;
        used.mark_runs(&runs)?;
        tables::data_ranges(&runs, &mut ranges);
    }
    drop(tables_stream);
    let allocation = AllocationMap::from_ranges(ranges);
    tracing::debug!(
        virtual_size = img.h.size,
        allocated = allocation.allocated_bytes(),
        "qcow2 image opened"
    );

    // Pass 2: the same tables again (cheap, ~1/8192 of the data), coalesced into large reads.
    let max = opts.read_size.max(img.h.cluster_size() as usize) as u64;
    let img2 = img.clone();
    let runs = stream::iter(0..n)
        .filter(move |i| futures::future::ready(img2.l1[*i].is_some()))
        .map({
            let img = img.clone();
            move |i| {
                let img = img.clone();
                async move { img.l2_runs(i).await }
            }
        })
        .buffered(2)
        .flat_map(move |r| match r {
            Ok(runs) => stream::iter(split_runs(runs, max).into_iter().map(Ok)).left_stream(),
            Err(e) => stream::iter(vec![Err(e)]).right_stream(),
        })
        .boxed();
    let plans = stream::unfold(
        (runs, None::<Plan>, false),
        move |(mut runs, mut cur, done)| async move {
            if done {
                return None;
            }
            loop {
                match runs.next().await {
                    Some(Ok(run)) => {
                        if run.kind == Kind::Hole {
                            continue;
                        }
                        let absorbed = cur.as_mut().is_some_and(|p| p.absorb(&run, max));
                        match absorbed {
                            true => {}
                            false => {
                                let prev = cur.replace(Plan::new(&run)?);
                                if let Some(p) = prev {
                                    return Some((Ok(p), (runs, cur, false)));
                                }
                            }
                        }
                    }
                    Some(Err(e)) => return Some((Err(e), (runs, None, true))),
                    None => return cur.take().map(|p| (Ok(p), (runs, None, true))),
                }
            }
        },
    );
    let virtual_size = img.h.size;
    let extents = plans
        .map(move |p: Result<Plan>| {
            let img = img.clone();
            async move {
                let plan = p?;
                let bytes = img.src.read_at(plan.host, plan.len as usize).await?;
                if plan.items.iter().any(|i| i.compressed.is_some()) {
                    let h = img.h.clone();
                    tokio::task::spawn_blocking(move || execute(&h, &plan, &bytes))
                        .await
                        .map_err(crate::io::join_err)?
                } else {
                    execute(&img.h, &plan, &bytes)
                }
            }
        })
        .buffered(opts.read_ahead.max(1))
        .flat_map(|r| match r {
            Ok(v) => stream::iter(v.into_iter().map(Ok)).left_stream(),
            Err(e) => stream::iter(vec![Err(e)]).right_stream(),
        })
        .boxed();
    Ok(DiskContent::new(virtual_size, Some(allocation), extents))
}

/// Splits data runs longer than `max` so every read fits.
fn split_runs(runs: Vec<Run>, max: u64) -> Vec<Run> {
    let mut out = Vec::with_capacity(runs.len());
    for r in runs {
        match r.kind {
            Kind::Data { host } if r.len > max => {
                let mut o = 0;
                while o < r.len {
                    let n = max.min(r.len - o);
                    out.push(Run {
                        guest: r.guest + o,
                        len: n,
                        kind: Kind::Data { host: host + o },
                    });
                    o += n;
                }
            }
            Kind::Hole => {}
            _ => out.push(r),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Sequential decoding

enum Seg {
    Data(Bytes),
    Zero(u64),
}

impl Seg {
    fn len(&self) -> u64 {
        match self {
            Seg::Data(b) => b.len() as u64,
            Seg::Zero(n) => *n,
        }
    }
}

enum Avail {
    Ready(Bytes),
    Wait,
    Gone,
}

struct Seq {
    input: ExtentStream,
    input_done: bool,
    size: Option<u64>,
    cursor: u64,
    buf: BTreeMap<u64, Seg>,
    buf_bytes: u64,
    h: Option<Header>,
    l1: Option<Vec<Option<u64>>>,
    /// L2 tables not parsed yet: file offset → L1 indices.
    l2_wanted: BTreeMap<u64, Vec<usize>>,
    /// Received L2 tables not decoded yet: L1 index → table.
    tables: BTreeMap<usize, Bytes>,
    tables_bytes: u64,
    /// The decoded L2 table at the guest position.
    parsed: BTreeMap<usize, VecDeque<Run>>,
    gi: usize,
    out: VecDeque<Extent>,
    failed: bool,
    max_piece: u64,
}

fn seq_unsupported(what: &str, at: u64) -> Error {
    Error::unsupported(format!(
        "this qcow2 layout needs random access: {what} (file offset {at}) is not available \
         in stream order within the {} MiB buffer; read the image with ranged reads",
        SEQ_BUDGET >> 20
    ))
    .with_offset(at)
}

impl Seq {
    fn hdr(&self) -> Result<&Header> {
        self.h
            .as_ref()
            .ok_or_else(|| Error::corrupt("qcow2 header missing"))
    }

    /// Pulls one input item into the buffer. Returns false at the end of input.
    async fn pull(&mut self) -> Result<bool> {
        if self.input_done {
            return Ok(false);
        }
        let Some(item) = self.input.next().await else {
            self.input_done = true;
            if let Some(s) = self.size
                && self.cursor < s
            {
                // Trailing hole.
                self.append(self.cursor, Seg::Zero(s - self.cursor));
            }
            return Ok(false);
        };
        let e = item?;
        if e.offset().checked_add(e.len()).is_none() {
            return Err(Error::corrupt("qcow2 input extent end overflows").with_offset(e.offset()));
        }
        if e.offset() < self.cursor {
            return Err(Error::corrupt("qcow2 input stream goes backwards").with_offset(e.offset()));
        }
        if e.offset() > self.cursor {
            self.append(self.cursor, Seg::Zero(e.offset() - self.cursor));
        }
        match e {
            Extent::Data { offset, bytes } if !bytes.is_empty() => {
                self.append(offset, Seg::Data(bytes))
            }
            Extent::Zero { offset, len } if len > 0 => self.append(offset, Seg::Zero(len)),
            _ => {}
        }
        if self.buf_bytes > self.limit() || self.buf.len() > 100_000 {
            self.evict()?;
        }
        Ok(true)
    }

    /// The buffer bound: the budget, or more if the source hands out huge pieces.
    fn limit(&self) -> u64 {
        SEQ_BUDGET.max(self.max_piece.saturating_mul(4))
    }

    fn append(&mut self, at: u64, seg: Seg) {
        let len = seg.len();
        if let Seg::Data(_) = seg {
            self.buf_bytes += len;
            self.max_piece = self.max_piece.max(len);
        }
        self.buf.insert(at, seg);
        self.cursor = at + len;
    }

    /// Bytes `[at, at+len)` from the buffer.
    fn take(&self, at: u64, len: u64) -> Avail {
        let end = at.saturating_add(len);
        if end > self.cursor {
            return if self.input_done {
                Avail::Gone
            } else {
                Avail::Wait
            };
        }
        // Fast path: inside one segment.
        if let Some((&s, seg)) = self.buf.range(..=at).next_back()
            && s + seg.len() >= end
        {
            return match seg {
                Seg::Data(b) => Avail::Ready(b.slice((at - s) as usize..(end - s) as usize)),
                Seg::Zero(_) if len as usize <= crate::io::ZEROS.len() => {
                    Avail::Ready(Bytes::from_static(&crate::io::ZEROS[..len as usize]))
                }
                Seg::Zero(_) => Avail::Ready(Bytes::from(vec![0u8; len as usize])),
            };
        }
        let mut out = BytesMut::with_capacity(len as usize);
        let mut pos = at;
        let start_key = self
            .buf
            .range(..=at)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(at);
        for (&s, seg) in self.buf.range(start_key..end) {
            if s > pos || s + seg.len() <= pos {
                if s + seg.len() <= pos {
                    continue;
                }
                return Avail::Gone;
            }
            let from = pos - s;
            let to = (end - s).min(seg.len());
            match seg {
                Seg::Data(b) => out.extend_from_slice(&b[from as usize..to as usize]),
                Seg::Zero(_) => out.resize(out.len() + (to - from) as usize, 0),
            }
            pos = s + to;
            if pos >= end {
                break;
            }
        }
        if pos < end {
            return Avail::Gone;
        }
        Avail::Ready(out.freeze())
    }

    /// If `at` lies in a buffered hole of the file, how many zero bytes follow from there.
    fn zero_at(&self, at: u64) -> Option<u64> {
        match self.buf.range(..=at).next_back() {
            Some((&s, Seg::Zero(n))) if s + n > at => Some(s + n - at),
            _ => None,
        }
    }

    /// Forgets buffered bytes in `[at, end)`.
    fn drop_range(&mut self, at: u64, end: u64) {
        if end <= at {
            return;
        }
        let start_key = self
            .buf
            .range(..=at)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(at);
        let keys: Vec<u64> = self.buf.range(start_key..end).map(|(k, _)| *k).collect();
        for k in keys {
            let Some(seg) = self.buf.remove(&k) else {
                continue;
            };
            let sl = seg.len();
            if k + sl <= at {
                self.buf.insert(k, seg);
                continue;
            }
            if let Seg::Data(_) = seg {
                self.buf_bytes -= sl;
            }
            let keep = |from: u64, to: u64| -> Option<Seg> {
                (to > from).then(|| match &seg {
                    Seg::Data(b) => Seg::Data(b.slice((from - k) as usize..(to - k) as usize)),
                    Seg::Zero(_) => Seg::Zero(to - from),
                })
            };
            let left = keep(k, at.max(k));
            let right = keep(end.min(k + sl), k + sl);
            for (off, part) in [(k, left), (end.min(k + sl), right)] {
                if let Some(p) = part {
                    if let Seg::Data(_) = p {
                        self.buf_bytes += p.len();
                    }
                    self.buf.insert(off, p);
                }
            }
        }
    }

    /// Drops every buffered byte nothing known still needs; fails if still over budget.
    fn evict(&mut self) -> Result<()> {
        let mut needed: Vec<(u64, u64)> = Vec::new();
        match (&self.h, &self.l1) {
            (None, _) => return Ok(()),
            (Some(h), None) => {
                let r = h.l1_range()?;
                needed.push((r.start, r.end));
            }
            (Some(h), Some(_)) => {
                let cs = h.cluster_size();
                for &off in self.l2_wanted.keys() {
                    needed.push((off, off + cs));
                }
                let mut pending: Vec<Run> = Vec::new();
                for (i, t) in &self.tables {
                    tables::l2_runs(h, t, *i as u64 * h.l1_coverage(), self.size, &mut pending)?;
                }
                for runs in self.parsed.values() {
                    for r in runs.iter().chain(pending.iter()) {
                        match r.kind {
                            Kind::Hole => {}
                            Kind::Data { host } => needed.push((host, host + r.len)),
                            Kind::Compressed { host, len } => needed.push((host, host + len)),
                        }
                    }
                }
            }
        }
        needed.sort_unstable();
        let keys: Vec<(u64, u64)> = self.buf.iter().map(|(k, s)| (*k, k + s.len())).collect();
        let mut ni = 0;
        for (s, e) in keys {
            while ni < needed.len() && needed[ni].1 <= s {
                ni += 1;
            }
            let used = needed[ni..].iter().take_while(|n| n.0 < e).any(|n| n.1 > s);
            if !used {
                self.drop_range(s, e);
            }
        }
        // Fail well before the limit so evictions stay rare (each one walks all pending tables).
        if self.buf_bytes > self.limit() / 4 * 3 {
            let first = self.buf.keys().next().copied().unwrap_or(0);
            return Err(seq_unsupported(
                "data that arrives before the data preceding it in guest order",
                first,
            ));
        }
        Ok(())
    }

    /// Parses whatever metadata has fully arrived. Returns whether anything changed.
    fn parse_metadata(&mut self) -> Result<bool> {
        let mut changed = false;
        let Some(h) = self.h.clone() else {
            return Ok(false);
        };
        if self.l1.is_none() {
            let r = h.l1_range()?;
            let bytes = match self.take(r.start, r.end - r.start) {
                Avail::Ready(b) => b,
                Avail::Wait => return Ok(false),
                Avail::Gone if self.input_done => {
                    return Err(
                        Error::corrupt("qcow2 L1 table beyond end of file").with_offset(r.start)
                    );
                }
                Avail::Gone => return Err(seq_unsupported("the L1 table", r.start)),
            };
            let l1 = decode_l1(&h, &bytes)?;
            for (i, e) in l1.iter().enumerate() {
                if let Some(off) = e {
                    tables::check_l2_location(&h, *off, self.size)?;
                    let e = self.l2_wanted.entry(*off).or_default();
                    if !e.is_empty() {
                        return Err(
                            Error::corrupt("qcow2 L2 table referenced twice").with_offset(*off)
                        );
                    }
                    e.push(i);
                }
            }
            self.drop_range(r.start, r.end);
            self.l1 = Some(l1);
            changed = true;
        }
        let cs = h.cluster_size();
        while let Some((&off, _)) = self.l2_wanted.iter().next() {
            let t = match self.take(off, cs) {
                Avail::Ready(b) => b,
                Avail::Wait => break,
                Avail::Gone if self.input_done => {
                    return Err(
                        Error::corrupt("qcow2 L2 table beyond end of file").with_offset(off)
                    );
                }
                Avail::Gone => return Err(seq_unsupported("an L2 table", off)),
            };
            let idx = self.l2_wanted.remove(&off).unwrap_or_default();
            for i in idx {
                // Kept raw (8 or 16 bytes per guest cluster) until the guest position gets there.
                self.tables_bytes += cs;
                if self.tables_bytes > SEQ_TABLE_BUDGET {
                    return Err(seq_unsupported(
                        "L2 tables far ahead of their data (more than 256 MiB of them)",
                        off,
                    ));
                }
                self.tables.insert(i, Bytes::copy_from_slice(&t));
            }
            self.drop_range(off, off + cs);
            changed = true;
        }
        Ok(changed)
    }

    /// Emits guest data that is ready, in guest order. Returns whether anything changed, and
    /// whether the whole disk has been emitted.
    fn emit(&mut self) -> Result<(bool, bool)> {
        let h = self.hdr()?.clone();
        let Some(n) = self.l1.as_ref().map(|l| l.len()) else {
            return Ok((false, false));
        };
        let mut changed = false;
        while self.gi < n {
            if self
                .l1
                .as_ref()
                .and_then(|l| l.get(self.gi))
                .is_none_or(|e| e.is_none())
            {
                self.gi += 1;
                continue;
            }
            if !self.parsed.contains_key(&self.gi)
                && let Some(t) = self.tables.remove(&self.gi)
            {
                self.tables_bytes -= h.cluster_size();
                let mut runs = Vec::new();
                tables::l2_runs(
                    &h,
                    &t,
                    self.gi as u64 * h.l1_coverage(),
                    self.size,
                    &mut runs,
                )?;
                self.parsed.insert(
                    self.gi,
                    runs.into_iter().filter(|r| r.kind != Kind::Hole).collect(),
                );
            }
            let Some(runs) = self.parsed.get_mut(&self.gi) else {
                return Ok((changed, false));
            };
            let Some(run) = runs.front_mut() else {
                self.parsed.remove(&self.gi);
                self.gi += 1;
                continue;
            };
            match run.kind {
                Kind::Hole => {
                    runs.pop_front();
                }
                Kind::Data { host } => {
                    let ready = self.cursor.saturating_sub(host).min(run.len).min(SEQ_PIECE);
                    if ready == 0 {
                        if self.input_done {
                            return Err(Error::corrupt("qcow2 data cluster beyond end of file")
                                .with_offset(host));
                        }
                        return Ok((changed, false));
                    }
                    let run = *run;
                    // A hole in the file (preallocated or sparse source): pass it on as zeros
                    // without materialising them.
                    let (ready, extent) = match self.zero_at(host) {
                        Some(z) => {
                            let n = z.min(run.len).min(self.cursor - host);
                            let e = Extent::Zero {
                                offset: run.guest,
                                len: n,
                            };
                            (n, e)
                        }
                        None => match self.take(host, ready) {
                            Avail::Ready(bytes) => (
                                ready,
                                Extent::Data {
                                    offset: run.guest,
                                    bytes,
                                },
                            ),
                            Avail::Wait => return Ok((changed, false)),
                            Avail::Gone => return Err(seq_unsupported("a data cluster", host)),
                        },
                    };
                    if let Some(r) = self.parsed.get_mut(&self.gi).and_then(|q| q.front_mut()) {
                        if ready == run.len {
                            if let Some(q) = self.parsed.get_mut(&self.gi) {
                                q.pop_front();
                            }
                        } else {
                            r.guest += ready;
                            r.len -= ready;
                            r.kind = Kind::Data { host: host + ready };
                        }
                    }
                    self.drop_range(host, host + ready);
                    self.out.push_back(extent);
                    return Ok((true, false));
                }
                Kind::Compressed { host, len } => {
                    let len = if self.input_done {
                        len.min(self.cursor.saturating_sub(host))
                    } else {
                        len
                    };
                    let run = *run;
                    let input = match self.take(host, len) {
                        Avail::Ready(b) => b,
                        Avail::Wait => return Ok((changed, false)),
                        Avail::Gone if self.input_done && host >= self.cursor => {
                            return Err(Error::corrupt(
                                "qcow2 compressed cluster beyond end of file",
                            )
                            .with_offset(host));
                        }
                        Avail::Gone => return Err(seq_unsupported("a compressed cluster", host)),
                    };
                    let mut c = tables::decompress(&h, &input).map_err(|e| e.with_offset(host))?;
                    c.truncate(run.len as usize);
                    if let Some(q) = self.parsed.get_mut(&self.gi) {
                        q.pop_front();
                    }
                    // The sector-rounded tail may hold the start of the next compressed cluster.
                    self.drop_range(host, host + len.saturating_sub(512));
                    self.out.push_back(Extent::Data {
                        offset: run.guest,
                        bytes: Bytes::from(c),
                    });
                    return Ok((true, false));
                }
            }
            changed = true;
        }
        Ok((changed, true))
    }

    async fn next_extent(&mut self) -> Result<Option<Extent>> {
        loop {
            if let Some(e) = self.out.pop_front() {
                return Ok(Some(e));
            }
            let meta = self.parse_metadata()?;
            let (emitted, done) = self.emit()?;
            if !self.out.is_empty() {
                continue;
            }
            if done {
                self.buf.clear();
                self.buf_bytes = 0;
                return Ok(None);
            }
            if meta || emitted {
                continue;
            }
            if !self.pull().await? {
                // End of input: one more round with input_done set, then give up.
                self.parse_metadata()?;
                let (_, done) = self.emit()?;
                if let Some(e) = self.out.pop_front() {
                    return Ok(Some(e));
                }
                if done {
                    return Ok(None);
                }
                return Err(Error::corrupt(
                    "qcow2 image truncated: metadata or data beyond end of file",
                )
                .with_offset(self.cursor));
            }
        }
    }
}

/// See [`super::decode_sequential`].
pub(crate) async fn decode_sequential(
    size: Option<u64>,
    stream: ExtentStream,
    _opts: &DecodeOptions,
) -> Result<DiskContent> {
    let mut s = Seq {
        input: stream,
        input_done: false,
        size,
        cursor: 0,
        buf: BTreeMap::new(),
        buf_bytes: 0,
        h: None,
        l1: None,
        l2_wanted: BTreeMap::new(),
        parsed: BTreeMap::new(),
        tables: BTreeMap::new(),
        tables_bytes: 0,
        gi: 0,
        out: VecDeque::new(),
        failed: false,
        max_piece: 0,
    };
    let want = size.map_or(HEAD_LEN as u64, |s| s.min(HEAD_LEN as u64));
    while s.cursor < want {
        if !s.pull().await? {
            break;
        }
    }
    let head = match s.take(0, s.cursor.min(HEAD_LEN as u64)) {
        Avail::Ready(b) => b,
        _ => return Err(Error::corrupt("qcow2 header truncated")),
    };
    let h = Header::parse(&head)?;
    h.check_layout(size)?;
    let virtual_size = h.size;
    let h_cs = h.cluster_size();
    s.h = Some(h);
    s.drop_range(0, h_cs);
    let allocation = prefetch_allocation(&mut s).await?;
    let extents = stream::unfold(s, |mut s| async move {
        if s.failed {
            return None;
        }
        match s.next_extent().await {
            Ok(Some(e)) => Some((Ok(e), s)),
            Ok(None) => None,
            Err(e) => {
                s.failed = true;
                Some((Err(e), s))
            }
        }
    })
    .boxed();
    Ok(DiskContent::new(virtual_size, allocation, extents))
}

/// Reads ahead until the L1 table and every L2 table have arrived, and returns the allocation
/// map they describe — possible without holding data when the tables precede the data (our
/// encoder's layout, and `qemu-img convert`'s for most images). Gives up (returns `None`,
/// leaving everything buffered for the lazy path) as soon as more than half the data budget
/// or half the table budget is waiting, or the input ends.
async fn prefetch_allocation(s: &mut Seq) -> Result<Option<AllocationMap>> {
    loop {
        s.parse_metadata()?;
        if s.l1.is_some() && s.l2_wanted.is_empty() {
            break;
        }
        if s.buf_bytes > SEQ_BUDGET / 2
            || s.buf.len() > 50_000
            || s.tables_bytes > SEQ_TABLE_BUDGET / 2
            || !s.pull().await?
        {
            return Ok(None);
        }
    }
    let h = s.hdr()?.clone();
    let mut ranges = Vec::new();
    for (&i, t) in &s.tables {
        let mut runs = Vec::new();
        tables::l2_runs(&h, t, i as u64 * h.l1_coverage(), s.size, &mut runs)?;
        tables::data_ranges(&runs, &mut ranges);
    }
    Ok(Some(AllocationMap::from_ranges(ranges)))
}
