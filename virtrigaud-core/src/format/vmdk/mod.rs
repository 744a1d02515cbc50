//! VMDK: monolithicSparse, streamOptimized and monolithicFlat decoders; streamOptimized and
//! monolithicSparse encoders.
//!
//! Not implemented yet: every function returns `Unsupported`.

use crate::extent::{DiskContent, ExtentStream};
use crate::format::{ChunkStream, DecodeOptions, EncodeOptions};
use crate::io::ReadAt;
use crate::{Error, Result};
use async_trait::async_trait;
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
    let _ = src;
    Err(Error::unsupported("VMDK is not implemented yet"))
}

/// Decodes a sparse VMDK (monolithicSparse or streamOptimized) read by ranges.
pub async fn decode_random(src: Arc<dyn ReadAt>, opts: &DecodeOptions) -> Result<DiskContent> {
    let _ = (src, opts);
    Err(Error::unsupported("VMDK is not implemented yet"))
}

/// Decodes a VMDK arriving as one sequential stream (streamOptimized).
pub async fn decode_sequential(
    size: Option<u64>,
    stream: ExtentStream,
    opts: &DecodeOptions,
) -> Result<DiskContent> {
    let _ = (size, stream, opts);
    Err(Error::unsupported("VMDK is not implemented yet"))
}

/// Decodes a monolithicFlat VMDK: a text descriptor plus flat extents opened by `resolver`.
pub async fn decode_flat(
    descriptor: Arc<dyn ReadAt>,
    resolver: Arc<dyn ExtentResolver>,
    opts: &DecodeOptions,
) -> Result<DiskContent> {
    let _ = (descriptor, resolver, opts);
    Err(Error::unsupported("VMDK is not implemented yet"))
}

/// Encodes content as a streamOptimized VMDK, grains compressed in parallel.
pub fn encode_stream_optimized(content: DiskContent, opts: &EncodeOptions) -> Result<ChunkStream> {
    let _ = (content, opts);
    Err(Error::unsupported("VMDK is not implemented yet"))
}

/// Encodes content as a monolithicSparse VMDK.
pub fn encode_monolithic_sparse(content: DiskContent, opts: &EncodeOptions) -> Result<ChunkStream> {
    let _ = (content, opts);
    Err(Error::unsupported("VMDK is not implemented yet"))
}
