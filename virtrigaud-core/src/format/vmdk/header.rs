//! The sparse extent header (`KDMV`, 512 bytes, little-endian) and the stream markers.
//!
//! Every field is hostile input: [`SparseHeader::parse`] checks magic, version, the newline
//! detection bytes, the grain size (a power of two, 1..=2048 sectors), the number of grain table
//! entries per table (512) and a sane capacity before any other code uses them.

use crate::{Error, Result};

/// Bytes in a sector.
pub const SECTOR: u64 = 512;
/// The magic number, `KDMV` in the file.
pub const MAGIC: [u8; 4] = *b"KDMV";
/// `gdOffset` value meaning "the grain directory is at the end; read the footer".
pub const GD_AT_END: u64 = u64::MAX;
/// Flag: the newline detection bytes are valid.
pub const FLAG_VALID_NEWLINE: u32 = 1 << 0;
/// Flag: a redundant grain directory exists.
pub const FLAG_REDUNDANT_GD: u32 = 1 << 1;
/// Flag: a grain table entry of 1 means "zeroed grain".
pub const FLAG_ZEROED_GTE: u32 = 1 << 2;
/// Flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag: the file has markers (streamOptimized).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// `compressAlgorithm` for deflate (zlib streams).
pub const COMPRESS_DEFLATE: u16 = 1;
/// Grain table entries per grain table (the only value in use).
pub const GTES_PER_GT: u32 = 512;
/// Largest accepted grain size, in sectors (1 MiB).
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// Largest accepted capacity, in sectors (512 TiB).
pub const MAX_CAPACITY_SECTORS: u64 = 1 << 40;
/// Grain table entry meaning "zeroed grain" when [`FLAG_ZEROED_GTE`] is set.
pub const GTE_ZEROED: u32 = 1;

/// Marker type: end of stream.
pub const MARKER_EOS: u32 = 0;
/// Marker type: a grain table follows.
pub const MARKER_GT: u32 = 1;
/// Marker type: the grain directory follows.
pub const MARKER_GD: u32 = 2;
/// Marker type: the footer (a copy of the header) follows.
pub const MARKER_FOOTER: u32 = 3;

/// The sparse extent header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    /// Format version (1..=3).
    pub version: u32,
    /// Flags (`FLAG_*`).
    pub flags: u32,
    /// Virtual size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_size: u64,
    /// Embedded descriptor offset, in sectors (0 = none).
    pub descriptor_offset: u64,
    /// Embedded descriptor size, in sectors.
    pub descriptor_size: u64,
    /// Grain table entries per grain table (512).
    pub num_gtes_per_gt: u32,
    /// Redundant grain directory offset, in sectors.
    pub rgd_offset: u64,
    /// Grain directory offset, in sectors ([`GD_AT_END`] in a streamOptimized header).
    pub gd_offset: u64,
    /// Sectors of metadata before the first grain.
    pub overhead: u64,
    /// Whether the file was not closed cleanly.
    pub unclean_shutdown: bool,
    /// Compression algorithm (0 none, 1 deflate).
    pub compress_algorithm: u16,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(o..o + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(o..o + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

impl SparseHeader {
    /// A header for a new image of `capacity` sectors with the usual values (grain 128 sectors,
    /// 512 entries per table, descriptor at sector 1).
    pub fn new(capacity: u64) -> Self {
        SparseHeader {
            version: 1,
            flags: FLAG_VALID_NEWLINE,
            capacity,
            grain_size: 128,
            descriptor_offset: 1,
            descriptor_size: 20,
            num_gtes_per_gt: GTES_PER_GT,
            rgd_offset: 0,
            gd_offset: 0,
            overhead: 128,
            unclean_shutdown: false,
            compress_algorithm: 0,
        }
    }

    /// Parses and checks a header from at least 512 bytes (the first sector or the footer).
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < SECTOR as usize {
            return Err(Error::corrupt("VMDK header shorter than one sector"));
        }
        if b[..4] != MAGIC {
            return Err(Error::corrupt("not a VMDK sparse extent (bad magic)"));
        }
        let h = SparseHeader {
            version: u32_at(b, 4),
            flags: u32_at(b, 8),
            capacity: u64_at(b, 12),
            grain_size: u64_at(b, 20),
            descriptor_offset: u64_at(b, 28),
            descriptor_size: u64_at(b, 36),
            num_gtes_per_gt: u32_at(b, 44),
            rgd_offset: u64_at(b, 48),
            gd_offset: u64_at(b, 56),
            overhead: u64_at(b, 64),
            unclean_shutdown: b[72] != 0,
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        };
        if !(1..=3).contains(&h.version) {
            return Err(Error::unsupported(format!(
                "VMDK version {} not supported",
                h.version
            )));
        }
        if h.flags & FLAG_VALID_NEWLINE != 0 && b[73..77] != *b"\n \r\n" {
            return Err(Error::corrupt(
                "VMDK newline detection bytes damaged (file transferred in text mode?)",
            ));
        }
        if h.grain_size == 0 || h.grain_size > MAX_GRAIN_SECTORS || !h.grain_size.is_power_of_two()
        {
            return Err(Error::corrupt(format!(
                "VMDK grain size {} sectors invalid",
                h.grain_size
            )));
        }
        if h.num_gtes_per_gt != GTES_PER_GT {
            return Err(Error::corrupt(format!(
                "VMDK numGTEsPerGT {} (only 512 is valid)",
                h.num_gtes_per_gt
            )));
        }
        if h.capacity > MAX_CAPACITY_SECTORS {
            return Err(Error::corrupt(format!(
                "VMDK capacity {} sectors too large",
                h.capacity
            )));
        }
        if h.descriptor_size > 2048 {
            return Err(Error::corrupt(format!(
                "VMDK embedded descriptor of {} sectors too large",
                h.descriptor_size
            )));
        }
        if h.flags & FLAG_COMPRESSED != 0 && h.compress_algorithm != COMPRESS_DEFLATE {
            return Err(Error::unsupported(format!(
                "VMDK compression algorithm {} not supported",
                h.compress_algorithm
            )));
        }
        Ok(h)
    }

    /// Serialises the header into one 512-byte sector.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_size.to_le_bytes());
        b[28..36].copy_from_slice(&self.descriptor_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.num_gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = u8::from(self.unclean_shutdown);
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }

    /// Grain size in bytes.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_size * SECTOR
    }
    /// Virtual size in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity * SECTOR
    }
    /// Number of grains covering the capacity.
    pub fn grain_count(&self) -> u64 {
        self.capacity.div_ceil(self.grain_size)
    }
    /// Number of grain tables (= grain directory entries).
    pub fn gt_count(&self) -> u64 {
        self.grain_count().div_ceil(u64::from(self.num_gtes_per_gt))
    }
    /// Whether grains are compressed.
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }
    /// Whether the file has markers.
    pub fn markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }
    /// Whether a grain table entry of 1 means "zeroed grain".
    pub fn zeroed_gte(&self) -> bool {
        self.flags & FLAG_ZEROED_GTE != 0
    }
}

/// A marker as read from the start of a sector (streamOptimized).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// A compressed grain: its first sector (LBA) and compressed size in bytes.
    Grain {
        /// Guest sector of the grain.
        lba: u64,
        /// Compressed bytes following the 12-byte marker.
        size: u32,
    },
    /// A metadata marker: `sectors` of metadata of `kind` (`MARKER_*`) follow this sector.
    Meta {
        /// Sectors of metadata that follow.
        sectors: u64,
        /// `MARKER_EOS`, `MARKER_GT`, `MARKER_GD` or `MARKER_FOOTER`.
        kind: u32,
    },
}

impl Marker {
    /// Parses a marker from the first 16 bytes of a sector.
    pub fn parse(b: &[u8]) -> Result<Marker> {
        if b.len() < 16 {
            return Err(Error::corrupt("VMDK marker truncated"));
        }
        let val = u64_at(b, 0);
        let size = u32_at(b, 8);
        if size != 0 {
            return Ok(Marker::Grain { lba: val, size });
        }
        Ok(Marker::Meta {
            sectors: val,
            kind: u32_at(b, 12),
        })
    }

    /// A metadata marker sector.
    pub fn meta_sector(sectors: u64, kind: u32) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..8].copy_from_slice(&sectors.to_le_bytes());
        b[12..16].copy_from_slice(&kind.to_le_bytes());
        b
    }

    /// The 12-byte grain marker.
    pub fn grain_marker(lba: u64, size: u32) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[..8].copy_from_slice(&lba.to_le_bytes());
        b[8..12].copy_from_slice(&size.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let mut h = SparseHeader::new(2048);
        h.version = 3;
        h.flags = FLAG_VALID_NEWLINE | FLAG_COMPRESSED | FLAG_MARKERS;
        h.gd_offset = GD_AT_END;
        h.compress_algorithm = COMPRESS_DEFLATE;
        let b = h.to_bytes();
        assert_eq!(&b[..4], b"KDMV");
        assert_eq!(u32_at(&b, 8), 0x30001);
        assert_eq!(SparseHeader::parse(&b).unwrap(), h);
        assert_eq!(h.grain_count(), 16);
        assert_eq!(h.gt_count(), 1);
    }

    #[test]
    fn header_rejects_hostile_fields() {
        let good = SparseHeader::new(1 << 20).to_bytes();
        let bad = |f: &dyn Fn(&mut [u8; 512])| {
            let mut b = good;
            f(&mut b);
            SparseHeader::parse(&b).unwrap_err().kind()
        };
        use crate::ErrorKind::*;
        assert_eq!(bad(&|b| b[0] = b'X'), Corrupt);
        assert_eq!(bad(&|b| b[4] = 9), Unsupported);
        assert_eq!(bad(&|b| b[75] = b'\n'), Corrupt);
        assert_eq!(
            bad(&|b| b[20..28].copy_from_slice(&100u64.to_le_bytes())),
            Corrupt
        );
        assert_eq!(
            bad(&|b| b[20..28].copy_from_slice(&0u64.to_le_bytes())),
            Corrupt
        );
        assert_eq!(
            bad(&|b| b[20..28].copy_from_slice(&4096u64.to_le_bytes())),
            Corrupt
        );
        assert_eq!(
            bad(&|b| b[44..48].copy_from_slice(&4096u32.to_le_bytes())),
            Corrupt
        );
        assert_eq!(
            bad(&|b| b[12..20].copy_from_slice(&u64::MAX.to_le_bytes())),
            Corrupt
        );
        assert_eq!(
            bad(&|b| b[36..44].copy_from_slice(&u64::MAX.to_le_bytes())),
            Corrupt
        );
        assert!(SparseHeader::parse(&good[..100]).is_err());
    }

    #[test]
    fn markers_round_trip() {
        let g = Marker::grain_marker(256, 1234);
        let mut s = [0u8; 16];
        s[..12].copy_from_slice(&g);
        assert_eq!(
            Marker::parse(&s).unwrap(),
            Marker::Grain {
                lba: 256,
                size: 1234
            }
        );
        let m = Marker::meta_sector(4, MARKER_GT);
        assert_eq!(
            Marker::parse(&m).unwrap(),
            Marker::Meta {
                sectors: 4,
                kind: MARKER_GT
            }
        );
        assert_eq!(
            Marker::parse(&[0u8; 512]).unwrap(),
            Marker::Meta {
                sectors: 0,
                kind: MARKER_EOS
            }
        );
    }
}
