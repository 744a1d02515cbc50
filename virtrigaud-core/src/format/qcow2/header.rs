//! The qcow2 header: big-endian fields, feature bits, parse and write.

use crate::{Error, Result};

/// `QFI\xfb`.
pub(crate) const MAGIC: u32 = 0x5146_49fb;
/// Incompatible feature: the image was not closed cleanly (refcounts may be stale).
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is known to be corrupt.
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external data file.
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type field is meaningful.
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: L2 entries are 128 bits with 32 subclusters.
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible feature we understand.
pub(crate) const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Smallest and largest cluster size we accept (qemu's limits: 512 B .. 2 MiB).
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
/// Largest virtual size we accept.
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 1 << 63;
/// Largest L1 table we accept (bytes): covers far more than any real disk.
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
/// Length of a version 2 header.
pub(crate) const V2_HEADER_LEN: usize = 72;
/// Length of the version 3 header we write (with the compression type field).
pub(crate) const V3_HEADER_LEN: usize = 112;

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    /// Raw deflate (no zlib header), the default.
    Zlib,
    /// One zstd frame per cluster.
    Zstd,
}

/// The fields of a qcow2 header that matter to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
}

fn be32(b: &[u8], at: usize) -> Result<u32> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| Error::corrupt("qcow2 header truncated").with_offset(at as u64))
}

fn be64(b: &[u8], at: usize) -> Result<u64> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| Error::corrupt("qcow2 header truncated").with_offset(at as u64))
}

impl Header {
    /// Parses the header from the first bytes of the image and checks everything that can be
    /// checked without the file size. `head` should hold at least the first 4 KiB (or the whole
    /// file if shorter); the backing file name is looked up there for the error message.
    pub fn parse(head: &[u8]) -> Result<Header> {
        if be32(head, 0)? != MAGIC {
            return Err(Error::corrupt("not a qcow2 image (bad magic)"));
        }
        let version = be32(head, 4)?;
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "qcow2 version {version} is not supported"
            )));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(head, 8)?,
            backing_file_size: be32(head, 16)?,
            cluster_bits: be32(head, 20)?,
            size: be64(head, 24)?,
            crypt_method: be32(head, 32)?,
            l1_size: be32(head, 36)?,
            l1_table_offset: be64(head, 40)?,
            refcount_table_offset: be64(head, 48)?,
            refcount_table_clusters: be32(head, 56)?,
            nb_snapshots: be32(head, 60)?,
            snapshots_offset: be64(head, 64)?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression: Compression::Zlib,
        };
        if version == 3 {
            h.incompatible_features = be64(head, 72)?;
            h.compatible_features = be64(head, 80)?;
            h.autoclear_features = be64(head, 88)?;
            h.refcount_order = be32(head, 96)?;
            h.header_length = be32(head, 100)?;
            if h.header_length < 104 || !h.header_length.is_multiple_of(8) {
                return Err(Error::corrupt(format!(
                    "qcow2 header length {} is invalid",
                    h.header_length
                )));
            }
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(Error::corrupt(format!(
                "qcow2 cluster_bits {} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}",
                h.cluster_bits
            )));
        }
        if u64::from(h.header_length) > h.cluster_size() {
            return Err(Error::corrupt("qcow2 header longer than a cluster"));
        }
        if h.refcount_order > 6 {
            return Err(Error::corrupt(format!(
                "qcow2 refcount_order {} is invalid",
                h.refcount_order
            )));
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(Error::corrupt(format!(
                "qcow2 virtual size {} is too large",
                h.size
            )));
        }
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "qcow2 image uses unknown incompatible features {unknown:#x}"
            )));
        }
        if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Err(Error::corrupt(
                "qcow2 image is marked corrupt; repair it with `qemu-img check -r all` first",
            ));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::unsupported(
                "qcow2 image keeps its data in an external data file; supply the data file as a raw image",
            ));
        }
        if h.incompatible_features & INCOMPAT_DIRTY != 0 {
            // Only refcounts may be stale; we never read them, so the mapping is still valid.
            tracing::warn!(
                "qcow2 image is marked dirty (not closed cleanly); reading its L1/L2 tables anyway"
            );
        }
        if h.incompatible_features & INCOMPAT_COMPRESSION != 0 {
            if h.header_length < 105 {
                return Err(Error::corrupt(
                    "qcow2 compression type feature set but header has no compression type field",
                ));
            }
            let t = *head
                .get(104)
                .ok_or_else(|| Error::corrupt("qcow2 header truncated").with_offset(104))?;
            h.compression = match t {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                other => {
                    return Err(Error::unsupported(format!(
                        "qcow2 compression type {other} is not supported"
                    )));
                }
            };
        }
        if h.extended_l2() && h.cluster_bits < 14 {
            return Err(Error::corrupt(
                "qcow2 extended L2 needs clusters of at least 16 KiB",
            ));
        }
        if h.crypt_method != 0 {
            return Err(Error::unsupported(format!(
                "qcow2 image is encrypted (method {}); decrypt it with qemu-img first",
                h.crypt_method
            )));
        }
        if h.backing_file_offset != 0 {
            let name = usize::try_from(h.backing_file_offset)
                .ok()
                .and_then(|o| head.get(o..o.checked_add(h.backing_file_size.min(1023) as usize)?))
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_else(|| "(name not readable)".to_string());
            return Err(Error::unsupported(format!(
                "backing file {name}: supply the backing chain (flatten it with `qemu-img convert` or migrate the whole chain)"
            )));
        }
        let needed_l1 = h.l1_entries_needed();
        if u64::from(h.l1_size) < needed_l1 {
            return Err(Error::corrupt(format!(
                "qcow2 L1 table has {} entries, virtual size {} needs {needed_l1}",
                h.l1_size, h.size
            )));
        }
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "qcow2 L1 table of {} entries is larger than {MAX_L1_BYTES} bytes",
                h.l1_size
            )));
        }
        if h.l1_size > 0
            && (!h.l1_table_offset.is_multiple_of(h.cluster_size()) || h.l1_table_offset == 0)
        {
            return Err(
                Error::corrupt("qcow2 L1 table offset is not cluster aligned or is 0")
                    .with_offset(h.l1_table_offset),
            );
        }
        if !h.refcount_table_offset.is_multiple_of(h.cluster_size()) {
            return Err(
                Error::corrupt("qcow2 refcount table offset is not cluster aligned")
                    .with_offset(h.refcount_table_offset),
            );
        }
        Ok(h)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Whether L2 entries are extended (128-bit, 32 subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() { 16 } else { 8 }
    }

    /// Entries per L2 table (an L2 table fills one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Guest bytes covered by one L1 entry.
    pub fn l1_coverage(&self) -> u64 {
        self.cluster_size() * self.l2_entries()
    }

    /// L1 entries needed to cover the virtual size.
    pub fn l1_entries_needed(&self) -> u64 {
        self.size.div_ceil(self.l1_coverage())
    }

    /// Byte range of the L1 table in the file (checked against overflow).
    pub fn l1_range(&self) -> Result<std::ops::Range<u64>> {
        let len = u64::from(self.l1_size) * 8;
        let end = self
            .l1_table_offset
            .checked_add(len)
            .ok_or_else(|| Error::corrupt("qcow2 L1 table offset overflows"))?;
        Ok(self.l1_table_offset..end)
    }

    /// Byte range of the refcount table in the file.
    pub fn refcount_table_range(&self) -> Result<std::ops::Range<u64>> {
        let len = u64::from(self.refcount_table_clusters) << self.cluster_bits;
        let end = self
            .refcount_table_offset
            .checked_add(len)
            .ok_or_else(|| Error::corrupt("qcow2 refcount table offset overflows"))?;
        Ok(self.refcount_table_offset..end)
    }

    /// Checks the table locations against the file size (when known) and each other.
    pub fn check_layout(&self, file_size: Option<u64>) -> Result<()> {
        let cs = self.cluster_size();
        let l1 = self.l1_range()?;
        let rt = self.refcount_table_range()?;
        if let Some(fs) = file_size {
            if l1.end > fs {
                return Err(Error::corrupt(format!(
                    "qcow2 L1 table {}..{} beyond end of file {fs}",
                    l1.start, l1.end
                ))
                .with_offset(l1.start));
            }
            if rt.end > fs {
                return Err(Error::corrupt(format!(
                    "qcow2 refcount table {}..{} beyond end of file {fs}",
                    rt.start, rt.end
                ))
                .with_offset(rt.start));
            }
        }
        let header = 0..cs;
        if !l1.is_empty() && overlaps(&l1, &header) {
            return Err(Error::corrupt("qcow2 L1 table overlaps the header").with_offset(l1.start));
        }
        if !rt.is_empty() && overlaps(&rt, &header) {
            return Err(
                Error::corrupt("qcow2 refcount table overlaps the header").with_offset(rt.start)
            );
        }
        if !l1.is_empty() && !rt.is_empty() && overlaps(&l1, &rt) {
            return Err(
                Error::corrupt("qcow2 L1 table overlaps the refcount table").with_offset(l1.start)
            );
        }
        Ok(())
    }

    /// Serialises a version 3 header (with the compression type field) into `out`, which must
    /// be at least [`V3_HEADER_LEN`] + 8 bytes long (the extension end marker is zeros).
    pub fn write_v3(&self, out: &mut [u8]) {
        let mut put = |at: usize, v: &[u8]| {
            if let Some(d) = out.get_mut(at..at + v.len()) {
                d.copy_from_slice(v);
            }
        };
        put(0, &MAGIC.to_be_bytes());
        put(4, &3u32.to_be_bytes());
        put(8, &self.backing_file_offset.to_be_bytes());
        put(16, &self.backing_file_size.to_be_bytes());
        put(20, &self.cluster_bits.to_be_bytes());
        put(24, &self.size.to_be_bytes());
        put(32, &self.crypt_method.to_be_bytes());
        put(36, &self.l1_size.to_be_bytes());
        put(40, &self.l1_table_offset.to_be_bytes());
        put(48, &self.refcount_table_offset.to_be_bytes());
        put(56, &self.refcount_table_clusters.to_be_bytes());
        put(60, &self.nb_snapshots.to_be_bytes());
        put(64, &self.snapshots_offset.to_be_bytes());
        put(72, &self.incompatible_features.to_be_bytes());
        put(80, &self.compatible_features.to_be_bytes());
        put(88, &self.autoclear_features.to_be_bytes());
        put(96, &self.refcount_order.to_be_bytes());
        put(100, &(V3_HEADER_LEN as u32).to_be_bytes());
        let ct = match self.compression {
            Compression::Zlib => 0u8,
            Compression::Zstd => 1u8,
        };
        put(104, &[ct]);
    }
}

/// Whether two ranges share a byte.
pub(crate) fn overlaps(a: &std::ops::Range<u64>, b: &std::ops::Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 10 << 30,
            crypt_method: 0,
            l1_size: 20,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN as u32,
            compression: Compression::Zlib,
        }
    }

    fn bytes(h: &Header) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        h.write_v3(&mut b);
        b
    }

    #[test]
    fn write_parse_round_trip() {
        let h = sample();
        assert_eq!(Header::parse(&bytes(&h)).unwrap(), h);
        assert_eq!(h.l2_entries(), 8192);
        assert_eq!(h.l1_coverage(), 512 << 20);
        assert_eq!(h.l1_entries_needed(), 20);
        h.check_layout(Some(1 << 20)).unwrap();
    }

    #[test]
    fn rejects_bad_fields() {
        use crate::ErrorKind::*;
        type Mutation = Box<dyn Fn(&mut Header)>;
        let cases: Vec<(Mutation, crate::ErrorKind)> = vec![
            (Box::new(|h| h.cluster_bits = 8), Corrupt),
            (Box::new(|h| h.cluster_bits = 22), Corrupt),
            (Box::new(|h| h.l1_size = 3), Corrupt),
            (Box::new(|h| h.l1_size = u32::MAX), Corrupt),
            (Box::new(|h| h.l1_table_offset = 12345), Corrupt),
            (Box::new(|h| h.refcount_order = 7), Corrupt),
            (Box::new(|h| h.size = u64::MAX), Corrupt),
            (Box::new(|h| h.crypt_method = 1), Unsupported),
            (Box::new(|h| h.incompatible_features = 1 << 9), Unsupported),
            (
                Box::new(|h| h.incompatible_features = INCOMPAT_CORRUPT),
                Corrupt,
            ),
            (
                Box::new(|h| h.incompatible_features = INCOMPAT_DATA_FILE),
                Unsupported,
            ),
        ];
        for (i, (f, kind)) in cases.iter().enumerate() {
            let mut h = sample();
            f(&mut h);
            assert_eq!(
                Header::parse(&bytes(&h)).unwrap_err().kind(),
                *kind,
                "case {i}"
            );
        }
        let mut b = bytes(&sample());
        b[0] = 0;
        assert!(Header::parse(&b).is_err());
        assert!(Header::parse(&b[..50]).is_err());
        // dirty is accepted
        let mut h = sample();
        h.incompatible_features = INCOMPAT_DIRTY;
        Header::parse(&bytes(&h)).unwrap();
    }

    #[test]
    fn backing_file_is_unsupported_with_name() {
        let mut h = sample();
        h.backing_file_offset = 200;
        h.backing_file_size = 8;
        let mut b = bytes(&h);
        b[200..208].copy_from_slice(b"base.img");
        let e = Header::parse(&b).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        assert!(
            e.message()
                .contains("backing file base.img: supply the backing chain"),
            "{e}"
        );
    }

    #[test]
    fn compression_type_and_layout_overlaps() {
        let mut h = sample();
        h.incompatible_features = INCOMPAT_COMPRESSION;
        h.compression = Compression::Zstd;
        assert_eq!(
            Header::parse(&bytes(&h)).unwrap().compression,
            Compression::Zstd
        );
        let mut b = bytes(&h);
        b[104] = 5;
        assert_eq!(
            Header::parse(&b).unwrap_err().kind(),
            crate::ErrorKind::Unsupported
        );
        let mut h = sample();
        h.l1_table_offset = 1 << 16; // same as refcount table
        assert_eq!(
            h.check_layout(None).unwrap_err().kind(),
            crate::ErrorKind::Corrupt
        );
        let h = sample();
        assert_eq!(
            h.check_layout(Some(1000)).unwrap_err().kind(),
            crate::ErrorKind::Corrupt
        );
    }
}
