//! VMDK: monolithicSparse, streamOptimized and monolithicFlat decoders; streamOptimized and
//! monolithicSparse encoders.
//!
//! - [`header`]: the 512-byte sparse extent header (`KDMV`) and the stream markers.
//! - [`descriptor`]: the text descriptor (embedded in sparse files, or a file of its own for
//!   monolithicFlat).
//! - `reader`: decoders. A sparse file read by ranges goes header (and footer when
//!   `gdOffset` is `GD_AT_END`) → grain directory → grain tables → grains; the allocation map
//!   comes from the grain tables alone (zeroed grain entries are holes), and grains adjacent in
//!   the file are read together in pieces of up to `read_size`, `read_ahead` at once, inflated on
//!   blocking workers. A streamOptimized file arriving as one stream (an NFC export) is read
//!   strictly once: header, then markers from `overHead`; grains are inflated in parallel and
//!   emitted as they arrive, and must come in increasing LBA order (else `Corrupt`). A
//!   monolithicSparse file arriving as a stream is read too when its grain directory and tables
//!   precede the grains and the grains follow in guest order (what qemu-img and our encoder
//!   write); otherwise it is `Unsupported` ("needs random access"). A descriptor file
//!   (monolithicFlat, twoGbMaxExtentFlat, twoGbMaxExtentSparse; at most 64 KiB) names
//!   `FLAT`/`VMFS`/`ZERO`/`SPARSE` extents, opened through an [`ExtentResolver`] after their
//!   names are checked, concatenated in descriptor order: holes of flat extent files are
//!   skipped, and each hosted sparse extent is decoded like a monolithicSparse file (its grain
//!   tables give its part of the allocation map). A delta disk (a `parentCID`) is
//!   `Unsupported`, naming consolidation.
//! - `writer`: encoders, strictly sequential and deterministic. streamOptimized: header with
//!   `gdOffset = GD_AT_END`, descriptor, compressed grains (all-zero grains skipped, compression
//!   on `parallelism` blocking workers in batches of 16 grains, at most `2 × parallelism` batches
//!   in flight, results kept in order), then grain tables (only those that map a grain; the
//!   others are 0 in the directory), grain directory, footer and end-of-stream marker. A grain
//!   whose four 1 KiB samples do not shrink under a fast deflate level (already compressed or
//!   encrypted data) is put in deflate stored blocks instead of searched for matches: the same
//!   size within bytes, a copy instead of a full deflate, and still a function of the grain's
//!   bytes only. Only grain table entries are kept in memory (2 KiB per 32 MiB of virtual disk
//!   that holds data), never the data. monolithicSparse: header, descriptor, redundant and
//!   primary grain directory and tables computed from the allocation map (`None` = every grain
//!   allocated), then the grains uncompressed in LBA order (mapped grains with no data are
//!   written as zeros; data outside the map is `InvalidInput`).
//!
//! Every header and descriptor field is hostile input: sizes are bounded, every table offset is
//! checked against the file size before it is read, extent names cannot leave their directory.
//!
//! Limits: grain table entries are 32-bit sector offsets, so files are limited to 2 TiB; the
//! random-access decoder keeps 16 bytes per allocated grain in memory (25 MiB per 100 GiB of
//! allocated 64 KiB grains); ESXi's vmfsSparse/seSparse extents and grains compressed without
//! markers are not supported.

pub mod descriptor;
pub mod header;
mod reader;
mod writer;

pub use writer::{EMBEDDED_EXTENT_NAME, GRAIN_SECTORS};

use crate::Result;
use crate::extent::{DiskContent, ExtentStream};
use crate::format::{ChunkStream, DecodeOptions, DiskFormat, EncodeOptions, VmdkSubformat};
use crate::io::ReadAt;
use async_trait::async_trait;
use std::path::PathBuf;
use std::sync::Arc;

/// Opens the extent files a VMDK descriptor names (monolithicFlat).
#[async_trait]
pub trait ExtentResolver: Send + Sync {
    /// Opens the extent file `name` as the descriptor spells it (relative to the descriptor's
    /// directory). Implementations refuse names that leave that directory.
    async fn open(&self, name: &str) -> Result<Arc<dyn ReadAt>>;
}

/// Reads the header (or descriptor) and returns the virtual size (metadata only).
pub async fn probe(src: &dyn ReadAt) -> Result<u64> {
    reader::probe(src).await
}

/// Decodes a sparse VMDK (monolithicSparse or streamOptimized) read by ranges.
pub async fn decode_random(src: Arc<dyn ReadAt>, opts: &DecodeOptions) -> Result<DiskContent> {
    reader::decode_random(src, opts).await
}

/// Decodes a VMDK arriving as one sequential stream (streamOptimized).
pub async fn decode_sequential(
    size: Option<u64>,
    stream: ExtentStream,
    opts: &DecodeOptions,
) -> Result<DiskContent> {
    reader::decode_sequential(size, stream, opts).await
}

/// Decodes a monolithicFlat VMDK: a text descriptor plus flat extents opened by `resolver`.
pub async fn decode_flat(
    descriptor: Arc<dyn ReadAt>,
    resolver: Arc<dyn ExtentResolver>,
    opts: &DecodeOptions,
) -> Result<DiskContent> {
    reader::decode_flat(descriptor, resolver, opts).await
}

/// Encodes content as a streamOptimized VMDK, grains compressed in parallel.
///
/// A size that is not a whole number of 512-byte sectors is rounded up with zeros (see
/// [`stored_virtual_size`](crate::format::stored_virtual_size)).
pub fn encode_stream_optimized(content: DiskContent, opts: &EncodeOptions) -> Result<ChunkStream> {
    let (content, _) =
        crate::format::pad_for(content, DiskFormat::Vmdk(VmdkSubformat::StreamOptimized))?;
    writer::encode_stream_optimized(content, opts)
}

/// Encodes content as a monolithicSparse VMDK.
///
/// A size that is not a whole number of 512-byte sectors is rounded up with zeros (see
/// [`stored_virtual_size`](crate::format::stored_virtual_size)).
pub fn encode_monolithic_sparse(content: DiskContent, opts: &EncodeOptions) -> Result<ChunkStream> {
    let (content, _) =
        crate::format::pad_for(content, DiskFormat::Vmdk(VmdkSubformat::MonolithicSparse))?;
    writer::encode_monolithic_sparse(content, opts)
}

/// Opens extent files in one local directory, refusing names that would leave it (absolute,
/// with a separator, or `..`).
#[derive(Debug, Clone)]
pub struct LocalExtentResolver {
    /// The directory of the descriptor.
    pub dir: PathBuf,
}

impl LocalExtentResolver {
    /// A resolver for extents next to a descriptor in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalExtentResolver { dir: dir.into() }
    }
}

#[async_trait]
impl ExtentResolver for LocalExtentResolver {
    async fn open(&self, name: &str) -> Result<Arc<dyn ReadAt>> {
        descriptor::check_extent_name(name)?;
        let f = crate::io::LocalFile::open(self.dir.join(name)).await?;
        Ok(Arc::new(f))
    }
}

#[cfg(test)]
mod tests;
