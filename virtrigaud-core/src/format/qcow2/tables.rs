//! L1 and L2 table entries: decoding into guest runs, and cluster decompression.
//!
//! An L1 entry holds the offset of an L2 table (bits 9–55). A standard L2 entry holds a host
//! cluster offset (bits 9–55), the v3 "reads as zeros" flag (bit 0), the compressed flag
//! (bit 62) and the COPIED flag (bit 63). A compressed descriptor splits bits 0–61 at
//! `x = 62 - (cluster_bits - 8)`: the low `x` bits are the byte offset of the compressed data,
//! the bits above are the number of additional 512-byte sectors it spans. Extended L2 entries
//! add a second word: bits 0–31 say which of the 32 subclusters are allocated, bits 32–63 which
//! read as zeros.

use super::header::{Compression, Header};
use crate::{Error, Result};
use std::ops::Range;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const ZERO_FLAG: u64 = 1;

/// What backs a run of guest bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Unallocated or zero: reads as zeros, nothing to read.
    Hole,
    /// Raw bytes starting at `host` in the file.
    Data {
        /// File offset of the first byte of the run.
        host: u64,
    },
    /// One compressed cluster: `len` bytes at `host` (sector-rounded, may overlap the next).
    Compressed {
        /// File offset of the compressed data.
        host: u64,
        /// Bytes to read.
        len: u64,
    },
}

/// A run of guest bytes with one backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// Guest offset.
    pub guest: u64,
    /// Length in guest bytes.
    pub len: u64,
    /// Backing.
    pub kind: Kind,
}

/// Decodes an L1 entry: the L2 table offset, or `None` if unallocated. Checks alignment.
pub(crate) fn l1_entry(h: &Header, e: u64) -> Result<Option<u64>> {
    let off = e & OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if !off.is_multiple_of(h.cluster_size()) {
        return Err(Error::corrupt(format!(
            "qcow2 L2 table offset {off:#x} is not cluster aligned"
        ))
        .with_offset(off));
    }
    Ok(Some(off))
}

/// Checks that an L2 table at `off` lies in the file and overlaps neither the header nor the L1
/// or refcount tables.
pub(crate) fn check_l2_location(h: &Header, off: u64, file_size: Option<u64>) -> Result<()> {
    let cs = h.cluster_size();
    let r = off..off.saturating_add(cs);
    if let Some(fs) = file_size
        && r.end > fs
    {
        return Err(Error::corrupt(format!(
            "qcow2 L2 table at {off:#x} beyond end of file {fs}"
        ))
        .with_offset(off));
    }
    let l1 = h.l1_range()?;
    let rt = h.refcount_table_range()?;
    if off < cs
        || (!l1.is_empty() && super::header::overlaps(&r, &l1))
        || (!rt.is_empty() && super::header::overlaps(&r, &rt))
    {
        return Err(Error::corrupt(format!(
            "qcow2 L2 table at {off:#x} overlaps the header, L1 or refcount table"
        ))
        .with_offset(off));
    }
    Ok(())
}

fn word(table: &[u8], at: usize) -> u64 {
    table
        .get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn push(out: &mut Vec<Run>, run: Run) {
    if let Some(last) = out.last_mut()
        && last.guest + last.len == run.guest
    {
        match (&last.kind, &run.kind) {
            (Kind::Hole, Kind::Hole) => {
                last.len += run.len;
                return;
            }
            (Kind::Data { host: a }, Kind::Data { host: b }) if a + last.len == *b => {
                last.len += run.len;
                return;
            }
            _ => {}
        }
    }
    out.push(run);
}

/// Decodes one L2 table covering guest bytes from `guest_base` into runs (merged, clipped to
/// the virtual size), appended to `out`. Checks every host offset.
pub(crate) fn l2_runs(
    h: &Header,
    table: &[u8],
    guest_base: u64,
    file_size: Option<u64>,
    out: &mut Vec<Run>,
) -> Result<()> {
    let cs = h.cluster_size();
    let esz = h.l2_entry_size() as usize;
    let x = 62 - (h.cluster_bits - 8);
    let l1 = h.l1_range()?;
    let check_host = |host: u64, len: u64| -> Result<()> {
        let bad_fs = file_size.is_some_and(|fs| host >= fs);
        let r = host..host.saturating_add(len);
        if host < cs || bad_fs || (!l1.is_empty() && super::header::overlaps(&r, &l1)) {
            return Err(Error::corrupt(format!(
                "qcow2 data cluster at {host:#x} is outside the file or overlaps metadata"
            ))
            .with_offset(host));
        }
        Ok(())
    };
    for i in 0..h.l2_entries() {
        let guest = guest_base + i * cs;
        if guest >= h.size {
            break;
        }
        let clen = cs.min(h.size - guest);
        let at = i as usize * esz;
        let e = word(table, at);
        if e & COMPRESSED != 0 {
            let desc = e & !(3u64 << 62);
            let host = desc & ((1u64 << x) - 1);
            let sectors = ((desc >> x) & ((1u64 << (h.cluster_bits - 8)) - 1)) + 1;
            let len = sectors * 512 - (host & 511);
            if let Some(fs) = file_size
                && host.saturating_add(len) > fs.div_ceil(512) * 512
            {
                return Err(Error::corrupt(format!(
                    "qcow2 compressed cluster {host:#x}+{len} extends beyond end of file {fs}"
                ))
                .with_offset(host));
            }
            check_host(host, 1)?;
            push(
                out,
                Run {
                    guest,
                    len: clen,
                    kind: Kind::Compressed { host, len },
                },
            );
            continue;
        }
        let host = e & OFFSET_MASK;
        if !host.is_multiple_of(cs) {
            return Err(Error::corrupt(format!(
                "qcow2 data cluster offset {host:#x} is not cluster aligned"
            ))
            .with_offset(host));
        }
        if !h.extended_l2() {
            let zero = h.version >= 3 && e & ZERO_FLAG != 0;
            let kind = if zero || host == 0 {
                Kind::Hole
            } else {
                check_host(host, cs)?;
                Kind::Data { host }
            };
            push(
                out,
                Run {
                    guest,
                    len: clen,
                    kind,
                },
            );
            continue;
        }
        let bitmap = word(table, at + 8);
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(Error::corrupt(
                "qcow2 extended L2 entry marks a subcluster both allocated and zero",
            ));
        }
        if alloc != 0 {
            if host == 0 {
                return Err(Error::corrupt(
                    "qcow2 extended L2 entry has allocated subclusters but no host cluster",
                ));
            }
            check_host(host, cs)?;
        }
        let sc = cs / 32;
        for s in 0..32u64 {
            let g = guest + s * sc;
            if g >= h.size {
                break;
            }
            let len = sc.min(h.size - g);
            let kind = if alloc & (1 << s) != 0 {
                Kind::Data {
                    host: host + s * sc,
                }
            } else {
                Kind::Hole
            };
            push(
                out,
                Run {
                    guest: g,
                    len,
                    kind,
                },
            );
        }
    }
    Ok(())
}

/// Guest ranges of `runs` that hold data (for the allocation map).
pub(crate) fn data_ranges(runs: &[Run], out: &mut Vec<Range<u64>>) {
    for r in runs {
        if r.kind != Kind::Hole {
            match out.last_mut() {
                Some(last) if last.end == r.guest => last.end += r.len,
                _ => out.push(r.guest..r.guest + r.len),
            }
        }
    }
}

/// Largest zstd window we accept in a compressed cluster (clusters are at most 2 MiB).
const MAX_ZSTD_WINDOW: u64 = 8 << 20;

/// Reads the window size a zstd frame header announces, without allocating.
fn zstd_window(input: &[u8]) -> Result<u64> {
    let bad = || Error::corrupt("qcow2 compressed cluster: bad zstd frame header");
    if input.get(0..4) != Some(&[0x28, 0xb5, 0x2f, 0xfd][..]) {
        return Err(bad());
    }
    let fhd = *input.get(4).ok_or_else(bad)?;
    let single = fhd & 0x20 != 0;
    if !single {
        let wd = *input.get(5).ok_or_else(bad)?;
        let exp = u64::from(wd >> 3);
        let base = 1u64 << (10 + exp);
        return Ok(base + (base / 8) * u64::from(wd & 7));
    }
    let did = [0usize, 1, 2, 4][usize::from(fhd & 3)];
    let fcs_len = [1usize, 2, 4, 8][usize::from(fhd >> 6)];
    let at = 5 + did;
    let f = input.get(at..at + fcs_len).ok_or_else(bad)?;
    let mut v = 0u64;
    for (i, b) in f.iter().enumerate() {
        v |= u64::from(*b) << (8 * i);
    }
    if fcs_len == 2 {
        v += 256;
    }
    Ok(v)
}

/// Decompresses one cluster; the output is exactly one cluster.
pub(crate) fn decompress(h: &Header, input: &[u8]) -> Result<Vec<u8>> {
    let cs = h.cluster_size() as usize;
    let mut out = vec![0u8; cs];
    match h.compression {
        Compression::Zlib => {
            let mut d = flate2::Decompress::new(false);
            let r = d.decompress(input, &mut out, flate2::FlushDecompress::Finish);
            match r {
                Ok(_) if d.total_out() as usize == cs => {}
                Ok(_) => {
                    return Err(Error::corrupt(format!(
                        "qcow2 compressed cluster inflates to {} bytes, expected {cs}",
                        d.total_out()
                    )));
                }
                Err(e) => {
                    return Err(Error::corrupt(format!("qcow2 compressed cluster: {e}")));
                }
            }
        }
        Compression::Zstd => {
            use std::io::Read;
            if zstd_window(input)? > MAX_ZSTD_WINDOW {
                return Err(Error::corrupt(
                    "qcow2 compressed cluster: zstd window too large",
                ));
            }
            let mut src = input;
            let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut src)
                .map_err(|e| Error::corrupt(format!("qcow2 compressed cluster: {e}")))?;
            dec.read_exact(&mut out)
                .map_err(|e| Error::corrupt(format!("qcow2 compressed cluster (zstd): {e}")))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::qcow2::header::{INCOMPAT_EXTL2, V3_HEADER_LEN};

    fn hdr(cluster_bits: u32, size: u64, ext: bool) -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 2 << cluster_bits,
            refcount_table_offset: 1 << cluster_bits,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: if ext { INCOMPAT_EXTL2 } else { 0 },
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN as u32,
            compression: Compression::Zlib,
        }
    }

    fn table(entries: &[u64]) -> Vec<u8> {
        entries.iter().flat_map(|e| e.to_be_bytes()).collect()
    }

    #[test]
    fn standard_entries_and_merging() {
        let h = hdr(16, 6 << 16, false);
        let cs = 1u64 << 16;
        let t = table(&[
            (10 * cs) | (1 << 63),
            (11 * cs) | (1 << 63),
            0,
            ZERO_FLAG,
            (20 * cs) | ZERO_FLAG,
            (5 * cs),
        ]);
        let mut runs = Vec::new();
        l2_runs(&h, &t, 0, Some(100 * cs), &mut runs).unwrap();
        assert_eq!(
            runs,
            vec![
                Run {
                    guest: 0,
                    len: 2 * cs,
                    kind: Kind::Data { host: 10 * cs }
                },
                Run {
                    guest: 2 * cs,
                    len: 3 * cs,
                    kind: Kind::Hole
                },
                Run {
                    guest: 5 * cs,
                    len: cs,
                    kind: Kind::Data { host: 5 * cs }
                },
            ]
        );
        let mut d = Vec::new();
        data_ranges(&runs, &mut d);
        assert_eq!(d, vec![0..2 * cs, 5 * cs..6 * cs]);
        // v2 has no zero flag: bit 0 is ignored
        let mut h2 = h.clone();
        h2.version = 2;
        let mut runs = Vec::new();
        l2_runs(&h2, &table(&[(20 * cs) | ZERO_FLAG]), 0, None, &mut runs).unwrap();
        assert_eq!(runs[0].kind, Kind::Data { host: 20 * cs });
    }

    #[test]
    fn compressed_descriptor() {
        let h = hdr(16, 1 << 16, false);
        let x = 62 - (16 - 8);
        let host = 0x30123u64;
        let e = COMPRESSED | (3u64 << x) | host; // 4 sectors
        let mut runs = Vec::new();
        l2_runs(&h, &table(&[e]), 0, Some(1 << 20), &mut runs).unwrap();
        assert_eq!(
            runs[0].kind,
            Kind::Compressed {
                host,
                len: 4 * 512 - 0x123
            }
        );
        // beyond the file
        let mut runs = Vec::new();
        let err = l2_runs(&h, &table(&[e]), 0, Some(0x30200), &mut runs).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
    }

    #[test]
    fn extended_l2_subclusters() {
        let h = hdr(16, 1 << 16, true);
        let cs = 1u64 << 16;
        let sc = cs / 32;
        // subclusters 0,1 allocated, 2 zero, rest unallocated
        let t = table(&[10 * cs, 0b11 | (0b100u64 << 32)]);
        let mut runs = Vec::new();
        l2_runs(&h, &t, 0, Some(100 * cs), &mut runs).unwrap();
        assert_eq!(
            runs,
            vec![
                Run {
                    guest: 0,
                    len: 2 * sc,
                    kind: Kind::Data { host: 10 * cs }
                },
                Run {
                    guest: 2 * sc,
                    len: 30 * sc,
                    kind: Kind::Hole
                },
            ]
        );
        let bad = table(&[10 * cs, 1 | (1u64 << 32)]);
        assert!(l2_runs(&h, &bad, 0, None, &mut Vec::new()).is_err());
    }

    #[test]
    fn hostile_offsets_are_corrupt() {
        let h = hdr(16, 2 << 16, false);
        let cs = 1u64 << 16;
        for e in [123u64 << 9, 50 * cs, 2 * cs /* L1 */] {
            let err = l2_runs(&h, &table(&[e]), 0, Some(10 * cs), &mut Vec::new()).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Corrupt, "{e:#x}");
        }
        assert!(check_l2_location(&h, 0, None).is_err());
        assert!(check_l2_location(&h, 2 * cs, None).is_err());
        assert!(check_l2_location(&h, 9 * cs, Some(9 * cs)).is_err());
        check_l2_location(&h, 9 * cs, Some(10 * cs)).unwrap();
        assert!(l1_entry(&h, 0x1200).is_err());
        assert_eq!(l1_entry(&h, (1 << 63) | (3 * cs)).unwrap(), Some(3 * cs));
    }

    #[test]
    fn decompress_rejects_garbage() {
        let h = hdr(16, 1 << 16, false);
        assert!(decompress(&h, &[1, 2, 3]).is_err());
        let mut hz = h.clone();
        hz.compression = Compression::Zstd;
        assert!(decompress(&hz, &[0x28, 0xb5, 0x2f, 0xfd, 0, 0xff]).is_err());
        // raw deflate of one cluster of 0x5a
        let mut c = flate2::Compress::new(flate2::Compression::default(), false);
        let src = vec![0x5au8; 1 << 16];
        let mut buf = vec![0u8; 1 << 17];
        c.compress(&src, &mut buf, flate2::FlushCompress::Finish)
            .unwrap();
        buf.truncate(c.total_out() as usize);
        assert_eq!(decompress(&h, &buf).unwrap(), src);
    }
}
