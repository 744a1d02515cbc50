//! The manifest stored next to every disk: what the object is and how to prove it.
//!
//! Stored as `<key>.manifest.json`. Import reads it first and refuses any object whose size,
//! SHA-256, chunk digests or content digest differ from it, before anything becomes visible.

use crate::digest::{CHUNK_ALGORITHM, CONTENT_ALGORITHM, CONTENT_BLOCK, OBJECT_ALGORITHM};
use crate::format::DiskFormat;
use crate::provider::VmInfo;
use crate::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

/// Current manifest schema version.
pub const SCHEMA_VERSION: u32 = 1;
/// Largest manifest we read (a 5 TiB object with 8 MiB chunks has ~655k chunk digests).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// The key of the manifest of the object at `key`.
pub fn manifest_key(key: &str) -> String {
    format!("{key}.manifest.json")
}

/// A digest with its algorithm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestValue {
    /// Algorithm name (`sha256`, `vrg-blocksha256-v1`).
    pub algorithm: String,
    /// Lower-case hex.
    pub value: String,
    /// Block size, for block-wise algorithms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u64>,
}

/// Per-chunk checksums of the stored bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkDigests {
    /// Algorithm (`crc32c`).
    pub algorithm: String,
    /// Chunk size; the last chunk may be shorter.
    pub chunk_size: u64,
    /// One hex checksum per chunk (CRC32C, big-endian, 8 hex digits).
    pub digests: Vec<String>,
}

/// Where a stored disk came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SourceRef {
    /// Provider kind.
    pub provider: String,
    /// VM id or name.
    pub vm: String,
    /// Disk id.
    pub disk: String,
    /// Snapshot read from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// The manifest of a stored disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// Format of the stored object.
    pub format: DiskFormat,
    /// Guest-visible size of the stored disk, as QEMU reads the object. qcow2 and VMDK record a
    /// size in whole 512-byte sectors (QEMU rounds anything else *down* and loses the tail), so
    /// a disk whose size is not such a multiple is stored rounded *up* with zero bytes, as
    /// `qemu-img convert` does; this field is then the rounded size, and the content digest
    /// covers the padding (see
    /// [`stored_virtual_size`](crate::format::stored_virtual_size)). A raw object keeps the
    /// exact size. An import creates a disk of this size.
    pub virtual_size: u64,
    /// The source's size before it was padded with zeros to whole 512-byte sectors (see
    /// `virtual_size`); absent when no padding was needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padded_from: Option<u64>,
    /// Size of the stored object.
    pub stored_size: u64,
    /// Guest data bytes that are not zero (after zero detection).
    pub allocated_bytes: u64,
    /// SHA-256 of the stored object.
    pub object_digest: DigestValue,
    /// Format-independent digest of the guest-visible content.
    pub content_digest: DigestValue,
    /// Per-chunk digests of the stored object.
    pub chunks: ChunkDigests,
    /// Where the guest data is: `[start, end)` byte ranges, an upper bound (gaps below 1 MiB
    /// may be merged). Lets an import lay out a sparse target (qcow2 tables) before the data
    /// arrives, whatever the stored format. Untrusted: data outside it fails the import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Vec<[u64; 2]>>,
    /// Where the disk came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceRef>,
    /// The VM's hardware description at export time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmInfo>,
    /// Client-side encryption of the stored bytes (scheme and recipients, never a key); the
    /// object digest, chunk digests and stored size are those of the ciphertext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::crypt::EncryptionInfo>,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// `virtrigaud <version>`.
    pub library: String,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Manifest {
    /// Parses and checks a manifest. Malformed JSON or inconsistent fields give `Corrupt`; a
    /// newer schema gives `Unsupported`.
    pub fn parse(data: &[u8]) -> Result<Manifest> {
        let m: Manifest = serde_json::from_slice(data)
            .map_err(|e| Error::corrupt(format!("malformed manifest: {e}")))?;
        m.check()?;
        Ok(m)
    }

    /// Serialises to pretty JSON.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self)
            .map_err(|e| Error::new(ErrorKind::Io, format!("cannot serialise manifest: {e}")))
    }

    /// The allocation map recorded at export, if any.
    pub fn allocation_map(&self) -> Option<crate::extent::AllocationMap> {
        self.allocation.as_ref().map(|a| {
            crate::extent::AllocationMap::from_ranges(a.iter().map(|[s, e]| *s..*e).collect())
        })
    }

    /// Checks internal consistency.
    pub fn check(&self) -> Result<()> {
        if self.schema_version == 0 || self.schema_version > SCHEMA_VERSION {
            return Err(Error::unsupported(format!(
                "manifest schema version {} (this library reads up to {SCHEMA_VERSION})",
                self.schema_version
            )));
        }
        let bad = |why: String| Err(Error::corrupt(format!("invalid manifest: {why}")));
        if let Some(p) = self.padded_from
            && (p >= self.virtual_size || self.virtual_size - p >= 512)
        {
            return bad(format!(
                "padded_from {p} is not within the last sector of virtual size {}",
                self.virtual_size
            ));
        }
        if self.object_digest.algorithm != OBJECT_ALGORITHM
            || !is_hex(&self.object_digest.value, 64)
        {
            return bad("object digest is not a sha256 hex value".into());
        }
        if self.content_digest.algorithm != CONTENT_ALGORITHM
            || self.content_digest.block_size != Some(CONTENT_BLOCK as u64)
            || !is_hex(&self.content_digest.value, 64)
        {
            return bad(format!(
                "content digest algorithm {:?} is not {CONTENT_ALGORITHM}/{CONTENT_BLOCK}",
                self.content_digest.algorithm
            ));
        }
        if self.chunks.algorithm != CHUNK_ALGORITHM || self.chunks.chunk_size == 0 {
            return bad("chunk digests".into());
        }
        let expected = self.stored_size.div_ceil(self.chunks.chunk_size);
        if self.chunks.digests.len() as u64 != expected {
            return bad(format!(
                "{} chunk digests for {} bytes in chunks of {}",
                self.chunks.digests.len(),
                self.stored_size,
                self.chunks.chunk_size
            ));
        }
        if let Some(d) = self.chunks.digests.iter().find(|d| !is_hex(d, 8)) {
            return bad(format!("chunk digest {d:?}"));
        }
        if self.allocated_bytes > self.virtual_size {
            return bad("allocated bytes exceed the virtual size".into());
        }
        if let Some(a) = &self.allocation {
            let mut prev = 0u64;
            for [start, end] in a {
                if start < &prev || end <= start || *end > self.virtual_size {
                    return bad(format!("allocation range {start}..{end}"));
                }
                prev = *end;
            }
        }
        Ok(())
    }
}

/// The current time as RFC 3339 UTC (`2026-11-27T07:00:00Z`).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            padded_from: None,
            schema_version: SCHEMA_VERSION,
            format: DiskFormat::Raw,
            virtual_size: 10,
            stored_size: 10,
            allocated_bytes: 3,
            object_digest: DigestValue {
                algorithm: "sha256".into(),
                value: "a".repeat(64),
                block_size: None,
            },
            content_digest: DigestValue {
                algorithm: CONTENT_ALGORITHM.into(),
                value: "b".repeat(64),
                block_size: Some(CONTENT_BLOCK as u64),
            },
            chunks: ChunkDigests {
                algorithm: "crc32c".into(),
                chunk_size: 8,
                digests: vec!["c".repeat(8), "d".repeat(8)],
            },
            allocation: Some(vec![[0, 4], [6, 10]]),
            source: None,
            vm: None,
            encryption: None,
            created: now_rfc3339(),
            library: "virtrigaud test".into(),
        }
    }

    #[test]
    fn round_trips_and_rejects_inconsistency() {
        let m = sample();
        let back = Manifest::parse(&m.to_json().unwrap()).unwrap();
        assert_eq!(back, m);
        let mut bad = m.clone();
        bad.chunks.digests.pop();
        assert_eq!(
            Manifest::parse(&bad.to_json().unwrap()).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let mut overlap = m.clone();
        overlap.allocation = Some(vec![[0, 6], [4, 10]]);
        assert_eq!(
            Manifest::parse(&overlap.to_json().unwrap())
                .unwrap_err()
                .kind(),
            ErrorKind::Corrupt
        );
        let mut newer = m.clone();
        newer.schema_version = 99;
        assert_eq!(
            Manifest::parse(&newer.to_json().unwrap())
                .unwrap_err()
                .kind(),
            ErrorKind::Unsupported
        );
        assert_eq!(
            Manifest::parse(b"{not json").unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        assert_eq!(
            Manifest::parse(b"{}").unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn rfc3339_shape() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20);
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
