//! Disk image formats: detection by magic bytes, and one folder per format with its codec.
//!
//! A format is never inferred from a file name: [`DiskFormat::detect`] reads the first bytes.

mod deflate;
pub mod qcow2;
pub mod raw;
pub mod vmdk;

use serde::{Deserialize, Serialize};
use std::fmt;

/// How many leading bytes [`DiskFormat::detect`] wants to see (fewer works, with less certainty).
pub const DETECT_LEN: usize = 512;

/// Sub-format of a VMDK image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VmdkSubformat {
    /// Sparse extent with the descriptor embedded (hosted products).
    MonolithicSparse,
    /// Compressed grains with markers, written and read sequentially (OVF, NFC).
    StreamOptimized,
    /// A text descriptor naming its extents in files of their own: monolithicFlat (one flat
    /// extent) and the split twoGbMaxExtentFlat and twoGbMaxExtentSparse (flat or hosted sparse
    /// extents of at most 2 GiB), read through an
    /// [`ExtentResolver`](vmdk::ExtentResolver). Named `vmdk-flat` for history.
    MonolithicFlat,
}

/// A disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type", content = "subformat")]
pub enum DiskFormat {
    /// Raw bytes: offset in the file is offset in the disk.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware virtual disk.
    Vmdk(VmdkSubformat),
}

impl DiskFormat {
    /// Detects the format of an image from its first bytes (ideally [`DETECT_LEN`]).
    ///
    /// Anything without a known magic is raw. Formats we know but do not implement (VHDX, VHD,
    /// VDI, QED) are reported as [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) so
    /// they are never mistaken for raw disks.
    ///
    /// ```
    /// use virtrigaud_core::format::DiskFormat;
    /// assert_eq!(DiskFormat::detect(b"QFI\xfb\0\0\0\x03").unwrap(), DiskFormat::Qcow2);
    /// assert_eq!(DiskFormat::detect(&[0u8; 512]).unwrap(), DiskFormat::Raw);
    /// ```
    pub fn detect(head: &[u8]) -> crate::Result<DiskFormat> {
        if head.starts_with(b"QFI\xfb") {
            return Ok(DiskFormat::Qcow2);
        }
        if head.starts_with(b"KDMV") {
            // Sparse extent header: flags at offset 8, bit 16 = compressed grains,
            // bit 17 = markers (streamOptimized); compressAlgorithm at offset 77.
            let sub = if head.len() >= 12 {
                let flags = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
                if flags & (1 << 17) != 0 && flags & (1 << 16) != 0 {
                    VmdkSubformat::StreamOptimized
                } else {
                    VmdkSubformat::MonolithicSparse
                }
            } else {
                VmdkSubformat::MonolithicSparse
            };
            return Ok(DiskFormat::Vmdk(sub));
        }
        if head.starts_with(b"# Disk DescriptorFile") {
            return Ok(DiskFormat::Vmdk(VmdkSubformat::MonolithicFlat));
        }
        if head.starts_with(b"vhdxfile") {
            return Err(crate::Error::unsupported(
                "VHDX images are not supported natively",
            ));
        }
        if head.starts_with(b"conectix") {
            return Err(crate::Error::unsupported(
                "VHD images are not supported natively",
            ));
        }
        if head.starts_with(b"QED\0") {
            return Err(crate::Error::unsupported("QED images are not supported"));
        }
        if head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe] {
            return Err(crate::Error::unsupported(
                "VDI images are not supported natively",
            ));
        }
        Ok(DiskFormat::Raw)
    }

    /// The usual file extension (without the dot).
    pub fn extension(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vmdk(_) => "vmdk",
        }
    }

    /// Short name, as qemu-img spells it (`raw`, `qcow2`, `vmdk`).
    pub fn name(self) -> &'static str {
        self.extension()
    }

    /// Parses `raw`, `qcow2`, `vmdk` (= streamOptimized), `vmdk-sparse`, `vmdk-stream`, `vmdk-flat`.
    pub fn parse(s: &str) -> crate::Result<DiskFormat> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => DiskFormat::Raw,
            "qcow2" => DiskFormat::Qcow2,
            "vmdk" | "vmdk-stream" | "streamoptimized" => {
                DiskFormat::Vmdk(VmdkSubformat::StreamOptimized)
            }
            "vmdk-sparse" | "monolithicsparse" => DiskFormat::Vmdk(VmdkSubformat::MonolithicSparse),
            "vmdk-flat" | "monolithicflat" => DiskFormat::Vmdk(VmdkSubformat::MonolithicFlat),
            other => {
                return Err(crate::Error::invalid(format!(
                    "unknown disk format '{other}'"
                )));
            }
        })
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskFormat::Raw => f.write_str("raw"),
            DiskFormat::Qcow2 => f.write_str("qcow2"),
            DiskFormat::Vmdk(VmdkSubformat::StreamOptimized) => f.write_str("vmdk-stream"),
            DiskFormat::Vmdk(VmdkSubformat::MonolithicSparse) => f.write_str("vmdk-sparse"),
            DiskFormat::Vmdk(VmdkSubformat::MonolithicFlat) => f.write_str("vmdk-flat"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_by_magic_not_name() {
        assert_eq!(DiskFormat::detect(b"QFI\xfb").unwrap(), DiskFormat::Qcow2);
        let mut vmdk = b"KDMV\x01\0\0\0".to_vec();
        vmdk.extend_from_slice(&((1u32 << 16) | (1 << 17) | 1).to_le_bytes());
        assert_eq!(
            DiskFormat::detect(&vmdk).unwrap(),
            DiskFormat::Vmdk(VmdkSubformat::StreamOptimized)
        );
        let mut sparse = b"KDMV\x01\0\0\0".to_vec();
        sparse.extend_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            DiskFormat::detect(&sparse).unwrap(),
            DiskFormat::Vmdk(VmdkSubformat::MonolithicSparse)
        );
        assert_eq!(
            DiskFormat::detect(b"# Disk DescriptorFile\nversion=1").unwrap(),
            DiskFormat::Vmdk(VmdkSubformat::MonolithicFlat)
        );
        assert_eq!(DiskFormat::detect(b"").unwrap(), DiskFormat::Raw);
        assert_eq!(
            DiskFormat::detect(b"vhdxfile").unwrap_err().kind(),
            crate::ErrorKind::Unsupported
        );
    }

    #[test]
    fn parse_and_display_round_trip() {
        for f in [
            DiskFormat::Raw,
            DiskFormat::Qcow2,
            DiskFormat::Vmdk(VmdkSubformat::StreamOptimized),
            DiskFormat::Vmdk(VmdkSubformat::MonolithicSparse),
            DiskFormat::Vmdk(VmdkSubformat::MonolithicFlat),
        ] {
            assert_eq!(DiskFormat::parse(&f.to_string()).unwrap(), f);
        }
        assert!(DiskFormat::parse("vhdx").is_err());
    }
}

use crate::extent::DiskContent;
use crate::io::ImageSource;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};

/// A piece of encoded output: bytes, or a run of zero bytes that sparse sinks may skip.
#[derive(Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Bytes to write.
    Data(Bytes),
    /// Zero bytes to write (or skip, on a sparse sink).
    Zeros(u64),
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chunk::Data(b) => write!(f, "Data({})", b.len()),
            Chunk::Zeros(n) => write!(f, "Zeros({n})"),
        }
    }
}

impl Chunk {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Chunk::Data(b) => b.len() as u64,
            Chunk::Zeros(n) => *n,
        }
    }
    /// Whether the chunk is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Encoded output, strictly sequential.
pub type ChunkStream = BoxStream<'static, crate::Result<Chunk>>;

/// Options for decoders.
#[derive(Clone)]
pub struct DecodeOptions {
    /// Size of one read from a random-access source.
    pub read_size: usize,
    /// Reads in flight at once on a random-access source.
    pub read_ahead: usize,
    /// Opens the extent files of a monolithicFlat VMDK descriptor.
    pub extent_resolver: Option<std::sync::Arc<dyn vmdk::ExtentResolver>>,
}

impl std::fmt::Debug for DecodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeOptions")
            .field("read_size", &self.read_size)
            .field("read_ahead", &self.read_ahead)
            .field("extent_resolver", &self.extent_resolver.is_some())
            .finish()
    }
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            read_size: 4 << 20,
            read_ahead: 2,
            extent_resolver: None,
        }
    }
}

/// Options for encoders.
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    /// Compress qcow2 clusters (streamOptimized VMDK always compresses its grains). The qcow2
    /// encoder then reads the content twice and needs [`DiskContent::replay`] (a random-access
    /// source); without it, `Unsupported`.
    pub compress: bool,
    /// Deflate/zlib level 0–9 for compressed output (default 6, like qemu-img).
    pub compression_level: u32,
    /// qcow2 cluster size (default 64 KiB; 512 B to 2 MiB, compressed or not).
    pub cluster_size: u32,
    /// Compression workers (default: the number of cores).
    pub parallelism: usize,
    /// Encrypt the encoded bytes for these age recipients before they are hashed and stored
    /// (feature `encryption`; see [`crate::crypt`]). Exports only.
    pub encrypt: Option<crate::crypt::Encryption>,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            compress: false,
            compression_level: 6,
            cluster_size: 64 << 10,
            parallelism: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            encrypt: None,
        }
    }
}

/// Reads the first bytes of a source and detects its format.
pub async fn detect(source: ImageSource) -> crate::Result<(DiskFormat, ImageSource)> {
    match source {
        ImageSource::RandomAccess(r) => {
            let head = r.read_at(0, DETECT_LEN).await?;
            Ok((DiskFormat::detect(&head)?, ImageSource::RandomAccess(r)))
        }
        ImageSource::Sequential { size, mut stream } => {
            // Peek the first data extent; a stream starting with a hole is raw.
            let first = stream.next().await.transpose()?;
            let format = match &first {
                Some(crate::extent::Extent::Data { offset: 0, bytes }) => {
                    DiskFormat::detect(&bytes[..bytes.len().min(DETECT_LEN)])?
                }
                _ => DiskFormat::Raw,
            };
            let stream = futures::stream::iter(first.map(Ok)).chain(stream).boxed();
            Ok((format, ImageSource::Sequential { size, stream }))
        }
    }
}

/// Opens an image: detects its format by magic (or checks `expected`) and decodes it to the
/// guest-visible content.
///
/// A random-access source can be read again, so the content gets a
/// [`replay`](DiskContent::replay) that decodes the image once more from the start (it re-reads
/// the image's tables: cheap). Sequential sources get none.
pub async fn decode(
    source: ImageSource,
    expected: Option<DiskFormat>,
    opts: &DecodeOptions,
) -> crate::Result<(DiskFormat, DiskContent)> {
    let (format, source) = detect(source).await?;
    if let Some(exp) = expected {
        let same_family = std::mem::discriminant(&exp) == std::mem::discriminant(&format);
        if !same_family {
            return Err(crate::Error::corrupt(format!(
                "image format is {format}, expected {exp}"
            )));
        }
    }
    let again = match &source {
        ImageSource::RandomAccess(r) => Some(r.clone()),
        ImageSource::Sequential { .. } => None,
    };
    let content = decode_as(format, source, opts).await?;
    let content = match again {
        Some(src) => {
            let opts = opts.clone();
            content.with_replay(std::sync::Arc::new(move || {
                let (src, opts) = (src.clone(), opts.clone());
                Box::pin(async move {
                    Ok(decode_as(format, ImageSource::RandomAccess(src), &opts)
                        .await?
                        .extents)
                })
            }))
        }
        None => content,
    };
    Ok((format, content))
}

/// Decodes `source`, known to be `format`.
async fn decode_as(
    format: DiskFormat,
    source: ImageSource,
    opts: &DecodeOptions,
) -> crate::Result<DiskContent> {
    let content = match (format, source) {
        (DiskFormat::Raw, ImageSource::RandomAccess(r)) => raw::decode_random(r, opts).await?,
        (DiskFormat::Raw, ImageSource::Sequential { size, stream }) => {
            raw::decode_sequential(size, stream)?
        }
        (DiskFormat::Qcow2, ImageSource::RandomAccess(r)) => qcow2::decode_random(r, opts).await?,
        (DiskFormat::Qcow2, ImageSource::Sequential { size, stream }) => {
            qcow2::decode_sequential(size, stream, opts).await?
        }
        (DiskFormat::Vmdk(VmdkSubformat::MonolithicFlat), ImageSource::RandomAccess(r)) => {
            let resolver = opts.extent_resolver.clone().ok_or_else(|| {
                crate::Error::unsupported(
                    "a VMDK descriptor (monolithicFlat, twoGbMaxExtentFlat or \
                     twoGbMaxExtentSparse) needs an extent resolver to open its extent files",
                )
            })?;
            vmdk::decode_flat(r, resolver, opts).await?
        }
        (DiskFormat::Vmdk(VmdkSubformat::MonolithicFlat), ImageSource::Sequential { .. }) => {
            return Err(crate::Error::unsupported(
                "a VMDK descriptor and its extent files cannot be read as a stream",
            ));
        }
        (DiskFormat::Vmdk(_), ImageSource::RandomAccess(r)) => vmdk::decode_random(r, opts).await?,
        (DiskFormat::Vmdk(_), ImageSource::Sequential { size, stream }) => {
            vmdk::decode_sequential(size, stream, opts).await?
        }
    };
    Ok(content.validated())
}

/// The unit in which qcow2 and VMDK record a disk's size, as QEMU reads them.
pub const SECTOR_SIZE: u64 = 512;

/// The virtual size an image of `format` holds for a disk of `size` bytes, as QEMU will read it.
///
/// QEMU reads the size of a qcow2 or VMDK image in whole 512-byte sectors and rounds *down*: a
/// qcow2 header that says 100,000,001 bytes opens as 99,999,744 bytes and the last 257 bytes of
/// the disk are gone. So every encoder of a sector-based format rounds such a size *up* to the
/// next sector and the added bytes read as zeros, which is what `qemu-img convert` does too
/// (a 100,000,001-byte raw file converts to a 100,000,256-byte qcow2 or VMDK). Nothing is lost
/// and nothing is refused. Raw keeps the exact size: QEMU reads a raw file's partial last
/// sector as data followed by zeros, so no byte is lost there either.
///
/// ```
/// use virtrigaud_core::format::{DiskFormat, stored_virtual_size};
/// assert_eq!(stored_virtual_size(DiskFormat::Qcow2, 100_000_001).unwrap(), 100_000_256);
/// assert_eq!(stored_virtual_size(DiskFormat::Qcow2, 1 << 30).unwrap(), 1 << 30);
/// assert_eq!(stored_virtual_size(DiskFormat::Raw, 100_000_001).unwrap(), 100_000_001);
/// ```
pub fn stored_virtual_size(format: DiskFormat, size: u64) -> crate::Result<u64> {
    match format {
        DiskFormat::Raw => Ok(size),
        DiskFormat::Qcow2 | DiskFormat::Vmdk(_) => {
            size.checked_next_multiple_of(SECTOR_SIZE).ok_or_else(|| {
                crate::Error::invalid(format!("disk of {size} bytes too large for {format}"))
            })
        }
    }
}

/// `content` grown with zeros to the size an image of `format` holds for it
/// ([`stored_virtual_size`]), and the size it had when that grew it.
///
/// The export pipeline applies it before hashing, so a manifest describes the stored disk as
/// QEMU reads it: its `virtual_size` is the rounded size and its content digest covers the
/// zero padding. [`encode`] applies it too, so every encoder sees a whole number of sectors.
pub fn pad_for(
    content: DiskContent,
    format: DiskFormat,
) -> crate::Result<(DiskContent, Option<u64>)> {
    let size = content.virtual_size;
    let stored = stored_virtual_size(format, size)?;
    if stored == size {
        return Ok((content, None));
    }
    Ok((content.padded_to(stored), Some(size)))
}

/// Encodes content into `format`, as a strictly sequential stream.
///
/// A size that `format` cannot hold exactly is rounded up to a whole sector with zeros (see
/// [`stored_virtual_size`]).
pub fn encode(
    content: DiskContent,
    format: DiskFormat,
    opts: &EncodeOptions,
) -> crate::Result<ChunkStream> {
    let (content, _) = pad_for(content, format)?;
    match format {
        DiskFormat::Raw => Ok(raw::encode(content)),
        DiskFormat::Qcow2 => qcow2::encode(content, opts),
        DiskFormat::Vmdk(VmdkSubformat::StreamOptimized) => {
            vmdk::encode_stream_optimized(content, opts)
        }
        DiskFormat::Vmdk(VmdkSubformat::MonolithicSparse) => {
            vmdk::encode_monolithic_sparse(content, opts)
        }
        DiskFormat::Vmdk(VmdkSubformat::MonolithicFlat) => Err(crate::Error::unsupported(
            "writing monolithicFlat VMDK (two files) is not supported; use raw plus a descriptor",
        )),
    }
}

/// Reads just enough of an image to tell its format and virtual size (metadata only).
pub async fn probe(src: &dyn crate::io::ReadAt) -> crate::Result<(DiskFormat, u64)> {
    let head = src.read_at(0, DETECT_LEN).await?;
    let format = DiskFormat::detect(&head)?;
    match format {
        DiskFormat::Raw => Ok((format, src.size())),
        DiskFormat::Qcow2 => Ok((format, qcow2::probe(src).await?)),
        DiskFormat::Vmdk(_) => Ok((format, vmdk::probe(src).await?)),
    }
}
